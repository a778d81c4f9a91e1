"""Train benchmark: fields and their consistency, the FLOPs formula, synthetic data, plot."""
import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import tiny
from trainer import bench

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(units=1, embed_dim=1, encoder_layers=1,
                                          bidirectional=False))
  config.update(overrides)
  return config


def test_flops_formula_on_a_hand_computed_case():
  """B=1, S=2, one decoder step (target length 2), U=E=V=1, forward:
  encoder 2*1*2*(1+1)*3 = 24, keys 2*1*2*1*1 = 4, step W1 2 + score 4 + context 4
  + cell 2*1*2*3 + 2*1*1*3 = 28, projection 2*1*1*1*1 = 2: 58; training 3 x 58."""
  assert bench.model_flops_per_step(_model_config(), 1, 2, 2, 1) == 3 * 58
  # Bidirectional: encoder 2 x 24, bridge 2*1*2*2*1*1 + 2*1*2*1*1 = 12; the rest as above.
  assert bench.model_flops_per_step(_model_config(bidirectional=True), 1, 2, 2, 1) == (
      3 * (48 + 12 + 4 + 28 + 2))
  # A second decoder layer: + 2*1*1*3 (input) + 2*1*1*3 (recurrent) = 12 per step.
  assert bench.model_flops_per_step(_model_config(decoder_layers=2), 1, 2, 2, 1) == 3 * 70
  # Tied, E=2 != U=1: the units -> embed projection 2*1*1*1*2 = 4, then 2*1*1*2*1 = 4
  # against the untied 2; the cell's input is U + E = 3 wide: 2*1*3*3 + 6 = 24, the encoder
  # 2*1*2*(2+1)*3 = 36.
  assert bench.model_flops_per_step(_model_config(embed_dim=2, tie_embeddings=True),
                                    1, 2, 2, 1) == 3 * (36 + 4 + 10 + 24 + 8)


def test_flops_formula_scales_like_the_model():
  config = _model_config(units=1024, embed_dim=256)
  one = bench.model_flops_per_step(config, 64, 24, 24, 531)
  # ~41 GFLOP forward at the tutorial's sizes: 23 decoder steps of [64,1024]x[1024,~4.4k]
  # (attention query + GRU) dominate, 2*64*1024*4400*23 = 13 GFLOP, plus the attention's
  # [64,24,1024] elementwise work and the encoder.
  assert 1.2e11 < one < 1.3e11


def test_synthetic_tsv_has_the_asked_lengths_and_a_closed_vocabulary(tmp_path):
  path = str(tmp_path / "pairs.tsv")
  bench.write_synthetic_tsv(path, num_pairs=200, min_words=3, max_words=7, vocab_words=50)
  pairs = [line.rstrip("\n").split("\t") for line in open(path, encoding="utf-8")]
  assert len(pairs) == 200
  lengths = {len(s.split()) for s, _ in pairs}
  assert lengths <= set(range(3, 8)) and len(lengths) > 1
  assert all(len(s.split()) == len(t.split()) for s, t in pairs)
  words = {w for s, t in pairs for w in (s + " " + t).split()}
  assert words <= set(bench.synthetic_words(50))


def _bench_result(directory: str, strategy: str) -> dict:
  """nmt-bench train's result on a synthetic corpus, 4 steps."""
  tsv = os.path.join(directory, "pairs.tsv")
  bench.write_synthetic_tsv(tsv, num_pairs=400, min_words=3, max_words=9, vocab_words=40)
  config = tiny.get_config()
  config.data.train = config.data.eval = f"tsv:{tsv}"
  config.data.shuffle_buffer = 100
  config.tokenizer.vocab_size = 40 + 31
  config.model.units, config.model.embed_dim = 32, 16
  config.train.batch_size, config.train.steps_per_loop = 16, 2
  config.train.xla = "off"
  config.distribute.strategy, config.distribute.cpu_devices = strategy, 2
  return bench.run(config, os.path.join(directory, "workdir"), num_steps=4)


@pytest.mark.parametrize("strategy", ["one_device", "mirrored"])
def test_run_reports_consistent_fields(tmp_path, strategy):
  """mirrored: 2 logical CPUs, 8 pairs a replica, in a subprocess: its collectives would
  take instance keys that later tests' MirroredStrategies reuse with other shapes
  (collective keys are per process), aborting them."""
  if strategy == "mirrored":
    script = ("import json, sys; from tests.test_bench import _bench_result; "
              "print(json.dumps(_bench_result(sys.argv[1], 'mirrored')))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
  else:
    result = _bench_result(str(tmp_path), strategy)
  assert result["replicas"] == (2 if strategy == "mirrored" else 1)

  json.dumps(result)  # One JSON line.
  assert result["precision"] == "float32" and result["xla"] == "off"
  assert result["recurrence"] == "fused"
  assert result["batch_size"] == 16 and result["units"] == 32 and result["num_steps"] == 4
  # run()'s identities: a rate times the step time is the per-step count.
  assert result["target_tokens_per_sec"] * result["step_time_s"] == pytest.approx(
      result["tokens_per_step"])
  assert result["examples_per_sec"] * result["step_time_s"] == pytest.approx(
      result["examples_per_step"])
  assert result["median_step_time_s"] > 0
  # What the data holds: 16 pairs a batch, each target 3..9 words + EOS, one piece a word.
  assert result["examples_per_step"] == 16
  assert 16 * 4 <= result["tokens_per_step"] <= 16 * 10
  # A FLOPs formula off by a factor would put MFU outside (0, 1]: the peak is measured.
  assert 0.0 < result["mfu"] <= 1.0
  # Four warm-up steps barely train: a uniform guess's loss, log(V) = 4.26 nats a token (not
  # divided by the global token count, two replicas' loss would be twice that).
  assert result["final_loss"] == pytest.approx(math.log(result["target_vocab_size"]), abs=0.1)
  assert 0.0 <= result["input_wait_fraction"] <= 1.0
  assert result["compile_count"] >= 1 and result["compile_seconds"] > 0
  assert set(result["batch_lengths"]) <= {12, 16, 24}
