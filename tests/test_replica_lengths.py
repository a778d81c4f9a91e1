"""Every local replica of a training step gets a batch of the same grid length (raw and
prepared sources), as MirroredStrategy deals them out: 4 logical CPUs in a subprocess,
since the device split is process-global (conftest.py already made 2 here)."""
import json
import os
import subprocess
import sys

import pytest

from input_pipeline import prepare
import word_pairs  # tests/word_pairs.py

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPLICAS, _BATCH, _STEPS = 4, 16, 40

_SCRIPT = """
import json, sys
from trainer import distribute
distribute.split_cpu(int(sys.argv[3]))
import tensorflow as tf
sys.path.insert(0, "tests")  # The working directory is the repository root.
import word_pairs
from input_pipeline import datasets
from input_pipeline import tokenizer as tokenizer_lib
source, workdir, _, batch_size, steps = sys.argv[1:6]
config = word_pairs.pipeline_config(source, batch_size=int(batch_size))
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


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """{"raw": a tsv: source, "prepared": the same corpus prepared in 50-example shards}."""
  root = tmp_path_factory.mktemp("replica_lengths")
  raw = f"tsv:{word_pairs.write_tsv(root / 'pairs.tsv', word_pairs.make_pairs(600))}"
  prepare.prepare(word_pairs.pipeline_config(raw), str(root / "data"), shard_examples=50)
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
  # The steps' lengths still vary.
  assert {shapes[0][1] for shapes in steps} == set(word_pairs.GRID)
