"""Exact Integrated Gradients for networks that are piecewise linear along the path (private).

ExactLine (Sotoudeh & Thakur 2019): on the segment x(a) = x' + a (x - x'), a in [0, 1], a
network built of affine maps, ReLU / leaky ReLU / abs (comparisons, ``max``, ``select_n``) and
max-pooling is affine between breakpoints: the a where a ReLU pre-activation (any compared
difference) changes sign or a max-pool window's arg-max switches. Between breakpoints the
gradient is constant, so

  IG = (x - x') * sum_s (a_{s+1} - a_s) grad out[t](x((a_s + a_{s+1}) / 2))

exactly, and completeness holds to float rounding (SPEC.md section 10).

How the breakpoints are found: f's jaxpr (traced with a batch of one) is evaluated at every
current point a_k at once (each primitive vmapped over the points). The first piecewise-linear
primitive whose input changes sign (or arg-max) strictly inside a segment is the only one
whose input is known to be affine on the segments, so its crossings are computed exactly (by
linear interpolation between the segment's ends), inserted, and the pass restarts; when a
pass finds none, every primitive is affine on every segment. Runs on the host, one example
at a time; not under ``jit``.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxplain import _validate
from jaxplain.gradients import _grad_rows

Array = jax.Array

# primitives that are linear (affine with constants) in their batched operands
_LINEAR = {
    "add", "sub", "neg", "add_any", "dot_general", "conv_general_dilated", "reshape",
    "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "reduce_sum", "slice",
    "concatenate", "pad", "copy", "copy_p", "rev", "convert_element_type",
    "reduce_precision", "select_n", "dynamic_slice", "gather", "cumsum", "real",
    "sharding_constraint", "optimization_barrier", "dynamic_update_slice", "scatter-add",
}
_CMP = {"ge", "gt", "le", "lt", "max", "min"}  # breakpoints where lhs - rhs changes sign
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "remat": "jaxpr", "checkpoint": "jaxpr"}


class NotPiecewiseLinearError(ValueError):
  """f holds a primitive that is not piecewise linear along the path."""


class _Found(Exception):
  """Raised inside a pass with the new breakpoints of the first primitive that has some."""

  def __init__(self, points):
    super().__init__()
    self.points = points


def _crossings(d0: np.ndarray, a: np.ndarray, sep: float) -> np.ndarray:
  """Zeros strictly inside each segment of the affine differences: d (P, U) at points a,
  farther than ``sep`` from the segment's ends (a value evaluated at an inserted crossing
  is zero only up to rounding; a crossing that close is the same breakpoint)."""
  s0, s1 = d0[:-1], d0[1:]
  cross = (s0 * s1) < 0
  if not cross.any():
    return np.zeros(0)
  k, u = np.nonzero(cross)
  lo, hi = a[k], a[k + 1]
  r = s0[k, u] / (s0[k, u] - s1[k, u])
  pts = lo + (hi - lo) * r
  keep = (pts > lo + sep) & (pts < hi - sep)
  return pts[keep]


def _window_patches(x: np.ndarray, dims, strides, padding, init) -> np.ndarray:
  """(P, *shape) -> (P, K, *out_shape): the K window elements of every output position."""
  xp = np.pad(x, [(0, 0)] + [tuple(p) for p in padding], constant_values=init)
  out = []
  for off in itertools.product(*[range(w) for w in dims]):
    sl = (slice(None),) + tuple(
        slice(o, o + (xp.shape[i + 1] - w) // s * s + 1, s)
        for i, (o, w, s) in enumerate(zip(off, dims, strides)))
    out.append(xp[sl])
  return np.stack(out, axis=1)


def _switches(v: np.ndarray, a: np.ndarray, sep: float) -> np.ndarray:
  """Arg-max switches strictly inside segments of windows v (P, K, U) affine in a."""
  il, ir = np.argmax(v[:-1], axis=1), np.argmax(v[1:], axis=1)  # (P-1, U)
  k, u = np.nonzero(il != ir)
  if k.size == 0:
    return np.zeros(0)
  i, j = il[k, u], ir[k, u]
  di0 = v[k, i, u] - v[k, j, u]  # >= 0 at the left end
  di1 = v[k + 1, i, u] - v[k + 1, j, u]  # <= 0 at the right end
  den = di0 - di1
  ok = den > 0
  lo, hi = a[k[ok]], a[k[ok] + 1]
  pts = lo + (hi - lo) * di0[ok] / den[ok]
  keep = (pts > lo + sep) & (pts < hi - sep)
  return pts[keep]


def _vbind(eqn, invals, isb):
  prim, params = eqn.primitive, eqn.params
  axes = [0 if b else None for b in isb]
  out = jax.vmap(lambda *xs: prim.bind(*xs, **params), in_axes=axes)(*invals)
  return out


_PWCONST_OUT = {"ge", "gt", "le", "lt", "eq", "ne", "argmax", "argmin", "sign", "and", "or",
                "not", "stop_gradient", "floor", "ceil", "round"}
_CONST, _PW, _AFF = 0, 1, 2  # constant; piecewise constant along the path; affine on segments


def _not_pl(name, eqn, why=""):
  return NotPiecewiseLinearError(
      "method='exact': f is not piecewise linear along the path: the first "
      f"non-piecewise-linear primitive is '{name}'{why} ({eqn})")


def _run(jaxpr, consts, args, lev_args, a: np.ndarray, search: bool, sep: float):
  """Evaluate a jaxpr on values with a leading points axis; raise _Found at the first
  primitive with crossings strictly inside a segment when ``search``. Each value has a level:
  constant, piecewise constant (integer / boolean results, stop_gradient: constant between
  breakpoints) or affine on every segment."""
  env, lev = {}, {}

  def read(v):
    if isinstance(v, jex_core.Literal):
      return v.val, _CONST
    return env[v], lev[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v], lev[v] = c, _CONST
  for v, x, b in zip(jaxpr.invars, args, lev_args):
    env[v], lev[v] = x, b
  for eqn in jaxpr.eqns:
    vals, levs = zip(*[read(v) for v in eqn.invars]) if eqn.invars else ((), ())
    name = eqn.primitive.name
    top = max(levs, default=_CONST)
    if top == _CONST:
      outs = eqn.primitive.bind(*vals, **eqn.params)
      outl = _CONST
    elif name in _CALLS:
      sub = eqn.params[_CALLS[name]]
      sub_jaxpr, sub_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
      outs, out_levs = _run(sub_jaxpr, sub_consts, vals, levs, a, search, sep)
      for v, o, b in zip(eqn.outvars, outs, out_levs):
        env[v], lev[v] = o, b
      continue
    else:
      isb = [lv > _CONST for lv in levs]
      aff = [lv == _AFF for lv in levs]
      if top == _PW:
        outl = _PW  # any function of piecewise-constant values is piecewise constant
      elif name in _PWCONST_OUT:
        outl = _PW
      elif name == "mul" and sum(aff) > 1:
        raise _not_pl("mul", eqn, " of two input-dependent operands")
      elif name == "div" and aff[1]:
        raise _not_pl("div", eqn, " by an input-dependent value")
      elif name not in _LINEAR | _CMP | {"abs", "mul", "div", "reduce_window_max",
                                           "reduce_max"}:
        raise _not_pl(name, eqn)
      else:
        outl = _AFF
      if search and top == _AFF:
        pts = np.zeros(0)
        if name in _CMP | {"abs", "sign"}:
          bshape = next(jnp.shape(v) for v, bb in zip(vals, isb) if bb)
          d = np.asarray(vals[0], np.float64)
          if name not in ("abs", "sign"):
            d = d - np.asarray(vals[1], np.float64)  # jaxpr operands: equal shapes or scalars
          d = np.broadcast_to(d, bshape)
          pts = _crossings(d.reshape(len(a), -1), a, sep)
        elif name == "reduce_window_max":
          p = eqn.params
          if any(d != 1 for d in p.get("base_dilation", ())) or any(
              d != 1 for d in p.get("window_dilation", ())):
            raise NotPiecewiseLinearError("method='exact': dilated max-pooling is not supported")
          v = _window_patches(np.asarray(vals[0], np.float64), p["window_dimensions"],
                              p["window_strides"], p["padding"], -np.inf)
          pts = _switches(v.reshape(v.shape[0], v.shape[1], -1), a, sep)
        elif name in ("reduce_max", "argmax"):
          xn = np.asarray(vals[0], np.float64)
          axes = eqn.params["axes"]
          keep = [i for i in range(1, xn.ndim) if i - 1 not in axes]
          red = [i + 1 for i in axes]
          u = int(np.prod([xn.shape[i] for i in keep])) if keep else 1
          v = np.transpose(xn, [0] + red + keep).reshape(len(a), -1, u)
          pts = _switches(v, a, sep)
        if pts.size:
          raise _Found(pts)
      outs = _vbind(eqn, vals, isb)
    if eqn.primitive.multiple_results:
      for v, o in zip(eqn.outvars, outs):
        env[v], lev[v] = o, outl
    else:
      env[eqn.outvars[0]], lev[eqn.outvars[0]] = outs, outl
  results = [read(v) for v in jaxpr.outvars]
  return [r[0] for r in results], [r[1] for r in results]


def breakpoints(f: Callable, x1: Array, b1: Array, max_passes: int = 10000) -> np.ndarray:
  """The sorted breakpoints in (0, 1) of f along x1' -> x1 (one example, (1, ...))."""
  closed = jax.make_jaxpr(f)(x1)
  a = np.array([0.0, 1.0])
  d1 = x1 - b1
  sep = 16 * float(jnp.finfo(x1.dtype).eps)
  for _ in range(max_passes):
    # pad the points to a power of two (repeating a = 1: empty segments, no crossings) so
    # the eagerly run primitives see few distinct shapes and compile few times
    n = 1 << int(np.ceil(np.log2(len(a))))
    ap = np.concatenate([a, np.ones(n - len(a))])
    pts = jnp.asarray(ap, x1.dtype).reshape((-1,) + (1,) * x1.ndim) * d1[None] + b1[None]
    try:
      _run(closed.jaxpr, closed.consts, [pts], [_AFF], ap, search=True, sep=sep)
    except _Found as e:
      new = np.unique(e.points)
      a = np.unique(np.concatenate([a, new]))
      continue
    return a[1:-1]
  raise RuntimeError(f"method='exact': more than {max_passes} passes to find the breakpoints")


def exact_ig(f, x: Array, base: Array, t: Array, output: str, chunk: int | None):
  """Exact IG for every example: returns (attr, info)."""
  if not all(_validate.is_concrete(v) for v in (x, base, t)):
    raise ValueError("method: 'exact' finds the breakpoints on the host and cannot be traced "
                     "(jit / vmap); call it outside jax.jit")
  if output != "logit":
    raise ValueError(f"output: method='exact' needs output='logit' (a softmax output is not "
                     f"piecewise linear), got {output!r}")
  acc = x.dtype if jnp.finfo(x.dtype).bits >= 32 else jnp.dtype(jnp.float32)
  b = x.shape[0]
  attrs, bps, steps = [], [], []
  for i in range(b):
    x1, b1 = x[i:i + 1], base[i:i + 1]
    bp = breakpoints(f, x1, b1)
    edges = np.concatenate([[0.0], bp, [1.0]])
    mids = 0.5 * (edges[:-1] + edges[1:])
    lens = np.diff(edges)
    d = (x1.astype(acc) - b1.astype(acc))[0]
    total = jnp.zeros(x.shape[1:], acc)
    step = 1 << int(np.ceil(np.log2(len(mids))))
    if chunk is not None:
      step = min(step, max(1, int(chunk)) * 16)
    pad = -len(mids) % step  # zero-length segments: a fixed call shape, weight 0
    mids = np.concatenate([mids, np.ones(pad)])
    lens = np.concatenate([lens, np.zeros(pad)])
    for s in range(0, len(mids), step):
      m = jnp.asarray(mids[s:s + step], acc)
      pts = (b1.astype(acc) + m.reshape((-1,) + (1,) * (x.ndim - 1)) * d[None]).astype(x.dtype)
      _, g = _grad_rows(f, pts, jnp.full((len(m),), t[i]), output)
      total = total + jnp.tensordot(jnp.asarray(lens[s:s + step], acc), g.astype(acc), axes=1)
    attrs.append(d * total)
    bps.append(bp)
    steps.append(len(bp) + 1)
  attr = jnp.stack(attrs)
  logits = f(jnp.concatenate([x, base], axis=0))
  out = _validate.select_target(logits, jnp.concatenate([t, t])).astype(acc)
  gap = jnp.sum(attr.reshape(b, -1), axis=1) - (out[:b] - out[b:])
  return attr, {"steps": jnp.asarray(steps, jnp.int32), "gap": gap,
                "converged": jnp.ones((b,), bool), "breakpoints": tuple(bps)}
