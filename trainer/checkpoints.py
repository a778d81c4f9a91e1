"""A run directory for inference: its saved config, its checkpoints, restoring a model.

`nmt-train` writes `<workdir>/config.json`, so `nmt-eval`, `nmt-translate` and
`nmt-export` rebuild exactly the trained model from the workdir alone. Every failure says
which directory, file or config key is wrong and what to do.
"""
import dataclasses
import json
import os
import re
from typing import Optional

from absl import logging
import ml_collections
import tensorflow as tf

from input_pipeline import tokenizer as tokenizer_lib
from trainer import distribute
from trainer import model as model_lib

CONFIG_FILE = "config.json"
# Config keys that change the variables' shapes or the vocabulary a checkpoint fits.
_MODEL_KEYS = ("model", "tokenizer")


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config as <workdir>/config.json; warns which keys changed if one exists."""
  path = os.path.join(workdir, CONFIG_FILE)
  if tf.io.gfile.exists(path):
    changed = _differences(_read_json(path), config.to_dict(), keys=None)
    if changed:
      logging.warning("%s is replaced; changed keys: %s", path, "; ".join(changed))
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(json.dumps(config.to_dict(), indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads <workdir>/config.json back into a ConfigDict (lists become tuples again)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise ValueError(f"no {CONFIG_FILE} in {workdir}: it is written by nmt-train; train "
                     f"first with nmt-train --config=configs/default.py --workdir={workdir}")
  return ml_collections.ConfigDict(_tuples(_read_json(path)))


def find_checkpoint(workdir: str, checkpoint: Optional[str] = None) -> str:
  """The checkpoint to use: `checkpoint` (a prefix or a directory) or the workdir's latest."""
  if checkpoint:
    path = (tf.train.latest_checkpoint(checkpoint) if tf.io.gfile.isdir(checkpoint)
            else checkpoint)
    if not path or not tf.io.gfile.exists(path + ".index"):
      raise ValueError(f"--checkpoint={checkpoint}: no checkpoint there; pass a prefix like "
                       f"{os.path.join(workdir, 'checkpoints', 'ckpt-1000')} or a directory "
                       "holding checkpoints.")
    return path
  path = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  if not path:
    raise ValueError(f"no checkpoint in {workdir}; train first with nmt-train "
                     f"--config=configs/default.py --workdir={workdir}")
  return path


def checkpoint_step(path: str) -> Optional[int]:
  """The training step of a checkpoint saved by nmt-train (`.../ckpt-<step>`)."""
  match = re.search(r"ckpt-(\d+)$", path)
  return int(match.group(1)) if match else None


@dataclasses.dataclass
class Loaded:
  """What inference needs from a workdir. `config` may be edited (e.g. eval.beam_size)."""
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  model: model_lib.Seq2Seq
  checkpoint: str
  step: Optional[int]


def load_for_inference(workdir: Optional[str], checkpoint: Optional[str] = None,
                       for_export: bool = False) -> Loaded:
  """Config, tokenizer and float32 model of a workdir, restored from `checkpoint` (latest).

  The run's modes are re-resolved for this machine (a run trained with cuDNN on a GPU
  decodes on a CPU): the decoder step is XLA-compiled unless the run's config.train.xla is
  "off" or `for_export` (serving binaries need not include the JIT).
  """
  if not workdir:
    raise ValueError("--workdir is required: the run directory written by nmt-train.")
  path = find_checkpoint(workdir, checkpoint)
  config = load_config(workdir)
  config.model.recurrence = "auto"
  config.train.precision = "float32"
  config.train.xla = "off" if for_export or config.train.xla == "off" else "decoder_step"
  config = distribute.resolve_modes(config)
  tokenizer = _load_tokenizer(config, workdir)
  model = model_lib.create_model(config, tokenizer.source_vocab_size,
                                 tokenizer.target_vocab_size)
  restore_model(model, path, config, workdir)
  logging.info("Restored %s.", path)
  return Loaded(config, tokenizer, model, path, checkpoint_step(path))


def _load_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  if not tf.io.gfile.exists(os.path.join(workdir, "tokenizer", tokenizer_lib.CONFIG_FILE)):
    raise ValueError(f"no tokenizer in {os.path.join(workdir, 'tokenizer')}; it is written "
                     f"by nmt-train --workdir={workdir}.")

  def no_sample():
    raise AssertionError("the stored tokenizer is reused, never trained here")

  return tokenizer_lib.load_or_train(config.tokenizer, workdir, no_sample)


def model_variables(model: model_lib.Seq2Seq) -> dict:
  """The model's tf.Variables keyed by their Keras path: what checkpoints save as `model`.

  TensorFlow's checkpoint graph does not see Keras 3 variables as children of their layers,
  so the checkpoint names them explicitly; a model-only restore then needs no optimizer.
  """
  return {v.path: v.value for v in model.weights}


def restore_model(model: model_lib.Seq2Seq, path: str, config: ml_collections.ConfigDict,
                  workdir: str) -> None:
  """Restores the model's variables; ValueError naming the differing config keys if not."""
  try:
    status = tf.train.Checkpoint(model=model_variables(model)).restore(path)
    status.expect_partial().assert_existing_objects_matched()
  except (ValueError, AssertionError, tf.errors.OpError) as e:
    raise ValueError(_mismatch_message(path, config, workdir, e)) from e


def _mismatch_message(path: str, config, workdir: str, error: Exception) -> str:
  """Names the model/tokenizer keys that differ from the checkpoint's own config.json."""
  ours = os.path.join(workdir, CONFIG_FILE)
  theirs = _config_near(path)
  changed = []
  if theirs and os.path.abspath(theirs) != os.path.abspath(ours):
    changed = _differences(_read_json(theirs), config.to_dict(), keys=_MODEL_KEYS)
  if changed:
    return (f"checkpoint {path} does not fit the model of {ours}: it was trained with a "
            f"different config ({'; '.join(changed)}; checkpoint's config {theirs} vs "
            f"{ours}). Use --workdir=<the checkpoint's run directory>.")
  model_keys = ", ".join(f"model.{k}={v!r}" for k, v in config.model.items())
  return (f"checkpoint {path} does not fit the model built from {ours} ({model_keys}, "
          f"tokenizer.vocab_size={config.tokenizer.vocab_size}); was it trained with a "
          f"different config? Restore error: {str(error).splitlines()[0][:300]}")


def _config_near(path: str) -> Optional[str]:
  """config.json of the run a checkpoint belongs to (…/checkpoints[/best]/ckpt-N)."""
  directory = os.path.dirname(path)
  for _ in range(3):
    candidate = os.path.join(directory, CONFIG_FILE)
    if tf.io.gfile.exists(candidate):
      return candidate
    directory = os.path.dirname(directory)
  return None


def _differences(old: dict, new: dict, keys, prefix: str = "") -> list:
  """'key: old vs new' for differing leaves, limited to top-level `keys` (None = all)."""
  changed = []
  for key in sorted(set(old) | set(new)):
    if keys is not None and not prefix and key not in keys:
      continue
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      changed += _differences(a, b, None, f"{prefix}{key}.")
    elif _tuples(a) != _tuples(b):
      changed.append(f"{prefix}{key}: {a!r} vs {b!r}")
  return changed


def _tuples(value):
  """JSON lists back to the tuples the configs use, recursively."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _read_json(path: str) -> dict:
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it is written by nmt-train.") from e
