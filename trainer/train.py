"""Training: the train step, the loop around it, checkpoints and summaries.

The step follows the house shape: encode once, run the decoder cell in an in-graph loop,
project all steps to the vocabulary at once, return the loss sum and the token count; the
caller divides by the *global* token count, so the loss is right for any replica count.
"""
import contextlib
import dataclasses
import os
import re
import signal
import sys
import time
from typing import Dict, Iterator, List, Optional

from absl import logging
import keras
import ml_collections
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from input_pipeline import pipeline
from input_pipeline import tokenizer as tokenizer_lib
from trainer import checkpoints
from trainer import distribute
from trainer import evaluate
from trainer import model as model_lib
from trainer import summaries

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
XLA_MODES = ("off", "decoder_step", "train_step")
# Exit code of a multi-worker run stopped by a signal (TF's PreemptionCheckpointHandler
# convention): the job should be restarted and resumes from the checkpoint just saved.
PREEMPTED_EXIT_CODE = 42
# Barrier timeout while the chief alone trains the tokenizer or evaluates: generous, since
# a dead chief is detected within seconds anyway (MultiWorkerMirroredStrategy heartbeats).
BARRIER_TIMEOUT_S = 24 * 3600.0


def cpu_has_fast_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """True if the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16 flags).

  Without them oneDNN converts bf16 to fp32 and back: measured 40-50 GFLOP/s in bf16 vs
  68-170 in fp32 on an AVX-512 Cascade Lake without those flags (README, Performance).
  Non-Linux systems (no /proc/cpuinfo) report False.
  """
  try:
    with open(cpuinfo, encoding="utf-8") as f:
      flags = next((line.split(":", 1)[1].split() for line in f
                    if line.startswith("flags")), [])
  except OSError:
    return False
  return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str) -> str:
  """'auto' -> mixed_float16 on GPUs with fast fp16 (compute capability >= 7), mixed_bfloat16
  on CPUs with bf16 units, else float32."""
  if name not in PRECISIONS:
    raise ValueError(f"config.train.precision={name!r} is not one of {PRECISIONS}")
  if name != "auto":
    return name
  for gpu in tf.config.list_physical_devices("GPU"):
    capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
    if capability and capability >= (7, 0):
      return "mixed_float16"
  if tf.config.list_physical_devices("GPU"):
    return "float32"  # Older GPUs: fp16 without tensor cores does not pay for loss scaling.
  return "mixed_bfloat16" if cpu_has_fast_bfloat16() else "float32"


class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup to `peak`, then constant, rsqrt or cosine decay (to 0 at `total`)."""

  def __init__(self, peak: float, warmup: int, decay: str, total: int):
    if decay not in ("constant", "rsqrt", "cosine"):
      raise ValueError(f"config.train.decay={decay!r} is not one of "
                       "('constant', 'rsqrt', 'cosine')")
    self.peak, self.warmup, self.decay, self.total = peak, max(warmup, 1), decay, total

  def __call__(self, step):
    step = tf.cast(step, tf.float32) + 1.0
    warm = tf.minimum(1.0, step / self.warmup)
    if self.decay == "rsqrt":
      after = tf.math.rsqrt(tf.maximum(step, self.warmup) / self.warmup)
    elif self.decay == "cosine":
      progress = tf.clip_by_value((step - self.warmup) / max(self.total - self.warmup, 1),
                                  0.0, 1.0)
      after = 0.5 * (1.0 + tf.cos(np.pi * progress))
    else:
      after = 1.0
    return self.peak * warm * after

  def get_config(self):
    return dict(peak=self.peak, warmup=self.warmup, decay=self.decay, total=self.total)


def create_optimizer(config: ml_collections.ConfigDict, policy: str):
  t = config.train
  schedule = WarmupDecay(t.learning_rate, t.warmup_steps, t.decay, t.steps)
  optimizer = keras.optimizers.Adam(learning_rate=schedule)
  if policy == "mixed_float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


def validate_train_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key and value for invalid training settings."""
  t = config.train
  if t.xla not in XLA_MODES:
    raise ValueError(f"config.train.xla={t.xla!r} is not one of {XLA_MODES}")
  resolve_precision(t.precision)
  for key in ("steps", "steps_per_loop", "log_every", "checkpoint_every", "eval_every",
              "batch_size"):
    if int(t[key]) <= 0:
      raise ValueError(f"config.train.{key}={t[key]!r} must be a positive integer")
  if t.learning_rate <= 0 or t.clip_norm < 0 or not 0 <= t.label_smoothing < 1:
    raise ValueError("config.train.learning_rate must be > 0, clip_norm >= 0 and "
                     f"0 <= label_smoothing < 1 (got {t.learning_rate}, {t.clip_norm}, "
                     f"{t.label_smoothing})")


def make_grad_fn(model, config, jit: bool):
  """(source, target, global_tokens) -> (grads, loss_sum); optionally XLA-compiled whole."""
  smoothing = float(config.train.label_smoothing)

  def grad_fn(source, target, global_tokens, loss_scale):
    with tf.GradientTape() as tape:
      logits, _ = model(source, target[:, :-1], training=True)
      loss_sum, _ = evaluate.masked_cross_entropy(logits, target[:, 1:], smoothing)
      scaled = loss_sum / global_tokens * loss_scale
    return tape.gradient(scaled, model.trainable_variables), loss_sum

  return tf.function(grad_fn, jit_compile=True) if jit else grad_fn


def make_gradient_fn(model, config, scale_fn):
  """Per-replica batch -> all-reduced gradients of the *global* mean token loss.

  Returns (grads, loss_sum, local_tokens, grad_norm); `grads` are unscaled (fp16 loss
  scaling undone) and clipped by global norm, identical on every replica.
  """
  grad_fn = make_grad_fn(model, config, jit=config.train.xla == "train_step")
  clip = float(config.train.clip_norm)

  def global_gradients(batch):
    ctx = tf.distribute.get_replica_context()
    source, target = batch["source"], batch["target"]
    local_tokens = tf.reduce_sum(tf.cast(target[:, 1:] != 0, tf.float32))
    global_tokens = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_tokens)
    scale = scale_fn()
    grads, loss_sum = grad_fn(source, target, global_tokens, scale)
    grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [g / scale for g in grads])
    grad_norm = tf.linalg.global_norm(grads)
    if clip:
      grads, _ = tf.clip_by_global_norm(grads, clip, use_norm=grad_norm)
    return grads, loss_sum, local_tokens, grad_norm

  return global_gradients


def _skip_keras_all_reduce(optimizer) -> bool:
  """Stops the Keras optimizer from all-reducing gradients that are already global.

  Keras 3's TF optimizer sums gradients over replicas inside apply()
  (keras/src/backend/tensorflow/optimizer.py, `_all_reduce_sum_gradients`), after its own
  clipping, which would clip per-replica gradients. We all-reduce and clip first, so a
  second all-reduce would only double the communication per step (on GPUs, every
  gradient over NCCL twice). Keras has no public switch for this; if the hook is missing
  (another Keras version) we return False and the caller hands over grads / N instead,
  which Keras' sum turns back into the global gradient.
  """
  inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer wraps one.
  if not callable(getattr(inner, "_all_reduce_sum_gradients", None)):
    return False
  inner._all_reduce_sum_gradients = list  # pylint: disable=protected-access
  return True


def make_replica_step(model, optimizer, config, strategy):
  """Per-replica train step: global gradients (all-reduced once, then clipped), then an
  update unless they are not finite."""
  fp16 = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
  scale_fn = ((lambda: tf.identity(optimizer.dynamic_scale)) if fp16
              else (lambda: tf.constant(1.0)))
  global_gradients = make_gradient_fn(model, config, scale_fn)
  variables = model.trainable_variables
  n = 1 if _skip_keras_all_reduce(optimizer) else strategy.num_replicas_in_sync

  def apply_if_finite(strategy, grads, finite):
    finite = strategy.experimental_local_results(finite)[0]

    def apply():
      strategy.extended.call_for_each_replica(optimizer.apply, args=(grads, variables))

    tf.cond(finite, apply, lambda: None)

  def replica_step(batch):
    grads, loss_sum, local_tokens, grad_norm = global_gradients(batch)
    finite = tf.math.is_finite(grad_norm)
    scale = scale_fn()
    grads = [g * (scale / n) for g in grads]
    if fp16:  # LossScaleOptimizer skips non-finite steps and lowers its scale itself.
      optimizer.apply(grads, variables)
    else:
      tf.distribute.get_replica_context().merge_call(apply_if_finite,
                                                     args=(grads, finite))
    shape = tf.shape(batch["source"])
    return dict(loss_sum=loss_sum, tokens=local_tokens,
                examples=tf.cast(shape[0], tf.float32), grad_norm=grad_norm,
                finite=tf.cast(finite, tf.float32), length=tf.cast(shape[1], tf.float32))
  return replica_step


def make_train_loop(strategy, replica_step):
  """tf.function (iterator, num_steps) -> per-step metrics [num_steps] and input wait (s).

  Several steps per call cut host overhead; the time spent in get_next is measured in-graph.
  """
  sum_keys = ("loss_sum", "tokens", "examples")

  @tf.function
  def train_loop(iterator, num_steps):
    arrays = {k: tf.TensorArray(tf.float32, size=num_steps)
              for k in ("loss", "tokens", "examples", "grad_norm", "finite", "length")}
    input_wait = tf.constant(0.0, tf.float64)
    # tf.timestamp is refused under op determinism (tests); input wait then reads 0.
    # (No public getter exists; tf.config.experimental only has the setter.)
    timed = not tf_config.is_op_determinism_enabled()
    for i in tf.range(num_steps):
      t0 = tf.timestamp() if timed else tf.constant(0.0, tf.float64)
      with tf.control_dependencies([t0]):
        batch = next(iterator)
      if timed:
        with tf.control_dependencies(tf.nest.flatten(
            strategy.experimental_local_results(batch))):
          input_wait += tf.timestamp() - t0
      out = strategy.run(replica_step, args=(batch,))
      red = {k: strategy.reduce("SUM", out[k], axis=None) for k in sum_keys}
      first = {k: strategy.experimental_local_results(out[k])[0]
               for k in ("grad_norm", "finite", "length")}
      values = dict(loss=red["loss_sum"] / tf.maximum(red["tokens"], 1.0),
                    tokens=red["tokens"], examples=red["examples"], **first)
      arrays = {k: arrays[k].write(i, values[k]) for k in arrays}
    return {k: a.stack() for k, a in arrays.items()}, input_wait

  return train_loop


@dataclasses.dataclass
class _StopFlag:
  """Set by SIGTERM/SIGINT so the loop can save a checkpoint and exit cleanly."""
  signal_name: Optional[str] = None

  def __call__(self, signum, frame):
    self.signal_name = signal.Signals(signum).name


def _install_signal_handlers(flag: _StopFlag):
  previous = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[sig] = signal.signal(sig, flag)
    except ValueError:  # Not the main thread (e.g. a test runner thread).
      pass
  return previous


@dataclasses.dataclass
class Run:
  """Everything one training run holds: built once by `setup`, used by the loop."""
  config: ml_collections.ConfigDict
  workdir: str
  strategy: tf.distribute.Strategy
  policy: str
  tokenizer: tokenizer_lib.Tokenizer
  model: model_lib.Seq2Seq
  optimizer: keras.optimizers.Optimizer
  checkpoint: tf.train.Checkpoint
  manager: tf.train.CheckpointManager
  best_manager: tf.train.CheckpointManager
  best_eval_loss: tf.Variable
  iterator: object
  is_chief: bool
  length_stats: pipeline.LengthStats
  stop: _StopFlag = dataclasses.field(default_factory=_StopFlag)
  # Multi-worker only: makes every worker save at the same step when any is told to stop.
  preemption: Optional[tf.distribute.experimental.PreemptionCheckpointHandler] = None


def build_model(config, tokenizer, policy: str, xla: str) -> model_lib.Seq2Seq:
  model = model_lib.create_model(config, tokenizer.source_vocab_size,
                                 tokenizer.target_vocab_size, policy)
  if xla == "decoder_step":
    model.step_fn = tf.function(model.decoder.step, jit_compile=True)
  return model


def make_train_dataset(config, tokenizer, strategy, start_step: int,
                       length_stats: pipeline.LengthStats):
  """Per-replica training batches, fast-forwarded past the `start_step` already trained on.

  Distributed iterators cannot be checkpointed, so exact resume is a property of the
  pipeline (pipeline.make_dataset's start_step): a prepared: source jumps to the step in
  constant time; a raw one replays the deterministic pipeline up to it.
  """
  if start_step and not config.data.deterministic:
    logging.warning("data.deterministic=False: the resumed data order will differ.")

  def dataset_fn(ctx):
    return pipeline.make_dataset(config, tokenizer, "train", input_context=ctx,
                                 start_step=start_step, length_stats=length_stats)

  return strategy.distribute_datasets_from_function(dataset_fn)


def setup(config: ml_collections.ConfigDict, workdir: str,
          strategy: Optional[tf.distribute.Strategy] = None) -> Run:
  """Strategy, tokenizer, model, optimizer, dataset iterator, checkpoint (restored if any)."""
  validate_train_config(config)
  # First: MultiWorkerMirroredStrategy must start TF's runtime itself (no TF op before).
  strategy = strategy or distribute.create_strategy(config)
  chief = distribute.is_chief(strategy)
  run_dir = workdir if chief else _scratch_dir(workdir, strategy)
  tf.io.gfile.makedirs(run_dir)
  policy = resolve_precision(config.train.precision)
  # Seed first: set_seed clears TF's kernel cache, which deletes the tokenizer's
  # kernel-owned SentencePiece resources if they already exist.
  tf.random.set_seed(config.seed)
  keras.utils.set_random_seed(config.seed)
  tokenizer = _load_tokenizer(config, workdir, strategy, chief)
  with strategy.scope():
    model = build_model(config, tokenizer, policy, config.train.xla)
    optimizer = create_optimizer(config, policy)
    optimizer.build(model.trainable_variables)
    best_eval_loss = tf.Variable(np.inf, dtype=tf.float32, trainable=False)
  checkpoint = tf.train.Checkpoint(model=checkpoints.model_variables(model),
                                   optimizer=optimizer, best_eval_loss=best_eval_loss)
  manager = tf.train.CheckpointManager(
      checkpoint, os.path.join(run_dir, "checkpoints"),
      max_to_keep=config.train.keep_checkpoints, step_counter=optimizer.iterations)
  best_manager = tf.train.CheckpointManager(
      checkpoint, os.path.join(run_dir, "checkpoints", "best"), max_to_keep=1,
      step_counter=optimizer.iterations)
  # Every worker resumes from the chief's checkpoints: the others' are scratch copies.
  chief_manager = manager if chief else tf.train.CheckpointManager(
      checkpoint, os.path.join(workdir, "checkpoints"), max_to_keep=None)
  _restore_latest(chief_manager, optimizer)
  length_stats = pipeline.LengthStats(name="train_length_filter")
  iterator = iter(make_train_dataset(config, tokenizer, strategy,
                                     int(optimizer.iterations.numpy()), length_stats))
  if chief:  # After a successful restore, so it always describes the checkpoints.
    checkpoints.save_config(config, run_dir)
  run = Run(config, run_dir, strategy, policy, tokenizer, model, optimizer, checkpoint,
            manager, best_manager, best_eval_loss, iterator, chief, length_stats)
  if distribute.is_multi_worker(strategy):
    run.preemption = _preemption_handler(run, chief_manager)
  return run


def _restore_latest(manager: tf.train.CheckpointManager, optimizer) -> None:
  if manager.latest_checkpoint:
    manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    logging.info("Resumed from %s at step %d.", manager.latest_checkpoint,
                 int(optimizer.iterations.numpy()))


def _scratch_dir(workdir: str, strategy: tf.distribute.Strategy) -> str:
  """A non-chief worker's run dir (MWMS needs every worker to save; only the chief's
  checkpoints count). Emptied first: a killed worker leaves stale checkpoints behind."""
  scratch = os.path.join(workdir, "tmp_workers",
                         f"worker_{strategy.cluster_resolver.task_id}")
  if tf.io.gfile.exists(scratch):
    tf.io.gfile.rmtree(scratch)
  return scratch


def _load_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                    strategy: tf.distribute.Strategy, chief: bool) -> tokenizer_lib.Tokenizer:
  """The chief trains (or reuses) workdir's tokenizer; the other workers wait for it at a
  barrier and load it, so that all map text to the same ids (the workdir must be shared)."""
  sample = pipeline.tokenizer_sample(config)
  if chief:
    tokenizer = tokenizer_lib.load_or_train(config.tokenizer, workdir, sample)
  if distribute.is_multi_worker(strategy):
    distribute.barrier(strategy, BARRIER_TIMEOUT_S)
  if not chief:
    marker = os.path.join(workdir, "tokenizer", tokenizer_lib.CONFIG_FILE)
    if not tf.io.gfile.exists(marker):
      raise FileNotFoundError(
          f"{marker} is missing although the chief has written it to its --workdir: all "
          f"workers need the same --workdir={workdir}, on a filesystem they share.")
    tokenizer = tokenizer_lib.load_or_train(config.tokenizer, workdir, sample)
  return tokenizer


def _preemption_handler(run: Run, chief_manager: tf.train.CheckpointManager
                        ) -> tf.distribute.experimental.PreemptionCheckpointHandler:
  """TF's handler for MWMS: once any worker sees SIGTERM/SIGINT (run.stop, polled each
  second), all agree on a step, save there and exit with PREEMPTED_EXIT_CODE.

  It restores from (and, on the chief, saves through) the chief's manager; non-chief
  workers save through their scratch manager, as MWMS needs every worker to save.
  """
  termination = tf.distribute.experimental.TerminationConfig(
      termination_watcher_fn=lambda: run.stop.signal_name is not None,
      exit_fn=lambda: _exit_preempted(run), save_fn=run.manager.save)
  return tf.distribute.experimental.PreemptionCheckpointHandler(
      run.strategy.cluster_resolver, chief_manager, termination_config=termination)


def _exit_preempted(run: Run) -> None:
  cause = (f"{run.stop.signal_name} received" if run.stop.signal_name
           else "another worker was told to stop")
  logging.warning("%s: all workers saved a checkpoint at step %d; exiting with code %d so "
                  "that the restarted job resumes from it.", cause,
                  int(run.optimizer.iterations.numpy()), PREEMPTED_EXIT_CODE)
  _cleanup_non_chief(run)
  sys.exit(PREEMPTED_EXIT_CODE)


class Evaluator:
  """Held-out loss, BLEU/chrF, attention heatmaps and sample translations for a Run."""

  def __init__(self, run: Run):
    config = run.config
    self.run = run
    self.eval_step = evaluate.make_eval_loss_fn(run.model)
    self.translate_ids = evaluate.make_translate_fn(run.model, config)  # Beam search.
    self.greedy_ids = evaluate.make_translate_fn(run.model, config, beam_size=1)
    self.dataset = pipeline.make_dataset(config, run.tokenizer, "eval")
    limit = config.data.eval_examples or None
    pairs = list(pipeline.corpora.read_pairs(config.data.eval, config.data, limit=limit))
    self.sources = [s for s, _ in pairs]
    self.references = [t for _, t in pairs]
    self.probes = list(config.eval.probe_sentences) + self.sources[:config.eval.num_probes]

  def __call__(self, step: int, writer: Optional[tf.summary.SummaryWriter]) -> Dict:
    run = self.run
    metrics = {"loss": evaluate.eval_loss(self.eval_step, self.dataset)}
    metrics["perplexity"] = float(np.exp(min(metrics["loss"], 50.0)))
    hyps, _, _, _ = evaluate.translate(self.translate_ids, run.tokenizer, self.sources,
                                       run.config)
    metrics.update(evaluate.score(hyps, self.references))
    self.samples = list(zip(self.sources[:8], self.references[:8], hyps[:8]))
    if writer is not None:
      summaries.write_scalars(writer, step, metrics)
      searches = {"greedy": self.greedy_ids}
      if run.config.eval.beam_size > 1:
        searches["beam"] = self.translate_ids
      for search, translate_ids in searches.items():
        _, ids, weights, srcs = evaluate.translate(translate_ids, run.tokenizer,
                                                   self.probes, run.config)
        names = [f"attention/{search}/probe_{i}" for i in range(len(self.probes))]
        summaries.write_images(writer, step, evaluate.attention_pngs(
            run.tokenizer, srcs, ids, weights, names))
      rows = [("source", "reference", "translation")] + [
          (s, r, h) for s, r, h in zip(self.sources[:8], self.references, hyps)]
      summaries.write_text(writer, step, "samples", rows)
    return metrics


def _log_progress(step: int, total: int, window: Dict[str, List[float]],
                  elapsed: float, start_step: int, run_elapsed: float) -> Dict[str, float]:
  """Turns the metrics gathered since the last log into scalars; logs one line."""
  tokens, examples = sum(window["tokens"]), sum(window["examples"])
  loss = float(np.sum(np.array(window["loss"]) * np.array(window["tokens"])) /
               max(tokens, 1.0))
  scalars = {
      "loss": loss, "perplexity": float(np.exp(min(loss, 50.0))),
      "grad_norm": float(np.mean(window["grad_norm"])),
      "target_tokens_per_sec": tokens / elapsed, "examples_per_sec": examples / elapsed,
      "step_time_s": elapsed / len(window["loss"]),
      "input_wait_fraction": sum(window["input_wait"]) / elapsed,
  }
  eta = (total - step) * run_elapsed / max(step - start_step, 1)
  logging.info("step %d/%d  loss %.4f  %.0f tok/s  %.1f ex/s  %.3f s/step  ETA %s",
               step, total, loss, scalars["target_tokens_per_sec"],
               scalars["examples_per_sec"], scalars["step_time_s"],
               time.strftime("%H:%M:%S", time.gmtime(eta)))
  return scalars


class _ProgressWindow:
  """The metrics of the steps since the last progress line; `flush` logs and writes them."""

  STEP_KEYS = ("loss", "tokens", "examples", "grad_norm")  # Per-step, from train_loop.

  def __init__(self, run: Run, writer, start_step: int):
    self.run, self.writer, self.start_step = run, writer, start_step
    self.run_start = time.time()
    self.compiled_lengths = set()
    self.reset()

  def reset(self) -> None:
    """Starts a new window (also after an eval: eval time is not training time)."""
    self.values = {k: [] for k in self.STEP_KEYS + ("input_wait",)}
    self.start = time.time()

  def add(self, out: Dict[str, List[float]], input_wait: float) -> None:
    for k in self.STEP_KEYS:
      self.values[k] += out[k]
    self.values["input_wait"].append(float(input_wait))
    self.compiled_lengths.update(int(x) for x in out["length"])

  def flush(self, step: int, total: int) -> None:
    now, run = time.time(), self.run
    scalars = _log_progress(step, total, self.values, now - self.start, self.start_step,
                            now - self.run_start)
    scalars.update(learning_rate=float(np.asarray(run.optimizer.learning_rate)),
                   compiled_shapes=len(self.compiled_lengths))
    lengths = run.length_stats.result()
    scalars["data/over_long_fraction"] = (
        (lengths["dropped"] + lengths["truncated"]) / max(lengths["seen"], 1))
    if run.policy == "mixed_float16":
      scalars["loss_scale"] = float(run.optimizer.dynamic_scale.numpy())
    if self.writer:
      summaries.write_scalars(self.writer, step, scalars)
    self.reset()


def _check_finite(history_finite: List[float], step: int, limit: int) -> None:
  """Stops the run after `limit` non-finite losses in a row (each was skipped)."""
  run = 0
  for f in reversed(history_finite):
    if f:
      break
    run += 1
  if run:
    logging.warning("Non-finite gradients at step %d: update skipped (%d in a row).",
                    step, run)
  if run >= limit:
    raise FloatingPointError(
        f"{run} non-finite losses in a row up to step {step} "
        f"(config.train.max_nonfinite_steps={limit}); lower config.train.learning_rate, "
        "enable config.train.clip_norm or use float32.")


def _steps_until_boundary(step: int, config) -> int:
  """Steps to run in the next loop call so that logs, evals and checkpoints land exactly."""
  t = config.train
  n = min(t.steps_per_loop, t.steps - step)
  for every in (t.log_every, t.eval_every, t.checkpoint_every):
    n = min(n, every - step % every)
  return n


def _profile(step: int, spec: str, logdir: str, state: Dict) -> None:
  """Starts/stops the TensorBoard profiler for config.train.profile_steps='START,END'."""
  if not spec:
    return
  try:
    start, end = (int(x) for x in spec.split(","))
  except ValueError as e:
    raise ValueError(f"config.train.profile_steps={spec!r} must be 'START,END'") from e
  if not state.get("on") and start <= step < end and not state.get("done"):
    tf.profiler.experimental.start(logdir)
    state["on"] = True
  elif state.get("on") and step >= end:
    tf.profiler.experimental.stop()
    state.update(on=False, done=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       strategy: Optional[tf.distribute.Strategy] = None) -> Dict:
  """Trains (resuming from workdir's latest checkpoint) and evaluates; returns a summary.

  The summary holds per-step training losses of this invocation ("losses"), the final
  eval metrics ("eval"), the steps run and the distinct compiled batch lengths.
  """
  run = setup(config, workdir, strategy)
  t = config.train
  train_loop = make_train_loop(run.strategy, make_replica_step(
      run.model, run.optimizer, config, run.strategy))
  evaluator = Evaluator(run) if run.is_chief else None
  writers = {}
  if run.is_chief:
    writers = {k: tf.summary.create_file_writer(os.path.join(workdir, k))
               for k in ("train", "eval")}
    summaries.write_hparams(writers["train"], _flatten(config))
  stop, profile_state = run.stop, {}
  previous_handlers = _install_signal_handlers(stop)
  step = int(run.optimizer.iterations.numpy())
  history = {k: [] for k in ("loss", "finite", "length")}
  progress, eval_metrics = _ProgressWindow(run, writers.get("train"), step), {}
  logging.info("Training %s from step %d to %d; TensorBoard: tensorboard --logdir %s",
               run.policy, step, t.steps, workdir)
  try:
    # Multi-worker, run.preemption acts on the signal instead: it stops all workers at one
    # step (a worker leaving alone would block the others in their next all-reduce).
    while step < t.steps and (stop.signal_name is None or run.preemption):
      _profile(step, t.profile_steps, os.path.join(run.workdir, "train"), profile_state)
      n = _steps_until_boundary(step, config)
      with pipeline.corpora.surface_corpus_errors(), _peer_failures(run, step):
        out, input_wait = train_loop(run.iterator, tf.constant(n))
      out = {k: v.numpy().tolist() for k, v in out.items()}
      step += n
      for k in history:
        history[k] += out[k]
      progress.add(out, input_wait)
      _check_finite(history["finite"], step, t.max_nonfinite_steps)
      if step % t.log_every == 0 or step == t.steps:
        progress.flush(step, t.steps)
      if step % t.checkpoint_every == 0:
        run.manager.save(checkpoint_number=step)
      if run.preemption:  # Before eval: a preempted job may have seconds left.
        run.preemption.save_checkpoint_if_preempted(checkpoint_number=step)
      if step % t.eval_every == 0 or step == t.steps:
        eval_metrics = _evaluate(run, evaluator, step, writers)
        progress.reset()
  finally:
    for sig, handler in previous_handlers.items():
      signal.signal(sig, handler)
    if profile_state.get("on"):
      tf.profiler.experimental.stop()
  return _finish(run, step, progress, dict(
      losses=history["loss"], eval=eval_metrics, samples=getattr(evaluator, "samples", []),
      workdir=workdir))


def _finish(run: Run, step: int, progress: _ProgressWindow, summary: Dict) -> Dict:
  """Final checkpoint and logs; returns `summary` with the run-wide fields added."""
  run.manager.save(checkpoint_number=step)
  if run.stop.signal_name:
    logging.warning("%s received: checkpoint saved at step %d; rerun to resume.",
                    run.stop.signal_name, step)
  lengths = sorted(progress.compiled_lengths)
  logging.info("Compiled batch lengths: %s (%d shapes).", lengths, len(lengths))
  run.length_stats.log()
  summary.update(step=step, compiled_lengths=lengths,
                 seconds=time.time() - progress.run_start, interrupted=run.stop.signal_name)
  _cleanup_non_chief(run)
  return summary


def _evaluate(run: Run, evaluator: Optional[Evaluator], step: int, writers) -> Dict:
  """Evaluates on the chief. Multi-worker, the others wait for it at a barrier: in their
  next all-reduce they would give up after config.distribute.collective_timeout_s."""
  metrics = {}
  if evaluator:
    metrics = _evaluate_and_keep_best(run, evaluator, step, writers["eval"])
  if run.preemption:
    with _peer_failures(run, step):
      distribute.barrier(run.strategy, BARRIER_TIMEOUT_S)
  return metrics


@contextlib.contextmanager
def _peer_failures(run: Run, step: int) -> Iterator[None]:
  """Multi-worker: a collective that failed because a peer died or hung -> one clear error
  (ConnectionError) saying what to do, instead of a page of gRPC details."""
  try:
    yield
  except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
          tf.errors.AbortedError, tf.errors.CancelledError) as e:
    if run.preemption is None:
      raise
    lines = [line.strip() for line in e.message.splitlines() if line.strip()] or [""]
    reason = next((line for line in lines if re.search(
        r"aborted by|timed out|unhealthy|heartbeat", line, re.IGNORECASE)), lines[0])
    raise ConnectionError(
        f"multi-worker training failed after step {step}: a worker died or stopped "
        f"responding ({type(e).__name__}: {reason}). The others cannot go on "
        "without it; restart the whole job (launch/local.py --max_restarts, a requeued "
        "Slurm job, the Kubernetes Job) and it resumes from the chief's last checkpoint. "
        "A live but stuck worker is given config.distribute.collective_timeout_s="
        f"{run.config.distribute.collective_timeout_s}s.") from e


def _evaluate_and_keep_best(run: Run, evaluator: Evaluator, step: int, writer) -> Dict:
  metrics = evaluator(step, writer)
  logging.info("eval at step %d: loss %.4f  BLEU %.2f  chrF %.2f", step,
               metrics["loss"], metrics["bleu"], metrics["chrf"])
  if metrics["loss"] < float(run.best_eval_loss.numpy()):
    run.best_eval_loss.assign(metrics["loss"])
    run.best_manager.save(checkpoint_number=step)
  return metrics


def _cleanup_non_chief(run: Run) -> None:
  """Removes a non-chief worker's scratch dir, and tmp_workers/ once it is empty."""
  if run.is_chief or not tf.io.gfile.exists(run.workdir):
    return
  tf.io.gfile.rmtree(run.workdir)
  parent = os.path.dirname(run.workdir)
  try:
    if not tf.io.gfile.listdir(parent):
      tf.io.gfile.rmtree(parent)
  except tf.errors.NotFoundError:  # Another worker removed it first.
    pass


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> Dict:
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat
