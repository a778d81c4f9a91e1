"""The encoder GRU and the attention decoder over all time steps, with backward passes by hand.

Why: autodiff of a while loop differentiates each step on its own, so every weight
gradient becomes T small matmuls of B rows, summed step by step. Here the backward loop
carries only the state gradient; weight gradients are formed after the loop as one matmul
over all T*B rows, as cuDNN's RNN kernels do. Together with computing the input side of
every step in one matmul before the loop, this roughly halves the train step on a CPU
(docs/performance.md). Same math as the Keras layers in model.py; tests/test_fused_rnn.py
checks values and gradients against them.

Inside the loops every per-step tensor is feature-major: the state is [U,B], not [B,U],
and each step multiplies W^T [3U,U] x s [U,B]. With B = 64 that product runs at 127-136
GFLOP/s on this 2-core CPU against 73-78 for s [B,U] x W [U,3U] (oneDNN picks a better
blocking when the long dimension is the left operand's rows; `python -m benchmarks.compare`
numbers in docs/performance.md). Inputs and outputs keep the usual [T,B,...] / [B,S,U] layouts;
the transposes happen once per call, outside the loops.

GRU as in Keras (reset_after=True): x and h are the input-side and recurrent-side
pre-activations [3U,B], split in thirds (z, r, n) along the feature axis:
  z = sigmoid(x_z + h_z),  r = sigmoid(x_r + h_r),  n = tanh(x_n + r * h_n),
  s' = z * s + (1 - z) * n.
"""
from typing import Callable, Sequence, Tuple

import tensorflow as tf

NEG_INF = -1e9  # Added to padded attention scores; exp() of it is exactly 0 in float32.


def _fm(x: tf.Tensor) -> tf.Tensor:
  """Swaps the last two axes: [..., B, N] <-> [..., N, B] (batch- <-> feature-major)."""
  return tf.linalg.matrix_transpose(x)


def _gates(x: tf.Tensor, h: tf.Tensor):
  """(z, r, n, h_n) of one GRU step from input-side x and recurrent-side h [3U,B]."""
  x_z, x_r, x_n = tf.split(x, 3, axis=0)
  h_z, h_r, h_n = tf.split(h, 3, axis=0)
  z, r = tf.sigmoid(x_z + h_z), tf.sigmoid(x_r + h_r)
  return z, r, tf.tanh(x_n + r * h_n), h_n


def _gates_backward(ds, s, z, r, n, h_n):
  """ds = dL/ds' [U,B] -> (dL/dx [3U,B], dL/dh [3U,B], the part of dL/ds through z * s)."""
  dz = ds * (s - n) * z * (1 - z)
  dn = ds * (1 - z) * (1 - n * n)
  dr = dn * h_n * r * (1 - r)
  return tf.concat([dz, dr, dn], 0), tf.concat([dz, dr, dn * r], 0), ds * z


def _backward_loop(steps, body: Callable, carry: Sequence[tf.Tensor],
                   outputs: Sequence[tf.DType]):
  """Runs body(t, *carry) -> (carry, per-step outputs) for t = steps-1 .. 0; returns the
  final carry and each output stacked in time order [T, ...]."""
  arrays = tuple(tf.TensorArray(dtype, size=steps) for dtype in outputs)

  def loop(t, carry, arrays):
    carry, values = body(t, *carry)
    return t - 1, carry, tuple(a.write(t, v) for a, v in zip(arrays, values))

  _, carry, arrays = tf.while_loop(lambda t, *_: t >= 0, loop,
                                   (steps - 1, tuple(carry), arrays))
  return carry, tuple(a.stack() for a in arrays)


def _weight_grad(inputs: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
  """sum_t inputs_t grads_t^T for feature-major [T,N,B] and [T,K,B] -> [N,K], as one
  [T*B,N]^T x [T*B,K] matmul over all steps."""
  def rows(x):
    return tf.reshape(_fm(x), [-1, x.shape[1]])
  return tf.matmul(rows(inputs), rows(grads), transpose_a=True)


def gru_scan(inputs: tf.Tensor, mask: tf.Tensor, state: tf.Tensor,
             recurrent_kernel: tf.Tensor, recurrent_bias: tf.Tensor) -> tf.Tensor:
  """Masked GRU: inputs [T,B,3U] (x @ kernel + input bias, for all steps), mask [T,B]
  bool, state [B,U] -> states [T,B,U]. A masked step keeps the state, as in Keras."""

  @tf.custom_gradient
  def scan(inputs, state, recurrent_kernel, recurrent_bias):
    kernel_t, bias = tf.transpose(recurrent_kernel), recurrent_bias[:, None]

    def step(carry, inputs_t):
      s, (x, m) = carry[0], inputs_t
      z, r, n, h_n = _gates(x, kernel_t @ s + bias)
      return tf.where(m[None], z * s + (1 - z) * n, s), z, r, n, h_n

    state_fm = _fm(state)
    zeros = tf.zeros_like(state_fm)
    states, z, r, n, h_n = tf.scan(step, (_fm(inputs), mask), (state_fm,) + (zeros,) * 4)
    previous = tf.concat([state_fm[None], states[:-1]], 0)

    def grad(d_states):
      d_states = _fm(d_states)

      def step_back(t, ds):
        ds = ds + d_states[t]
        m = tf.cast(mask[t][None], ds.dtype)
        dx, dh, ds_z = _gates_backward(ds * m, previous[t], z[t], r[t], n[t], h_n[t])
        ds = ds * (1 - m) + ds_z + recurrent_kernel @ dh
        return (ds,), (dx, dh)

      (d_state,), (dx, dh) = _backward_loop(tf.shape(inputs)[0], step_back, (zeros,),
                                            (state.dtype, state.dtype))
      return (_fm(dx), _fm(d_state), _weight_grad(previous, dh),
              tf.reduce_sum(dh, [0, 2]))

    return _fm(states), grad

  return scan(inputs, state, recurrent_kernel, recurrent_bias)


def _attend(keys, query, v, mask, values):
  """Feature-major: keys, values [S,U,B], query [U,B], v [U,1], mask [S,B] -> attention
  weights [S,B] f32 = softmax over S of V^T tanh(keys + W1 s), context [U,B]."""
  score = tf.cast(tf.reduce_sum(tf.tanh(keys + query[None]) * v, 1), tf.float32)
  weights = tf.nn.softmax(tf.where(mask, score, NEG_INF), 0)
  return weights, tf.reduce_sum(tf.cast(weights, values.dtype)[:, None] * values, 0)


def _attend_backward(keys, query, v, d_score, d_keys):
  """d_score [S,B] -> tanh(keys + W1 s) (recomputed: cheaper than keeping T of them),
  dL/d(W1 s) [U,B], and d_keys [S,U,B] plus this step's dL/dkeys. d_keys is float32 under
  mixed precision too: a running sum of T terms rounded to bf16's 8 bits each step drifts
  (tests/test_fused_rnn.py measures it)."""
  a = tf.tanh(keys + query[None])
  d_pre = d_score[:, None] * v * (1 - a * a)
  return a, tf.reduce_sum(d_pre, 0), d_keys + tf.cast(d_pre, tf.float32)


# The same functions as single XLA kernels: fusing their [S,U,B] elementwise chains makes
# them ~1.5x faster on CPU (the matmuls around them stay outside, where oneDNN is faster).
_attend_xla = tf.function(_attend, jit_compile=True)
_attend_backward_xla = tf.function(_attend_backward, jit_compile=True)


def attention_gru_scan(inputs: tf.Tensor, state: tf.Tensor, values: tf.Tensor,
                       keys: tf.Tensor, mask: tf.Tensor, query_kernel: tf.Tensor,
                       recurrent_bias: tf.Tensor, context_kernel: tf.Tensor, v: tf.Tensor,
                       jit_attention: bool = False) -> Tuple[tf.Tensor, tf.Tensor]:
  """The teacher-forced Bahdanau decoder: every step attends with s_{i-1}, then runs the
  GRU on [context; embedded].

  inputs [T,B,3U]: embedded @ kernel[U:] + input bias; state [B,U]; values, keys [B,S,U];
  mask [B,S] bool; query_kernel [U,4U] = [W1 | recurrent_kernel] (s_{i-1} is both the
  attention query and the GRU's recurrent input: one matmul); context_kernel [U,3U] =
  kernel[:U]; v [U]. Returns states [T,B,U] and attention weights [T,B,S] float32.
  jit_attention runs the attention's elementwise math as XLA kernels.
  """
  units = state.shape[-1]
  attend, attend_backward = ((_attend_xla, _attend_backward_xla) if jit_attention
                             else (_attend, _attend_backward))
  mask = tf.transpose(mask)  # [S,B]

  @tf.custom_gradient
  def scan(inputs, state, values, keys, query_kernel, recurrent_bias, context_kernel, v):
    values_fm, keys_fm = (tf.transpose(x, [1, 2, 0]) for x in (values, keys))  # [S,U,B]
    query_kernel_t, context_kernel_t = tf.transpose(query_kernel), tf.transpose(
        context_kernel)
    bias, v_col = recurrent_bias[:, None], v[:, None]

    def step(carry, x):
      s = carry[0]
      h = query_kernel_t @ s
      query, h = h[:units], h[units:] + bias
      weights, context = attend(keys_fm, query, v_col, mask, values_fm)
      z, r, n, h_n = _gates(context_kernel_t @ context + x, h)
      return z * s + (1 - z) * n, weights, query, context, z, r, n, h_n

    state_fm = _fm(state)
    zeros = tf.zeros_like(state_fm)
    init = (state_fm, tf.zeros(tf.shape(mask), tf.float32)) + (zeros,) * 6
    states, weights, query, context, z, r, n, h_n = tf.scan(step, _fm(inputs), init)
    previous = tf.concat([state_fm[None], states[:-1]], 0)

    def grad(d_states, d_weights):
      d_states = _fm(d_states)
      d_weights = tf.zeros_like(weights) if d_weights is None else _fm(d_weights)

      def step_back(t, ds, d_keys, d_v):
        ds = ds + d_states[t]
        dx, dh, ds_z = _gates_backward(ds, previous[t], z[t], r[t], n[t], h_n[t])
        d_context = context_kernel @ dx
        w = weights[t]
        dw = (tf.cast(tf.reduce_sum(d_context[None] * values_fm, 1), tf.float32)
              + d_weights[t])
        d_score = tf.cast(w * (dw - tf.reduce_sum(w * dw, 0, keepdims=True)), keys.dtype)
        a, d_query, d_keys = attend_backward(keys_fm, query[t], v_col, d_score, d_keys)
        dh = tf.concat([d_query, dh], 0)
        ds = ds_z + query_kernel @ dh
        d_v += tf.cast(tf.reduce_sum(a * d_score[:, None], [0, 2]), tf.float32)
        return (ds, d_keys, d_v), (dx, dh, d_context)

      # Sums over the T steps are carried in float32 also under mixed precision.
      carry = (zeros, tf.zeros(tf.shape(keys_fm), tf.float32),
               tf.zeros(tf.shape(v), tf.float32))
      (d_state, d_keys, d_v), (dx, dh, d_context) = _backward_loop(
          tf.shape(inputs)[0], step_back, carry, (state.dtype,) * 3)
      # d_values[b] = weights[b]^T [S,T] x d_context[b] [T,U], batch-major.
      d_values = tf.matmul(tf.transpose(tf.cast(weights, d_context.dtype), [2, 1, 0]),
                           tf.transpose(d_context, [2, 0, 1]))
      d_keys = tf.cast(tf.transpose(d_keys, [2, 0, 1]), keys.dtype)
      return (_fm(dx), _fm(d_state), d_values, d_keys,
              _weight_grad(previous, dh), tf.reduce_sum(dh[:, units:], [0, 2]),
              _weight_grad(context, dx), tf.cast(d_v, v.dtype))

    return (_fm(states), _fm(weights)), grad

  return scan(inputs, state, values, keys, query_kernel, recurrent_bias, context_kernel, v)
