"""Gradient saliency: the plain gradient, gradient x input and the SmoothGrad family.

Every function takes a pure, batched ``f(x) -> logits`` ((B, ...) -> (B, K)), a batch ``x``
and a target that is an int or a (B,) int array (one class per example), and returns an
array shaped like ``x``; ``target="all"`` (every class) or a (B, T) int array returns
(B, T, ...) maps from one forward pass, the T output cotangents vmapped through one
linearisation (``target_chunk`` of them at a time). Nothing here calls ``jax.jit``: jit and
vmap the functions yourself.

The per-example gradients come from ONE reverse pass over the batch: with ``y = f(x)`` and
the cotangent ``v[b] = d out_b / d y_b`` (a one-hot row for the logit form), ``vjp(v)`` gives
``d out_b / d x_b`` for every ``b`` at once, because examples do not interact in ``f``.

References: Simonyan et al. 2014 (gradient saliency, eq. 2); Shrikumar et al. 2016
(gradient x input); Smilkov et al. 2017 (SmoothGrad, eq. 3 and the squared form);
Adebayo et al. 2018 (VarGrad). See SPEC.md section 1.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _pack
from jaxplain import _validate
from jaxplain._batching import unrolled

Array = jax.Array
Fn = Callable[[Array], Array]

OUTPUTS = ("logit", "log_softmax", "softmax", "cross_entropy")


def _check_output(output: str) -> None:
  if output not in OUTPUTS:
    raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")


def _cotangent(logits: Array, target: Array, output: str) -> Array:
  """d out_b / d logits_b for the chosen output, shape (B, K).

  logit: out = y[t]; log_softmax: out = log p[t]; softmax: out = p[t];
  cross_entropy: out = -log p[t], the categorical cross-entropy against a one-hot target
  (seed 000's saliency differentiates this loss).
  """
  onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
  if output == "logit":
    return onehot
  p = jax.nn.softmax(logits, axis=-1)
  if output == "log_softmax":
    return onehot - p
  if output == "cross_entropy":
    return p - onehot
  if output == "softmax":
    pt = jnp.sum(p * onehot, axis=-1, keepdims=True)
    return pt * (onehot - p)
  raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")


def _output_value(logits: Array, target: Array, output: str) -> Array:
  """The scalar per example that the gradient is taken of, shape (B,)."""
  if output == "logit":
    return _validate.select_target(logits, target)
  logp = jax.nn.log_softmax(logits, axis=-1)
  if output == "log_softmax":
    return _validate.select_target(logp, target)
  if output == "cross_entropy":
    return -_validate.select_target(logp, target)
  return jnp.exp(_validate.select_target(logp, target))


def _grad_rows(f: Fn, x: Array, target: Array, output: str,
               num_classes: int | None = None, name: str = "target",
               weights: Array | None = None) -> tuple[Array, Array]:
  """Per-row gradients of the chosen output: returns (logits (N, K), grads like x).

  ``target`` is normalised with the model's number of classes (range errors when concrete).
  ``weights`` (N,) scales each row's cotangent (used by Integrated Gradients).
  """
  from jaxplain import _fastconv  # pylint: disable=import-outside-toplevel
  fast = _fastconv.with_fast_convs(f)  # CPU: small-channel convolutions rewritten
  logits, vjp = _validate.call_model(lambda: jax.vjp(fast, x), f, x)
  _validate.check_logits(logits, x.shape[0], f=f, x=x)
  t = _validate.check_target(target, x.shape[0], logits.shape[-1], name)
  ct = _cotangent(logits, t, output)
  if weights is not None:
    ct = ct * weights[:, None].astype(ct.dtype)
  (g,) = vjp(ct)
  return logits, _validate.select_valid(g, t, logits.shape[-1])  # NaN for a traced bad target


def _is_multi(target: Any) -> bool:
  """True for ``target="all"`` or a (B, T) array: one map per (example, target)."""
  if isinstance(target, str):
    if target != "all":
      raise ValueError(f"target: expected an int, a (B,) or (B, T) int array or 'all', "
                       f"got {target!r}")
    return True
  return jnp.ndim(target) == 2


def _check_target_chunk(target_chunk: Any) -> None:
  _validate.check_chunk(target_chunk, "target_chunk")


def _multi_targets(target: Any, batch: int, num_classes: int | None,
                   name: str = "target") -> Array:
  """Normalise ``"all"`` (every class 0..K-1) or a (B, T) int array to (B, T) int32."""
  if isinstance(target, str):
    if num_classes is None:
      raise ValueError(f"{name}: 'all' needs the number of classes K")
    return jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (batch, num_classes))
  t = jnp.asarray(target)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise TypeError(f"{name}: expected an int, a (B,) or (B, T) integer array or 'all', "
                    f"got dtype {t.dtype}")
  if t.ndim != 2 or t.shape[0] != batch or t.shape[1] < 1:
    raise ValueError(f"{name}: a per-example list of targets must have shape ({batch}, T), "
                     f"got shape {t.shape}")
  if num_classes is not None and _validate.is_concrete(t):
    tn = np.asarray(t)
    if tn.min() < 0 or tn.max() >= num_classes:
      raise ValueError(f"{name}: class index out of range [0, {num_classes}): "
                       f"got values in [{tn.min()}, {tn.max()}]")
  return t.astype(jnp.int32)


def _num_classes(f: Fn, x: Array) -> int:
  """K of ``f`` from its output shape (a trace, no computation)."""
  out = jax.eval_shape(f, x)
  _validate.check_logits(out, x.shape[0])
  return out.shape[-1]


def _grad_rows_multi(f: Fn, x: Array, target: Any, output: str,
                     target_chunk: int | None = None) -> tuple[Array, Array]:
  """Gradients of T outputs per row from ONE forward pass: (logits (N, K), grads (N, T, ...)).

  ``target`` is ``"all"`` or an (N, T) int array. The T output cotangents go through the
  shared linearisation with ``vmap`` (``target_chunk`` of them at a time).
  """
  from jaxplain import _fastconv  # pylint: disable=import-outside-toplevel
  logits, vjp = jax.vjp(_fastconv.with_fast_convs(f), x)
  _validate.check_logits(logits, x.shape[0])
  t = _multi_targets(target, x.shape[0], logits.shape[-1])
  cts = jax.vmap(lambda tc: _cotangent(logits, tc, output), in_axes=1)(t)  # (T, N, K)
  g = unrolled(lambda c: jax.vmap(vjp)(c)[0], cts, target_chunk)
  return logits, jnp.moveaxis(g, 0, 1)


@_validate.accepts_nnx
@_pack.several_inputs()
def gradient(f: Fn, x: Array, target: Any, *, output: str = "logit",
             target_chunk: int | None = None) -> Array:
  """Gradient saliency d out[t] / dx for a batch (Simonyan et al. 2014, eq. 2).

  Args:
    f: pure batched model, (B, ...) -> logits (B, K).
    x: inputs, (B, ...) floating; or a tuple or dict of such batches (a model
      with several inputs: the maps come back in that structure, each shaped like its input).
    target: an int or a (B,) int array of classes in [0, K); or ``"all"`` (every class
      0..K-1, T = K) or a (B, T) int array (T targets per example), which return one map
      per target, (B, T, ...), from one shared forward pass (the T output cotangents are
      vmapped through one linearisation, not T calls).
    output: what is differentiated: ``"logit"`` (y[t], default), ``"log_softmax"``
      (log p[t]), ``"softmax"`` (p[t]) or ``"cross_entropy"`` (-log p[t], the seed-000 form:
      categorical cross-entropy against a one-hot target; its sign is that of the loss).
    target_chunk: with several targets, how many backward passes are vmapped at once
      (``None``: all T); bounds memory to ``target_chunk`` maps in flight.

  Returns:
    Gradients shaped like ``x``, (B, ...); (B, T, ...) for several targets.

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum(1), (x ** 2).sum(1)], axis=1)
  >>> gradient(f, jnp.array([[1., 2.]]), 1)
  Array([[2., 4.]], dtype=float32)
  >>> gradient(f, jnp.array([[1., 2.]]), "all").shape  # (B, T = K, 2)
  (1, 2, 2)
  """
  _check_output(output)
  _check_target_chunk(target_chunk)
  x = _validate.check_batched(x, "x")
  if _is_multi(target):
    return _grad_rows_multi(f, x, target, output, target_chunk)[1]
  _, g = _grad_rows(f, x, target, output)
  return g


@_validate.accepts_nnx
@_pack.several_inputs()
def gradient_x_input(f: Fn, x: Array, target: Any, *, output: str = "logit",
                     target_chunk: int | None = None) -> Array:
  """Gradient times input, ``x * d out[t] / dx`` (Shrikumar et al. 2016).

  Args:
    f: pure batched model, (B, ...) -> logits (B, K).
    x: inputs, (B, ...) floating; or a tuple or dict of such batches (a model
      with several inputs: the maps come back in that structure, each shaped like its input).
    target: an int or a (B,) int array; ``"all"`` or a (B, T) int array for one map per
      target (see :func:`gradient`).
    output: as in :func:`gradient`.
    target_chunk: as in :func:`gradient`.

  Returns:
    Attributions shaped like ``x``; (B, T, ...) for several targets.

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum(1), (x ** 2).sum(1)], axis=1)
  >>> gradient_x_input(f, jnp.array([[1., 2.]]), 1)
  Array([[2., 8.]], dtype=float32)
  """
  _check_output(output)
  _check_target_chunk(target_chunk)
  x = _validate.check_batched(x, "x")
  if _is_multi(target):
    return _grad_rows_multi(f, x, target, output, target_chunk)[1] * x[:, None]
  _, g = _grad_rows(f, x, target, output)
  return g * x


SMOOTHGRAD_FORMS = ("mean", "squared", "vargrad")


def _relative_noise(key: Array, n: int, x: Array, noise_level: float) -> Array:
  """(n, B, ...) draws ``N(0, sigma^2)``, ``sigma = noise_level * (max(x_b) - min(x_b))``
  per example (SmoothGrad's noise, shared by :func:`jaxplain.noise_tunnel`)."""
  red = tuple(range(1, x.ndim))
  span = jnp.max(x, axis=red, keepdims=True) - jnp.min(x, axis=red, keepdims=True)
  return jax.random.normal(key, (n,) + x.shape, x.dtype) * (noise_level * span)[None]


@_validate.accepts_nnx
@_pack.several_inputs()
def smoothgrad(f: Fn, x: Array, target: Any, *, key: Array, num_samples: int = 32,
               noise_level: float = 0.15, form: str = "mean",
               multiply_by_input: bool = False, output: str = "logit",
               chunk: int | None = 8, target_chunk: int | None = None) -> Array:
  """SmoothGrad and its squared and VarGrad forms (Smilkov et al. 2017, eq. 3).

  For n = 1..N, ``g_n = grad out[t](x + e_n)`` with ``e_n ~ N(0, sigma^2)`` and
  ``sigma = noise_level * (max(x_b) - min(x_b))``, the range taken per example (the paper's
  "noise level relative to the input range"; over all its inputs together when ``x`` is a
  tuple of several). Then

  - ``form="mean"``: ``mean_n g_n`` (SmoothGrad);
  - ``form="squared"``: ``mean_n g_n ** 2`` (SmoothGrad^2, Hooker et al. 2019);
  - ``form="vargrad"``: ``var_n g_n`` (population variance; Adebayo et al. 2018).

  With ``multiply_by_input=True`` each ``g_n`` is first multiplied by its noisy input
  ``x + e_n`` (Captum's ``NoiseTunnel(InputXGradient)``).

  Args:
    f: pure batched model, (B, ...) -> logits (B, K).
    x: inputs, (B, ...) floating; or a tuple or dict of such batches (a model
      with several inputs: the maps come back in that structure, each shaped like its input).
    target: an int or a (B,) int array; ``"all"`` or a (B, T) int array for one map per
      target, (B, T, ...) (see :func:`gradient`); the noisy samples are shared by the targets.
    key: a ``jax.random`` key; the same key gives the same result.
    num_samples: N, the number of noisy copies per example.
    noise_level: sigma relative to each example's value range (Smilkov et al. use 0.1-0.2).
    form: ``"mean"``, ``"squared"`` or ``"vargrad"``.
    multiply_by_input: multiply each sample's gradient by its noisy input.
    output: as in :func:`gradient`.
    chunk: noisy copies per model call (``chunk * B`` rows per forward/backward pass);
      ``None`` evaluates all ``N * B`` rows in one call (fastest on accelerators, most
      memory). The calls are unrolled in the traced program. Results do not depend on it
      beyond float rounding.
    target_chunk: as in :func:`gradient`.

  Returns:
    Attributions shaped like ``x``; (B, T, ...) for several targets.

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum(1), (x ** 2).sum(1)], axis=1)
  >>> smoothgrad(f, jnp.ones((2, 3)), 0, key=jax.random.key(0), num_samples=4).shape
  (2, 3)
  """
  _check_output(output)
  if form not in SMOOTHGRAD_FORMS:
    raise ValueError(f"form: expected one of {SMOOTHGRAD_FORMS}, got {form!r}")
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
  _validate.check_chunk(chunk)
  if noise_level < 0:
    raise ValueError(f"noise_level: expected >= 0, got {noise_level}")
  if key is None:
    raise ValueError("key: smoothgrad needs an explicit jax.random key")
  x = _validate.check_batched(x, "x")
  _validate.check_model(f, x)
  b = x.shape[0]
  noise = _relative_noise(key, num_samples, x, noise_level)
  _check_target_chunk(target_chunk)
  multi = _is_multi(target)
  if multi:
    t = _multi_targets(target, b, _num_classes(f, x) if isinstance(target, str) else None)
    out_shape = (b, t.shape[1]) + x.shape[1:]
  else:
    t = _validate.check_target(target, b, None, "target")
    out_shape = x.shape
  step = num_samples if chunk is None else min(chunk, num_samples)
  count = 0
  mean = jnp.zeros(out_shape, x.dtype)
  m2 = jnp.zeros(out_shape, x.dtype)  # sum of g**2 ("squared") or of squared deviations
  for s in range(0, num_samples, step):
    n = min(step, num_samples - s)
    xs = (x[None] + noise[s:s + n]).reshape((n * b,) + x.shape[1:])
    if multi:
      _, g = _grad_rows_multi(f, xs, jnp.tile(t, (n, 1)), output, target_chunk)
      if multiply_by_input:
        g = g * xs[:, None]
    else:
      _, g = _grad_rows(f, xs, jnp.tile(t, n), output)
      if multiply_by_input:
        g = g * xs
    g = g.reshape((n,) + out_shape)
    g_mean = jnp.mean(g, axis=0)
    if form == "squared":
      m2 = m2 + jnp.sum(g * g, axis=0)
    elif form == "vargrad":  # Chan et al.'s pairwise update: no E[g^2] - E[g]^2 cancellation
      g_m2 = jnp.sum((g - g_mean[None]) ** 2, axis=0)
      delta = g_mean - mean
      m2 = m2 + g_m2 + delta * delta * (count * n / (count + n))
    mean = mean + (g_mean - mean) * (n / (count + n))
    count += n
  if form == "mean":
    return mean
  return m2 / num_samples
