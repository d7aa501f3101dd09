"""Vectorised sweeps of N interventions (SPEC section 4: "a sweep over many interventions is
one vectorised, jitted computation, not a Python loop of forward passes").

Two paths, same result:

* ``sweep`` -- always correct: ``vmap`` over the N edited parameter pytrees
  (``set_value`` with a mask per intervention). Under ``jax.vmap`` only what depends on the
  edited leaf is batched, but the intervened layer itself runs N times.
* ``sweep_layer`` -- prefix reuse for any wrapped model (:func:`jaxplain.wrap`): run the
  model once, capture the input h and output z of the intervened (linear: dense/conv) layer,
  build each intervention's new output of that layer in closed form, and re-run only the rest
  of the model (its output is swapped in through the model interface, ``Model.replace``; the
  layers before are dead code under ``jit``). Because the layer is linear in its weights,
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

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _validate
from jaxplain.interventions._edit import Units, set_value
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


def _check_x(x: Any) -> jax.Array:
  """A batched input of any dtype (token ids too: nothing here differentiates w.r.t. x)."""
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"x: expected a batch (B, ...), got shape {x.shape}")
  if jnp.issubdtype(x.dtype, jnp.inexact):
    _validate.check_finite(x, "x")
  return x


def _as_model(model: Any, args: tuple, n: int, what: str):
  """``f(model, *args)`` or the older ``f(apply_fn_or_module, params_or_variables, *args)``."""
  from jaxplain.model import as_model  # pylint: disable=import-outside-toplevel
  return as_model(model, args, n, what, _SIGS[what])


_SIGS = {"sweep": "x, units", "sweep_layer": "x, units", "first_order": "x, target, units",
         "walk": "x, target, layers", "mediator_map": "x, result, layer",
         "walk_step": "x, target, layer, outputs"}


def sweep(model: Any, *args: Any, value: Any = 0.0, chunk: int | None = None) -> jax.Array:
  """Logits under each of N interventions do(w[mask_n] = value): the general, always-correct
  path (vmap over edited parameter pytrees).

  Called as ``sweep(model, x, units)`` with any :func:`jaxplain.wrap`-able model, or as
  ``sweep(apply_fn, params, x, units)``.

  Args:
    model: a model (``Model``, NNX / Equinox / Keras) or ``apply_fn(params, x) -> (B, K)``
      followed by its ``params``.
    *args: ``x, units``: the input batch (B, ...) (any dtype) and a ``Units`` from
      ``units(...)`` or ``{path: bool (N, *leaf shape)}``.
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
  m, (x, units) = _as_model(model, args, 2, "sweep")
  x = _check_x(x)
  masks = _masks_of(units)
  _validate.check_finite(value, "value")
  sel = select(*[re.escape(p) for p in masks])
  masks = {p: jnp.asarray(mk) for p, mk in masks.items()}

  def one(mk):
    return m.apply(set_value(m.params, sel, value, where=mk), x)

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


def _one_hot_channel(k: jax.Array, n: int, dtype) -> jax.Array:
  return (jnp.arange(n) == k).astype(dtype)


def _rows(units_or_groups: Any, i: jax.Array, n_in: int, first: bool) -> jax.Array:
  c = units_or_groups
  if first:
    size = n_in // c
    return i * size + jnp.arange(size)
  return i + c * jnp.arange(n_in // c)


def _input_contrib(lin: Any, h: jax.Array, w: jax.Array, i: jax.Array,
                   channels: int | None, first: bool = False) -> jax.Array:
  """L_nobias(h restricted to input unit / channel / flatten group i; w): shaped like z."""
  if lin.kind == "dense":
    if channels is None:
      row = jnp.take(w, i, axis=0).astype(h.dtype)
      return jnp.take(h, i, axis=-1)[..., None] * row.reshape((1,) * (h.ndim - 1) + row.shape)
    rows = _rows(channels, i, h.shape[-1], first)
    return jnp.tensordot(jnp.take(h, rows, axis=-1), jnp.take(w, rows, axis=0).astype(h.dtype),
                         axes=((-1,), (0,)))
  hi = jax.lax.dynamic_slice_in_dim(h, i, 1, axis=h.ndim - 1)
  wi = jax.lax.dynamic_slice_in_dim(w, i, 1, axis=w.ndim - 2)
  return lin.op(hi, wi)


def _new_outputs(units: Units, lin: Any, h: jax.Array, z: jax.Array, w: jax.Array,
                 b: jax.Array | None, value: Any, out_mask: jax.Array | None = None):
  """(fn, data): fn(data_n) is the layer's pre-activation output under intervention n.

  ``w`` is the canonical (..., in, out) kernel, ``b`` the (out,) bias."""
  n_out = z.shape[-1]
  alpha = jnp.asarray(value, w.dtype)
  wd = w - alpha
  if units.kind == "filter":
    wa = jnp.full_like(w, alpha)
    ba = None if b is None else (jnp.full_like(b, alpha) if units.bias else b)
    za = lin.op(h, wa, ba)

    def fn(k):
      return jnp.where(_one_hot_channel(k, n_out, bool).reshape((1,) * (z.ndim - 1) + (n_out,)),
                       za, z)

    return fn, jnp.asarray(units.index)
  if units.kind == "input":
    om = jnp.asarray(units.outputs if out_mask is None else out_mask, z.dtype)
    if om.ndim == 2:  # per example (B, K_out)
      om = om.reshape((om.shape[0],) + (1,) * (z.ndim - 2) + (n_out,))
    else:
      om = om.reshape((1,) * (z.ndim - 1) + (n_out,))

    def fn(i):
      return z - _input_contrib(lin, h, wd, i, units.channels, units.channels_first) * om

    return fn, jnp.asarray(units.index)
  # "weight": single weight / conv slice (i, k)
  def fn(ik):
    i, k = ik[0], ik[1]
    if lin.kind == "dense":
      c = (jnp.take(h, i, axis=-1) * wd[i, k].astype(h.dtype))[..., None]
    else:
      hi = jax.lax.dynamic_slice_in_dim(h, i, 1, axis=h.ndim - 1)
      wik = jax.lax.dynamic_slice_in_dim(
          jax.lax.dynamic_slice_in_dim(wd, i, 1, axis=w.ndim - 2), k, 1, axis=w.ndim - 1)
      c = lin.op(hi, wik)
    return z - c * _one_hot_channel(k, n_out, z.dtype).reshape((1,) * (z.ndim - 1) + (n_out,))

  return fn, jnp.asarray(units.index)


def _kernel_bias(m: Any, layer: str):
  """The canonical (..., in, out) kernel and (out,) bias of ``layer`` in ``m.params``, and its
  ``Linear``."""
  lin = m.linear(layer)
  leaves = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(m.params)[0]}
  w = lin.canonical(jnp.asarray(leaves[lin.kernel]))
  b = None if lin.bias is None else jnp.asarray(leaves[lin.bias]).reshape(-1)
  return w, b, lin


def _pre_activation(lin: Any, h: jax.Array, z: jax.Array, w: jax.Array, b: Any) -> jax.Array:
  """The layer's output before a fused activation (Keras ``activation=``)."""
  return z if lin.activation is None else lin.op(h, w, b)


def _post(lin: Any, z: jax.Array) -> jax.Array:
  return z if lin.activation is None else lin.activation(z)


def sweep_layer(model: Any, *args: Any, value: Any = 0.0, chunk: int | None = None,
                channelwise_until: str | None = None,
                apply_kwargs: dict | None = None) -> jax.Array:
  """Logits under each intervention of ``units`` with prefix reuse (see the module docstring):
  the model runs once, then only the layers after the intervened one run per intervention.

  Called as ``sweep_layer(model, x, units)`` (the older ``sweep_layer(module, variables, x,
  units)`` of linen still works).

  Args:
    model: anything :func:`jaxplain.wrap` takes (linen: ``wrap(module, variables)``).
    *args: ``x, units``: input batch (B, ...) (any dtype: token ids too) and a ``Units`` of a
      dense or conv layer of the model (from ``units(model, ...)``).
    value: alpha of do(w = alpha) (0 by default).
    chunk: interventions per vmapped chunk, None for all at once.
    channelwise_until: name of the next linear layer, for filter ablations through
      channel-wise, zero-preserving ops (ReLU, pooling, flatten); requires value == 0 and
      filter units with their bias.
    apply_kwargs: extra keyword arguments of a linen ``model.apply`` (old call only).

  Returns:
    (N, B, K) logits, equal to ``sweep(model, x, units, value=value)``.

  >>> from jaxplain import wrap
  >>> from jaxplain.models import LeNet
  >>> from jaxplain.interventions import units
  >>> m = wrap(LeNet(), LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  >>> sweep_layer(m, jnp.ones((2, 28, 28, 1)), units(m, "conv2", "filter")).shape
  (16, 2, 10)
  """
  if apply_kwargs and len(args) == 3:
    from jaxplain.model import wrap  # pylint: disable=import-outside-toplevel
    m, (x, units) = wrap(model, args[0], apply_kwargs=apply_kwargs), tuple(args[1:])
  else:
    m, (x, units) = _as_model(model, args, 2, "sweep_layer")
  if not isinstance(units, Units):
    raise TypeError("units: sweep_layer needs a Units value (from units(...)); for raw masks use "
                    "sweep")
  x = _check_x(x)
  layers = [units.layer] + ([channelwise_until] if channelwise_until else [])
  _, caps = m.capture(x, layers)
  h, z = caps[units.layer]
  w, b, lin = _kernel_bias(m, units.layer)
  if channelwise_until is None:
    fn, data = _new_outputs(units, lin, h, _pre_activation(lin, h, z, w, b), w, b, value)
    target = units.layer
    post = lambda v: _post(lin, v)  # noqa: E731
  else:
    if units.kind != "filter" or not isinstance(value, (int, float)) or value != 0:
      raise ValueError("channelwise_until: only for filter ablations (kind='filter', value=0)")
    if b is not None and not units.bias:
      raise ValueError("channelwise_until: the filter units must include the bias (bias=True); "
                       "zeroing the kernel alone does not zero the channel")
    u, z2 = caps[channelwise_until]
    w2, b2, lin2 = _kernel_bias(m, channelwise_until)
    z2 = _pre_activation(lin2, u, z2, w2, b2)
    c = z.shape[-1]
    if lin2.kind == "dense":
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
      return z2 - _input_contrib(lin2, u, w2, k, groups, m.channels_first)

    data = jnp.asarray(units.index)
    target = channelwise_until
    post = lambda v: _post(lin2, v)  # noqa: E731

  def one(d):
    return m.replace(x, target, post(fn(d)))

  return _map(one, data, chunk)


# -- first-order estimate -------------------------------------------------------------------


def first_order(model: Any, *args: Any, value: Any = 0.0) -> jax.Array:
  """First-order (Taylor) estimate of every intervention's effect on the target logit from one
  per-example backward pass: e_n ~ sum over the unit's entries of (alpha - w) * dy_j/dw.
  Exact when y_j is linear in the unit's weights (e.g. a last-layer weight).

  Called as ``first_order(model, x, target, units)`` or ``first_order(apply_fn, params, x,
  target, units)``.

  Args:
    model: anything :func:`jaxplain.wrap` takes, or ``apply_fn(params, x) -> (B, K)``
      followed by ``params``.
    *args: ``x, target, units``: (B, ...) inputs (any dtype: token ids too), int or (B,) int
      class j, and ``Units`` or ``{path: bool (N, *leaf shape)}``.
    value: alpha.

  Returns:
    (N, B) estimated effects y^(n)_j - y_j.

  >>> from jaxplain.interventions import units
  >>> apply_fn = lambda p, x: x @ p["fc"]["kernel"]
  >>> p = {"fc": {"kernel": jnp.full((2, 2), 3.0)}}
  >>> first_order(apply_fn, p, jnp.ones((1, 2)), 0, units(p, "fc", "weight", [[0, 0]]))
  Array([[-3.]], dtype=float32)
  """
  m, (x, target, units) = _as_model(model, args, 3, "first_order")
  masks = _masks_of(units)
  x = _check_x(x)
  _validate.check_finite(value, "value")
  params = m.params
  k = _validate.check_logits(jax.eval_shape(m.apply, params, x), x.shape[0]).shape[1]
  t = _validate.check_target(target, x.shape[0], k)
  all_leaves = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = [p for p in masks if p not in all_leaves]
  if missing:
    raise ValueError(f"units: paths {missing} are not in the model's parameters; available: "
                     f"{sorted(all_leaves)}")
  leaves = {p: jnp.asarray(all_leaves[p]) for p in masks}

  def y(sub, xb, tb):
    p = jax.tree_util.tree_map_with_path(lambda path, leaf: sub.get(path_str(path), leaf), params)
    return m.apply(p, xb[None])[0, tb]

  grads = jax.vmap(jax.grad(y), in_axes=(None, 0, 0))(leaves, x, t)   # {path: (B, *shape)}
  grads = {p: _validate.select_valid(g, t, k) for p, g in grads.items()}  # traced bad target
  est = 0.0
  for p, mk in masks.items():
    d = jnp.asarray(mk, leaves[p].dtype) * (jnp.asarray(value, leaves[p].dtype) - leaves[p])[None]
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
