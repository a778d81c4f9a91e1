"""Console entry points (nmt-train, nmt-eval, nmt-translate, nmt-export, nmt-bench,
nmt-prepare, nmt-score).

The only module that reads absl FLAGS: each command parses flags, loads the config and
calls one function.
"""
import json
import math
import os
import re
import sys
from typing import Callable, List, Optional

# TensorFlow's C++ log: warnings and info off. On a machine without an NVIDIA driver its
# only error-level lines are CUDA's "failed call to cuInit", which would read as a fault on
# every CPU-only run, so errors go too there; with a driver they stay visible.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL",
                      "2" if os.path.exists("/proc/driver/nvidia/version") else "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import ml_collections  # noqa: E402

FLAGS = flags.FLAGS


class _DropRoutineCheckpointLines:
  """absl log filter: TensorFlow logs "Sharding callback duration" at INFO on every
  checkpoint save, which buries the progress lines."""

  def filter(self, record) -> bool:
    return not str(record.msg).startswith("Sharding callback duration")


absl_logging.get_absl_logger().addFilter(_DropRoutineCheckpointLines())


def _define_common() -> None:
  config_flags.DEFINE_config_file(
      "config", None,
      "Config file, e.g. configs/default.py; override keys with --config.train.steps=200.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, tokenizer, TensorBoard.")


def _run(main: Callable[[List[str]], None]) -> None:
  """app.run with our flag parsing: --help lists this command's flags and exits 0; a flag
  or config-file error is one `error:` line (exit 1)."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except KeyboardInterrupt:  # Ctrl-C outside nmt-train's loop (which saves and exits 42).
    sys.stderr.write("error: interrupted (SIGINT); nmt-train resumes from its last "
                     "checkpoint when rerun.\n")
    sys.exit(130)


def _parse_flags(argv: List[str]) -> List[str]:
  command = os.path.basename(argv[0])
  options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in options):
    print(_usage(command))
    sys.exit(0)
  config_file = next((a.split("=", 1)[1] for a in options if a.startswith("--config=")),
                     None)
  if config_file and not os.path.isfile(config_file.split(":", 1)[0]):
    _fail(f"--config={config_file}: no such file; use e.g. configs/default.py.")
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}. {command} --help lists the flags.")
  except (AttributeError, KeyError) as e:  # An unknown --config.KEY override.
    text = str(e.args[0] if e.args else e).replace("\\'", "'").replace("\\n", "\n")
    lines = text.strip("'\" ").splitlines()
    key = lines[0].strip("'\" ")
    hint = next((line.strip() for line in lines if "Did you mean" in line), "")
    given = [a.split("=", 1)[0] for a in options
             if a.startswith("--config.") and re.search(rf"\.{re.escape(key)}(\.|=|$)", a)]
    _fail(f"{given[0] if given else '--config.' + key}: no such config key '{key}'. "
          f"{hint} Keys: configs/default.py.")
  except Exception as e:  # pylint: disable=broad-except  (the config file itself raised)
    _fail(f"--config={config_file}: the config file does not load: "
          f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
  return []


def _usage(command: str) -> str:
  """The command's own flags (absl's --help would list only the flags of its __main__)."""
  lines = [f"usage: {command} [flags]", ""]
  for name in sorted(n for n in FLAGS if FLAGS.find_module_defining_flag(n) == __name__):
    flag = FLAGS[name]
    default = "" if flag.default is None else f" (default: {flag.default!r})"
    lines.append(f"  --{name}: {flag.help}{default}")
    if name == "config":
      lines.append("  --config.KEY=VALUE: override any key of the config file, e.g. "
                   "--config.train.steps=200 (keys: configs/default.py).")
  lines += ["", "Exit codes: 0 done, 1 error (one `error:` line on stderr), "
            "42 stopped by SIGTERM/SIGINT after saving a checkpoint "
            "(nmt-train: rerun to resume).", "absl's own flags: --helpfull."]
  return "\n".join(lines)


def _check_config(config, workdir: Optional[str] = None) -> None:
  """The config's one check per process; the library trusts it after this. Its keys
  (configs/validate.py) before the seconds of importing TensorFlow, with a workdir that
  the checkpoints there fit it, then the data sources (input_pipeline/datasets.py). A bad
  value is one `error:` line (exit 1)."""
  from configs import validate
  try:
    validate.validate(config)
    if workdir is not None:
      validate.check_resume(config, workdir)
    from input_pipeline import datasets  # Imports TensorFlow.
    datasets.check_sources(config)
  except validate.ConfigError as e:
    _fail(str(e))


def _train_main(argv) -> None:
  del argv
  _check_config(FLAGS.config, FLAGS.workdir)
  from trainer import train
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FloatingPointError, OSError) as e:  # CorpusError is a ValueError.
    _fail(str(e))
  except (train.tf.errors.PermissionDeniedError,
          train.tf.errors.ResourceExhaustedError) as e:  # A write into the workdir failed.
    _fail(f"{e.message.strip().splitlines()[0]} (check free space and permissions of "
          f"--workdir={FLAGS.workdir}; rerun to resume)")
  if summary["already_complete"]:
    print(f"The run in {FLAGS.workdir} was already complete at step {summary['step']}: "
          "nothing done, nothing written. Raise --config.train.steps to train further.")
  for source, reference, hypothesis in summary["samples"]:
    print(f"  {source}\n    -> {hypothesis}\n    (reference: {reference})")
  if summary["eval"]:
    print(f"Step {summary['step']}: BLEU {summary['eval']['bleu']:.1f}, "
          f"chrF {summary['eval']['chrf']:.1f}, eval loss {summary['eval']['loss']:.3f}. "
          f"TensorBoard: tensorboard --logdir {_absolute(FLAGS.workdir)}")
  if summary.get("test"):
    test = summary["test"]
    print(f"Test set {test['source']} ({test['examples']} pairs): BLEU {test['bleu']:.1f}, "
          f"chrF {test['chrf']:.1f}")
  final = {k: summary.get(k) for k in ("step", "eval", "test", "seconds", "eval_time_fraction",
                                        "stopped_by", "workdir", "interrupted",
                                        "already_complete")}
  print(_strict_json(final))
  if summary["interrupted"]:  # Stopped by a signal, checkpoint saved: rerun to resume.
    sys.exit(train.distribute.PREEMPTED_EXIT_CODE)


def _absolute(path: str) -> str:
  """A local path made absolute, to paste from another directory; a URL (gs://bucket/run)
  as it is: os.path.abspath would turn it into <cwd>/gs:/bucket/run."""
  return path if "://" in path else os.path.abspath(path)


def _strict_json(value) -> str:
  """One line of strict JSON: a non-finite number (a diverged loss) becomes null."""

  def clean(x):
    x = x.item() if hasattr(x, "item") else x  # NumPy scalars.
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
      return None
    return x

  return json.dumps(clean(value), default=float, allow_nan=False)


def run_train() -> None:
  _define_common()
  flags.mark_flags_as_required(["config", "workdir"])
  _run(_train_main)


def _bench_main(argv) -> None:
  if len(argv) != 2 or argv[1] not in ("input", "train", "doctor", "translate"):
    raise app.UsageError("usage: nmt-bench input|train|doctor --config=... [--workdir=DIR]"
                         " | nmt-bench translate --workdir=RUN --input=FILE")
  if argv[1] == "translate":
    if not FLAGS.workdir or not FLAGS.input:
      _fail("nmt-bench translate needs --workdir (a trained run) and --input (a text file)")
    from trainer import bench
    try:
      result = bench.translate_speed(FLAGS.workdir, FLAGS.input)
    except (ValueError, OSError) as e:
      _fail(str(e))
    print(json.dumps(result, default=float))
    return
  if FLAGS.config is None:
    _fail(f"nmt-bench {argv[1]} needs --config")
  workdir = FLAGS.workdir or os.path.join("/tmp", "nmt_bench")
  _check_config(FLAGS.config, None if argv[1] == "input" else workdir)
  try:
    if argv[1] == "input":
      from input_pipeline import benchmark
      result = benchmark.run(FLAGS.config, workdir, num_batches=FLAGS.num_batches,
                             start_step=FLAGS.start_step)
    elif argv[1] == "train":
      from trainer import bench
      result = bench.run(FLAGS.config, workdir, num_steps=FLAGS.num_steps)
    else:
      from trainer import bench
      for row in bench.doctor(FLAGS.config, workdir, FLAGS.num_steps, FLAGS.precisions,
                              FLAGS.xla_modes, FLAGS.recurrences):
        print(json.dumps(row, default=float), flush=True)
      return
  except (ValueError, OSError) as e:
    _fail(str(e))
  print(json.dumps(result, default=float))


def run_bench() -> None:
  _define_common()
  flags.DEFINE_integer("num_batches", 200, "Batches to time (nmt-bench input).")
  flags.DEFINE_integer("start_step", 0, "nmt-bench input: start the train stream as a run "
                       "resumed at this step would (seconds_to_first_batch).")
  flags.DEFINE_integer("num_steps", 30, "Train steps to time (nmt-bench train, doctor).")
  flags.DEFINE_list("precisions", ["float32", "mixed_float16", "mixed_bfloat16"],
                    "doctor: train.precision values to try.")
  flags.DEFINE_list("xla_modes", ["off", "decoder_step", "train_step"],
                    "doctor: train.xla values to try.")
  flags.DEFINE_list("recurrences", ["fused", "keras", "cudnn"],
                    "doctor: model.recurrence values to try.")
  flags.DEFINE_string("input", None, "nmt-bench translate: the text file to translate.")
  _run(_bench_main)


def _prepare_main(argv) -> None:
  del argv
  _check_config(FLAGS.config)
  from input_pipeline import prepare
  from input_pipeline import prepared
  try:
    manifest = prepare.prepare(
        FLAGS.config, FLAGS.output_dir, shard_examples=FLAGS.shard_examples,
        runner=FLAGS.runner or prepare.default_runner(),
        beam_options=prepare.beam_args(FLAGS.direct_num_workers or os.cpu_count() or 1,
                                       FLAGS.beam_pipeline_options))
  except (ValueError, OSError) as e:  # CorpusError and PreparedDataError are ValueErrors.
    _fail(str(e))
  print(json.dumps(dict(output_dir=FLAGS.output_dir, **prepared.summary(manifest))))


def run_prepare() -> None:
  config_flags.DEFINE_config_file("config", None, "Config file; data.train and data.eval "
                                  "are prepared with its tokenizer.* and data.* lengths.")
  flags.DEFINE_string("output_dir", None, "Directory to write (or, if finished, verify).")
  flags.DEFINE_integer("shard_examples", 20000, "Examples per train shard (about: each "
                       "holds ~examples/K of K shards) and per eval shard.", lower_bound=1)
  flags.DEFINE_string("runner", "", "single_process, or an Apache Beam runner: direct "
                      "(worker processes here), DataflowRunner, FlinkRunner, SparkRunner, "
                      "...; default: direct if Beam is installed (pip install -e "
                      "'.[beam]'), else single_process. docs/prepared.md.")
  flags.DEFINE_integer("direct_num_workers", 0, "--runner=direct: worker processes; 0 = "
                       "one per CPU.", lower_bound=0)
  flags.DEFINE_string("beam_pipeline_options", "", "Comma-separated KEY=VALUE Beam "
                      "pipeline options for a cluster runner, e.g. project=P,region=R,"
                      "temp_location=gs://B/tmp,setup_file=./setup.py.")
  flags.mark_flags_as_required(["config", "output_dir"])
  _run(_prepare_main)


def _fail(message: str) -> None:
  """Exits 1 with the message printed once, as `error: ...` on stderr."""
  sys.exit(f"error: {message}")


def _define_model_flags() -> None:
  """The flags naming the trained model: --workdir, --checkpoint, --average_last."""
  flags.DEFINE_string("workdir", None, "Run directory written by nmt-train (config.json, "
                      "tokenizer, checkpoints).")
  flags.DEFINE_string("checkpoint", None, "Checkpoint prefix or directory; default: the "
                      "workdir's latest.")
  flags.DEFINE_integer("average_last", 0, "Use the mean weights of the K newest checkpoints "
                       "of --checkpoint's directory (default the workdir's); 0 = no "
                       "averaging.", lower_bound=0)
  flags.DEFINE_bool("no_ema", False, "Use the raw weights, not the moving average a run "
                    "with train.ema_decay > 0 keeps in its checkpoints (the default then).")
  flags.mark_flags_as_required(["workdir"])


def _define_inference_flags() -> None:
  _define_model_flags()
  flags.DEFINE_integer("beam_size", None, "Beam width (1 = greedy); default: the run's "
                       "config.eval.beam_size.")
  flags.DEFINE_float("length_penalty", None, "Beam search's length-penalty alpha (0 = none; "
                     "larger favours longer outputs); default: the run's "
                     "config.eval.length_penalty. Tune it on dev, not test.", lower_bound=0.0)


def _load_model(for_export: bool = False):
  """The model the flags name (checkpoints.load_for_inference), its config's
  eval.length_penalty replaced by --length_penalty where the command has that flag."""
  from trainer import checkpoints
  loaded = checkpoints.load_for_inference(FLAGS.workdir, FLAGS.checkpoint,
                                          for_export=for_export,
                                          average_last=FLAGS.average_last,
                                          use_ema=not FLAGS.no_ema)
  if "length_penalty" in FLAGS and FLAGS.length_penalty is not None:
    # A new eval ConfigDict: a run's config may hold the field as an int (e.g. 1), which
    # ConfigDict would refuse to take a float.
    loaded.config.eval = ml_collections.ConfigDict(
        dict(loaded.config.eval.to_dict(), length_penalty=FLAGS.length_penalty))
  return loaded


def _eval_main(argv) -> None:
  del argv
  from trainer import evaluate, translate
  try:
    loaded = _load_model()
    if FLAGS.data:
      loaded.config.data.eval = FLAGS.data
      # A corpus named here is scored whole (as the test score at the end of a run is), not
      # cut to the first data.eval_examples sentences the in-training evaluations use.
      loaded.config.data.eval_examples = 0
    if FLAGS.examples is not None:
      loaded.config.data.eval_examples = FLAGS.examples
    beam_size = translate.resolve_beam_size(loaded.config, FLAGS.beam_size)
    metrics = evaluate.evaluate_checkpoint(loaded.config, loaded.tokenizer, loaded.model,
                                           beam_size)
  except (ValueError, OSError) as e:  # CorpusError is a ValueError.
    _fail(str(e))
  print(json.dumps(dict(metrics, checkpoint=loaded.checkpoint, step=loaded.step,
                        ema=loaded.ema, beam_size=beam_size,
                        length_penalty=loaded.config.eval.length_penalty), default=float))


def run_eval() -> None:
  _define_inference_flags()
  flags.DEFINE_string("data", None, "Corpus to score instead of the run's config.data.eval "
                      "(same syntax, e.g. tsv:test.tsv), all of it unless --examples.")
  flags.DEFINE_integer("examples", None, "Score the first N sentences (0 = all); default: "
                       "all of --data, or the run's data.eval_examples of its dev corpus "
                       "(as in its TensorBoard dev BLEU).", lower_bound=0)
  _run(_eval_main)


def _translate_main(argv) -> None:
  del argv
  from trainer import translate
  try:
    loaded = _load_model()
    beam_size = translate.resolve_beam_size(loaded.config, FLAGS.beam_size)
    if FLAGS.n_best > beam_size:
      raise ValueError(f"--n_best={FLAGS.n_best} needs --beam_size >= {FLAGS.n_best} "
                       f"(the beam size is {beam_size}).")
    translate_ids = translate.make_translate_fn(loaded.model, loaded.config, beam_size,
                                                n_best=FLAGS.n_best)
    translate.translate_file(translate_ids, loaded.tokenizer, loaded.config, FLAGS.input,
                             FLAGS.output, FLAGS.attention_dir, n_best=FLAGS.n_best,
                             with_scores=FLAGS.with_scores, alignments=FLAGS.alignments)
  except (ValueError, OSError) as e:
    _fail(str(e))


def run_translate() -> None:
  _define_inference_flags()
  flags.DEFINE_string("input", None, "Text file, one sentence per line; default: stdin.")
  flags.DEFINE_string("output", None, "Where to write translations; default: stdout.")
  flags.DEFINE_string("attention_dir", None, "Write line N's attention as DIR/00000N.png.")
  flags.DEFINE_integer("n_best", 1, "Hypotheses per input line, best first (<= the beam "
                       "size); above 1, lines are Moses n-best: 'LINE ||| TEXT ||| SCORE'.",
                       lower_bound=1)
  flags.DEFINE_bool("with_scores", False, "Write 'LINE ||| TEXT ||| SCORE' lines (score: "
                    "log P / length penalty) also for --n_best=1.")
  flags.DEFINE_bool("alignments", False, "Append ' ||| i-j ...' to each line: Pharaoh "
                    "source-target word links from the attention weights.")
  _run(_translate_main)


def _score_main(argv) -> None:
  del argv
  from trainer import translate
  try:
    loaded = _load_model()
    counts = translate.score_file(translate.make_score_fn(loaded.model), loaded.tokenizer,
                                  loaded.config, FLAGS.input, FLAGS.output)
  except (ValueError, OSError) as e:
    _fail(str(e))
  absl_logging.info("nmt-score: %s", counts)


def run_score() -> None:
  _define_model_flags()
  flags.DEFINE_string("input", None, "SOURCE<TAB>TARGET lines; default: stdin.")
  flags.DEFINE_string("output", None, "Where to write 'LOG_PROB<TAB>PER_TOKEN<TAB>TOKENS' "
                      "lines, one per input line; default: stdout.")
  _run(_score_main)


def _export_main(argv) -> None:
  del argv
  from trainer import export
  try:
    loaded = _load_model(for_export=True)
    translator = export.export(loaded.config, loaded.tokenizer, loaded.model,
                               FLAGS.export_dir, FLAGS.beam_size)
  except (ValueError, OSError) as e:
    _fail(str(e))
  print(json.dumps(dict(export_dir=FLAGS.export_dir, checkpoint=loaded.checkpoint,
                        step=loaded.step, beam_size=translator.beam_size, ema=loaded.ema)))


def run_export() -> None:
  _define_inference_flags()
  flags.DEFINE_string("export_dir", None, "SavedModel directory to write, e.g. "
                      "exports/nmt/1 for TensorFlow Serving.")
  flags.mark_flags_as_required(["export_dir"])
  _run(_export_main)
