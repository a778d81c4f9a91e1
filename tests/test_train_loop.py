"""The loop's stopping rules and accumulation: time budget, early stopping, eval share,
gradient accumulation (k batches of B = one batch of kB)."""
import math

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from configs import tiny
from trainer import distribute
from trainer import model as model_lib
from trainer import run_setup
from trainer import train

pytestmark = pytest.mark.slow


def _config(data_dir, steps):
  config = tiny.get_config()
  config.data.tfds_data_dir = data_dir
  config.data.eval_examples = 16
  config.model.units, config.model.embed_dim = 32, 16
  config.eval.beam_size, config.eval.num_probes = 1, 0
  config.eval.probe_sentences = ()
  config.train.xla = "off"
  config.train.update(steps=steps, steps_per_loop=5, log_every=5, checkpoint_every=1000,
                      eval_every=10)
  return config


def _one():
  return tf.distribute.OneDeviceStrategy("/cpu:0")


def _logged(directory, tag: str) -> dict:
  """{step: value} of a scalar in a TensorBoard log directory."""
  events = event_accumulator.EventAccumulator(
      str(directory), size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  return {e.step: tf.make_ndarray(e.tensor_proto).item() for e in events.Tensors(tag)}


def test_time_budget_stops_with_eval_and_checkpoint_then_resumes_when_raised(
    embedded_data_dir, tmp_path):
  config = _config(embedded_data_dir, 20)
  config.train.max_seconds = 1e-3  # Spent by the first loop call, whatever the machine.
  config.data.test = "embedded:cldr_numbers:test[:30]"
  first = train.train_and_evaluate(config, str(tmp_path), _one())
  assert first["step"] == 5 and "max_seconds" in first["stopped_by"]
  # Evaluated and logged at the budget (step 5), not only at eval_every (10).
  assert _logged(tmp_path / "eval", "bleu") == pytest.approx({5: first["eval"]["bleu"]})
  # Five warm-up steps barely train: the dev loss is that of a uniform guess, in nats a token.
  assert first["eval"]["loss"] == pytest.approx(math.log(config.tokenizer.vocab_size), abs=0.05)
  # The test set is scored at the end, all of it (not data.eval_examples), and logged.
  assert first["test"]["examples"] == 30
  assert _logged(tmp_path / "test", "bleu") == pytest.approx({5: first["test"]["bleu"]})
  again = train.train_and_evaluate(config, str(tmp_path), _one())
  assert again["already_complete"] and again["step"] == 5  # Nothing written.
  config.train.max_seconds = 1e6
  raised = train.train_and_evaluate(config, str(tmp_path), _one())
  assert raised["step"] == 20 and len(raised["losses"]) == 15
  assert raised["stopped_by"].startswith("reached config.train.steps=20")
  assert 0 < raised["eval_time_fraction"] < 1


def test_early_stopping_after_patience_evaluations_without_bleu_gain(embedded_data_dir,
                                                                      tmp_path):
  config = _config(embedded_data_dir, 100)
  # No evaluation can gain 1000 BLEU: each one counts against the patience of 2.
  config.train.early_stopping_patience, config.train.early_stopping_min_delta = 2, 1000.0
  summary = train.train_and_evaluate(config, str(tmp_path), _one())
  assert summary["step"] == 20 and "stopped early" in summary["stopped_by"]
  # The first evaluation is the best so far: it is kept as checkpoints/best.
  assert tf.io.gfile.glob(str(tmp_path / "checkpoints" / "best" / "ckpt-10.index"))
  again = train.train_and_evaluate(config, str(tmp_path), _one())
  assert again["already_complete"] and again["step"] == 20


def _batches(seed=0):
  """Two batches of 8 of a reversal task, of different padded lengths."""
  rng = np.random.RandomState(seed)
  out = []
  for length in (6, 9):
    src = rng.randint(4, 40, size=(8, length)).astype(np.int32)
    src[:, -1] = 3
    tgt = np.concatenate([np.full((8, 1), 2, np.int32), src[:, ::-1][:, 1:],
                          np.full((8, 1), 3, np.int32)], 1)
    out.append({"source": src, "target": tgt})
  return out


def _concat(a, b):
  """One batch holding both, each side padded to the longer of the two."""
  out = {}
  for k in a:
    length = max(a[k].shape[1], b[k].shape[1])
    out[k] = np.concatenate([np.pad(x[k], [[0, 0], [0, length - x[k].shape[1]]])
                             for x in (a, b)])
  return out


def _update(config, batches_per_step, steps):
  """Weights after `steps` updates of `batches_per_step` batches each."""
  tf.keras.utils.set_random_seed(0)
  config = distribute.resolve_modes(config, distribute.Devices())
  strategy = _one()
  with strategy.scope():
    model = model_lib.create_model(config, 40, 40)
    optimizer = run_setup.create_optimizer(config, "float32")
    optimizer.build(model.trainable_variables)
  dataset = tf.data.Dataset.from_generator(
      lambda: iter(batches_per_step), output_signature={
          k: tf.TensorSpec([None, None], tf.int32) for k in ("source", "target")})
  loop = train.make_train_loop(strategy, train.make_replica_step(
      model, optimizer, config, strategy), accumulate_steps=config.train.accumulate_steps)
  out, _ = loop(iter(strategy.experimental_distribute_dataset(dataset)), tf.constant(steps))
  return [w.numpy() for w in model.trainable_variables], out


def test_two_accumulated_batches_update_like_one_batch_holding_both():
  config = tiny.get_config()
  config.model.units, config.model.embed_dim = 32, 16
  config.train.xla, config.train.warmup_steps = "off", 0
  a, b = _batches()
  both = _concat(a, b)
  one_weights, one_out = _update(config, [both], 1)
  config.train.accumulate_steps = 2
  acc_weights, acc_out = _update(config, [a, b], 1)
  assert acc_out["examples"].numpy().tolist() == [16.0]
  np.testing.assert_allclose(acc_out["loss"].numpy(), one_out["loss"].numpy(), rtol=1e-5)
  for x, y in zip(one_weights, acc_weights):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  # Not a tautology: one batch of 8 alone moves the weights differently.
  config.train.accumulate_steps = 1
  half_weights, _ = _update(config, [a], 1)
  assert max(np.abs(x - y).max() for x, y in zip(one_weights, half_weights)) > 1e-4


def test_average_last_k_checkpoints_is_the_mean_of_their_weights(embedded_data_dir,
                                                                  tmp_path):
  from trainer import checkpoints
  config = _config(embedded_data_dir, 10)
  config.train.checkpoint_every = 5
  train.train_and_evaluate(config, str(tmp_path), _one())
  weights = {}
  for step in (5, 10):
    loaded = checkpoints.load_for_inference(
        str(tmp_path), str(tmp_path / "checkpoints" / f"ckpt-{step}"))
    weights[step] = [w.numpy() for w in loaded.model.weights]
  averaged = checkpoints.load_for_inference(str(tmp_path), average_last=2)
  assert averaged.step == 10 and averaged.checkpoint.count(",") == 1
  for mean, a, b in zip(averaged.model.weights, weights[5], weights[10]):
    np.testing.assert_allclose(mean.numpy(), (a + b) / 2, rtol=1e-5, atol=1e-7)
  assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(weights[5], weights[10]))


def test_skipped_updates_keep_one_step_count_for_names_data_and_stopping(
    embedded_data_dir, tmp_path, monkeypatch):
  """Three injected non-finite steps: the updates are skipped (optimizer.iterations lags),
  but the step count (batches consumed) names the checkpoints, places the data on resume
  and stops the run. Counting by optimizer.iterations replayed 3 batches, ran 3 steps
  past train.steps and saved checkpoints whose numbers went backwards."""
  from trainer import evaluate
  with tf.init_scope():
    calls = tf.Variable(0, dtype=tf.int64, trainable=False)
  cross_entropy = evaluate.masked_cross_entropy

  def poisoned(logits, labels, smoothing=0.0):
    loss_sum, tokens = cross_entropy(logits, labels, smoothing)
    poison = tf.where(calls.assign_add(1) <= 3, np.nan, 1.0)  # The first 3 steps.
    return loss_sum * poison, tokens

  config = _config(embedded_data_dir, 10)
  config.train.checkpoint_every, config.train.eval_every = 5, 1000
  monkeypatch.setattr(evaluate, "masked_cross_entropy", poisoned)
  first = train.train_and_evaluate(config, str(tmp_path), _one())
  monkeypatch.setattr(evaluate, "masked_cross_entropy", cross_entropy)
  assert first["step"] == 10 and int(np.isnan(first["losses"]).sum()) == 3
  reader = tf.train.load_checkpoint(str(tmp_path / "checkpoints" / "ckpt-10"))
  assert reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 7
  config.train.steps = 15
  second = train.train_and_evaluate(config, str(tmp_path), _one())
  assert second["step"] == 15 and len(second["losses"]) == 5  # Resumed at 10, not 7.
  names = sorted(int(p.name[len("ckpt-"):-len(".index")])
                 for p in (tmp_path / "checkpoints").glob("ckpt-*.index"))
  assert names == [5, 10, 15]


def test_raw_corpus_on_a_cluster_or_resumed_says_to_prepare_it():
  config = tiny.get_config()
  config.data.train = "tsv:/data/big.tsv"
  assert run_setup.raw_input_warning(config, multi_worker=False, start_step=0) is None
  resumed = run_setup.raw_input_warning(config, multi_worker=False, start_step=10**6)
  assert "resuming at step 1000000 replays" in resumed
  assert "nmt-prepare --config=<this config> --output_dir=DIR " \
         "--config.data.train=tsv:/data/big.tsv" in resumed
  assert "every worker reads" in run_setup.raw_input_warning(config, True, 0)
  config.data.train = "prepared:/data/prep"
  assert run_setup.raw_input_warning(config, multi_worker=True, start_step=10**6) is None


def test_sigterm_during_an_evaluation_stops_without_finishing_it(embedded_data_dir, tmp_path,
                                                                 monkeypatch):
  """A preemption notice gives seconds: the run must not decode the rest of the dev set
  before saving (it did: the signal was looked at only after the evaluation)."""
  import os
  import signal
  from trainer import translate as translate_lib
  batches, translate = [], translate_lib.translate

  def translate_then_signal(*args, **kwargs):
    batches.append(len(args[2]))
    if len(batches) == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # Arrives while the first batch decodes.
    return translate(*args, **kwargs)

  config = _config(embedded_data_dir, 20)
  config.data.eval_examples, config.eval.batch_size = 64, 8  # 8 decoding batches.
  monkeypatch.setattr(translate_lib, "translate", translate_then_signal)
  summary = train.train_and_evaluate(config, str(tmp_path), _one())
  assert summary["interrupted"] == "SIGTERM" and summary["step"] == 10
  assert batches == [8], batches  # Abandoned after the batch under way.
  assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-10")


def _ema_tensors(checkpoint: str) -> dict:
  reader = tf.train.load_checkpoint(checkpoint)
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if k.startswith("ema/")}


def test_ema_resumes_exactly_and_is_what_evaluation_and_inference_use(embedded_data_dir,
                                                                     tmp_path):
  """train.ema_decay: a run stopped at step 10 and resumed gives the uninterrupted run's
  losses and moving average, bit for bit; the dev loss it logs is the average's, which
  load_for_inference gives by default (nmt-eval, nmt-translate, nmt-export) and not with
  use_ema=False (--no_ema)."""
  from trainer import checkpoints
  from trainer import evaluate
  config = _config(embedded_data_dir, 20)
  config.train.ema_decay, config.train.batch_size = 0.9, 16
  config.train.checkpoint_every, config.train.eval_every = 10, 20
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"), _one())
  config.train.steps = 10
  first = train.train_and_evaluate(config, str(tmp_path / "parts"), _one())
  config.train.steps = 20
  second = train.train_and_evaluate(config, str(tmp_path / "parts"), _one())
  assert first["losses"] + second["losses"] == whole["losses"]
  averages = [_ema_tensors(str(tmp_path / run / "checkpoints" / "ckpt-20"))
              for run in ("whole", "parts")]
  assert averages[0] and averages[0].keys() == averages[1].keys()
  assert all(np.array_equal(averages[0][k], averages[1][k]) for k in averages[0])
  losses = {}
  for use_ema in (True, False):
    loaded = checkpoints.load_for_inference(str(tmp_path / "whole"), use_ema=use_ema)
    assert loaded.ema == use_ema
    losses[use_ema] = evaluate.eval_loss(evaluate.make_eval_loss_fn(loaded.model),
                                         evaluate.make_eval_dataset(loaded.config,
                                                                    loaded.tokenizer))
  assert whole["eval"]["loss"] == pytest.approx(losses[True], rel=1e-5)
  assert abs(losses[False] - losses[True]) > 1e-3


def test_cosine_fitted_to_the_budget_is_kept_on_resume_and_refitted_when_raised(
    embedded_data_dir, tmp_path, monkeypatch, caplog):
  """train.decay=cosine with train.max_seconds, on a fake clock of 1/8 s a step: fitted
  after 20 timed steps (step 25) to end where the budget runs out; kept when a resume
  only raises train.steps; fitted again when train.max_seconds is raised; the learning
  rate is ~0 at each budget's end."""
  import logging
  from trainer import checkpoints

  clock = run_setup.Clock

  def fake_clock(state):
    return clock(state, now=lambda: 0.125 * float(state.step.numpy()))

  monkeypatch.setattr(run_setup, "Clock", fake_clock)
  # The absl logger's own level: an earlier test's flag parsing may have raised it.
  caplog.set_level(logging.INFO, logger="absl")
  config = _config(embedded_data_dir, 40)
  config.train.update(decay="cosine", warmup_steps=5, max_seconds=7.5, batch_size=16,
                      eval_every=1000)
  workdir = str(tmp_path)

  def fitted(step: int):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(workdir + "/checkpoints"))
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == step
    return (int(reader.get_tensor("schedule_end_step/.ATTRIBUTES/VARIABLE_VALUE")),
            float(reader.get_tensor("schedule_budget_s/.ATTRIBUTES/VARIABLE_VALUE")))

  def learning_rate(end_step: int, steps: int, update: int) -> float:
    schedule = run_setup.WarmupDecay(config.train.learning_rate, 5, "cosine", steps,
                                     tf.Variable(end_step, dtype=tf.int64))
    return float(schedule(update)) / config.train.learning_rate

  # 7.5 s = 60 steps; at step 25, 3.125 s spent: 35 steps left.
  first = train.train_and_evaluate(config, workdir, _one())
  assert first["step"] == 40 and "train.steps=40" in first["stopped_by"]
  assert fitted(40) == (60, 7.5)
  assert "fitted to train.max_seconds=7.5: it ends at update 60" in caplog.text
  assert _logged(tmp_path / "train", "schedule/end_step") == {25: 60}
  caplog.clear()
  config.train.steps = 200  # The same budget: the saved end is kept, not refitted.
  second = train.train_and_evaluate(config, workdir, _one())
  assert second["step"] == 60 and "max_seconds" in second["stopped_by"]
  assert fitted(60) == (60, 7.5) and "schedule fitted" not in caplog.text
  assert learning_rate(60, 200, 59) == pytest.approx(0.0, abs=1e-6)
  config.train.max_seconds = 15.0  # 120 steps; refitted at step 85 (10.625 s spent).
  third = train.train_and_evaluate(config, workdir, _one())
  assert third["step"] == 120 and fitted(120) == (120, 15.0)
  assert "it ends at update 120" in caplog.text
  assert learning_rate(120, 200, 119) == pytest.approx(0.0, abs=1e-6)
  assert learning_rate(120, 200, 100) > 0.01
