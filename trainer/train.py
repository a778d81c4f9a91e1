"""Training: the step builders and the loop (flax examples/wmt's shape).

The step encodes once, runs the decoder cell in an in-graph loop, projects all steps to
the vocabulary at once, and returns the loss sum and the token count; the caller divides
by the *global* token count, so the loss is right for any replica count. What the loop
runs on (strategy, model, optimizer, batches, restored checkpoint) is built by
trainer/run_setup.py; where it runs (modes, multi-worker plumbing) is trainer/distribute.py;
evaluation, the best checkpoint and early stopping are trainer/evaluate.py; progress
lines, TensorBoard and the profiler are trainer/summaries.py.
"""
import contextlib
import time
from typing import Dict, List, Optional

from absl import logging
import keras
import ml_collections
import numpy as np
import tensorflow as tf

from input_pipeline import datasets
from trainer import checkpoints
from trainer import distribute
from trainer import evaluate
from trainer import run_setup
from trainer import summaries


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
  if model.encoder.dropout_rate and model.encoder.dropout_alg == "threefry" and not jit:
    # Else TensorFlow's kernel fails mid-step on a "counter" shape, naming nothing of ours.
    raise ValueError("model.dropout_rng=threefry draws its masks with XLA only, and "
                     f"config.train.xla={config.train.xla!r} does not compile the train "
                     "step: resolve the config and the model from the same one "
                     "(trainer.distribute.resolve_modes).")
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

  Returns (grads, loss_sum, tokens, examples, grad_norm, finite, padding), all global and
  identical on every replica (so reporting them needs no collective of its own); `grads`
  are unscaled (fp16 loss scaling undone) and clipped by global norm; `finite` is False
  when the global loss or gradient is not finite; `padding`: [real tokens, padded cells].
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
    sides = [x for b in batches for x in (b["source"], b["target"][:, 1:])]
    padding = tf.stack([tf.add_n([tf.reduce_sum(tf.cast(x != 0, tf.float32)) for x in sides]),
                        tf.add_n([tf.cast(tf.size(x), tf.float32) for x in sides])])
    # The loss sum, the example count and the padding ride in the gradients' all-reduce.
    *grads, global_loss, global_examples, global_padding = ctx.all_reduce(
        tf.distribute.ReduceOp.SUM,
        [g / scale for g in grads] + [loss_sum, examples, padding])
    grad_norm = tf.linalg.global_norm(grads)
    # A huge learning rate can make the loss inf while clipped gradients stay finite.
    finite = tf.math.is_finite(grad_norm) & tf.math.is_finite(global_loss)
    if clip:
      grads, _ = tf.clip_by_global_norm(grads, clip, use_norm=grad_norm)
    return (grads, global_loss, global_tokens, global_examples, grad_norm, finite,
            global_padding)

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


def make_replica_step(model, optimizer, config, strategy,
                      ema: Optional[run_setup.WeightAverage] = None):
  """Per-replica train step: global gradients (all-reduced once, then clipped), then an
  update unless the loss or the gradients are not finite, and after an update the moving
  average of the weights (`ema`, the run's WeightAverage) if any."""
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
      if ema is not None:
        ema.update(strategy, optimizer.iterations)

    tf.cond(finite, apply, lambda: None)

  def average_if_finite(strategy, finite):
    finite = strategy.experimental_local_results(finite)[0]
    tf.cond(finite, lambda: ema.update(strategy, optimizer.iterations), lambda: None)

  def replica_step(batches, step=0):
    grads, loss_sum, tokens, examples, grad_norm, finite, padding = global_gradients(
        batches, step)
    scale = scale_fn()
    grads = [g * (scale / n) for g in grads]
    if fp16:  # LossScaleOptimizer skips non-finite steps and lowers its scale itself; a
      # non-finite loss is handed to it as non-finite gradients (an fp16 overflow too).
      grads = [tf.where(finite, g, tf.constant(np.inf, g.dtype)) for g in grads]
      optimizer.apply(grads, variables)
      if ema is not None:
        tf.distribute.get_replica_context().merge_call(average_if_finite, args=(finite,))
    else:
      tf.distribute.get_replica_context().merge_call(apply_if_finite,
                                                     args=(grads, finite))
    batches = batches if isinstance(batches, (list, tuple)) else [batches]
    length = tf.reduce_max([tf.shape(b["source"])[1] for b in batches])
    return dict(loss_sum=loss_sum, tokens=tokens, examples=examples, grad_norm=grad_norm,
                finite=tf.cast(finite, tf.float32), length=tf.cast(length, tf.float32),
                real_tokens=padding[0], padded_tokens=padding[1])
  return replica_step


# Per step, global: mean token loss, real target tokens, examples, gradient norm, 1.0 if
# finite, the longest padded length, real tokens and padded cells of source and target.
_STEP_METRICS = ("loss", "tokens", "examples", "grad_norm", "finite", "length", "real_tokens",
                 "padded_tokens")


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
    arrays = {k: tf.TensorArray(tf.float32, size=num_steps) for k in _STEP_METRICS}
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
      values = dict(loss=first["loss_sum"] / tf.maximum(first["tokens"], 1.0),
                    **{k: first[k] for k in _STEP_METRICS if k != "loss"})
      arrays = {k: arrays[k].write(i, values[k]) for k in arrays}
    return {k: a.stack() for k, a in arrays.items()}, input_wait

  return train_loop


def make_run_train_loop(run: run_setup.Run):
  """The train loop of a built run, as nmt-train runs it (nmt-bench and the benchmarks
  time this same loop): its model, optimizer, strategy, moving average and modes."""
  t = run.config.train
  return make_train_loop(run.strategy, make_replica_step(
      run.model, run.optimizer, run.config, run.strategy, run.ema),
      timed=not t.deterministic_ops, accumulate_steps=t.accumulate_steps)


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


def _flush_progress(run: run_setup.Run, progress: summaries.ProgressWindow,
                    step: int) -> None:
  """The progress line and scalars, with the run's learning rate, the share of examples
  over the length limits (dropped or truncated), the fp16 loss scale and what is left of
  train.max_seconds (for the ETA)."""
  lengths = run.length_stats.result()
  loss_scale = None
  if run.config.train.precision == "mixed_float16":
    loss_scale = float(run.optimizer.dynamic_scale.numpy())
  progress.flush(step, run.config.train.steps,
                 learning_rate=float(np.asarray(run.optimizer.learning_rate)),
                 over_long_fraction=((lengths["dropped"] + lengths["truncated"]) /
                                     max(lengths["seen"], 1)),
                 loss_scale=loss_scale,
                 budget_left_s=run_setup.budget_left_s(run.config, run.state))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       strategy: Optional[tf.distribute.Strategy] = None) -> Dict:
  """Trains (resuming from workdir's latest checkpoint) and evaluates; returns a summary:
  this invocation's per-step losses, the final eval metrics, the step reached, and
  `already_complete` when the run had finished before (nothing done, nothing written).

  The chief holds the workdir's lock throughout (checkpoints.workdir_lock): a second
  nmt-train on the same workdir is refused. `config` must be valid (configs/validate.py:
  the entry point checks it once).
  """
  # First: MultiWorkerMirroredStrategy must start TF's runtime itself (no TF op before).
  strategy = strategy or distribute.create_strategy(config)
  with checkpoints.workdir_lock(workdir, lock=distribute.is_chief(strategy)):
    return _train_and_evaluate(config, workdir, strategy)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        strategy: tf.distribute.Strategy) -> Dict:
  run = run_setup.setup(config, workdir, strategy)
  if run.iterator is None:
    step = int(run.state.step.numpy())
    logging.info("The run in %s is complete at step %d: it %s.", workdir, step,
                 run.finished_reason())
    return dict(losses=[], eval=None, samples=[], workdir=workdir, step=step, seconds=0.0,
                interrupted=None, already_complete=True, stopped_by=None)
  config, t = run.config, run.config.train
  train_loop = make_run_train_loop(run)
  evaluator = None
  if run.is_chief:  # Also reads the dev set (holdout: a pass over data.train).
    evaluator = evaluate.Evaluator(config, run.tokenizer, run.model,
                                   num_replicas=run.strategy.num_replicas_in_sync)
  multi_worker = distribute.is_multi_worker(run.strategy)
  if multi_worker:  # The others wait here for the chief, not in the first step.
    distribute.barrier(run.strategy, distribute.BARRIER_TIMEOUT_S)
  writers = {}
  if run.is_chief:
    writers = summaries.create_writers(workdir)
    summaries.write_hparams(writers["train"], config)
  step = int(run.state.step.numpy())
  losses, nonfinite, eval_metrics, stopped_by, interrupted = [], 0, {}, None, None
  clock = run_setup.Clock(run.state)
  progress = summaries.ProgressWindow(writers.get("train"), step)
  profiler = summaries.Profiler(t.profile_steps, run.workdir)
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
        with (datasets.surface_corpus_errors(),
              distribute.peer_failures(run.strategy, step)):
          out, input_wait = train_loop(run.iterator, tf.constant(n),
                                       tf.constant(step, tf.int64))
          out = {k: v.numpy().tolist() for k, v in out.items()}
          step += n
          run.state.step.assign(step)
          clock.tick(n)
          # All workers stop at the same step: any worker's signal, the chief's clock.
          interrupted = agree_to_stop(run.stop, run.state.elapsed_s)
          _fit_schedule(run, clock, step, writers.get("train"), wait_for_chief)
        stopped_by = run.finished_reason()
        losses += out["loss"]
        progress.add(out, input_wait)
        nonfinite = _count_nonfinite(out["finite"], nonfinite, step, t.max_nonfinite_steps)
        if step % t.log_every == 0 or stopped_by or interrupted:
          _flush_progress(run, progress, step)
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
          stopped_by = stopped_by or run.finished_reason()
          if writers:
            summaries.write_time(writers["train"], step, clock.eval_fraction(),
                                 float(run.state.elapsed_s.numpy()))
          progress.reset()
    except datasets.CorpusError:
      _save_before_data_error(run)
      raise
    finally:
      profiler.stop()
  if stopped_by and not interrupted:
    logging.info("Stopping at step %d: the run %s.", step, stopped_by)
  test_metrics = None
  if stopped_by and not interrupted and config.data.test and run.is_chief:
    with _averaged_weights(run):
      test_metrics = evaluate.evaluate_test_set(
          config, run.tokenizer, run.model, step,
          num_replicas=run.strategy.num_replicas_in_sync)
    summaries.write_test(workdir, step, test_metrics)
  return _finish(run, step, progress, interrupted, dict(
      losses=losses, eval=eval_metrics, samples=getattr(evaluator, "samples", []),
      workdir=workdir, stopped_by=stopped_by, eval_time_fraction=clock.eval_fraction(),
      test=test_metrics))


def _fit_schedule(run: run_setup.Run, clock: run_setup.Clock, step: int, writer,
                  wait_for_chief: distribute.ChiefBroadcast) -> None:
  """Fits the cosine's end to train.max_seconds when due (run_setup.fit_cosine_end); the
  condition is the same on every worker, so all take the chief's end together."""
  end = run_setup.fit_cosine_end(run, clock, step)
  if end is None:
    return
  wait_for_chief(run.state.schedule_end_step)
  if writer:
    summaries.write_schedule(writer, step, int(run.state.schedule_end_step.numpy()))


def _averaged_weights(run: run_setup.Run):
  """Evaluation's weights: the moving average (train.ema_decay) swapped in, if any."""
  return run.ema.swapped_in() if run.ema is not None else contextlib.nullcontext()


def _save_before_data_error(run: run_setup.Run) -> None:
  """Saves the steps trained so far before a data error ends the run. Single worker only:
  a multi-worker save needs every worker, and only this one may have hit the error."""
  if distribute.is_multi_worker(run.strategy):
    return
  step = int(run.state.step.numpy())
  checkpoints.save(run.manager, step)
  logging.warning("Checkpoint saved at step %d before stopping on a data error; fix the "
                  "data and rerun to resume.", step)


def _evaluate(run: run_setup.Run, evaluator: Optional[evaluate.Evaluator], step: int,
              writer, wait_for_chief: distribute.ChiefBroadcast) -> Dict:
  """Evaluates on the chief and hands dev BLEU to the run's BestTracker (best checkpoint,
  early stopping); the other workers wait for it (config.distribute.collective_timeout_s),
  then take its count of evaluations without a gain."""
  metrics = {}
  if evaluator:
    with _averaged_weights(run):
      metrics = evaluator(step, writer, stop=lambda: run.stop.signal_name is not None)
  if evaluator and metrics is not None:
    run.best.update(step, metrics["bleu"])
  wait_for_chief(run.state.evals_without_gain)
  return metrics if metrics is not None else {}


def _finish(run: run_setup.Run, step: int, progress: summaries.ProgressWindow,
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
