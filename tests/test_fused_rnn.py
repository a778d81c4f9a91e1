"""Fused recurrences: the same logits, attention and gradients as the Keras layers."""
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from trainer import evaluate
from trainer import model as model_lib

SOURCE = tf.constant([[5, 6, 7, 3, 0, 0], [4, 9, 9, 9, 9, 3], [7, 3, 0, 0, 0, 0]])
TARGET = tf.constant([[2, 8, 9, 3, 0], [2, 9, 8, 7, 3], [2, 3, 0, 0, 0]])


def _loss_and_grads(model, fused: bool, policy_dtype=tf.float32):
  """Teacher-forced loss (plus a term on the attention weights) and its gradients."""
  model.fused_recurrence = fused
  with tf.GradientTape() as tape:
    logits, weights = model(SOURCE, TARGET[:, :-1], training=True)
    loss, tokens = evaluate.masked_cross_entropy(logits, TARGET[:, 1:])
    loss = loss / tokens + tf.reduce_sum(weights[:, :, 0])
  grads = tape.gradient(loss, model.trainable_variables)
  return logits, weights, [tf.convert_to_tensor(g) for g in grads]


@pytest.mark.parametrize("overrides, jit_attention", [
    ({}, False), ({}, True), ({"bidirectional": True, "encoder_layers": 2}, False)])
def test_fused_recurrence_matches_keras_layers(overrides, jit_attention):
  config = tiny.get_config()
  config.model.update(overrides)
  tf.random.set_seed(0)
  model = model_lib.create_model(config, source_vocab_size=40, target_vocab_size=30)
  model.jit_attention = jit_attention
  fused = _loss_and_grads(model, fused=True)
  keras_steps = _loss_and_grads(model, fused=False)
  np.testing.assert_allclose(fused[0].numpy(), keras_steps[0].numpy(), atol=1e-5)
  np.testing.assert_allclose(fused[1].numpy(), keras_steps[1].numpy(), atol=1e-6)
  for variable, a, b in zip(model.trainable_variables, fused[2], keras_steps[2]):
    # Absolute slack: some gradients (W2's bias) are sums that cancel to ~1e-5.
    tolerance = 1e-4 * np.abs(b.numpy()).max() + 1e-7
    assert np.abs(a.numpy() - b.numpy()).max() < tolerance, variable.path


def test_fused_recurrence_under_mixed_bfloat16():
  """Runs and stays close to the step-by-step result at bfloat16 precision."""
  config = tiny.get_config()
  config.model.bidirectional = True
  tf.random.set_seed(0)
  model = model_lib.create_model(config, 40, 30, policy="mixed_bfloat16")
  fused, keras_steps = _loss_and_grads(model, True), _loss_and_grads(model, False)
  assert fused[0].dtype == tf.float32 and fused[1].dtype == tf.float32
  np.testing.assert_allclose(fused[0].numpy(), keras_steps[0].numpy(), atol=0.05)
  for a, b in zip(fused[2], keras_steps[2]):
    assert a.dtype == b.dtype
    assert np.abs(a.numpy() - b.numpy()).max() <= 0.05 * np.abs(b.numpy()).max() + 1e-3


@pytest.mark.parametrize("jit_attention", [False, True])
def test_fused_recurrence_compiles_with_xla(jit_attention):
  tf.random.set_seed(0)
  model = model_lib.create_model(tiny.get_config(), 40, 30)
  model.jit_attention = jit_attention
  compiled = tf.function(lambda s, t: model(s, t, training=True)[0], jit_compile=True)
  np.testing.assert_allclose(compiled(SOURCE, TARGET[:, :-1]).numpy(),
                             model(SOURCE, TARGET[:, :-1])[0].numpy(), atol=1e-5)
