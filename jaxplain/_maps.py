"""One vocabulary for turning attributions into maps (private; used by metrics, plot and ppi).

Channel reductions (the ``reduce=`` argument), over the last (channel) axis ``c``:

- ``"sum_abs"``: ``sum_c |a_c|`` (seed 000, SPEC section 1: the magnitude of the evidence);
- ``"sum"``: ``sum_c a_c`` (signed; PPI sums its maps this way);
- ``"abs_of_sum"``: ``|sum_c a_c|`` (Captum's ``visualize_image_attr`` "absolute_value");
- ``"max_abs"``: ``max_c |a_c|``.

Per-map normalisations (the ``method=`` of :func:`jaxplain.plot.normalize` and
:func:`jaxplain.normalize_saliency`, the ``normalize=`` of :class:`jaxplain.PPIConfig`), over
the map axes:

- ``"minmax"``: ``(m - min) / (max - min)``, in [0, 1];
- ``"percentile"``: ``(m - min) / (p - min)`` clipped to [0, 1], ``p`` the ``percentile``-th
  percentile of ``m`` (PAIR's ``VisualizeImageGrayscale``, 99th);
- ``"relu_max"``: ``max(m, 0) / max(max(m, 0))``, in [0, 1] (PPI's default);
- ``"abs_max"``: ``|m| / max |m|``, in [0, 1];
- ``"signed_max"``: ``m / max |m|``, in [-1, 1], the sign kept (for diverging maps; with
  ``percentile`` < 100 it divides by that percentile of ``|m|`` and clips).

A map whose denominator is 0 (a constant map) becomes 0. Retired names raise an error naming
their replacement: ``"abs_sum"`` meant ``sum |a|`` in ``metrics`` but ``|sum a|`` in ``plot``;
``"maxabs"`` (plot, signed) and ``"abs_max"`` (ppi, unsigned) looked alike but differed.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

REDUCTIONS = ("sum_abs", "sum", "abs_of_sum", "max_abs")
NORMALIZATIONS = ("minmax", "percentile", "relu_max", "abs_max", "signed_max")

_RETIRED_REDUCTIONS = {
    "abs_sum": "'abs_sum' is retired: it meant sum_c |a_c| in metrics but |sum_c a_c| in plot; "
               "use 'sum_abs' for sum_c |a_c| (the old metrics meaning) or 'abs_of_sum' for "
               "|sum_c a_c| (the old plot meaning)",
}
_RETIRED_NORMALIZATIONS = {
    "maxabs": "'maxabs' is retired: use 'signed_max' (m / max |m|, in [-1, 1], the sign kept); "
              "'abs_max' is |m| / max |m|, in [0, 1]",
}


def check_reduce(reduce: Any, name: str = "reduce") -> str:
  """Return ``reduce`` if it is one of :data:`REDUCTIONS`, else raise a ValueError naming
  ``name`` (and the new name for a retired one)."""
  if reduce in _RETIRED_REDUCTIONS:
    raise ValueError(f"{name}: {_RETIRED_REDUCTIONS[reduce]}")
  if reduce not in REDUCTIONS:
    raise ValueError(f"{name}: expected one of {REDUCTIONS}, got {reduce!r}")
  return reduce


def check_normalization(method: Any, name: str = "method") -> str:
  """Return ``method`` if it is one of :data:`NORMALIZATIONS`, else raise a ValueError."""
  if method in _RETIRED_NORMALIZATIONS:
    raise ValueError(f"{name}: {_RETIRED_NORMALIZATIONS[method]}")
  if method not in NORMALIZATIONS:
    raise ValueError(f"{name}: expected one of {NORMALIZATIONS}, got {method!r}")
  return method


def reduce_channels(a: Any, reduce: str, *, xp: Any = jnp, name: str = "reduce") -> Any:
  """Reduce the last (channel) axis of ``a`` by ``reduce`` (module docstring). ``xp`` is
  ``jax.numpy`` (traceable) or ``numpy`` (plotting in float64)."""
  check_reduce(reduce, name)
  if reduce == "sum_abs":
    return xp.sum(xp.abs(a), axis=-1)
  if reduce == "sum":
    return xp.sum(a, axis=-1)
  if reduce == "abs_of_sum":
    return xp.abs(xp.sum(a, axis=-1))
  return xp.max(xp.abs(a), axis=-1)


def normalize_maps(m: Any, method: str, *, axes: tuple[int, ...], percentile: float = 99.0,
                   eps: float = 0.0, xp: Any = jnp, name: str = "method") -> Any:
  """Normalise each map over ``axes`` by ``method`` (module docstring).

  With ``eps > 0`` the denominator is ``den + eps`` everywhere (PPI differentiates through
  it); with ``eps == 0`` a zero denominator gives a zero map.
  """
  check_normalization(method, name)
  if not 0 < percentile <= 100:
    raise ValueError(f"percentile: expected in (0, 100], got {percentile}")
  lo = 0.0
  if method == "relu_max":
    v = xp.maximum(m, 0)
    hi = xp.max(v, axis=axes, keepdims=True)
  elif method == "abs_max":
    v = xp.abs(m)
    hi = xp.max(v, axis=axes, keepdims=True)
  elif method == "signed_max":
    v = m
    hi = (xp.max(xp.abs(m), axis=axes, keepdims=True) if percentile == 100 else
          xp.percentile(xp.abs(m), percentile, axis=axes, keepdims=True))
  else:  # minmax, percentile
    v = m
    lo = xp.min(m, axis=axes, keepdims=True)
    hi = (xp.max(m, axis=axes, keepdims=True) if method == "minmax" else
          xp.percentile(m, percentile, axis=axes, keepdims=True))
  den = hi - lo
  if eps > 0:
    out = (v - lo) / (den + eps)
  else:
    ok = den > 0
    out = xp.where(ok, (v - lo) / xp.where(ok, den, 1), 0)
  if method == "percentile":
    out = xp.clip(out, 0, 1)
  elif method == "signed_max" and percentile < 100:
    out = xp.clip(out, -1, 1)
  return out

