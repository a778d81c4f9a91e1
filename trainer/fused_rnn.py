"""The encoder GRU and the attention decoder over all time steps, with backward passes by hand.

Why: autodiff of a while loop differentiates each step on its own, so every weight
gradient becomes T small matmuls of B rows, summed step by step. Here the backward loop
carries only the state gradient; weight gradients are formed after the loop as one matmul
over all T*B rows, as cuDNN's RNN kernels do. Together with computing the input side of
every step in one matmul before the loop, this roughly halves the train step on a CPU
(README, Performance). Same math as the Keras layers in model.py; tests/test_fused_rnn.py
checks values and gradients against them.

GRU as in Keras (reset_after=True): x and h are the input-side and recurrent-side
pre-activations [B,3U], split in thirds (z, r, n):
  z = sigmoid(x_z + h_z),  r = sigmoid(x_r + h_r),  n = tanh(x_n + r * h_n),
  s' = z * s + (1 - z) * n.
All sequences are time-major here: [T, B, ...].
"""
from typing import Callable, Sequence, Tuple

import tensorflow as tf

NEG_INF = -1e9  # Added to padded attention scores; exp() of it is exactly 0 in float32.


def _gates(x: tf.Tensor, h: tf.Tensor):
  """(z, r, n, h_n) of one GRU step from input-side x and recurrent-side h [B,3U]."""
  x_z, x_r, x_n = tf.split(x, 3, axis=-1)
  h_z, h_r, h_n = tf.split(h, 3, axis=-1)
  z, r = tf.sigmoid(x_z + h_z), tf.sigmoid(x_r + h_r)
  return z, r, tf.tanh(x_n + r * h_n), h_n


def _gates_backward(ds, s, z, r, n, h_n):
  """ds = dL/ds' -> (dL/dx [B,3U], dL/dh [B,3U], the part of dL/ds through z * s)."""
  dz = ds * (s - n) * z * (1 - z)
  dn = ds * (1 - z) * (1 - n * n)
  dr = dn * h_n * r * (1 - r)
  return tf.concat([dz, dr, dn], -1), tf.concat([dz, dr, dn * r], -1), ds * z


def _backward_loop(steps, body: Callable, carry: Sequence[tf.Tensor],
                   outputs: Sequence[tf.DType]):
  """Runs body(t, *carry) -> (carry, per-step outputs) for t = steps-1 .. 0; returns the
  final carry and each output stacked in time order [T, ...].

  Bodies multiply by kernels transposed once before the loop: a [B,N] x [N,K] matmul
  is ~20% faster than [B,N] x [K,N]^T with transpose_b at B=64 on CPU (oneDNN).
  """
  arrays = tuple(tf.TensorArray(dtype, size=steps) for dtype in outputs)

  def loop(t, carry, arrays):
    carry, values = body(t, *carry)
    return t - 1, carry, tuple(a.write(t, v) for a, v in zip(arrays, values))

  _, carry, arrays = tf.while_loop(lambda t, *_: t >= 0, loop,
                                   (steps - 1, tuple(carry), arrays))
  return carry, tuple(a.stack() for a in arrays)


def _rows(x: tf.Tensor) -> tf.Tensor:
  """[T,B,N] -> [T*B,N], to form a weight gradient over all steps in one matmul."""
  return tf.reshape(x, [-1, x.shape[-1]])


def gru_scan(inputs: tf.Tensor, mask: tf.Tensor, state: tf.Tensor,
             recurrent_kernel: tf.Tensor, recurrent_bias: tf.Tensor) -> tf.Tensor:
  """Masked GRU: inputs [T,B,3U] (x @ kernel + input bias, for all steps), mask [T,B]
  bool, state [B,U] -> states [T,B,U]. A masked step keeps the state, as in Keras."""

  @tf.custom_gradient
  def scan(inputs, state, recurrent_kernel, recurrent_bias):
    def step(carry, inputs_t):
      s, (x, m) = carry[0], inputs_t
      z, r, n, h_n = _gates(x, s @ recurrent_kernel + recurrent_bias)
      return tf.where(m[:, None], z * s + (1 - z) * n, s), z, r, n, h_n

    zeros = tf.zeros_like(state)
    states, z, r, n, h_n = tf.scan(step, (inputs, mask), (state,) + (zeros,) * 4)
    previous = tf.concat([state[None], states[:-1]], 0)

    def grad(d_states):
      recurrent_kernel_t = tf.transpose(recurrent_kernel)  # See _backward_loop.

      def step_back(t, ds):
        ds = ds + d_states[t]
        m = tf.cast(mask[t][:, None], ds.dtype)
        dx, dh, ds_z = _gates_backward(ds * m, previous[t], z[t], r[t], n[t], h_n[t])
        ds = ds * (1 - m) + ds_z + dh @ recurrent_kernel_t
        return (ds,), (dx, dh)

      (d_state,), (dx, dh) = _backward_loop(tf.shape(inputs)[0], step_back, (zeros,),
                                            (state.dtype, state.dtype))
      return (dx, d_state, tf.matmul(_rows(previous), _rows(dh), transpose_a=True),
              tf.reduce_sum(_rows(dh), 0))

    return states, grad

  return scan(inputs, state, recurrent_kernel, recurrent_bias)


def _attend(keys, query, v, mask, values):
  """query [B,U] -> attention weights [B,S] f32 = softmax(V^T tanh(keys + W1 s)), context [B,U]."""
  score = tf.cast(tf.linalg.matvec(tf.tanh(keys + query[:, None, :]), v), tf.float32)
  weights = tf.nn.softmax(tf.where(mask, score, NEG_INF), -1)
  return weights, tf.einsum("bs,bsu->bu", tf.cast(weights, values.dtype), values)


def _attend_backward(keys, query, v, d_score, d_keys):
  """d_score [B,S] -> tanh(keys + W1 s) (recomputed: cheaper than keeping T of them),
  dL/d(W1 s) [B,U], and d_keys plus this step's dL/dkeys [B,S,U]."""
  a = tf.tanh(keys + query[:, None, :])
  d_pre = d_score[:, :, None] * v * (1 - a * a)
  return a, tf.reduce_sum(d_pre, 1), d_keys + d_pre


# The same functions as single XLA kernels: fusing their [B,S,U] elementwise chains makes
# them ~2x faster on CPU (the matmuls around them stay outside, where oneDNN is faster).
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

  @tf.custom_gradient
  def scan(inputs, state, values, keys, query_kernel, recurrent_bias, context_kernel, v):
    def step(carry, x):
      s = carry[0]
      h = s @ query_kernel
      query, h = h[:, :units], h[:, units:] + recurrent_bias
      weights, context = attend(keys, query, v, mask, values)
      z, r, n, h_n = _gates(context @ context_kernel + x, h)
      return z * s + (1 - z) * n, weights, query, context, z, r, n, h_n

    zeros = tf.zeros_like(state)
    init = (state, tf.zeros(tf.shape(mask), tf.float32)) + (zeros,) * 6
    states, weights, query, context, z, r, n, h_n = tf.scan(step, inputs, init)
    previous = tf.concat([state[None], states[:-1]], 0)

    def grad(d_states, d_weights):
      d_weights = tf.zeros_like(weights) if d_weights is None else d_weights
      query_kernel_t, context_kernel_t = tf.transpose(query_kernel), tf.transpose(
          context_kernel)  # See _backward_loop.

      def step_back(t, ds, d_keys, d_v):
        ds = ds + d_states[t]
        dx, dh, ds_z = _gates_backward(ds, previous[t], z[t], r[t], n[t], h_n[t])
        d_context = dx @ context_kernel_t
        w = weights[t]
        dw = tf.cast(tf.einsum("bu,bsu->bs", d_context, values), tf.float32) + d_weights[t]
        d_score = tf.cast(w * (dw - tf.reduce_sum(w * dw, -1, keepdims=True)), keys.dtype)
        a, d_query, d_keys = attend_backward(keys, query[t], v, d_score, d_keys)
        dh = tf.concat([d_query, dh], -1)
        ds = ds_z + dh @ query_kernel_t
        d_v += tf.cast(tf.linalg.matvec(_rows(a), tf.reshape(d_score, [-1]),
                                        transpose_a=True), tf.float32)
        return (ds, d_keys, d_v), (dx, dh, d_context)

      carry = (zeros, tf.zeros_like(keys), tf.zeros(tf.shape(v), tf.float32))
      (d_state, d_keys, d_v), (dx, dh, d_context) = _backward_loop(
          tf.shape(inputs)[0], step_back, carry, (state.dtype,) * 3)
      d_values = tf.matmul(tf.transpose(tf.cast(weights, d_context.dtype), [1, 2, 0]),
                           tf.transpose(d_context, [1, 0, 2]))  # [B,S,T] x [B,T,U].
      return (dx, d_state, d_values, d_keys,
              tf.matmul(_rows(previous), _rows(dh), transpose_a=True),
              tf.reduce_sum(_rows(dh)[:, units:], 0),
              tf.matmul(_rows(context), _rows(dx), transpose_a=True), tf.cast(d_v, v.dtype))

    return (states, weights), grad

  return scan(inputs, state, values, keys, query_kernel, recurrent_bias, context_kernel, v)
