"""Model: shapes, attention normalisation and masking, the decoder keeps its state, stacked
decoder layers and tied embeddings."""
import keras
import numpy as np
import pytest
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


# model.decoder_layers and model.tie_embeddings (issue 24). Small sizes keep these fast.
SMALL = dict(units=32, embed_dim=16)
TARGET = tf.constant([[2, 8, 9, 3, 0], [2, 9, 8, 7, 3]])
# Variables of configs/tiny.py's model before these options existed (paths and shapes):
# what its checkpoints hold, so they must still load.
TINY_VARIABLES = [
    ("seq2seq/encoder/embedding/embeddings", (40, 64)),
    ("seq2seq/encoder/gru_0/gru_cell/kernel", (64, 384)),
    ("seq2seq/encoder/gru_0/gru_cell/recurrent_kernel", (128, 384)),
    ("seq2seq/encoder/gru_0/gru_cell/bias", (2, 384)),
    ("seq2seq/embedding/embeddings", (30, 64)), ("attention/V", (128,)),
    ("seq2seq/attention/W1/kernel", (128, 128)), ("seq2seq/W2/kernel", (128, 128)),
    ("seq2seq/W2/bias", (128,)), ("seq2seq/gru_cell/kernel", (192, 384)),
    ("seq2seq/gru_cell/recurrent_kernel", (128, 384)), ("seq2seq/gru_cell/bias", (2, 384)),
    ("seq2seq/projection/kernel", (128, 30)), ("seq2seq/projection/bias", (30,))]


def _variables(model):
  return [(v.path, tuple(v.shape)) for v in model.weights]


def test_defaults_and_old_configs_keep_the_variables_of_old_checkpoints():
  assert _variables(_model()) == TINY_VARIABLES
  config = tiny.get_config()  # A run's config.json written before the two keys existed.
  del config.model["decoder_layers"], config.model["tie_embeddings"]
  assert _variables(model_lib.create_model(config, 40, 30)) == TINY_VARIABLES


def _loss_and_grads(model, training=False, seed=None):
  with tf.GradientTape() as tape:
    logits, _ = model(SOURCE, TARGET[:, :-1], training=training, dropout_seed=seed)
    labels = TARGET[:, 1:]
    loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
                         * tf.cast(labels != 0, tf.float32))
  return logits, loss, dict(zip([v.path for v in model.trainable_variables],
                                tape.gradient(loss, model.trainable_variables)))


def test_tied_embeddings_share_the_target_embedding_with_the_projection():
  """One variable serves both uses: its gradient is the sum of the gradients an untied
  model with the same weights (projection kernel = E^T) gives its embedding and kernel."""
  tied = _model(units=16, embed_dim=16, tie_embeddings=True)
  paths = [path for path, _ in _variables(tied)]
  assert "seq2seq/embedding/embeddings" in paths
  assert not any("kernel" in p for p in paths if "projection" in p)
  assert not any("output_to_embedding" in p for p in paths)  # embed_dim == units.
  untied = _model(units=16, embed_dim=16)
  tied_weights = {v.path: v for v in tied.weights}
  for v in untied.weights:
    if v.path in tied_weights:
      v.assign(tied_weights[v.path])
  untied.decoder.projection.kernel.assign(tf.transpose(tied.decoder.embedding.embeddings))
  untied.decoder.projection.bias.assign(tf.random.normal([30]))
  tied.decoder.projection.bias.assign(untied.decoder.projection.bias)
  logits_tied, _, g_tied = _loss_and_grads(tied)
  logits_untied, _, g_untied = _loss_and_grads(untied)
  np.testing.assert_allclose(logits_tied.numpy(), logits_untied.numpy(), atol=1e-5)
  embedding = "seq2seq/embedding/embeddings"
  expected = (tf.convert_to_tensor(g_untied[embedding])
              + tf.transpose(g_untied["seq2seq/projection/kernel"]))
  np.testing.assert_allclose(tf.convert_to_tensor(g_tied[embedding]).numpy(),
                             expected.numpy(), atol=1e-5)
  np.testing.assert_allclose(g_tied["seq2seq/tied_projection/bias"].numpy(),
                             g_untied["seq2seq/projection/bias"].numpy(), atol=1e-5)


def test_tied_embeddings_with_embed_dim_not_units_under_mixed_bfloat16():
  config = tiny.get_config()
  config.model.update(SMALL, tie_embeddings=True)
  model = model_lib.create_model(config, 40, 30, policy="mixed_bfloat16")
  variables = dict(_variables(model))
  assert variables["seq2seq/output_to_embedding/kernel"] == (32, 16)
  assert variables["seq2seq/tied_projection/bias"] == (30,)
  logits, weights = model(SOURCE, TARGET_IN)
  assert logits.shape == (2, 3, 30) and logits.dtype == tf.float32
  assert weights.dtype == tf.float32 and np.all(np.isfinite(logits.numpy()))


@pytest.mark.parametrize("recurrence, xla", [("fused", "off"), ("fused", "decoder_step"),
                                             ("keras", "off")])
def test_stacked_decoder_teacher_forcing_equals_step_by_step(recurrence, xla):
  """Two decoder layers: shapes, and teacher forcing gives the logits and attention of
  running step_fn (what decoding runs) token by token on the same inputs."""
  config = tiny.get_config()
  config.model.update(SMALL, decoder_layers=2, tie_embeddings=True, recurrence=recurrence)
  config.train.xla = xla
  tf.random.set_seed(0)
  model = model_lib.create_model(config, 40, 30)
  assert "seq2seq/gru_cell_1/kernel" in dict(_variables(model))
  logits, weights = model(SOURCE, TARGET[:, :-1])
  assert logits.shape == (2, 4, 30) and weights.shape == (2, 4, 6)
  values, keys, mask, state = model.encode(SOURCE)
  assert state.shape == (2, 2 * 32)
  np.testing.assert_array_equal(state[:, :32].numpy(), state[:, 32:].numpy())
  for t in range(4):
    state, step_weights = model.step_fn(model.decoder.embedding(TARGET[:, t]), state,
                                        values, keys, mask)
    np.testing.assert_allclose(model.decoder.logits(state).numpy(), logits[:, t].numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(step_weights.numpy(), weights[:, t].numpy(), atol=1e-6)


def test_stacked_decoder_query_is_the_top_layers_state():
  model = _model(**SMALL, decoder_layers=2)
  values, keys, mask, _ = model.encode(SOURCE)
  state = tf.random.stateless_normal([2, 64], [0, 1]) * 5.0  # [layer 1; layer 2]
  embedded = model.decoder.embedding(tf.constant([8, 8]))
  _, weights = model.decoder.step(embedded, state, values, keys, mask)
  np.testing.assert_array_equal(
      weights.numpy(), model.decoder.attention(state[:, 32:], values, keys, mask)[1].numpy())
  assert np.abs(model.decoder.attention(state[:, :32], values, keys, mask)[1].numpy()
                - weights.numpy()).max() > 1e-5  # (near-uniform before training)


def test_threefry_dropout_under_xla_keeps_the_rate_and_is_a_function_of_the_seed():
  """model.dropout_rng=threefry (XLA:CPU draws it ~4x faster than Philox): inverted dropout
  at the asked rate, a pure function of the seed, and not Philox's masks."""
  x = tf.ones([64, 16, 256])

  def masks(alg):
    return tf.function(lambda seed: model_lib.dropout(x, 0.2, seed, 1, True, alg),
                       jit_compile=True)

  threefry, philox = masks("threefry"), masks(None)
  seed = tf.constant([7, 3], tf.int64)
  a = threefry(seed).numpy()
  assert abs(np.mean(a != 0) - 0.8) < 0.005  # 262,144 draws: the std is 0.0008.
  np.testing.assert_allclose(a[a != 0], 1.25)
  np.testing.assert_array_equal(threefry(seed).numpy(), a)
  assert np.mean(threefry(tf.constant([7, 4], tf.int64)).numpy() != a) > 0.2
  assert np.mean(philox(seed).numpy() != a) > 0.2


def test_dropout_between_decoder_layers_is_a_function_of_the_seed():
  model = _model(**SMALL, decoder_layers=2, dropout=0.3)
  seed = tf.constant([1, 2], tf.int64)
  a, b, c = (model(SOURCE, TARGET, training=True, dropout_seed=s)[0].numpy()
             for s in (seed, seed, tf.constant([1, 3], tf.int64)))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3
  keep = model.decoder.layer_keep_masks(2, 4, tf.float32, True, seed)
  assert keep.shape == (4, 1, 2, 32)
  np.testing.assert_allclose(np.unique(keep.numpy()), [0.0, 1 / 0.7], rtol=1e-6)
  assert model.decoder.layer_keep_masks(2, 4, tf.float32, False, seed) is None
  model.decoder.layer_keep_masks = lambda *args: None  # Teacher forcing applies them:
  assert np.abs(model(SOURCE, TARGET, training=True, dropout_seed=seed)[0].numpy()
                - a).max() > 1e-3


def test_stacked_tied_decoder_gradients_in_the_train_step():
  """train.make_grad_fn (the train step's gradients) with dropout between the layers gives
  every variable a gradient, and the same ones with the decoder step XLA-compiled.
  (train.xla=train_step compiles for ~25 s here: checked by hand, docs/training.md.)"""
  from trainer import train
  config = tiny.get_config()
  config.model.update(SMALL, decoder_layers=2, tie_embeddings=True, dropout=0.1)
  results, models = {}, []
  for xla in ("off", "decoder_step"):
    config.train.xla = xla
    models.append(model_lib.create_model(config, 40, 30))
    for a, b in zip(models[0].weights, models[-1].weights):
      b.assign(a)
    grads, loss = train.make_grad_fn(models[-1], config)(
        SOURCE, TARGET, tf.constant(7.0), tf.constant(1.0), tf.constant([4, 5], tf.int64))
    results[xla] = [tf.convert_to_tensor(g).numpy() for g in grads], loss.numpy()
  assert all(np.abs(g).max() > 0 for g in results["off"][0])
  np.testing.assert_allclose(results["decoder_step"][1], results["off"][1], rtol=1e-6)
  for variable, a, b in zip(models[0].trainable_variables, *(results[x][0] for x in results)):
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max() + 1e-7, variable.path


def test_stacked_tied_decoder_beam_search_exports(tmp_path):
  """Beam search (which gathers the [B*K, L*U] state by beam) runs with two decoder layers
  inside a tf.function, and a SavedModel of it reloads and decodes the same."""
  from trainer import decode
  model = _model(**SMALL, decoder_layers=2, tie_embeddings=True)
  module = tf.Module()
  module.model = model
  module.search = tf.function(lambda source: decode.beam_search(model, source, 3, 6)[0],
                              input_signature=[tf.TensorSpec([None, None], tf.int32)])
  ids = module.search(SOURCE).numpy()
  assert ids.shape == (2, 6)
  tf.saved_model.save(module, str(tmp_path))
  reloaded = tf.saved_model.load(str(tmp_path))  # Kept: its functions use its variables.
  np.testing.assert_array_equal(reloaded.search(SOURCE).numpy(), ids)


def test_stacked_tied_decoder_learns():
  """Two decoder layers with tied embeddings fit one batch: the loss falls by half."""
  model = _model(**SMALL, decoder_layers=2, tie_embeddings=True)
  optimizer = keras.optimizers.Adam(1e-2)
  step = tf.function(lambda: _train_step(model, optimizer))
  losses = [float(step()) for _ in range(30)]
  assert losses[-1] < 0.5 * losses[0], losses


def _train_step(model, optimizer):
  _, loss, grads = _loss_and_grads(model)
  optimizer.apply([grads[v.path] for v in model.trainable_variables],
                  model.trainable_variables)
  return loss


def test_bad_values_name_the_key():
  import ml_collections
  from configs import validate
  for key, value in (("decoder_layers", 0), ("tie_embeddings", "yes")):
    config = tiny.get_config().to_dict()  # A config file may set any type.
    config["model"][key] = value
    with pytest.raises(validate.ConfigError, match=rf"config.model.{key}={value!r} is inv"):
      validate.validate(ml_collections.ConfigDict(config))
