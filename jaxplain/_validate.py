"""Input checks shared by the primitives (private).

Checks on values (finite, range) run only when the value is concrete: inside ``jax.jit`` or
``jax.vmap`` the arrays are tracers and only shapes can be checked. Every message names the
argument and what was expected.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds real values (not a tracer under jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_batched(x: Any, name: str = "x", *, min_rank: int = 2) -> jax.Array:
  """Check that ``x`` is a floating array of rank >= ``min_rank`` with a leading batch axis,
  and finite where concrete. Returns ``jnp.asarray(x)``."""
  x = jnp.asarray(x)
  if x.ndim < min_rank:
    raise ValueError(
        f"{name}: expected a batched array of rank >= {min_rank} with the batch axis first, "
        f"e.g. (B, H, W, C); got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
  check_finite(x, name)
  return x


def check_finite(x: Any, name: str) -> None:
  """Raise ``ValueError`` if a concrete ``x`` holds NaN or inf."""
  if is_concrete(x):
    arr = np.asarray(x)
    if not np.all(np.isfinite(arr)):
      bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
      raise ValueError(f"{name}: contains {bad} non-finite value(s) (NaN or inf)")


def check_target(target: Any, batch: int, num_classes: int | None = None,
                 name: str = "target") -> jax.Array:
  """Normalise ``target`` (an int or a (B,) int array) to a (B,) int32 array.

  Raises a clear error on a wrong shape, a non-integer dtype, or (when concrete and
  ``num_classes`` is known) an index outside ``[0, num_classes)``.
  """
  t = jnp.asarray(target)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise TypeError(f"{name}: expected an int or a (B,) integer array, got dtype {t.dtype}")
  if t.ndim == 0:
    t = jnp.broadcast_to(t, (batch,))
  elif t.shape != (batch,):
    raise ValueError(f"{name}: expected an int or shape ({batch},) to match the batch, "
                     f"got shape {t.shape}")
  if num_classes is not None and is_concrete(t):
    tn = np.asarray(t)
    if tn.size and (tn.min() < 0 or tn.max() >= num_classes):
      raise ValueError(f"{name}: class index out of range [0, {num_classes}): "
                       f"got values in [{tn.min()}, {tn.max()}]")
  return t.astype(jnp.int32)


def select_target(logits: jax.Array, target: jax.Array) -> jax.Array:
  """``logits[b, target[b]]`` for each example: (B, K), (B,) -> (B,)."""
  return jnp.take_along_axis(logits, target[:, None].astype(jnp.int32), axis=1)[:, 0]


def check_logits(out: Any, batch: int, name: str = "f(x)") -> jax.Array:
  """Check that a model output is (B, K) logits."""
  if out.ndim != 2 or out.shape[0] != batch:
    raise ValueError(f"{name}: the model must return logits of shape (B, K) = ({batch}, K); "
                     f"got shape {out.shape}")
  return out
