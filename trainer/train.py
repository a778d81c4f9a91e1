"""Training: the optimizer, the step builders and the loop (flax examples/wmt's shape).

The step encodes once, runs the decoder cell in an in-graph loop, projects all steps to
the vocabulary at once, and returns the loss sum and the token count; the caller divides
by the *global* token count, so the loss is right for any replica count. Where it runs
(modes, strategy, multi-worker plumbing) is trainer/distribute.py; evaluation is one call
into trainer/evaluate.py; progress lines and the profiler are trainer/summaries.py.
"""
import contextlib
import dataclasses
import os
import time
from typing import Dict, List, Optional

from absl import logging
import keras
import ml_collections
import numpy as np
import tensorflow as tf

from configs import validate as validate_lib
from input_pipeline import pipeline
from input_pipeline import tokenizer as tokenizer_lib
from trainer import checkpoints
from trainer import distribute
from trainer import evaluate
from trainer import model as model_lib
from trainer import summaries


class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup to `peak`, then constant, rsqrt or cosine decay (to 0 at `total`)."""

  def __init__(self, peak: float, warmup: int, decay: str, total: int):
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


def make_grad_fn(model, config):
  """(source, target, global_tokens, loss_scale, dropout_seed) -> (grads, loss_sum);
  XLA-compiled whole when config.train.xla is train_step."""
  smoothing = float(config.train.label_smoothing)

  def grad_fn(source, target, global_tokens, loss_scale, dropout_seed):
    with tf.GradientTape() as tape:
      logits, _ = model(source, target[:, :-1], training=True, dropout_seed=dropout_seed)
      loss_sum, _ = evaluate.masked_cross_entropy(logits, target[:, 1:], smoothing)
      scaled = loss_sum / global_tokens * loss_scale
    return tape.gradient(scaled, model.trainable_variables), loss_sum

  jit = config.train.xla == "train_step"
  return tf.function(grad_fn, jit_compile=True) if jit else grad_fn


def dropout_seed(seed: int, step, replica, micro_batch: int = 0) -> tf.Tensor:
  """The [2] int64 seed of one replica's dropout masks at one step (model.dropout): a pure
  function of (config.seed, step, global replica id, micro-batch), so that replicas and
  workers draw different masks and a resumed run draws the uninterrupted run's."""
  seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
  seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(replica, tf.int64))
  return tf.random.experimental.stateless_fold_in(seed, micro_batch)


def make_gradient_fn(model, config, scale_fn):
  """(per-replica batch, step) -> all-reduced gradients of the *global* mean token loss.

  Returns (grads, loss_sum, tokens, examples, grad_norm, finite), all global and
  identical on every replica (so reporting them needs no collective of its own); `grads`
  are unscaled (fp16 loss scaling undone) and clipped by global norm; `finite` is False
  when the global loss or gradient is not finite.
  """
  grad_fn = make_grad_fn(model, config)
  clip = float(config.train.clip_norm)

  def global_gradients(batches, step=0):
    """`batches`: one batch, or the train.accumulate_steps micro-batches of one update;
    `step`: the training step (int64), which seeds dropout."""
    ctx = tf.distribute.get_replica_context()
    seeds = [dropout_seed(config.seed, step, ctx.replica_id_in_sync_group, i)
             for i in range(len(batches) if isinstance(batches, (list, tuple)) else 1)]
    batches = batches if isinstance(batches, (list, tuple)) else [batches]
    local_tokens = tf.add_n([tf.reduce_sum(tf.cast(b["target"][:, 1:] != 0, tf.float32))
                             for b in batches])
    global_tokens = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_tokens)
    scale = scale_fn()
    # Every micro-batch's loss is divided by the tokens of all of them, so the summed
    # gradients are exactly those of one batch holding them all.
    grads, loss_sum = grad_fn(batches[0]["source"], batches[0]["target"], global_tokens,
                              scale, seeds[0])
    for b, seed in zip(batches[1:], seeds[1:]):
      more, more_loss = grad_fn(b["source"], b["target"], global_tokens, scale, seed)
      grads = [_add_gradients(g, m) for g, m in zip(grads, more)]
      loss_sum += more_loss
    examples = tf.cast(tf.add_n([tf.shape(b["source"])[0] for b in batches]), tf.float32)
    # The loss sum and the example count ride along in the gradients' all-reduce.
    *grads, global_loss, global_examples = ctx.all_reduce(
        tf.distribute.ReduceOp.SUM, [g / scale for g in grads] + [loss_sum, examples])
    grad_norm = tf.linalg.global_norm(grads)
    # A huge learning rate can make the loss inf while clipped gradients stay finite.
    finite = tf.math.is_finite(grad_norm) & tf.math.is_finite(global_loss)
    if clip:
      grads, _ = tf.clip_by_global_norm(grads, clip, use_norm=grad_norm)
    return grads, global_loss, global_tokens, global_examples, grad_norm, finite

  return global_gradients


def _add_gradients(a, b):
  """a + b for dense gradients; embedding gradients (IndexedSlices) stay sparse: their
  rows are concatenated, and summed where the all-reduce or the optimizer densifies."""
  if isinstance(a, tf.IndexedSlices):
    return tf.IndexedSlices(tf.concat([a.values, b.values], 0),
                            tf.concat([a.indices, b.indices], 0), a.dense_shape)
  return a + b


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
  update unless the loss or the gradients are not finite."""
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

  def replica_step(batches, step=0):
    grads, loss_sum, tokens, examples, grad_norm, finite = global_gradients(batches, step)
    scale = scale_fn()
    grads = [g * (scale / n) for g in grads]
    if fp16:  # LossScaleOptimizer skips non-finite steps and lowers its scale itself; a
      # non-finite loss is handed to it as non-finite gradients (an fp16 overflow too).
      grads = [tf.where(finite, g, tf.constant(np.inf, g.dtype)) for g in grads]
      optimizer.apply(grads, variables)
    else:
      tf.distribute.get_replica_context().merge_call(apply_if_finite,
                                                     args=(grads, finite))
    batches = batches if isinstance(batches, (list, tuple)) else [batches]
    length = tf.reduce_max([tf.shape(b["source"])[1] for b in batches])
    return dict(loss_sum=loss_sum, tokens=tokens, examples=examples, grad_norm=grad_norm,
                finite=tf.cast(finite, tf.float32), length=tf.cast(length, tf.float32))
  return replica_step


def make_train_loop(strategy, replica_step, timed: bool = True,
                    accumulate_steps: int = 1):
  """tf.function (iterator, num_steps, first_step) -> per-step metrics [num_steps] and
  input wait (s). `first_step` (int64) is the step count before the call (seeds dropout).

  Several steps per call cut host overhead; the time spent in get_next is measured in-graph
  unless `timed` is False (tf.timestamp is refused under config.train.deterministic_ops).
  Each step takes `accumulate_steps` batches (train.accumulate_steps) for one update.
  """
  @tf.function
  def train_loop(iterator, num_steps, first_step=0):
    arrays = {k: tf.TensorArray(tf.float32, size=num_steps)
              for k in ("loss", "tokens", "examples", "grad_norm", "finite", "length")}
    input_wait = tf.constant(0.0, tf.float64)
    for i in tf.range(num_steps):
      t0 = tf.timestamp() if timed else tf.constant(0.0, tf.float64)
      with tf.control_dependencies([t0]):
        batch = [next(iterator) for _ in range(accumulate_steps)]
      if timed:
        with tf.control_dependencies(tf.nest.flatten(
            [strategy.experimental_local_results(b) for b in batch])):
          input_wait += tf.timestamp() - t0
      step = tf.cast(first_step, tf.int64) + tf.cast(i, tf.int64)
      out = strategy.run(replica_step, args=(batch, step))
      # Global values, the same on every replica: the first one's, no collective.
      first = {k: strategy.experimental_local_results(v)[0] for k, v in out.items()}
      values = dict(loss=first["loss_sum"] / tf.maximum(first["tokens"], 1.0), **{
          k: first[k] for k in ("tokens", "examples", "grad_norm", "finite", "length")})
      arrays = {k: arrays[k].write(i, values[k]) for k in arrays}
    return {k: a.stack() for k, a in arrays.items()}, input_wait

  return train_loop



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


@dataclasses.dataclass
class Run:
  """Everything one training run holds: built once by `setup`, used by the loop.
  `config` is the resolved one (no 'auto' modes); `workdir` is this worker's run dir."""
  config: ml_collections.ConfigDict
  workdir: str
  strategy: tf.distribute.Strategy
  tokenizer: tokenizer_lib.Tokenizer
  model: model_lib.Seq2Seq
  optimizer: keras.optimizers.Optimizer
  manager: tf.train.CheckpointManager
  best_manager: tf.train.CheckpointManager
  state: "RunState"
  iterator: object
  is_chief: bool
  length_stats: pipeline.LengthStats
  stop: distribute.StopFlag = dataclasses.field(default_factory=distribute.StopFlag)


def setup(config: ml_collections.ConfigDict, workdir: str,
          strategy: Optional[tf.distribute.Strategy] = None) -> Run:
  """Validates the config, resolves its modes for this device, and builds the strategy,
  tokenizer, model, optimizer, dataset iterator and checkpoint (restored if any).
  A finished run (step >= train.steps) gets no iterator and writes nothing."""
  validate_lib.validate(config)
  validate_lib.check_resume(config, workdir)
  # First: MultiWorkerMirroredStrategy must start TF's runtime itself (no TF op before).
  strategy = strategy or distribute.create_strategy(config)
  config = distribute.resolve_modes(config)
  _check_batch_split(config, strategy.num_replicas_in_sync)
  if config.train.deterministic_ops:
    tf.config.experimental.enable_op_determinism()
  chief = distribute.is_chief(strategy)
  run_dir = distribute.run_dir(workdir, strategy, config.distribute.worker_scratch_dir)
  tf.io.gfile.makedirs(run_dir)
  policy = config.train.precision
  # Seed first: set_seed clears TF's kernel cache, which deletes the tokenizer's
  # kernel-owned SentencePiece resources if they already exist.
  tf.random.set_seed(config.seed)
  keras.utils.set_random_seed(config.seed)
  tokenizer = distribute.shared_tokenizer(config, workdir, strategy)
  with strategy.scope():
    model = model_lib.create_model(config, tokenizer.source_vocab_size,
                                   tokenizer.target_vocab_size, policy)
    optimizer = create_optimizer(config, policy)
    optimizer.build(model.trainable_variables)
    state = RunState()
  checkpoint = tf.train.Checkpoint(model=checkpoints.model_variables(model),
                                   optimizer=optimizer, **state.variables())
  manager, best_manager = (tf.train.CheckpointManager(
      checkpoint, os.path.join(run_dir, *path), max_to_keep=keep,
      step_counter=state.step) for path, keep in (
          (("checkpoints",), config.train.keep_checkpoints),
          (("checkpoints", "best"), 1)))
  # Every worker resumes from the chief's checkpoints: the others' are scratch copies.
  chief_manager = manager if chief else tf.train.CheckpointManager(
      checkpoint, os.path.join(workdir, "checkpoints"), max_to_keep=None)
  _restore_latest(chief_manager, state, optimizer, model)
  length_stats = pipeline.LengthStats(name="train_length_filter")
  step = int(state.step.numpy())
  iterator = None
  if not finished_reason(config, step, state):
    warning = raw_input_warning(config, distribute.is_multi_worker(strategy), step)
    if warning and chief:
      logging.warning("%s", warning)
    iterator = iter(make_train_dataset(config, tokenizer, strategy,
                                       step * config.train.accumulate_steps, length_stats))
  if chief and iterator:  # After a successful restore, so it always describes the checkpoints.
    checkpoints.save_config(config, run_dir)
  return Run(config, run_dir, strategy, tokenizer, model, optimizer, manager, best_manager,
             state, iterator, chief, length_stats)


def raw_input_warning(config: ml_collections.ConfigDict, multi_worker: bool,
                      start_step: int) -> Optional[str]:
  """What a raw data.train costs where prepared data would not, or None: a resume replays
  the input pipeline up to the step (O(steps) per restart: hours at step 10^6), and on
  several workers each one reads (and decompresses) every file it shares with others to
  keep its 1/N of it."""
  if pipeline.corpora.parse_source(config.data.train).kind == "prepared":
    return None
  costs = []
  if start_step:
    costs.append(f"resuming at step {start_step} replays the input pipeline up to it "
                 "(time grows with the step)")
  if multi_worker:
    costs.append("every worker reads the files it shares with others in full to keep its "
                 "share of them")
  if not costs:
    return None
  return (f"data.train={config.data.train} is a raw corpus: {'; '.join(costs)}. Prepare "
          "it once for constant-time resume and sharded reading: nmt-prepare "
          f"--config=<this config> --output_dir=DIR --config.data.train={config.data.train}"
          ", then train with --config.data.train=prepared:DIR (README, Prepared corpora).")


class RunState:
  """Run-wide progress kept in the checkpoint besides model and optimizer: the steps
  trained (batches consumed: the data position, checkpoint names, train.steps and dropout
  seeds all count these; optimizer.iterations counts applied updates only, which lag it
  by the skipped non-finite steps), the best dev BLEU (for checkpoints/best and early
  stopping), evaluations since it last improved, and the wall-clock seconds trained so
  far over all invocations (train.max_seconds)."""

  def __init__(self):
    with tf.init_scope():
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.best_bleu = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
      self.evals_without_gain = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.elapsed_s = tf.Variable(0.0, dtype=tf.float64, trainable=False)

  def variables(self) -> Dict[str, tf.Variable]:
    return dict(step=self.step, best_bleu=self.best_bleu, evals_without_gain=self.evals_without_gain,
                elapsed_s=self.elapsed_s)


def finished_reason(config: ml_collections.ConfigDict, step: int,
                    state: RunState) -> Optional[str]:
  """Why the run has nothing left to do (its steps, its time budget or early stopping),
  saying which key to raise to go on; None while it has."""
  t = config.train
  if step >= t.steps:
    return f"reached config.train.steps={t.steps}; raise it to train further"
  if t.max_seconds and float(state.elapsed_s.numpy()) >= t.max_seconds:
    return (f"spent its wall-clock budget config.train.max_seconds={t.max_seconds}; raise "
            "it to train further")
  if (t.early_stopping_patience and
      int(state.evals_without_gain.numpy()) >= t.early_stopping_patience):
    return (f"stopped early: dev BLEU did not improve by {t.early_stopping_min_delta} in "
            f"{t.early_stopping_patience} evaluations (config.train.early_stopping_patience)"
            "; raise it to train further")
  return None


def _check_batch_split(config: ml_collections.ConfigDict, replicas: int) -> None:
  if config.data.batch_by == "sentences" and config.train.batch_size % replicas:
    raise validate_lib.invalid(
        "train.batch_size", config.train.batch_size,
        f"must be divisible by the number of replicas ({replicas}), which share it")


def _restore_latest(manager: tf.train.CheckpointManager, state: RunState, optimizer,
                    model) -> None:
  """Restores the newest checkpoint that reads (a broken one is reported and skipped)."""
  for directory in (manager.directory, os.path.join(manager.directory, "best")):
    checkpoints.remove_partial_saves(directory)
  paths = checkpoints.checkpoints_in(manager.directory)
  if not paths:
    return

  def restore(path: str) -> None:
    saved = {name.split("/")[0] for name, _ in tf.train.list_variables(path)}
    if "step" in saved:
      manager.checkpoint.restore(path).assert_existing_objects_matched()
      return
    # Saved before RunState.step existed: its step was optimizer.iterations.
    legacy = {k: v for k, v in state.variables().items() if k != "step"}
    tf.train.Checkpoint(model=checkpoints.model_variables(model), optimizer=optimizer,
                        **legacy).restore(path).assert_existing_objects_matched()
    state.step.assign(optimizer.iterations)

  path = checkpoints.restore_newest_intact(paths, restore)
  logging.info("Resumed from %s at step %d.", path, int(state.step.numpy()))


def _count_nonfinite(finite: List[float], in_a_row: int, step: int, limit: int) -> int:
  """Non-finite steps in a row after this call's steps; stops the run at `limit`."""
  for f in finite:
    in_a_row = 0 if f else in_a_row + 1
  if in_a_row:
    logging.warning("Non-finite loss or gradients at step %d: update skipped (%d in a "
                    "row).", step, in_a_row)
  if in_a_row >= limit:
    raise FloatingPointError(
        f"{in_a_row} non-finite losses in a row up to step {step} "
        f"(config.train.max_nonfinite_steps={limit}); lower config.train.learning_rate, "
        "enable config.train.clip_norm or use float32.")
  return in_a_row


def _steps_until_boundary(step: int, config) -> int:
  """Steps to run in the next loop call so that logs, evals and checkpoints land exactly."""
  t = config.train
  n = min(t.steps_per_loop, t.steps - step)
  for every in (t.log_every, t.eval_every, t.checkpoint_every):
    n = min(n, every - step % every)
  return n


def _run_scalars(run: Run) -> Dict[str, float]:
  """Scalars of the run's state for the progress summary, besides the step metrics."""
  lengths = run.length_stats.result()
  scalars = {"learning_rate": float(np.asarray(run.optimizer.learning_rate)),
             "data/over_long_fraction": ((lengths["dropped"] + lengths["truncated"]) /
                                         max(lengths["seen"], 1))}
  if run.config.train.precision == "mixed_float16":
    scalars["loss_scale"] = float(run.optimizer.dynamic_scale.numpy())
  return scalars


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       strategy: Optional[tf.distribute.Strategy] = None) -> Dict:
  """Trains (resuming from workdir's latest checkpoint) and evaluates; returns a summary:
  this invocation's per-step losses, the final eval metrics, the step reached, and
  `already_complete` when the run had finished before (nothing done, nothing written).

  The chief holds the workdir's lock throughout (checkpoints.workdir_lock): a second
  nmt-train on the same workdir is refused.
  """
  validate_lib.validate(config)
  # First: MultiWorkerMirroredStrategy must start TF's runtime itself (no TF op before).
  strategy = strategy or distribute.create_strategy(config)
  with checkpoints.workdir_lock(workdir, lock=distribute.is_chief(strategy)):
    return _train_and_evaluate(config, workdir, strategy)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        strategy: tf.distribute.Strategy) -> Dict:
  run = setup(config, workdir, strategy)
  if run.iterator is None:
    step = int(run.state.step.numpy())
    logging.info("The run in %s is complete at step %d: it %s.", workdir, step,
                 finished_reason(run.config, step, run.state))
    return dict(losses=[], eval=None, samples=[], workdir=workdir, step=step, seconds=0.0,
                interrupted=None, already_complete=True, stopped_by=None)
  config, t = run.config, run.config.train
  train_loop = make_train_loop(run.strategy, make_replica_step(
      run.model, run.optimizer, config, run.strategy), timed=not t.deterministic_ops,
      accumulate_steps=t.accumulate_steps)
  evaluator = None
  if run.is_chief:  # Also reads the dev set (holdout: a pass over data.train).
    evaluator = evaluate.Evaluator(config, run.tokenizer, run.model,
                                   num_replicas=run.strategy.num_replicas_in_sync)
  multi_worker = distribute.is_multi_worker(run.strategy)
  if multi_worker:  # The others wait here for the chief, not in the first step.
    distribute.barrier(run.strategy, distribute.BARRIER_TIMEOUT_S)
  writers = {}
  if run.is_chief:
    writers = {k: tf.summary.create_file_writer(os.path.join(workdir, k))
               for k in ("train", "eval")}
    summaries.write_hparams(writers["train"], config)
  step = int(run.state.step.numpy())
  losses, nonfinite, eval_metrics, stopped_by, interrupted = [], 0, {}, None, None
  clock = _Clock(run.state)
  progress = summaries.ProgressWindow(writers.get("train"), step)
  profiler = summaries.Profiler(t.profile_steps, os.path.join(run.workdir, "train"))
  agree_to_stop = distribute.StopAgreement(run.strategy)
  wait_for_chief = distribute.ChiefBroadcast(run.strategy,
                                             config.distribute.collective_timeout_s)
  logging.info("Training %s (xla %s, recurrence %s) from step %d to %d; TensorBoard: "
               "tensorboard --logdir %s", t.precision, t.xla, config.model.recurrence, step,
               t.steps, workdir)
  with distribute.stop_on_signals(run.stop):
    try:
      while not stopped_by and not interrupted:
        profiler.update(step)
        n = _steps_until_boundary(step, config)
        with (pipeline.corpora.surface_corpus_errors(),
              distribute.peer_failures(run.strategy, step)):
          out, input_wait = train_loop(run.iterator, tf.constant(n),
                                       tf.constant(step, tf.int64))
          out = {k: v.numpy().tolist() for k, v in out.items()}
          step += n
          run.state.step.assign(step)
          clock.tick()
          # All workers stop at the same step: any worker's signal, the chief's clock.
          interrupted = agree_to_stop(run.stop, run.state.elapsed_s)
        stopped_by = finished_reason(config, step, run.state)
        losses += out["loss"]
        progress.add(out, input_wait)
        nonfinite = _count_nonfinite(out["finite"], nonfinite, step, t.max_nonfinite_steps)
        if step % t.log_every == 0 or stopped_by or interrupted:
          progress.flush(step, t.steps, _run_scalars(run))
        if interrupted:  # Saved by _finish, before a possibly long evaluation.
          break
        if step % t.checkpoint_every == 0:
          checkpoints.save(run.manager, step)
        if step % t.eval_every == 0 or stopped_by:
          with clock.evaluating(), distribute.peer_failures(run.strategy, step):
            eval_metrics = _evaluate(run, evaluator, step, writers.get("eval"),
                                     wait_for_chief) or eval_metrics
            # A signal during the (abandoned) evaluation: stop now, on every worker.
            interrupted = agree_to_stop(run.stop, run.state.elapsed_s)
          stopped_by = stopped_by or finished_reason(config, step, run.state)
          if writers:
            summaries.write_scalars(writers["train"], step, {
                "eval_time_fraction": clock.eval_fraction(),
                "elapsed_s": float(run.state.elapsed_s.numpy())})  # For BLEU vs time.
          progress.reset()
    except pipeline.corpora.CorpusError:
      _save_before_data_error(run)
      raise
    finally:
      profiler.stop()
  if stopped_by and not interrupted:
    logging.info("Stopping at step %d: the run %s.", step, stopped_by)
  test_metrics = None
  if stopped_by and not interrupted and config.data.test and run.is_chief:
    test_metrics = _test(run, step, workdir)
  return _finish(run, step, progress, interrupted, dict(
      losses=losses, eval=eval_metrics, samples=getattr(evaluator, "samples", []),
      workdir=workdir, stopped_by=stopped_by, eval_time_fraction=clock.eval_fraction(),
      test=test_metrics))


def _test(run: Run, step: int, workdir: str) -> Dict:
  """Scores all of config.data.test once with the final weights (after eval_time_fraction
  is measured: it is a report, not part of training); logged to TensorBoard under test/."""
  config = ml_collections.ConfigDict(run.config.to_dict())
  config.data.eval, config.data.eval_examples = config.data.test, 0
  metrics = evaluate.evaluate_checkpoint(config, run.tokenizer, run.model,
                                         num_replicas=run.strategy.num_replicas_in_sync)
  logging.info("test (%s, %d pairs) at step %d: BLEU %.2f  chrF %.2f", config.data.test,
               metrics["examples"], step, metrics["bleu"], metrics["chrf"])
  writer = tf.summary.create_file_writer(os.path.join(workdir, "test"))
  summaries.write_scalars(writer, step, {k: metrics[k] for k in ("bleu", "chrf", "loss")})
  writer.close()
  return dict(metrics, source=config.data.test)


class _Clock:
  """Wall-clock seconds of the run, kept in RunState.elapsed_s across invocations (for
  train.max_seconds), and the share of this invocation's time spent evaluating."""

  def __init__(self, state: RunState):
    self.state, self.start, self.last = state, time.time(), time.time()
    self.eval_s = 0.0

  def tick(self) -> None:
    now = time.time()
    self.state.elapsed_s.assign_add(now - self.last)
    self.last = now

  @contextlib.contextmanager
  def evaluating(self):
    started = time.time()
    try:
      yield
    finally:
      self.eval_s += time.time() - started
      self.tick()

  def eval_fraction(self) -> float:
    return self.eval_s / max(time.time() - self.start, 1e-9)


def _save_before_data_error(run: Run) -> None:
  """Saves the steps trained so far before a data error ends the run. Single worker only:
  a multi-worker save needs every worker, and only this one may have hit the error."""
  if distribute.is_multi_worker(run.strategy):
    return
  step = int(run.state.step.numpy())
  checkpoints.save(run.manager, step)
  logging.warning("Checkpoint saved at step %d before stopping on a data error; fix the "
                  "data and rerun to resume.", step)


def _evaluate(run: Run, evaluator: Optional[evaluate.Evaluator], step: int,
              writer, wait_for_chief: distribute.ChiefBroadcast) -> Dict:
  """Evaluates on the chief, keeping the best checkpoint by dev BLEU and counting the
  evaluations without a gain of train.early_stopping_min_delta (early stopping); the other
  workers wait for it (config.distribute.collective_timeout_s), then take its count."""
  metrics = {}
  state = run.state
  if evaluator:
    metrics = evaluator(step, writer, stop=lambda: run.stop.signal_name is not None)
  if evaluator and metrics is not None:
    best = float(state.best_bleu.numpy())
    if metrics["bleu"] > best:
      state.best_bleu.assign(metrics["bleu"])
      checkpoints.save(run.best_manager, step)
    gained = metrics["bleu"] >= best + run.config.train.early_stopping_min_delta
    state.evals_without_gain.assign(0 if gained else state.evals_without_gain + 1)
  wait_for_chief(state.evals_without_gain)
  return metrics if metrics is not None else {}


def _finish(run: Run, step: int, progress: summaries.ProgressWindow,
            interrupted: Optional[str], summary: Dict) -> Dict:
  """Final checkpoint and logs; returns `summary` with the run-wide fields added.

  Multi-worker, no worker returns before all have saved: a launcher that stops the job
  when the first worker exits (srun --kill-on-bad-exit) would cut the chief's save short.
  """
  checkpoints.save(run.manager, step)
  if distribute.is_multi_worker(run.strategy):
    with distribute.peer_failures(run.strategy, step):
      distribute.barrier(run.strategy, distribute.BARRIER_TIMEOUT_S)
  if interrupted and distribute.is_multi_worker(run.strategy):
    logging.warning("%s: all workers saved a checkpoint at step %d; exiting with code %d "
                    "so that the restarted job resumes from it.", interrupted, step,
                    distribute.PREEMPTED_EXIT_CODE)
  elif interrupted:
    logging.warning("%s received: checkpoint saved at step %d; rerun to resume.",
                    interrupted, step)
  lengths = sorted(progress.compiled_lengths)
  logging.info("Compiled batch lengths: %s (%d shapes).", lengths, len(lengths))
  run.length_stats.log()
  summary.update(step=step, compiled_lengths=lengths, already_complete=False,
                 seconds=time.time() - progress.run_start, interrupted=interrupted)
  distribute.remove_scratch_dir(run.workdir, run.strategy)
  return summary
