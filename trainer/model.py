"""Bahdanau et al. (2015) encoder-decoder with additive attention, as Keras 3 layers.

Read top to bottom: `Encoder` (embedding + GRU), `BahdanauAttention` (W1 on the query,
W2 on the encoder outputs, V for the score), `Decoder` (one GRU cell step per target
token, fed [context; embedded previous token] and its previous state), `Seq2Seq` (ties
them together for teacher forcing). No training logic lives here.

Shapes: B batch, S source length, T target length, U units, E embedding size, V vocab.
Token id 0 is padding everywhere.
"""
from typing import Callable, Optional

import keras
import tensorflow as tf

NEG_INF = -1e9  # Added to padded scores; exp() of it is exactly 0 in float32.


class Encoder(keras.layers.Layer):
  """Embedding + (bi)GRU stack; returns all outputs [B,S,U] and the final state [B,U]."""

  def __init__(self, vocab_size: int, embed_dim: int, units: int, num_layers: int = 1,
               bidirectional: bool = False, dropout: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    policy = self.dtype_policy
    self.embedding = keras.layers.Embedding(vocab_size, embed_dim, dtype=policy,
                                            name="embedding")
    self.dropout = keras.layers.Dropout(dropout, dtype=policy)
    self.grus = []
    for i in range(num_layers):
      gru = keras.layers.GRU(units, return_sequences=True, return_state=True,
                             recurrent_initializer="glorot_uniform", dtype=policy,
                             name=f"gru_{i}")
      if bidirectional:
        gru = keras.layers.Bidirectional(gru, merge_mode="concat", dtype=policy,
                                         name=f"bigru_{i}")
      self.grus.append(gru)
    # A bidirectional encoder's [forward; backward] outputs are projected back to U
    # so that attention and the decoder see the same sizes in both modes.
    self.bridge = (keras.layers.Dense(units, dtype=policy, name="bridge_outputs"),
                   keras.layers.Dense(units, activation="tanh", dtype=policy,
                                      name="bridge_state")) if bidirectional else None

  def call(self, source: tf.Tensor, training: bool = False):
    mask = tf.not_equal(source, 0)
    x = self.dropout(self.embedding(source), training=training)
    for gru in self.grus:
      results = gru(x, mask=mask, training=training)
      x, state = results[0], (results[1] if len(results) == 2
                              else tf.concat(results[1:], axis=-1))
    if self.bridge is not None:
      x, state = self.bridge[0](x), self.bridge[1](state)
    return x, state


class BahdanauAttention(keras.layers.Layer):
  """score(s, h_j) = V^T tanh(W1 s + W2 h_j); softmax over real (non-pad) source positions.

  `keys = W2(values)` does not depend on the decoder step, so callers compute it once per
  batch with `precompute_keys` and pass it to every step.
  """

  def __init__(self, units: int, **kwargs):
    super().__init__(**kwargs)
    policy = self.dtype_policy
    self.W1 = keras.layers.Dense(units, use_bias=False, dtype=policy, name="W1")
    self.W2 = keras.layers.Dense(units, dtype=policy, name="W2")
    # V is the paper's vector v_a. Applied as multiply + sum rather than a Dense layer: a
    # Dense on [B,S,U] lowers to Tensordot, whose gradient inside the decoder loop has
    # shape-dependent transposes that XLA cannot compile when batch shapes vary.
    self.V = self.add_weight(shape=(units,), initializer="glorot_uniform", name="V")

  def precompute_keys(self, values: tf.Tensor) -> tf.Tensor:
    """W2(encoder outputs): [B,S,U] -> [B,S,U]."""
    return self.W2(values)

  def call(self, query: tf.Tensor, values: tf.Tensor, keys: tf.Tensor, mask: tf.Tensor):
    """query [B,U], values/keys [B,S,U], mask [B,S] bool -> context [B,U], weights [B,S] f32."""
    v = tf.cast(self.V, keys.dtype)
    score = tf.reduce_sum(tf.tanh(keys + self.W1(query)[:, tf.newaxis, :]) * v, axis=-1)
    # Softmax in float32 even under mixed precision; padded positions get weight 0.
    score = tf.where(mask, tf.cast(score, tf.float32), NEG_INF)
    attention_weights = tf.nn.softmax(score, axis=-1)
    context = tf.einsum("bs,bsu->bu", tf.cast(attention_weights, values.dtype), values)
    return context, attention_weights


class Decoder(keras.layers.Layer):
  """Embeds the previous token, concatenates it with the context, runs a GRU cell step.

  The cell receives its previous state (the seed tutorial's decoder dropped it,
  tensorflow/tensorflow#38248). The query of the attention is that previous state s_{i-1},
  as in the paper. The vocabulary projection is applied by the caller to all steps at once.
  """

  def __init__(self, vocab_size: int, embed_dim: int, units: int, dropout: float = 0.0,
               **kwargs):
    super().__init__(**kwargs)
    policy = self.dtype_policy
    self.units = units
    self.embedding = keras.layers.Embedding(vocab_size, embed_dim, dtype=policy,
                                            name="embedding")
    self.attention = BahdanauAttention(units, dtype=policy, name="attention")
    self.cell = keras.layers.GRUCell(units, recurrent_initializer="glorot_uniform",
                                     dtype=policy, name="gru_cell")
    self.dropout = keras.layers.Dropout(dropout, dtype=policy)
    self.projection = keras.layers.Dense(vocab_size, dtype=policy, name="projection")

  def step(self, embedded: tf.Tensor, state: tf.Tensor, values: tf.Tensor,
           keys: tf.Tensor, mask: tf.Tensor):
    """One decoder step: embedded [B,E], state [B,U] -> new state [B,U], weights [B,S]."""
    context, attention_weights = self.attention(state, values, keys, mask)
    new_state, _ = self.cell(tf.concat([context, embedded], axis=-1), state)
    return new_state, attention_weights

  def logits(self, states: tf.Tensor, training: bool = False) -> tf.Tensor:
    """Decoder states [..., U] -> float32 logits [..., V]."""
    return tf.cast(self.projection(self.dropout(states, training=training)), tf.float32)


class Seq2Seq(keras.layers.Layer):
  """Encoder + Decoder. `step_fn` wraps the decoder step (e.g. XLA-compiled)."""

  def __init__(self, source_vocab_size: int, target_vocab_size: int, embed_dim: int,
               units: int, encoder_layers: int = 1, bidirectional: bool = False,
               dropout: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    policy = self.dtype_policy
    self.encoder = Encoder(source_vocab_size, embed_dim, units, encoder_layers,
                           bidirectional, dropout, dtype=policy, name="encoder")
    self.decoder = Decoder(target_vocab_size, embed_dim, units, dropout, dtype=policy,
                           name="decoder")
    self.step_fn: Callable = self.decoder.step

  def build(self, *shapes):
    """Sublayers build on the first call (see `create_model`)."""

  def encode(self, source: tf.Tensor, training: bool = False):
    """source [B,S] int -> (values [B,S,U], keys [B,S,U], mask [B,S], state [B,U])."""
    values, state = self.encoder(source, training=training)
    keys = self.decoder.attention.precompute_keys(values)
    return values, keys, tf.not_equal(source, 0), state

  def call(self, source: tf.Tensor, target_in: tf.Tensor, training: bool = False):
    """Teacher forcing: source [B,S], target_in [B,T] -> logits [B,T,V] f32, weights [B,T,S]."""
    values, keys, mask, state = self.encode(source, training)
    embedded = self.decoder.dropout(self.decoder.embedding(target_in), training=training)

    def body(carry, embedded_t):
      state, _ = carry
      return self.step_fn(embedded_t, state, values, keys, mask)

    init = (state, tf.zeros(tf.shape(source), tf.float32))
    # tf.scan keeps the time loop in-graph (one while loop), not Python-unrolled.
    states, attention_weights = tf.scan(body, tf.transpose(embedded, [1, 0, 2]), init)
    states = tf.transpose(states, [1, 0, 2])
    return (self.decoder.logits(states, training),
            tf.transpose(attention_weights, [1, 0, 2]))


def create_model(config, source_vocab_size: int, target_vocab_size: int,
                 policy: Optional[str] = None) -> Seq2Seq:
  """Builds a Seq2Seq from `config.model`, creating its variables with a dummy batch."""
  m = config.model
  model = Seq2Seq(source_vocab_size, target_vocab_size, m.embed_dim, m.units,
                  m.encoder_layers, m.bidirectional, m.dropout,
                  dtype=policy or "float32", name="seq2seq")
  # Variables must exist before the decoder step runs inside a while loop.
  dummy = tf.ones([1, 2], tf.int32)
  model(dummy, dummy)
  return model
