"""Step time with k logical CPU replicas on a mixed-length corpus, this pipeline against an
earlier pipeline.py, alternately in one process: one JSON line.

  git show 613479c^:input_pipeline/pipeline.py > /tmp/pipeline_before.py
  python -m benchmarks.replica_lengths --before=/tmp/pipeline_before.py

Writes a synthetic TSV of 2..60 words a sentence (trainer.bench.write_synthetic_tsv), so
batches fall on every length of the default grid (8 ... 64), builds a run as nmt-bench train
does (config.distribute.cpu_devices=k mirrored replicas of a small model), compiles every
grid shape, then times `--rounds` rounds of `--steps` steps from each pipeline in turn (so
load from other processes hits both alike). For the timed steps it also replays each
pipeline to report how often a step's replicas got different lengths and the mean over
steps of their longest length against their mean length. Without --before, only this
pipeline. Run it in its own process: the CPU split is process-global.
"""
import argparse
import importlib.util
import json
import os
import tempfile
import time
from typing import Dict, Sequence

import numpy as np

from configs import tiny
from configs import validate
from input_pipeline import datasets
from trainer import bench
from trainer import run_setup
from trainer import train


def make_config(tsv: str, replicas: int):
  """The tiny model on the default length grid, k mirrored CPU replicas, 8 pairs each."""
  config = tiny.get_config()
  config.data.train = config.data.eval = f"tsv:{tsv}"
  config.data.max_source_length = config.data.max_target_length = 64
  config.data.bucket_boundaries = (8, 12, 16, 20, 24, 32, 40, 48, 64)
  config.data.shuffle_buffer = 2000
  config.tokenizer.vocab_size = 300 + 31  # One piece per word of the closed vocabulary.
  config.model.units, config.model.embed_dim = 64, 32
  config.train.batch_size = 8 * replicas
  config.train.xla = "off"  # No compile per (length, device) in the timed steps.
  config.distribute.strategy, config.distribute.cpu_devices = "mirrored", replicas
  return config


def _load(path: str):
  """A module file from another commit with make_dataset(config, tokenizer, split,
  input_context=...) (input_pipeline/pipeline.py before 2026-12-03, datasets.py since;
  the file's own imports must still resolve in this tree)."""
  spec = importlib.util.spec_from_file_location("pipeline_before", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _distributed(run: run_setup.Run, module):
  return run.strategy.distribute_datasets_from_function(
      lambda ctx: module.make_dataset(run.config, run.tokenizer, "train", input_context=ctx))


def replica_lengths(run: run_setup.Run, module, skip: int, num_steps: int) -> Dict:
  """Steps skip..skip+num_steps of `module`'s stream, replayed: the replicas' lengths as
  MirroredStrategy deals them out (what a synchronous step waits for vs. needs)."""
  steps = iter(_distributed(run, module))
  lengths = []
  for i in range(skip + num_steps):
    batch = next(steps)
    if i >= skip:
      lengths.append([t.shape[1] for t in
                      run.strategy.experimental_local_results(batch["source"])])
  lengths = np.array(lengths)
  return dict(mixed_length_steps_fraction=float(np.mean(lengths.min(1) != lengths.max(1))),
              mean_max_replica_length=float(lengths.max(1).mean()),
              mean_replica_length=float(lengths.mean()))


def compare(config, workdir: str, modules: Dict, rounds: int, steps: int) -> Dict:
  """{name: step times and replica lengths} for each pipeline module, timed alternately."""
  run = run_setup.setup(config, workdir)
  train_loop = train.make_run_train_loop(run)
  bench._warm_up(run, train_loop, run.config)  # pylint: disable=protected-access
  iterators = {name: iter(_distributed(run, module)) for name, module in modules.items()}
  for iterator in iterators.values():  # Fills the shuffle buffers; not timed.
    bench._call(train_loop, iterator, 1)  # pylint: disable=protected-access
  times = {name: [] for name in modules}
  for _ in range(rounds):
    for name, iterator in iterators.items():
      seconds = bench._call(train_loop, iterator, steps)[2]  # pylint: disable=protected-access
      times[name].append(seconds / steps)
  return {name: dict(step_time_s=float(np.mean(times[name])),
                     min_round_step_time_s=float(np.min(times[name])),
                     **replica_lengths(run, module, 1, rounds * steps))
          for name, module in modules.items()}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--before", default="", help="An earlier module with make_dataset "
                      "(input_pipeline/datasets.py, or pipeline.py before 2026-12-03).")
  parser.add_argument("--replicas", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10, help="Timed steps per round.")
  parser.add_argument("--pairs", type=int, default=10000)
  parser.add_argument("--workdir", default="")
  args = parser.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="replica_lengths_")
  os.makedirs(workdir, exist_ok=True)
  tsv = os.path.join(workdir, "pairs.tsv")
  bench.write_synthetic_tsv(tsv, args.pairs, min_words=2, max_words=60, vocab_words=300)
  config = make_config(tsv, args.replicas)
  validate.validate(config)
  modules = {"after": datasets}
  if args.before:
    modules = {"before": _load(args.before), **modules}
  load_before = os.getloadavg()[0]
  result = compare(config, os.path.join(workdir, "run"), modules, args.rounds, args.steps)
  print(json.dumps(dict(
      measurement="replica_lengths", replicas=args.replicas, rounds=args.rounds,
      steps_per_round=args.steps, batch_size=config.train.batch_size,
      units=config.model.units, xla=config.train.xla, before_pipeline=args.before or None,
      date=time.strftime("%Y-%m-%d"), load_avg_1m=[load_before, os.getloadavg()[0]],
      **result)))


if __name__ == "__main__":
  main()
