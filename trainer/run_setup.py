"""A training run, built once: strategy, tokenizer, model, optimizer (and its learning-rate
schedule), the train batches and the checkpoint, restored if any; and its wall clock.

`setup` trusts its config: the entry point validated it (trainer/main.py); here the modes
are resolved for the device present. The loop (trainer/train.py) and the benchmark
(trainer/bench.py) both start from `setup`, so what is timed is what trains.
"""
import contextlib
import dataclasses
import os
import time
from typing import Optional

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

  def finished_reason(self) -> Optional[str]:
    """Why the run has nothing left to do at its step (its steps, its time budget or early
    stopping), saying which key to raise to go on; None while it has."""
    t = self.config.train
    if int(self.state.step.numpy()) >= t.steps:
      return f"reached config.train.steps={t.steps}; raise it to train further"
    if t.max_seconds and float(self.state.elapsed_s.numpy()) >= t.max_seconds:
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
    optimizer = create_optimizer(config, policy)
    optimizer.build(model.trainable_variables)
    state = checkpoints.RunState()
  checkpoint = checkpoints.training_checkpoint(model, optimizer, state)
  manager = tf.train.CheckpointManager(
      checkpoint, os.path.join(run_dir, "checkpoints"),
      max_to_keep=config.train.keep_checkpoints, step_counter=state.step)
  best = evaluate.BestTracker(state, checkpoint, run_dir,
                              config.train.early_stopping_min_delta,
                              config.train.early_stopping_patience)
  # Every worker resumes from the chief's checkpoints: the others' are scratch copies.
  chief_manager = manager if chief else tf.train.CheckpointManager(
      checkpoint, os.path.join(workdir, "checkpoints"), max_to_keep=None)
  checkpoints.restore_latest(chief_manager, state, optimizer, model)
  run = Run(config, run_dir, strategy, tokenizer, model, optimizer, manager, best, state,
            None, chief, pipeline.LengthStats(name="train_length_filter"))
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
  train.max_seconds), and the share of this invocation's time spent evaluating."""

  def __init__(self, state: checkpoints.RunState):
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
