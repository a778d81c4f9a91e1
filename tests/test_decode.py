"""Decoding: beam size 1 is greedy, beam search beats greedy, length penalty, XLA."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from input_pipeline.tokenizer import BOS_ID, EOS_ID, UNK_ID
from trainer import decode
from trainer import evaluate
from trainer import model as model_lib

VOCAB = 30
SOURCE = tf.constant([[5, 6, 7, 3, 0, 0], [4, 9, 9, 9, 9, 3], [8, 3, 0, 0, 0, 0]])


def _random_model():
  """A seeded untrained model that emits EOS where it would emit UNK (the first time
  differs per sentence, so sentences finish at different steps)."""
  keras.utils.set_random_seed(0)
  model = model_lib.create_model(tiny.get_config(), VOCAB, VOCAB)
  kernel, bias = model.decoder.projection.kernel, model.decoder.projection.bias
  k, b = kernel.numpy(), bias.numpy()
  k[:, EOS_ID], b[EOS_ID] = k[:, UNK_ID], b[UNK_ID] + 1e-3
  kernel.assign(k)
  bias.assign(b)
  return model


# A constructed model: the decoder is a bigram language model over 8 tokens whose
# log-probabilities we choose, so the best sequences are known in advance.
V = 8
A, B, C, D = 4, 5, 6, 7


def _bigram_model(transitions):
  """transitions {previous token: {next token: probability}}; the rest get ~0."""
  config = tiny.get_config()
  model = model_lib.create_model(config, V, V)
  units, embed_dim = config.model.units, config.model.embed_dim
  table = np.full([V, V], 1e-6)
  for previous, row in transitions.items():
    for token, p in row.items():
      table[previous, token] = p
  log_p = tf.constant(np.log(table / table.sum(1, keepdims=True)), tf.float32)
  # One-hot embeddings; the "state" is the previous token, the logits its row of log_p.
  model.decoder.embedding.embeddings.assign(np.eye(V, embed_dim))

  def step(embedded, state, values, keys, mask):
    weights = tf.cast(mask, tf.float32) / tf.reduce_sum(tf.cast(mask, tf.float32), -1,
                                                        keepdims=True)
    return tf.pad(embedded[:, :V], [[0, 0], [0, units - V]]), weights

  model.step_fn = step
  model.decoder.logits = lambda states, training=False: tf.matmul(states[..., :V], log_p)
  return model, log_p.numpy()


def _log_prob(log_p, ids):
  previous, total = BOS_ID, 0.0
  for token in np.asarray(ids):
    if token == 0:
      break
    total += log_p[previous, token]
    previous = token
  return total


def _length(ids):
  return int(np.sum(np.asarray(ids) != 0))


def _tokens(ids):
  return [int(x) for x in np.asarray(ids) if x != 0]


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_size_one_equals_greedy(alpha):
  model = _random_model()
  greedy_ids, greedy_weights = decode.greedy(model, SOURCE, 12)
  ids, weights, _ = decode.beam_search(model, SOURCE, 1, 12, alpha)
  t = greedy_ids.shape[1]
  assert len({_length(row) for row in greedy_ids.numpy()}) > 1  # EOS at different steps.
  np.testing.assert_array_equal(ids[:, :t], greedy_ids)
  assert np.all(ids.numpy()[:, t:] == 0)
  np.testing.assert_allclose(weights[:, :t], greedy_weights, atol=1e-6)


def test_beam_search_finds_a_likelier_translation_than_greedy():
  model, log_p = _bigram_model({
      BOS_ID: {A: 0.5, B: 0.4, EOS_ID: 0.1},
      A: {C: 0.36, D: 0.34, EOS_ID: 0.3},  # Greedy takes A, then nothing good follows.
      B: {EOS_ID: 0.9, C: 0.1},
      C: {EOS_ID: 1.0}, D: {EOS_ID: 1.0}})
  source = tf.constant([[A, EOS_ID]])
  greedy_ids, _ = decode.greedy(model, source, 10)
  ids, _, scores = decode.beam_search(model, source, 2, 10, 0.0)
  assert _tokens(greedy_ids[0]) == [A, C, EOS_ID]
  assert _tokens(ids[0]) == [B, EOS_ID]
  assert float(scores[0]) == pytest.approx(_log_prob(log_p, ids[0]), abs=1e-5)
  assert float(scores[0]) > _log_prob(log_p, greedy_ids[0]) + 0.5


def test_larger_length_penalty_gives_longer_outputs():
  # Stopping at once is likeliest; A B C D EOS is less likely but 5 tokens long.
  model, _ = _bigram_model({
      BOS_ID: {EOS_ID: 0.52, A: 0.48},
      A: {B: 0.9, EOS_ID: 0.1}, B: {C: 0.9, EOS_ID: 0.1}, C: {D: 0.9, EOS_ID: 0.1},
      D: {EOS_ID: 0.95, A: 0.05}})
  source = tf.constant([[A, EOS_ID]])
  lengths = [_length(decode.beam_search(model, source, 2, 10, alpha)[0][0])
             for alpha in (0.0, 0.6, 2.0)]
  assert lengths == [1, 1, 5]


def test_xla_beam_search_matches_no_xla():
  model = _random_model()

  def search(source):
    return decode.beam_search(model, source, 3, 10, 0.6)

  expected = tf.function(search)(SOURCE)
  got = tf.function(search, jit_compile=True)(SOURCE)  # Raises if XLA cannot compile it.
  np.testing.assert_array_equal(got[0], expected[0])
  np.testing.assert_allclose(got[1], expected[1], atol=1e-5)
  np.testing.assert_allclose(got[2], expected[2], atol=1e-5)


def test_translate_fn_uses_beam_search_unless_beam_size_is_one():
  model, _ = _bigram_model({
      BOS_ID: {A: 0.5, B: 0.4, EOS_ID: 0.1}, A: {C: 0.36, D: 0.34, EOS_ID: 0.3},
      B: {EOS_ID: 0.9, C: 0.1}, C: {EOS_ID: 1.0}, D: {EOS_ID: 1.0}})
  config = tiny.get_config()
  source = tf.constant([[A, EOS_ID], [B, EOS_ID]])
  beam_ids, beam_weights = evaluate.make_translate_fn(model, config, beam_size=2)(source)
  greedy_ids, _ = evaluate.make_translate_fn(model, config, beam_size=1)(source)
  assert beam_ids.numpy().tolist() == [[B, EOS_ID]] * 2  # Trimmed to the longest.
  assert beam_weights.shape == (2, 2, 2)
  assert [_tokens(row) for row in greedy_ids] == [[A, C, EOS_ID]] * 2


def test_bad_beam_size_says_which_setting():
  model = _random_model()
  with pytest.raises(ValueError, match="beam_size=0 must be between 1 and the target"):
    decode.beam_search(model, SOURCE, 0, 5)
  config = tiny.get_config()
  config.eval.beam_size = -2
  with pytest.raises(ValueError, match="config.eval.beam_size"):
    evaluate.make_translate_fn(model, config)
