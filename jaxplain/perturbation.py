"""Perturbation attributions: feature ablation, Shapley value sampling, KernelSHAP, LIME, RISE.

Every method explains ``f(x)[t]`` through the outputs of ``f`` on copies of ``x`` in which some
*features* are replaced by a ``baseline``. A feature is a group of input elements given by an
integer ``feature_mask`` (pixels, superpixels, tokens, tabular columns); by default every
element of ``x[b]`` is its own feature. All samples of all examples form one vectorised
computation: ``f`` is called on ``(B, ...)`` batches mapped over the sample axis, all at once
(``chunk=None``, up to 2^23 input elements per call; beyond that as many samples as fit) or
``chunk`` samples at a time (``jax.lax.map``) to bound memory. Randomness
comes from a ``key``; sample ``i`` uses ``fold_in(key, i)``, so the result does not depend on
``chunk``. Nothing here calls ``jax.jit``.

Definitions (SPEC section 11):

* feature ablation (Captum ``FeatureAblation``): ``a_i = f(x)[t] - f(x with feature i set to
  the baseline)[t]``.
* Shapley value sampling (Castro et al. 2009, Captum ``ShapleyValueSampling``): for random
  feature orders, insert the features one by one into the baseline and credit each with the
  change of ``f``; average over ``n_samples`` orders.
* KernelSHAP (Lundberg & Lee 2017, theorem 2): coalitions ``z`` drawn from the Shapley-kernel
  distribution over coalition sizes, then the weighted least-squares fit
  ``g(z) = phi_0 + z . phi`` with the efficiency constraint
  ``sum(phi) = f(x)[t] - f(baseline)[t]`` enforced exactly (as ``shap.KernelExplainer``).
  ``n_samples=None`` enumerates all ``2^F - 2`` coalitions with their kernel weights, which
  gives the exact Shapley values.
* LIME (Ribeiro et al. 2016): coalitions ``z ~ Bernoulli(1/2)`` per feature, weights
  ``exp(-d(z, 1)^2 / width^2)`` with ``d`` the cosine distance in the interpretable (binary)
  space (as ``lime_image``), and a weighted ridge regression with an unpenalised intercept,
  solved in closed form ``(Z1^T W Z1 + alpha D)^{-1} Z1^T W y``.
* RISE (Petsiuk et al. 2018, eq. 6): ``S_i = 1 / (N p) sum_n f(x . m_n)[t] m_n,i`` over
  random masks kept with probability ``p``; for images without a ``feature_mask``, the
  smooth masks of the paper (a ``grid x grid`` Bernoulli grid, bilinearly upsampled and
  randomly shifted).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _pack
from jaxplain import _validate
from jaxplain._batching import map_merged
from jaxplain.gradients import _check_output, _output_value

Array = jax.Array
Fn = Callable[[Array], Array]

__all__ = ["feature_ablation", "shapley_value_sampling", "kernel_shap", "lime", "rise",
           "grid_segments"]


# -- shared machinery ----------------------------------------------------------------------

def grid_segments(shape: tuple[int, ...], cell: Any) -> np.ndarray:
  """Superpixels of a fixed grid: an int feature mask ``(H, W)`` of ``cell``-sized squares.

  Args:
    shape: ``(H, W)`` (extra trailing entries such as channels are ignored).
    cell: an int or ``(ch, cw)``: the size of one grid cell (the last row/column of cells
      may be smaller).

  Returns:
    ``(H, W)`` int32 NumPy array of segment ids ``0 .. n - 1``, row-major.

  >>> grid_segments((2, 4), 2).tolist()
  [[0, 0, 1, 1], [0, 0, 1, 1]]
  """
  if len(shape) < 2:
    raise ValueError(f"shape: expected (H, W, ...), got {shape!r}")
  c = (cell, cell) if isinstance(cell, (int, np.integer)) else tuple(cell)
  if len(c) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in c):
    raise ValueError(f"cell: expected an int >= 1 or a pair of them, got {cell!r}")
  h, w = int(shape[0]), int(shape[1])
  nw = -(-w // c[1])
  rows = np.arange(h)[:, None] // c[0]
  cols = np.arange(w)[None, :] // c[1]
  return (rows * nw + cols).astype(np.int32)


def _features(x: Array, feature_mask: Any, num_features: int | None, *,
              names: tuple[str, str] = ("feature_mask", "num_features")) -> tuple[Array, int]:
  """Expand ``feature_mask`` to ``(B, N)`` int32 ids over the flattened elements of x[b].
  ``names``: the two arguments' names in the caller's errors."""
  mask_name, count_name = names
  b = x.shape[0]
  n = math.prod(x.shape[1:])
  if feature_mask is None:
    if num_features is not None and num_features != n:
      raise ValueError(
          f"{count_name}={num_features} without a {mask_name}: every element of x[b] is then "
          f"its own feature ({n} features); give {mask_name}= for groups (e.g. "
          f"jaxplain.perturbation.grid_segments({x.shape[1:3]}, cell) for square superpixels)")
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), n
  # the ids' values, read before jnp touches them: under jit jnp.asarray turns even a NumPy
  # mask (grid_segments) into a tracer
  mn = np.asarray(feature_mask) if _validate.is_concrete(feature_mask) else None
  m = jnp.asarray(feature_mask)
  if not jnp.issubdtype(m.dtype, jnp.integer):
    raise TypeError(f"{mask_name}: expected integer feature ids, got dtype {m.dtype}")
  r = m.ndim
  if 1 <= r < x.ndim and m.shape == x.shape[1:1 + r]:
    m = jnp.broadcast_to(m.reshape(m.shape + (1,) * (x.ndim - 1 - r)), x.shape[1:])
    m = jnp.broadcast_to(m[None], x.shape)
  elif 1 <= r <= x.ndim and m.shape == x.shape[:r]:
    m = jnp.broadcast_to(m.reshape(m.shape + (1,) * (x.ndim - r)), x.shape)
  else:
    raise ValueError(
        f"{mask_name}: expected a shape that is a leading part of x[b] {x.shape[1:]} "
        f"(e.g. (H, W) for images) or of x {x.shape} (with the batch axis); got {m.shape}"
        + (f" (square superpixels: jaxplain.perturbation.grid_segments({x.shape[1:3]}, cell))"
           if m.ndim == 0 and x.ndim == 4 else ""))
  if num_features is None:
    if mn is None:
      raise ValueError(f"{count_name}: required when {mask_name} is traced (under jit)")
    num_features = int(np.max(mn)) + 1
  if mn is not None:
    if mn.min() < 0 or mn.max() >= num_features:
      raise ValueError(f"{mask_name}: ids must lie in [0, {num_features}), got "
                       f"[{mn.min()}, {mn.max()}]")
  return m.reshape(b, n).astype(jnp.int32), int(num_features)


def _baseline(x: Array, baseline: Any) -> Array:
  return _validate.broadcast_to_x(baseline, x, "baseline")


def _setup(f, x, target, baseline, output, feature_mask, num_features, chunk):
  _check_output(output)
  _validate.check_chunk(chunk)
  x = _validate.check_batched(x, "x", min_rank=2)
  logits = _validate.check_model(f, x)  # shapes only; x may be one example
  t = _validate.check_target(target, x.shape[0], logits.shape[-1])
  fm, nf = _features(x, feature_mask, num_features)
  return x, t, _baseline(x, baseline), fm, nf


def _scores(f: Fn, x: Array, t: Array, base: Array, fm: Array, zfn: Callable[[Array], Array],
            n: int, output: str, chunk: int | None) -> Array:
  """``(n, B)`` outputs of ``f`` on the inputs kept by ``zfn(i)`` ((B, F) bool or weights)."""

  def make(i):
    z = zfn(i)
    m = jnp.take_along_axis(z, fm, axis=1).reshape(x.shape)
    if m.dtype == jnp.bool_:
      xs = jnp.where(m, x, base)
    else:
      xs = base + m.astype(x.dtype) * (x - base)
    return (xs, t), None

  # the copies of a chunk go through f as one batch (see jaxplain._batching)
  return map_merged(make, lambda xs, ti: _output_value(f(xs), ti, output),
                    jnp.arange(n, dtype=jnp.int32), chunk)


def _expand(values: Array, fm: Array, shape: tuple[int, ...]) -> Array:
  """(B, F) per-feature values -> shaped like x (each element gets its feature's value)."""
  return jnp.take_along_axis(values, fm, axis=1).reshape(shape)


def _ranks(key: Array, b: int, nf: int) -> Array:
  """(B, F) the position of each feature in a uniformly random order, per example."""
  u = jax.random.uniform(key, (b, nf))
  return jnp.argsort(jnp.argsort(u, axis=1), axis=1).astype(jnp.int32)


# -- feature ablation ----------------------------------------------------------------------

@_validate.accepts_nnx
@_pack.several_inputs("baseline", ids=("feature_mask",))
def feature_ablation(f: Fn, x: Array, target: Any, *, feature_mask: Any = None,
                     num_features: int | None = None, baseline: Any = 0.0,
                     output: str = "logit", chunk: int | None = None) -> Array:
  """Feature ablation: the drop of ``f(x)[t]`` when one feature is set to the baseline.

  Args:
    f: pure batched model, ``(B, ...) -> (B, K)`` logits.
    x: ``(B, ...)`` inputs of any rank (images, sequences, tabular); or a tuple or dict
      of such batches (several inputs; ``feature_mask`` then one mask per input, ids
      shared across inputs, and ``baseline`` a scalar or the same structure).
    target: an int or ``(B,)`` ints.
    feature_mask: int feature ids shaped like a leading part of ``x[b]`` (e.g. ``(H, W)``
      superpixels shared by the channels) or of ``x`` (per example); ``None``: every element.
    num_features: the number of features (static); default ``max(feature_mask) + 1``.
    baseline: replacement value, a scalar or an array broadcasting to ``x``.
    output: ``"logit"``, ``"log_softmax"``, ``"softmax"`` or ``"cross_entropy"``.
    chunk: features ablated per call of ``f``;
      ``None``: all at once up to 2^23 input elements per call of ``f``, as many as fit
      under that otherwise.

  Returns:
    Attributions shaped like ``x`` (each element carries its feature's value).

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x @ jnp.array([1.0, 2.0, 3.0]), -x.sum(1)], 1)
  >>> feature_ablation(f, jnp.ones((1, 3)), 0).tolist()
  [[1.0, 2.0, 3.0]]
  """
  x, t, base, fm, nf = _setup(f, x, target, baseline, output, feature_mask, num_features,
                              chunk)
  b = x.shape[0]
  ref = _output_value(_validate.model_outputs(f, x), t, output)
  eye = jnp.eye(nf, dtype=jnp.bool_)
  zfn = lambda i: jnp.broadcast_to(~eye[i], (b, nf))
  drops = ref[None] - _scores(f, x, t, base, fm, zfn, nf, output, chunk)    # (F, B)
  return _expand(drops.T, fm, x.shape)


# -- feature permutation --------------------------------------------------------------------

def _cycles(key: Array, b: int, nf: int) -> Array:
  """(F, B): for feature i, the example each example takes its values from: a random cyclic
  permutation of the batch (``s = permutation(fold_in(key, i), B)``, ``s[k]`` takes from
  ``s[k + 1]``), so no example keeps its own values."""
  def one(i):
    s = jax.random.permutation(jax.random.fold_in(key, i), b)
    return jnp.zeros(b, jnp.int32).at[s].set(jnp.roll(s, -1).astype(jnp.int32))
  return jax.vmap(one)(jnp.arange(nf))


@_validate.accepts_nnx
@_pack.several_inputs(ids=("feature_mask",))
def feature_permutation(f: Fn, x: Array, target: Any, *, key: Array, feature_mask: Any = None,
                        num_features: int | None = None, output: str = "logit",
                        chunk: int | None = None) -> Array:
  """Permutation importance per example: the drop of ``f(x)[t]`` when one feature takes the
  values of another example of the batch (Captum's ``FeaturePermutation``).

  For each feature, the batch is permuted by a random cyclic permutation (every example
  takes the feature's values from another one; Captum draws any permutation but the
  identity, so some examples may keep their own values and score 0 by chance). The score of
  a feature for example b is ``f(x)[b, t] - f(x with feature i from example pi(b))[b, t]``.

  Args:
    f, x, target, feature_mask, num_features, output, chunk: as in :func:`feature_ablation`
      (``x`` needs at least 2 examples).
    key: ``jax.random`` key; feature i's permutation comes from ``fold_in(key, i)``.

  Returns:
    Attributions shaped like ``x`` (each element carries its feature's value).

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x @ jnp.array([1.0, 0.0]), -x.sum(1)], 1)
  >>> feature_permutation(f, jnp.array([[1.0, 5.0], [3.0, 7.0]]), 0,
  ...                     key=jax.random.key(0)).tolist()
  [[-2.0, 0.0], [2.0, 0.0]]
  """
  x, t, _, fm, nf = _setup(f, x, target, 0.0, output, feature_mask, num_features, chunk)
  b = x.shape[0]
  if b < 2:
    raise ValueError(f"x: feature_permutation permutes values across the batch; it needs at "
                     f"least 2 examples, got {b}")
  if key is None:
    raise ValueError("key: feature_permutation needs an explicit jax.random key")
  src = _cycles(key, b, nf)
  ref = _output_value(_validate.model_outputs(f, x), t, output)

  def make(i):
    m = (fm == i).reshape(x.shape)
    return (jnp.where(m, x[src[i]], x), t), None

  outs = map_merged(make, lambda xs, ti: _output_value(f(xs), ti, output),
                    jnp.arange(nf, dtype=jnp.int32), chunk)       # (F, B)
  return _expand((ref[None] - outs).T, fm, x.shape)


# -- Shapley value sampling ----------------------------------------------------------------

@_validate.accepts_nnx
@_pack.several_inputs("baseline", ids=("feature_mask",))
def shapley_value_sampling(f: Fn, x: Array, target: Any, *, key: Array, n_samples: int = 25,
                           feature_mask: Any = None, num_features: int | None = None,
                           baseline: Any = 0.0, output: str = "logit",
                           chunk: int | None = None) -> Array:
  """Shapley values estimated from random feature orders (Castro et al. 2009).

  For each of ``n_samples`` uniformly random orders (independent per example), the features
  are inserted one by one into the baseline; feature ``i`` is credited with the change of
  ``f(.)[t]`` when it enters. ``n_samples * (F + 1)`` evaluations of ``f`` per example.

  Args:
    f, x, target, feature_mask, num_features, baseline, output: as in
      :func:`feature_ablation`.
    key: ``jax.random`` key; order ``p`` uses ``fold_in(key, p)``.
    n_samples: number of random orders.
    chunk: evaluations (order, step) per call of ``f``;
      ``None``: all at once up to 2^23 input elements per call of ``f``, as many as fit
      under that otherwise.

  Returns:
    Attributions shaped like ``x``; they sum to ``f(x)[t] - f(baseline)[t]`` over features.

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x @ jnp.array([1.0, 2.0]), x[:, 0] * x[:, 1]], 1)
  >>> a = shapley_value_sampling(f, jnp.ones((1, 2)), 0, key=jax.random.key(0), n_samples=4)
  >>> a.tolist()
  [[1.0, 2.0]]
  """
  if not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
    raise ValueError(f"n_samples: expected an int >= 1, got {n_samples!r}")
  x, t, base, fm, nf = _setup(f, x, target, baseline, output, feature_mask, num_features,
                              chunk)
  _validate.probe_probabilities(f, x)
  b = x.shape[0]
  ranks = jax.vmap(lambda p: _ranks(jax.random.fold_in(key, p), b, nf))(
      jnp.arange(n_samples))                                           # (P, B, F)

  def zfn(i):
    p, k = i // (nf + 1), i % (nf + 1)
    return ranks[p] < k

  s = _scores(f, x, t, base, fm, zfn, n_samples * (nf + 1), output, chunk)
  s = s.reshape(n_samples, nf + 1, b)
  d = jnp.swapaxes(s[:, 1:] - s[:, :-1], 1, 2)                         # (P, B, F) by step
  phi = jnp.mean(jnp.take_along_axis(d, ranks, axis=2), axis=0)        # credit of feature i
  return _expand(phi, fm, x.shape)


# -- KernelSHAP ------------------------------------------------------------------------------

def _kernel_size_probs(nf: int) -> np.ndarray:
  k = np.arange(1, nf)
  w = (nf - 1) / (k * (nf - k))
  return w / w.sum()


def _constrained_wls(z: Array, y: Array, w: Array, total: Array, reg: float) -> Array:
  """Per example: argmin_phi sum_s w_s (y_s - z_s . phi)^2  s.t.  sum(phi) = total.

  z (B, S, F), y (B, S), w (B, S) or (S,), total (B,) -> (B, F), via the KKT system.
  """
  nf = z.shape[-1]
  w = jnp.broadcast_to(w, y.shape)
  a = jnp.einsum("bsi,bs,bsj->bij", z, w, z)
  c = jnp.einsum("bsi,bs,bs->bi", z, w, y)
  scale = jnp.maximum(jnp.trace(a, axis1=1, axis2=2) / nf, 1e-12)
  a = a + reg * scale[:, None, None] * jnp.eye(nf, dtype=a.dtype)[None]
  ones = jnp.ones(a.shape[:2] + (1,), a.dtype)
  top = jnp.concatenate([a, ones], axis=2)
  bottom = jnp.concatenate([jnp.swapaxes(ones, 1, 2), jnp.zeros((a.shape[0], 1, 1), a.dtype)],
                           axis=2)
  kkt = jnp.concatenate([top, bottom], axis=1)
  rhs = jnp.concatenate([c, total[:, None]], axis=1)
  return jnp.linalg.solve(kkt, rhs[..., None])[..., :nf, 0]


@_validate.accepts_nnx
@_pack.several_inputs("baseline", ids=("feature_mask",))
def kernel_shap(f: Fn, x: Array, target: Any, *, key: Array | None = None,
                n_samples: int | None = 256, feature_mask: Any = None,
                num_features: int | None = None, baseline: Any = 0.0, output: str = "logit",
                reg: float = 1e-6, chunk: int | None = None) -> Array:
  """KernelSHAP (Lundberg & Lee 2017): Shapley values as a weighted linear regression.

  Coalitions are drawn per example from the Shapley kernel
  ``pi(z) = (F - 1) / (C(F, |z|) |z| (F - |z|))``: a size ``k`` in ``1 .. F - 1`` with
  probability proportional to ``(F - 1) / (k (F - k))``, then ``k`` uniformly random features.
  The least-squares fit of ``f(h(z))[t] - f(baseline)[t]`` on ``z`` then carries unit weights
  and the efficiency constraint ``sum(phi) = f(x)[t] - f(baseline)[t]`` is exact (KKT system,
  as ``shap.KernelExplainer``; Captum's ``KernelShap`` instead fits an intercept and puts a
  large weight on the empty and full coalitions). ``n_samples=None`` enumerates all
  ``2^F - 2`` proper coalitions with their kernel weights: the exact Shapley values.

  Args:
    f, x, target, feature_mask, num_features, baseline, output: as in
      :func:`feature_ablation`.
    key: ``jax.random`` key (sample ``i`` uses ``fold_in(key, i)``); unused when enumerating.
    n_samples: coalitions per example, or ``None`` to enumerate (``F <= 20``).
    reg: ridge term relative to the mean diagonal of ``Z^T W Z``, which keeps the solve finite
      when a feature was never sampled.
    chunk: coalitions per call of ``f``;
      ``None``: all at once up to 2^23 input elements per call of ``f``, as many as fit
      under that otherwise.

  Returns:
    Attributions shaped like ``x``, in at least float32 (the weighted
    least squares is solved in at least float32: bfloat16 / float16 models give float32).

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x @ jnp.array([1.0, 2.0, 3.0]), x.prod(1)], 1)
  >>> [round(v, 4) for v in kernel_shap(f, jnp.ones((1, 3)), 1, n_samples=None)[0].tolist()]
  [0.3333, 0.3333, 0.3333]
  """
  x, t, base, fm, nf = _setup(f, x, target, baseline, output, feature_mask, num_features,
                              chunk)
  if nf < 2:
    raise ValueError(f"feature_mask: KernelSHAP needs at least 2 features, got {nf}")
  b = x.shape[0]
  acc = _validate.accumulation_dtype(x.dtype)   # the solve needs >= float32
  v1 = _output_value(_validate.model_outputs(f, x), t, output)
  v0 = _output_value(f(base), t, output)
  if n_samples is None:
    if nf > 20:
      raise ValueError(f"n_samples: enumeration needs F <= 20 features, got F = {nf}; give an "
                       "int number of samples")
    codes = np.arange(1, 2 ** nf - 1)
    zs = ((codes[:, None] >> np.arange(nf)[None]) & 1).astype(bool)     # (S, F)
    k = zs.sum(1)
    wts = (nf - 1) / (np.array([math.comb(nf, int(v)) for v in k]) * k * (nf - k))
    zs_j = jnp.asarray(zs)
    zfn = lambda i: jnp.broadcast_to(zs_j[i], (b, nf))
    s = _scores(f, x, t, base, fm, zfn, zs.shape[0], output, chunk)     # (S, B)
    z = jnp.broadcast_to(zs_j[None], (b,) + zs.shape).astype(acc)
    w = jnp.asarray(wts / wts.sum(), acc)
  else:
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
      raise ValueError(f"n_samples: expected None or an int >= 1, got {n_samples!r}")
    if key is None:
      raise ValueError("key: required when n_samples is an int")
    logp = jnp.log(jnp.asarray(_kernel_size_probs(nf), jnp.float32))

    def zfn(i):
      ki = jax.random.fold_in(key, i)
      ks, ku = jax.random.split(ki)
      size = jax.random.categorical(ks, logp, shape=(b,)).astype(jnp.int32) + 1  # x64: int64
      return _ranks(ku, b, nf) < size[:, None]

    n = int(n_samples)
    s = _scores(f, x, t, base, fm, zfn, n, output, chunk)
    z = jnp.swapaxes(jax.vmap(zfn)(jnp.arange(n, dtype=jnp.int32)), 0, 1).astype(acc)
    w = jnp.ones((n,), acc)
  phi = _constrained_wls(z, (s - v0[None]).T.astype(acc), w, (v1 - v0).astype(acc), reg)
  return _expand(phi, fm, x.shape)


# -- LIME ------------------------------------------------------------------------------------

def weighted_ridge(z: Array, y: Array, weights: Array, alpha: float) -> tuple[Array, Array]:
  """Closed-form weighted ridge with an unpenalised intercept, batched over the first axis.

  ``argmin_{beta, b0} sum_s w_s (y_s - b0 - z_s . beta)^2 + alpha |beta|^2``.

  Args:
    z: ``(B, S, F)`` regressors; y: ``(B, S)``; weights: ``(B, S)``; alpha: ``>= 0``.

  Returns:
    ``(beta (B, F), intercept (B,))``.

  >>> import jax.numpy as jnp
  >>> z = jnp.array([[[0.0], [1.0], [2.0]]])
  >>> beta, b0 = weighted_ridge(z, 1.0 + 2.0 * z[..., 0], jnp.ones((1, 3)), 0.0)
  >>> [round(v, 4) for v in (beta[0, 0].item(), b0[0].item())]
  [2.0, 1.0]
  """
  nf = z.shape[-1]
  z1 = jnp.concatenate([z, jnp.ones(z.shape[:2] + (1,), z.dtype)], axis=2)
  a = jnp.einsum("bsi,bs,bsj->bij", z1, weights, z1)
  pen = jnp.concatenate([jnp.ones((nf,), z.dtype), jnp.zeros((1,), z.dtype)])
  a = a + alpha * jnp.diag(pen)[None]
  c = jnp.einsum("bsi,bs,bs->bi", z1, weights, y)
  theta = jnp.linalg.solve(a, c[..., None])[..., 0]
  return theta[:, :nf], theta[:, nf]


@_validate.accepts_nnx
@_pack.several_inputs("baseline", ids=("feature_mask",))
def lime(f: Fn, x: Array, target: Any, *, key: Array, n_samples: int = 256,
         feature_mask: Any = None, num_features: int | None = None, baseline: Any = 0.0,
         output: str = "logit", kernel_width: float = 0.25, alpha: float = 1.0,
         chunk: int | None = None, return_fit: bool = False) -> Any:
  """LIME (Ribeiro et al. 2016) with a weighted ridge surrogate solved in closed form.

  Coalitions ``z_s ~ Bernoulli(1/2)`` per feature (per example), similarity weights
  ``pi_s = exp(-d_s^2 / kernel_width^2)`` with ``d_s = 1 - |z_s| / sqrt(|z_s| F)`` the cosine
  distance of ``z_s`` to the all-ones coalition (``lime_image``'s kernel; ``d = 1`` for the
  empty coalition), and the surrogate ``f(h(z))[t] ~ b0 + z . beta`` fitted by
  :func:`weighted_ridge` (``alpha`` as ``sklearn.linear_model.Ridge``, LIME's default 1).

  Args:
    f, x, target, feature_mask, num_features, baseline, output: as in
      :func:`feature_ablation`.
    key: ``jax.random`` key (sample ``i`` uses ``fold_in(key, i)``).
    n_samples: coalitions per example.
    kernel_width: width of the exponential similarity kernel.
    alpha: ridge penalty on the coefficients (not on the intercept).
    chunk: coalitions per call of ``f``;
      ``None``: all at once up to 2^23 input elements per call of ``f``, as many as fit
      under that otherwise.
    return_fit: also return the fit's inputs.

  Returns:
    Attributions (the coefficients ``beta``) shaped like ``x``, in
    at least float32 (the ridge is solved in at least float32); with
    ``return_fit`` a dict
    ``{"attributions", "intercept" (B,), "samples" (B, S, F) bool, "scores" (B, S),
    "weights" (B, S)}``.

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x @ jnp.array([1.0, -1.0]), x.sum(1)], 1)
  >>> lime(f, jnp.ones((2, 2)), 0, key=jax.random.key(0), n_samples=64).shape
  (2, 2)
  """
  if not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
    raise ValueError(f"n_samples: expected an int >= 1, got {n_samples!r}")
  if not kernel_width > 0:
    raise ValueError(f"kernel_width: expected > 0, got {kernel_width!r}")
  if not alpha >= 0:
    raise ValueError(f"alpha: expected >= 0, got {alpha!r}")
  x, t, base, fm, nf = _setup(f, x, target, baseline, output, feature_mask, num_features,
                              chunk)
  _validate.probe_probabilities(f, x)
  b, n = x.shape[0], int(n_samples)
  zfn = lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), 0.5, (b, nf))
  acc = _validate.accumulation_dtype(x.dtype)   # the solve needs >= float32
  s = _scores(f, x, t, base, fm, zfn, n, output, chunk).T.astype(acc)     # (B, S)
  z = jnp.swapaxes(jax.vmap(zfn)(jnp.arange(n, dtype=jnp.int32)), 0, 1)   # (B, S, F)
  k = jnp.sum(z, axis=-1).astype(acc)
  cos = k / jnp.sqrt(jnp.maximum(k, 1.0) * nf)
  w = jnp.exp(-((1.0 - cos) ** 2) / kernel_width ** 2)
  beta, b0 = weighted_ridge(z.astype(acc), s, w, alpha)
  attr = _expand(beta, fm, x.shape)
  if return_fit:
    return {"attributions": attr, "intercept": b0, "samples": z, "scores": s, "weights": w}
  return attr


# -- RISE ------------------------------------------------------------------------------------

@_validate.accepts_nnx
@_pack.several_inputs("baseline", ids=("feature_mask",))
def rise(f: Fn, x: Array, target: Any, *, key: Array, n_masks: int = 1000, p: float = 0.5,
         grid: int = 7, feature_mask: Any = None, num_features: int | None = None,
         baseline: Any = 0.0, output: str = "softmax", chunk: int | None = None) -> Array:
  """RISE (Petsiuk et al. 2018): the output-weighted average of random keep-masks.

  ``S_i = sum_n f(x_n)[t] m_n,i / (N p)`` with ``x_n = baseline + m_n (x - baseline)``
  (eq. 6, baseline 0 in the paper). With a ``feature_mask``, or for inputs that are not
  ``(B, H, W, C)`` images, ``m_n`` keeps each feature with probability ``p``. For images
  without a ``feature_mask`` the masks are the paper's: a ``grid x grid`` Bernoulli(p) grid,
  bilinearly upsampled to ``(grid + 1) * cell`` with ``cell = ceil(H / grid)`` (and W), and
  cropped at a random shift in ``[0, cell)``; shared by the channels.

  Args:
    f, x, target, num_features, baseline: as in :func:`feature_ablation`.
    key: ``jax.random`` key; mask ``n`` uses ``fold_in(key, n)`` (independent per example).
    n_masks: number of masks ``N``.
    p: keep probability in ``(0, 1]``.
    grid: grid size of the smooth image masks.
    feature_mask: as in :func:`feature_ablation` (binary masks over these features).
    output: the score, default ``"softmax"`` (the paper's class probability).
    chunk: masks per call of ``f``;
      ``None``: all at once up to 2^23 input elements per call of ``f``, as many as fit
      under that otherwise.

  Returns:
    Saliency shaped like ``x``.

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], 1)
  >>> rise(f, jnp.ones((1, 8, 8, 3)), 0, key=jax.random.key(0), n_masks=8, grid=2,
  ...      output="logit").shape
  (1, 8, 8, 3)
  """
  if not isinstance(n_masks, (int, np.integer)) or n_masks < 1:
    raise ValueError(f"n_masks: expected an int >= 1, got {n_masks!r}")
  if not 0.0 < p <= 1.0:
    raise ValueError(f"p: expected a keep probability in (0, 1], got {p!r}")
  smooth = feature_mask is None and jnp.ndim(x) == 4
  x, t, base, fm, nf = _setup(f, x, target, baseline, output,
                              None if smooth else feature_mask, num_features, chunk)
  _validate.probe_probabilities(f, x)
  b = x.shape[0]
  n = int(n_masks)
  if not smooth:
    zfn = lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), p, (b, nf))
    s = _scores(f, x, t, base, fm, zfn, n, output, chunk)                  # (N, B)

    def acc(i):
      return zfn(i).astype(x.dtype) * s[i][:, None]
    total = jnp.sum(jax.lax.map(acc, jnp.arange(n), batch_size=chunk), axis=0)
    return _expand(total / (n * p), fm, x.shape)

  if not isinstance(grid, (int, np.integer)) or grid < 1:
    raise ValueError(f"grid: expected an int >= 1, got {grid!r}")
  h, w, c = x.shape[1:]
  ch, cw = -(-h // grid), -(-w // grid)
  up = ((grid + 1) * ch, (grid + 1) * cw)

  def mask(i):
    kg, ks = jax.random.split(jax.random.fold_in(key, i))
    cells = jax.random.bernoulli(kg, p, (b, grid, grid)).astype(x.dtype)
    big = jax.image.resize(cells, (b,) + up, method="bilinear")
    dy = jax.random.randint(ks, (b,), 0, ch)
    dx = jax.random.randint(jax.random.fold_in(ks, 1), (b,), 0, cw)
    crop = lambda m, u, v: jax.lax.dynamic_slice(m, (u, v), (h, w))
    return jax.vmap(crop)(big, dy, dx)                                      # (B, H, W)

  def make(i):
    m = mask(i)
    return (base + m[..., None] * (x - base), t), m

  parts = map_merged(make, lambda xs, ti: _output_value(f(xs), ti, output),
                     jnp.arange(n, dtype=jnp.int32), chunk,
                     lambda out, m: out[..., None, None] * m)                # (N, B, H, W)
  sal = jnp.sum(parts, axis=0) / (n * p)
  return jnp.broadcast_to(sal[..., None], x.shape)
