"""Bahdanau et al. (2015) encoder-decoder with additive attention, as Keras 3 layers.

Read top to bottom: `Encoder` (embedding + GRU), `BahdanauAttention` (W1 on the query,
W2 on the encoder outputs, V for the score), `Decoder` (one GRU cell step per target
token, fed [context; embedded previous token] and its previous state; `model.decoder_layers`
stacks cells, `model.tie_embeddings` projects with the target embedding, `TiedProjection`),
`Seq2Seq` (ties them together for teacher forcing). No training logic lives here.

How the recurrences run is `config.model.recurrence`, fixed when the model is built:
"fused" runs teacher forcing and the encoder through trainer/fused_rnn.py (all steps at
once, hand-written backward passes); "keras" runs the Keras layers step by step (never
cuDNN, so any XLA scope compiles); "cudnn" runs the encoder as Keras' cuDNN kernel (GPU
only, no XLA around it) and teacher forcing fused. All three have the same variables and
math (tests/test_fused_rnn.py compares values and gradients). A stacked decoder
(decoder_layers > 1) teacher-forces step by step in every mode: fused_rnn runs one cell.

Dropout is stateless: its masks are a pure function of a `dropout_seed` [2] int64 that
the train step derives from (config.seed, step, replica), so that every replica of every
worker draws its own masks and a resumed run draws the uninterrupted run's (a Keras
Dropout layer keeps its random state in a variable that MirroredStrategy mirrors, so all
replicas drew the same masks, and checkpoints did not hold it).

Shapes: B batch, S source length, T target length, U units, E embedding size, V vocab.
Token id 0 is padding everywhere.
"""
from typing import Callable, List

import keras
import tensorflow as tf

from trainer import fused_rnn

NEG_INF = -1e9  # Added to padded scores; exp() of it is exactly 0 in float32.
# Fold-in salts giving each dropout site its own stream from one step seed; the input of
# decoder layer k > 1 (model.decoder_layers) uses _DECODER_BETWEEN_LAYERS + k.
_ENCODER_EMBEDDING, _DECODER_EMBEDDING, _DECODER_OUTPUT = 1, 2, 3
_DECODER_BETWEEN_LAYERS = 100


def dropout(x: tf.Tensor, rate: float, seed, salt: int, training: bool,
            alg=None) -> tf.Tensor:
  """Inverted dropout with a stateless mask: a pure function of (seed, salt, x's shape).

  `seed` ([2] int) is required when it would apply (training with rate > 0): drawing masks
  from hidden state is what made replicas share masks and resumes differ. `alg`: None
  (TensorFlow's auto-selected generator: Philox on CPUs and GPUs) or "threefry", which
  only XLA implements (TensorFlow's own kernels reject it) and which XLA:CPU draws faster
  than Philox (model.dropout_rng; trainer.distribute.resolve_modes picks it).
  """
  if not training or not rate:
    return x
  if seed is None:
    raise ValueError("dropout > 0 in training needs a dropout_seed (the train step "
                     "derives one per step and replica: trainer/train.py).")
  seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), salt)
  return tf.nn.experimental.stateless_dropout(x, rate, seed, rng_alg=alg)


class Encoder(keras.layers.Layer):
  """Embedding + (bi)GRU stack; returns all outputs [B,S,U] and the final state [B,U]."""

  def __init__(self, vocab_size: int, embed_dim: int, units: int, num_layers: int = 1,
               bidirectional: bool = False, dropout: float = 0.0, recurrence: str = "fused",
               **kwargs):
    super().__init__(**kwargs)
    policy = self.dtype_policy
    self.fused = recurrence == "fused"
    self.embedding = keras.layers.Embedding(vocab_size, embed_dim, dtype=policy,
                                            name="embedding")
    self.dropout_rate, self.dropout_alg = dropout, None  # Seq2Seq sets the alg.
    self.grus = []
    for i in range(num_layers):
      # use_cudnn is explicit: "auto" would put a cuDNN op (no XLA kernel) on GPUs.
      gru = keras.layers.GRU(units, return_sequences=True, return_state=True,
                             recurrent_initializer="glorot_uniform",
                             use_cudnn=recurrence == "cudnn", dtype=policy,
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

  def call(self, source: tf.Tensor, training: bool = False, dropout_seed=None):
    mask = tf.not_equal(source, 0)
    x = dropout(self.embedding(source), self.dropout_rate, dropout_seed,
                _ENCODER_EMBEDDING, training, self.dropout_alg)
    for gru in self.grus:
      # The first call builds the Keras layers, so their variables keep their usual paths.
      if self.fused and gru.built:
        results = _fused_gru_layer(gru, x, mask)
      else:
        results = gru(x, mask=mask, training=training)
      x, state = results[0], (results[1] if len(results) == 2
                              else tf.concat(results[1:], axis=-1))
    if self.bridge is not None:
      x, state = self.bridge[0](x), self.bridge[1](state)
    return x, state


def _input_side(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
  """The GRU's input side for every step in one matmul: x [B,T,I] -> [T,B,3U]
  (time-major, as fused_rnn takes it) = x @ kernel + bias, as [T*B, I] x [I, 3U]."""
  x = tf.transpose(x, [1, 0, 2])
  return tf.reshape(tf.reshape(x, [-1, x.shape[-1]]) @ kernel,
                    [tf.shape(x)[0], tf.shape(x)[1], kernel.shape[-1]]) + bias


def _fused_gru_layer(gru, x: tf.Tensor, mask: tf.Tensor) -> List[tf.Tensor]:
  """What a Keras GRU or Bidirectional(GRU) layer returns, computed by fused_rnn."""
  if isinstance(gru, keras.layers.Bidirectional):
    forward, forward_state = _fused_gru(gru.forward_layer, x, mask)
    backward, backward_state = _fused_gru(gru.backward_layer, x, mask)
    outputs = tf.concat([forward, backward], -1)  # Bidirectional zeroes padded steps.
    outputs = tf.where(mask[:, :, None], outputs, tf.zeros_like(outputs))
    return [outputs, forward_state, backward_state]
  return list(_fused_gru(gru, x, mask))


def _fused_gru(gru: keras.layers.GRU, x: tf.Tensor, mask: tf.Tensor):
  """x [B,S,I] -> outputs [B,S,U] (in input order, also when go_backwards, as
  Bidirectional returns them), final state [B,U]."""
  cell, dtype = gru.cell, x.dtype
  kernel, recurrent_kernel, bias = (tf.cast(w, dtype) for w in (
      cell.kernel, cell.recurrent_kernel, cell.bias))
  inputs = _input_side(x, kernel, bias[0])
  mask = tf.transpose(mask)
  if gru.go_backwards:
    inputs, mask = inputs[::-1], mask[::-1]
  state = tf.zeros([tf.shape(x)[0], cell.units], dtype)
  states = fused_rnn.gru_scan(inputs, mask, state, recurrent_kernel, bias[1])
  final = states[-1]
  if gru.go_backwards:
    states = states[::-1]
  return tf.transpose(states, [1, 0, 2]), final


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


class TiedProjection(keras.layers.Layer):
  """logits = x @ E^T + b with E [V,E] the target embedding matrix, passed at call time
  (tied embeddings, Press & Wolf 2017): only the vocabulary-sized bias b is its own."""

  def __init__(self, units: int, **kwargs):
    super().__init__(**kwargs)
    self.units = units  # The vocabulary size, as a Dense(V) projection's (decode.py reads it).

  def build(self, x_shape, embeddings_shape):
    self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

  def call(self, x: tf.Tensor, embeddings: tf.Tensor) -> tf.Tensor:
    """x [..., E] -> [..., V] in x's dtype, as one [N,E] x [E,V] matmul."""
    logits = tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), tf.cast(embeddings, x.dtype),
                       transpose_b=True) + tf.cast(self.bias, x.dtype)
    return tf.reshape(logits, tf.concat([tf.shape(x)[:-1], [self.units]], 0))


class Decoder(keras.layers.Layer):
  """Embeds the previous token, concatenates it with the context, runs a GRU cell step.

  The cell receives its previous state (the seed tutorial's decoder dropped it,
  tensorflow/tensorflow#38248). The query of the attention is that previous state s_{i-1},
  as in the paper. The vocabulary projection is applied by the caller to all steps at once.

  With `num_layers` L > 1 (model.decoder_layers) the cells are stacked: layer 1 takes
  [context; embedded], layer k > 1 only layer k-1's new state (dropout on it in
  training); the query is the top layer's previous state and the logits come from the top
  layer. The state is one tensor [B, L*U] (layer 1 first), so decoding and beam search
  treat it as with one layer. `tie_embeddings` projects to the vocabulary with the target
  embedding matrix (through a units -> embed_dim Dense when they differ).
  """

  def __init__(self, vocab_size: int, embed_dim: int, units: int, dropout: float = 0.0,
               num_layers: int = 1, tie_embeddings: bool = False, **kwargs):
    super().__init__(**kwargs)
    policy = self.dtype_policy
    self.units, self.num_layers = units, num_layers
    self.embedding = keras.layers.Embedding(vocab_size, embed_dim, dtype=policy,
                                            name="embedding")
    self.attention = BahdanauAttention(units, dtype=policy, name="attention")
    self.cell = keras.layers.GRUCell(units, recurrent_initializer="glorot_uniform",
                                     dtype=policy, name="gru_cell")
    # Layers 2..L; their variables are new paths (gru_cell_1, ...), so L = 1 keeps today's.
    self.upper_cells = [keras.layers.GRUCell(units, recurrent_initializer="glorot_uniform",
                                             dtype=policy, name=f"gru_cell_{k}")
                        for k in range(1, num_layers)]
    self.dropout_rate, self.dropout_alg = dropout, None  # Seq2Seq sets the alg.
    self.output_to_embedding = None
    if tie_embeddings:
      if embed_dim != units:  # As OpenNMT and fairseq do; no bias (the logits have one).
        self.output_to_embedding = keras.layers.Dense(
            embed_dim, use_bias=False, dtype=policy, name="output_to_embedding")
      self.projection = TiedProjection(vocab_size, dtype=policy, name="tied_projection")
    else:
      self.projection = keras.layers.Dense(vocab_size, dtype=policy, name="projection")

  def step(self, embedded: tf.Tensor, state: tf.Tensor, values: tf.Tensor,
           keys: tf.Tensor, mask: tf.Tensor, layer_keep=None):
    """One decoder step: embedded [B,E], state [B,L*U] -> new state [B,L*U], weights
    [B,S]. layer_keep [L-1,B,U]: scaled dropout keep-masks of layers 2..L's inputs
    (`layer_keep_masks`; None = no dropout)."""
    states = tf.split(state, self.num_layers, axis=-1) if self.upper_cells else [state]
    context, attention_weights = self.attention(states[-1], values, keys, mask)
    x, _ = self.cell(tf.concat([context, embedded], axis=-1), states[0])
    new_states = [x]
    for k, (cell, previous) in enumerate(zip(self.upper_cells, states[1:])):
      x, _ = cell(x if layer_keep is None else x * layer_keep[k], previous)
      new_states.append(x)
    new_state = tf.concat(new_states, axis=-1) if self.upper_cells else x
    return new_state, attention_weights

  def layer_keep_masks(self, batch, time, dtype, training: bool, dropout_seed):
    """[T,L-1,B,U] scaled keep-masks for the inputs of layers 2..L at every step: layer
    k's is dropout of its [B,T,U] input with its own salt. None when none applies."""
    if not self.upper_cells or not training or not self.dropout_rate:
      return None
    ones = tf.ones([batch, time, self.units], dtype)
    masks = [dropout(ones, self.dropout_rate, dropout_seed, _DECODER_BETWEEN_LAYERS + k,
                     training, self.dropout_alg) for k in range(2, self.num_layers + 1)]
    return tf.transpose(tf.stack(masks), [2, 0, 1, 3])

  def teacher_forcing(self, embedded: tf.Tensor, state: tf.Tensor, values: tf.Tensor,
                      keys: tf.Tensor, mask: tf.Tensor, jit_attention: bool = False):
    """`step` over all T steps at once (one layer only): embedded [B,T,E] -> states
    [B,T,U], weights [B,T,S] f32. The embedded side of the GRU input is one matmul for
    all steps (`_input_side`); the context side depends on the step."""
    dtype, units = embedded.dtype, self.units
    kernel, recurrent_kernel, bias, w1, v = (tf.cast(w, dtype) for w in (
        self.cell.kernel, self.cell.recurrent_kernel, self.cell.bias,
        self.attention.W1.kernel, self.attention.V))
    states, attention_weights = fused_rnn.attention_gru_scan(
        _input_side(embedded, kernel[units:], bias[0]), state, values, keys, mask,
        tf.concat([w1, recurrent_kernel], 1), bias[1], kernel[:units], v, jit_attention)
    return tf.transpose(states, [1, 0, 2]), tf.transpose(attention_weights, [1, 0, 2])

  def logits(self, states: tf.Tensor, training: bool = False,
             dropout_seed=None) -> tf.Tensor:
    """Decoder states [..., L*U] (the top layer's U are used) -> float32 logits [..., V]."""
    if self.upper_cells:
      states = states[..., -self.units:]
    states = dropout(states, self.dropout_rate, dropout_seed, _DECODER_OUTPUT, training,
                     self.dropout_alg)
    if isinstance(self.projection, TiedProjection):
      if self.output_to_embedding is not None:
        states = self.output_to_embedding(states)
      return tf.cast(self.projection(states, self.embedding.embeddings), tf.float32)
    return tf.cast(self.projection(states), tf.float32)


class Seq2Seq(keras.layers.Layer):
  """Encoder + Decoder. `recurrence` (fused | keras | cudnn) picks how the GRUs run;
  `jit_decoder_step` XLA-compiles the decoder step (`step_fn`, used by decoding and by
  keras-recurrence teacher forcing) and fused_rnn's per-step attention math;
  `dropout_rng` (default | threefry) the generator of the dropout masks (`dropout`)."""

  def __init__(self, source_vocab_size: int, target_vocab_size: int, embed_dim: int,
               units: int, encoder_layers: int = 1, bidirectional: bool = False,
               dropout: float = 0.0, recurrence: str = "fused",
               jit_decoder_step: bool = False, decoder_layers: int = 1,
               tie_embeddings: bool = False, dropout_rng: str = "default", **kwargs):
    super().__init__(**kwargs)
    if recurrence not in ("fused", "keras", "cudnn"):
      raise ValueError(f"recurrence={recurrence!r}: resolve config.model.recurrence first "
                       "(trainer.distribute.resolve_modes).")
    if dropout_rng not in ("default", "threefry"):
      raise ValueError(f"dropout_rng={dropout_rng!r}: resolve config.model.dropout_rng "
                       "first (trainer.distribute.resolve_modes).")
    policy = self.dtype_policy
    self.encoder = Encoder(source_vocab_size, embed_dim, units, encoder_layers,
                           bidirectional, dropout, recurrence, dtype=policy, name="encoder")
    self.decoder = Decoder(target_vocab_size, embed_dim, units, dropout, decoder_layers,
                           tie_embeddings, dtype=policy, name="decoder")
    self.recurrence, self.jit_decoder_step = recurrence, jit_decoder_step
    self.encoder.dropout_alg = self.decoder.dropout_alg = (
        "threefry" if dropout_rng == "threefry" else None)
    self.step_fn: Callable = (tf.function(self.decoder.step, jit_compile=True)
                              if jit_decoder_step else self.decoder.step)

  def build(self, *shapes):
    """Sublayers build on the first call (see `create_model`)."""

  def encode(self, source: tf.Tensor, training: bool = False, dropout_seed=None):
    """source [B,S] int -> (values [B,S,U], keys [B,S,U], mask [B,S], state [B,L*U]):
    the decoder's initial state is the encoder's final state in each of its L layers."""
    values, state = self.encoder(source, training=training, dropout_seed=dropout_seed)
    if self.decoder.upper_cells:
      state = tf.tile(state, [1, self.decoder.num_layers])
    keys = self.decoder.attention.precompute_keys(values)
    return values, keys, tf.not_equal(source, 0), state

  def call(self, source: tf.Tensor, target_in: tf.Tensor, training: bool = False,
           dropout_seed=None):
    """Teacher forcing: source [B,S], target_in [B,T] -> logits [B,T,V] f32, weights [B,T,S].
    `dropout_seed`: [2] int, required when training with model.dropout > 0."""
    values, keys, mask, state = self.encode(source, training, dropout_seed)
    embedded = dropout(self.decoder.embedding(target_in), self.decoder.dropout_rate,
                       dropout_seed, _DECODER_EMBEDDING, training, self.decoder.dropout_alg)
    # fused_rnn's scan runs one cell: stacked decoder layers run step by step (autodiff).
    if (self.recurrence != "keras" and self.decoder.cell.built
        and not self.decoder.upper_cells):
      states, attention_weights = self.decoder.teacher_forcing(
          embedded, state, values, keys, mask, self.jit_decoder_step)
      return self.decoder.logits(states, training, dropout_seed), attention_weights

    # The first call (create_model) builds the cell's variables: not inside an XLA function.
    step_fn = self.step_fn if self.decoder.cell.built else self.decoder.step
    layer_keep = self.decoder.layer_keep_masks(
        tf.shape(target_in)[0], tf.shape(target_in)[1], embedded.dtype, training,
        dropout_seed)

    def body(carry, inputs):
      state, _ = carry
      if layer_keep is None:
        return step_fn(inputs, state, values, keys, mask)
      return step_fn(inputs[0], state, values, keys, mask, inputs[1])

    init = (state, tf.zeros(tf.shape(source), tf.float32))
    elems = tf.transpose(embedded, [1, 0, 2])
    # tf.scan keeps the time loop in-graph (one while loop), not Python-unrolled.
    states, attention_weights = tf.scan(
        body, elems if layer_keep is None else (elems, layer_keep), init)
    states = tf.transpose(states, [1, 0, 2])
    return (self.decoder.logits(states, training, dropout_seed),
            tf.transpose(attention_weights, [1, 0, 2]))


def create_model(config, source_vocab_size: int, target_vocab_size: int,
                 policy: str = "float32") -> Seq2Seq:
  """Builds a Seq2Seq from `config.model` and `config.train.xla` (both resolved by
  trainer.distribute.resolve_modes), creating its variables with a dummy batch. A run's
  config.json from before model.decoder_layers / tie_embeddings / dropout_rng existed gets
  their defaults (1, False, default): today's variables and math. An unresolved
  dropout_rng=auto is the default generator (only resolve_modes knows the XLA scope)."""
  m = config.model
  model = Seq2Seq(source_vocab_size, target_vocab_size, m.embed_dim, m.units,
                  m.encoder_layers, m.bidirectional, m.dropout, m.recurrence,
                  jit_decoder_step=config.train.xla == "decoder_step",
                  decoder_layers=m.get("decoder_layers", 1),
                  tie_embeddings=m.get("tie_embeddings", False),
                  dropout_rng=m.get("dropout_rng", "default").replace("auto", "default"),
                  dtype=policy, name="seq2seq")
  # Variables must exist before the decoder step runs inside a while loop.
  dummy = tf.ones([1, 2], tf.int32)
  model(dummy, dummy)
  return model
