"""Shared conventions of the evaluation metrics (private).

An attribution ``a`` is shaped like ``x`` or like a leading part of ``x`` that keeps the batch
axis, e.g. a pixel map ``(B, H, W)`` for images ``(B, H, W, C)``, or per-token scores
``(B, L)`` for sequences ``(B, L, E)``. The *features* a metric ranks or removes are the
elements of ``a``; a feature covers the trailing axes of ``x`` that ``a`` lacks (a pixel covers
its channels, a token its embedding).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _validate
from jaxplain._batching import map_merged
from jaxplain.gradients import _check_output, _output_value
from jaxplain.metrics import _average_ranks, _descending_ranks

Array = jax.Array
Fn = Callable[[Array], Array]
OUTPUTS = ("logit", "log_softmax", "softmax")


def check_x(x: Any, name: str = "x") -> Array:
  x = _validate.check_batched(x, name, min_rank=2)
  _validate.warn_if_channels_first(x, name)
  return x


def check_output(output: str) -> None:
  if output not in OUTPUTS:
    raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
  _check_output(output)


check_chunk = _validate.check_chunk


def check_count(v: Any, name: str, low: int = 1) -> int:
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < low:
    raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
  return int(v)


def check_map(a: Any, x_shape: tuple[int, ...], name: str = "attributions") -> Array:
  """``a`` shaped like ``x`` or a leading part of it (with the batch axis)."""
  a = _validate.as_float(a)
  if a.ndim < 2 or a.shape != tuple(x_shape[:a.ndim]):
    raise ValueError(f"{name}: expected a shape that is a leading part of x {tuple(x_shape)} "
                     f"with at least (B, features), e.g. {tuple(x_shape[:2])}; got {a.shape}")
  _validate.check_finite(a, name)
  return a


def given_or_explained(explain: Callable, x: Array, t: Array, attributions: Any,
                       name: str = "attributions") -> Array:
  """``explain(x, t)``, or the given ``attributions`` checked against its shape (computed
  without running it) and for NaN / inf."""
  if attributions is None:
    return _validate.as_float(explain(x, t))
  a = _validate.as_float(attributions)
  want = jax.eval_shape(explain, x, t).shape
  if a.shape != tuple(want):
    raise ValueError(f"{name}: expected the explainer's output shape {tuple(want)} for x "
                     f"{tuple(x.shape)}; got {a.shape}")
  _validate.check_finite(a, name)
  return a


def flat(a: Array) -> Array:
  return a.reshape(a.shape[0], -1)


def to_x(m: Array, map_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> Array:
  """(B, N) values over the map's features -> broadcast to x's shape."""
  m = m.reshape(map_shape + (1,) * (len(x_shape) - len(map_shape)))
  return jnp.broadcast_to(m, x_shape)


def baseline(x: Array, value: Any, name: str = "value") -> Array:
  return _validate.broadcast_to_x(value, x, name)


def target_and_logits(f: Fn, x: Array, target: Any) -> tuple[Array, int]:
  out = _validate.check_model(f, x)
  return _validate.check_target(target, x.shape[0], out.shape[-1]), out.shape[-1]


def score(f: Fn, x: Array, t: Array, output: str) -> Array:
  return _validate.as_float(_output_value(_validate.model_outputs(f, x), t, output))


def map_scores(f: Fn, make: Callable[[Array], Any], ks: Array, chunk: int | None,
               output: str, with_extra: bool = False) -> Any:
  """``(S, B)`` scores ``f(x_k)[t_k]`` for ``make(k) = ((x_k, t_k), extra_k)``, ``chunk``
  copies per call of ``f`` merged into its batch axis (:func:`jaxplain._batching.map_merged`);
  with ``with_extra`` also the stacked extras, returned first."""
  post = (lambda s, extra: (extra, s)) if with_extra else None
  return map_merged(make, lambda z, t: score(f, z, t, output), ks, chunk, post)


#: (B, N) -> (B, N) int32 ranks, 0 = largest; ties broken by index (stable).
descending_ranks = _descending_ranks


def average_ranks(v: Array) -> Array:
  """(B, N) -> (B, N) ranks 1..N with ties given their average rank (as scipy.stats)."""
  return _average_ranks(v) + 1.0


def pearson(a: Array, b: Array) -> Array:
  """Row-wise Pearson correlation of (B, S) arrays; 0 where a row is constant."""
  a = a - a.mean(-1, keepdims=True)
  b = b - b.mean(-1, keepdims=True)
  den = jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
  return jnp.where(den > 0, jnp.sum(a * b, -1) / jnp.where(den > 0, den, 1.0), 0.0)


def num_elements(shape: tuple[int, ...]) -> int:
  return math.prod(shape)
