"""Train benchmark: fields and their consistency, the FLOPs formula, synthetic data, plot."""
import json
import os
import sys

import ml_collections
import pytest
import tensorflow as tf

from configs import tiny
from trainer import bench


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


def test_flops_formula_scales_like_the_model():
  config = _model_config(units=1024, embed_dim=256)
  one = bench.model_flops_per_step(config, 64, 24, 24, 531)
  assert bench.model_flops_per_step(config, 128, 24, 24, 531) == 2 * one
  assert 1.2e11 < one < 1.3e11  # ~41 GFLOP forward at the tutorial's sizes.


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


def test_run_reports_consistent_fields(tmp_path):
  tsv = str(tmp_path / "pairs.tsv")
  bench.write_synthetic_tsv(tsv, num_pairs=400, min_words=3, max_words=9, vocab_words=40)
  config = tiny.get_config()
  config.data.train = config.data.eval = f"tsv:{tsv}"
  config.data.shuffle_buffer = 100
  config.tokenizer.vocab_size = 40 + 31
  config.model.units, config.model.embed_dim = 32, 16
  config.train.batch_size, config.train.steps_per_loop = 16, 2
  config.train.xla = "off"

  result = bench.run(config, str(tmp_path / "workdir"), num_steps=4,
                     strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))

  json.dumps(result)  # One JSON line.
  assert result["precision"] == "float32" and result["xla"] == "off"
  assert result["batch_size"] == 16 and result["units"] == 32 and result["num_steps"] == 4
  step = result["step_time_s"]
  assert step > 0 and result["median_step_time_s"] > 0 and result["tokens_per_step"] > 0
  assert result["target_tokens_per_sec"] * step == pytest.approx(result["tokens_per_step"])
  assert result["examples_per_sec"] * step == pytest.approx(result["examples_per_step"])
  assert result["achieved_gflops_per_sec"] == pytest.approx(
      result["model_flops_per_step"] / step / 1e9)
  assert result["mfu"] == pytest.approx(
      result["achieved_gflops_per_sec"] / result["peak_gflops_per_sec"])
  assert 0.0 <= result["input_wait_fraction"] <= 1.0
  assert result["compile_count"] >= 1 and result["compile_seconds"] > 0
  assert set(result["batch_lengths"]) <= {12, 16, 24}


def test_plot_sweep_writes_a_png(tmp_path):
  runs = {"float32:off": [{"target_tokens_per_sec": 100.0, "mfu": 0.2},
                          {"target_tokens_per_sec": 180.0, "mfu": 0.3}]}
  path = str(tmp_path / "docs" / "plot.png")
  bench.plot_sweep(runs, [16, 32], path, "test")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compare_runs_both_systems_on_the_same_data(tmp_path):
  """Tiny sizes, and a stand-in for the tutorial that reports fixed rates."""
  tutorial = tmp_path / "tutorial.py"
  tutorial.write_text(
      "import json\n"
      "print(json.dumps({'target_tokens_per_sec': 90.0, 'sec_per_step': 2.0, 'batch': 8}))\n")
  config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.py")
  result = bench.compare(str(tutorial), config, str(tmp_path / "work"), ["float32:off"],
                         words=4, pairs=200, vocab_words=40, tutorial_steps=1, num_steps=2,
                         units=16, embed_dim=8, batch_size=8)
  for name in ("fixed", "variable"):
    project = result[name]["project"]["float32:off"]
    assert result[name]["tutorial"]["sentences_per_sec"] == 4.0
    assert result[name]["sentences_per_sec_ratio"]["float32:off"] == pytest.approx(
        project["sentences_per_sec"] / 4.0)
    assert result[name]["pieces_per_word"] == pytest.approx(1.0)
  assert result["fixed"]["project"]["float32:off"]["batch_lengths"] == [6]
  table = bench.compare_table(result).splitlines()
  assert len(table) == 4 and table[3].startswith("| float32:off | ")
  ratio = result["fixed"]["sentences_per_sec_ratio"]["float32:off"]
  assert f"**{ratio:.2f}x**" in table[3]
