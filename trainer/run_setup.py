"""A training run, built once: strategy, tokenizer, model, optimizer (and its learning-rate
schedule), the train batches and the checkpoint, restored if any; and its wall clock.

`setup` trusts its config: the entry point validated it (trainer/main.py); here the modes
are resolved for the device present. The loop (trainer/train.py) and the benchmark
(trainer/bench.py) both start from `setup`, so what is timed is what trains.
"""
import collections
import contextlib
import dataclasses
import os
import time
from typing import Callable, Optional

from absl import logging
import keras
import ml_collections
import numpy as np
import tensorflow as tf

from input_pipeline import datasets
from input_pipeline import pipeline
from input_pipeline import tokenizer as tokenizer_lib
from trainer import checkpoints
from trainer import distribute
from trainer import evaluate
from trainer import model as model_lib


class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup to `peak`, then constant, rsqrt or cosine decay (to 0 at `total`, or at
  min(`end_step`, `total`) when that variable is > 0: the end fitted to train.max_seconds)."""

  def __init__(self, peak: float, warmup: int, decay: str, total: int,
               end_step: Optional[tf.Variable] = None):
    self.peak, self.warmup, self.decay, self.total = peak, max(warmup, 1), decay, total
    self.end_step = end_step

  def __call__(self, step):
    step = tf.cast(step, tf.float32) + 1.0
    warm = tf.minimum(1.0, step / self.warmup)
    if self.decay == "rsqrt":
      after = tf.math.rsqrt(tf.maximum(step, self.warmup) / self.warmup)
    elif self.decay == "cosine":
      total = tf.constant(float(self.total))
      if self.end_step is not None:
        fitted = tf.cast(self.end_step, tf.float32)
        total = tf.where(fitted > 0, tf.minimum(fitted, total), total)
      progress = tf.clip_by_value(
          (step - self.warmup) / tf.maximum(total - self.warmup, 1.0), 0.0, 1.0)
      after = 0.5 * (1.0 + tf.cos(np.pi * progress))
    else:
      after = 1.0
    return self.peak * warm * after

  def get_config(self):
    return dict(peak=self.peak, warmup=self.warmup, decay=self.decay, total=self.total)


def create_optimizer(config: ml_collections.ConfigDict, policy: str,
                     end_step: Optional[tf.Variable] = None):
  """Adam on the WarmupDecay schedule (fp16: in a LossScaleOptimizer). `end_step`: the
  variable holding the cosine's fitted end (RunState.schedule_end_step), if any."""
  t = config.train
  schedule = WarmupDecay(t.learning_rate, t.warmup_steps, t.decay, t.steps, end_step)
  optimizer = keras.optimizers.Adam(learning_rate=schedule)
  if policy == "mixed_float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


class WeightAverage:
  """train.ema_decay's exponential moving average of the trainable weights, in float32.

  Updated after every applied update (never after a skipped non-finite step) with
  decay_k = min(ema_decay, (1 + k) / (10 + k)), k = updates applied so far
  (optimizer.iterations; TF's ExponentialMovingAverage(num_updates) warm-up), so a short
  run's average is not dominated by the initial weights. Under a strategy each replica
  updates its own copy from its (already all-reduced, identical) weights: no collective.
  Hand-written rather than Keras' Adam(use_ema=True): Keras keeps its averages among the
  optimizer's positional slot variables (a run resumed with EMA switched on would load
  Adam's moments into them), has no warm-up, and swaps weights only in place for good.
  Cost: one more copy of the weights and one elementwise update per step.
  """

  def __init__(self, model: model_lib.Seq2Seq, decay: float):
    """Call under the strategy's scope: the averages are mirrored like the weights."""
    self.decay = decay
    self.paths = [v.path for v in model.trainable_variables]
    self.weights = [v.value for v in model.trainable_variables]
    self.averages = [tf.Variable(lambda w=w: tf.cast(tf.identity(w), tf.float32),
                                 trainable=False, dtype=tf.float32)
                     for w in self.weights]

  def variables(self) -> dict:
    """The averages keyed like checkpoints.model_variables: what checkpoints save as `ema`."""
    return dict(zip(self.paths, self.averages))

  def update(self, strategy: tf.distribute.Strategy, num_updates) -> None:
    """Moves the averages towards the weights; cross-replica context (a merge_call)."""

    def move(average, weight, k):
      k = tf.cast(k, tf.float32)
      decay = tf.minimum(tf.constant(self.decay, tf.float32), (1.0 + k) / (10.0 + k))
      return average.assign_sub((1.0 - decay) * (average - tf.cast(weight, tf.float32)))

    for average, weight in zip(self.averages, self.weights):
      strategy.extended.update(average, move, args=(weight, num_updates), group=False)

  def reset(self) -> None:
    """Starts the averages at the current weights (a checkpoint saved without them)."""
    for average, weight in zip(self.averages, self.weights):
      average.assign(tf.cast(weight.read_value(), tf.float32))

  @contextlib.contextmanager
  def swapped_in(self):
    """The averages in the model's weights for the block (evaluation), the training
    weights back after it, bit for bit: training goes on as if nothing happened."""
    self._swap()
    try:
      yield
    finally:
      self._swap()

  def _swap(self) -> None:
    for average, weight in zip(self.averages, self.weights):
      raw = tf.identity(weight.read_value())
      weight.assign(tf.cast(average.read_value(), weight.dtype))
      average.assign(tf.cast(raw, tf.float32))


def budget_left_s(config: ml_collections.ConfigDict,
                  state: checkpoints.RunState) -> Optional[float]:
  """Seconds left of train.max_seconds (RunState.elapsed_s counts all invocations; never
  below 0); None without a budget."""
  if not config.train.max_seconds:
    return None
  return max(config.train.max_seconds - float(state.elapsed_s.numpy()), 0.0)


@dataclasses.dataclass
class Run:
  """Everything one training run holds: built once by `setup`, used by the loop.
  `config` is the resolved one (no 'auto' modes); `workdir` is this worker's run dir;
  `iterator` is None when the run has nothing left to do."""
  config: ml_collections.ConfigDict
  workdir: str
  strategy: tf.distribute.Strategy
  tokenizer: tokenizer_lib.Tokenizer
  model: model_lib.Seq2Seq
  optimizer: keras.optimizers.Optimizer
  manager: tf.train.CheckpointManager
  best: evaluate.BestTracker
  state: checkpoints.RunState
  iterator: object
  is_chief: bool
  length_stats: pipeline.LengthStats
  stop: distribute.StopFlag = dataclasses.field(default_factory=distribute.StopFlag)
  ema: Optional[WeightAverage] = None  # train.ema_decay > 0.

  def finished_reason(self) -> Optional[str]:
    """Why the run has nothing left to do at its step (its steps, its time budget or early
    stopping), saying which key to raise to go on; None while it has."""
    t = self.config.train
    if int(self.state.step.numpy()) >= t.steps:
      return f"reached config.train.steps={t.steps}; raise it to train further"
    if budget_left_s(self.config, self.state) == 0.0:
      return (f"spent its wall-clock budget config.train.max_seconds={t.max_seconds}; raise "
              "it to train further")
    return self.best.stop_reason()


def setup(config: ml_collections.ConfigDict, workdir: str,
          strategy: Optional[tf.distribute.Strategy] = None) -> Run:
  """Resolves the (validated) config's modes for this device, and builds the strategy,
  tokenizer, model, optimizer, dataset iterator and checkpoint (restored if any).
  A finished run (step >= train.steps) gets no iterator and writes nothing."""
  # First: MultiWorkerMirroredStrategy must start TF's runtime itself (no TF op before).
  strategy = strategy or distribute.create_strategy(config)
  config = distribute.resolve_modes(config, num_replicas=strategy.num_replicas_in_sync)
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
    state = checkpoints.RunState()
    optimizer = create_optimizer(config, policy, state.schedule_end_step)
    optimizer.build(model.trainable_variables)
    ema = WeightAverage(model, config.train.ema_decay) if config.train.ema_decay else None
  checkpoint = checkpoints.training_checkpoint(model, optimizer, state, ema)
  manager = tf.train.CheckpointManager(
      checkpoint, os.path.join(run_dir, "checkpoints"),
      max_to_keep=config.train.keep_checkpoints, step_counter=state.step)
  best = evaluate.BestTracker(state, checkpoint, run_dir,
                              config.train.early_stopping_min_delta,
                              config.train.early_stopping_patience)
  # Every worker resumes from the chief's checkpoints: the others' are scratch copies.
  chief_manager = manager if chief else tf.train.CheckpointManager(
      checkpoint, os.path.join(workdir, "checkpoints"), max_to_keep=None)
  checkpoints.restore_latest(chief_manager, state, optimizer, model, ema)
  if config.train.decay != "cosine" or not config.train.max_seconds:
    state.schedule_end_step.assign(0)  # No budget to fit: the cosine ends at train.steps.
    state.schedule_budget_s.assign(0.0)
  run = Run(config, run_dir, strategy, tokenizer, model, optimizer, manager, best, state,
            None, chief, pipeline.LengthStats(name="train_length_filter"), ema=ema)
  step = int(state.step.numpy())
  if not run.finished_reason():
    warning = raw_input_warning(config, distribute.is_multi_worker(strategy), step)
    if warning and chief:
      logging.warning("%s", warning)
    run.iterator = iter(make_train_dataset(
        config, tokenizer, strategy, step * config.train.accumulate_steps, run.length_stats))
    if chief:  # After a successful restore, so it always describes the checkpoints.
      checkpoints.save_config(config, run_dir)
  return run


def make_train_dataset(config, tokenizer, strategy, start_step: int,
                       length_stats: pipeline.LengthStats):
  """Per-replica training batches, fast-forwarded past the `start_step` already trained on.

  Distributed iterators cannot be checkpointed, so exact resume is a property of the
  pipeline (datasets.make_dataset's start_step): a prepared: source jumps to the step in
  constant time; a raw one replays the deterministic pipeline up to it.
  """
  if start_step and not config.data.deterministic:
    logging.warning("data.deterministic=False: the resumed data order will differ.")

  def dataset_fn(ctx):
    return datasets.make_dataset(config, tokenizer, "train", input_context=ctx,
                                 start_step=start_step, length_stats=length_stats)

  return strategy.distribute_datasets_from_function(dataset_fn)


def raw_input_warning(config: ml_collections.ConfigDict, multi_worker: bool,
                      start_step: int) -> Optional[str]:
  """What a raw data.train costs where prepared data would not, or None: a resume replays
  the input pipeline up to the step (O(steps) per restart: hours at step 10^6), and on
  several workers each one reads (and decompresses) every file it shares with others to
  keep its 1/N of it."""
  if datasets.parse_source(config.data.train).kind == "prepared":
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
          ", then train with --config.data.train=prepared:DIR (docs/prepared.md).")


class Clock:
  """Wall-clock seconds of the run, kept in RunState.elapsed_s across invocations (for
  train.max_seconds), the share of this invocation's time spent evaluating, and its
  seconds per train step after its first loop call (which compiles): what fit_cosine_end
  measures. `now` is time.time; tests inject a fake clock."""

  def __init__(self, state: checkpoints.RunState, now: Callable[[], float] = time.time):
    self.state, self.now = state, now
    self.start = self.last = now()
    self.eval_s, self.evals = 0.0, 0
    self.train_steps, self.calls = 0, 0
    # (seconds, steps) of each timed loop call, the last _TIMED_CALLS of them.
    self.calls_timed: collections.deque = collections.deque(maxlen=_TIMED_CALLS)

  def tick(self, steps: int = 0) -> None:
    """Adds the seconds since the last tick to elapsed_s; `steps`: the loop call's steps."""
    now = self.now()
    if steps:
      self.calls += 1
      if self.calls > 1:
        self.calls_timed.append((now - self.last, steps))
        self.train_steps += steps
    self.state.elapsed_s.assign_add(now - self.last)
    self.last = now

  @contextlib.contextmanager
  def evaluating(self):
    started = self.now()
    try:
      yield
    finally:
      self.eval_s += self.now() - started
      self.evals += 1
      self.tick()

  def eval_fraction(self) -> float:
    return self.eval_s / max(self.now() - self.start, 1e-9)

  def step_seconds(self) -> float:
    """Seconds per step over the timed loop calls (their seconds over their steps), leaving
    out the calls whose seconds per step are over twice the median's. Not the plain mean:
    a call that meets a new bucket shape compiles it (seconds, with XLA), and a few of those
    in the first hundred steps made the mean 37% above the steady step time (0.212 s
    against 0.155, deu-eng at warm-up), ending a 2-hour cosine after 73% of its budget. Not
    the median either: steps on long buckets cost more, so step times are skewed and the
    median (0.144 there) is below the mean. Weighted by steps: the call before a log, eval
    or checkpoint step is cut short (train.steps_per_loop), and its fixed per-call cost
    spread over fewer steps would count as much as a full call's."""
    seconds, steps = (np.asarray(column, float) for column in zip(*self.calls_timed))
    per_step = seconds / steps
    kept = per_step <= 2 * np.median(per_step)
    return float(seconds[kept].sum() / steps[kept].sum())


# Train steps timed (after the first loop call) before the cosine's end is fitted.
FIT_AFTER_STEPS = 20
# Loop calls Clock.step_seconds times (bounded memory at step 10^6).
_TIMED_CALLS = 1000


def fit_cosine_end(run: Run, clock: Clock, step: int) -> Optional[int]:
  """train.decay=cosine with train.max_seconds: the update count at which the budget runs
  out, or None when nothing is to be fitted now (docs/training.md, "Cosine fitted to the
  budget").

  Once per budget: when RunState.schedule_budget_s differs from train.max_seconds (never
  fitted, or the budget was changed on resume), at the first call with step >=
  train.warmup_steps and FIT_AFTER_STEPS timed steps. end = updates so far + remaining
  budget / (seconds per step (Clock.step_seconds: over loop calls, outliers left out) +
  seconds per evaluation / train.eval_every) (the schedule ends at train.steps if that
  comes first); an evaluation counts only once this invocation has timed one. The end and
  its budget go into RunState (checkpointed): a resumed run keeps them (exact resume).
  """
  t, state = run.config.train, run.state
  if (t.decay != "cosine" or not t.max_seconds
      or float(state.schedule_budget_s.numpy()) == t.max_seconds
      or step < t.warmup_steps or clock.train_steps < FIT_AFTER_STEPS):
    return None
  step_s = clock.step_seconds()
  eval_s = clock.eval_s / clock.evals if clock.evals else 0.0
  remaining_s = budget_left_s(run.config, state)
  updates = int(run.optimizer.iterations.numpy())
  end = updates + int(remaining_s / max(step_s + eval_s / t.eval_every, 1e-9))
  state.schedule_end_step.assign(max(end, 1))
  state.schedule_budget_s.assign(t.max_seconds)
  logging.info("Cosine schedule fitted to train.max_seconds=%g: it ends at update %d "
               "(%.1f s left at step %d; %.4f s/step over %d steps' loop calls, outliers "
               "left out; %.1f s per evaluation every %d steps).", t.max_seconds, end,
               remaining_s, step, step_s, clock.train_steps, eval_s, t.eval_every)
  return end
