"""Evaluation metrics for attribution maps (SPEC section 6).

* **Deletion / insertion** (seed 004 fig. 4, after Hooker et al. 2019 and Petsiuk et al. 2018):
  rank the pixels by saliency, remove (replace by ``value``) or insert the top-k pixels for a
  list of k, and record the class score; summarise each curve by its area.
  A steeper deletion drop (lower area) and a steeper insertion rise (higher area) are better.
  A random pixel order is the baseline (:func:`random_order_curve`).
* **Input-shift invariance** (seed 003, Kindermans et al. 2019): add a constant to every
  channel, check that the prediction is unchanged and measure how much the map moved
  (:func:`shift_invariance`, :func:`map_similarity`).
* **Model-randomisation sanity check** (Adebayo et al. 2018, "cascading randomization"):
  re-initialise the layers one by one from the logits down and measure the similarity of each
  map to the original (:func:`cascading_randomization`).
* The Integrated-Gradients completeness gap is :func:`jaxplain.completeness_gap`.

Conventions. ``x`` is NHWC ``(B, H, W, C)``; :func:`deletion_curve`, :func:`insertion_curve`,
:func:`random_order_curve` and :func:`shift_invariance` also take sequences ``(B, L, E)``,
tabular ``(B, D)`` or any rank >= 2 (the last axis is the channel axis). A saliency argument is either an attribution
shaped like ``x`` -- aggregated over channels into a pixel map by ``reduce`` -- or a pixel map
``(B, H, W)`` (e.g. Grad-CAM). ``reduce`` is one of the channel reductions shared with
``plot`` and ``ppi`` (``jaxplain._maps``): ``"sum_abs"`` = sum over channels of ``|a|`` (the
seed-000 grayscale, the default), ``"sum"`` = signed sum (ranks pixels by their evidence
*for* the class: use it for signed attributions such as gradient x input, IG, LRP),
``"abs_of_sum"`` = ``|sum_c a_c|``, ``"max_abs"`` = max over channels of ``|a|``. The old
``"abs_sum"`` (which meant ``"sum_abs"`` here but ``"abs_of_sum"`` in ``plot``) raises an
error naming both. Every function is pure and jittable (the
``steps``, ``reduce`` and ``output`` arguments are static) and never calls ``jax.jit`` itself.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _maps, _validate
from jaxplain._batching import map_merged
from jaxplain._validate import call_model, check_batched, check_finite, check_logits
from jaxplain._validate import check_target, select_target

__all__ = [
    "pixel_saliency", "step_fractions", "deletion_curve", "insertion_curve",
    "random_saliency", "random_order_curve", "area_under_curve", "rank_correlation",
    "map_change", "ssim", "map_similarity", "shift_invariance", "cascade_layers",
    "cascading_randomization",
]

_REDUCTIONS = _maps.REDUCTIONS
_OUTPUTS = ("logit", "probability", "log_softmax")


# -- pixel maps --------------------------------------------------------------------------------

def pixel_saliency(attributions: Any, *, reduce: str = "sum_abs") -> jax.Array:
  """Aggregate an attribution over channels into a pixel map.

  Args:
    attributions: ``(B, H, W, C)`` attribution, or an already aggregated ``(B, H, W)`` map
      (returned unchanged).
    reduce: ``"sum_abs"`` (sum of ``|a|`` over channels, seed 000), ``"sum"`` (signed sum),
      ``"abs_of_sum"`` (``|sum a|``) or ``"max_abs"`` (the vocabulary of ``jaxplain._maps``,
      shared with ``plot`` and ``ppi``).

  Returns:
    ``(B, H, W)`` pixel saliency.

  >>> import jax.numpy as jnp
  >>> pixel_saliency(jnp.array([[[[1.0, -2.0]]]])).tolist()
  [[[3.0]]]
  """
  _maps.check_reduce(reduce)
  a = _validate.as_float(attributions)
  if a.ndim == 3:
    return a
  if a.ndim != 4:
    raise ValueError("attributions: expected (B, H, W, C) or a pixel map (B, H, W); "
                     f"got shape {a.shape}")
  return _maps.reduce_channels(a, reduce)


def _pixel_map(saliency: Any, x_shape: tuple[int, ...], reduce: str,
               name: str = "saliency") -> jax.Array:
  s = pixel_saliency(saliency, reduce=reduce)
  if s.shape != x_shape[:3]:
    raise ValueError(f"{name}: expected an attribution shaped like x {x_shape} or a pixel map "
                     f"{x_shape[:3]}; got shape {jnp.shape(saliency)}")
  return s


def _check_image(x: Any, name: str = "x") -> jax.Array:
  x = check_batched(x, name, min_rank=4)
  _validate.warn_if_channels_first(x, name)
  if x.ndim != 4:
    raise ValueError(f"{name}: expected an NHWC batch (B, H, W, C), got shape {x.shape}")
  return x


def step_fractions(steps: int | Sequence[int] | Sequence[float], num_pixels: int) -> np.ndarray:
  """The fractions of pixels removed/inserted at each step, as actually used (after rounding).

  Args:
    steps: an int ``n`` -> ``n + 1`` evenly spaced fractions ``0, 1/n, ..., 1``; a sequence of
      Python/NumPy ints -> pixel counts ``k`` in ``[0, num_pixels]``; a sequence of floats ->
      fractions in ``[0, 1]`` (rounded to the nearest pixel count). Must be non-decreasing.
    num_pixels: ``H * W``.

  Returns:
    ``(S,)`` float64 NumPy array ``k / num_pixels``.

  >>> step_fractions(4, 100).tolist()
  [0.0, 0.25, 0.5, 0.75, 1.0]
  >>> step_fractions([0, 10, 50], 100).tolist()
  [0.0, 0.1, 0.5]
  """
  return _step_counts(steps, num_pixels) / float(num_pixels)


def _step_counts(steps: Any, num_pixels: int) -> np.ndarray:
  if isinstance(steps, (bool, np.bool_)):
    raise TypeError(f"steps: expected an int or a sequence of counts/fractions, got {steps!r}")
  if isinstance(steps, (int, np.integer)):
    if steps < 1:
      raise ValueError(f"steps: expected an int >= 1, got {steps}")
    return np.round(np.linspace(0.0, 1.0, int(steps) + 1) * num_pixels).astype(np.int64)
  arr = np.asarray(steps)
  if arr.ndim != 1 or arr.size == 0:
    raise ValueError(f"steps: expected a non-empty 1-D sequence, got shape {arr.shape}")
  if np.issubdtype(arr.dtype, np.integer):
    if arr.min() < 0 or arr.max() > num_pixels:
      raise ValueError(f"steps: pixel counts must lie in [0, {num_pixels}], got "
                       f"[{arr.min()}, {arr.max()}]")
    counts = arr.astype(np.int64)
  elif np.issubdtype(arr.dtype, np.floating):
    if arr.min() < 0.0 or arr.max() > 1.0:
      raise ValueError(f"steps: fractions must lie in [0, 1], got [{arr.min()}, {arr.max()}]")
    counts = np.round(arr * num_pixels).astype(np.int64)
  else:
    raise TypeError(f"steps: expected ints (counts) or floats (fractions), got {arr.dtype}")
  if np.any(np.diff(counts) < 0):
    raise ValueError(f"steps: must be non-decreasing, got {arr.tolist()}")
  return counts


def _class_score(logits: jax.Array, target: jax.Array, output: str) -> jax.Array:
  if output == "probability":
    logits = jax.nn.softmax(logits, axis=-1)
  elif output == "log_softmax":
    logits = jax.nn.log_softmax(logits, axis=-1)
  return _validate.as_float(select_target(logits, target))


def _descending_ranks(s: jax.Array) -> jax.Array:
  """(B, N) -> (B, N) int ranks, 0 = most salient; ties broken by pixel index (stable)."""
  order = jnp.argsort(-s, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)  # int64 under x64


def _feature_map(saliency: Any, x_shape: tuple[int, ...], reduce: str,
                 name: str = "saliency") -> jax.Array:
  """The map whose elements are the ranked features, for ``x`` of any rank.

  ``x`` of rank >= 3 (images ``(B, H, W, C)``, sequences ``(B, L, E)``): a saliency shaped
  like ``x`` is reduced over the last (channel / embedding) axis by ``reduce``, one shaped
  like ``x.shape[:-1]`` (a pixel map, per-token scores) is used as it is. Tabular ``x``
  ``(B, D)``: the saliency is ``(B, D)``, each feature its own one-element channel (``reduce``
  then only takes the absolute value, or not for ``"sum"``).
  """
  _maps.check_reduce(reduce)
  s = jnp.asarray(saliency)
  if len(x_shape) == 2 and s.shape == tuple(x_shape):
    return _maps.reduce_channels(s[..., None], reduce)
  if len(x_shape) >= 3 and s.shape == tuple(x_shape):
    return _maps.reduce_channels(s, reduce)
  if len(x_shape) >= 3 and s.shape == tuple(x_shape[:-1]):
    return s
  want = (f"{tuple(x_shape)}" if len(x_shape) == 2 else
          f"shaped like x {tuple(x_shape)} or a map {tuple(x_shape[:-1])}")
  raise ValueError(f"{name}: expected an attribution {want}; got shape {s.shape}")


def _curve(f, x, target, saliency, *, steps, value, output, reduce, chunk, insert):
  x = check_batched(x, "x", min_rank=2)
  _validate.warn_if_channels_first(x)
  if output not in _OUTPUTS:
    raise ValueError(f"output: expected one of {_OUTPUTS}, got {output!r}")
  b = x.shape[0]
  s = _feature_map(saliency, x.shape, reduce)
  check_finite(s, "saliency")
  out = call_model(lambda: jax.eval_shape(f, x), f, x)
  t = check_target(target, b, check_logits(out, b, f=f, x=x).shape[1])
  try:
    base = jnp.broadcast_to(jnp.asarray(value, x.dtype), x.shape)
  except ValueError as e:
    raise ValueError(f"value: expected a scalar, a per-channel ({x.shape[-1]},) array or an "
                     f"array that broadcasts to x {x.shape}; got shape {jnp.shape(value)}"
                     ) from e
  n = int(np.prod(s.shape[1:]))
  counts = jnp.asarray(_step_counts(steps, n), jnp.int32)
  ranks = _descending_ranks(s.reshape(b, n)).reshape(s.shape + (1,) * (x.ndim - s.ndim))

  def make(k):
    top = ranks < k
    return (jnp.where(top, x, base) if insert else jnp.where(top, base, x), t), None

  # the copies of a chunk go through f as one batch (see jaxplain._batching)
  scores = map_merged(make, lambda xk, tk: _class_score(f(xk), tk, output), counts, chunk)
  return scores.T


@_validate.accepts_nnx
def deletion_curve(f: Callable[[jax.Array], jax.Array], x: jax.Array, target: Any,
                   saliency: jax.Array, *, steps: Any = 20, value: Any = 0.0,
                   output: str = "logit", reduce: str = "sum_abs",
                   chunk: int | None = None) -> jax.Array:
  """Class score after removing the top-k salient features, for each k (deletion metric).

  At step k the k features of highest saliency are replaced by ``value``; ties are broken by
  feature index (row-major). A feature is a pixel (all its channels) of images
  ``(B, H, W, C)``, a token (its whole embedding) of sequences ``(B, L, E)``, one column of
  tabular ``(B, D)`` inputs.

  Args:
    f: pure batched model ``(B, ...) -> (B, K)`` logits.
    x: ``(B, H, W, C)``, ``(B, L, E)`` or ``(B, D)`` inputs (any rank >= 2; for rank >= 3 the
      last axis is the channel axis).
    target: int or ``(B,)`` int class indices.
    saliency: attribution shaped like ``x`` (reduced over the last axis by ``reduce`` for
      rank >= 3), or a map shaped like ``x.shape[:-1]`` (a pixel map ``(B, H, W)``, per-token
      scores ``(B, L)``); for tabular ``x`` a ``(B, D)`` array.
    steps: see :func:`step_fractions` with the number of features (default 20 -> fractions
      0, 0.05, ..., 1).
    value: removal value: a scalar, a per-channel ``(C,)`` array, or an array broadcasting to
      ``x`` (e.g. a blurred copy of ``x``, or a training-set mean for tabular data).
    output: class score: ``"logit"``, ``"probability"`` (softmax) or ``"log_softmax"``.
    reduce: channel aggregation of ``saliency`` (module docstring; for tabular ``x`` it
      acts on each single value: ``"sum"`` ranks by the signed value, the others by ``|a|``).
    chunk: evaluate this many steps at a time (``jax.lax.map``) to bound memory; ``None``:
      all steps in one vectorised call up to 2^23 input elements, as many as fit otherwise.

  Returns:
    ``(B, S)`` scores; column 0 is the unmodified input when the first step is 0.

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], axis=1)
  >>> x = jnp.array([[[[1.0], [3.0]]]])                       # (1, 1, 2, 1)
  >>> deletion_curve(f, x, 0, x, steps=[0, 1, 2]).tolist()    # removes 3 first, then 1
  [[4.0, 1.0, 0.0]]
  >>> g = lambda x: jnp.stack([x.sum(1), -x.sum(1)], axis=1)  # tabular (B, D)
  >>> deletion_curve(g, jnp.array([[1.0, 3.0]]), 0, jnp.array([[1.0, 3.0]]), steps=2).tolist()
  [[4.0, 1.0, 0.0]]
  """
  return _curve(f, x, target, saliency, steps=steps, value=value, output=output,
                reduce=reduce, chunk=chunk, insert=False)


@_validate.accepts_nnx
def insertion_curve(f: Callable[[jax.Array], jax.Array], x: jax.Array, target: Any,
                    saliency: jax.Array, *, steps: Any = 20, value: Any = 0.0,
                    output: str = "logit", reduce: str = "sum_abs",
                    chunk: int | None = None) -> jax.Array:
  """Class score when only the top-k salient features of ``x`` are kept on a ``value`` canvas.

  Same arguments, features (pixels, tokens, columns: any input rank) and ordering as
  :func:`deletion_curve`; step k starts from ``value`` everywhere (e.g. black, or a blurred
  ``x``) and inserts the k most salient features of ``x``.

  Returns:
    ``(B, S)`` scores.

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], axis=1)
  >>> x = jnp.array([[[[1.0], [3.0]]]])
  >>> insertion_curve(f, x, 0, x, steps=[0, 1, 2]).tolist()
  [[0.0, 3.0, 4.0]]
  """
  return _curve(f, x, target, saliency, steps=steps, value=value, output=output,
                reduce=reduce, chunk=chunk, insert=True)


def random_saliency(key: jax.Array, x: jax.Array) -> jax.Array:
  """A uniformly random feature map: the random-order baseline's ranking.

  ``(B, H, W)`` for images ``(B, H, W, C)``, ``x.shape[:-1]`` for any ``x`` of rank >= 3
  (``(B, L)`` for sequences), ``(B, D)`` for tabular ``x``.

  >>> import jax, jax.numpy as jnp
  >>> random_saliency(jax.random.key(0), jnp.zeros((2, 4, 4, 3))).shape
  (2, 4, 4)
  """
  x = check_batched(x, "x", min_rank=2)
  return jax.random.uniform(key, x.shape if x.ndim == 2 else x.shape[:-1])


@_validate.accepts_nnx
def random_order_curve(f: Callable[[jax.Array], jax.Array], x: jax.Array, target: Any, *,
                       key: jax.Array, num_orders: int = 4, kind: str = "deletion",
                       **kwargs: Any) -> jax.Array:
  """Deletion or insertion curve of random pixel orders, averaged over ``num_orders`` keys.

  Args:
    f, x, target: as in :func:`deletion_curve`.
    key: ``jax.random`` key; order ``i`` uses ``fold_in(key, i)``.
    num_orders: number of random orders averaged.
    kind: ``"deletion"`` or ``"insertion"``.
    **kwargs: ``steps``, ``value``, ``output``, ``chunk`` as in :func:`deletion_curve`.

  Returns:
    ``(B, S)`` mean scores.

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], axis=1)
  >>> c = random_order_curve(f, jnp.ones((1, 2, 2, 1)), 0, key=jax.random.key(0), steps=4)
  >>> c.tolist()
  [[4.0, 3.0, 2.0, 1.0, 0.0]]
  """
  if kind not in ("deletion", "insertion"):
    raise ValueError(f"kind: expected 'deletion' or 'insertion', got {kind!r}")
  if num_orders < 1:
    raise ValueError(f"num_orders: expected >= 1, got {num_orders}")
  curve_fn = deletion_curve if kind == "deletion" else insertion_curve
  curves = [curve_fn(f, x, target, random_saliency(jax.random.fold_in(key, i), x), **kwargs)
            for i in range(num_orders)]
  return jnp.mean(jnp.stack(curves), axis=0)


def area_under_curve(curve: jax.Array, fractions: Any) -> jax.Array:
  """Normalised trapezoidal area under deletion/insertion curves.

  The area over the fraction axis divided by its span (``fractions[-1] - fractions[0]``), i.e.
  the mean score over the range: for fractions spanning [0, 1] it is the plain area.

  Args:
    curve: ``(..., S)`` scores.
    fractions: ``(S,)`` increasing fractions (:func:`step_fractions`).

  Returns:
    ``(...)`` areas.

  >>> import jax.numpy as jnp
  >>> float(area_under_curve(jnp.array([1.0, 0.0]), [0.0, 1.0]))
  0.5
  """
  fr = jnp.asarray(fractions, jnp.float32)
  curve = jnp.asarray(curve)
  if fr.ndim != 1 or curve.shape[-1] != fr.shape[0]:
    raise ValueError(f"fractions: expected shape ({curve.shape[-1]},) to match the last axis "
                     f"of curve {curve.shape}; got shape {fr.shape}")
  if fr.shape[0] == 1:
    return curve[..., 0]
  span = fr[-1] - fr[0]
  area = jnp.trapezoid(curve, jnp.broadcast_to(fr, curve.shape), axis=-1)
  return jnp.where(span > 0, area / jnp.where(span > 0, span, 1.0), curve[..., 0])


# -- map similarity ----------------------------------------------------------------------------

def _average_ranks(v: jax.Array) -> jax.Array:
  """(B, N) -> (B, N) ranks 0..N-1 with ties given their average rank (as scipy.stats), in
  the accumulation dtype of ``v`` (float64 stays float64)."""
  srt = jnp.sort(v, axis=-1)
  lo = jax.vmap(lambda s, q: jnp.searchsorted(s, q, side="left"))(srt, v)
  hi = jax.vmap(lambda s, q: jnp.searchsorted(s, q, side="right"))(srt, v)
  acc = (_validate.accumulation_dtype(v.dtype) if jnp.issubdtype(v.dtype, jnp.floating)
         else jnp.float32)
  return (lo + hi - 1).astype(acc) / 2.0


def _pearson_rows(a: jax.Array, b: jax.Array, a_raw: jax.Array, b_raw: jax.Array) -> jax.Array:
  a = a - a.mean(-1, keepdims=True)
  b = b - b.mean(-1, keepdims=True)
  na = jnp.sqrt(jnp.sum(a * a, -1))
  nb = jnp.sqrt(jnp.sum(b * b, -1))
  ok = (na > 0) & (nb > 0)
  r = jnp.sum(a * b, -1) / jnp.where(ok, na * nb, 1.0)
  both_const = (na == 0) & (nb == 0)
  same = jnp.all(a_raw == b_raw, axis=-1)
  return jnp.where(ok, jnp.clip(r, -1.0, 1.0), jnp.where(both_const & same, 1.0, 0.0))


def _flat_pair(a, b, reduce, names=("a", "b")):
  sa = pixel_saliency(a, reduce=reduce)
  sb = pixel_saliency(b, reduce=reduce)
  if sa.shape != sb.shape:
    raise ValueError(f"{names[0]}, {names[1]}: maps must have the same shape after channel "
                     f"aggregation, got {sa.shape} and {sb.shape}")
  return sa.reshape(sa.shape[0], -1), sb.reshape(sb.shape[0], -1), sa, sb


def rank_correlation(a: jax.Array, b: jax.Array, *, reduce: str = "sum_abs") -> jax.Array:
  """Spearman rank correlation between two batches of maps, per example.

  Ties get their average rank (as ``scipy.stats.spearmanr``). A constant map carries no rank
  information: the correlation is then 0, or 1 when both maps are the same constant.

  Args:
    a, b: attributions ``(B, H, W, C)`` or pixel maps ``(B, H, W)``.
    reduce: channel aggregation (module docstring).

  Returns:
    ``(B,)`` correlations in [-1, 1].

  >>> import jax.numpy as jnp
  >>> a = jnp.array([[[1.0, 2.0, 3.0]]])
  >>> rank_correlation(a, a ** 2).tolist()
  [1.0]
  """
  fa, fb, _, _ = _flat_pair(a, b, reduce)
  return _pearson_rows(_average_ranks(fa), _average_ranks(fb), fa, fb)


def map_change(reference: jax.Array, other: jax.Array, *, reduce: str = "sum_abs",
               normalize: str = "reference") -> dict[str, jax.Array]:
  """Normalised L1 and L2 distance between pixel maps, per example (0 for identical maps).

  ``normalize="reference"``: ``||b - a||_p / ||a||_p`` (relative change, sees scale changes);
  ``normalize="each"``: ``||b/||b||_p - a/||a||_p||_p`` (shape change only, in [0, 2]).
  A zero-norm denominator is replaced by 1.

  Args:
    reference: ``a``, the map before (attribution or ``(B, H, W)`` map).
    other: ``b``, the map after, same shape.
    reduce: channel aggregation (module docstring).
    normalize: ``"reference"`` or ``"each"``.

  Returns:
    ``{"l1": (B,), "l2": (B,)}``.

  >>> import jax.numpy as jnp
  >>> a = jnp.array([[[1.0, 3.0]]])
  >>> {k: v.tolist() for k, v in map_change(a, 2 * a).items()}
  {'l1': [1.0], 'l2': [1.0]}
  """
  if normalize not in ("reference", "each"):
    raise ValueError(f"normalize: expected 'reference' or 'each', got {normalize!r}")
  fa, fb, _, _ = _flat_pair(reference, other, reduce, ("reference", "other"))
  safe = lambda n: jnp.where(n > 0, n, 1.0)
  out = {}
  for name, p in (("l1", 1), ("l2", 2)):
    norm = lambda v: jnp.linalg.norm(v, ord=p, axis=-1)
    if normalize == "reference":
      out[name] = norm(fb - fa) / safe(norm(fa))
    else:
      out[name] = norm(fb / safe(norm(fb))[:, None] - fa / safe(norm(fa))[:, None])
  return out


def _minmax(m: jax.Array) -> jax.Array:
  lo = m.min(axis=(1, 2), keepdims=True)
  hi = m.max(axis=(1, 2), keepdims=True)
  return jnp.where(hi > lo, (m - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)


def _gaussian_window(size: int, sigma: float) -> jax.Array:
  r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
  g = jnp.exp(-0.5 * (r / sigma) ** 2)
  g = g / g.sum()
  return jnp.outer(g, g)


def ssim(a: jax.Array, b: jax.Array, *, reduce: str = "sum_abs", window: int = 7,
         sigma: float = 1.5, normalize: bool = True) -> jax.Array:
  """Mean structural similarity (SSIM, Wang et al. 2004) between pixel maps, per example.

  Each map is min-max normalised to [0, 1] first (``normalize=True``, as Adebayo et al. 2018
  compare normalised maps; a constant map becomes 0), then
  ``SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))``
  with Gaussian-weighted local statistics (``window`` x ``window``, ``sigma``), data range 1,
  ``C1 = 0.01^2``, ``C2 = 0.03^2``, averaged over the valid positions (like
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  use_sample_covariance=False, data_range=1)``, with a smaller default window for small maps).

  Args:
    a, b: attributions ``(B, H, W, C)`` or pixel maps ``(B, H, W)``.
    reduce: channel aggregation (module docstring).
    window, sigma: Gaussian window size (clipped to ``min(H, W)``) and width.
    normalize: min-max normalise each map first.

  Returns:
    ``(B,)`` SSIM in [-1, 1]; 1 for identical maps.

  >>> import jax, jax.numpy as jnp
  >>> m = jax.random.uniform(jax.random.key(0), (1, 8, 8))
  >>> round(float(ssim(m, m)[0]), 4)
  1.0
  """
  _, _, sa, sb = _flat_pair(a, b, reduce)
  if window < 1:
    raise ValueError(f"window: expected >= 1, got {window}")
  window = min(window, sa.shape[1], sa.shape[2])
  if normalize:
    sa, sb = _minmax(sa), _minmax(sb)
  k = _gaussian_window(window, sigma)[:, :, None, None].astype(sa.dtype)

  def filt(m):
    return jax.lax.conv_general_dilated(m[..., None], k, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))[..., 0]
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mu_a, mu_b = filt(sa), filt(sb)
  var_a = filt(sa * sa) - mu_a ** 2
  var_b = filt(sb * sb) - mu_b ** 2
  cov = filt(sa * sb) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
       / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
  return s.mean(axis=(1, 2))


def map_similarity(a: jax.Array, b: jax.Array, *, reduce: str = "sum_abs",
                   ssim_window: int = 7) -> dict[str, jax.Array]:
  """All map comparisons at once: Spearman, SSIM and the normalised L1/L2 change.

  Returns:
    ``{"spearman", "ssim", "l1", "l2"}``, each ``(B,)`` (see :func:`rank_correlation`,
    :func:`ssim`, :func:`map_change` with ``normalize="reference"``, ``a`` the reference).

  >>> import jax, jax.numpy as jnp
  >>> m = jax.random.uniform(jax.random.key(0), (2, 8, 8))
  >>> sorted(map_similarity(m, m))
  ['l1', 'l2', 'spearman', 'ssim']
  """
  out = {"spearman": rank_correlation(a, b, reduce=reduce),
         "ssim": ssim(a, b, reduce=reduce, window=ssim_window)}
  out.update(map_change(a, b, reduce=reduce))
  return out


# -- input-shift invariance (seed 003) ----------------------------------------------------------

@_validate.accepts_nnx
def shift_invariance(f: Callable[[jax.Array], jax.Array],
                     explain: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                     target: Any, shift: Any, *, reduce: str = "sum_abs",
                     ssim_window: int = 7) -> dict[str, jax.Array]:
  """Input-shift invariance (seed 003; Kindermans et al. 2019): explain ``x`` and ``x + shift``.

  Adds a constant per channel (``shift`` a scalar or ``(C,)``) to every pixel, checks that the
  predicted class is unchanged, and compares the two maps. The target is the same for both
  (the explanation of the same class before and after the shift). Baselines used inside
  ``explain`` (e.g. IG's black image) are whatever ``explain`` closes over: pass fixed arrays
  to reproduce the seed, where the baselines do not move with the input.

  Args:
    f: pure batched model, logits ``(B, K)``.
    explain: ``explain(x, target) -> attribution`` (shaped like ``x``, or like
      ``x.shape[:-1]``: ``(B, H, W)``, per-token ``(B, L)``).
    x: ``(B, H, W, C)`` images, or any rank >= 2: sequences ``(B, L, E)``, tabular
      ``(B, D)``.
    target: int or ``(B,)`` ints.
    shift: scalar or ``(C,)`` constant (``C = x.shape[-1]``: channels, embedding dimensions,
      tabular features) added to every position.
    reduce: channel aggregation of the maps (over the last axis; see
      :func:`deletion_curve` for tabular ``x``).
    ssim_window: SSIM window (images only).

  Returns:
    dict of ``(B,)`` arrays: ``prediction_unchanged`` (bool), ``score_change``
    (``f(x + c)[t] - f(x)[t]``), and ``spearman``, ``l1``, ``l2`` of the map after against
    the map before (:func:`map_similarity`), plus ``ssim`` for images ``(B, H, W, C)``.

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum((1, 2, 3)), jnp.zeros(x.shape[0])], axis=1)
  >>> r = shift_invariance(f, lambda x, t: x, jnp.ones((1, 8, 8, 1)), 0, 1.0)
  >>> bool(r["prediction_unchanged"][0]), float(r["l1"][0])
  (True, 1.0)
  """
  x = check_batched(x, "x", min_rank=2)
  b, c = x.shape[0], x.shape[-1]
  l0 = check_logits(call_model(lambda: f(x), f, x), b, f=f, x=x)
  t = check_target(target, b, l0.shape[1])
  shift = jnp.asarray(shift, x.dtype)
  if shift.ndim > 1 or (shift.ndim == 1 and shift.shape[0] != c):
    raise ValueError(f"shift: expected a scalar or a per-channel array of shape ({c},), "
                     f"got shape {shift.shape}")
  xs = x + jnp.broadcast_to(shift, x.shape)
  l1 = f(xs)
  out = {"prediction_unchanged": jnp.argmax(l0, -1) == jnp.argmax(l1, -1),
         "score_change": select_target(l1, t) - select_target(l0, t)}
  if x.ndim == 4:
    out.update(map_similarity(explain(x, t), explain(xs, t), reduce=reduce,
                              ssim_window=ssim_window))
    return out
  fa = _feature_map(explain(x, t), x.shape, reduce, "explain(x, target)").reshape(b, -1)
  fb = _feature_map(explain(xs, t), x.shape, reduce, "explain(x + shift, target)")
  fb = fb.reshape(b, -1)
  out["spearman"] = _pearson_rows(_average_ranks(fa), _average_ranks(fb), fa, fb)
  for name, p in (("l1", 1), ("l2", 2)):                    # map_change, normalize="reference"
    den = jnp.linalg.norm(fa, ord=p, axis=-1)
    out[name] = jnp.linalg.norm(fb - fa, ord=p, axis=-1) / jnp.where(den > 0, den, 1.0)
  return out


# -- model-randomisation sanity check (Adebayo et al. 2018) -------------------------------------

def _path_str(path) -> str:
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


def _cascade_model(params: Any, model: Any):
  """The wrapped model behind a cascade (or None): ``params`` itself when it is a ``Model``,
  else ``model`` (a ``Model``, or a linen module given ``{"params": params}``)."""
  from jaxplain.model import Model, wrap  # pylint: disable=import-outside-toplevel
  if isinstance(params, Model):
    return params
  if model is None:
    return None
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  if isinstance(model, nn.Module):
    return wrap(model, {"params": params})
  return wrap(model)


def _check_not_variables(params: Any) -> None:
  if isinstance(params, dict) and "params" in params and isinstance(params["params"], dict):
    raise ValueError(f"params: got a full variables dict with collections {sorted(params)}; "
                     "pass variables['params'] (and close explain over the other collections), "
                     "or the wrapped model wrap(module, variables) as params (its trainable "
                     "parameters are randomised, its batch statistics kept)")


def _owned(paths: Sequence[str], layer: str) -> list[int]:
  return [i for i, p in enumerate(paths) if p == layer or p.startswith(layer + "/")]


def cascade_layers(params: Any, layers: Sequence[str] | None = None, *, model: Any = None,
                   x: Any = None) -> list[str]:
  """The layer order of :func:`cascading_randomization`, from the logits down to the input.

  ``layers`` normalised if given; else the model's *execution* order reversed (probed on
  ``x``), keeping the innermost layers that own float parameters. A parameter dict alone does
  not record that order (JAX sorts dict keys, e.g. after ``tree_map`` or an optax update), so
  without ``layers`` the model is required: ``params`` a wrapped model, or ``model=``.

  Args:
    params: the parameter tree (``variables["params"]``) or a wrapped ``Model``.
    layers: ``/``-joined layer paths, output first.
    model: the model (a ``Model``, an NNX / Equinox / Keras model, or the linen module of
      ``{"params": params}``) when ``params`` is a plain tree.
    x: an input batch (only its shape is used) for the execution order.

  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return nn.Dense(2, name="b_out")(nn.Dense(3, name="a_in")(x))
  >>> p = Net().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  >>> cascade_layers(p, model=Net(), x=jnp.ones((1, 4)))
  ['b_out', 'a_in']
  """
  if layers is not None:
    layers = [str(l).strip("/") for l in layers]
    if not layers:
      raise ValueError("layers: expected at least one layer path")
    return layers
  m = _cascade_model(params, model)
  if m is None:
    _check_not_variables(params)
    raise ValueError("layers: a parameter dict does not record the model's layer order (JAX "
                     "sorts dict keys, e.g. after tree_map or an optax update); pass the model "
                     "and an input, cascade_layers(params, model=model, x=x) or a wrapped model "
                     "wrap(...) as params, or the layers explicitly, output first")
  if x is None:
    raise ValueError("x: required to read the model's execution order")
  names = m.layer_names(jnp.asarray(x))
  if m is params:
    owned = {n: m.layer_params(n) for n in names}
  else:
    paths = [_path_str(p) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
             if jnp.issubdtype(jnp.result_type(v), jnp.floating)]
    owned = {n: [paths[i] for i in _owned(paths, n)] for n in names}
  keep = [n for n in names if owned[n] and not any(
      o != n and o.startswith(n + "/") and owned[o] for o in names)]
  if not keep:
    raise ValueError(f"model: no layer owns float parameters; layers: {list(names)}")
  return keep[::-1]


def random_leaves(params: Any, random_params: Any, key: Any):
  """The leaves of ``params`` and their randomised values, for the randomisation checks.

  Returns ``(treedef, paths, orig, rnd, floating)``: ``rnd`` is ``random_params``' leaves (same
  structure and shapes, checked) or, without them, ``N(0, std(leaf)^2)`` draws from
  ``fold_in(key, i)``; non-float leaves (step counters, RNG counts) are never randomised.
  """
  leaves_p, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [_path_str(p) for p, _ in leaves_p]
  orig = [v for _, v in leaves_p]
  floating = [jnp.issubdtype(jnp.result_type(v), jnp.floating) for v in orig]
  if random_params is None:
    if key is None:
      raise ValueError("key: required when random_params is None")
    rnd = [jax.random.normal(jax.random.fold_in(key, i), jnp.shape(v), jnp.result_type(v))
           * jnp.std(v) if fl else v for i, (v, fl) in enumerate(zip(orig, floating))]
  else:
    rleaves, rdef = jax.tree_util.tree_flatten(random_params)
    if rdef != treedef:
      raise ValueError("random_params: expected the same tree structure as params")
    rnd = rleaves
    for p, a, r in zip(paths, orig, rnd):
      if jnp.shape(a) != jnp.shape(r):
        raise ValueError(f"random_params: leaf {p!r} has shape {jnp.shape(r)}, params has "
                         f"{jnp.shape(a)}")
  return treedef, paths, orig, rnd, floating


def randomised_leaves(params: Any, random_params: Any, key: Any,
                      layers: Sequence[str] | None = None):
  """The leaves of the randomisation checks' ``params`` (a tree or a wrapped ``Model``), their
  randomised values, and which to randomise.

  Returns ``(treedef, paths, orig, rnd, owner)``: ``owner[i]`` is the index of the first of
  ``layers`` owning leaf ``i`` and ``len(layers)`` for a leaf no layer owns; without
  ``layers``, 0 for every leaf to randomise and 1 for the others. Only float leaves are
  randomised and, of a wrapped model, only its trainable ones (not batch statistics); a full
  variables dict is refused (its batch statistics would be randomised as weights).
  """
  from jaxplain.model import Model  # pylint: disable=import-outside-toplevel
  wrapped = params if isinstance(params, Model) else None
  if wrapped is not None:
    params = wrapped.params
    if isinstance(random_params, Model):
      random_params = random_params.params
  else:
    _check_not_variables(params)
  treedef, paths, orig, rnd, floating = random_leaves(params, random_params, key)
  if wrapped is not None:
    trainable = set(wrapped.adapter.trainable_paths(params))
    floating = [fl and p in trainable for p, fl in zip(paths, floating)]
  if layers is None:
    return treedef, paths, orig, rnd, [0 if fl else 1 for fl in floating]
  owner = [len(layers)] * len(paths)
  for j, l in enumerate(layers):
    idx = ([paths.index(q) for q in wrapped.layer_params(l)] if wrapped is not None
           else _owned(paths, l))
    idx = [i for i in idx if floating[i]]
    if not idx:
      raise ValueError(f"layers: {l!r} matches no parameter; available paths: "
                       f"{[p for p, fl in zip(paths, floating) if fl]}")
    for i in idx:
      owner[i] = min(owner[i], j)
  return treedef, paths, orig, rnd, owner


def cascading_randomization(explain: Callable[[Any, jax.Array, jax.Array], jax.Array],
                            params: Any, x: jax.Array, target: Any, *,
                            random_params: Any = None, key: jax.Array | None = None,
                            layers: Sequence[str] | None = None, model: Any = None,
                            reduce: str = "sum_abs", ssim_window: int = 7,
                            chunk: int | None = None) -> dict[str, Any]:
  """Cascading model-parameter randomisation (Adebayo et al. 2018, sec. 3.1).

  Stage 0 is the trained model; stage ``s`` re-initialises the first ``s`` entries of
  ``layers`` (ordered from the logits down to the input), so the cascade destroys the model
  from the top. Each stage's map is compared with the stage-0 map. A method that passes the
  check shows high similarity at stage 0 and low similarity once the weights are random.
  All stages run as one vectorised computation over a stacked parameter tree. Only floating
  leaves are randomised (integer leaves such as an RNG count or a step counter are left
  alone); with a wrapped model only its trainable parameters (not batch statistics).

  Args:
    explain: ``explain(params, x, target) -> attribution`` (shaped like ``x`` or
      ``(B, H, W)``), closing over the model, e.g.
      ``lambda p, x, t: gradient(lambda z: model.apply({"params": p}, z), x, t)``; with a
      wrapped model ``m`` it receives the whole ``m.params``: ``lambda p, x, t:
      gradient(lambda z: m.apply(p, z), x, t)``.
    params: the trained parameter pytree (``variables["params"]``), or a wrapped ``Model``
      (:func:`jaxplain.wrap`; layer names and order then come from the model).
    x: ``(B, H, W, C)`` inputs.
    target: int or ``(B,)`` ints.
    random_params: a re-initialised tree with the same structure (``model.params`` of a
      re-initialised wrapped model), e.g. ``model.init(other_key, x)["params"]`` (the paper's
      re-initialisation). If ``None``, each float leaf is replaced by Gaussian noise with that
      leaf's own standard deviation, drawn from ``key`` (a constant leaf, such as an untrained
      batch-norm scale of ones, then becomes zeros: pass ``random_params`` for such models).
    key: ``jax.random`` key, required when ``random_params`` is ``None``.
    layers: ``/``-joined paths of layers (e.g. ``"fc3"`` or ``"stage3_block1/conv2"``), from
      the output towards the input; default: the model's execution order reversed
      (:func:`cascade_layers`), which needs the model (``params`` wrapped, or ``model=``).
    model: the model of a plain ``params`` tree, for the default layer order (see
      :func:`cascade_layers`).
    reduce: channel aggregation of the maps.
    ssim_window: SSIM window.
    chunk: explain this many stages at a time, the chunks one after another, to bound memory
      (on CPU ``chunk=1`` is also the fastest: XLA lowers a convolution vmapped over its
      weights to a grouped convolution); ``None`` = all stages in one ``vmap``.

  Returns:
    ``{"spearman"``: ``(L + 1, B)`` rank correlation of the ``reduce`` maps with the original,
    ``"spearman_signed"``: ``(L + 1, B)`` on the signed channel sum,
    ``"ssim"``: ``(L + 1, B)``, ``"maps"``: ``(L + 1, B, H, W)`` pixel maps (``reduce``),
    ``"maps_signed"``: ``(L + 1, B, H, W)`` signed channel sums}.
    Row ``s`` is the stage after re-initialising ``layers[:s]``; the row labels are
    ``["original", *cascade_layers(...)]`` (arrays only, so the call can be jitted).

  >>> import jax, jax.numpy as jnp
  >>> p = {"w1": jnp.ones((64, 3)), "w2": jnp.ones((3, 2))}
  >>> f = lambda p, x: jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"]) @ p["w2"]
  >>> ex = lambda p, x, t: jax.grad(lambda z: f(p, z)[:, 0].sum())(x)
  >>> x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  >>> r = cascading_randomization(ex, p, x, 0, key=jax.random.key(0), layers=["w2", "w1"])
  >>> r["spearman"].shape
  (3, 2)
  """
  x = _check_image(x)
  t = check_target(target, x.shape[0])
  layers = cascade_layers(params, layers, model=model, x=x)
  treedef, _, orig, rnd, layer_of = randomised_leaves(params, random_params, key, layers)

  n_stages = len(layers) + 1
  stage = jnp.arange(n_stages)
  stacked = []
  for a, r, j in zip(orig, rnd, layer_of):
    a = jnp.asarray(a)
    mask = (stage > j).reshape((n_stages,) + (1,) * a.ndim)
    stacked.append(jnp.where(mask, jnp.asarray(r, a.dtype)[None], a[None]))
  stacked = jax.tree_util.tree_unflatten(treedef, stacked)

  def stage_maps(p):
    att = explain(p, x, t)
    return pixel_saliency(att, reduce=reduce), pixel_saliency(att, reduce="sum")

  if chunk is None:
    maps, signed = jax.vmap(stage_maps)(stacked)
  else:                  # the few stages run chunk by chunk, one after another (not a loop
    parts = []           # primitive: a backward pass inside XLA's CPU while loop runs slower)
    for lo in range(0, n_stages, int(chunk)):
      part = jax.tree_util.tree_map(lambda v, lo=lo: v[lo:lo + int(chunk)], stacked)
      parts.append(jax.vmap(stage_maps)(part))
    maps, signed = (jnp.concatenate(v) for v in zip(*parts))
  if maps.shape[1:] != x.shape[:3]:
    raise ValueError(f"explain: expected maps shaped like x {x.shape} or {x.shape[:3]}, got "
                     f"{maps.shape[1:]}")
  ref = jnp.broadcast_to(maps[0], maps.shape)
  ref_signed = jnp.broadcast_to(signed[0], signed.shape)
  flat = lambda m: m.reshape(n_stages * m.shape[1], *m.shape[2:])
  unflat = lambda v: v.reshape(n_stages, -1)
  return {
      "spearman": unflat(rank_correlation(flat(ref), flat(maps))),
      "spearman_signed": unflat(rank_correlation(flat(ref_signed), flat(signed))),
      "ssim": unflat(ssim(flat(ref), flat(maps), window=ssim_window)),
      "maps": maps,
      "maps_signed": signed,
  }
