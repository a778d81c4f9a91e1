"""A run directory: its saved config, its checkpoints and the run state they hold besides
the weights (RunState), restoring a run to resume or a model for inference, its lock.

`nmt-train` writes `<workdir>/config.json`, so `nmt-eval`, `nmt-translate` and
`nmt-export` rebuild exactly the trained model from the workdir alone. Every failure says
which directory, file or config key is wrong and what to do.
"""
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import socket
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from absl import logging
import ml_collections
import tensorflow as tf

from input_pipeline import tokenizer as tokenizer_lib
from trainer import distribute
from trainer import model as model_lib

CONFIG_FILE = "config.json"
LOCK_FILE = ".nmt-train.lock"
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
  """The checkpoint to try first: `checkpoint` (a prefix or a directory) or the workdir's
  latest (not checked for readability; load_for_inference falls back past broken ones)."""
  return _candidates(workdir, checkpoint)[0]


def _candidates(workdir: str, checkpoint: Optional[str]) -> List[str]:
  """Checkpoints to try, newest first: `checkpoint` alone if it is a prefix, else those
  of its directory (default <workdir>/checkpoints)."""
  if checkpoint and not tf.io.gfile.isdir(checkpoint):
    if not tf.io.gfile.exists(checkpoint + ".index"):
      raise ValueError(f"--checkpoint={checkpoint}: no checkpoint there; pass a prefix like "
                       f"{os.path.join(workdir, 'checkpoints', 'ckpt-1000')} or a directory "
                       "holding checkpoints.")
    return [checkpoint]
  paths = checkpoints_in(checkpoint or os.path.join(workdir, "checkpoints"))
  if not paths and checkpoint:
    raise ValueError(f"--checkpoint={checkpoint}: no checkpoint there; pass a prefix like "
                     f"{os.path.join(workdir, 'checkpoints', 'ckpt-1000')} or a directory "
                     "holding checkpoints.")
  if not paths:
    raise ValueError(f"no checkpoint in {workdir}; train first with nmt-train "
                     f"--config=configs/default.py --workdir={workdir}")
  return paths


def checkpoints_in(directory: str) -> List[str]:
  """Prefixes of the nmt-train checkpoints in `directory` (ckpt-<step>.index), newest
  first. Listed from the files, not the `checkpoint` state file, which may be stale."""
  paths = [p[:-len(".index")] for p in
           tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index"))]
  return sorted((p for p in paths if checkpoint_step(p) is not None),
                key=checkpoint_step, reverse=True)


def unreadable(path: str) -> Optional[str]:
  """Why checkpoint `path` does not read (truncated, corrupted), or None if it does.

  Reads every tensor once (checking its CRC), so it is called only after a restore failed.
  """
  try:
    reader = tf.train.load_checkpoint(path)
    for key in reader.get_variable_to_shape_map():
      reader.get_tensor(key)
  except (tf.errors.OpError, IndexError, ValueError) as e:  # Truncated: IndexError.
    return _first_line(e)
  return None


def restore_newest_intact(paths: Sequence[str], restore: Callable[[str], None]) -> str:
  """Calls `restore` on the first of `paths` (newest first) that reads; returns that path.

  A checkpoint that does not read (a kill -9 or a full disk while it was saved) is
  reported and skipped; an intact one that does not fit (another config) raises
  `restore`'s error. ValueError if none reads.
  """
  broken = []
  for path in paths:
    try:
      restore(path)
    except (ValueError, AssertionError, IndexError, tf.errors.OpError):
      why = unreadable(path)
      if why is None:
        raise
      logging.warning("Checkpoint %s does not read (%s); trying the one before it.",
                      path, why)
      broken.append(f"{path} ({why})")
      continue
    if broken:
      logging.warning("Using %s, the newest checkpoint that reads.", path)
    return path
  raise ValueError(f"no checkpoint reads: {'; '.join(broken)}. Move them out of the way "
                   "to start from scratch.")


def remove_partial_saves(directory: str) -> None:
  """Deletes ckpt-N_temp/ directories, left when a process was killed while saving."""
  for temp in tf.io.gfile.glob(os.path.join(directory, "ckpt-*_temp")):
    logging.info("Removing %s, left by a save that did not finish.", temp)
    tf.io.gfile.rmtree(temp)


def save(manager: tf.train.CheckpointManager, step: int) -> str:
  """manager.save at `step`; a failed save (disk full, no permission) becomes an OSError
  naming the path, with the partial files removed and the previous checkpoint intact."""
  try:
    return manager.save(checkpoint_number=step)
  except (tf.errors.OpError, OSError) as e:
    prefix = os.path.join(manager.directory, f"ckpt-{step}")
    for leftover in tf.io.gfile.glob(prefix + ".*") + tf.io.gfile.glob(prefix + "_temp"):
      _remove(leftover)
    previous = manager.latest_checkpoint
    raise OSError(
        f"cannot save checkpoint {prefix} ({type(e).__name__}: {_first_line(e)}); "
        + (f"the previous checkpoint {previous} is intact" if previous else
           "no earlier checkpoint exists") +
        ". Free disk space or fix the permissions, then rerun to resume.") from None


def _remove(path: str) -> None:
  try:
    if tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
    else:
      tf.io.gfile.remove(path)
  except tf.errors.OpError as e:
    logging.warning("Could not remove %s: %s", path, _first_line(e))


def _first_line(error: Exception) -> str:
  """The error's first line without TensorFlow's `{{function_node ...}}` and `[Op:...]`."""
  message = getattr(error, "message", None) or str(error)
  message = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", message)
  return (message.strip().splitlines() or [""])[0][:300]


def checkpoint_step(path: str) -> Optional[int]:
  """The training step of a checkpoint saved by nmt-train (`.../ckpt-<step>`)."""
  match = re.search(r"ckpt-(\d+)$", path)
  return int(match.group(1)) if match else None


class RunState:
  """Run-wide progress kept in the checkpoint besides model and optimizer: the steps
  trained (batches consumed: the data position, checkpoint names, train.steps and dropout
  seeds all count these; optimizer.iterations counts applied updates only, which lag it
  by the skipped non-finite steps), the best dev BLEU (for checkpoints/best and early
  stopping), evaluations since it last improved, the wall-clock seconds trained so
  far over all invocations (train.max_seconds), and the cosine schedule's end fitted to
  the budget (in updates; 0 = train.steps) with the train.max_seconds it was fitted for."""

  def __init__(self):
    with tf.init_scope():
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.best_bleu = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
      self.evals_without_gain = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.elapsed_s = tf.Variable(0.0, dtype=tf.float64, trainable=False)
      self.schedule_end_step = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.schedule_budget_s = tf.Variable(0.0, dtype=tf.float64, trainable=False)

  def variables(self) -> Dict[str, tf.Variable]:
    return dict(step=self.step, best_bleu=self.best_bleu, evals_without_gain=self.evals_without_gain,
                elapsed_s=self.elapsed_s, schedule_end_step=self.schedule_end_step,
                schedule_budget_s=self.schedule_budget_s)


# Checkpoint entries added after 2026-12-01: a checkpoint without them still restores
# (step from optimizer.iterations, no fitted schedule, the EMA started at the weights).
_OPTIONAL = ("step", "schedule_end_step", "schedule_budget_s", "ema")


def _training_objects(model: model_lib.Seq2Seq, optimizer, state: RunState,
                      ema=None) -> dict:
  objects = dict(model=model_variables(model), optimizer=optimizer, **state.variables())
  if ema is not None:
    objects["ema"] = ema.variables()
  return objects


def training_checkpoint(model: model_lib.Seq2Seq, optimizer, state: RunState,
                        ema=None) -> tf.train.Checkpoint:
  """What nmt-train saves: the model's variables, the optimizer's, the run state and, with
  train.ema_decay, the weights' moving average (`ema`, keyed like `model`)."""
  return tf.train.Checkpoint(**_training_objects(model, optimizer, state, ema))


def restore_latest(manager: tf.train.CheckpointManager, state: RunState, optimizer,
                   model: model_lib.Seq2Seq, ema=None) -> None:
  """Restores the newest checkpoint that reads (a broken one is reported and skipped)."""
  for directory in (manager.directory, os.path.join(manager.directory, "best")):
    remove_partial_saves(directory)
  paths = checkpoints_in(manager.directory)
  if not paths:
    return
  objects = _training_objects(model, optimizer, state, ema)

  def restore(path: str) -> None:
    saved = {name.split("/")[0] for name, _ in tf.train.list_variables(path)}
    present = {k: v for k, v in objects.items() if k not in _OPTIONAL or k in saved}
    tf.train.Checkpoint(**present).restore(path).assert_existing_objects_matched()
    if "step" not in saved:  # Saved before RunState.step: its step was the update count.
      state.step.assign(optimizer.iterations)
    if ema is not None and "ema" not in saved:
      logging.warning("%s holds no moving average of the weights: train.ema_decay starts "
                      "it at the restored weights.", path)
      ema.reset()

  path = restore_newest_intact(paths, restore)
  logging.info("Resumed from %s at step %d.", path, int(state.step.numpy()))


@dataclasses.dataclass
class Loaded:
  """What inference needs from a workdir. `config` may be edited (e.g. eval.beam_size)."""
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  model: model_lib.Seq2Seq
  checkpoint: str
  step: Optional[int]
  ema: bool = False  # The weights are the checkpoints' moving average (train.ema_decay).


def load_for_inference(workdir: Optional[str], checkpoint: Optional[str] = None,
                       for_export: bool = False, average_last: int = 0,
                       use_ema: bool = True) -> Loaded:
  """Config, tokenizer and float32 model of a workdir, restored from `checkpoint` (latest),
  or with `average_last` = K > 0 the mean of the weights of the K newest intact checkpoints
  of that directory (checkpoint averaging, as OpenNMT's average_checkpoints).

  A checkpoint holding a moving average of the weights (train.ema_decay) gives that
  average unless `use_ema` is False (--no_ema); averaging K checkpoints averages theirs.

  The run's modes are re-resolved for this machine (a run trained with cuDNN on a GPU
  decodes on a CPU): the decoder step is XLA-compiled unless the run's config.train.xla is
  "off" or `for_export` (serving binaries need not include the JIT).
  """
  if not workdir:
    raise ValueError("--workdir is required: the run directory written by nmt-train.")
  paths = _candidates(workdir, checkpoint)
  config = load_config(workdir)
  config.model.recurrence = "auto"
  config.model.dropout_rng = "auto"  # Inference draws no masks; XLA's scope changes here.
  config.train.precision = "float32"
  config.train.xla = "off" if for_export or config.train.xla == "off" else "decoder_step"
  config = distribute.resolve_modes(config)
  tokenizer = _load_tokenizer(config, workdir)
  model = model_lib.create_model(config, tokenizer.source_vocab_size,
                                 tokenizer.target_vocab_size)
  used_ema = []
  path = restore_newest_intact(paths, lambda p: used_ema.append(
      restore_model(model, p, config, workdir, use_ema)))
  logging.info("Restored %s%s.", path, " (the moving average of its weights)"
               if used_ema[-1] else "")
  if average_last > 1:
    path = _average(model, paths[paths.index(path):], average_last, config, workdir,
                    use_ema)
  return Loaded(config, tokenizer, model, path, checkpoint_step(path.split(",")[0]),
                ema=used_ema[-1])


def _average(model: model_lib.Seq2Seq, paths: Sequence[str], k: int,
             config: ml_collections.ConfigDict, workdir: str, use_ema: bool = True) -> str:
  """Sets the model's weights to the mean over the first `k` of `paths` that read (the
  model holds the first already; each one's moving average where it has one and
  `use_ema`); returns the averaged paths joined by commas."""
  totals = [v.numpy().astype("float64") for v in model.weights]
  used = [paths[0]]
  for path in paths[1:]:
    if len(used) == k:
      break
    try:
      restore_model(model, path, config, workdir, use_ema)
    except ValueError:
      why = unreadable(path)
      if why is None:
        raise
      logging.warning("Checkpoint %s does not read (%s); not averaged.", path, why)
      continue
    totals = [t + v.numpy() for t, v in zip(totals, model.weights)]
    used.append(path)
  if len(used) < k:
    logging.warning("--average_last=%d: only %d checkpoints read; averaging those.", k,
                    len(used))
  for variable, total in zip(model.weights, totals):
    variable.assign((total / len(used)).astype(variable.numpy().dtype))
  logging.info("Averaged the weights of %s.", ", ".join(used))
  return ",".join(used)


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
                  workdir: str, use_ema: bool = False) -> bool:
  """Restores the model's variables; ValueError naming the differing config keys if not.
  With `use_ema`, the trainable ones from the checkpoint's moving average if it has one
  (`ema`, keyed like `model`); returns whether it did."""
  try:
    status = tf.train.Checkpoint(model=model_variables(model)).restore(path)
    status.expect_partial().assert_existing_objects_matched()
    if not use_ema or not any(name.startswith("ema/")
                              for name, _ in tf.train.list_variables(path)):
      return False
    ema = {v.path: v.value for v in model.trainable_variables}
    status = tf.train.Checkpoint(ema=ema).restore(path)
    status.expect_partial().assert_existing_objects_matched()
    return True
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


class WorkdirInUse(OSError):
  """Another live nmt-train holds the workdir's lock."""


@contextlib.contextmanager
def workdir_lock(workdir: str, lock: bool = True) -> Iterator[None]:
  """Holds <workdir>/.nmt-train.lock while training; WorkdirInUse names the holder if taken.

  fcntl.flock is dropped by the kernel when its process dies (kill -9 too), so a lock file
  left by a killed run is simply taken over. The file says who holds it (pid, host); it
  is removed on exit, and a failed run removes the empty directories it created.
  `lock=False` (multi-worker non-chief workers, who write only scratch dirs) just yields.
  """
  existed = tf.io.gfile.isdir(workdir)
  handle = _acquire(workdir) if lock and "://" not in workdir else None
  try:
    yield
  except BaseException:
    _release(handle)
    if lock:
      _remove_empty_dirs(workdir, remove_top=not existed)
    raise
  _release(handle)


def _acquire(workdir: str):
  path = os.path.join(workdir, LOCK_FILE)
  while True:
    try:
      os.makedirs(workdir, exist_ok=True)
      handle = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    except OSError as e:  # Read-only, no permission, full.
      raise OSError(f"cannot write to --workdir={workdir} ({e.strerror}: {path}); train in a "
                    "directory you can write to.") from None
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "holder unknown"
      handle.close()
      raise WorkdirInUse(f"--workdir={workdir} is in use by another nmt-train ({holder}; "
                         f"lock file {path}). Wait for it to finish, stop it, or train in "
                         "another --workdir.") from None
    except OSError as e:  # A filesystem without flock (some network mounts).
      logging.warning("Cannot lock %s (%s): nothing stops a second nmt-train here.", path, e)
      handle.close()
      return None
    try:  # The holder may have removed the file between our open and flock: retry.
      if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
        break
    except FileNotFoundError:
      pass
    handle.close()
  handle.seek(0)
  previous = handle.read().strip()
  if previous:
    logging.warning("Taking over %s from %s, which is no longer running.", path, previous)
  handle.seek(0)
  handle.truncate()
  handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
  handle.flush()
  return handle


def _release(handle) -> None:
  if handle is None or handle.closed:
    return
  try:
    os.remove(handle.name)  # Before unlocking: a waiter then retries on a new file.
  except FileNotFoundError:
    pass
  handle.close()


def _remove_empty_dirs(workdir: str, remove_top: bool) -> None:
  """Removes the run's own subdirectories of `workdir` that are empty (and `workdir` too if
  `remove_top`); never walks the tree: --workdir may be a directory holding other things."""
  for sub in ("tokenizer", os.path.join("checkpoints", "best"), "checkpoints", "train",
              "eval", ""):
    path = os.path.join(workdir, sub) if sub else workdir
    if (sub or remove_top) and os.path.isdir(path) and not os.listdir(path):
      os.rmdir(path)
