"""Localisation metrics against a ground-truth mask: relevance mass / rank accuracy (Arras et
al. 2022), the pointing game (Zhang et al. 2018) and the ROC AUC of the map as a detector.

``mask`` is a boolean ground truth shaped like the attribution (any rank, e.g. ``(B, H, W)``
for a pixel map, or like ``x``); a mask with fewer axes than the attribution is broadcast
over its trailing axes. All four are per example, vectorised and jittable.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxplain import _validate
from jaxplain.evaluation import _common as C

Array = jax.Array

__all__ = ["relevance_mass_accuracy", "relevance_rank_accuracy", "pointing_game", "auc"]


def _pair(attributions: Any, mask: Any) -> tuple[Array, Array]:
  a = _validate.as_float(attributions)
  m = jnp.asarray(mask)
  if a.ndim < 2:
    raise ValueError(f"attributions: expected (B, ...), got shape {a.shape}")
  _validate.check_finite(a, "attributions")
  if m.ndim > a.ndim or m.shape != a.shape[:m.ndim] or m.ndim < 2:
    raise ValueError(f"mask: expected a shape that is a leading part of the attributions "
                     f"{a.shape} (with the batch axis), got {m.shape}")
  m = jnp.broadcast_to(m.reshape(m.shape + (1,) * (a.ndim - m.ndim)), a.shape)
  return C.flat(a), C.flat(m).astype(jnp.bool_)


def relevance_mass_accuracy(attributions: Array, mask: Array, *, absolute: bool = False
                            ) -> Array:
  """Relevance mass accuracy: ``sum(a inside mask) / sum(a)`` (Arras et al. 2022, eq. 4).

  As Quantus's ``RelevanceMassAccuracy`` (which sums the attribution as given; Arras et al.
  use only positive relevance: pass ``jnp.maximum(a, 0)``); ``absolute=True`` uses ``|a|``.
  0 where the total is 0.

  Returns:
    ``(B,)``.

  >>> import jax.numpy as jnp
  >>> relevance_mass_accuracy(jnp.array([[3.0, 1.0]]), jnp.array([[True, False]])).tolist()
  [0.75]
  """
  a, m = _pair(attributions, mask)
  if absolute:
    a = jnp.abs(a)
  tot = jnp.sum(a, axis=1)
  inside = jnp.sum(jnp.where(m, a, 0.0), axis=1)
  return jnp.where(tot != 0, inside / jnp.where(tot != 0, tot, 1.0), 0.0)


def relevance_rank_accuracy(attributions: Array, mask: Array) -> Array:
  """Relevance rank accuracy: the fraction of the ``K = |mask|`` top-ranked features that lie
  in the mask (Arras et al. 2022, eq. 5; ties by index).

  Returns:
    ``(B,)`` (0 for an empty mask).

  >>> import jax.numpy as jnp
  >>> a = jnp.array([[0.9, 0.1, 0.8, 0.2]])
  >>> relevance_rank_accuracy(a, jnp.array([[True, True, False, False]])).tolist()
  [0.5]
  """
  a, m = _pair(attributions, mask)
  k = jnp.sum(m, axis=1, dtype=jnp.int32)
  top = C.descending_ranks(a) < k[:, None]
  hits = jnp.sum(top & m, axis=1, dtype=jnp.int32)
  return jnp.where(k > 0, hits / jnp.maximum(k, 1), 0.0).astype(a.dtype)


def pointing_game(attributions: Array, mask: Array) -> Array:
  """Pointing game (Zhang et al. 2018): 1 where the maximum of the map lies in the mask.

  The first maximum (by index) counts; Quantus's ``PointingGame`` without its tolerance
  option is the same.

  Returns:
    ``(B,)`` float, 0 or 1.

  >>> import jax.numpy as jnp
  >>> pointing_game(jnp.array([[0.1, 0.9], [0.9, 0.1]]), jnp.array([[False, True]] * 2)).tolist()
  [1.0, 0.0]
  """
  a, m = _pair(attributions, mask)
  top = jnp.argmax(a, axis=1)
  return jnp.take_along_axis(m, top[:, None], axis=1)[:, 0].astype(a.dtype)


def auc(attributions: Array, mask: Array) -> Array:
  """ROC AUC of the attribution as a score for the mask's features (Mann-Whitney form).

  ``AUC = (sum of the ranks of the mask features - P (P + 1) / 2) / (P N)`` with average
  ranks for ties (the probability that a random mask feature outscores a random other one,
  ties counting 1/2): equal to ``sklearn.metrics.roc_auc_score(mask, a)``, which Quantus's
  ``AUC`` calls. 0.5 where the mask is empty or full.

  Returns:
    ``(B,)``.

  >>> import jax.numpy as jnp
  >>> auc(jnp.array([[0.9, 0.2, 0.5, 0.1]]), jnp.array([[True, False, True, False]])).tolist()
  [1.0]
  """
  a, m = _pair(attributions, mask)
  r = C.average_ranks(a)
  p = jnp.sum(m, axis=1).astype(a.dtype)
  q = m.shape[1] - p
  s = jnp.sum(jnp.where(m, r, 0.0), axis=1)
  ok = (p > 0) & (q > 0)
  return jnp.where(ok, (s - p * (p + 1) / 2) / jnp.where(ok, p * q, 1.0), 0.5)
