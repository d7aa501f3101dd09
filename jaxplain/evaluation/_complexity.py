"""Complexity metrics: sparseness (Gini index) and complexity (entropy), per example.

Both act on ``|a|`` over all elements of each example's attribution (any rank), as Quantus's
``Sparseness`` and ``Complexity`` with ``abs=True``; their ``normalise`` (division by the
maximum) does not change either value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _validate
from jaxplain.evaluation import _common as C

Array = jax.Array

__all__ = ["sparseness", "complexity"]


def _abs_flat(attributions: Array) -> Array:
  a = _validate.as_float(attributions)
  if a.ndim < 2:
    raise ValueError(f"attributions: expected a batch (B, ...) with at least one feature axis, "
                     f"got shape {a.shape}")
  _validate.check_finite(a, "attributions")
  return jnp.abs(C.flat(a))


def sparseness(attributions: Array, *, eps: float = 1e-7) -> Array:
  """Sparseness: the Gini index of ``|a|`` (Chalasani et al. 2020; Hurley & Rickard 2009).

  ``G = sum_i (2 i - n - 1) a_(i) / (n sum_i a_(i))`` over the sorted values
  ``a_(1) <= .. <= a_(n)`` of ``|a| + eps`` (``eps`` as Quantus, so an all-zero map is 0).
  1 = all mass on one feature, 0 = uniform.

  Args:
    attributions: ``(B, ...)``.
    eps: added to ``|a|`` before sorting.

  Returns:
    ``(B,)``.

  >>> import jax.numpy as jnp
  >>> [round(v, 4) for v in sparseness(jnp.array([[0.0, 0.0, 0.0, 1.0], [1.0, 1, 1, 1]]),
  ...                                  eps=0.0).tolist()]
  [0.75, 0.0]
  """
  a = _abs_flat(attributions) + eps
  # non-negative floats sort as their bit patterns (no NaN: attributions are finite); XLA's
  # CPU sort of one integer operand is ~4x faster than its float comparator sort, and NumPy's
  # (SIMD) sort another ~7x (256 x 3072 values: 3.8 vs 27 ms), so on the CPU the rows are
  # sorted by NumPy through a callback; other backends keep XLA's sort.
  bits = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[a.dtype.itemsize]
  a = jax.lax.bitcast_convert_type(
      jax.lax.platform_dependent(jax.lax.bitcast_convert_type(a, bits), cpu=_host_sort_rows,
                                 default=lambda b: jax.lax.sort(b, dimension=1,
                                                                is_stable=False)),
      a.dtype)
  n = a.shape[-1]
  i = jnp.arange(1, n + 1, dtype=a.dtype)
  tot = jnp.sum(a, axis=-1)
  g = jnp.sum((2.0 * i - n - 1.0)[None] * a, axis=-1) / (n * jnp.where(tot > 0, tot, 1.0))
  return jnp.where(tot > 0, g, 0.0)


def _host_sort_rows(b: Array) -> Array:
  """``b`` (B, n) sorted along its rows by ``numpy.sort`` (a ``jax.pure_callback``)."""
  return jax.pure_callback(lambda v: np.sort(v, axis=-1),
                           jax.ShapeDtypeStruct(b.shape, b.dtype), b,
                           vmap_method="broadcast_all")


def complexity(attributions: Array) -> Array:
  """Complexity: the entropy of the normalised map ``p = |a| / sum |a|`` (Bhatt et al. 2020).

  ``H = -sum_i p_i log p_i`` in nats (``0 log 0 = 0``; Quantus adds ``1e-12`` inside the log).
  ``log k`` for a map spread evenly over ``k`` features.

  Args:
    attributions: ``(B, ...)``.

  Returns:
    ``(B,)``.

  >>> import jax.numpy as jnp
  >>> round(float(complexity(jnp.array([[0.0, 2.0, 2.0, 0.0]]))[0]), 4)   # log 2
  0.6931
  """
  a = _abs_flat(attributions)
  tot = jnp.sum(a, axis=-1, keepdims=True)
  p = a / jnp.where(tot > 0, tot, 1.0)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
