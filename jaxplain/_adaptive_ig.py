"""Integrated Gradients to a requested completeness tolerance (private; see integrated.py).

Nested trapezoid rules: level L has the 2^L + 1 nodes k / 2^L; level L + 1 adds the 2^L
midpoints and reuses every gradient already evaluated (the endpoints' forward passes give
out(x') and out(x) for the gap at no extra cost). Example b stops at the first level where

  |gap_b| = |sum_i IG_i - (out(x)[t] - out(x')[t])| <= max(tol * |out(x)[t] - out(x')[t]|, atol)

and reports its steps (nodes evaluated, 2^L + 1) and final gap. Two drivers:

- ``"while"``: a bounded ``lax.while_loop`` over levels (a ``lax.switch`` holds one branch per
  level, each with its static node count); pure, usable under ``jit``. Every iteration
  computes all B examples (converged ones are frozen, not skipped), and the loop stops when
  all have converged.
- ``"host"``: a Python loop over levels; each level is one jitted call on the examples not yet
  converged only (their count padded to a power of two to bound recompiles), so converged
  examples stop costing. It calls ``jax.jit`` itself (it is a driver) and cannot run under
  ``jit``.

Which is faster here (benchmarks/bench_ig_accuracy.md, 2-core CPU under load ~10, batch 8,
separate processes): on the trained LeNet the host driver, 2.5x at tol = 1 % (0.25 vs
0.63 s) and 3.2x at 0.1 % (1.15 vs 3.64 s); on the SmallCNN at 1 % about even (while 17.5 s,
host 19.1 s, one partial round). Two reasons: the while driver's levels run inside
``lax.while_loop`` / ``lax.switch``, where XLA:CPU does not send convolutions to its fast
kernels (the same 2-3.5x as ``loop="scan"`` in integrated.py), and it evaluates every example
until the slowest has converged, while the host driver's levels are top-level jitted calls on
the unconverged examples only. The host driver pays a device-host round trip per level and
one compile per (level, power-of-two batch), so it gains least when all examples converge at
the same level. Use ``driver="host"`` outside ``jit``; ``"while"`` where IG must be traced.

A third driver, ``"local"`` (:func:`adaptive_ig_local`), gives up the nested uniform levels:
each example bisects only the intervals with the largest local gaps, so its nodes gather at
the jumps of a ReLU network's integrand instead of everywhere. On the trained LeNet (batch 8,
bench_ig_accuracy --quick, 2026-12-04, separate processes) it needed a median of 7 / 15 nodes
per example (max 12 / 21) at tol = 1 % / 0.1 %, where uniform doubling needed 17 / 129 (max
65 / 1,025) and Captum's Gauss-Legendre 64 / 256 for the batch: 1.75x / 4.22x faster than
Captum and 2.1x / 11.8x faster than the host driver. Its rounds are small calls (133-141 %
CPU), so per row it is slower than Captum's one large call; it wins on rows.

SPEC.md section 10.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _validate
from jaxplain.gradients import _grad_rows, _output_value

Array = jax.Array
Fn = Callable[[Array], Array]

DRIVERS = ("while", "host", "local")


def _levels(min_steps: int, max_steps: int) -> tuple[int, int]:
  if not isinstance(min_steps, (int, np.integer)) or min_steps < 2:
    raise ValueError(f"min_steps: expected an int >= 2, got {min_steps!r}")
  if not isinstance(max_steps, (int, np.integer)) or max_steps < min_steps:
    raise ValueError(f"max_steps: expected an int >= min_steps = {min_steps}, "
                     f"got {max_steps!r}")
  l0 = max(1, math.ceil(math.log2(min_steps - 1)))
  lmax = max(l0, int(math.floor(math.log2(max_steps - 1))))
  return l0, lmax


def _node_sum(f: Fn, base: Array, diff: Array, t: Array, alphas: np.ndarray, output: str,
              chunk: int | None, dtype: Any, with_logits: bool = False):
  """sum_k grad out[t](x' + a_k (x - x')) over the static nodes ``alphas``, (B, ...).

  ``chunk`` nodes go through ``f`` per call; more nodes run in a ``lax.scan`` over chunks.
  With ``with_logits`` (one chunk only) also returns the logits (n, B, K).
  """
  b = base.shape[0]
  n = len(alphas)
  c = n if (chunk is None or n <= chunk or n % chunk) else chunk
  bshape = (1,) * base.ndim

  def one(a):
    pts = base[None] + a.reshape((c,) + bshape) * diff[None]
    pts = pts.reshape((c * b,) + base.shape[1:]).astype(dtype)
    logits, g = _grad_rows(f, pts, jnp.tile(t, c), output)
    return jnp.sum(g.reshape((c,) + base.shape).astype(base.dtype), axis=0), logits

  a_all = jnp.asarray(alphas, base.dtype)
  if c == n:
    s, logits = one(a_all)
    return (s, logits.reshape((n, b, -1))) if with_logits else s

  def body(acc, a):
    return acc + one(a)[0], None

  total, _ = jax.lax.scan(body, jnp.zeros_like(base), a_all.reshape(n // c, c))
  return total


def _start(f, base, diff, t, output, chunk, dtype, l0):
  """Endpoints and the interior of level l0: (s_end, s_int, delta)."""
  g0, logits0 = _node_sum(f, base, diff, t, np.array([0.0]), output, None, dtype,
                          with_logits=True)
  g1, logits1 = _node_sum(f, base, diff, t, np.array([1.0]), output, None, dtype,
                          with_logits=True)
  _validate.check_logits(logits0[0], base.shape[0])
  out0 = _output_value(logits0[0], t, output).astype(base.dtype)
  out1 = _output_value(logits1[0], t, output).astype(base.dtype)
  interior = np.arange(1, 2 ** l0) / 2 ** l0
  s_int = _node_sum(f, base, diff, t, interior, output, chunk, dtype)
  return 0.5 * (g0 + g1), s_int, out1 - out0


def _midpoints(level: int) -> np.ndarray:
  return (2 * np.arange(2 ** (level - 1)) + 1) / 2 ** level


def _gap(diff, s_end, s_int, level, delta):
  b = diff.shape[0]
  h = jnp.exp2(-level.astype(diff.dtype)).reshape((b,) + (1,) * (diff.ndim - 1))
  attr = diff * (s_end + s_int) * h
  return attr, jnp.sum(attr.reshape(b, -1), axis=1) - delta


def adaptive_ig_while(f, base, diff, t, output, chunk, dtype, tol, atol, l0, lmax):
  """The jit-compatible driver: returns (attr, steps, gap, converged)."""
  b = base.shape[0]
  s_end, s_int, delta = _start(f, base, diff, t, output, chunk, dtype, l0)
  thr = jnp.maximum(tol * jnp.abs(delta), atol)
  level = jnp.full((b,), l0, jnp.int32)
  _, gap = _gap(diff, s_end, s_int, level, delta)
  done = jnp.abs(gap) <= thr
  branches = [functools.partial(_node_sum, f, base, diff, t, _midpoints(lv), output, chunk,
                                dtype) for lv in range(l0 + 1, lmax + 1)]

  def cond(st):
    lv, _, done, _, _ = st
    return (lv < lmax) & ~jnp.all(done)

  def body(st):
    lv, s_int, done, level, gap = st
    lv = lv + 1
    new = jax.lax.switch(lv - l0 - 1, [lambda br=br: br() for br in branches])
    keep = done.reshape((b,) + (1,) * (base.ndim - 1))
    s_int = jnp.where(keep, s_int, s_int + new)
    level = jnp.where(done, level, lv)
    _, gap = _gap(diff, s_end, s_int, level, delta)
    return lv, s_int, done | (jnp.abs(gap) <= thr), level, gap

  if branches:
    _, s_int, done, level, gap = jax.lax.while_loop(
        cond, body, (jnp.int32(l0), s_int, done, level, gap))
  attr, gap = _gap(diff, s_end, s_int, level, delta)
  return attr, 2 ** level + 1, gap, done


@functools.partial(jax.jit, static_argnames=("f", "output", "chunk", "dtype", "l0"))
def _host_start(base, diff, t, *, f, output, chunk, dtype, l0):
  return _start(f, base, diff, t, output, chunk, dtype, l0)


@functools.partial(jax.jit, static_argnames=("f", "output", "chunk", "dtype", "level"))
def _host_level(base, diff, t, *, f, output, chunk, dtype, level):
  return _node_sum(f, base, diff, t, _midpoints(level), output, chunk, dtype)


def adaptive_ig_host(f, base, diff, t, output, chunk, dtype, tol, atol, l0, lmax):
  """The host driver: only examples not yet converged are evaluated at each level."""
  if not all(_validate.is_concrete(a) for a in (base, diff, t)):
    raise ValueError("driver: 'host' runs a Python loop over levels and cannot be traced "
                     "(jit / vmap); use driver='while' inside jax.jit")
  b = base.shape[0]
  kw = dict(f=f, output=output, chunk=chunk, dtype=dtype)
  s_end, s_int, delta = _host_start(base, diff, t, l0=l0, **kw)
  s_int = np.array(s_int)
  thr = np.maximum(tol * np.abs(np.asarray(delta)), atol)
  level = np.full((b,), l0, np.int32)
  _, gap = _gap(diff, s_end, jnp.asarray(s_int), jnp.asarray(level), delta)
  gap = np.array(gap)
  done = np.abs(gap) <= thr
  for lv in range(l0 + 1, lmax + 1):
    active = np.flatnonzero(~done)
    if active.size == 0:
      break
    bucket = min(b, 1 << int(math.ceil(math.log2(active.size))))
    idx = np.concatenate([active, np.full(bucket - active.size, active[0])])
    new = _host_level(base[idx], diff[idx], t[idx], level=lv, **kw)
    s_int[active] += np.asarray(new)[:active.size]
    level[active] = lv
    _, g_a = _gap(diff[active], s_end[active], jnp.asarray(s_int[active]),
                  jnp.asarray(level[active]), delta[active])
    gap[active] = np.asarray(g_a)
    done[active] = np.abs(gap[active]) <= thr[active]
  attr, gap = _gap(diff, s_end, jnp.asarray(s_int), jnp.asarray(level), delta)
  return attr, jnp.asarray(2 ** level + 1), gap, jnp.asarray(done)


# ---- driver "local": adaptive subdivision where the integrand changes ----------------------

# At most this share of an example's intervals is bisected per round (at least one). Trained
# LeNet, batch 8, tol 0.1 %, one process (2026-12-04): share 1: 962 nodes in all, 774 ms;
# 1/2: 251, 159 ms; 1/4: 152, 130 ms; 1/8: 113, 82-105 ms; 1/16: 113, 93 ms. Bisecting fewer
# intervals per round spends fewer nodes on intervals whose local gap was an early overestimate.
_ROUND_SHARE = 0.125


@functools.partial(jax.jit, static_argnames=("f", "output", "dtype"))
def _host_rows(base, diff, t, rows, alpha, *, f, output, dtype):
  """Rows (example r, node a): out[t_r] and the gradient at x'_r + a (x_r - x'_r)."""
  base, diff, t = base[rows], diff[rows], t[rows]  # the gather inside jit: no eager dispatch
  a = alpha.reshape((-1,) + (1,) * (base.ndim - 1)).astype(base.dtype)
  logits, g = _grad_rows(f, (base + a * diff).astype(dtype), t, output)
  return _output_value(logits, t, output).astype(base.dtype), g.astype(base.dtype)


def adaptive_ig_local(f, base, diff, t, output, chunk, dtype, tol, atol, l0, max_steps):
  """The host driver with local refinement: returns (attr, steps, gap, converged).

  Each example keeps its own sorted nodes a_0 = 0 < ... < a_n = 1 with the target output
  F_k = out[t](x' + a_k dx) and the path derivative D_k = grad_k . dx (both from the gradient
  evaluation itself). On an interval [a, b] the trapezoid rule's share of the completeness
  gap is the local gap e = (b - a) / 2 (D_a + D_b) - (F_b - F_a), and the example's gap is
  exactly sum e. Each round bisects, in every unconverged example, the intervals whose |e| is
  over their share of the tolerance, thr / (number of intervals), the largest first and at
  most an eighth of them (when none is over its share, |sum e| <= thr: converged), so nodes
  gather where the integrand jumps (a ReLU or max-pool switch along the path) instead of
  everywhere. All new nodes of a round go through ``f`` as rows (example, node) in calls of
  at most ``B * (chunk or 8)`` rows, padded to a power of two to bound recompiles. Memory:
  every node's gradient is kept on the host until the end (steps x input size per example).
  """
  if not all(_validate.is_concrete(a) for a in (base, diff, t)):
    raise ValueError("driver: 'local' runs a Python loop over refinements and cannot be "
                     "traced (jit / vmap); use driver='while' inside jax.jit")
  b = base.shape[0]
  flat = np.asarray(diff).reshape(b, -1).astype(np.float64)
  kw = dict(f=f, output=output, dtype=dtype)
  cap = b * (chunk or 8)
  # per example: sorted nodes, out[t] and path derivative there (float64), and the gradients
  nodes = [np.zeros(0) for _ in range(b)]
  fval = [np.zeros(0) for _ in range(b)]
  deriv = [np.zeros(0) for _ in range(b)]
  grads = [np.zeros((0,) + base.shape[1:], base.dtype) for _ in range(b)]

  def add(rows, alphas):
    """Evaluates the nodes ``alphas`` of examples ``rows`` (padded calls) and merges them."""
    outs, gs = [], []
    for s in range(0, len(rows), cap):
      r, a = rows[s:s + cap], alphas[s:s + cap]
      pad = (1 << int(math.ceil(math.log2(len(r))))) - len(r)
      o, g = _host_rows(base, diff, t, jnp.asarray(np.concatenate([r, np.full(pad, r[0])]),
                                                   jnp.int32),
                        jnp.asarray(np.concatenate([a, np.zeros(pad, a.dtype)])), **kw)
      outs.append(np.asarray(o)[:len(r)])
      gs.append(np.asarray(g)[:len(r)])
    out, g = np.concatenate(outs), np.concatenate(gs)
    for i in np.unique(rows):
      sel = rows == i
      order = np.argsort(np.concatenate([nodes[i], alphas[sel]]), kind="stable")
      d_new = g[sel].reshape(int(sel.sum()), -1).astype(np.float64) @ flat[i]
      nodes[i] = np.concatenate([nodes[i], alphas[sel]])[order]
      fval[i] = np.concatenate([fval[i], out[sel].astype(np.float64)])[order]
      deriv[i] = np.concatenate([deriv[i], d_new])[order]
      grads[i] = np.concatenate([grads[i], g[sel]])[order]

  a0 = np.arange(2 ** l0 + 1) / 2 ** l0
  add(np.repeat(np.arange(b), len(a0)), np.tile(a0, b))
  delta = np.array([fv[-1] - fv[0] for fv in fval])
  thr = np.maximum(tol * np.abs(delta), atol)
  done = np.zeros(b, bool)
  while True:
    new_rows, new_alpha = [], []
    for i in range(b):
      if done[i]:
        continue
      h = np.diff(nodes[i])
      e = h / 2 * (deriv[i][:-1] + deriv[i][1:]) - np.diff(fval[i])
      if abs(e.sum()) <= thr[i]:
        done[i] = True
        continue
      room = max_steps - len(nodes[i])
      if room <= 0:  # out of nodes: reported as not converged
        continue
      # the intervals over their share of the tolerance (if none were, |sum e| <= thr), the
      # largest first, at most _ROUND_SHARE of them per round
      over = np.abs(e) > thr[i] / len(e)
      k = min(int(over.sum()), max(1, int(len(e) * _ROUND_SHARE)), room)
      pick = np.argsort(-np.abs(e), kind="stable")[:k]
      new_rows.append(np.full(k, i))
      new_alpha.append((nodes[i][pick] + nodes[i][pick + 1]) / 2)
    if not new_rows:
      break
    add(np.concatenate(new_rows), np.concatenate(new_alpha))
  # the trapezoid weights of each example's nodes: half of each neighbouring interval
  s = np.stack([np.tensordot(np.convolve(np.diff(nodes[i]) / 2, [1.0, 1.0]).astype(
      grads[i].dtype), grads[i], axes=1) for i in range(b)])
  attr = jnp.asarray(np.asarray(diff) * s)
  gap = jnp.sum(attr.reshape(b, -1), axis=1) - jnp.asarray(delta, attr.dtype)
  steps = jnp.asarray([len(n) for n in nodes], jnp.int32)
  return attr, steps, gap, jnp.asarray(done)
