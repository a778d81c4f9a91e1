"""`validate(config)`: every key of configs/default.py checked once, before TensorFlow loads.

Pure Python (ml_collections only), so nmt-train reports a bad flag or config value in one
line without the seconds of a TensorFlow import. Checks here need no device; which
precision x XLA x recurrence combination runs on the device present is decided by
`trainer.distribute.resolve_modes`, also once at start-up. Every message has one shape:
`config.KEY=VALUE is invalid: WHY` (several keys: each named with its value).
"""
import glob
import json
import os
from typing import Any, Callable, Optional, Sequence

import ml_collections

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
XLA_MODES = ("auto", "off", "decoder_step", "train_step")
RECURRENCES = ("auto", "fused", "keras", "cudnn")
DROPOUT_RNGS = ("auto", "default", "threefry")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
# model.* keys that shape the variables: a checkpoint fits only the values it was trained with.
SHAPE_KEYS = ("model.units", "model.embed_dim", "model.encoder_layers", "model.bidirectional",
              "model.decoder_layers", "model.tie_embeddings")


class ConfigError(ValueError):
  """An invalid config value or combination; the message names each key and its value."""


def invalid(key: str, value: Any, why: str) -> ConfigError:
  """The one message shape: `config.KEY=VALUE is invalid: WHY`."""
  return ConfigError(f"config.{key}={value!r} is invalid: {why}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid key or combination of keys."""
  for section in (_data, _tokenizer, _model, _train, _eval, _distribute):
    section(config)


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
  """ConfigError naming each model.* key (SHAPE_KEYS) whose value differs from the one in
  <workdir>/config.json when the workdir holds checkpoints: they would not fit the model.

  A URL workdir (gs://, ram://, ...) is read through tf.io.gfile, which imports TensorFlow:
  only such a run pays for that here."""
  exists, glob_files, read_text = _filesystem(workdir)
  saved_path = os.path.join(workdir, "config.json")
  if not (exists(saved_path)
          and glob_files(os.path.join(workdir, "checkpoints", "ckpt-*.index"))):
    return
  try:
    saved = json.loads(read_text(saved_path))
  except (OSError, ValueError):
    return  # Reported when the run reads it.
  changed = []
  for key in SHAPE_KEYS:
    try:
      old = _get(saved, key)
    except (KeyError, TypeError):
      continue
    if old != _get(config, key):
      changed.append((key, old, _get(config, key)))
  if changed:
    raise ConfigError(
        ", ".join(f"config.{k}={new!r}" for k, _, new in changed)
        + f" {'is' if len(changed) == 1 else 'are'} invalid: the checkpoints in {workdir} "
        f"were trained with " + ", ".join(f"{k}={old!r}" for k, old, _ in changed)
        + f" ({saved_path}). Use those values to resume, or another --workdir to train "
        "a new model.")


def _filesystem(path: str) -> tuple[Callable, Callable, Callable]:
  """(exists, glob, read_text) for `path`: os and glob for a local path, so that a bad
  flag is still reported before TensorFlow loads; tf.io.gfile for a URL (gs://bucket/run),
  which os.path would take for a missing local directory."""
  if "://" not in path:
    def read_local(name: str) -> str:
      with open(name, encoding="utf-8") as f:
        return f.read()
    return os.path.exists, glob.glob, read_local
  import tensorflow as tf  # Only for URLs: local runs check here without the import.

  def read_url(name: str) -> str:
    try:
      with tf.io.gfile.GFile(name, "rb") as f:
        return f.read().decode("utf-8")
    except tf.errors.OpError as e:
      raise OSError(e.message) from e

  def glob_url(pattern: str) -> list[str]:
    try:
      return tf.io.gfile.glob(pattern)
    except tf.errors.NotFoundError:
      return []
  return tf.io.gfile.exists, glob_url, read_url


def _get(config, key: str):
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(config, key: str, choices: Sequence[str]) -> None:
  if _get(config, key) not in choices:
    raise invalid(key, _get(config, key), "must be one of " + " | ".join(choices))


def _ints(config, least: int, *keys: str) -> None:
  for key in keys:
    value = _get(config, key)
    if not _is_int(value) or value < least:
      raise invalid(key, value, f"must be an integer >= {least}")


def _bool(config, *keys: str) -> None:
  for key in keys:
    if not isinstance(_get(config, key), bool):
      raise invalid(key, _get(config, key), "must be True or False")


def _number(config, key: str, low: float, high: float = float("inf"),
            high_open: bool = False) -> None:
  value = _get(config, key)
  if (not _is_number(value) or value < low or value > high
      or (high_open and value == high)):
    bound = f"< {high}" if high_open else f"<= {high}"
    raise invalid(key, value, f"must be a number >= {low}"
                  + ("" if high == float("inf") else f" and {bound}"))


def _data(config) -> None:
  # The source strings' kinds and syntax: input_pipeline/datasets.py's check_sources, next
  # to the table of source kinds (the entry points call both).
  for key in ("data.train", "data.eval", "data.test"):
    if not isinstance(_get(config, key), str):
      raise invalid(key, _get(config, key), "must be a source string like "
                    "embedded:deu-eng or tsv:PATH (docs/data.md)")
  _bool(config, "data.deterministic")
  if not isinstance(config.data.service_address, str):
    raise invalid("data.service_address", config.data.service_address,
                  'must be a string: "" (off) or the dispatcher, like grpc://host:5050')
  _choice(config, "data.length_policy", ("drop", "truncate"))
  _choice(config, "data.batch_by", ("sentences", "tokens"))
  _number(config, "data.max_skip_fraction", 0, 1)
  # Room for one real token besides EOS (source) and BOS + EOS (target).
  _ints(config, 2, "data.max_source_length")
  _ints(config, 3, "data.max_target_length")
  _ints(config, 0, "data.shuffle_buffer", "data.eval_examples")
  boundaries = config.data.bucket_boundaries
  if (not isinstance(boundaries, (tuple, list)) or not boundaries
      or not all(_is_int(b) and b > 0 for b in boundaries)):
    raise invalid("data.bucket_boundaries", boundaries,
                  "must be a non-empty sequence of positive integers")
  if any(a >= b for a, b in zip(boundaries, boundaries[1:])):
    raise invalid("data.bucket_boundaries", boundaries, "must be strictly increasing")
  longest = max(config.data.max_source_length, config.data.max_target_length)
  if boundaries[-1] < longest:
    raise invalid("data.bucket_boundaries", boundaries,
                  "must end in a boundary >= max(data.max_source_length, "
                  f"data.max_target_length) = {longest}")
  if config.data.batch_by == "tokens" and config.train.tokens_per_batch <= 0:
    raise invalid("train.tokens_per_batch", config.train.tokens_per_batch,
                  "must be > 0 when data.batch_by='tokens'")


def _tokenizer(config) -> None:
  _choice(config, "tokenizer.model_type", ("unigram", "bpe"))
  _bool(config, "tokenizer.joint")
  _ints(config, 8, "tokenizer.vocab_size")
  _ints(config, 1, "tokenizer.sample_size")
  _number(config, "tokenizer.character_coverage", 0.9, 1.0)
  _number(config, "tokenizer.sampling_alpha", 0.0)
  nbest = config.tokenizer.sampling_nbest
  if not _is_int(nbest) or nbest < 2:
    raise invalid("tokenizer.sampling_nbest", nbest, "must be an integer >= 2 (SentencePiece's "
                  "nbest_size=-1, sampling the whole lattice, cannot be seeded here)")
  if config.tokenizer.sampling_alpha > 0 and config.tokenizer.model_type != "unigram":
    raise ConfigError(
        f"config.tokenizer.sampling_alpha={config.tokenizer.sampling_alpha!r} with "
        f"config.tokenizer.model_type={config.tokenizer.model_type!r} is invalid: subword "
        "sampling needs a unigram model (BPE-dropout cannot be seeded in tf_text); use "
        "tokenizer.model_type='unigram' or tokenizer.sampling_alpha=0")


def _model(config) -> None:
  _ints(config, 1, "model.units", "model.embed_dim", "model.encoder_layers",
        "model.decoder_layers")
  _number(config, "model.dropout", 0.0, 1.0, high_open=True)
  _choice(config, "model.recurrence", RECURRENCES)
  _choice(config, "model.dropout_rng", DROPOUT_RNGS)
  _bool(config, "model.bidirectional", "model.tie_embeddings")


def _train(config) -> None:
  t = config.train
  _ints(config, 1, "train.batch_size", "train.steps", "train.steps_per_loop",
        "train.log_every", "train.checkpoint_every", "train.eval_every",
        "train.keep_checkpoints", "train.max_nonfinite_steps")
  _ints(config, 0, "train.warmup_steps", "train.tokens_per_batch",
        "train.early_stopping_patience")
  _ints(config, 1, "train.accumulate_steps")
  _number(config, "train.max_seconds", 0.0)
  _number(config, "train.early_stopping_min_delta", 0.0)
  _number(config, "train.learning_rate", 0.0)
  if t.learning_rate == 0:
    raise invalid("train.learning_rate", t.learning_rate, "must be > 0")
  _number(config, "train.clip_norm", 0.0)
  _number(config, "train.label_smoothing", 0.0, 1.0, high_open=True)
  _choice(config, "train.decay", ("constant", "rsqrt", "cosine"))
  _number(config, "train.ema_decay", 0.0, 1.0, high_open=True)
  _bool(config, "train.deterministic_ops")
  _choice(config, "train.precision", PRECISIONS)
  _choice(config, "train.xla", XLA_MODES)
  if t.profile_steps:
    parts = str(t.profile_steps).split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or (
        int(parts[0]) >= int(parts[1])):
      raise invalid("train.profile_steps", t.profile_steps,
                    "must be 'START,END' with START < END, or '' for off")
  conflict = mode_conflict(config.model.recurrence, t.xla, t.precision)
  if conflict:
    raise ConfigError(conflict)
  if config.model.dropout_rng == "threefry" and t.xla not in ("auto", "train_step"):
    raise ConfigError(threefry_refusal(t.xla))


def threefry_refusal(xla: str) -> str:
  """Why model.dropout_rng=threefry cannot run with this (resolved) train.xla."""
  return (f"config.model.dropout_rng='threefry' with config.train.xla={xla!r} cannot run: "
          "only XLA implements ThreeFry (TensorFlow's own random kernels reject it). "
          "Use train.xla=train_step, or model.dropout_rng=auto.")


def mode_conflict(recurrence: str, xla: str, precision: str) -> Optional[str]:
  """Why a recurrence x XLA x precision combination cannot run on any device, or None.

  (What the device present allows is trainer.distribute.mode_refusal.)
  """
  if recurrence == "cudnn" and xla == "train_step":
    return ("config.train.xla='train_step' with config.model.recurrence='cudnn' cannot "
            "run: XLA has no kernel for the cuDNN RNN op. Use train.xla=decoder_step or "
            "off, or model.recurrence=fused (XLA-compilable on every device).")
  if recurrence == "cudnn" and precision == "mixed_bfloat16":
    return ("config.model.recurrence='cudnn' with config.train.precision='mixed_bfloat16' "
            "is refused: Keras runs its cuDNN GRU in float32/float16 only. Use "
            "mixed_float16, or model.recurrence=fused.")
  return None


def _eval(config) -> None:
  _ints(config, 1, "eval.beam_size", "eval.batch_size")
  _ints(config, 0, "eval.num_probes")
  _number(config, "eval.length_penalty", 0.0)
  _number(config, "eval.max_length_ratio", 0.1)
  probes = config.eval.probe_sentences
  if not isinstance(probes, (tuple, list)) or not all(isinstance(p, str) for p in probes):
    raise invalid("eval.probe_sentences", probes, "must be a sequence of strings")


def _distribute(config) -> None:
  _choice(config, "distribute.strategy", STRATEGIES)
  _choice(config, "distribute.collective", ("auto", "nccl", "ring"))
  _ints(config, 0, "distribute.cpu_devices")
  _number(config, "distribute.collective_timeout_s", 0.0)
