"""Decoding: beam size 1 is greedy, beam search beats greedy and equals a plain reference,
length penalty, XLA, per-step cost independent of the output length."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from input_pipeline.tokenizer import BOS_ID, EOS_ID, UNK_ID
from trainer import decode
from trainer import translate
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


@pytest.mark.parametrize("stops_early", [False, True])
def test_xla_beam_search_matches_no_xla(stops_early):
  if stops_early:  # Every beam has ended by step 3 of 10: later steps are never written.
    model, _ = _bigram_model({BOS_ID: {A: 0.5, B: 0.4, EOS_ID: 0.1},
                              A: {C: 0.6, EOS_ID: 0.4}, B: {EOS_ID: 1.0},
                              C: {EOS_ID: 1.0}})
    source = tf.constant([[A, EOS_ID], [B, EOS_ID]])
  else:
    model, source = _random_model(), SOURCE

  def search(source):
    return decode.beam_search(model, source, 3, 10, 0.6)

  expected = tf.function(search)(source)
  got = tf.function(search, jit_compile=True)(source)  # Raises if XLA cannot compile it.
  if stops_early:
    assert [_tokens(row) for row in got[0]] == [[B, EOS_ID]] * 2
  np.testing.assert_array_equal(got[0], expected[0])
  np.testing.assert_allclose(got[1], expected[1], atol=1e-5)
  np.testing.assert_allclose(got[2], expected[2], atol=1e-5)


def test_translate_fn_uses_beam_search_unless_beam_size_is_one():
  model, _ = _bigram_model({
      BOS_ID: {A: 0.5, B: 0.4, EOS_ID: 0.1}, A: {C: 0.36, D: 0.34, EOS_ID: 0.3},
      B: {EOS_ID: 0.9, C: 0.1}, C: {EOS_ID: 1.0}, D: {EOS_ID: 1.0}})
  config = tiny.get_config()
  source = tf.constant([[A, EOS_ID], [B, EOS_ID]])
  beam_ids, beam_weights, _ = translate.make_translate_fn(model, config, beam_size=2)(source)
  greedy_ids, _, _ = translate.make_translate_fn(model, config, beam_size=1)(source)
  assert beam_ids.numpy().tolist() == [[[B, EOS_ID]]] * 2  # [B, N, T], trimmed.
  assert beam_weights.shape == (2, 1, 2, 2)
  assert [_tokens(row[0]) for row in greedy_ids] == [[A, C, EOS_ID]] * 2


def test_bad_beam_size_says_which_setting():
  model = _random_model()
  with pytest.raises(ValueError, match="beam_size=0 must be between 1 and the target"):
    decode.beam_search(model, SOURCE, 0, 5)
  config = tiny.get_config()
  config.eval.beam_size = -2
  with pytest.raises(ValueError, match="config.eval.beam_size"):
    translate.make_translate_fn(model, config)


def _random_source(lengths, width, seed=0):
  """Random ids [len(lengths), width] ending in EOS at each length, 0-padded after."""
  rng = np.random.default_rng(seed)
  source = np.zeros([len(lengths), width], np.int32)
  for row, length in zip(source, lengths):
    row[:length - 1] = rng.integers(EOS_ID + 1, VOCAB, length - 1)
    row[length - 1] = EOS_ID
  return tf.constant(source)


def _extensions(h, k, log_p, t, alpha):
  """Hypothesis h (beam k) extended by every token, or by PAD at no cost if finished:
  (-score, index in beam_search's top_k row, k, token, log P, length) each."""
  if h["finished"]:
    return [(-h["log_prob"] / decode.length_penalty(h["length"], alpha).numpy(),
             k * VOCAB, k, 0, h["log_prob"], h["length"])]
  penalty = decode.length_penalty(t + 1, alpha).numpy()
  return [(-((h["log_prob"] + log_p[token]) / penalty), k * VOCAB + token, k, token,
           h["log_prob"] + log_p[token], t + 1) for token in range(VOCAB)]


def _reference_beam_search(model, source, beam_size, max_length, alpha, beam=0):
  """Beam search as one would write it first: Python lists of hypotheses, each holding its
  whole history (ids, weights, log P), extended and re-ranked step by step; returns the
  final beam `beam` (0: the best)."""
  values, keys, mask, state = model.encode(source)
  encoded = [tf.repeat(x, beam_size, axis=0) for x in (values, keys, mask)]
  batch = source.shape[0]
  live = dict(ids=[], weights=[], log_prob=np.float32(0), length=0, finished=False)
  dead = dict(live, log_prob=np.float32(-1e9))  # Only beam 0 is live at first.
  beams = [[live] + [dead] * (beam_size - 1) for _ in range(batch)]
  state, tokens = tf.repeat(state, beam_size, axis=0), [BOS_ID] * (batch * beam_size)
  for t in range(max_length):
    if all(h["finished"] for row in beams for h in row):
      break
    state, weights = model.step_fn(model.decoder.embedding(tf.constant(tokens)), state,
                                   *encoded)
    log_p = tf.nn.log_softmax(model.decoder.logits(state)).numpy()
    rows, new_beams = [], []
    for b in range(batch):
      candidates = [c for k, h in enumerate(beams[b]) for c in
                    _extensions(h, k, log_p[b * beam_size + k], t, alpha)]
      new_beams.append([])
      for _, _, k, token, log_prob, length in sorted(candidates)[:beam_size]:
        h = beams[b][k]
        step_weights = np.zeros_like(weights[0]) if h["finished"] else weights[b * beam_size + k]
        new_beams[b].append(dict(ids=h["ids"] + [token],
                                 weights=h["weights"] + [step_weights], log_prob=log_prob,
                                 length=length, finished=h["finished"] or token == EOS_ID))
        rows.append(b * beam_size + k)
    beams, state = new_beams, tf.gather(state, rows)
    tokens = [h["ids"][-1] for row in beams for h in row]
  best = [row[beam] for row in beams]
  ids = np.zeros([batch, max_length], np.int32)
  weights = np.zeros([batch, max_length, source.shape[1]], np.float32)
  for b, h in enumerate(best):
    ids[b, :len(h["ids"])] = h["ids"]
    weights[b, :len(h["ids"])] = h["weights"]
  scores = [h["log_prob"] / decode.length_penalty(h["length"], alpha).numpy() for h in best]
  return ids, weights, np.array(scores, np.float32)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_equals_a_plain_reference(alpha):
  model = _random_model()
  source = _random_source([7, 5, 2, 6, 3], 7)
  ids, weights, scores = decode.beam_search(model, source, 4, 14, alpha)
  expected = _reference_beam_search(model, source, 4, 14, alpha)
  assert len({_length(row) for row in expected[0]}) > 1  # EOS at different steps.
  np.testing.assert_array_equal(ids, expected[0])
  np.testing.assert_allclose(weights, expected[1], atol=1e-6)
  np.testing.assert_allclose(scores, expected[2], rtol=1e-6)


def _tensors_in_loop_bodies(graph):
  """Every tensor made inside the body of a while loop of `graph` (nested ones too)."""
  for op in graph.get_operations():
    if op.type in ("While", "StatelessWhile"):
      # Private, but the only way to read a traced loop body back from its graph.
      body = graph._get_function(op.get_attr("body").name).graph  # pylint: disable=protected-access
      yield from (tensor for body_op in body.get_operations() for tensor in body_op.outputs)
      yield from _tensors_in_loop_bodies(body)


def test_beam_search_step_does_not_touch_the_whole_history():
  """Each step costs O(1) in the output length, not O(T): no tensor the length of the
  output (an ids or attention history rewritten every step, O(T^2) per sentence)."""
  model = _random_model()
  max_length = 97  # No other dimension of this test has this size.
  search = tf.function(lambda source: decode.beam_search(model, source, 4, max_length))
  graph = search.get_concrete_function(SOURCE).graph
  dims = [(tensor.name, tensor.shape) for tensor in _tensors_in_loop_bodies(graph)
          if tensor.shape.rank and max_length in tensor.shape.as_list()]
  assert not dims


GRID = (12, 16, 24)  # configs/tiny.py's data.bucket_boundaries.


@pytest.mark.parametrize("width, padded", [(1, 12), (12, 12), (13, 16), (24, 24),
                                           (25, 48), (49, 72)])
def test_sources_are_padded_to_the_smallest_grid_length_that_holds_them(width, padded):
  assert int(decode.grid_length(width, GRID)) == padded
  source = _random_source([width], width)
  assert decode.on_grid(lambda s: (s, s[:, tf.newaxis]), source, GRID)[0].shape == (1, padded)


def test_source_grid_only_when_the_decoder_step_is_compiled():
  config = tiny.get_config()
  assert decode.source_grid(_random_model(), config) == GRID  # tiny: xla=decoder_step.
  config.train.xla = "off"
  assert decode.source_grid(model_lib.create_model(config, VOCAB, VOCAB), config) == ()


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_on_the_grid_compiles_one_step_per_grid_length(beam_size):
  """Sources of 6 widths reuse 3 compiled decoder steps and decode as without padding."""
  model = _random_model()
  assert model.jit_decoder_step  # Called eagerly, step_fn traces (and compiles) per shape.

  def search(source):
    if beam_size == 1:
      return decode.greedy(model, source, 12)
    return decode.beam_search(model, source, beam_size, 12, 0.6)

  sources = [_random_source([width, max(1, width - 4), 2], width, seed=width)
             for width in (3, 6, 11, 13, 17, 23)]
  padded = [decode.on_grid(search, source, GRID) for source in sources]
  assert model.step_fn.experimental_get_tracing_count() == len(GRID)
  plain = [search(source) for source in sources]
  assert model.step_fn.experimental_get_tracing_count() == len(GRID) + len(sources)
  for got, expected in zip(padded, plain):
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], atol=1e-6)
    assert got[1].shape == expected[1].shape
    for a, b in zip(got[2:], expected[2:]):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_source_longer_than_the_grid_is_translated_whole():
  model = _random_model()
  source = _random_source([30, 27], 30)  # Over the grid's 24: padded to 48, not cut.
  ids, weights, scores = decode.on_grid(
      lambda s: decode.beam_search(model, s, 3, 20, 0.6), source, GRID)
  expected = decode.beam_search(model, source, 3, 20, 0.6)
  np.testing.assert_array_equal(ids, expected[0])
  np.testing.assert_allclose(weights, expected[1], atol=1e-6)
  np.testing.assert_allclose(scores, expected[2], rtol=1e-6)
  assert weights.shape[-1] == 30 and weights.numpy()[0, 0, 24:].sum() > 0.1


def test_n_best_are_the_reference_beams_best_first():
  """n_best_search's N hypotheses are the reference's final beams 0..N-1 (ids, attention,
  scores), best first; its first is beam_search's answer; N > beam size is refused."""
  model = _random_model()
  source = _random_source([7, 5, 2, 6, 3], 7)
  ids, weights, scores = decode.n_best_search(model, source, 4, 14, 0.6, n_best=3)
  assert ids.shape[:2] == (5, 3) and weights.shape[:2] == (5, 3) and scores.shape == (5, 3)
  best = decode.beam_search(model, source, 4, 14, 0.6)
  np.testing.assert_array_equal(ids[:, 0], best[0])
  np.testing.assert_allclose(scores[:, 0], best[2], rtol=1e-6)
  expected = _reference_beams(model, source, 4, 14, 0.6)
  for n in range(3):
    np.testing.assert_array_equal(ids[:, n], expected[n][0])
    np.testing.assert_allclose(weights[:, n], expected[n][1], atol=1e-6)
    np.testing.assert_allclose(scores[:, n], expected[n][2], rtol=1e-6)
  assert np.all(np.diff(scores.numpy(), axis=1) <= 0)  # Best first.
  assert len({tuple(row) for row in ids.numpy()[0]}) == 3  # Distinct hypotheses.
  with pytest.raises(ValueError, match="n_best=5 must be between 1 and the beam size 4"):
    decode.n_best_search(model, source, 4, 14, 0.6, n_best=5)


def _reference_beams(model, source, beam_size, max_length, alpha):
  """The reference's final beams: [(ids, weights, scores) of beam n for each n]."""
  results = []
  for n in range(beam_size):
    results.append(_reference_beam_search(model, source, beam_size, max_length, alpha,
                                          beam=n))
  return results


def test_translate_fn_traces_once_for_every_batch_shape():
  """A trace of the beam search costs seconds: batches of any size and length reuse one."""
  model, config = _random_model(), tiny.get_config()
  translate_ids = translate.make_translate_fn(model, config, beam_size=2)
  for lengths, width in (([3, 2], 4), ([5, 1, 2], 6), ([1], 2)):
    ids, weights, scores = translate_ids(_random_source(lengths, width))
    assert ids.shape[0] == len(lengths) and weights.shape[-1] == width
  assert translate_ids.experimental_get_tracing_count() == 1
