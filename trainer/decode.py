"""Decoding: greedy and beam search, in-graph and batched.

Both run the decoder cell in a `tf.while_loop`, so they work eagerly, inside tf.function
and in a SavedModel. Beam search keeps fixed-size tensors, so it also compiles under XLA
(`jit_compile=True`) when `max_length` is a compile-time constant (a Python int).

An XLA-compiled decoder step compiles once per source length it meets; `on_grid` pads
sources to the training grid's lengths first, so that a few compiled shapes serve all.
"""
from typing import Callable, Sequence, Tuple, Union

import ml_collections
import tensorflow as tf

from input_pipeline import pipeline
from input_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID
from trainer.model import NEG_INF, Seq2Seq


def max_output_length(source: tf.Tensor, max_length_ratio: float) -> tf.Tensor:
  """Longest output for a batch: ratio x longest real source length + 5 tokens."""
  lengths = tf.reduce_sum(tf.cast(source != 0, tf.float32), axis=1)
  source_len = tf.reduce_max(tf.concat([lengths, [0.0]], 0))  # An empty batch gives 5.
  return tf.cast(tf.math.ceil(source_len * max_length_ratio), tf.int32) + 5


def source_grid(model: Seq2Seq, config: ml_collections.ConfigDict) -> Tuple[int, ...]:
  """Source lengths to decode at: the training grid (`pipeline.padded_shapes`) when the
  decoder step is XLA-compiled, which compiles once per length; else none, as padding
  would only add encoder and attention work."""
  return tuple(pipeline.padded_shapes(config)) if model.jit_decoder_step else ()


def grid_length(length: tf.Tensor, grid: Sequence[int]) -> tf.Tensor:
  """The smallest grid length >= `length`; past the largest grid length L, the next
  multiple of L (a longer source is decoded whole, at one more shape per multiple)."""
  lengths = tf.constant(sorted(grid), tf.int32)
  longest = lengths[-1]
  multiple = (length + longest - 1) // longest * longest
  return tf.reduce_min(tf.where(lengths >= length, lengths, multiple))


def on_grid(search: Callable, source: tf.Tensor, grid: Sequence[int]):
  """search(source [B,S]) -> (ids, weights [..., S], ...) run on `source` 0-padded to
  `grid_length(S, grid)`; weights are cut back to S. Padding is masked in the encoder and
  in the attention, so results equal search(source). An empty grid runs search(source).
  """
  if not grid:
    return search(source)
  width = tf.shape(source)[1]
  padded = tf.pad(source, [[0, 0], [0, grid_length(width, grid) - width]])
  ids, weights, *rest = search(padded)
  return (ids, weights[..., :width], *rest)


def greedy(model: Seq2Seq, source: tf.Tensor, max_length: tf.Tensor):
  """Greedy search: source [B,S] -> ids [B,T] (0 after EOS) and weights [B,T,S] f32.

  Stops when every sentence has produced EOS or after `max_length` steps. Weights are 0
  after a sentence's EOS, as in `beam_search`.
  """
  values, keys, mask, state = model.encode(source)
  batch = tf.shape(source)[0]
  ids = tf.TensorArray(tf.int32, size=max_length)
  weights = tf.TensorArray(tf.float32, size=max_length)
  token = tf.fill([batch], BOS_ID)
  done = tf.zeros([batch], tf.bool)
  t = tf.constant(0)
  while t < max_length and not tf.reduce_all(done):
    embedded = model.decoder.embedding(token)
    state, attention_weights = model.step_fn(embedded, state, values, keys, mask)
    token = tf.argmax(model.decoder.logits(state), axis=-1, output_type=tf.int32)
    token = tf.where(done, 0, token)
    ids = ids.write(t, token)
    weights = weights.write(t, tf.where(done[:, tf.newaxis], 0.0, attention_weights))
    done = done | tf.equal(token, EOS_ID)
    t += 1
  return (tf.transpose(ids.stack(), [1, 0]),
          tf.transpose(weights.stack(), [1, 0, 2]))


def length_penalty(length: tf.Tensor, alpha: float) -> tf.Tensor:
  """GNMT lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016, eq. 14); |Y| counts EOS.

  Hypotheses are ranked by log P(Y) / lp(Y). log P < 0, so a larger alpha divides longer
  hypotheses by more and favours longer outputs; alpha = 0 ranks by log P alone.
  """
  return tf.pow((5.0 + tf.cast(length, tf.float32)) / 6.0, alpha)


def beam_search(model: Seq2Seq, source: tf.Tensor, beam_size: int,
                max_length: Union[int, tf.Tensor], length_penalty_alpha: float = 0.0
                ) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Beam search: source [B,S] -> ids [B,T] int32, weights [B,T,S] f32, scores [B] f32:
  the best hypothesis of `n_best_search` (which has the details)."""
  ids, weights, scores = n_best_search(model, source, beam_size, max_length,
                                       length_penalty_alpha, n_best=1)
  return ids[:, 0], weights[:, 0], scores[:, 0]


def n_best_search(model: Seq2Seq, source: tf.Tensor, beam_size: int,
                  max_length: Union[int, tf.Tensor], length_penalty_alpha: float = 0.0,
                  n_best: int = 1) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Beam search keeping the `n_best` <= beam_size best hypotheses, best first: source
  [B,S] -> ids [B,N,T] int32, weights [B,N,T,S] f32, scores [B,N] f32.

  T = max_length (fixed, for XLA); ids are 0 after EOS and weights are the attention of
  the returned hypothesis (0 after EOS). Scores are log P(Y) / lp(Y), see
  `length_penalty`. Finished hypotheses keep their place and score while they rank in the
  top `beam_size`; the loop stops when all beams of all sentences are finished. With
  beam_size 1 the result equals `greedy`, for any alpha.

  Each step appends its tokens, parent beams and attention [B,K,S] to TensorArrays, and
  the N best hypotheses are traced back through the parents once at the end
  (`_backtrack`): O(T) per sentence. Rewriting every beam's whole history at each step
  was O(T^2).
  """
  vocab_size = int(model.decoder.projection.units)
  if not 1 <= beam_size <= vocab_size:
    raise ValueError(f"beam_size={beam_size!r} must be between 1 and the target "
                     f"vocabulary size {vocab_size} (config.eval.beam_size / --beam_size).")
  if not 1 <= n_best <= beam_size:
    raise ValueError(f"n_best={n_best!r} must be between 1 and the beam size {beam_size} "
                     f"(--n_best, --beam_size).")
  values, keys, mask, state = model.encode(source)
  # Each sentence's encoder outputs are repeated once per beam: [B*K, ...], batch-major.
  encoded = [tf.repeat(x, beam_size, axis=0) for x in (values, keys, mask)]
  beams = _initial_beams(tf.shape(source)[0], beam_size)
  beams["state"] = tf.repeat(state, beam_size, axis=0)
  # Per step: token and parent beam [B,K] int32, attention [B,K,S] f32.
  history = tuple(tf.TensorArray(dtype, size=max_length)
                  for dtype in (tf.int32, tf.int32, tf.float32))

  def not_done(t, beams, history):
    return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(beams["finished"])))

  def body(t, beams, history):
    beams, step = _beam_step(model, encoded, beams, t, beam_size, vocab_size,
                             length_penalty_alpha)
    return t + 1, beams, tuple(a.write(t, x) for a, x in zip(history, step))

  steps, beams, history = tf.while_loop(not_done, body, (tf.constant(0), beams, history))
  # top_k sorts, so beams 0..N-1 are the N best hypotheses of each sentence.
  ids, weights = _backtrack(*(a.stack() for a in history), steps, n_best)
  return ids, weights, beams["scores"][:, :n_best]


def _initial_beams(batch, beam_size: int) -> dict:
  """Loop state, [B,K] tensors. Only beam 0 is live at first, so the first step does not
  pick the same token K times."""
  first = tf.one_hot(0, beam_size, on_value=0.0, off_value=NEG_INF)
  return dict(
      log_probs=tf.tile(first[tf.newaxis], [batch, 1]),
      scores=tf.tile(first[tf.newaxis], [batch, 1]),
      lengths=tf.zeros([batch, beam_size], tf.int32),
      finished=tf.zeros([batch, beam_size], tf.bool),
      token=tf.fill([batch * beam_size], BOS_ID))


def _beam_step(model: Seq2Seq, encoded, beams: dict, t, beam_size: int, vocab_size: int,
               alpha: float) -> Tuple[dict, Tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
  """Extends every beam by every token, keeps the K best by length-penalised score.

  Returns the new beams and this step's (token, parent beam, attention) of each new beam.
  A finished beam has a single extension, PAD at no cost, so it keeps its log P, length
  and score, and stays unless K better hypotheses appear; its attention is 0.
  """
  embedded = model.decoder.embedding(beams["token"])
  state, attention_weights = model.step_fn(embedded, beams["state"], *encoded)
  step_log_probs = tf.reshape(tf.nn.log_softmax(model.decoder.logits(state)),
                              [-1, beam_size, vocab_size])
  finished = beams["finished"]
  pad_only = tf.one_hot(PAD_ID, vocab_size, on_value=0.0, off_value=NEG_INF)
  step_log_probs = tf.where(finished[..., tf.newaxis], pad_only, step_log_probs)
  log_probs = beams["log_probs"][..., tf.newaxis] + step_log_probs  # [B,K,V]
  lengths = tf.where(finished, beams["lengths"], t + 1)  # [B,K]
  scores = log_probs / length_penalty(lengths, alpha)[..., tf.newaxis]
  scores, best = tf.math.top_k(tf.reshape(scores, [-1, beam_size * vocab_size]), beam_size)
  parent, token = best // vocab_size, best % vocab_size  # [B,K] each

  def pick(x):  # Rows of x [B,K,...] chosen by `parent`.
    return tf.gather(x, parent, batch_dims=1)

  was_finished = pick(finished)
  step_weights = pick(tf.reshape(attention_weights, [-1, beam_size,
                                                     tf.shape(attention_weights)[-1]]))
  step_weights = tf.where(was_finished[..., tf.newaxis], 0.0, step_weights)
  beams = dict(
      log_probs=tf.gather(tf.reshape(log_probs, [-1, beam_size * vocab_size]), best,
                          batch_dims=1),
      scores=scores,
      lengths=pick(lengths),
      finished=was_finished | tf.equal(token, EOS_ID),
      state=tf.reshape(pick(tf.reshape(state, [-1, beam_size, state.shape[-1]])),
                       [-1, state.shape[-1]]),
      token=tf.reshape(token, [-1]))
  return beams, (token, parent, step_weights)


def _backtrack(tokens: tf.Tensor, parents: tf.Tensor, weights: tf.Tensor, steps: tf.Tensor,
               n_best: int) -> Tuple[tf.Tensor, tf.Tensor]:
  """The histories of the final beams 0..N-1: tokens, parents [T,B,K], weights [T,B,K,S] ->
  ids [B,N,T], weights [B,N,T,S], following parents from the last step back to the first
  (gather_tree, as in tensorflow_addons, which is no longer maintained).

  Steps after the loop stopped were never written; TensorArray.stack gives zeros there
  (eagerly, in graphs and under XLA; tests/test_decode.py covers all three), so they read
  as token 0 and attention 0; a trace starts on its final beam n at the last of the `steps`
  written steps and follows the parents from there.
  """
  batch = tf.shape(tokens)[1]
  beams = tf.tile(tf.range(n_best)[tf.newaxis], [batch, 1])  # [B,N]

  def step_back(carry, step):
    beam = carry[0]
    t, token, parent, step_weights = step
    # From the last written step back, follow the parents; after it, stay on the final beam.
    beam = tf.where(t >= steps - 1, beams, beam)
    token, parent, step_weights = (tf.gather(x, beam, batch_dims=1)
                                   for x in (token, parent, step_weights))
    return parent, token, step_weights

  init = (beams, tf.zeros([batch, n_best], tf.int32),
          tf.zeros([batch, n_best, tf.shape(weights)[-1]], tf.float32))
  _, ids, weights = tf.scan(step_back, (tf.range(tf.shape(tokens)[0]), tokens, parents,
                                        weights), init, reverse=True)
  return tf.transpose(ids, [1, 2, 0]), tf.transpose(weights, [1, 2, 0, 3])


def trim(ids: tf.Tensor, weights: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """Drops trailing all-padding time steps: ids [B,T], weights [B,T,S] -> [B,T'], [B,T',S]."""
  used = tf.reduce_any(ids != PAD_ID, axis=0)
  length = tf.reduce_max(tf.where(used, tf.range(1, tf.shape(ids)[1] + 1), 0))
  return ids[:, :length], weights[:, :length]
