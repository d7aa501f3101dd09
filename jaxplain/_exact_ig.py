"""Exact Integrated Gradients for networks that are piecewise linear along the path (private).

ExactLine (Sotoudeh & Thakur 2019): on the segment x(a) = x' + a (x - x'), a in [0, 1], a
network built of affine maps, ReLU / leaky ReLU / abs (comparisons, ``max``, ``select_n``) and
max-pooling is affine between breakpoints: the a where a ReLU pre-activation (any compared
difference) changes sign or a max-pool window's arg-max switches. Between breakpoints the
gradient is constant, so

  IG = (x - x') * sum_s (a_{s+1} - a_s) grad out[t](x((a_s + a_{s+1}) / 2))

exactly, and completeness holds to float rounding (SPEC.md section 10).

How the breakpoints are found, in ONE pass over f's jaxpr (traced with a batch of one, calls
inlined, scans of static length unrolled, a cond with a literal index reduced to
its branch): every value that depends on the input is held at both ends of every current
segment (rows ``[left ends; right ends]``, each primitive vmapped over the rows), for several
examples at once (each segment knows its example). Before a piecewise-linear primitive, its
input is affine on every current segment (all earlier primitives' breakpoints are already
segment ends), so its crossings (sign changes of a compared difference, arg-max switches of a
window) are computed exactly by linear interpolation; the segments are split there and every
live value is interpolated to the new ends (exact: it is affine on the old segment), as
ExactLine does, instead of re-running the network from its input. Arg-max switches repeat
until the arg-max agrees at both ends of every segment (a max of affine functions is convex,
so then it is constant on the segment). Piecewise-constant values (comparison results,
arg-max, ``stop_gradient``) are evaluated at each segment's midpoint and copied to both ends,
so a tie at a breakpoint never picks the wrong piece. Row counts are padded to powers of two
(few compiles). The gradients at all segments' midpoints of all examples then run through
one jitted call per ``rows`` chunk. Runs on the host; not under ``jit``.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxplain import _jaxpr, _progress, _validate
from jaxplain.gradients import _grad_rows

Array = jax.Array

# primitives that are linear (affine with constants) in their batched operands
_LINEAR = {
    "add", "sub", "neg", "add_any", "dot_general", "conv_general_dilated", "reshape",
    "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "reduce_sum", "slice",
    "concatenate", "stack", "unstack", "split", "pad", "copy", "copy_p", "rev",
    "convert_element_type", "reduce_precision", "select_n", "dynamic_slice", "gather",
    "cumsum", "real", "reduce_window_sum",
    "sharding_constraint", "optimization_barrier", "dynamic_update_slice", "scatter-add",
}
_CMP = {"ge", "gt", "le", "lt", "max", "min"}  # breakpoints where lhs - rhs changes sign
_PWCONST_OUT = {"ge", "gt", "le", "lt", "eq", "ne", "argmax", "argmin", "sign", "and", "or",
                "not", "stop_gradient", "floor", "ceil", "round"}
_CONST, _PW, _AFF = 0, 1, 2  # constant; piecewise constant along the path; affine on segments

_GROUP = 8  # examples whose breakpoints are searched together (memory ~ their segments)
_MAX_ROWS = 4096  # gradient rows per call with chunk=None


class NotPiecewiseLinearError(ValueError):
  """``method="exact"`` was given an ``f`` with a primitive that is not piecewise linear
  along the path (e.g. ``tanh``, ``exp``, a product of two input-dependent values); the
  message names the first such primitive. A subclass of ``ValueError``.

  >>> import jax.numpy as jnp, jaxplain
  >>> try:
  ...   jaxplain.integrated_gradients(jnp.tanh, jnp.ones((1, 2)), 0, method="exact")
  ... except jaxplain.NotPiecewiseLinearError as e:
  ...   print(str(e)[:90])
  method='exact': f is not piecewise linear along the path: the first non-piecewise-linear p
  """


_CONTROL_FLOW = {
    "while": " (a while loop: exact IG inlines scans with a static length, e.g. fori_loop with "
             "Python-int bounds, not while loops)",
    "cond": " (a cond / switch whose branch index is not a literal: exact IG inlines only a "
            "branch fixed when f is traced)",
}


def _not_pl(name, eqn, why=""):
  return NotPiecewiseLinearError(
      "method='exact': f is not piecewise linear along the path: the first "
      f"non-piecewise-linear primitive is '{name}'{why} ({eqn})")


# -- the jaxpr, calls inlined --------------------------------------------------------------

def _flatten(jaxpr, consts, in_refs, eqns, const_vals, counter):
  """Append jaxpr's equations to ``eqns`` as (eqn, in_refs, out_ids), inlining calls; a ref
  is an int id or ``("lit", value)``. Returns the refs of the outputs."""
  env = {}

  def ref(v):
    return ("lit", v.val) if isinstance(v, jex_core.Literal) else env[v]

  def new():
    counter[0] += 1
    return counter[0]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = new()
    const_vals[env[v]] = c
  for v, r in zip(jaxpr.invars, in_refs):
    env[v] = r
  for eqn in jaxpr.eqns:
    ins = [ref(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _jaxpr.CALLS:  # jit, custom_jvp / custom_vjp, checkpoint (remat)
      sub_jaxpr, sub_consts = _jaxpr.call_body(eqn)
      outs = _flatten(sub_jaxpr, sub_consts, ins, eqns, const_vals, counter)
    elif name == "scan":
      outs = _unroll_scan(eqn, ins, eqns, const_vals, counter)
    elif name == "cond" and isinstance(ins[0], tuple):  # a literal branch index
      b = eqn.params["branches"][int(np.clip(ins[0][1], 0, len(eqn.params["branches"]) - 1))]
      outs = _flatten(b.jaxpr, b.consts, ins[1:], eqns, const_vals, counter)
    else:
      outs = [new() for _ in eqn.outvars]
      eqns.append((eqn, ins, outs))
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [ref(v) for v in jaxpr.outvars]


def _flatten_fn(fn, avals, in_refs, eqns, const_vals, counter):
  """Inline the equations of ``fn`` traced at ``avals`` (slicing, stacking) on ``in_refs``."""
  cj = jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])
  return _flatten(cj.jaxpr, cj.consts, in_refs, eqns, const_vals, counter)


def _unroll_scan(eqn, ins, eqns, const_vals, counter):
  """A scan (static length) inlined iteration by iteration: the body's equations once per
  step, the scanned inputs sliced and the outputs stacked by inlined equations."""
  prm = eqn.params
  n = prm["length"]
  consts, carry, xs, body, body_consts = _jaxpr._scan_parts(prm, list(ins))
  xs_avals = [v.aval for v in _jaxpr._scan_parts(prm, list(eqn.invars))[2]]
  nk = len(carry)
  # every step's slice of each scanned input, from one trace per input
  steps = [_flatten_fn(lambda a: [a[i] for i in range(n)], [av], [r], eqns, const_vals,
                       counter) for av, r in zip(xs_avals, xs)]
  ys = []
  for k in range(n):
    i = n - 1 - k if prm["reverse"] else k
    xi = [s[i] for s in steps]
    outs = _flatten(body, body_consts, list(consts) + list(carry) + xi, eqns, const_vals,
                    counter)
    carry, y = outs[:nk], outs[nk:]
    ys.append(y)
  if prm["reverse"]:
    ys = ys[::-1]
  stacked = []
  for j, ov in enumerate(eqn.outvars[nk:]):
    col = [y[j] for y in ys]
    item = jax.ShapeDtypeStruct(ov.aval.shape[1:], ov.aval.dtype)
    stacked.append(_flatten_fn(lambda *a: jnp.stack(a), [item] * n, col, eqns, const_vals,
                               counter)[0])
  return carry + stacked


# -- breakpoints within segments -----------------------------------------------------------

def _crossings(k, a0, a1, lo, hi, sep: float):
  """Zeros strictly inside segments ``k`` of affine differences with ends a0, a1 of opposite
  signs: returns (segment index, point), dropping those within ``sep`` of the segment's ends
  (a value at an inserted crossing is zero only up to rounding; a crossing that close is the
  same one). The point is computed in float64."""
  a0, a1 = np.asarray(a0, np.float64), np.asarray(a1, np.float64)
  r = a0 / (a0 - a1)
  pts = lo[k] + (hi[k] - lo[k]) * r
  keep = (pts > lo[k] + sep) & (pts < hi[k] - sep)
  return k[keep], pts[keep]


def _differences(vals, levs, sp):
  """The affine differences lhs - rhs of a comparison (or the operand of abs / sign) at the
  segments' left and right ends, (sp, U) each (traced; constants broadcast)."""
  shape = next(v.shape[1:] for v, lv in zip(vals, levs) if lv != _CONST)

  def ends(v, lv):
    if lv == _CONST:
      v = jnp.broadcast_to(v, (1,) + shape) if jnp.ndim(v) else v
      return v, v
    return v[:sp], v[sp:2 * sp]
  l0, r0 = ends(vals[0], levs[0])
  if len(vals) > 1:
    l1, r1 = ends(vals[1], levs[1])
    l0, r0 = l0 - l1, r0 - r1
  full = (sp,) + shape
  return jnp.broadcast_to(l0, full).reshape(sp, -1), jnp.broadcast_to(r0, full).reshape(sp, -1)


@functools.partial(jax.jit, static_argnames=("levs", "sp"))
def _sign_changes(vals, *, levs, sp):
  """(sp, U) bool: the difference changes sign strictly inside the segment (one fused pass on
  the device; only this mask comes to the host)."""
  d0, d1 = _differences(vals, levs, sp)
  return ((d0 < 0) & (d1 > 0)) | ((d0 > 0) & (d1 < 0))


@functools.partial(jax.jit, static_argnames=("levs", "sp"))
def _difference_at(vals, k, u, *, levs, sp):
  """The two ends' differences at the entries (k, u) (recomputed there, not materialised)."""
  d0, d1 = _differences(vals, levs, sp)
  return d0[k, u], d1[k, u]


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


def _switches(v0: np.ndarray, v1: np.ndarray, lo, hi, sep: float):
  """Arg-max switches inside segments of windows with ends v0, v1 (S, K, U), affine on each
  segment: where the left end's arg-max i meets the right end's j (exact when no third
  element takes over in between; otherwise the caller repeats on the halves)."""
  il, ir = np.argmax(v0, axis=1), np.argmax(v1, axis=1)  # (S, U)
  k, u = np.nonzero(il != ir)
  if k.size == 0:
    return k, np.zeros(0)
  i, j = il[k, u], ir[k, u]
  f64 = np.float64
  di0 = v0[k, i, u].astype(f64) - v0[k, j, u].astype(f64)  # >= 0 at the left end
  di1 = v1[k, i, u].astype(f64) - v1[k, j, u].astype(f64)  # <= 0 at the right end
  den = di0 - di1
  ok = den > 0
  k = k[ok]
  pts = lo[k] + (hi[k] - lo[k]) * di0[ok] / den[ok]
  keep = (pts > lo[k] + sep) & (pts < hi[k] - sep)
  return k[keep], pts[keep]


def _search(name, eqn, vals, levs, n_seg, sp, lo, hi, sep):
  """The breakpoints of one primitive inside the current n_seg segments (its affine inputs;
  rows [left ends; right ends], each block padded to sp)."""
  def ends(v, lv):  # in the values' own dtype; the crossings are computed in float64
    v = np.asarray(v)
    if lv == _CONST:
      return v, v
    return v[:n_seg], v[sp:sp + n_seg]

  if name in _CMP | {"abs", "sign"}:   # jaxpr operands: equal shapes or scalars
    vals = tuple(jnp.asarray(v) for v in vals[:1 if name in ("abs", "sign") else 2])
    levs = tuple(levs[:len(vals)])
    k, u = np.nonzero(np.asarray(_sign_changes(vals, levs=levs, sp=sp))[:n_seg])
    if k.size == 0:
      return k, np.zeros(0)
    n = _bucket(k.size)                   # a few call shapes: padded with entry (0, 0)
    kp, up = (np.concatenate([a, np.zeros(n - a.size, a.dtype)]).astype(np.int32)
              for a in (k, u))
    a0, a1 = _difference_at(vals, kp, up, levs=levs, sp=sp)
    return _crossings(k, np.asarray(a0)[:k.size], np.asarray(a1)[:k.size], lo, hi, sep)
  if name == "reduce_window_max":
    p = eqn.params
    if any(d != 1 for d in p.get("base_dilation", ())) or any(
        d != 1 for d in p.get("window_dilation", ())):
      raise NotPiecewiseLinearError("method='exact': dilated max-pooling is not supported")
    l0, r0 = ends(vals[0], levs[0])
    w = [_window_patches(e, p["window_dimensions"], p["window_strides"], p["padding"],
                         -np.inf) for e in (l0, r0)]
    return _switches(*[e.reshape(n_seg, e.shape[1], -1) for e in w], lo, hi, sep)
  if name in ("reduce_max", "argmax"):
    axes = eqn.params["axes"]
    out = []
    for e in ends(vals[0], levs[0]):
      keep = [i for i in range(1, e.ndim) if i - 1 not in axes]
      red = [i + 1 for i in axes]
      u = int(np.prod([e.shape[i] for i in keep])) if keep else 1
      out.append(np.transpose(e, [0] + red + keep).reshape(n_seg, -1, u))
    return _switches(*out, lo, hi, sep)
  return np.zeros(0, np.int64), np.zeros(0)


_SEARCH = _CMP | {"abs", "sign", "reduce_window_max", "reduce_max", "argmax"}


def _bucket(n: int) -> int:
  return 1 << max(0, int(np.ceil(np.log2(max(n, 1)))))


def _split(lo, hi, ex, seg, pts):
  """Split segments at the new points: (new lo, hi, ex, parent index, fraction of the new
  left and right ends along the parent)."""
  pts_all = np.concatenate([lo, pts])
  seg_all = np.concatenate([np.arange(len(lo)), seg])
  order = np.lexsort((pts_all, seg_all))
  new_lo, parent = pts_all[order], seg_all[order]
  dup = np.zeros(len(new_lo), bool)  # drop duplicate points within a segment
  dup[1:] = (parent[1:] == parent[:-1]) & (new_lo[1:] <= new_lo[:-1])
  new_lo, parent = new_lo[~dup], parent[~dup]
  new_hi = np.empty_like(new_lo)
  new_hi[:-1] = new_lo[1:]
  last = np.ones(len(new_lo), bool)
  last[:-1] = parent[1:] != parent[:-1]
  new_hi[last] = hi[parent[last]]
  length = hi[parent] - lo[parent]
  rl = (new_lo - lo[parent]) / length
  rr = (new_hi - lo[parent]) / length
  rr[last] = 1.0
  return new_lo, new_hi, ex[parent], parent, rl, rr


def _interp(v, lv, sp, parent, rl, rr):
  """A live value at the new segments' ends (``parent``, ``rl``, ``rr`` already padded; the
  old rows are [left ends; right ends], each block ``sp`` rows): affine values interpolated
  along the parent segment ((1 - r) L + r R: exact at r = 0 and 1), piecewise-constant ones
  copied. On the device, jitted: one fused gather and blend per value (the same in NumPy,
  with its temporaries, was 80 % of exact IG's time on LeNet: 20.9 of 26.1 s for 8 digits)."""
  v = jnp.asarray(v)
  if lv == _PW:
    return _interp_rows(v, jnp.asarray(parent, jnp.int32), None, None, sp=sp)
  dt = v.dtype
  return _interp_rows(v, jnp.asarray(parent, jnp.int32), jnp.asarray(rl.astype(dt)),
                      jnp.asarray(rr.astype(dt)), sp=sp)


@functools.partial(jax.jit, static_argnames=("sp",))
def _interp_rows(v, parent, rl, rr, *, sp):
  left, right = v[parent], v[sp + parent]
  if rl is None:
    return jnp.concatenate([left, left])
  shape = (-1,) + (1,) * (v.ndim - 1)
  a, b = rl.reshape(shape), rr.reshape(shape)
  return jnp.concatenate([(1 - a) * left + a * right, (1 - b) * left + b * right])


class _Program:
  """f's jaxpr (batch of one) with calls inlined: the level of every value, the constants
  evaluated once, the primitives whose breakpoints are searched, and the stages between
  them, each one jitted function of the live values over the rows (XLA fuses a stage's
  elementwise work; row counts are powers of two, so few compiles)."""

  def __init__(self, f: Callable, x1: Array):
    try:
      closed = jax.make_jaxpr(f)(x1)
    except Exception as err:
      err.add_note("jaxplain: method='exact' traces f on one example at a time (a batch of "
                   "one row); f must keep the batch axis for any number of rows (e.g. no "
                   "`.squeeze()` of it)")
      raise
    _validate.check_logits(closed.out_avals[0] if len(closed.out_avals) == 1
                           else tuple(closed.out_avals), 1, "f(x[:1])")
    eqns, consts, counter = [], {}, [1]  # id 1: the input
    outs_f = _flatten(closed.jaxpr, closed.consts, [1], eqns, consts, counter)
    lev = {1: _AFF}
    lev.update({r: _CONST for r in consts})
    search, define = [], {1: -1}
    for i, (eqn, ins, outs) in enumerate(eqns):
      name = eqn.primitive.name
      levs = [_CONST if isinstance(r, tuple) else lev[r] for r in ins]
      top = max(levs, default=_CONST)
      if top == _CONST:
        vals = [r[1] if isinstance(r, tuple) else consts[r] for r in ins]
        res = eqn.primitive.bind(*vals, **eqn.params)
        for r, o in zip(outs, res if eqn.primitive.multiple_results else [res]):
          consts[r], lev[r] = o, _CONST
        continue
      aff = [lv == _AFF for lv in levs]
      if top == _PW or name in _PWCONST_OUT:
        outl = _PW  # any function of piecewise-constant values is piecewise constant
      elif name == "mul" and sum(aff) > 1:
        raise _not_pl("mul", eqn, " of two input-dependent operands")
      elif name == "div" and aff[1]:
        raise _not_pl("div", eqn, " by an input-dependent value")
      elif name not in _LINEAR | _SEARCH | {"mul", "div"}:
        raise _not_pl(name, eqn, _CONTROL_FLOW.get(name, ""))
      else:
        outl = _AFF
      if top == _AFF and name in _SEARCH:
        search.append(i)
      for r in outs:
        lev[r], define[r] = outl, i
    last = {}
    for i, (_, ins, _) in enumerate(eqns):
      for r in ins:
        if isinstance(r, int) and lev[r] != _CONST:
          last[r] = i
    for r in outs_f:
      if isinstance(r, int):
        last[r] = len(eqns)
    self.eqns, self.lev, self.consts, self.search = eqns, lev, consts, search
    # the non-constant values defined before eqn i and used at or after it
    self.live = {i: sorted(r for r, d in define.items() if d < i <= last.get(r, -2))
                 for i in search}
    self.live[0] = [1]
    self._fns = {}

  def read(self, env, r):
    if isinstance(r, tuple):
      return r[1], _CONST
    if r in self.consts:
      return self.consts[r], _CONST
    return env[r], self.lev[r]

  def stage(self, i0: int, i1: int):
    """The jitted function: live values before eqn i0 -> live values before eqn i1."""
    if (i0, i1) not in self._fns:
      ins_ids, out_ids = self.live[i0], self.live[i1]

      def fn(*vals):
        env = dict(zip(ins_ids, vals))
        sp = vals[0].shape[0] // 2
        for eqn, ins, outs in self.eqns[i0:i1]:
          if outs[0] in self.consts:
            continue
          v, lv = zip(*[self.read(env, r) for r in ins])
          axes = [None if l == _CONST else 0 for l in lv]
          prim, params = eqn.primitive, eqn.params
          bind = jax.vmap(lambda *xs, prim=prim, params=params: prim.bind(*xs, **params),
                          in_axes=axes)
          if self.lev[outs[0]] == _PW:  # at the midpoints, copied to both ends
            mids = [a if l == _CONST else (0.5 * (a[:sp] + a[sp:]) if l == _AFF else a[:sp])
                    for a, l in zip(v, lv)]
            res = bind(*mids)
            res = ([jnp.concatenate([o, o]) for o in res] if prim.multiple_results
                   else jnp.concatenate([res, res]))
          else:
            res = bind(*v)
          for r, o in zip(outs, res if prim.multiple_results else [res]):
            env[r] = o
        return tuple(env[r] for r in out_ids)

      self._fns[(i0, i1)] = jax.jit(fn) if i1 > i0 else (lambda *v: v)
    return self._fns[(i0, i1)]


_PROGRAMS: dict = {}  # the last few programs (their compiled stages), by f and input type


def _program(f: Callable, x1: Array) -> _Program:
  key = (f, x1.shape, str(x1.dtype))
  try:
    hash(key)
  except TypeError:
    return _Program(f, x1)
  if key not in _PROGRAMS:
    if len(_PROGRAMS) >= 4:
      _PROGRAMS.pop(next(iter(_PROGRAMS)))
    _PROGRAMS[key] = _Program(f, x1)
  return _PROGRAMS[key]


def segments(prog: _Program, x: Array, base: Array, sep: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The affine segments of f along base -> x for every example: (lo, hi, example) float64,
  float64, int, sorted by example then position."""
  b = x.shape[0]
  lo, hi, ex = np.zeros(b), np.ones(b), np.arange(b)
  sp = _bucket(b)
  src = np.concatenate([np.arange(b), np.zeros(sp - b, int)])
  env = {1: np.concatenate([np.asarray(base)[src], np.asarray(x)[src]])[:, None]}
  prev = 0
  for i in prog.search:
    env = dict(zip(prog.live[i], prog.stage(prev, i)(*[env[r] for r in prog.live[prev]])))
    eqn, ins, _ = prog.eqns[i]
    while True:
      vals, levs = zip(*[prog.read(env, r) for r in ins])
      seg, pts = _search(eqn.primitive.name, eqn, vals, levs, len(lo), sp, lo, hi, sep)
      if pts.size == 0:
        break
      sp_old = sp
      lo, hi, ex, parent, rl, rr = _split(lo, hi, ex, seg, pts)
      sp = _bucket(len(lo))
      src = np.concatenate([np.arange(len(lo)), np.zeros(sp - len(lo), int)])
      env = {r: _interp(v, prog.lev[r], sp_old, parent[src], rl[src], rr[src])
             for r, v in env.items()}
    prev = i
  return lo, hi, ex


def breakpoints(f: Callable, x1: Array, b1: Array) -> np.ndarray:
  """The sorted breakpoints in (0, 1) of f along x1' -> x1 (one example, (1, ...))."""
  lo, _, _ = segments(_Program(f, x1), x1, b1, 16 * float(jnp.finfo(x1.dtype).eps))
  return lo[1:]


@functools.partial(jax.jit, static_argnames=("f", "output", "dtype", "nb"))
def _segment_grads(base, diff, t, ex, mid, length, *, f, output, dtype, nb):
  """sum over rows of length * grad out[t](x'_ex + mid (x_ex - x'_ex)) per example (nb, ...)."""
  shape = (-1,) + (1,) * (base.ndim - 1)
  pts = (base[ex] + mid.reshape(shape) * diff[ex]).astype(dtype)
  _, g = _grad_rows(f, pts, t[ex], output)
  return jax.ops.segment_sum(g.astype(base.dtype) * length.reshape(shape), ex,
                             num_segments=nb)


def exact_ig(f, x: Array, base: Array, t: Array, output: str, chunk: int | None, *,
             progress: bool = False):
  """Exact IG for every example: returns (attr, info)."""
  if not all(_validate.is_concrete(v) for v in (x, base, t)):
    raise ValueError("method: 'exact' finds the breakpoints on the host and cannot be traced "
                     "(jit / vmap); call it outside jax.jit")
  if output != "logit":
    raise ValueError(f"output: method='exact' needs output='logit' (a softmax output is not "
                     f"piecewise linear), got {output!r}")
  acc = _validate.accumulation_dtype(x.dtype)
  b = x.shape[0]
  prog = _program(f, x[:1])
  sep = 16 * float(jnp.finfo(x.dtype).eps)
  los, his, exs = [], [], []
  groups = range(0, b, _GROUP)
  for s in _progress.iterate(groups, desc=f"exact IG: breakpoints, {_GROUP} examples each",
                             total=len(groups), disable=not progress or len(groups) < 2):
    lo, hi, ex = segments(prog, x[s:s + _GROUP], base[s:s + _GROUP], sep)
    los.append(lo)
    his.append(hi)
    exs.append(ex + s)
  lo, hi, ex = np.concatenate(los), np.concatenate(his), np.concatenate(exs)
  rows = _MAX_ROWS if chunk is None else max(1, int(chunk)) * max(b, 64)
  rows = min(rows, _bucket(len(lo)))
  pad = -len(lo) % rows  # zero-length rows: a fixed call shape, weight 0
  mid = np.concatenate([0.5 * (lo + hi), np.zeros(pad)])
  length = np.concatenate([hi - lo, np.zeros(pad)])
  exp = np.concatenate([ex, np.zeros(pad, ex.dtype)]).astype(np.int32)
  base_acc = base.astype(acc)
  diff = x.astype(acc) - base_acc
  total = jnp.zeros(x.shape, acc)
  for s in range(0, len(mid), rows):
    total = total + _segment_grads(base_acc, diff, t, jnp.asarray(exp[s:s + rows]),
                                   jnp.asarray(mid[s:s + rows], acc),
                                   jnp.asarray(length[s:s + rows], acc),
                                   f=f, output=output, dtype=x.dtype, nb=b)
  attr = diff * total
  logits = f(jnp.concatenate([x, base], axis=0))
  out = _validate.select_target(logits, jnp.concatenate([t, t])).astype(acc)
  gap = jnp.sum(attr.reshape(b, -1), axis=1) - (out[:b] - out[b:])
  counts = np.bincount(ex, minlength=b)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  bps = tuple(lo[st + 1:st + c] for st, c in zip(starts, counts))
  return attr, {"steps": jnp.asarray(counts, jnp.int32), "gap": gap,
                "converged": jnp.ones((b,), bool), "breakpoints": bps}
