"""Layers shared by the model zoo.

``max_pool_2x2`` is a 2x2/stride-2 max pool written as reshape + max with an argmax one-hot
routing mask under ``stop_gradient``. Its forward value and its gradient are identical to
``flax.linen.max_pool`` (the gradient goes to the single arg-max, first index on ties), but
it is much faster to differentiate on XLA CPU, where the stock ``reduce_window`` backward
pass (select-and-scatter) dominates saliency cost. Plain ``reshape(...).max()`` is *not* a
substitute: it splits the gradient among tied values (at an all-zero Integrated-Gradients
baseline everything ties).

Because the routing mask is a constant (``stop_gradient``), the pool is linear in its input
for a fixed mask, which is exactly the "route to the max" rule of WBP (seed 004, Table 1).
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
  # The four strided corners of each window in row-major order; each later corner replaces the
  # running max only where it is strictly larger (or NaN), so the value and the gradient go
  # to the first maximum, as flax's reduce_window max_pool. Slices and selects: no transposed
  # copy of the input (the earlier argmax / one-hot form took 16 ms for a 64x32x32x64 pool on
  # XLA:CPU).
  corners = [x[..., i::2, j::2, :] for i in (0, 1) for j in (0, 1)]
  out = corners[0]
  for y in corners[1:]:
    out = jnp.where((y > out) | jnp.isnan(y), y, out)
  return out


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 average pool, stride 2, on (..., H, W, C) with even H and W."""
  *lead, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"avg_pool_2x2: spatial size must be even, got x.shape={x.shape}")
  return x.reshape(*lead, h // 2, 2, w // 2, 2, c).mean(axis=(len(lead) + 1, len(lead) + 3))
