"""Faithfulness metrics: pixel flipping, ROAD, IROF, infidelity, faithfulness correlation.

Conventions (``jaxplain.evaluation``): ``f`` is a pure batched model ``(B, ...) -> (B, K)``;
an attribution is shaped like ``x`` or a leading part of it (``(B, H, W)`` for images); its
elements are the features. Each metric is one vectorised computation over all steps / samples
of all examples (``chunk`` bounds memory), keyed where random, jittable, and never calls
``jax.jit``. Definitions follow the papers and Quantus 0.6; differences are stated per
function.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _validate
from jaxplain._batching import map_merged
from jaxplain.evaluation import _common as C

Array = jax.Array

__all__ = ["pixel_flipping", "road", "irof", "infidelity", "faithfulness_correlation"]


def _counts(steps: Any, n: int) -> np.ndarray:
  from jaxplain.metrics import step_fractions
  return np.round(step_fractions(steps, n) * n).astype(np.int64)


@_validate.accepts_nnx
def pixel_flipping(f: C.Fn, x: Array, target: Any, attributions: Array, *, steps: Any = 20,
                   value: Any = 0.0, output: str = "logit",
                   chunk: int | None = None) -> Array:
  """Pixel flipping (Bach et al. 2015): the class score as the top-ranked features are removed.

  At step ``k`` the ``k`` features of highest attribution (ties by index) are set to
  ``value``. This is :func:`jaxplain.deletion_curve` for inputs of any rank and any feature
  map. Quantus's ``PixelFlipping`` flips ``features_in_step`` features per step and orders
  them with an unstable ``argsort`` (ties in any order); the curves coincide otherwise.

  Args:
    f: pure batched model.
    x: ``(B, ...)`` inputs.
    target: an int or ``(B,)`` ints.
    attributions: shaped like ``x`` or a leading part of it.
    steps: an int ``n`` (fractions ``0, 1/n, .., 1``), or a sequence of feature counts (ints)
      or fractions (floats), as :func:`jaxplain.step_fractions`.
    value: removal value, a scalar or an array broadcasting to ``x`` (random baseline: pass
      ``jax.random.uniform(key, x.shape)``).
    output: ``"logit"``, ``"log_softmax"`` or ``"softmax"``.
    chunk: steps per call of ``f``;
      ``None``: all at once up to 2^23 input elements per call of ``f``, as many as fit
      under that otherwise.

  Returns:
    ``(B, S)`` scores (summarise with :func:`jaxplain.area_under_curve`).

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum(1), -x.sum(1)], 1)
  >>> x = jnp.array([[1.0, 3.0, 2.0]])
  >>> pixel_flipping(f, x, 0, x, steps=[0, 1, 2, 3]).tolist()
  [[6.0, 3.0, 1.0, 0.0]]
  """
  x = C.check_x(x)
  C.check_output(output)
  C.check_chunk(chunk)
  a = C.check_map(attributions, x.shape)
  t, _ = C.target_and_logits(f, x, target)
  base = C.baseline(x, value)
  ranks = C.descending_ranks(C.flat(a))
  counts = jnp.asarray(_counts(steps, ranks.shape[1]), jnp.int32)

  def make(k):
    return (jnp.where(C.to_x(ranks < k, a.shape, x.shape), base, x), t), None

  return C.map_scores(f, make, counts, chunk, output).T


# -- ROAD --------------------------------------------------------------------------------------

_W_DIRECT, _W_DIAG = 1.0 / 6.0, 1.0 / 12.0
_W_TOKEN = 0.5   # sequences: the left and right neighbour (the 1-D analogue of the stencil)


def _neighbour_sum(u: Array) -> Array:
  """sum_j w_ij u_j over the 8 neighbours of a pixel (u (N, H, W, C)) or the 2 of a token
  (u (N, L, E)), zero outside the image / sequence."""
  if u.ndim == 3:
    p = jnp.pad(u, ((0, 0), (1, 1), (0, 0)))
    return _W_TOKEN * (p[:, :-2] + p[:, 2:])
  p = jnp.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = u.shape[1], u.shape[2]
  s = jnp.zeros_like(u)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      if dy == 0 and dx == 0:
        continue
      wt = _W_DIAG if dy and dx else _W_DIRECT
      s = s + wt * p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w, :]
  return s


def linear_imputation(x: Array, removed: Array, *, tol: float = 1e-6,
                      maxiter: int = 500) -> Array:
  """Replace the removed pixels of images by the linear imputation of Rong et al. 2022.

  Each removed pixel equals the weighted mean of its 8 neighbours (weight 1/6 direct, 1/12
  diagonal, neighbours outside the image left out), known pixels fixed: one sparse symmetric
  positive-definite system per image and channel, solved for the whole batch at once by
  conjugate gradients on its convolution form (Quantus solves it exactly with ``spsolve``).
  Sequences ``(N, L, E)``: a removed token equals the mean of its left and right neighbours
  (weight 1/2 each; the 1-D analogue, an extension of the paper's image stencil).

  Args:
    x: ``(N, H, W, C)`` images or ``(N, L, E)`` sequences.
    removed: ``(N, H, W)`` / ``(N, L)`` bool (or with a trailing 1), what to impute.
    tol, maxiter: conjugate-gradient stopping rule.

  Returns:
    ``x`` with the removed pixels / tokens imputed.

  >>> import jax.numpy as jnp
  >>> x = jnp.ones((1, 3, 3, 1)).at[0, 1, 1, 0].set(5.0)
  >>> r = jnp.zeros((1, 3, 3), bool).at[0, 1, 1].set(True)
  >>> round(float(linear_imputation(x, r)[0, 1, 1, 0]), 4)
  1.0
  """
  r = jnp.asarray(removed)
  if x.ndim not in (3, 4):
    raise ValueError(f"x: expected images (N, H, W, C) or sequences (N, L, E), got shape "
                     f"{x.shape}")
  if r.ndim == x.ndim - 1:
    r = r[..., None]
  r = jnp.broadcast_to(r, x.shape).astype(x.dtype)
  known = (1.0 - r) * x
  deg = _neighbour_sum(jnp.ones_like(x))
  rhs = r * _neighbour_sum(known)

  def matvec(u):
    u = r * u
    return r * (deg * u - _neighbour_sum(u)) + (1.0 - r) * u

  sol, _ = jax.scipy.sparse.linalg.cg(matvec, rhs, x0=r * x, tol=tol, maxiter=maxiter)
  return known + r * sol


@_validate.accepts_nnx
def road(f: C.Fn, x: Array, target: Any, attributions: Array, *, key: Array,
         percentages: Sequence[float] = tuple(range(1, 100, 2)), noise: float = 0.01,
         order: str = "morf", output: str = "accuracy", chunk: int | None = None) -> Array:
  """ROAD (Rong et al. 2022): remove the top p% pixels by noisy linear imputation.

  For each percentage ``p`` the ``round(p / 100 * H * W)`` most (``order="morf"``) or least
  (``"lerf"``) relevant pixels are imputed by :func:`linear_imputation` plus Gaussian noise of
  standard deviation ``noise`` (keyed), and the model is evaluated. Quantus's ``ROAD`` uses
  ``int`` (floor) for the count, flattens a channel-broadcast attribution (so counts refer to
  channel-pixels) and an exact sparse solve; on pixel maps the definitions coincide.

  Sequences ``(B, L, E)`` work the same way with tokens for pixels (``round(p / 100 * L)``
  tokens, imputed from their two neighbours, see :func:`linear_imputation`); tabular
  ``(B, D)`` inputs have no neighbours to impute from and are rejected.

  Args:
    f, target: as in :func:`pixel_flipping`.
    x: ``(B, H, W, C)`` images or ``(B, L, E)`` sequences.
    attributions: shaped like ``x`` (summed over the last axis into a pixel / token
      ranking) or a pixel map ``(B, H, W)`` / token scores ``(B, L)``.
    key: ``jax.random`` key for the imputation noise (percentage ``i``: ``fold_in(key, i)``).
    percentages: percentages of pixels removed, in ``[0, 100]``.
    noise: standard deviation of the noise added to the imputed pixels.
    order: ``"morf"`` (most relevant first) or ``"lerf"``.
    output: ``"accuracy"`` (1 where ``argmax f = target``, Quantus's score), or a score as in
      :func:`pixel_flipping`.
    chunk: percentages per call of ``f``.

  Returns:
    ``(B, P)`` float scores, one per percentage.

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum((1, 2, 3)), 4.0 - x.sum((1, 2, 3))], 1)
  >>> x = jnp.ones((1, 4, 4, 1))
  >>> road(f, x, 0, x[..., 0], key=jax.random.key(0), percentages=[0, 50]).tolist()
  [[1.0, 1.0]]
  """
  x = C.check_x(x)
  if x.ndim not in (3, 4):
    raise ValueError(f"x: ROAD needs images (B, H, W, C) or sequences (B, L, E) (it imputes "
                     f"from neighbours; tabular data have none), got shape {x.shape}")
  if order not in ("morf", "lerf"):
    raise ValueError(f"order: expected 'morf' or 'lerf', got {order!r}")
  if output != "accuracy":
    C.check_output(output)
  C.check_chunk(chunk)
  a = jnp.asarray(attributions)
  if a.shape == x.shape:
    a = jnp.sum(a, axis=-1)
  a = C.check_map(a, x.shape[:-1])
  t, _ = C.target_and_logits(f, x, target)
  pct = np.asarray(percentages, np.float64)
  if pct.ndim != 1 or pct.size == 0 or pct.min() < 0 or pct.max() > 100:
    raise ValueError(f"percentages: expected a non-empty 1-D sequence in [0, 100], got "
                     f"{percentages!r}")
  n_feat = math.prod(x.shape[1:-1])                      # pixels H * W or tokens L
  counts = jnp.asarray(np.round(pct / 100.0 * n_feat).astype(np.int32))
  s = C.flat(a)
  ranks = C.descending_ranks(s if order == "morf" else -s)

  def make(i):
    removed = (ranks < counts[i]).reshape(x.shape[:-1] + (1,))
    xi = linear_imputation(x, removed)
    eps = noise * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return (jnp.where(removed, xi + eps, x), t), None

  def call(xi, ti):
    logits = f(xi)
    if output == "accuracy":
      hit = jnp.argmax(logits, axis=-1).astype(jnp.int32) == ti.astype(jnp.int32)   # x64
      return hit.astype(_validate.accumulation_dtype(x.dtype))
    return _validate.as_float(C._output_value(logits, ti, output))

  return map_merged(make, call, jnp.arange(pct.size), chunk).T


# -- IROF --------------------------------------------------------------------------------------

@_validate.accepts_nnx
def irof(f: C.Fn, x: Array, target: Any, attributions: Array, *, segments: Any,
         num_segments: int | None = None, value: Any = "mean", output: str = "softmax",
         chunk: int | None = None) -> dict[str, Array]:
  """IROF (Rieger & Hansen 2020): remove superpixels by mean relevance, area over the curve.

  Segments are ranked by the mean attribution over their elements (all channels); the top
  ``k`` segments are set to ``value`` for ``k = 0 .. n``, the class score is divided by the
  unperturbed one, and the IROF score is ``1 - area`` of that curve over the removed
  fraction ``k / n`` (higher = more faithful). Quantus reports ``n - trapz(curve[1:])``,
  unnormalised and without the ``k = 0`` point.

  Args:
    f, x, target: as in :func:`pixel_flipping`.
    attributions: shaped like ``x`` or a leading part of it.
    segments: int segment ids, ``(H, W)``-like (shared by the batch, e.g.
      :func:`jaxplain.perturbation.grid_segments`) or with the batch axis; ids ``0 .. n-1``.
    num_segments: ``n`` (static); default ``max(segments) + 1``.
    value: removal value: ``"mean"`` (each image's per-channel mean, Quantus's default), a
      scalar, or an array broadcasting to ``x``.
    output: as in :func:`pixel_flipping` (default softmax, as the paper).
    chunk: steps per call of ``f``.

  Returns:
    ``{"irof": (B,), "curve": (B, n + 1)}``.

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum(1), -x.sum(1)], 1)
  >>> x = jnp.array([[3.0, 1.0]])
  >>> r = irof(f, x, 0, x, segments=jnp.arange(2), value=0.0, output="logit")
  >>> r["curve"].tolist(), round(float(r["irof"][0]), 4)
  ([[1.0, 0.25, 0.0]], 0.625)
  """
  from jaxplain.perturbation import _features
  x = C.check_x(x)
  C.check_output(output)
  C.check_chunk(chunk)
  t, _ = C.target_and_logits(f, x, target)
  fm, n = _features(x, segments, num_segments,
                    names=("segments", "num_segments"))                      # (B, N) ids
  a = C.check_map(attributions, x.shape)
  a_x = C.flat(C.to_x(C.flat(a), a.shape, x.shape))                   # (B, N)
  onehot = jax.nn.one_hot(fm, n, dtype=a_x.dtype)                      # (B, N, n)
  size = onehot.sum(1)
  seg_mean = jnp.einsum("bn,bns->bs", a_x, onehot) / jnp.maximum(size, 1.0)
  seg_mean = jnp.where(size > 0, seg_mean, -jnp.inf)
  ranks = C.descending_ranks(seg_mean)                                 # (B, n)
  elem_rank = jnp.take_along_axis(ranks, fm, axis=1).reshape(x.shape)
  if isinstance(value, str):
    if value != "mean":
      raise ValueError(f"value: expected 'mean', a scalar or an array, got {value!r}")
    base = jnp.broadcast_to(jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True),
                            x.shape)
  else:
    base = C.baseline(x, value)
  ref = C.score(f, x, t, output)

  def make(k):
    return (jnp.where(elem_rank < k, base, x), t), None

  ks = jnp.arange(n + 1, dtype=jnp.int32)
  curve = C.map_scores(f, make, ks, chunk, output).T / ref[:, None]
  area = jnp.sum(curve[:, 1:] + curve[:, :-1], axis=1) / (2.0 * n)     # trapezoid over k / n
  return {"irof": 1.0 - area, "curve": curve}


# -- infidelity ----------------------------------------------------------------------------------

@_validate.accepts_nnx
def infidelity(f: C.Fn, x: Array, target: Any, attributions: Array, *, key: Array,
               n_samples: int = 64, sigma: float = 0.1, normalize: bool = False,
               output: str = "logit", chunk: int | None = None) -> Array:
  """Infidelity (Yeh et al. 2019, eq. 1) with Gaussian perturbations.

  ``INFD = E_I[(I . a - (f(x)[t] - f(x - I)[t]))^2]`` with ``I ~ N(0, sigma^2)`` per element,
  estimated from ``n_samples`` keyed draws. ``normalize=True`` first rescales the
  attribution by the optimal ``beta = E[I.a d] / E[(I.a)^2]`` (the paper's
  scale-invariant variant, Captum's ``normalize``). Quantus's ``Infidelity`` perturbs square
  patches by a baseline instead; the formula is the same.

  Args:
    f, x, target: as in :func:`pixel_flipping`.
    attributions: shaped like ``x`` or a leading part of it (broadcast over the rest; the
      dot product runs over all elements of ``x``).
    key: ``jax.random`` key; sample ``i`` uses ``fold_in(key, i)``.
    n_samples: number of perturbations.
    sigma: noise standard deviation.
    normalize: use the optimally scaled attribution.
    output, chunk: as in :func:`pixel_flipping` (``chunk``: samples per call).

  Returns:
    ``(B,)`` infidelity (lower is better; 0 for the gradient of a linear model).

  >>> import jax, jax.numpy as jnp
  >>> w = jnp.array([1.0, -2.0])
  >>> f = lambda x: jnp.stack([x @ w, -(x @ w)], 1)
  >>> x = jnp.ones((1, 2))
  >>> float(infidelity(f, x, 0, jnp.broadcast_to(w[None], x.shape), key=jax.random.key(0))[0]) < 1e-9
  True
  """
  x = C.check_x(x)
  C.check_output(output)
  C.check_chunk(chunk)
  n = C.check_count(n_samples, "n_samples")
  a = C.to_x(C.flat(C.check_map(attributions, x.shape)), jnp.shape(attributions), x.shape)
  t, _ = C.target_and_logits(f, x, target)
  ref = C.score(f, x, t, output)

  def make(i):
    noise = sigma * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return (x - noise, t), jnp.sum(C.flat(noise.astype(a.dtype) * a), axis=1)   # bf16 x

  dots, scores = C.map_scores(f, make, jnp.arange(n), chunk, output, with_extra=True)
  deltas = ref[None] - scores                                          # (S, B) each
  if normalize:
    den = jnp.mean(dots * dots, axis=0)
    beta = jnp.where(den > 0, jnp.mean(dots * deltas, axis=0) / jnp.where(den > 0, den, 1.0),
                     1.0)
    dots = dots * beta[None]
  return jnp.mean((dots - deltas) ** 2, axis=0)


# -- faithfulness correlation ----------------------------------------------------------------

@_validate.accepts_nnx
def faithfulness_correlation(f: C.Fn, x: Array, target: Any, attributions: Array, *,
                             key: Array, n_runs: int = 100, subset_size: int = 224,
                             value: Any = 0.0, output: str = "logit",
                             chunk: int | None = None) -> Array:
  """Faithfulness correlation (Bhatt et al. 2020, eq. 2).

  For ``n_runs`` random subsets ``S`` of ``subset_size`` features (keyed, per example), the
  Pearson correlation over runs between ``sum_{i in S} a_i`` and
  ``f(x)[t] - f(x with S set to value)[t]``. As Quantus's ``FaithfulnessCorrelation``
  (which uses unseeded NumPy draws).

  Args:
    f, x, target, value, output: as in :func:`pixel_flipping`.
    attributions: shaped like ``x`` or a leading part of it (its elements are the features).
    key: ``jax.random`` key; run ``i`` uses ``fold_in(key, i)``.
    n_runs: number of random subsets.
    subset_size: features per subset (at most the number of features).
    chunk: runs per call of ``f``.

  Returns:
    ``(B,)`` correlations in ``[-1, 1]`` (0 where either side is constant).

  >>> import jax, jax.numpy as jnp
  >>> w = jnp.array([1.0, -2.0, 3.0, 0.5])
  >>> f = lambda x: jnp.stack([x @ w, -(x @ w)], 1)
  >>> x = jnp.ones((1, 4))
  >>> r = faithfulness_correlation(f, x, 0, w[None] * x, key=jax.random.key(0), n_runs=10,
  ...                              subset_size=2)
  >>> round(float(r[0]), 4)
  1.0
  """
  x = C.check_x(x)
  C.check_output(output)
  C.check_chunk(chunk)
  n = C.check_count(n_runs, "n_runs", 2)
  a = C.check_map(attributions, x.shape)
  af = C.flat(a)
  nfeat = af.shape[1]
  k = C.check_count(subset_size, "subset_size")
  if k > nfeat:
    raise ValueError(f"subset_size: expected <= the number of features {nfeat}, got {k}")
  t, _ = C.target_and_logits(f, x, target)
  base = C.baseline(x, value)
  ref = C.score(f, x, t, output)

  def make(i):
    u = jax.random.uniform(jax.random.fold_in(key, i), af.shape)
    chosen = C.descending_ranks(u) < k
    xs = jnp.where(C.to_x(chosen, a.shape, x.shape), base, x)
    return (xs, t), jnp.sum(jnp.where(chosen, af, 0.0), axis=1)

  sums, scores = C.map_scores(f, make, jnp.arange(n), chunk, output, with_extra=True)
  deltas = ref[None] - scores
  return C.pearson(sums.T, deltas.T)
