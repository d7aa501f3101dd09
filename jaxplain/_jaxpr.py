"""A jaxpr interpreter for modified back-propagation (private; used by ``jaxplain.rules``).

The engine traces ``f`` to a jaxpr and evaluates it equation by equation, carrying for every
variable a :class:`Val`:

* ``p`` -- the primal value at the input ``x`` (ordinary JAX ops, so differentiable with
  respect to anything ``f`` closes over, e.g. the parameters);
* ``r`` -- the primal value at the reference input (DeepLIFT only, else equal to ``p``);
* ``t`` -- a *modified tangent*: a linear function of the input perturbation ``dx`` built
  with the rule of the method instead of the true derivative, or ``None`` when the variable
  does not depend on ``x`` through a differentiable path (constants, parameters, anything
  under ``stop_gradient``, integer and boolean values).
* ``dep`` -- whether the value depends on ``x`` at all (so the reference pass recomputes it).

Equations are classified by the primitive:

* linear in their input-dependent operands (dot_general / conv with a constant other operand,
  add/sub, mul/div by a constant, reshape, transpose, broadcast, slicing, concatenate, pad,
  reduce_sum, ...) and piecewise-linear routing primitives (reduce_max, reduce_window_max,
  select_n, max of two independent terms): the tangent is JAX's own JVP at the primal point,
  so biases (constant operands of add) drop out and max-pooling routes to the arg-max;
* an elementwise nonlinearity ``y = g(v)`` of ONE input-dependent operand (a primitive such
  as tanh or max(v, 0), a ``jit`` / ``custom_jvp`` call whose body is elementwise -- e.g.
  ``jax.nn.relu``, ``jax.nn.silu`` -- or an elementwise sub-graph such as the inlined
  ``jax.nn.gelu``, found as the nearest common elementwise ancestor of a product of two
  input-dependent factors): the tangent is ``m * t_v`` with the multiplier ``m`` of the rule;
* call primitives that are not elementwise are inlined;
* anything else that touches an input-dependent value raises :class:`UnsupportedPrimitiveError`
  naming the primitive and the source line.

Because the tangent is linear in ``dx``, ``jax.vjp`` of it gives the modified gradient at the
cost of one backward pass, and since the multipliers are ordinary functions of the primal
values, the result is differentiable (to any order) with respect to the parameters.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal, Var

Array = Any


class UnsupportedPrimitiveError(NotImplementedError):
  """A primitive with no modified-backprop rule was applied to an input-dependent value."""


class Val(NamedTuple):
  p: Array
  r: Array
  t: Array | None
  dep: bool


# ------------------------------------------------------------------------------------------
# primitive tables

_CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint", "remat2", "custom_lin"}

# elementwise and linear in the input-dependent operands (for mul/div: see _classify).
_LINEAR_EW = {"add", "sub", "neg", "add_any", "convert_element_type", "copy", "copy_p",
              "reduce_precision", "real", "imag", "complex", "conj", "select_n"}

# elementwise primitives that are nonlinear in their input-dependent operand(s).
_NONLINEAR_EW = {
    "tanh", "logistic", "exp", "exp2", "log", "log1p", "expm1", "sin", "cos", "tan", "asin",
    "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "erf",
    "erfc", "erf_inv", "abs", "sign", "floor", "ceil", "round", "integer_pow", "pow", "max",
    "min", "square", "clamp", "atan2", "rem", "lgamma", "digamma", "mul", "div", "nextafter",
    "is_finite", "logaddexp"}

# elementwise primitives that only ever see constants or produce booleans (allowed in bodies).
_OTHER_EW = {"eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor"}

_ELEMENTWISE = _LINEAR_EW | _NONLINEAR_EW | _OTHER_EW

# structural / linear primitives whose JVP is the (linear) map itself.
_LINEAR_STRUCT = {
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "concatenate",
    "slice", "dynamic_slice", "dynamic_update_slice", "gather", "scatter-add", "scatter_add",
    "scatter", "pad", "reduce_sum", "rev", "cumsum", "reduce_window_sum", "split",
    "sharding_constraint", "mesh_cast", "dot_general", "conv_general_dilated", "copy",
    "optimization_barrier", "squeeze_p", "transpose_p"}

# piecewise-linear primitives whose JVP routes the tangent to the selected element (max-pool).
_ROUTE = {"reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min", "cummax",
          "cummin", "argsort"}

# bilinear primitives: linear only when exactly one operand is input-dependent.
_BILINEAR = {"dot_general", "conv_general_dilated", "mul"}


def _where(eqn) -> str:
  try:
    from jax._src import source_info_util  # pylint: disable=g-import-not-at-top
    return source_info_util.summarize(eqn.source_info)
  except Exception:  # pragma: no cover - best effort only
    return "unknown location"


def _unsupported(eqn, rule: str, why: str) -> UnsupportedPrimitiveError:
  return UnsupportedPrimitiveError(
      f"{rule}: no rule for primitive '{eqn.primitive.name}' {why} (at {_where(eqn)}). "
      "Supported: linear maps (dot_general, conv, add/sub, mul/div by constants, reshape, "
      "transpose, broadcast, slicing, concatenate, pad, reduce_sum, ...), max/avg pooling, "
      "elementwise nonlinearities of one input-dependent operand (or jitted elementwise "
      "functions such as jax.nn.gelu/silu). Wrap a custom elementwise activation in jax.jit "
      "so that it is seen as one nonlinearity.")


def bind(eqn, vals: Sequence[Array]) -> list[Array]:
  """Apply ``eqn``'s primitive to ``vals`` (as ``jax.core.eval_jaxpr`` does)."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*vals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _call_body(eqn):
  """(jaxpr, consts) of a call primitive's body."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in eqn.params:
      body = eqn.params[key]
      if hasattr(body, "jaxpr"):  # ClosedJaxpr
        return body.jaxpr, body.consts
      return body, ()
  raise _unsupported(eqn, "rule engine", "(call primitive without a readable body)")


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _elementwise_body(jaxpr, active: Sequence[bool]) -> bool:
  """True when every equation of ``jaxpr`` touching an active input is elementwise and
  shape-preserving, so that the body is an elementwise function of its active input."""
  act = {v for v, a in zip(jaxpr.invars, active) if a}
  shapes = {tuple(v.aval.shape) for v in act}
  if len(shapes) != 1:
    return False
  (shape,) = shapes
  for eqn in jaxpr.eqns:
    ins = [isinstance(v, Var) and v in act for v in eqn.invars]
    if not any(ins):
      continue
    name = eqn.primitive.name
    if name in _CALLS:
      body, _ = _call_body(eqn)
      if not _elementwise_body(body, ins):
        return False
    elif name not in _ELEMENTWISE:
      return False
    for o in eqn.outvars:
      if tuple(o.aval.shape) != shape:
        return False
      act.add(o)
  return len(jaxpr.outvars) == 1 and isinstance(jaxpr.outvars[0], Var) and (
      jaxpr.outvars[0] in act)


# positively homogeneous elementwise functions (g(a v) = a g(v) for a > 0: ReLU, leaky ReLU,
# |v|, ...): their WBP factor g(v) / v is piecewise constant in v, so its derivative is zero
# wherever it is defined and the factor can be treated as a constant under differentiation.

# classes of values: homogeneous in v / scale-invariant in v (built from signs of v) / a
# literal constant / anything else from outside (may depend on the parameters, e.g. a PReLU
# slope: then g(v) / v does too, and is not treated as a constant)
_LIN, _INV, _CONST, _EXT = "lin", "inv", "const", "ext"


def _is_zero_literal(v) -> bool:
  if not isinstance(v, Literal):
    return False
  try:  # NumPy, not jnp: under an outer trace jnp would stage the comparison out
    return bool(np.all(np.asarray(v.val) == 0))
  except Exception:  # pragma: no cover - abstract literal
    return False


def _homogeneous_eqn(eqn, kinds: list) -> str | None:
  """Class of ``eqn``'s outputs given its operands' classes, None if it breaks homogeneity."""
  name = eqn.primitive.name
  lit0 = [_is_zero_literal(v) for v in eqn.invars]
  if all(k == _CONST for k in kinds):
    return _CONST
  if all(k in (_CONST, _EXT) for k in kinds):
    return _EXT
  if _EXT in kinds:
    return None
  if name in _CALLS:
    body, _ = _call_body(eqn)
    return _homogeneous_body(body, kinds)
  if all(k in (_INV, _CONST) for k in kinds):
    return _INV if name in _ELEMENTWISE else None  # e.g. convert(v > 0) * 2
  lin = [k == _LIN for k in kinds]
  if name in ("neg", "abs", "convert_element_type", "copy", "copy_p"):
    return _LIN
  if name in ("add", "sub", "add_any", "max", "min"):
    return _LIN if all(l or z for l, z in zip(lin, lit0)) else None
  if name == "mul":
    return _LIN if sum(lin) == 1 else None
  if name == "div":
    return _LIN if lin == [True, False] else None
  if name == "sign":
    return _INV
  if name in ("gt", "ge", "lt", "le", "eq", "ne"):
    return _INV if all(l or z for l, z in zip(lin, lit0)) else None
  if name == "select_n":
    cases = kinds[1:]
    ok = kinds[0] != _LIN and all(k == _LIN or z for k, z in zip(cases, lit0[1:]))
    return _LIN if ok else None
  return None


def _homogeneous_body(jaxpr, kinds: list) -> str | None:
  env = dict(zip(jaxpr.invars, kinds))

  def kind(v):
    return _CONST if isinstance(v, Literal) else env.get(v, _EXT)

  for eqn in jaxpr.eqns:
    out = _homogeneous_eqn(eqn, [kind(v) for v in eqn.invars])
    if out is None:
      return None
    for o in eqn.outvars:
      env[o] = out
  if len(jaxpr.outvars) != 1:
    return None
  return kind(jaxpr.outvars[0])


def positively_homogeneous(eqn, active: Sequence[bool]) -> bool:
  """True when ``eqn`` (one input-dependent operand) is provably positively homogeneous of
  degree 1 in it (a ReLU, leaky ReLU, |v|, ...) with no other non-literal operand, judged
  from its primitives alone."""
  kinds = [_LIN if a else (_CONST if isinstance(v, Literal) else _EXT)
           for v, a in zip(eqn.invars, active)]
  return _homogeneous_eqn(eqn, kinds) == _LIN


# ------------------------------------------------------------------------------------------
# multipliers (the rules)


class Rule(NamedTuple):
  """Which method: 'wbp', 'lrp' or 'deeplift', and its parameters."""
  name: str
  epsilon: float = 0.0


def _slope(g: Callable, v: Array) -> Array:
  """Elementwise derivative g'(v) (g elementwise, so a JVP with ones gives the diagonal)."""
  return jax.jvp(g, (v,), (jnp.ones_like(v),))[1]


def multiplier(rule: Rule, g: Callable, v: Array, y: Array, vr: Array, yr: Array) -> Array:
  """The local factor m of an elementwise nonlinearity y = g(v) (tangent out = m * tangent in).

  * WBP (seed 004, Table 1): h(v) = (g(v) - g(0)) / v, the limit g'(0) at v = 0. For g(0) = 0
    (ReLU, tanh, GELU, SiLU, ...) this is exactly Table 1's g(v) / v. For g(0) != 0 (sigmoid,
    exp) g(v) / v is unbounded near 0; the constant g(0) is treated like a bias and dropped
    (it does not interact with the input), which is the rescale multiplier against a zero
    pre-activation. For ReLU, h(0) = relu'(0) = 0 as in JAX's gradient (Table 1 writes
    1[v >= 0]; the two differ only at exactly v = 0).
  * DeepLIFT rescale: (g(v) - g(v_ref)) / (v - v_ref), the limit g'(v) when v ~ v_ref.
  * LRP-epsilon: g(v) / (v + eps * sign(v)) (sign(0) = +1), i.e. the relevance passes the
    activation unchanged and the epsilon-stabilised division by z = v happens here (see
    ``jaxplain.rules.lrp``).
  """
  dt = jnp.result_type(v)
  finfo = jnp.finfo(dt)
  if rule.name == "wbp":
    zero = jnp.zeros_like(v)
    g0, d0 = jax.jvp(g, (zero,), (jnp.ones_like(v),))
    tol = jnp.where(g0 == 0, finfo.tiny, jnp.sqrt(finfo.eps))
    small = jnp.abs(v) <= tol
    vs = jnp.where(small, jnp.ones_like(v), v)
    return jnp.where(small, d0, (y - g0) / vs)
  if rule.name == "deeplift":
    dv = v - vr
    tol = jnp.sqrt(finfo.eps) * jnp.maximum(1.0, jnp.abs(v))
    small = jnp.abs(dv) <= tol
    dvs = jnp.where(small, jnp.ones_like(dv), dv)
    return jnp.where(small, _slope(g, v), (y - yr) / dvs)
  if rule.name == "lrp":
    den = v + rule.epsilon * jnp.where(v >= 0, 1.0, -1.0).astype(dt)
    zero = den == 0
    return jnp.where(zero, jnp.zeros_like(v), y / jnp.where(zero, jnp.ones_like(den), den))
  raise ValueError(f"unknown rule {rule.name!r}")


# ------------------------------------------------------------------------------------------
# the interpreter


class _Scope:
  """Per-jaxpr bookkeeping of elementwise ancestry (to find elementwise sub-graphs)."""

  def __init__(self):
    self.anc: dict[Var, tuple] = {}  # var -> nearest-first elementwise ancestors
    self.ew_eqns: list = []  # elementwise equations on input-dependent values, in order


_MAX_ANC = 64


def evaluate(eqns, invars, constvars, outvars, consts, args: Sequence[Val],
             rule: Rule, with_ref: bool) -> list[Val]:
  """Evaluate a jaxpr (given by its parts) on :class:`Val` arguments."""
  env: dict[Var, Val] = {}

  def read(v) -> Val:
    if isinstance(v, Literal):
      return Val(v.val, v.val, None, False)
    return env[v]

  for v, c in zip(constvars, consts):
    env[v] = Val(c, c, None, False)
  for v, a in zip(invars, args):
    env[v] = a
  scope = _Scope()
  for eqn in eqns:
    ins = [read(v) for v in eqn.invars]
    outs = _eval_eqn(eqn, ins, rule, with_ref, scope, env)
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in outvars]


def _inactive_outs(ps, rs, dep) -> list[Val]:
  return [Val(p, r, None, dep) for p, r in zip(ps, rs)]


def _eval_eqn(eqn, ins: list[Val], rule: Rule, with_ref: bool, scope: _Scope,
              env) -> list[Val]:
  name = eqn.primitive.name
  dep = any(i.dep for i in ins)
  if not dep:
    ps = bind(eqn, [i.p for i in ins])
    return _inactive_outs(ps, ps, False)
  active = [i.t is not None for i in ins]

  def ref_outs():
    return bind(eqn, [i.r for i in ins]) if with_ref else None

  int_out = not any(jnp.issubdtype(o.aval.dtype, jnp.inexact) for o in eqn.outvars)
  if not any(active) or name == "stop_gradient" or int_out:
    ps = bind(eqn, [i.p for i in ins])
    rs = ref_outs() if with_ref else ps
    return _inactive_outs(ps, rs, True)

  n_act = sum(active)
  if name in _CALLS:
    body, consts = _call_body(eqn)
    if (n_act == 1 and len(eqn.outvars) == 1 and _elementwise_body(body, active)
        and tuple(eqn.outvars[0].aval.shape) == tuple(
            eqn.invars[active.index(True)].aval.shape)):
      k = active.index(True)
      outs = _nonlinearity(eqn, ins, k, lambda v: bind(eqn, _subst(ins, k, v))[0], rule,
                           with_ref)
      _record_ew(scope, eqn, ins, active)
      return outs
    return evaluate(body.eqns, body.invars, body.constvars, body.outvars, consts, ins, rule,
                    with_ref)

  if name in _ELEMENTWISE:
    linear = (name in _LINEAR_EW or (name == "mul" and n_act == 1)
              or (name == "div" and active == [True, False]))
    if linear:
      outs = _linear(eqn, ins, active, with_ref)
    elif n_act == 1:
      k = active.index(True)
      outs = _nonlinearity(eqn, ins, k, lambda v: bind(eqn, _subst(ins, k, v))[0], rule,
                           with_ref)
    else:
      root = _common_root(scope, eqn, active)
      if root is not None:
        outs = _region(eqn, ins, root, scope, env, rule, with_ref)
      elif name in ("max", "min"):
        outs = _linear(eqn, ins, active, with_ref)  # routes like the gradient
      else:
        raise _unsupported(
            eqn, rule.name,
            f"with {n_act} input-dependent operands that are not elementwise functions of a "
            "common input-dependent value (e.g. a product of two different activations)")
    _record_ew(scope, eqn, ins, active)
    return outs

  if name in _LINEAR_STRUCT or name in _ROUTE:
    if name in _BILINEAR and n_act > 1:
      raise _unsupported(eqn, rule.name,
                         "with both operands input-dependent (a bilinear map is not linear)")
    return _linear(eqn, ins, active, with_ref)

  raise _unsupported(eqn, rule.name, "applied to an input-dependent value")


def _subst(ins: list[Val], k: int, v: Array) -> list[Array]:
  vals = [i.p for i in ins]
  vals[k] = v
  return vals


# A convolution whose input-dependent operand has at most this many channels carries its
# modified tangent as patches @ kernel (an explicit im2col, see ``_conv_tangent``).
PATCH_CONV_MAX_CHANNELS = 8


def _patch_conv_ok(eqn, active: list[bool]) -> bool:
  if eqn.primitive.name != "conv_general_dilated" or active != [True, False]:
    return False
  prm = eqn.params
  lhs = eqn.invars[0].aval
  dn = prm["dimension_numbers"]
  return (lhs.ndim == 4 and prm["feature_group_count"] == 1 and prm["batch_group_count"] == 1
          and all(d == 1 for d in prm["lhs_dilation"])
          and all(d == 1 for d in prm["rhs_dilation"])
          and all(lo >= 0 and hi >= 0 for lo, hi in prm["padding"])
          and prm.get("preferred_element_type") is None
          and lhs.shape[dn.lhs_spec[1]] <= PATCH_CONV_MAX_CHANNELS)


def _conv_tangent(eqn, t: Array, w: Array) -> Array:
  """The linear map ``t -> conv(t, w)`` of ``eqn`` written as an explicit im2col: shifted
  strided slices of the padded input stacked into patches, then one ``dot_general`` with the
  flattened kernel. Same values as the convolution; its transpose (the backward pass) is a
  dot followed by padded additions instead of a convolution with few output channels, which
  XLA's CPU backend runs several times slower (the first layer of an image model), and so
  are the second-order terms of PPI."""
  prm = eqn.params
  dn = prm["dimension_numbers"]
  (plh, phh), (plw, phw) = prm["padding"]
  sh, sw = prm["window_strides"]
  x = jnp.transpose(t, (dn.lhs_spec[0], dn.lhs_spec[2], dn.lhs_spec[3], dn.lhs_spec[1]))
  k = jnp.transpose(w, (dn.rhs_spec[2], dn.rhs_spec[3], dn.rhs_spec[1], dn.rhs_spec[0]))
  kh, kw, c, o = k.shape
  x = jnp.pad(x, ((0, 0), (plh, phh), (plw, phw), (0, 0)))
  n, h, wd, _ = x.shape
  ho, wo = (h - kh) // sh + 1, (wd - kw) // sw + 1
  cols = [jax.lax.slice(x, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                        (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  patches = jnp.stack(cols, axis=3).reshape(n, ho, wo, kh * kw * c)
  y = jax.lax.dot_general(patches, k.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())),
                          precision=prm.get("precision"))
  # NHWC -> the output layout of eqn
  perm = [0] * 4
  for src, dst in zip((0, 1, 2, 3), (dn.out_spec[0], dn.out_spec[2], dn.out_spec[3],
                                     dn.out_spec[1])):
    perm[dst] = src
  return jnp.transpose(y, perm).astype(eqn.outvars[0].aval.dtype)


def _linear(eqn, ins: list[Val], active: list[bool], with_ref: bool) -> list[Val]:
  if _patch_conv_ok(eqn, active):
    (p,) = bind(eqn, [i.p for i in ins])
    r = bind(eqn, [i.r for i in ins])[0] if with_ref else p
    return [Val(p, r, _conv_tangent(eqn, ins[0].t, ins[1].p), True)]
  idx = [k for k, a in enumerate(active) if a]
  base = [i.p for i in ins]

  def fn(*a):
    vals = list(base)
    for k, ak in zip(idx, a):
      vals[k] = ak
    return bind(eqn, vals)

  ps, ts = jax.jvp(fn, [ins[k].p for k in idx], [ins[k].t for k in idx])
  rs = bind(eqn, [i.r for i in ins]) if with_ref else ps
  return [Val(p, r, t if _is_float(p) else None, True) for p, r, t in zip(ps, rs, ts)]


def _nonlinearity(eqn, ins: list[Val], k: int, g: Callable, rule: Rule,
                  with_ref: bool) -> list[Val]:
  (p,) = bind(eqn, [i.p for i in ins])
  r = bind(eqn, [i.r for i in ins])[0] if with_ref else p
  v = ins[k]
  m = multiplier(rule, g, v.p, p, v.r, r)
  if rule.name == "wbp" and positively_homogeneous(eqn, [i == k for i in range(len(ins))]):
    # g(v) / v is piecewise constant (ReLU: 1[v > 0]): its exact derivative is zero, so
    # differentiating it (PPI's second order) would only add a backward pass through the
    # network that sums to zero. Same value, no gradient path.
    m = jax.lax.stop_gradient(m)
  return [Val(p, r, (m * v.t).astype(jnp.result_type(p)), True)]


def _record_ew(scope: _Scope, eqn, ins: list[Val], active: list[bool]) -> None:
  avars = [v for v, a in zip(eqn.invars, active) if a]
  if not avars:
    return
  chains = [(v,) + scope.anc.get(v, ()) for v in avars]
  common = set(chains[0])
  for c in chains[1:]:
    common &= set(c)
  anc = tuple(v for v in chains[0] if v in common)[:_MAX_ANC]
  for o in eqn.outvars:
    scope.anc[o] = anc
  scope.ew_eqns.append(eqn)


def _common_root(scope: _Scope, eqn, active: list[bool]):
  avars = [v for v, a in zip(eqn.invars, active) if a]
  chains = [(v,) + scope.anc.get(v, ()) for v in avars]
  common = set(chains[0])
  for c in chains[1:]:
    common &= set(c)
  for v in chains[0]:
    if v in common:
      return v
  return None


def _region(eqn, ins: list[Val], root, scope: _Scope, env, rule: Rule,
            with_ref: bool) -> list[Val]:
  """``eqn`` combines several elementwise functions of ``root``: treat the sub-graph from
  ``root`` to ``eqn``'s output as ONE elementwise nonlinearity (e.g. an inlined GELU)."""
  members = [e for e in scope.ew_eqns if any(
      isinstance(o, Var) and (root in scope.anc.get(o, ())) for o in e.outvars)]

  def g(v):
    local = {root: v}

    def rd(x):
      if isinstance(x, Literal):
        return x.val
      return local[x] if x in local else env[x].p

    for e in members + [eqn]:
      if not any(isinstance(x, Var) and x in local for x in e.invars):
        continue
      for o, val in zip(e.outvars, bind(e, [rd(x) for x in e.invars])):
        local[o] = val
    return local[eqn.outvars[0]]

  (p,) = bind(eqn, [i.p for i in ins])
  r = bind(eqn, [i.r for i in ins])[0] if with_ref else p
  rv = env[root]
  m = multiplier(rule, g, rv.p, p, rv.r, r)
  return [Val(p, r, (m * rv.t).astype(jnp.result_type(p)), True)]


# ------------------------------------------------------------------------------------------
# output normalisation and dead-code elimination


def unwrap_single_call(invars, constvars, consts, eqns, outvars):
  """If the whole function is one ``jit`` call (``f = jax.jit(...)``), look inside it, so that
  a trailing softmax is visible. Returns (invars, constvars, consts, eqns, outvars)."""
  while (len(eqns) == 1 and eqns[0].primitive.name in ("pjit", "jit", "closed_call")
         and list(eqns[0].outvars) == list(outvars) and len(invars) == 1):
    eqn = eqns[0]
    body, bconsts = _call_body(eqn)
    outer = dict(zip(constvars, consts))
    pos = [i for i, v in enumerate(eqn.invars) if isinstance(v, Var) and v is invars[0]]
    if len(pos) != 1:
      break
    new_constvars, new_consts = list(body.constvars), list(bconsts)
    for i, (v, bv) in enumerate(zip(eqn.invars, body.invars)):
      if i == pos[0]:
        continue
      new_constvars.append(bv)
      new_consts.append(v.val if isinstance(v, Literal) else outer[v])
    invars, constvars, consts = [body.invars[pos[0]]], new_constvars, new_consts
    eqns, outvars = list(body.eqns), list(body.outvars)
  return invars, constvars, consts, eqns, outvars


def _producers(eqns):
  return {o: e for e in eqns for o in e.outvars}


def strip_output_normalisation(eqns, outvar):
  """If ``outvar`` is ``softmax(a)`` or ``log_softmax(a)`` (as jax.nn writes them: a named
  ``jit`` call or the inlined max-shift / exp / sum pattern), return ``a``; else ``outvar``."""
  prod = _producers(eqns)

  def p(v):
    return prod.get(v) if isinstance(v, Var) else None

  def pname(v):
    e = p(v)
    return e.primitive.name if e is not None else None

  e = p(outvar)
  if e is None:
    return outvar
  name = e.primitive.name
  if name in _CALLS and str(e.params.get("name", "")) in ("log_softmax", "softmax",
                                                          "_softmax"):
    return e.invars[0]
  if name in ("sub", "div"):
    first = e.invars[0]
    if name == "div" and pname(first) == "exp":
      first = p(first).invars[0]
    elif name == "sub" and pname(e.invars[1]) != "log":
      return outvar
    s = p(first)
    if s is not None and s.primitive.name == "sub" and pname(s.invars[1]) == "stop_gradient":
      return s.invars[0]
  return outvar


def dce(eqns, outvars) -> list:
  """Equations needed to compute ``outvars`` (effect-free jaxprs)."""
  live = {v for v in outvars if isinstance(v, Var)}
  kept = []
  for e in reversed(eqns):
    if any(o in live for o in e.outvars):
      kept.append(e)
      live.update(v for v in e.invars if isinstance(v, Var))
  return kept[::-1]

