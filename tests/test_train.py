"""Train step: distributed gradients, XLA modes, precisions, non-finite handling."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from trainer import distribute
from trainer import model as model_lib
from trainer import run_setup
from trainer import train

VOCAB = 40


class _Vocab:
  source_vocab_size = VOCAB
  target_vocab_size = VOCAB


def _batches(per_replica_batch: int, seed: int = 0):
  """A copy task with reversal and padding: deterministic synthetic batches."""
  rng = np.random.RandomState(seed)
  src = rng.randint(4, VOCAB, size=(512, 10)).astype(np.int32)
  lengths = rng.randint(3, 10, size=512)
  src[np.arange(10)[None, :] >= lengths[:, None]] = 0
  src[np.arange(512), lengths - 1] = 3
  tgt = np.zeros((512, 11), np.int32)
  tgt[:, 0] = 2
  for i, n in enumerate(lengths):
    tgt[i, 1:n] = src[i, :n - 1][::-1]
    tgt[i, n] = 3
  ds = tf.data.Dataset.from_tensor_slices({"source": src, "target": tgt})
  ds = ds.repeat().batch(per_replica_batch, drop_remainder=True)
  # Every other batch is padded 3 columns longer: lengths vary as with bucketing, so the
  # compiled steps see symbolic [B, None] shapes (XLA must cope with that).
  return ds.enumerate().map(lambda i, b: {
      k: tf.pad(v, [[0, 0], [0, 3 * tf.cast(i % 2, tf.int32)]]) for k, v in b.items()})


def _setup(strategy, config, policy="float32"):
  keras.utils.set_random_seed(0)
  config.train.precision = policy
  config = distribute.resolve_modes(config, distribute.Devices())  # A CPU, whatever runs.
  with strategy.scope():
    model = model_lib.create_model(config, VOCAB, VOCAB, policy)
    optimizer = run_setup.create_optimizer(config, policy)
    optimizer.build(model.trainable_variables)
  return model, optimizer


def _one(): return tf.distribute.OneDeviceStrategy("/cpu:0")
def _two(): return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def test_two_replicas_give_the_same_gradients_as_one():
  config = tiny.get_config()
  config.train.clip_norm = 0.0
  batch = next(iter(_batches(32)))
  grads = {}
  for name, strategy in (("one", _one()), ("two", _two())):
    model, _ = _setup(strategy, config)
    fn = train.make_gradient_fn(model, config, lambda: tf.constant(1.0))
    # Split the same global batch across replicas; per-replica loss sums use the global
    # token count, so their all-reduced gradient equals the single-replica one.
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(batch).unbatch().batch(32))
    result = strategy.run(tf.function(fn), args=(next(iter(dataset)),))
    grads[name] = [g.numpy() for g in strategy.experimental_local_results(result[0])[0]]
  assert len(grads["one"]) == len(grads["two"])
  for a, b in zip(grads["one"], grads["two"]):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_two_replicas_train_like_one_on_the_same_global_batches(policy):
  """The update too: the optimizer applies the global gradient once. (Keras' own
  all-reduce is switched off; if it ran on top of ours, or grads were not rescaled when
  it runs, two replicas would take steps of another size and the losses would part.
  SGD, whose step is proportional to the gradient: Adam's is not, and would hide that.)"""
  config = tiny.get_config()
  losses = {}
  for name, strategy in (("one", _one()), ("two", _two())):
    model, _ = _setup(strategy, config, policy)
    with strategy.scope():
      optimizer = keras.optimizers.SGD(0.5)
      if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
      optimizer.build(model.trainable_variables)
    # The same global batches, split in halves across the two replicas.
    iterator = iter(strategy.experimental_distribute_dataset(_batches(32)))
    loop = train.make_train_loop(strategy, train.make_replica_step(
        model, optimizer, config, strategy))
    losses[name] = loop(iterator, tf.constant(4))[0]["loss"].numpy()
  assert losses["one"][3] < losses["one"][0]
  np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-4)


def _losses(strategy, config, steps, policy="float32"):
  model, optimizer = _setup(strategy, config, policy)
  per_replica = 32 // strategy.num_replicas_in_sync
  iterator = iter(strategy.distribute_datasets_from_function(
      lambda ctx: _batches(per_replica, seed=ctx.input_pipeline_id)))
  loop = train.make_train_loop(strategy, train.make_replica_step(
      model, optimizer, config, strategy))
  out, _ = loop(iterator, tf.constant(steps))
  return out["loss"].numpy(), model, optimizer


@pytest.mark.parametrize("xla, recurrence", [
    ("decoder_step", "fused"), ("train_step", "fused"),
    # What a GPU user gets with recurrence=keras: the Keras GRU (never cuDNN) compiled
    # whole by XLA; on a GPU, cudnn under train_step is refused instead (test_modes.py).
    ("train_step", "keras")])
def test_xla_modes_and_recurrences_train_like_no_xla_fused(xla, recurrence):
  config = tiny.get_config()
  config.train.xla, config.model.recurrence = "off", "fused"
  reference, _, _ = _losses(_one(), config, 5)
  config.train.xla, config.model.recurrence = xla, recurrence
  compiled, _, _ = _losses(_one(), config, 5)
  np.testing.assert_allclose(compiled, reference, rtol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains(policy):
  config = tiny.get_config()
  config.train.learning_rate = 1e-2
  losses, model, optimizer = _losses(_one(), config, 40, policy)
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.9 * losses[:5].mean()
  if policy == "mixed_float16":
    assert float(optimizer.dynamic_scale.numpy()) > 1.0


def test_non_finite_steps_are_skipped_then_stop_the_run():
  config = tiny.get_config()
  model, optimizer = _setup(_one(), config)
  bias = model.decoder.projection.bias
  bias.assign(np.full(bias.shape, np.nan, np.float32))
  kernel_before = model.decoder.cell.kernel.numpy().copy()
  loop = train.make_train_loop(_one(), train.make_replica_step(
      model, optimizer, config, _one()))
  out, _ = loop(iter(_batches(32)), tf.constant(3))
  assert out["finite"].numpy().tolist() == [0.0, 0.0, 0.0]
  np.testing.assert_array_equal(model.decoder.cell.kernel.numpy(), kernel_before)
  assert train._count_nonfinite([1.0, 0.0, 0.0], 0, step=3, limit=3) == 2
  assert train._count_nonfinite([1.0], 2, step=4, limit=3) == 0
  with pytest.raises(FloatingPointError, match="max_nonfinite_steps=3"):
    train._count_nonfinite([0.0], 2, step=4, limit=3)


def test_an_infinite_loss_with_finite_clipped_gradients_is_skipped():
  """A huge learning rate: the loss overflows while clipping keeps the gradients finite;
  such steps must be skipped and counted, not trained on silently."""
  config = tiny.get_config()
  config.train.learning_rate, config.train.warmup_steps = 1e35, 0
  model, optimizer = _setup(_one(), config)
  loop = train.make_train_loop(_one(), train.make_replica_step(
      model, optimizer, config, _one()))
  out, _ = loop(iter(_batches(32)), tf.constant(4))
  finite, losses = out["finite"].numpy(), out["loss"].numpy()
  assert finite[0] == 1.0 and np.isfinite(losses[0])  # The first update is what blows up.
  assert np.all(finite[~np.isfinite(losses)] == 0.0) and not np.all(np.isfinite(losses))
  kernel = model.decoder.cell.kernel.numpy().copy()
  loop(iter(_batches(32, seed=1)), tf.constant(2))
  np.testing.assert_array_equal(model.decoder.cell.kernel.numpy(), kernel)


def _dropout_gradients(strategy, config, step):
  """The train step's global gradients when every replica gets the same 16 pairs."""
  config = distribute.resolve_modes(config, distribute.Devices())  # As the model's.
  model, _ = _setup(strategy, config)
  fn = train.make_gradient_fn(model, config, lambda: tf.constant(1.0))
  batch = next(iter(_batches(16)))
  dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(
      batch).repeat(strategy.num_replicas_in_sync).unbatch().batch(16))
  result = strategy.run(tf.function(fn), args=(next(iter(dataset)),
                                               tf.constant(step, tf.int64)))
  return [g.numpy() for g in strategy.experimental_local_results(result[0])[0]]


def test_dropout_masks_differ_between_replicas_and_steps_and_repeat_exactly():
  """Keras Dropout's mirrored random state gave every replica the same masks. Then two
  replicas fed the same batch would give exactly one replica's gradient; with a mask per
  (seed, step, replica) they do not, and a rerun (a resume) gives the same again."""
  config = tiny.get_config()
  config.model.dropout, config.train.clip_norm = 0.3, 0.0
  one = _dropout_gradients(_one(), config, step=7)
  two = _dropout_gradients(_two(), config, step=7)
  assert max(np.abs(a - b).max() for a, b in zip(one, two)) > 1e-4
  again = _dropout_gradients(_two(), config, step=7)
  assert all(np.array_equal(a, b) for a, b in zip(two, again))
  later = _dropout_gradients(_two(), config, step=8)
  assert max(np.abs(a - b).max() for a, b in zip(two, later)) > 1e-4
  config.model.dropout = 0.0  # The comparison itself holds: without dropout, equal.
  np.testing.assert_allclose(np.concatenate([g.ravel() for g in _dropout_gradients(
      _one(), config, 7)]), np.concatenate([g.ravel() for g in _dropout_gradients(
          _two(), config, 7)]), atol=1e-6)


def test_threefry_masks_in_the_compiled_step_differ_between_replicas_and_repeat():
  """The same property with the step compiled by XLA on a CPU, where dropout_rng=auto
  draws the masks with ThreeFry instead of Philox (a resume redraws them exactly)."""
  config = tiny.get_config()
  config.model.dropout, config.train.clip_norm, config.train.xla = 0.3, 0.0, "train_step"
  assert distribute.resolve_modes(config, distribute.Devices()).model.dropout_rng == (
      "threefry")
  one = _dropout_gradients(_one(), config, step=7)
  two = _dropout_gradients(_two(), config, step=7)
  assert max(np.abs(a - b).max() for a, b in zip(one, two)) > 1e-4
  again = _dropout_gradients(_two(), config, step=7)
  assert all(np.array_equal(a, b) for a, b in zip(two, again))


def test_threefry_masks_outside_xla_are_refused_before_the_step():
  """A model resolved for the compiled step (threefry on a CPU) with a grad fn that is not
  compiled would fail inside TensorFlow's kernel; it fails naming the keys instead."""
  config = tiny.get_config()
  config.model.dropout, config.train.xla = 0.1, "train_step"
  model, _ = _setup(_one(), config)
  assert model.encoder.dropout_alg == "threefry"  # dropout_rng auto, on a CPU.
  config.train.xla = "off"
  with pytest.raises(ValueError, match="dropout_rng=threefry.*train.xla='off'"):
    train.make_grad_fn(model, config)


def test_training_with_dropout_needs_a_seed():
  config = tiny.get_config()
  config.model.dropout = 0.1
  model, _ = _setup(_one(), config)
  batch = next(iter(_batches(4)))
  with pytest.raises(ValueError, match="dropout_seed"):
    model(batch["source"], batch["target"][:, :-1], training=True)
  # Inference needs none.
  model(batch["source"], batch["target"][:, :-1], training=False)


def test_weight_average_is_the_warmed_up_ema_of_the_updates_on_two_replicas():
  """train.ema_decay: after each applied update a <- a - (1 - d_k)(a - w_k), d_k =
  min(decay, (1+k)/(10+k)), identical on both replicas; a skipped (non-finite) step leaves
  it alone; swapping it in for evaluation and back restores the weights bit for bit."""
  config = tiny.get_config()  # Sizes as the other 2-replica tests: TensorFlow's CPU
  # collectives in one process can mix up instances of another strategy's other shapes.
  config.train.warmup_steps, decay = 0, 0.25
  strategy = _two()
  model, optimizer = _setup(strategy, config)
  with strategy.scope():
    ema = run_setup.WeightAverage(model, decay)
  loop = train.make_train_loop(strategy, train.make_replica_step(
      model, optimizer, config, strategy, ema))
  iterator = iter(strategy.experimental_distribute_dataset(_batches(32)))
  expected = [w.numpy() for w in model.trainable_variables]
  for k in (1, 2, 3):
    loop(iterator, tf.constant(1))
    d = min(decay, (1 + k) / (10 + k))
    expected = [a - (1 - d) * (a - w.numpy())
                for a, w in zip(expected, model.trainable_variables)]
  for average, want in zip(ema.averages, expected):
    first, second = strategy.experimental_local_results(average)
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    np.testing.assert_allclose(first.numpy(), want, rtol=1e-5, atol=1e-7)
  raw = [w.numpy() for w in model.trainable_variables]
  assert max(np.abs(a - w).max() for a, w in zip(expected, raw)) > 1e-4
  with ema.swapped_in():
    for w, want in zip(model.trainable_variables, expected):
      np.testing.assert_allclose(w.numpy(), want, rtol=1e-5, atol=1e-7)
  assert all(np.array_equal(w.numpy(), r) for w, r in zip(model.trainable_variables, raw))
  before = [a.numpy() for a in ema.averages]
  bias = model.decoder.projection.bias
  bias.assign(np.full(bias.shape, np.nan, np.float32))
  out, _ = loop(iterator, tf.constant(2))
  assert out["finite"].numpy().tolist() == [0.0, 0.0]
  assert all(np.array_equal(a.numpy(), b) for a, b in zip(ema.averages, before))


def test_cosine_fit_times_the_steady_steps_not_the_compiles():
  """Loop calls of 10 steps at 0.15 s a step on average (0.12, 0.12, 0.21: long buckets
  cost more), 3 timed ones also compiling a new bucket shape (+3 s): the mean of all calls
  would say 0.21 s/step and end a 1000-s cosine at 71% of its budget, their median 0.12 at
  125%; the fit takes 0.15."""
  import types
  from trainer import checkpoints
  state = checkpoints.RunState()
  now = [0.0]
  clock = run_setup.Clock(state, now=lambda: now[0])
  config = tiny.get_config()
  config.train.update(decay="cosine", max_seconds=1000.0, warmup_steps=100, eval_every=10**6)
  run = types.SimpleNamespace(config=config, state=state,
                              optimizer=types.SimpleNamespace(iterations=tf.Variable(0)))
  for call in range(16):  # Call 0 is not timed (the first call compiles).
    now[0] += (1.2, 1.2, 2.1)[call % 3] + (3.0 if call in (0, 4, 7, 11) else 0.0)
    clock.tick(10)
    run.optimizer.iterations.assign_add(10)
  assert clock.step_seconds() == pytest.approx(0.15)
  end = run_setup.fit_cosine_end(run, clock, 160)
  left = 1000.0 - float(state.elapsed_s.numpy())
  assert end == 160 + int(left / clock.step_seconds())
  assert 0.98 * 1000 / 0.15 < end < 1000 / 0.15
  assert float(state.schedule_budget_s.numpy()) == 1000.0
  assert run_setup.fit_cosine_end(run, clock, 170) is None  # Once per budget.
  # Calls cut short before a log/eval/checkpoint step (1 step, 0.2 s: the fixed per-call
  # cost on one step) count by their steps: 3 of 123, not 3 calls of 15 (0.16 s/step).
  for _ in range(3):
    now[0] += 0.2
    clock.tick(1)
  assert clock.step_seconds() == pytest.approx((18.0 + 0.6) / 123)


def test_cosine_schedule_ends_at_the_fitted_end_step_capped_by_train_steps():
  end = tf.Variable(0, dtype=tf.int64)
  schedule = run_setup.WarmupDecay(1.0, 10, "cosine", 100, end)
  assert float(schedule(99)) == pytest.approx(0.0, abs=1e-6)  # Not fitted: train.steps.
  assert float(schedule(54)) == pytest.approx(0.5, abs=1e-6)
  end.assign(50)
  assert float(schedule(29)) == pytest.approx(0.5, abs=1e-6)
  assert float(schedule(49)) == pytest.approx(0.0, abs=1e-6)
  end.assign(1000)  # A budget longer than train.steps: train.steps ends it.
  assert float(schedule(54)) == pytest.approx(0.5, abs=1e-6)
