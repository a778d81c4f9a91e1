"""Recurrence modes: fused and keras give the same logits, attention and gradients.

(cudnn is Keras' GRU layer with use_cudnn=True: the keras mode's math as one cuDNN kernel;
it needs a GPU, so `nmt-bench doctor` checks it there.)"""
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from trainer import evaluate
from trainer import fused_rnn
from trainer import model as model_lib

SOURCE = tf.constant([[5, 6, 7, 3, 0, 0], [4, 9, 9, 9, 9, 3], [7, 3, 0, 0, 0, 0]])
TARGET = tf.constant([[2, 8, 9, 3, 0], [2, 9, 8, 7, 3], [2, 3, 0, 0, 0]])


def _models(config, policy="float32"):
  """The same weights in a recurrence=fused and a recurrence=keras model."""
  models = {}
  for recurrence in ("fused", "keras"):
    config.model.recurrence = recurrence
    tf.random.set_seed(0)
    models[recurrence] = model_lib.create_model(config, 40, 30, policy)
  for a, b in zip(models["fused"].weights, models["keras"].weights):
    assert a.path == b.path
    b.assign(a)
  return models["fused"], models["keras"]


def _loss_and_grads(model):
  """Teacher-forced loss (plus a term on the attention weights) and its gradients."""
  with tf.GradientTape() as tape:
    logits, weights = model(SOURCE, TARGET[:, :-1], training=True)
    loss, tokens = evaluate.masked_cross_entropy(logits, TARGET[:, 1:])
    loss = loss / tokens + tf.reduce_sum(weights[:, :, 0])
  grads = tape.gradient(loss, model.trainable_variables)
  return logits, weights, [tf.convert_to_tensor(g) for g in grads]


@pytest.mark.parametrize("overrides, xla", [
    ({}, "off"), ({}, "decoder_step"),
    ({"bidirectional": True, "encoder_layers": 2}, "off"),
    ({"decoder_layers": 2, "tie_embeddings": True, "units": 32, "embed_dim": 16}, "off")])
def test_fused_recurrence_matches_keras_layers(overrides, xla):
  config = tiny.get_config()
  config.model.update(overrides)
  config.train.xla = xla
  fused_model, keras_model = _models(config)
  fused, keras_steps = _loss_and_grads(fused_model), _loss_and_grads(keras_model)
  model = fused_model
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
  fused_model, keras_model = _models(config, "mixed_bfloat16")
  fused, keras_steps = _loss_and_grads(fused_model), _loss_and_grads(keras_model)
  assert fused[0].dtype == tf.float32 and fused[1].dtype == tf.float32
  np.testing.assert_allclose(fused[0].numpy(), keras_steps[0].numpy(), atol=0.05)
  for a, b in zip(fused[2], keras_steps[2]):
    assert a.dtype == b.dtype
    assert np.abs(a.numpy() - b.numpy()).max() <= 0.05 * np.abs(b.numpy()).max() + 1e-3


@pytest.mark.parametrize("xla", ["off", "decoder_step"])
def test_fused_recurrence_compiles_with_xla(xla):
  config = tiny.get_config()
  config.train.xla, config.model.recurrence = xla, "fused"
  tf.random.set_seed(0)
  model = model_lib.create_model(config, 40, 30)
  compiled = tf.function(lambda s, t: model(s, t, training=True)[0], jit_compile=True)
  np.testing.assert_allclose(compiled(SOURCE, TARGET[:, :-1]).numpy(),
                             model(SOURCE, TARGET[:, :-1])[0].numpy(), atol=1e-5)


def _keys_gradient(dtype, jit_attention, steps=64, batch=4, source_len=7, units=16):
  """dL/dkeys of attention_gru_scan, L = the attention on source position 0 summed over
  all steps: every step adds to dL/dkeys with the same sign, as a long target does."""
  rng = np.random.default_rng(0)
  shapes = dict(inputs=[steps, batch, 3 * units], state=[batch, units],
                values=[batch, source_len, units], keys=[batch, source_len, units],
                query_kernel=[units, 4 * units], recurrent_bias=[3 * units],
                context_kernel=[units, 3 * units], v=[units])
  # Values exact in bfloat16, so that every dtype starts from the same numbers.
  args = {name: tf.cast(tf.cast(rng.normal(0, 0.4, shape), tf.bfloat16), dtype)
          for name, shape in shapes.items()}
  mask = tf.sequence_mask([source_len, source_len - 2, 3, source_len], source_len)
  with tf.GradientTape() as tape:
    tape.watch(args["keys"])
    _, weights = fused_rnn.attention_gru_scan(mask=mask, jit_attention=jit_attention,
                                              **args)
    loss = tf.reduce_sum(weights[:, :, 0])
  return tf.cast(tape.gradient(loss, args["keys"]), tf.float32).numpy()


@pytest.mark.parametrize("jit_attention", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [(tf.bfloat16, 5e-3), (tf.float16, 5e-4)])
def test_keys_gradient_over_64_steps_is_summed_in_float32(dtype, tolerance, jit_attention):
  # Relative L2 error against float32 (jit_attention off/on): with the sum over steps
  # carried in the compute dtype, bf16 0.0120/0.0116 and fp16 0.00101/0.00105; carried
  # in float32, bf16 0.0019/0.0023 and fp16 0.00021/0.00021.
  expected = _keys_gradient(tf.float32, jit_attention)
  got = _keys_gradient(dtype, jit_attention)
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < tolerance
