"""Step time with k logical CPU replicas on a mixed-length corpus: one JSON line.

  python -m benchmarks.replica_lengths [--replicas=4] [--steps=60] [--workdir=DIR]

Writes a synthetic TSV of 2..60 words a sentence (trainer.bench.write_synthetic_tsv), so
batches fall on every length of the default grid (8 ... 64), then runs `nmt-bench train`
(trainer.bench.run) on config.distribute.cpu_devices=k mirrored replicas of a small model,
and reads the distributed input for `--input_steps` steps to count how often a step's
replicas got different lengths. `pipeline` in the line says which input code ran:
"step_buckets" (one length per step) or "replica_buckets" (each replica its own, before).
Run it in its own process: the CPU split is process-global.
"""
import argparse
import json
import os
import tempfile
from typing import Dict, Sequence

import numpy as np

from configs import tiny
from input_pipeline import pipeline
from trainer import bench


def make_config(tsv: str, replicas: int, steps_per_loop: int):
  """The tiny model on the default length grid, k mirrored CPU replicas, 8 pairs each."""
  config = tiny.get_config()
  config.data.train = config.data.eval = f"tsv:{tsv}"
  config.data.max_source_length = config.data.max_target_length = 64
  config.data.bucket_boundaries = (8, 12, 16, 20, 24, 32, 40, 48, 64)
  config.data.shuffle_buffer = 2000
  config.tokenizer.vocab_size = 300 + 31  # One piece per word of the closed vocabulary.
  config.model.units, config.model.embed_dim = 64, 32
  config.train.batch_size, config.train.steps_per_loop = 8 * replicas, steps_per_loop
  config.train.xla = "off"  # No compile per (length, device) in the timed steps.
  config.distribute.strategy, config.distribute.cpu_devices = "mirrored", replicas
  return config


def replica_lengths(config, workdir: str, num_steps: int) -> Dict:
  """Per step, the k replicas' lengths as MirroredStrategy deals them out: how often they
  differ, and the mean over steps of their max against their mean (what a synchronous step
  pays for against what it needs)."""
  import tensorflow as tf  # After bench.run split the CPU.
  from input_pipeline import tokenizer as tokenizer_lib
  tokenizer = tokenizer_lib.load_or_train(config.tokenizer, workdir,
                                          pipeline.tokenizer_sample(config))
  strategy = tf.distribute.MirroredStrategy(
      [d.name for d in tf.config.list_logical_devices("CPU")])
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: pipeline.make_dataset(config, tokenizer, "train", input_context=ctx))
  lengths = np.array([[t.shape[1] for t in strategy.experimental_local_results(b["source"])]
                      for b, _ in zip(dataset, range(num_steps))])
  return dict(mixed_length_steps_fraction=float(np.mean(lengths.min(1) != lengths.max(1))),
              mean_max_replica_length=float(lengths.max(1).mean()),
              mean_replica_length=float(lengths.mean()))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--replicas", type=int, default=4)
  parser.add_argument("--steps", type=int, default=60, help="Timed train steps.")
  parser.add_argument("--input_steps", type=int, default=500)
  parser.add_argument("--pairs", type=int, default=20000)
  parser.add_argument("--workdir", default="")
  args = parser.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="replica_lengths_")
  tsv = os.path.join(workdir, "pairs.tsv")
  bench.write_synthetic_tsv(tsv, args.pairs, min_words=2, max_words=60, vocab_words=300)
  config = make_config(tsv, args.replicas, steps_per_loop=10)
  run_dir = os.path.join(workdir, "run")  # Fresh: train.setup would resume a checkpoint.
  result = bench.run(config, run_dir, num_steps=args.steps)
  line = dict(measurement="replica_lengths",
              pipeline="step_buckets" if hasattr(pipeline, "split_steps")
              else "replica_buckets",
              **replica_lengths(config, run_dir, args.input_steps),
              **{key: result[key] for key in (
                  "step_time_s", "median_step_time_s", "examples_per_sec",
                  "target_tokens_per_sec", "input_wait_fraction", "replicas", "num_steps",
                  "batch_size", "units", "xla", "compile_count", "load_avg_1m")})
  print(json.dumps(line))


if __name__ == "__main__":
  main()
