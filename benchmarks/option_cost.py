"""Per-step cost of config options, A/B interleaved in one process; prints one JSON line.

Sequential `nmt-bench train` runs of each option compare badly on a shared VM: its speed
drifts by +-20% within minutes (docs/training.md). Here every variant is built once, as
`nmt-train` builds it (run_setup.setup + train.make_run_train_loop, so the moving average's
update is timed too), warmed up, and then the variants are timed in turn, `--rounds`
times `--steps` steps each, on the same fixed-shape batch ([batch_size, --length] random
ids on both sides, no input pipeline: input-side options such as
tokenizer.sampling_alpha are not measured here, `nmt-bench train` reports their input wait).
The result is each variant's median step time and its ratio to the first variant's.

    python -m benchmarks.option_cost --config=configs/tatoeba.py \
      --variant=base: --variant=ema:train.ema_decay=0.999 \
      --variant=tie:model.tie_embeddings=True --variant=dl2:model.decoder_layers=2
"""
import argparse
import ast
import importlib.util
import json
import os
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
import tensorflow as tf

from trainer import bench
from trainer import run_setup
from trainer import train


def parse_variant(text: str) -> Tuple[str, Dict[str, object]]:
  """'name:section.key=value,section.key=value' -> (name, {key: value}); values are
  Python literals where they parse as one (True, 0.999, (8, 16)), else strings."""
  name, _, overrides = text.partition(":")
  if not name:
    raise ValueError(f"--variant={text!r}: expected name:key=value,... (name may not be "
                     "empty)")
  parsed = {}
  for item in filter(None, overrides.split(",")):
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
      raise ValueError(f"--variant={text!r}: {item!r} is not section.key=value")
    try:
      parsed[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed[key] = value
  return name, parsed


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("option_cost_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def build(config_path: str, overrides: Dict[str, object], args, workdir: str):
  """A variant's train loop and an endless iterator over one fixed-shape batch."""
  config = load_config(config_path)
  config.train.precision = args.precision
  config.tokenizer.sample_size = args.sample_size
  config.data.test = ""
  for key, value in overrides.items():
    section, name = key.split(".", 1)
    if name not in config[section]:
      raise ValueError(f"{key}: no such config key in {config_path}")
    config[section][name] = value
  run = run_setup.setup(config, workdir)
  loop = train.make_run_train_loop(run)
  vocab = min(run.tokenizer.source_vocab_size, run.tokenizer.target_vocab_size)
  rows = config.train.batch_size // run.strategy.num_replicas_in_sync

  def dataset_fn(ctx):
    del ctx
    ids = tf.random.stateless_uniform([rows, args.length], seed=[0, 1], minval=4,
                                      maxval=vocab, dtype=tf.int32)
    return tf.data.Dataset.from_tensors({"source": ids, "target": ids}).repeat()

  iterator = iter(run.strategy.distribute_datasets_from_function(dataset_fn))
  return loop, iterator, run


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/tatoeba.py")
  parser.add_argument("--variant", action="append", default=[],
                      help="name:section.key=value,... (repeat; the first is the baseline)")
  parser.add_argument("--precision", default="float32")
  parser.add_argument("--length", type=int, default=16, help="source = target length")
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
  parser.add_argument("--sample_size", type=int, default=20000,
                      help="sentences to train each variant's SentencePiece model on")
  args = parser.parse_args(argv)
  variants: List[Tuple[str, Dict]] = [parse_variant(v) for v in args.variant or ["base:"]]
  built = {}
  with tempfile.TemporaryDirectory() as root:
    for name, overrides in variants:
      loop, iterator, run = build(args.config, overrides, args, os.path.join(root, name))
      for _ in range(2):  # Trace and compile, then one compiled call.
        loop(iterator, tf.constant(args.steps))
      built[name] = (loop, iterator, run)
    peak = bench.measure_peak_gflops(tf.float32)
    times = {name: [] for name, _ in variants}
    for _ in range(args.rounds):
      for name, _ in variants:
        loop, iterator, _ = built[name]
        start = time.perf_counter()
        out, _ = loop(iterator, tf.constant(args.steps))
        float(out["loss"][-1])
        times[name].append((time.perf_counter() - start) / args.steps)
  base = float(np.median(times[variants[0][0]]))
  result = dict(config=args.config, precision=args.precision, length=args.length,
                rounds=args.rounds, steps=args.steps, peak_gflops_per_sec=peak,
                variants={name: dict(overrides={k: str(v) for k, v in overrides.items()},
                                     median_step_s=float(np.median(times[name])),
                                     min_step_s=float(np.min(times[name])),
                                     vs_first=float(np.median(times[name])) / base)
                          for name, overrides in variants})
  print(json.dumps(result))


if __name__ == "__main__":
  main()
