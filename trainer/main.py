"""Console entry points (nmt-train, nmt-eval, nmt-translate, nmt-export, nmt-bench).

The only module that reads absl FLAGS: each command parses flags, loads the config and
calls one function.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "default.py")


def _define_common(config_required: bool = True) -> None:
  config_flags.DEFINE_config_file(
      "config", None if config_required else _DEFAULT_CONFIG,
      "Config file, e.g. configs/default.py; override keys with --config.train.steps=200.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, tokenizer, TensorBoard.")


def _train_main(argv) -> None:
  del argv
  from trainer import train
  summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  final = {k: summary[k] for k in ("step", "eval", "seconds", "workdir", "interrupted")}
  print(json.dumps(final, default=float))


def run_train() -> None:
  _define_common()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_train_main)


def _bench_main(argv) -> None:
  if len(argv) != 2 or argv[1] not in ("input", "train"):
    raise app.UsageError("usage: nmt-bench input|train --config=... [--workdir=DIR]")
  workdir = FLAGS.workdir or os.path.join("/tmp", "nmt_bench")
  if argv[1] == "input":
    from input_pipeline import benchmark
    result = benchmark.run(FLAGS.config, workdir, num_batches=FLAGS.num_batches)
  else:
    from trainer import bench
    result = bench.run(FLAGS.config, workdir, num_steps=FLAGS.num_steps)
  print(json.dumps(result, default=float))


def run_bench() -> None:
  _define_common()
  flags.DEFINE_integer("num_batches", 200, "Batches to time (nmt-bench input).")
  flags.DEFINE_integer("num_steps", 30, "Train steps to time (nmt-bench train).")
  flags.mark_flags_as_required(["config"])
  app.run(_bench_main)


def _fail(message: str) -> None:
  logging.error(message)
  sys.exit(f"error: {message}")
