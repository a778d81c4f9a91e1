"""Every local replica of a training step gets a batch of the same grid length (raw and
prepared sources), as MirroredStrategy deals them out: 4 logical CPUs in a subprocess,
since the device split is process-global (conftest.py already made 2 here)."""
import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from input_pipeline import prepare
import word_pairs  # tests/word_pairs.py

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPLICAS, _BATCH, _STEPS = 4, 16, 40
_GRID = [6, 10, 16]

_SCRIPT = """
import json, sys
from trainer import distribute
distribute.split_cpu(int(sys.argv[3]))
import tensorflow as tf
from configs import tiny
from input_pipeline import datasets
from input_pipeline import tokenizer as tokenizer_lib
source, workdir, _, batch_size, steps = sys.argv[1:6]
config = tiny.get_config()
config.data.train = config.data.eval = source
config.data.max_source_length = config.data.max_target_length = 16
config.data.bucket_boundaries = (6, 10, 16, 24)
config.data.shuffle_buffer = 100
config.tokenizer.vocab_size = 60
config.train.batch_size = int(batch_size)
tokenizer = tokenizer_lib.load_or_train(config.tokenizer, workdir,
                                        datasets.tokenizer_sample(config))
strategy = tf.distribute.MirroredStrategy(
    [d.name for d in tf.config.list_logical_devices("CPU")])
dataset = strategy.distribute_datasets_from_function(
    lambda ctx: datasets.make_dataset(config, tokenizer, "train", input_context=ctx))
shapes = [[list(t.shape) for t in strategy.experimental_local_results(batch["source"])]
          for batch, _ in zip(dataset, range(int(steps)))]
print(json.dumps(shapes))
"""


def _config(train: str):
  config = tiny.get_config()
  config.data.train = config.data.eval = train
  config.data.max_source_length = config.data.max_target_length = 16
  config.data.bucket_boundaries = (6, 10, 16, 24)
  config.data.shuffle_buffer = 100
  config.tokenizer.vocab_size = 60
  return config


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """{"raw": a tsv: source, "prepared": the same corpus prepared in 50-example shards}."""
  root = tmp_path_factory.mktemp("replica_lengths")
  lines = [f"{src}\t{tgt}\n" for src, tgt in word_pairs.make_pairs(600)]
  (root / "pairs.tsv").write_text("".join(lines), encoding="utf-8")
  raw = f"tsv:{root / 'pairs.tsv'}"
  prepare.prepare(_config(raw), str(root / "data"), shard_examples=50)
  return {"raw": raw, "prepared": f"prepared:{root / 'data'}"}


@pytest.mark.parametrize("kind", ["raw", "prepared"])
def test_the_replicas_of_a_step_get_the_same_length(sources, kind, tmp_path):
  result = subprocess.run(
      [sys.executable, "-c", _SCRIPT, sources[kind], str(tmp_path), str(_REPLICAS),
       str(_BATCH), str(_STEPS)], capture_output=True, text=True, timeout=300, cwd=_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  steps = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(steps) == _STEPS
  for shapes in steps:
    assert len(shapes) == _REPLICAS
    assert all(shape == [_BATCH // _REPLICAS, shapes[0][1]] for shape in shapes), shapes
  assert {shapes[0][1] for shapes in steps} == set(_GRID)  # The steps' lengths still vary.
