"""Model: shapes, attention normalisation and masking, the decoder keeps its state."""
import numpy as np
import tensorflow as tf

from configs import tiny
from trainer import model as model_lib


def _model(**overrides):
  config = tiny.get_config()
  config.model.update(overrides)
  tf.random.set_seed(0)
  return model_lib.create_model(config, source_vocab_size=40, target_vocab_size=30)


SOURCE = tf.constant([[5, 6, 7, 3, 0, 0], [4, 9, 9, 9, 9, 3]])
TARGET_IN = tf.constant([[2, 8, 9], [2, 9, 0]])


def test_shapes_and_dtypes():
  model = _model()
  logits, weights = model(SOURCE, TARGET_IN)
  assert logits.shape == (2, 3, 30) and logits.dtype == tf.float32
  assert weights.shape == (2, 3, 6) and weights.dtype == tf.float32


def test_attention_sums_to_one_and_is_zero_on_padding():
  _, weights = _model()(SOURCE, TARGET_IN)
  np.testing.assert_allclose(tf.reduce_sum(weights, -1).numpy(), 1.0, atol=1e-6)
  assert np.all(weights.numpy()[0, :, 4:] == 0.0)  # exactly zero, not just small


def test_bidirectional_multilayer_shapes():
  model = _model(bidirectional=True, encoder_layers=2)
  values, keys, mask, state = model.encode(SOURCE)
  units = tiny.get_config().model.units
  assert values.shape == (2, 6, units) and keys.shape == (2, 6, units)
  assert state.shape == (2, units)


def test_padding_does_not_change_encoding():
  """Extra padding on the right changes neither the final state nor the real outputs."""
  model = _model()
  v1, _, _, s1 = model.encode(SOURCE)
  v2, _, _, s2 = model.encode(tf.pad(SOURCE, [[0, 0], [0, 3]]))
  np.testing.assert_allclose(s1.numpy(), s2.numpy(), atol=1e-6)
  np.testing.assert_allclose(v1.numpy()[1], v2.numpy()[1, :6], atol=1e-6)


def test_decoder_cell_uses_previous_state():
  """Unlike the seed tutorial (tensorflow/tensorflow#38248), the state flows between steps."""
  model = _model()
  values, keys, mask, state = model.encode(SOURCE)
  embedded = model.decoder.embedding(tf.constant([8, 8]))
  new_a, _ = model.decoder.step(embedded, state, values, keys, mask)
  new_b, _ = model.decoder.step(embedded, tf.zeros_like(state), values, keys, mask)
  assert np.abs(new_a.numpy() - new_b.numpy()).max() > 1e-3


def test_attention_keys_are_computed_once_per_batch():
  """Teacher forcing must not call W2 per decoder step (the tutorial's main waste)."""
  model = _model()
  calls = []
  original = model.decoder.attention.precompute_keys
  model.decoder.attention.precompute_keys = lambda x: calls.append(1) or original(x)
  model(SOURCE, tf.constant([[2, 8, 9, 9, 9, 9, 9]] * 2))
  assert len(calls) == 1


def test_mixed_bfloat16_keeps_softmax_and_logits_in_float32():
  config = tiny.get_config()
  model = model_lib.create_model(config, 40, 30, policy="mixed_bfloat16")
  logits, weights = model(SOURCE, TARGET_IN)
  assert model.decoder.cell.compute_dtype == "bfloat16"
  assert model.decoder.cell.kernel.dtype == "float32"
  assert logits.dtype == tf.float32 and weights.dtype == tf.float32
