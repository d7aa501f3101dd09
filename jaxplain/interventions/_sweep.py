"""Vectorised sweeps of N interventions (SPEC section 4: "a sweep over many interventions is
one vectorised, jitted computation, not a Python loop of forward passes").

Two paths, same result:

* ``sweep`` -- always correct: ``vmap`` over the N edited parameter pytrees
  (``set_value`` with a mask per intervention). Under ``jax.vmap`` only what depends on the
  edited leaf is batched, but the intervened layer itself runs N times.
* ``sweep_layer`` -- prefix reuse for a linen model: run the model once, capture the input h
  and output z of the intervened (linear: Dense/Conv) layer, build each intervention's new
  output of that layer in closed form, and re-run only the rest of the model (its output is
  swapped in with ``flax.linen.intercept_methods``; the layers before are dead code under
  ``jit``). Because the layer is linear in its weights,
  do(W[S] = alpha) gives z' = z - L((W - alpha) restricted to S)(h) (bias likewise), and only
  the slice S is computed per intervention: one input channel for ``"input"`` units, one
  output channel for ``"filter"`` units (zeroing a filter with its bias = zeroing that output
  channel), a 1 -> 1 channel conv for conv ``"weight"`` units.
  With ``channelwise_until="fc1"`` a filter ablation (alpha = 0, bias included) is carried
  further: when every op between the layer and the next linear layer ``fc1`` acts channel by
  channel and maps 0 to 0 (ReLU, max/avg pooling, flatten), zeroing channel k only zeroes
  channel k's entries of fc1's input, so fc1's output is fc1(u) minus the contribution of
  those entries, and only what follows fc1 is re-run. This is an assumption about the model
  that the caller makes; it is not checked (the tests compare it with the full recomputation).

``chunk=`` bounds memory (``jax.lax.map`` over chunks of ``chunk`` vmapped interventions, still
one compiled function); without chunking the intervention axis can be sharded over devices
(``shard_masks``). ``first_order`` estimates every effect from one (per-example) backward
pass, effect ~ sum over the unit of (alpha - w) * dy_j/dw, and ``agreement`` compares it with
an exact sweep.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _validate
from jaxplain.interventions import _hooks
from jaxplain.interventions._edit import Units, _leaf, resolve_layer, set_value
from jaxplain.interventions._select import path_str, select


def _map(fn: Callable, xs: Any, chunk: int | None) -> Any:
  if chunk is None:
    return jax.vmap(fn)(xs)
  if int(chunk) < 1:
    raise ValueError(f"chunk: expected a positive int or None, got {chunk}")
  return jax.lax.map(fn, xs, batch_size=int(chunk))


def _masks_of(units: Units | dict) -> dict:
  masks = units.masks if isinstance(units, Units) else dict(units)
  if not masks:
    raise ValueError("units: no masks given")
  ns = {p: np.shape(m)[0] for p, m in masks.items()}
  if len(set(ns.values())) != 1:
    raise ValueError(f"units: all masks need the same leading (intervention) axis, got {ns}")
  return masks


def sweep(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, x: jax.Array,
          units: Units | dict, *, value: Any = 0.0, chunk: int | None = None) -> jax.Array:
  """Logits under each of N interventions do(w[mask_n] = value): the general, always-correct
  path (vmap over edited parameter pytrees).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (B, K)``.
    params: the parameter pytree passed to ``apply_fn`` (e.g. linen variables).
    x: input batch (B, ...).
    units: a ``Units`` from ``units(params, ...)`` or ``{path: bool (N, *leaf shape)}``.
    value: alpha (scalar or broadcastable); 0 by default.
    chunk: interventions per vmapped chunk (``jax.lax.map``), None for all at once.

  Returns:
    (N, B, K) logits.

  >>> from jaxplain.interventions import units
  >>> apply_fn = lambda p, x: x @ p["fc"]["kernel"]
  >>> p = {"fc": {"kernel": jnp.ones((2, 3))}}
  >>> sweep(apply_fn, p, jnp.ones((1, 2)), units(p, "fc", "weight", [[0, 0], [1, 2]]))[:, 0]
  Array([[1., 2., 2.],
         [2., 2., 1.]], dtype=float32)
  """
  masks = _masks_of(units)
  x = _validate.check_batched(x, "x")
  _validate.check_finite(value, "value")
  sel = select(*[re.escape(p) for p in masks])
  masks = {p: jnp.asarray(m) for p, m in masks.items()}

  def one(m):
    return apply_fn(set_value(params, sel, value, where=m), x)

  return _map(one, masks, chunk)


def shard_masks(units: Units | dict, devices: Any = None) -> Units | dict:
  """Place the masks' intervention axis across ``devices`` (default all), so that a jitted
  ``sweep`` (without ``chunk``) runs its interventions in parallel. N must be divisible by the
  number of devices.

  >>> from jaxplain.interventions import units
  >>> p = {"fc": {"kernel": jnp.ones((2, 2))}}
  >>> shard_masks(units(p, "fc", "filter"))["fc/kernel"].shape
  (2, 2, 2)
  """
  devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
  mesh = jax.sharding.Mesh(devices, ("interventions",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("interventions"))
  masks = _masks_of(units)
  n = next(iter(masks.values())).shape[0]
  if n % len(devices):
    raise ValueError(f"units: {n} interventions cannot be split over {len(devices)} devices")
  return {p: jax.device_put(jnp.asarray(m), spec) for p, m in masks.items()}


# -- prefix reuse ---------------------------------------------------------------------------


def _linear(mod: nn.Module, h: jax.Array, kernel: jax.Array, bias: jax.Array | None = None):
  """The layer ``mod`` (Dense or Conv) applied to h with the given kernel (and bias)."""
  if isinstance(mod, nn.Dense):
    out = jnp.tensordot(h, kernel.astype(h.dtype), axes=((-1,), (0,)))
    return out if bias is None else out + bias
  if isinstance(mod, nn.Conv):
    if getattr(mod, "feature_group_count", 1) != 1 and kernel.shape[-2] != h.shape[-1]:
      raise ValueError("layer: grouped convolutions are not supported by sweep_layer; use sweep")
    p = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    m = mod.clone(features=kernel.shape[-1], use_bias=bias is not None)
    return m.apply({"params": p}, h)
  raise TypeError(f"layer: sweep_layer needs a flax.linen Dense or Conv layer, got "
                  f"{type(mod).__name__}; use sweep (the general path)")


def _one_hot_channel(k: jax.Array, n: int, dtype) -> jax.Array:
  return (jnp.arange(n) == k).astype(dtype)


def _input_contrib(mod: nn.Module, h: jax.Array, w: jax.Array, i: jax.Array,
                   channels: int | None) -> jax.Array:
  """L_nobias(h restricted to input unit / channel / flatten group i; w): shaped like z."""
  if isinstance(mod, nn.Dense):
    if channels is None:
      hi = jnp.take(h, i, axis=-1)[..., None]
      return hi * jnp.take(w, i, axis=0).reshape((1,) * (hi.ndim - 1) + (-1,))
    rows = i + channels * jnp.arange(h.shape[-1] // channels)
    return jnp.tensordot(jnp.take(h, rows, axis=-1), jnp.take(w, rows, axis=0),
                         axes=((-1,), (0,)))
  hi = jax.lax.dynamic_slice_in_dim(h, i, 1, axis=h.ndim - 1)
  wi = jax.lax.dynamic_slice_in_dim(w, i, 1, axis=w.ndim - 2)
  return _linear(mod, hi, wi)


def _new_outputs(units: Units, mod: nn.Module, h: jax.Array, z: jax.Array, w: jax.Array,
                 b: jax.Array | None, value: Any, out_mask: jax.Array | None = None):
  """(fn, data): fn(data_n) is the layer's output under intervention n."""
  n_out = z.shape[-1]
  alpha = jnp.asarray(value, z.dtype)
  wd = w - alpha
  if units.kind == "filter":
    wa = jnp.full_like(w, alpha)
    ba = None if b is None else (jnp.full_like(b, alpha) if units.bias else b)
    za = _linear(mod, h, wa, ba)

    def fn(k):
      return jnp.where(_one_hot_channel(k, n_out, bool), za, z)

    return fn, jnp.asarray(units.index)
  if units.kind == "input":
    om = jnp.asarray(units.outputs if out_mask is None else out_mask, z.dtype)
    if om.ndim == 2:  # per example (B, K_out)
      om = om.reshape((om.shape[0],) + (1,) * (z.ndim - 2) + (n_out,))
    else:
      om = om.reshape((1,) * (z.ndim - 1) + (n_out,))

    def fn(i):
      return z - _input_contrib(mod, h, wd, i, units.channels) * om

    return fn, jnp.asarray(units.index)
  # "weight": single weight / conv slice (i, k)
  def fn(ik):
    i, k = ik[0], ik[1]
    if isinstance(mod, nn.Dense):
      c = (jnp.take(h, i, axis=-1) * wd[i, k])[..., None]
    else:
      hi = jax.lax.dynamic_slice_in_dim(h, i, 1, axis=h.ndim - 1)
      wik = jax.lax.dynamic_slice_in_dim(
          jax.lax.dynamic_slice_in_dim(wd, i, 1, axis=w.ndim - 2), k, 1, axis=w.ndim - 1)
      c = _linear(mod, hi, wik)
    return z - c * _one_hot_channel(k, n_out, z.dtype).reshape((1,) * (z.ndim - 1) + (n_out,))

  return fn, jnp.asarray(units.index)


def _kernel_bias(variables: Any, layer: str):
  owner, _ = resolve_layer(variables, layer)
  w = jnp.asarray(_leaf(variables, owner + "/kernel"))
  try:
    b = jnp.asarray(_leaf(variables, owner + "/bias"))
  except (KeyError, TypeError):
    b = None
  return w, b


def sweep_layer(model: nn.Module, variables: Any, x: jax.Array, units: Units, *,
                value: Any = 0.0, chunk: int | None = None, channelwise_until: str | None = None,
                apply_kwargs: dict | None = None) -> jax.Array:
  """Logits under each intervention of ``units`` with prefix reuse (see the module docstring):
  the model runs once, then only the layers after the intervened one run per intervention.

  Args:
    model: a flax.linen module; ``model.apply(variables, x, **apply_kwargs) -> (B, K)``.
    variables: its variables (``{"params": ...}``, plus e.g. ``"batch_stats"``).
    x: input batch (B, ...).
    units: a ``Units`` of a Dense or Conv layer of ``model`` (from ``units(variables, ...)``).
    value: alpha of do(w = alpha) (0 by default).
    chunk: interventions per vmapped chunk, None for all at once.
    channelwise_until: module path of the next linear layer, for filter ablations through
      channel-wise, zero-preserving ops (ReLU, pooling, flatten); requires value == 0 and
      filter units with their bias.
    apply_kwargs: extra keyword arguments of ``model.apply`` (e.g. ``{"train": False}``).

  Returns:
    (N, B, K) logits, equal to ``sweep(model.apply, variables, x, units, value=value)``.

  >>> from jaxplain.models import LeNet
  >>> from jaxplain.interventions import units
  >>> v = LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> sweep_layer(LeNet(), v, jnp.ones((2, 28, 28, 1)), units(v, "conv2", "filter")).shape
  (16, 2, 10)
  """
  if not isinstance(units, Units):
    raise TypeError("units: sweep_layer needs a Units value (from units(...)); for raw masks use "
                    "sweep")
  x = _validate.check_batched(x, "x")
  _validate.check_finite(value, "value")
  layers = [units.layer] + ([channelwise_until] if channelwise_until else [])
  _, caps = _hooks.capture(model, variables, x, layers, apply_kwargs=apply_kwargs)
  h, z, mod = caps[units.layer]
  w, b = _kernel_bias(variables, units.layer)
  if channelwise_until is None:
    fn, data = _new_outputs(units, mod, h, z, w, b, value)
    target = units.layer
  else:
    if units.kind != "filter" or not isinstance(value, (int, float)) or value != 0:
      raise ValueError("channelwise_until: only for filter ablations (kind='filter', value=0)")
    if b is not None and not units.bias:
      raise ValueError("channelwise_until: the filter units must include the bias (bias=True); "
                       "zeroing the kernel alone does not zero the channel")
    u, z2, mod2 = caps[channelwise_until]
    w2, _ = _kernel_bias(variables, channelwise_until)
    c = z.shape[-1]
    if isinstance(mod2, nn.Dense):
      if u.shape[-1] % c:
        raise ValueError(f"channelwise_until: {channelwise_until!r} has {u.shape[-1]} inputs, "
                         f"not a flatten of {c} channels")
      groups = c
    elif u.shape[-1] != c:
      raise ValueError(f"channelwise_until: {channelwise_until!r} takes {u.shape[-1]} channels, "
                       f"the intervened layer gives {c}")
    else:
      groups = None

    def fn(k):
      return z2 - _input_contrib(mod2, u, w2, k, groups)

    data = jnp.asarray(units.index)
    target = channelwise_until

  def one(d):
    return _hooks.replace_output(model, variables, x, target, fn(d), apply_kwargs=apply_kwargs)

  return _map(one, data, chunk)


# -- first-order estimate -------------------------------------------------------------------


def first_order(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, x: jax.Array,
                target: Any, units: Units | dict, *, value: Any = 0.0) -> jax.Array:
  """First-order (Taylor) estimate of every intervention's effect on the target logit from one
  per-example backward pass: e_n ~ sum over the unit's entries of (alpha - w) * dy_j/dw.
  Exact when y_j is linear in the unit's weights (e.g. a last-layer weight).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (B, K)``.
    params: parameter pytree.
    x: (B, ...) inputs.
    target: int or (B,) int class j.
    units: ``Units`` or ``{path: bool (N, *leaf shape)}``.
    value: alpha.

  Returns:
    (N, B) estimated effects y^(n)_j - y_j.

  >>> from jaxplain.interventions import units
  >>> apply_fn = lambda p, x: x @ p["fc"]["kernel"]
  >>> p = {"fc": {"kernel": jnp.full((2, 2), 3.0)}}
  >>> first_order(apply_fn, p, jnp.ones((1, 2)), 0, units(p, "fc", "weight", [[0, 0]]))
  Array([[-3.]], dtype=float32)
  """
  masks = _masks_of(units)
  x = _validate.check_batched(x, "x")
  _validate.check_finite(value, "value")
  out = _validate.call_model(lambda: jax.eval_shape(apply_fn, params, x), functools.partial(
      apply_fn, params), x)
  k = _validate.check_logits(out, x.shape[0]).shape[1]
  t = _validate.check_target(target, x.shape[0], k)
  leaves = {p: jnp.asarray(_leaf(params, p)) for p in masks}

  def y(sub, xb, tb):
    p = jax.tree_util.tree_map_with_path(lambda path, leaf: sub.get(path_str(path), leaf), params)
    return apply_fn(p, xb[None])[0, tb]

  grads = jax.vmap(jax.grad(y), in_axes=(None, 0, 0))(leaves, x, t)   # {path: (B, *shape)}
  grads = {p: _validate.select_valid(g, t, k) for p, g in grads.items()}  # traced bad target
  est = 0.0
  for p, m in masks.items():
    d = jnp.asarray(m, leaves[p].dtype) * (jnp.asarray(value, leaves[p].dtype) - leaves[p])[None]
    est = est + jnp.einsum("n...,b...->nb", d, grads[p])
  return est


def agreement(estimate: Any, exact: Any, *, atol: float | None = None) -> dict[str, float]:
  """How well estimated effects match exact ones (both (N,) or (N, B), flattened).

  Effects that are zero in exact arithmetic (e.g. through a dead ReLU) come out of a sweep as
  rounding noise of either sign; values with ``|v| <= atol`` are therefore set to 0 in both
  arrays before comparing (default ``atol = 1e-5 * max |exact|``; pass 0 to compare raw).

  Returns:
    ``{"spearman": rank correlation, "pearson": linear correlation, "sign_agreement":
    fraction of entries with the same sign (0 counts as a sign), "n": count}``.

  >>> agreement(np.array([1., 2., -3.]), np.array([2., 4., -1.]))["sign_agreement"]
  1.0
  """
  from scipy import stats
  a = np.asarray(estimate, np.float64).reshape(-1)
  b = np.asarray(exact, np.float64).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f"estimate, exact: shapes differ: {np.shape(estimate)} vs {np.shape(exact)}")
  if atol is None:
    atol = 1e-5 * float(np.max(np.abs(b))) if b.size else 0.0
  a = np.where(np.abs(a) <= atol, 0.0, a)
  b = np.where(np.abs(b) <= atol, 0.0, b)
  if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
    rho = pear = float("nan")
  else:
    rho = float(stats.spearmanr(a, b).statistic)
    pear = float(np.corrcoef(a, b)[0, 1])
  return {"spearman": rho, "pearson": pear,
          "sign_agreement": float(np.mean(np.sign(a) == np.sign(b))), "n": int(a.size)}
