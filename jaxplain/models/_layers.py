"""Layers shared by the model zoo.

``max_pool_2x2`` is a 2x2/stride-2 max pool whose value and gradient are identical to
``flax.linen.max_pool`` (the gradient goes to the single arg-max, the first in row-major
window order on ties), but cheaper on XLA:CPU, where the stock ``reduce_window`` backward
pass (select-and-scatter) dominates saliency cost. Plain ``reshape(...).max()`` is *not* a
substitute: it splits the gradient among tied values (at an all-zero Integrated-Gradients
baseline everything ties).

The value is the four strided window corners combined by selects (no transposed copy of the
input); the derivative (a ``custom_jvp``) routes the tangent through the one-hot of the
window's arg-max, so for a fixed routing the pool is linear in its input: the "route to the
max" rule of WBP (seed 004, Table 1). Measured on the 2-core Intel Xeon (jaxlib 0.10.2,
``jaxplain.gradient``, medians of separate processes, ms):

=====================================  ==============  ===============  ================
network (batch)                        one-hot only    corners only     corners + one-hot
=====================================  ==============  ===============  ================
LeNet (512): forward / gradient        22-25 / 55-56   19-20 / 82-84    20-21 / 50-51
SmallCNN (64): forward / gradient      30-41 / 81-82   22-26 / 60       23-24 / 58-62
=====================================  ==============  ===============  ================

(the corners' own derivative is a chain of selects whose transposes are strided, interior
padded copies: slow for LeNet's 6-channel maps; the one-hot forward copies the input
transposed: slow for SmallCNN's 64-channel maps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pool, stride 2, on (B, H, W, C) or (H, W, C) with even H and W.

  Args:
    x: input of shape (..., H, W, C); H and W must be even.

  Returns:
    Array of shape (..., H // 2, W // 2, C).

  >>> import jax.numpy as jnp
  >>> x = jnp.arange(16.).reshape(1, 4, 4, 1)
  >>> max_pool_2x2(x)[0, :, :, 0]
  Array([[ 5.,  7.],
         [13., 15.]], dtype=float32)
  """
  *lead, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"max_pool_2x2: spatial size must be even, got x.shape={x.shape}")
  return _max_pool(x)


def _corners(x: jax.Array) -> jax.Array:
  # The four strided corners of each window in row-major order; each later corner replaces the
  # running max only where it is strictly larger (or NaN): the first maximum wins, NaN
  # propagates (as reduce_window). Slices and selects: no transposed copy of the input.
  corners = [x[..., i::2, j::2, :] for i in (0, 1) for j in (0, 1)]
  out = corners[0]
  for y in corners[1:]:
    out = jnp.where((y > out) | jnp.isnan(y), y, out)
  return out


def _windows(x: jax.Array) -> jax.Array:
  """(..., H, W, C) -> (..., H/2, W/2, C, 4): each window's 4 values in row-major order."""
  *lead, h, w, c = x.shape
  n = len(lead)
  xr = x.reshape(*lead, h // 2, 2, w // 2, 2, c)
  return jnp.moveaxis(xr, (n + 1, n + 3), (-2, -1)).reshape(*lead, h // 2, w // 2, c, 4)


@jax.custom_jvp
def _max_pool(x: jax.Array) -> jax.Array:
  return _corners(x)


@_max_pool.defjvp
def _max_pool_jvp(primals, tangents):
  (x,), (tx,) = primals, tangents
  # the tangent goes through the first arg-max of each window (argmax: first on ties), a
  # constant routing: linear in tx, and its transpose is one multiply and transposed copy
  route = jax.nn.one_hot(jnp.argmax(_windows(x), axis=-1), 4, dtype=tx.dtype)
  return _corners(x), jnp.sum(_windows(tx) * route, axis=-1)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 average pool, stride 2, on (..., H, W, C) with even H and W."""
  *lead, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"avg_pool_2x2: spatial size must be even, got x.shape={x.shape}")
  return x.reshape(*lead, h // 2, 2, w // 2, 2, c).mean(axis=(len(lead) + 1, len(lead) + 3))
