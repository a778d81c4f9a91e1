"""Decoding: greedy search, in-graph and batched (beam search lives here too)."""
import tensorflow as tf

from input_pipeline.tokenizer import BOS_ID, EOS_ID
from trainer.model import Seq2Seq


def max_output_length(source: tf.Tensor, max_length_ratio: float) -> tf.Tensor:
  """Longest output for a batch: ratio x longest real source length + 5 tokens."""
  source_len = tf.reduce_max(tf.reduce_sum(tf.cast(source != 0, tf.float32), axis=1))
  return tf.cast(tf.math.ceil(source_len * max_length_ratio), tf.int32) + 5


def greedy(model: Seq2Seq, source: tf.Tensor, max_length: tf.Tensor):
  """Greedy search: source [B,S] -> ids [B,T] (0 after EOS) and weights [B,T,S] f32.

  Stops when every sentence has produced EOS or after `max_length` steps.
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
    weights = weights.write(t, attention_weights)
    done = done | tf.equal(token, EOS_ID)
    t += 1
  return (tf.transpose(ids.stack(), [1, 0]),
          tf.transpose(weights.stack(), [1, 0, 2]))
