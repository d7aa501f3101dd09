"""Attributions averaged over random or background inputs.

- :func:`noise_tunnel`: any attribution method averaged over noisy copies of the input
  (SmoothGrad's recipe for every method: Captum's ``NoiseTunnel``, PAIR saliency's
  ``GetSmoothedMask``), in the mean, squared or VarGrad form.
- :func:`gradient_shap`: expected gradients (Erion et al. 2021; SHAP's
  ``GradientExplainer``, Captum's ``GradientShap``): Integrated Gradients with the baseline
  drawn from a background set and the path point drawn uniformly, so the attributions sum to
  ``f(x)[t] - E_b f(b)[t]`` in expectation.
- :func:`deeplift_shap`: DeepLIFT averaged over every reference of a background set
  (Captum's ``DeepLiftShap``, SHAP's ``DeepExplainer``); sums to ``f(x)[t] - mean_b f(b)[t]``.

All take an explicit ``jax.random`` key where they draw, run the samples as vectorised
batches of ``chunk`` and are jittable. The batches are unrolled in the traced program, not
run by a ``lax.map`` (2.4x slower on XLA:CPU, see ``jaxplain._batching.unrolled``), so
compile time grows with ``num_samples / chunk``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxplain import _pack
from jaxplain import _validate
from jaxplain._batching import unrolled
from jaxplain.gradients import (SMOOTHGRAD_FORMS, _check_output, _grad_rows, _is_multi,
                                _relative_noise)

Array = jax.Array
Fn = Callable[[Array], Array]


def _check_samples(num_samples: Any, chunk: Any) -> None:
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
  _validate.check_chunk(chunk)


def _background(background: Any, x: Array) -> Array:
  bg = jnp.asarray(background)
  if bg.ndim != x.ndim or bg.shape[1:] != x.shape[1:] or bg.shape[0] < 1:
    raise ValueError(f"background: expected (M, {', '.join(map(str, x.shape[1:]))}) inputs "
                     f"like x's examples, M >= 1; got shape {bg.shape}")
  if not jnp.issubdtype(bg.dtype, jnp.floating):
    raise TypeError(f"background: expected a floating dtype, got {bg.dtype}")
  _validate.check_finite(bg, "background")
  return bg.astype(x.dtype)


def noise_tunnel(method: Callable[..., Array], f: Fn, x: Array, target: Any, *, key: Array,
                 num_samples: int = 32, noise_level: float = 0.15, form: str = "mean",
                 chunk: int | None = 8, **method_kwargs: Any) -> Array:
  """``method`` averaged over noisy copies of ``x`` (SmoothGrad for any method).

  For n = 1..N, ``a_n = method(f, x + e_n, target, **method_kwargs)`` with
  ``e_n ~ N(0, sigma^2)``, ``sigma = noise_level * (max(x_b) - min(x_b))`` per example (the
  draws of :func:`jaxplain.smoothgrad` with the same key, so
  ``noise_tunnel(jaxplain.gradient, ...)`` is SmoothGrad). Then ``form="mean"``:
  ``mean_n a_n``; ``"squared"``: ``mean_n a_n ** 2``; ``"vargrad"``: ``var_n a_n``.

  Args:
    method: an attribution function called as ``method(f, x, target, **method_kwargs)``
      (``jaxplain.integrated_gradients``, ``jaxplain.lrp``, ``jaxplain.gradient_x_input``,
      ``jaxplain.guided_backprop``, ... or your own) returning maps (B, ...) or (B, T, ...).
      It runs traced (vmapped over the noisy copies of a chunk), so ``method="exact"`` IG
      and host-driven loops do not fit here.
    f: pure batched model, (B, ...) -> logits (B, K); or an NNX module.
    x: inputs (B, ...) floating; or a tuple or dict of such batches (several inputs: the
      noise is drawn on them packed, ``method`` runs on the packed model; a ``baseline`` /
      ``reference`` in ``method_kwargs`` is then given like ``x``, other array keywords are
      not packed).
    target: as ``method`` takes it.
    key: ``jax.random`` key.
    num_samples: N.
    noise_level: sigma relative to each example's value range.
    form: ``"mean"``, ``"squared"`` or ``"vargrad"``.
    chunk: noisy copies per vectorised call of ``method`` (``None``: all at once).
    **method_kwargs: passed to ``method`` (e.g. ``steps=16``, ``composite="epsilon_plus"``).

  Returns:
    Maps shaped like ``method``'s.

  >>> import jax, jax.numpy as jnp, jaxplain
  >>> f = lambda x: jnp.stack([jnp.tanh(x).sum(1), x.sum(1)], axis=1)
  >>> noise_tunnel(jaxplain.integrated_gradients, f, jnp.ones((2, 3)), 0,
  ...              key=jax.random.key(0), num_samples=4, steps=8).shape
  (2, 3)
  """
  if not callable(method):
    raise TypeError(f"method: expected an attribution function such as "
                    f"jaxplain.integrated_gradients, got {type(method).__name__}")
  if _pack.is_several(x):  # the method runs on the packed x: its x-like keywords are packed
    p = _pack.packing(x)
    method_kwargs = {k: (p.pack(v, k) if k in _pack.X_LIKE_KWARGS and _pack.is_several(v)
                         else v) for k, v in method_kwargs.items()}
  return _noise_tunnel(f, x, target, method=method, key=key, num_samples=num_samples,
                       noise_level=noise_level, form=form, chunk=chunk,
                       method_kwargs=method_kwargs)


@_validate.accepts_nnx
@_pack.several_inputs()
def _noise_tunnel(f: Fn, x: Array, target: Any, *, method: Callable[..., Array], key: Array,
                  num_samples: int, noise_level: float, form: str, chunk: int | None,
                  method_kwargs: dict) -> Array:
  """noise_tunnel with ``f`` first, so that the shared decorators see the model and x."""
  if form not in SMOOTHGRAD_FORMS:
    raise ValueError(f"form: expected one of {SMOOTHGRAD_FORMS}, got {form!r}")
  _check_samples(num_samples, chunk)
  if not noise_level >= 0:
    raise ValueError(f"noise_level: expected >= 0, got {noise_level}")
  x = _validate.check_batched(x, "x")
  _validate.check_model(f, x)
  noise = _relative_noise(key, num_samples, x, noise_level)
  maps = unrolled(jax.vmap(lambda e: method(f, x + e, target, **method_kwargs)), noise, chunk)
  if form == "mean":
    return jnp.mean(maps, axis=0)
  if form == "squared":
    return jnp.mean(maps * maps, axis=0)
  return jnp.var(maps, axis=0)


@_validate.accepts_nnx
@_pack.several_inputs("background")
def gradient_shap(f: Fn, x: Array, target: Any, *, background: Array, key: Array,
                  num_samples: int = 32, stdev: float = 0.0, output: str = "logit",
                  chunk: int | None = 8) -> Array:
  """Expected gradients / GradientSHAP: IG with a random baseline and a random path point.

  For n = 1..N and each example, a baseline ``b`` drawn uniformly from ``background``, a
  point ``alpha ~ U(0, 1)`` and (with ``stdev > 0``) a noisy input ``x' = x + N(0, stdev^2)``
  (Captum's ``stdevs``, absolute): ``a_n = (x' - b) * grad f(b + alpha (x' - b))[t]``;
  the result is ``mean_n a_n``. Its sum over the input estimates
  ``f(x)[t] - E_b f(b)[t]`` (exact in expectation with ``stdev=0``; the Monte Carlo error
  shrinks as 1 / sqrt(N)).

  Args:
    f: pure batched model, (B, ...) -> logits (B, K); or an NNX module.
    x: inputs (B, ...) floating; or a tuple or dict of such batches (several inputs;
      ``background`` then in the same structure, (M, ...) per input).
    target: an int or a (B,) int array.
    background: (M, ...) reference inputs (a sample of the training data), M >= 1.
    key: ``jax.random`` key (baselines, points and noise are drawn from it).
    num_samples: N draws per example.
    stdev: standard deviation of the input noise (0: none).
    output: as in :func:`jaxplain.gradient`.
    chunk: draws per model call (``chunk * B`` rows); ``None``: all at once.

  Returns:
    Attributions shaped like ``x``.

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum(1), -x.sum(1)], axis=1)   # linear: exact for any N
  >>> gradient_shap(f, jnp.ones((1, 2)), 0, background=jnp.zeros((4, 2)),
  ...               key=jax.random.key(0), num_samples=3).tolist()
  [[1.0, 1.0]]
  """
  _check_output(output)
  _check_samples(num_samples, chunk)
  if _is_multi(target):
    raise ValueError("target: gradient_shap takes one target per example (an int or a (B,) "
                     "array); call once per target")
  if not stdev >= 0:
    raise ValueError(f"stdev: expected >= 0, got {stdev}")
  if key is None:
    raise ValueError("key: gradient_shap needs an explicit jax.random key")
  x = _validate.check_batched(x, "x")
  k = _validate.check_model(f, x).shape[1]
  bg = _background(background, x)
  b = x.shape[0]
  t = _validate.check_target(target, b, k, "target")
  k_idx, k_alpha, k_noise = jax.random.split(key, 3)
  idx = jax.random.randint(k_idx, (num_samples, b), 0, bg.shape[0])
  alpha = jax.random.uniform(k_alpha, (num_samples, b), x.dtype)
  noise = jax.random.normal(k_noise, (num_samples,) + x.shape, x.dtype) * stdev
  ones = (1,) * (x.ndim - 1)

  def rows(draws):  # the n draws of a chunk as one batch of n * B rows
    i, a, e = draws
    n = i.shape[0]
    xn = x[None] + e
    diff = xn - bg[i]
    pts = (bg[i] + a.reshape((n, b) + ones) * diff).reshape((n * b,) + x.shape[1:])
    _, g = _grad_rows(f, pts, jnp.tile(t, n), output)
    return g.reshape(diff.shape) * diff

  acc = _validate.accumulation_dtype(x.dtype)
  maps = unrolled(rows, (idx, alpha, noise), chunk)
  return jnp.mean(maps.astype(acc), axis=0).astype(x.dtype)


@_validate.accepts_nnx
@_pack.several_inputs("background")
def deeplift_shap(f: Fn, x: Array, target: Any, *, background: Array,
                  output: str = "logit", chunk: int | None = 8) -> Array:
  """DeepLIFT averaged over every reference in ``background`` (Captum's ``DeepLiftShap``).

  ``mean_j deeplift(f, x, target, reference=background[j])``; each term sums to
  ``f(x)[t] - f(background[j])[t]``, so the result sums to ``f(x)[t] - mean_j
  f(background[j])[t]`` (the rescale rule's summation to delta).

  Args:
    f: pure batched model, (B, ...) -> logits (B, K); or an NNX module.
    x: inputs (B, ...) floating; or a tuple or dict of such batches (several inputs).
    target: as in :func:`jaxplain.deeplift`.
    background: (M, ...) references, M >= 1.
    output: as in :func:`jaxplain.deeplift`.
    chunk: references per vectorised step; ``None``: all at once.

  Returns:
    Attributions shaped like ``x`` ((B, T, ...) for several targets).

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([jnp.maximum(x, 0).sum(1), x.sum(1)], axis=1)
  >>> deeplift_shap(f, jnp.ones((1, 2)), 0, background=jnp.array([[0., 0.], [-1., 3.]])).tolist()
  [[1.0, -0.5]]
  """
  from jaxplain.rules import deeplift  # pylint: disable=import-outside-toplevel
  _validate.check_chunk(chunk)
  x = _validate.check_batched(x, "x")
  _validate.check_model(f, x)
  bg = _background(background, x)
  maps = unrolled(jax.vmap(lambda r: deeplift(f, x, target, reference=r[None], output=output)),
                  bg, chunk)
  acc = _validate.accumulation_dtype(x.dtype)
  return jnp.mean(maps.astype(acc), axis=0).astype(maps.dtype)
