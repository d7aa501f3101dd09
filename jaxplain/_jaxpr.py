"""A jaxpr interpreter for modified back-propagation (private; used by ``jaxplain.rules``).

The engine traces ``f`` to a jaxpr and evaluates it equation by equation, carrying for every
variable a :class:`Val`:

* ``p`` -- the primal value at the input ``x`` (ordinary JAX ops, so differentiable with
  respect to anything ``f`` closes over, e.g. the parameters);
* ``r`` -- the primal value at the reference input (only when the rule ``needs_ref``:
  DeepLIFT; else equal to ``p``). A reference equal for every example is evaluated on one
  row: each equation is bound on it through its partner in a batch-1 trace of ``f``
  (:func:`pair_eqns`, :func:`bind_ref`), and the leading 1 broadcasts against ``p``;
* ``t`` -- a *modified tangent*: a linear function of the input perturbation built by the
  rule, or ``None`` when the variable does not reach the output through a differentiable
  path (constants, parameters, anything under ``stop_gradient``, integers and booleans);
* ``dep`` -- whether the value depends on ``x`` at all; ``fresh`` -- no layer yet between
  ``x`` and it (first-layer rules).

The interpreter knows primitives; the rule (a value, see ``jaxplain._rules``) knows the
method. Passes before and during evaluation: ``unwrap_single_call``,
``strip_output_normalisation``, ``dce``, ``canonize`` (a dense / conv / window-sum /
reduce_sum head merged with the chain of elementwise affine maps by constants after it: a
:class:`Layer`), ``rewrite_tangent_ops`` (the im2col of small-channel convolutions, a speed
rewrite for XLA:CPU), ``_tangent_live`` (what reaches the output past stop_gradient) and
``nonneg_vars`` (values provably >= 0, so that sign-splitting rules skip the zero negative
part of a layer input: a cost fact, not semantics).
Equations are then classified:

* a canonized layer: ``rule.layer`` (None: the exact map);
* structural and routing primitives (reshape, transpose, broadcast, slicing, concatenate,
  pad, max-pooling, select_n, max of two terms, ...): the exact JVP; a ``custom_jvp``
  function whose body is nothing else (``jaxplain.models.max_pool_2x2``): its own rule;
* sums of several input-dependent terms: ``rule.combine``; elementwise maps by constants not
  merged into a layer: ``rule.unary``;
* an elementwise nonlinearity ``y = g(v)`` of one input-dependent operand (a primitive, a
  jitted / custom_jvp elementwise call such as ``jax.nn.relu``, or an elementwise sub-graph
  such as the inlined ``jax.nn.gelu``): ``rule.activation``;
* a product of two input-dependent operands (``mul``, ``dot_general``): ``rule.bilinear``,
  unless one operand is a per-group statistic broadcast back (a LayerNorm / RMSNorm
  divisor), which is then a constant scale; the inlined ``jax.nn.softmax``: ``rule.softmax``;
* ``scan``: the body at every iteration (static length), the first iterations one by one
  until the carry's static status repeats, the rest as one ``lax.scan`` of the interpreted
  body; ``while`` whose trip count is known at trace time (the part of the carry that its
  condition reads, run while tracing): that scan; ``cond`` / ``switch``: every branch, the
  one selected at ``x`` giving value and tangent; call primitives that are not
  elementwise: inlined;
* anything else that touches an input-dependent value raises
  :class:`UnsupportedPrimitiveError` naming the primitive and the source line.

Because the tangent is linear in the perturbation, ``jax.vjp`` of it gives the modified
backward pass at the cost of about one backward pass, and since the rules are ordinary
functions of the primal values, the result is differentiable (to any order) with respect
to the parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
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
  fresh: bool = False  # no layer yet between f's input and this value (first-layer rules)


# ------------------------------------------------------------------------------------------
# primitive tables

CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
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
    "optimization_barrier", "squeeze_p", "transpose_p", "stack", "unstack"}

# piecewise-linear primitives whose JVP routes the tangent to the selected element (max-pool).
_ROUTE = {"reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min", "cummax",
          "cummin", "sort", "top_k"}

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


def bind_ref(rule, eqn, vals: Sequence[Array]) -> list[Array]:
  """Bind ``eqn`` on reference values: its batch-1 partner when the reference pass runs on
  one row (``rule.pairs``, see :func:`pair_eqns`), else ``eqn`` itself."""
  pairs = getattr(rule, "pairs", None)
  return bind(pairs[id(eqn)] if pairs is not None else eqn, vals)


_BODY_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr", "body_jaxpr", "cond_jaxpr")


def pair_eqns(eqns, eqns1, pairs: dict, consts: dict) -> bool:
  """Zip two traces of one function (at batch B and at batch 1) equation by equation,
  through call and scan bodies: ``pairs[id(eqn)]`` is the batch-1 partner of ``eqn`` and
  ``consts[constvar]`` the batch-1 constant of a body. False where the traces differ in
  structure (then the reference pass runs at batch B)."""
  if len(eqns) != len(eqns1):
    return False
  for e, e1 in zip(eqns, eqns1):
    if (e.primitive is not e1.primitive or len(e.invars) != len(e1.invars)
        or len(e.outvars) != len(e1.outvars)):
      return False
    pairs[id(e)] = e1
    bodies = [(e.params[k], e1.params.get(k)) for k in _BODY_KEYS if k in e.params]
    if "branches" in e.params:  # cond / switch
      bs, bs1 = e.params["branches"], e1.params.get("branches", ())
      if len(bs) != len(bs1):
        return False
      bodies += list(zip(bs, bs1))
    for b, b1 in bodies:
      if b1 is None or hasattr(b, "jaxpr") != hasattr(b1, "jaxpr"):
        return False
      if hasattr(b, "jaxpr"):  # ClosedJaxpr
        if len(b.consts) != len(b1.consts):
          return False
        consts.update(zip(b.jaxpr.constvars, b1.consts))
        b, b1 = b.jaxpr, b1.jaxpr
      if not pair_eqns(b.eqns, b1.eqns, pairs, consts):
        return False
  return True


def call_body(eqn):
  """(jaxpr, consts) of a call primitive's body."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in eqn.params:
      body = eqn.params[key]
      if hasattr(body, "jaxpr"):  # ClosedJaxpr
        return body.jaxpr, body.consts
      return body, ()
  raise _unsupported(eqn, "rule engine", "(call primitive without a readable body)")


# primitives that only move, select or compare values: every rule gives them the exact JVP
_ROUTING_ONLY = ({"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims",
                  "concatenate", "slice", "dynamic_slice", "gather", "pad", "rev", "copy",
                  "copy_p", "convert_element_type", "stack", "unstack", "split", "select_n",
                  "gt", "ge", "lt", "le", "eq", "ne", "and", "or", "not", "is_finite",
                  "stop_gradient"} | _ROUTE)


def _routing_body(jaxpr) -> bool:
  """True where every equation of ``jaxpr`` (through nested calls) only moves, selects or
  compares values, so that the rule-modified tangent of the whole body is its exact JVP (a
  max-pool written with selects, ``jaxplain.models.max_pool_2x2``)."""
  for e in jaxpr.eqns:
    if e.primitive.name in CALLS:
      try:
        body, _ = call_body(e)
      except UnsupportedPrimitiveError:
        return False
      if not _routing_body(body):
        return False
    elif e.primitive.name not in _ROUTING_ONLY:
      return False
  return True


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
    if name in CALLS:
      body, _ = call_body(eqn)
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
  if name in CALLS:
    body, _ = call_body(eqn)
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
# what a rule sees


class Activation(NamedTuple):
  """An elementwise nonlinearity ``y = g(v)`` of one input-dependent value, as a rule sees it.

  ``v`` is the :class:`Val` of the input (``v.t`` the incoming tangent), ``y`` / ``yr`` the
  output at the input / at the reference, ``homogeneous`` whether ``g`` is provably positively
  homogeneous (ReLU, leaky ReLU, |v|: then ``g(v) / v`` is piecewise constant).
  """
  g: Callable
  v: Val
  y: Array
  yr: Array
  homogeneous: bool


def value_and_slope(g: Callable, v: Array) -> tuple[Array, Array]:
  """``g(v)`` and the elementwise derivative ``g'(v)`` (``g`` elementwise, so a JVP with ones
  gives the diagonal). A ``jax.custom_vjp`` function (a user's activation with its own
  backward) has no forward mode: there the VJP with ones gives the same diagonal."""
  ones = jnp.ones_like(v)
  try:
    return jax.jvp(g, (v,), (ones,))
  except TypeError as err:
    if "custom_vjp" not in str(err):
      raise
    y, pull = jax.vjp(g, v)
    return y, pull(jnp.ones_like(y))[0]


def slope(g: Callable, v: Array) -> Array:
  """Elementwise derivative g'(v) (see :func:`value_and_slope`)."""
  return value_and_slope(g, v)[1]


class Layer:
  """One affine layer ``z = s * head(a; W) + c`` as a rule sees it (after canonization).

  ``head`` is a dot_general / convolution with a constant weight operand ``W`` (kind
  ``"dense"`` / ``"conv"``), a window sum (``"pool"``, average pooling) or a reduce_sum
  (``"sum"``, global pooling); ``s`` and ``c`` are the constant elementwise scale and shift
  of the equations merged into it (bias, inference batch norm, the 1 / n of a mean), as
  arrays broadcastable to ``z``. ``a`` is the input, ``t`` its tangent, ``z`` the output,
  ``name`` the name stack of the head equation (Flax module path, "" if none), ``first``
  whether no layer lies between ``f``'s input and this one.

  The maps below are linear in their argument (so ``map(a * t)`` is a valid tangent):
  ``full`` (the layer without its shift, ``full = pos + neg``), ``pos`` / ``neg`` (only the
  positive / negative effective weights ``s * W``; weightless heads count as positive),
  ``ones`` (all weights 1, no scale) and ``square`` (weights ``(s * W)**2``).

  ``nonneg``: the input is provably ``>= 0`` from the jaxpr (after a ReLU, a max-pool of one,
  ...), so that :meth:`split` returns no negative part and rules skip the maps of it (a
  convolution forward and one backward each): the same values at less cost.
  """

  def __init__(self, kind, name, first, a, t, z, head, w, scale, shift, nonneg=False):
    self.kind, self.name, self.first = kind, name, first
    self.a, self.t, self.z = a, t, z
    self._head, self._w, self.scale, self.bias = head, w, scale, shift
    self.nonneg = nonneg

  def head_from_parts(self) -> Array:
    """``head(a; W)`` as the sum of the head with the positive and with the negative weights
    over the parts of ``a``: the value of the head (up to rounding) from the maps that the
    sign-split rules (alpha-beta, gamma) compute anyway, so the layer needs no separate
    forward map (XLA merges the identical computations)."""
    ap, an = self.split()
    wp, wn = jnp.maximum(self._w, 0), jnp.minimum(self._w, 0)
    h = self._h(ap, wp) + self._h(ap, wn)
    if an is not None:
      h = h + self._h(an, wp) + self._h(an, wn)
    return h

  def split(self):
    """``(max(a, 0), min(a, 0))``; the second is None when the input is provably >= 0."""
    if self.nonneg:
      return self.a, None
    return jnp.maximum(self.a, 0), jnp.minimum(self.a, 0)

  def _h(self, x, w=None):
    return self._head(x, self._w if w is None else w)

  def full(self, x):
    return self.scale * self._h(x)

  def _signed(self, x, positive: bool):
    if self._w is not None and self.scale.ndim == 0:  # no merged scale (s = 1): one map
      return self._h(x, (jnp.maximum if positive else jnp.minimum)(self._w, 0))
    sp, sn = jnp.maximum(self.scale, 0), jnp.minimum(self.scale, 0)
    if self._w is None:  # unit weights: all positive
      return (sp if positive else sn) * self._h(x)
    wp, wn = jnp.maximum(self._w, 0), jnp.minimum(self._w, 0)
    if positive:
      return sp * self._h(x, wp) + sn * self._h(x, wn)
    return sp * self._h(x, wn) + sn * self._h(x, wp)

  def pos(self, x):
    return self._signed(x, True)

  def neg(self, x):
    return self._signed(x, False)

  def ones(self, x):
    return self._h(x, None if self._w is None else jnp.ones_like(self._w))

  def square(self, x):
    if self._w is None:
      return self.scale ** 2 * self._h(x)
    return self.scale ** 2 * self._h(x, self._w ** 2)


# ------------------------------------------------------------------------------------------
# canonization: affine constant followers merged into the preceding linear layer

_HEADS = {"dot_general": "dense", "conv_general_dilated": "conv", "reduce_window_sum": "pool",
          "reduce_sum": "sum"}
_FOLLOW = {"add", "sub", "mul", "div", "neg", "convert_element_type"}


def _uses(eqns, outvars) -> dict:
  n: dict = {}
  for e in eqns:
    for v in e.invars:
      if isinstance(v, Var):
        n[v] = n.get(v, 0) + 1
  for v in outvars:
    if isinstance(v, Var):
      n[v] = n.get(v, 0) + 2  # an output is never merged away
  return n


def canonize(eqns, outvars, dep_vars: set) -> dict:
  """Group each linear head equation with the chain of elementwise affine equations by
  constants that follows it (bias add, batch-norm shift and scale, the division of a mean),
  so that rules see one affine map per layer, as Zennit's canonizers merge batch norm into
  the preceding convolution by hand. Returns {id(head eqn): [follower eqns]}; ``dep_vars``
  (the input-dependent variables) is updated along the way."""
  uses = _uses(eqns, outvars)
  consumer = {}
  for e in eqns:
    for v in e.invars:
      if isinstance(v, Var):
        consumer.setdefault(v, e)
  groups = {}
  for e in eqns:
    if any(isinstance(v, Var) and v in dep_vars for v in e.invars):
      dep_vars.update(e.outvars)
  for e in eqns:
    name = e.primitive.name
    dep = [isinstance(v, Var) and v in dep_vars for v in e.invars]
    if name not in _HEADS or not any(dep) or (name in _BILINEAR and sum(dep) != 1):
      continue
    chain, cur = [], e.outvars[0]
    while uses.get(cur, 0) == 1:
      nxt = consumer[cur]
      nd = [isinstance(v, Var) and v in dep_vars for v in nxt.invars]
      ok = (nxt.primitive.name in _FOLLOW and sum(nd) == 1
            and tuple(nxt.outvars[0].aval.shape) == tuple(cur.aval.shape)
            and jnp.issubdtype(nxt.outvars[0].aval.dtype, jnp.inexact)
            and not (nxt.primitive.name == "div" and nd != [True, False]))
      if not ok:
        break
      chain.append(nxt)
      cur = nxt.outvars[0]
    groups[id(e)] = chain
  return groups


# ------------------------------------------------------------------------------------------
# rewrite: the explicit im2col of small-channel convolutions (XLA:CPU speed, not semantics)

# A convolution whose input-dependent operand has at most this many channels carries its
# modified tangent as patches @ kernel (an explicit im2col, see ``_conv_as_patches``).
PATCH_CONV_MAX_CHANNELS = 8


def _patch_conv_ok(eqn) -> bool:
  prm = eqn.params
  lhs = eqn.invars[0].aval
  dn = prm["dimension_numbers"]
  return (lhs.ndim == 4 and prm["feature_group_count"] == 1 and prm["batch_group_count"] == 1
          and all(d == 1 for d in prm["lhs_dilation"])
          and all(d == 1 for d in prm["rhs_dilation"])
          and all(lo >= 0 and hi >= 0 for lo, hi in prm["padding"])
          and prm.get("preferred_element_type") is None
          and lhs.shape[dn.lhs_spec[1]] <= PATCH_CONV_MAX_CHANNELS)


def conv_taps(eqn, t: Array, w: Array):
  """The input of ``eqn``'s convolution in NHWC, padded, and its kernel in HWIO, with the
  kernel taps' strided input slices: ``(k (kh, kw, c, o), taps [(i, j, slice (n, ho, wo, c))],
  to_out)`` where ``to_out`` maps an NHWC result to the output layout and dtype of ``eqn``."""
  prm = eqn.params
  dn = prm["dimension_numbers"]
  (plh, phh), (plw, phw) = prm["padding"]
  sh, sw = prm["window_strides"]
  x = jnp.transpose(t, (dn.lhs_spec[0], dn.lhs_spec[2], dn.lhs_spec[3], dn.lhs_spec[1]))
  k = jnp.transpose(w, (dn.rhs_spec[2], dn.rhs_spec[3], dn.rhs_spec[1], dn.rhs_spec[0]))
  kh, kw, c, _ = k.shape
  x = jnp.pad(x, ((0, 0), (plh, phh), (plw, phw), (0, 0)))
  n, h, wd, _ = x.shape
  ho, wo = (h - kh) // sh + 1, (wd - kw) // sw + 1
  taps = [(i, j, jax.lax.slice(x, (0, i, j, 0),
                               (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                               (1, sh, sw, 1)))
          for i in range(kh) for j in range(kw)]
  perm = [0] * 4  # NHWC -> the output layout of eqn
  for src, dst in zip((0, 1, 2, 3), (dn.out_spec[0], dn.out_spec[2], dn.out_spec[3],
                                     dn.out_spec[1])):
    perm[dst] = src
  return k, taps, lambda y: jnp.transpose(y, perm).astype(eqn.outvars[0].aval.dtype)


def _conv_as_patches(eqn, t: Array, w: Array) -> Array:
  """The linear map ``t -> conv(t, w)`` of ``eqn`` written as an explicit im2col: shifted
  strided slices of the padded input stacked into patches, then one ``dot_general`` with the
  flattened kernel. Same values as the convolution; its transpose (the backward pass) is a
  dot followed by padded additions instead of a convolution with few output channels, which
  XLA's CPU backend runs several times slower (the first layer of an image model), and so
  are the second-order terms of PPI."""
  k, taps, to_out = conv_taps(eqn, t, w)
  kh, kw, c, o = k.shape
  n, ho, wo, _ = taps[0][2].shape
  patches = jnp.stack([s for _, _, s in taps], axis=3).reshape(n, ho, wo, kh * kw * c)
  y = jax.lax.dot_general(patches, k.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())),
                          precision=eqn.params.get("precision"))
  return to_out(y)


def rewrite_tangent_ops(eqns) -> dict:
  """The tangent implementation of each linear head: {id(eqn): fn(x, w) -> y}. Equal in value
  to binding the primitive; small-channel convolutions become an explicit im2col."""
  impl = {}
  for e in eqns:
    if e.primitive.name == "conv_general_dilated" and _patch_conv_ok(e):
      impl[id(e)] = (lambda e: lambda x, w: _conv_as_patches(e, x, w))(e)
  return impl


# ------------------------------------------------------------------------------------------
# non-negativity: which primal values are provably >= 0 (a cost fact for the LRP rules: the
# negative part of such a layer input is zero, so its maps need not be computed)

_NN_FIRST = {"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice",
             "dynamic_slice", "rev", "convert_element_type", "copy", "copy_p", "reduce_max",
             "reduce_min", "reduce_sum", "reduce_window_sum", "cumsum", "cummax", "cummin",
             "stop_gradient", "reduce_precision", "sharding_constraint", "split", "unstack"}
_NN_ALWAYS = {"exp", "exp2", "logistic", "sqrt", "rsqrt", "abs", "square"}
_NN_ALL = {"add", "add_any", "mul", "div", "min", "concatenate", "stack", "pad", "dot_general",
           "conv_general_dilated"}


def _literal_nonneg(v) -> bool:
  try:  # NumPy, not jnp (see _is_zero_literal)
    return bool(np.all(np.asarray(v.val) >= 0))
  except Exception:  # pragma: no cover - abstract literal
    return False


def nonneg_vars(eqns, invars, flags: Sequence[bool]) -> set:
  """The variables of ``eqns`` whose values are provably ``>= 0`` (booleans and unsigned
  integers; ReLU-like ``max(v, c >= 0)``; exp, sqrt, ...; sums, products, poolings,
  reshapes of such values; calls through their body), given which ``invars`` are."""
  nn = {v for v, f in zip(invars, flags) if f}

  def is_nn(v):
    if isinstance(v, Literal):
      return _literal_nonneg(v)
    return v in nn

  for e in eqns:
    name = e.primitive.name
    ins = [is_nn(v) for v in e.invars]
    if name in CALLS:
      try:
        body, _ = call_body(e)
      except UnsupportedPrimitiveError:
        continue
      inner = nonneg_vars(body.eqns, body.invars, ins)
      nn.update(o for o, bo in zip(e.outvars, body.outvars)
                if (_literal_nonneg(bo) if isinstance(bo, Literal) else bo in inner))
      continue
    if name in _NN_FIRST:
      ok = bool(ins) and ins[0]
    elif name == "reduce_window_max":
      prm = e.params
      ok = (bool(ins) and ins[0] and all(d == 1 for d in prm.get("base_dilation", ()))
            and all(d == 1 for d in prm.get("window_dilation", ()))
            and all(lo < w and hi < w for (lo, hi), w in zip(prm["padding"],
                                                            prm["window_dimensions"])))
    elif name in _NN_ALWAYS:
      ok = True
    elif name == "integer_pow":
      ok = e.params["y"] % 2 == 0 or ins[0]
    elif name == "max":
      ok = any(ins)
    elif name in _NN_ALL:
      ok = all(ins)
    elif name == "select_n":
      ok = all(ins[1:])
    elif name == "clamp":
      ok = ins[0]
    else:
      ok = False
    for o in e.outvars:
      dt = o.aval.dtype
      if jnp.issubdtype(dt, jnp.complexfloating):
        continue
      if ok or dt == jnp.bool_ or jnp.issubdtype(dt, jnp.unsignedinteger):
        nn.add(o)
  return nn


# ------------------------------------------------------------------------------------------
# the interpreter


class _Scope:
  """Per-jaxpr bookkeeping of elementwise ancestry (to find elementwise sub-graphs)."""

  def __init__(self, eqns=()):
    self.anc: dict[Var, tuple] = {}  # var -> nearest-first elementwise ancestors
    self.ew_eqns: list = []  # elementwise equations on input-dependent values, in order
    self.prod = {o: e for e in eqns for o in e.outvars}  # var -> producing equation
    self.nonneg: set = set()  # variables provably >= 0 (see nonneg_vars)


_MAX_ANC = 64


def _tangent_live(eqns, outvars) -> set:
  """Variables whose tangent reaches ``outvars`` (stop_gradient cuts the path), so that a
  bilinear product that only feeds stop_gradient (detached attention) needs no rule."""
  live = {v for v in outvars if isinstance(v, Var)}
  for e in reversed(eqns):
    if e.primitive.name == "stop_gradient":
      continue
    if any(o in live for o in e.outvars):
      live.update(v for v in e.invars if isinstance(v, Var))
  return live


def evaluate(eqns, invars, constvars, outvars, consts, args: Sequence[Val], rule,
             nonneg_in: Sequence[bool] | None = None) -> list[Val]:
  """Evaluate a jaxpr (given by its parts) on :class:`Val` arguments with ``rule``
  (``nonneg_in``: which arguments are provably >= 0)."""
  env: dict[Var, Val] = {}

  def read(v) -> Val:
    if isinstance(v, Literal):
      return Val(v.val, v.val, None, False)
    return env[v]

  ref_consts = getattr(rule, "ref_consts", None) or {}
  for v, c in zip(constvars, consts):
    env[v] = Val(c, ref_consts.get(v, c), None, False)
  for v, a in zip(invars, args):
    env[v] = a
  dep_vars = {v for v, a in zip(invars, args) if a.dep}
  groups = canonize(eqns, outvars, dep_vars)
  impl = rewrite_tangent_ops(eqns)
  live = _tangent_live(eqns, outvars)
  heads = {id(e): e for e in eqns if id(e) in groups}
  at_end = {}  # a group is evaluated at its last equation, once every constant exists
  for e in eqns:
    if id(e) in groups and groups[id(e)]:
      at_end[id(groups[id(e)][-1])] = e
  merged = {id(e) for chain in groups.values() for e in chain[:-1]}
  merged |= {k for k, chain in groups.items() if chain}
  scope = _Scope(eqns)
  scope.nonneg = nonneg_vars(eqns, invars, nonneg_in or [False] * len(invars))
  for eqn in eqns:
    if id(eqn) in merged:
      continue
    head = at_end.get(id(eqn), heads.get(id(eqn)))
    if head is not None:
      chain = groups[id(head)]
      ins = [read(v) for v in head.invars]
      last = chain[-1] if chain else head
      if last.outvars[0] not in live:
        ins = [i._replace(t=None) for i in ins]
      if any(i.t is not None for i in ins):
        env[last.outvars[0]] = _layer(head, chain, ins, rule, impl.get(id(head)), read,
                                      scope.nonneg)
        continue
      for e in [head] + chain:  # no tangent: evaluate the equations as usual
        outs = _eval_eqn(e, [read(v) for v in e.invars], rule, scope, env)
        for v, o in zip(e.outvars, outs):
          env[v] = o
      continue
    ins = [read(v) for v in eqn.invars]
    if not any(o in live for o in eqn.outvars):
      ins = [i._replace(t=None) for i in ins]
    outs = _eval_eqn(eqn, ins, rule, scope, env)
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in outvars]


def _inactive_outs(ps, rs, dep) -> list[Val]:
  return [Val(p, r, None, dep) for p, r in zip(ps, rs)]


# the full name stack of the loop / call equation whose body is being interpreted
_ENCLOSING = contextvars.ContextVar("jaxplain_enclosing_name", default="")


def _name(eqn) -> str:
  """The equation's full name stack: a body's equations carry theirs relative to the scan /
  while / cond / call equation holding the body, whose full name is prepended."""
  try:
    own = str(eqn.source_info.name_stack)
  except Exception:  # pragma: no cover - best effort only
    own = ""
  return "/".join(p for p in (_ENCLOSING.get(), own) if p)


@contextlib.contextmanager
def _inside(eqn):
  """While interpreting the body (bodies) of ``eqn``."""
  token = _ENCLOSING.set(_name(eqn))
  try:
    yield
  finally:
    _ENCLOSING.reset(token)


def _layer(head, chain, ins: list[Val], rule, impl, read, nonneg=frozenset()) -> Val:
  """Evaluate a canonized layer (head + merged affine chain) and ask the rule for its
  tangent (None: the exact linear map)."""
  k = next(i for i, v in enumerate(ins) if v.t is not None)
  w_idx = next((i for i in range(len(ins)) if i != k), None)
  w = ins[w_idx].p if w_idx is not None else None
  use_impl = impl is not None and k == 0 and w is not None

  def head_fn(x, wv):
    if use_impl:
      return impl(x, wv)
    vals = [i.p for i in ins]
    vals[k] = x
    if w_idx is not None:
      vals[w_idx] = wv
    return bind(head, vals)[0]

  def chain_eval(hv, which, binder=bind):
    prev, cur = head.outvars[0], hv
    for e in chain:
      vals = []
      for v in e.invars:
        if isinstance(v, Var) and v == prev:
          vals.append(cur)
        else:
          vals.append(which(read(v)))
      cur = binder(e, vals)[0]
      prev = e.outvars[0]
    return cur

  a = ins[k]
  layer = Layer(_HEADS[head.primitive.name], _name(head), a.fresh, a.p, a.t, None, head_fn, w,
                None, None, nonneg=head.invars[k] in nonneg)
  if w is not None and rule.signed_forward(layer):
    h = layer.head_from_parts()  # the maps the rule computes anyway: no separate forward
  else:
    h = bind(head, [i.p for i in ins])[0]
  p = chain_eval(h, lambda v: v.p)
  if rule.needs_ref:
    r = chain_eval(bind_ref(rule, head, [i.r for i in ins])[0], lambda v: v.r,
                   lambda e, vals: bind_ref(rule, e, vals))
  else:
    r = p
  # a chain of additions of constants only (a bias) has the static scale 1
  scaled = any(e.primitive.name in ("mul", "div", "neg") or (
      e.primitive.name == "sub" and isinstance(e.invars[1], Var)
      and e.invars[1] in (head.outvars[0], *[c.outvars[0] for c in chain])) for e in chain)
  if chain:
    shift = chain_eval(jnp.zeros_like(h), lambda v: v.p)
    scale = ((chain_eval(jnp.ones_like(h), lambda v: v.p) - shift).astype(p.dtype) if scaled
             else jnp.ones((), p.dtype))
    shift = jnp.broadcast_to(shift, p.shape).astype(p.dtype)
  else:
    shift, scale = jnp.zeros_like(p), jnp.ones((), p.dtype)
  layer.z, layer.scale, layer.bias = p, scale, shift
  t = rule.layer(layer)
  if t is None:
    t = layer.full(a.t)
  return Val(p, r, t.astype(p.dtype), True, False)


def _eval_eqn(eqn, ins: list[Val], rule, scope: _Scope, env) -> list[Val]:
  name = eqn.primitive.name
  dep = any(i.dep for i in ins)
  with_ref = rule.needs_ref

  def ref_outs():
    return bind_ref(rule, eqn, [i.r for i in ins]) if with_ref else None

  if not dep:
    ps = bind(eqn, [i.p for i in ins])
    # a reference pass on one row needs its own (batch-1) constants too
    paired = with_ref and getattr(rule, "pairs", None) is not None
    return _inactive_outs(ps, ref_outs() if paired else ps, False)
  active = [i.t is not None for i in ins]

  int_out = not any(jnp.issubdtype(o.aval.dtype, jnp.inexact) for o in eqn.outvars)
  if not any(active) or name == "stop_gradient" or int_out:
    ps = bind(eqn, [i.p for i in ins])
    rs = ref_outs() if with_ref else ps
    return _inactive_outs(ps, rs, True)

  n_act = sum(active)
  if name == "scan":
    with _inside(eqn):
      return _scan(eqn, ins, rule)
  if name == "while":
    with _inside(eqn):
      return _while(eqn, ins, rule, scope, env)
  if name == "cond":
    with _inside(eqn):
      return _cond(eqn, ins, rule)
  if name in CALLS:
    body, consts = call_body(eqn)
    if name == "custom_jvp_call" and _routing_body(body):
      # the exact JVP of a pure routing body is the function's own derivative: its custom
      # rule (e.g. the one-hot routing of max_pool_2x2, cheaper than its selects' transposes)
      return _linear(eqn, ins, active, rule)
    if (n_act == 1 and len(eqn.outvars) == 1 and _elementwise_body(body, active)
        and tuple(eqn.outvars[0].aval.shape) == tuple(
            eqn.invars[active.index(True)].aval.shape)):
      k = active.index(True)
      outs = _nonlinearity(eqn, ins, k, lambda v: bind(eqn, _subst(ins, k, v))[0], rule)
      _record_ew(scope, eqn, ins, active)
      return outs
    with _inside(eqn):
      return evaluate(body.eqns, body.invars, body.constvars, body.outvars, consts, ins, rule,
                      [isinstance(v, Var) and v in scope.nonneg for v in eqn.invars])

  if name in ("mul", "div") and n_act == 2:
    sm = _softmax_input(scope, eqn) if name == "div" else None
    if sm is not None:  # softmax(a) = exp(a - max) / sum(exp(a - max)), inlined
      a_var, axes = sm
      av = env[a_var]
      (p,) = bind(eqn, [i.p for i in ins])
      r = ref_outs()[0] if with_ref else p
      t = rule.softmax(av, p, axes) if av.t is not None else None
      _record_ew(scope, eqn, ins, active)
      return [Val(p, r, None if t is None else t.astype(p.dtype), True, False)]
    norm = [_statistic(scope, env, v, eqn) for v in eqn.invars]
    if any(norm) and not all(norm) and (name == "mul" or norm[1]):
      # a normalisation (LayerNorm / RMSNorm divisor, a mean): treated as a constant scale
      ins = [i._replace(t=None) if nl else i for i, nl in zip(ins, norm)]
      active = [i.t is not None for i in ins]
      n_act = 1
    elif _common_root(scope, eqn, active) is None and name == "mul":
      outs = _bilinear(eqn, ins, rule)
      _record_ew(scope, eqn, ins, active)
      return outs

  if name in _ELEMENTWISE:
    linear = (name in _LINEAR_EW or (name == "mul" and n_act == 1)
              or (name == "div" and active == [True, False]))
    if linear:
      if name == "select_n" or (n_act > 1 and name in ("add", "sub", "add_any")):
        outs = _linear(eqn, ins, active, rule, combine=name != "select_n")
      else:
        outs = _linear(eqn, ins, active, rule, unary=True)
    elif n_act == 1:
      k = active.index(True)
      outs = _nonlinearity(eqn, ins, k, lambda v: bind(eqn, _subst(ins, k, v))[0], rule)
    else:
      root = _common_root(scope, eqn, active)
      if root is not None:
        outs = _region(eqn, ins, root, scope, env, rule)
      elif name in ("max", "min"):
        outs = _linear(eqn, ins, active, rule)  # routes like the gradient
      else:
        raise _unsupported(
            eqn, rule.name,
            f"with {n_act} input-dependent operands that are not elementwise functions of a "
            "common input-dependent value (e.g. a product of two different activations)")
    _record_ew(scope, eqn, ins, active)
    return outs

  if name in _LINEAR_STRUCT or name in _ROUTE:
    if name in _BILINEAR and n_act > 1:
      if name == "dot_general":
        return _bilinear(eqn, ins, rule)
      raise _unsupported(eqn, rule.name,
                         "with both operands input-dependent (a bilinear map is not linear)")
    if name in _HEADS:  # a linear head outside a canonized group (e.g. weight-dependent)
      return _linear(eqn, ins, active, rule, combine=True)
    return _linear(eqn, ins, active, rule)

  raise _unsupported(eqn, rule.name, "applied to an input-dependent value")


def _scan_parts(prm: dict, ins: list):
  """(consts, carry, xs, body Jaxpr, body consts) of a scan equation's operands ``ins``.
  jax <= 0.10: a ClosedJaxpr body and ``num_consts`` / ``num_carry``; jax 0.11: an open
  Jaxpr body and the operands' grouping in the ``ft_in`` flat tree."""
  body = prm["jaxpr"]
  if "num_consts" in prm:
    nc, nk = prm["num_consts"], prm["num_carry"]
    return ins[:nc], list(ins[nc:nc + nk]), ins[nc + nk:], body.jaxpr, body.consts
  consts, carry, xs = (list(g) for g in prm["ft_in"].update(list(ins)).unpack())
  return consts, carry, xs, getattr(body, "jaxpr", body), list(getattr(body, "consts", []))


class _StatusChanged(Exception):
  """Raised while tracing a scan body whose carry's static status is not a fixed point."""


_MAX_PEEL = 4  # iterations interpreted one by one before the loop's static status settles


def _status(v: Val) -> tuple:
  """What a :class:`Val` fixes at trace time: which parts exist, their shapes and dtypes."""
  aval = lambda a: (np.shape(a), jnp.result_type(a))
  return (v.dep, v.fresh, v.t is None, aval(v.p), aval(v.r),
          None if v.t is None else aval(v.t))


def _stack_vals(cols: list[list[Val]], outvars) -> list[Val]:
  """Concatenate per-segment stacked outputs (each Val with a leading iteration axis) along
  that axis: a missing tangent is zero, reference values broadcast to a common shape."""
  out = []
  for j, ov in enumerate(outvars):
    col = [c[j] for c in cols]
    if not col:
      p = jnp.zeros(ov.aval.shape, ov.aval.dtype)
      out.append(Val(p, p, None, False, False))
      continue
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)
    p = cat([jnp.asarray(c.p) for c in col])
    rs = [jnp.asarray(c.r) for c in col]
    shape = (p.shape[0],) + jnp.broadcast_shapes(*[r.shape[1:] for r in rs])
    r = cat([jnp.broadcast_to(r, (r.shape[0],) + shape[1:]) for r in rs])
    t = None
    if any(c.t is not None for c in col):
      t = cat([c.t if c.t is not None else jnp.zeros_like(c.p) for c in col])
    out.append(Val(p, r, t, any(c.dep for c in col), False))
  return out


def _scan(eqn, ins: list[Val], rule) -> list[Val]:
  """``lax.scan`` with its static length: the body is interpreted at every iteration, so the
  map equals that of the same loop written out by hand. The first iterations are interpreted
  one by one until the carry's static status (which values depend on ``x``, carry a tangent,
  their shapes) repeats; from there every iteration is classified alike and the rest runs as
  one ``lax.scan`` of the interpreted body (trace and compile time independent of the length).
  """
  prm = eqn.params
  consts, carry, xs, body, body_consts = _scan_parts(prm, ins)
  return _loop(prm["length"], prm["reverse"], consts, carry, xs, body, body_consts,
               eqn.outvars[len(carry):], rule)


def _loop(n: int, rev: bool, consts, carry, xs, body, body_consts, y_outvars, rule
          ) -> list[Val]:
  """The scan of :func:`_scan` on its parts (also a while loop with a known trip count):
  returns the final carry and the stacked outputs ``y_outvars``."""
  nk = len(carry)
  run = lambda c, xi: evaluate(body.eqns, body.invars, body.constvars, body.outvars,
                               body_consts, consts + c + xi, rule)
  at = lambda i: [Val(v.p[i], v.r[i], None if v.t is None else v.t[i], v.dep, False)
                  for v in xs]
  one = lambda ys: [Val(jnp.asarray(y.p)[None], jnp.asarray(y.r)[None],
                        None if y.t is None else y.t[None], y.dep, False) for y in ys]
  peeled, done = [], 0
  status = before = [_status(c) for c in carry]
  while done < n:
    before = status
    outs = run(carry, at(n - 1 - done if rev else done))
    carry, done = outs[:nk], done + 1
    peeled.append(one(outs[nk:]))
    status = [_status(c) for c in carry]
    if status == before or done >= _MAX_PEEL:
      break
  rest = n - done
  if rest:
    lo, hi = (0, rest) if rev else (done, n)
    seq = [Val(v.p[lo:hi], v.r[lo:hi], None if v.t is None else v.t[lo:hi], v.dep, False)
           for v in xs]
    y_like: list = []  # the outputs' Vals as traced in the body (their dep flags)

    def pack(vals):
      return tuple((v.p, v.r) + (() if v.t is None else (v.t,)) for v in vals)

    def unpack(parts, like):
      return [Val(q[0], q[1], q[2] if len(q) > 2 else None, v.dep, v.fresh)
              for q, v in zip(parts, like)]

    def step(c, xi):
      outs = run(unpack(c, carry), unpack(xi, seq))
      if [_status(v) for v in outs[:nk]] != status:
        raise _StatusChanged
      y_like.append(outs[nk:])
      new = tuple(tuple(jnp.asarray(a).astype(jnp.result_type(b)) for a, b in zip(q, q0))
                  for q, q0 in zip(pack(outs[:nk]), pack(carry)))
      return new, pack(outs[nk:])

    scanned = None
    if status == before:
      try:
        scanned = jax.lax.scan(step, pack(carry), pack(seq), length=rest, reverse=rev)
      except _StatusChanged:
        pass
    if scanned is None:  # the status never settled: interpret every remaining iteration
      for k in range(rest):
        outs = run(carry, at(rest - 1 - k if rev else done + k))
        carry = outs[:nk]
        peeled.append(one(outs[nk:]))
    else:
      carry = unpack(scanned[0], carry)
      peeled.append(unpack(scanned[1], y_like[0]))
  if rev:
    peeled = peeled[::-1]
  stacked = _stack_vals(peeled, y_outvars)
  carry = [Val(jnp.asarray(c.p), jnp.asarray(c.r), c.t, c.dep, False) for c in carry]
  return carry + stacked


def _cond(eqn, ins: list[Val], rule) -> list[Val]:
  """``lax.cond`` / ``lax.switch``: every branch is interpreted with the rule and the one the
  index selects at ``x`` gives the value and the tangent (the modified backward pass of the
  branch taken); the reference pass takes the branch selected at the reference (DeepLIFT's
  summation to delta then holds only where x and the reference take the same branch). A
  constant index interprets only its branch."""
  branches = eqn.params["branches"]
  idx, ops = ins[0], ins[1:]
  n = len(branches)
  run = lambda b: evaluate(b.jaxpr.eqns, b.jaxpr.invars, b.jaxpr.constvars, b.jaxpr.outvars,
                           b.consts, ops, rule)
  static = [None if isinstance(i, jax.core.Tracer) else int(np.clip(np.asarray(i), 0, n - 1))
            for i in (idx.p, idx.r)]
  if static[0] is not None and static[0] == static[1]:
    return run(branches[static[0]])
  outs = [run(b) for b in branches]
  pick = lambda i, vals: jax.lax.select_n(
      jnp.clip(jnp.asarray(i), 0, n - 1).astype(jnp.int32), *vals)
  res = []
  for j in range(len(eqn.outvars)):
    col = [o[j] for o in outs]
    p = pick(idx.p, [jnp.asarray(c.p) for c in col])
    shape = jnp.broadcast_shapes(*[np.shape(c.r) for c in col])
    r = pick(idx.r, [jnp.broadcast_to(c.r, shape) for c in col])
    t = None
    if any(c.t is not None for c in col):
      t = pick(idx.p, [c.t if c.t is not None else jnp.zeros_like(c.p) for c in col])
    res.append(Val(p, r, t, any(c.dep for c in col), all(c.fresh for c in col)))
  return res


_MAX_TRIPS = 1_000_000  # a while loop that runs longer is treated as not terminating
_MAX_CONST_SIZE = 4096  # largest value folded at trace time to find a trip count


def _reads(eqns, outvars) -> set:
  """Variables that ``outvars`` depend on (through ``eqns``), the outvars included."""
  kept = dce(eqns, outvars)
  return ({v for e in kept for v in e.invars if isinstance(v, Var)}
          | {v for v in outvars if isinstance(v, Var)})


def _run_eqns(eqns, env: dict, outvars) -> list:
  """Evaluate the equations ``outvars`` need, given the values of their free variables."""
  env = dict(env)
  read = lambda v: v.val if isinstance(v, Literal) else env[v]
  for e in dce(eqns, outvars):
    for v, o in zip(e.outvars, bind(e, [read(v) for v in e.invars])):
      env[v] = o
  return [read(v) for v in outvars]


def _const(v, val: Val | None, scope: _Scope, env, depth: int = 0):
  """The trace-time value of ``v`` if it is computed from literals and concrete constants
  only (folded eagerly, small values only), else None."""
  if isinstance(v, Literal):
    return v.val
  if val is None:
    val = env.get(v)
  if val is not None and not val.dep and not isinstance(val.p, jax.core.Tracer):
    return val.p
  e = scope.prod.get(v)
  if (e is None or depth > 32 or e.primitive.name in CALLS or e.effects
      or any(math.prod(o.aval.shape) > _MAX_CONST_SIZE for o in e.outvars)):
    return None
  vals = [_const(u, None, scope, env, depth + 1) for u in e.invars]
  if any(a is None for a in vals):
    return None
  with jax.ensure_compile_time_eval():
    return bind(e, vals)[e.outvars.index(v)]


def _while_trips(eqn, ins: list[Val], scope: _Scope, env) -> int | None:
  """The trip count of a while loop whose condition depends only on carries that the body
  updates from themselves and concrete constants (a counter, ``fori_loop`` with array
  bounds), found by running that part of the loop at trace time; None if it is dynamic."""
  prm = eqn.params
  cj, bj = prm["cond_jaxpr"], prm["body_jaxpr"]
  ncc, nbc = prm["cond_nconsts"], prm["body_nconsts"]
  cin, bin_ = cj.jaxpr.invars, bj.jaxpr.invars
  nk = len(bin_) - nbc
  cond_reads = _reads(cj.jaxpr.eqns, cj.jaxpr.outvars)
  part = {i for i in range(nk) if cin[ncc + i] in cond_reads}
  while True:  # close the part under the body: the carries its updates read
    r = _reads(bj.jaxpr.eqns, [bj.jaxpr.outvars[i] for i in part])
    grown = part | {i for i in range(nk) if bin_[nbc + i] in r}
    if grown == part:
      break
    part = grown
  need = ([k for k in range(ncc) if cin[k] in cond_reads]
          + [ncc + k for k in range(nbc) if bin_[k] in r]
          + [ncc + nbc + i for i in sorted(part)])
  known = {}
  for k in need:
    c = _const(eqn.invars[k], ins[k], scope, env)
    if c is None:
      return None
    known[k] = c
  cenv0 = {v: c for v, c in zip(cj.jaxpr.constvars, cj.consts)}
  cenv0.update({cin[k]: known[k] for k in range(ncc) if k in known})
  benv0 = {v: c for v, c in zip(bj.jaxpr.constvars, bj.consts)}
  benv0.update({bin_[k]: known[ncc + k] for k in range(nbc) if ncc + k in known})
  order = sorted(part)

  def cond(s):
    carry, n = s
    env1 = {**cenv0, **{cin[ncc + i]: c for i, c in zip(order, carry)}}
    go = _run_eqns(cj.jaxpr.eqns, env1, cj.jaxpr.outvars)[0]
    return jnp.logical_and(go, n < _MAX_TRIPS)

  def body(s):
    carry, n = s
    env1 = {**benv0, **{bin_[nbc + i]: c for i, c in zip(order, carry)}}
    return (tuple(_run_eqns(bj.jaxpr.eqns, env1, [bj.jaxpr.outvars[i] for i in order])),
            n + 1)

  init = tuple(known[ncc + nbc + i] for i in order)
  try:
    with jax.ensure_compile_time_eval():
      n = int(jax.lax.while_loop(cond, body, (init, jnp.int32(0)))[1])
  except jax.errors.ConcretizationTypeError:
    return None
  if n >= _MAX_TRIPS:
    raise _unsupported(eqn, "the rule engine",
                       f"(a while loop that runs over {_MAX_TRIPS} iterations)")
  return n


def _while(eqn, ins: list[Val], rule, scope: _Scope, env) -> list[Val]:
  """``lax.while_loop`` whose trip count is known at trace time (``fori_loop`` with array
  bounds, a counter compared with a constant): the same loop as a ``lax.scan`` of that
  length, interpreted through its body (:func:`_scan`). A trip count that depends on traced
  values (``x``, parameters passed as arguments) raises."""
  n = _while_trips(eqn, ins, scope, env)
  if n is None:
    raise _unsupported(
        eqn, rule.name, "(a while loop whose trip count depends on traced values: it is "
        "not known at trace time). Write the loop as jax.lax.scan, jax.lax.fori_loop with "
        "static bounds, or a while loop over a counter compared with a constant, so that "
        "the rule is applied inside the body at every iteration")
  prm = eqn.params
  ncc, nbc, body = prm["cond_nconsts"], prm["body_nconsts"], prm["body_jaxpr"]
  return _loop(n, False, ins[ncc:ncc + nbc], list(ins[ncc + nbc:]), [], body.jaxpr,
               body.consts, [], rule)


def _bilinear(eqn, ins: list[Val], rule) -> list[Val]:
  """A product of two input-dependent operands (attention's QK^T and AV, gating)."""
  (p,) = bind(eqn, [i.p for i in ins])
  r = bind_ref(rule, eqn, [i.r for i in ins])[0] if rule.needs_ref else p
  a, b = ins
  t = rule.bilinear(lambda u, v: bind(eqn, [u, v])[0], a, b, p)
  return [Val(p, r, t.astype(p.dtype), True, False)]


_PASS = ("broadcast_in_dim", "reshape", "convert_element_type", "copy", "squeeze",
         "expand_dims")


def _size(v) -> int:
  return int(np.prod(v.aval.shape)) if v.aval.shape else 1


def _statistic(scope: _Scope, env, v, eqn) -> bool:
  """True when operand ``v`` of ``eqn`` is a per-group statistic broadcast back to the full
  shape (a LayerNorm / RMSNorm divisor, a mean): followed through broadcasts, reshapes and
  products with constants, it comes from a value with fewer elements than ``eqn``'s output."""
  if not isinstance(v, Var):
    return False
  n = _size(eqn.outvars[0])
  cur = v
  for _ in range(16):
    if _size(cur) < n:
      return True
    e = scope.prod.get(cur)
    if e is None:
      return False
    name = e.primitive.name
    if name in _PASS:
      cur = e.invars[0]
    elif name in ("mul", "div", "add", "sub"):
      deps = [x for x in e.invars if isinstance(x, Var) and x in env and env[x].dep]
      if len(deps) != 1:
        return False
      cur = deps[0]
    else:
      return False
  return False


def _softmax_input(scope: _Scope, eqn):
  """If ``eqn`` is the division of jax.nn.softmax (exp(a - stop_gradient(max)) / its sum),
  return (a, reduced axes); else None."""
  g, i = eqn.invars
  pg = scope.prod.get(g) if isinstance(g, Var) else None
  if pg is None or pg.primitive.name != "exp":
    return None
  ps = scope.prod.get(pg.invars[0]) if isinstance(pg.invars[0], Var) else None
  if ps is None or ps.primitive.name != "sub":
    return None
  shift = scope.prod.get(ps.invars[1]) if isinstance(ps.invars[1], Var) else None
  if shift is None or shift.primitive.name != "stop_gradient":
    return None
  cur = i
  while isinstance(cur, Var) and cur in scope.prod and scope.prod[cur].primitive.name in _PASS:
    cur = scope.prod[cur].invars[0]
  red = scope.prod.get(cur) if isinstance(cur, Var) else None
  if red is None or red.primitive.name != "reduce_sum" or red.invars[0] is not g:
    return None
  return ps.invars[0], tuple(red.params["axes"])


def _subst(ins: list[Val], k: int, v: Array) -> list[Array]:
  vals = [i.p for i in ins]
  vals[k] = v
  return vals


def _linear(eqn, ins: list[Val], active: list[bool], rule, combine: bool = False,
            unary: bool = False) -> list[Val]:
  """A linear (or piecewise-linear routing) equation: the exact JVP, unless the rule
  modifies sums of several terms (``combine``) or elementwise maps by constants (``unary``)."""
  idx = [k for k, a in enumerate(active) if a]
  base = [i.p for i in ins]

  def fn(*a):
    vals = list(base)
    for k, ak in zip(idx, a):
      vals[k] = ak
    return bind(eqn, vals)

  ps = bind(eqn, base)
  rs = bind_ref(rule, eqn, [i.r for i in ins]) if rule.needs_ref else ps

  def jvp(ts):
    return jax.jvp(fn, [ins[k].p for k in idx], list(ts))[1]

  ts = None
  if combine and len(ps) == 1:
    ts = rule.combine(ps[0], [ins[k].p for k in idx], [ins[k].t for k in idx],
                      lambda *t: jvp(t)[0])
    ts = None if ts is None else [ts]
  elif unary and len(ps) == 1:
    ts = rule.unary(eqn.primitive.name, ps[0], ins[idx[0]].p, ins[idx[0]].t,
                    lambda t: jvp([t])[0])
    ts = None if ts is None else [ts]
  if ts is None:
    ts = jvp([ins[k].t for k in idx])
  fresh = all(ins[k].fresh for k in idx) and not combine
  return [Val(p, r, t.astype(p.dtype) if _is_float(p) else None, True, fresh)
          for p, r, t in zip(ps, rs, ts)]


def _nonlinearity(eqn, ins: list[Val], k: int, g: Callable, rule) -> list[Val]:
  (p,) = bind(eqn, [i.p for i in ins])
  r = bind_ref(rule, eqn, [i.r for i in ins])[0] if rule.needs_ref else p
  hom = positively_homogeneous(eqn, [i == k for i in range(len(ins))])
  t = rule.activation(Activation(g, ins[k], p, r, hom))
  return [Val(p, r, t.astype(jnp.result_type(p)), True, False)]


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


def _region(eqn, ins: list[Val], root, scope: _Scope, env, rule) -> list[Val]:
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
  r = bind_ref(rule, eqn, [i.r for i in ins])[0] if rule.needs_ref else p
  t = rule.activation(Activation(g, env[root], p, r, False))
  return [Val(p, r, t.astype(jnp.result_type(p)), True, False)]


# ------------------------------------------------------------------------------------------
# output normalisation and dead-code elimination


def unwrap_single_call(invars, constvars, consts, eqns, outvars):
  """If the whole function is one ``jit`` call (``f = jax.jit(...)``), look inside it, so that
  a trailing softmax is visible. Returns (invars, constvars, consts, eqns, outvars)."""
  while (len(eqns) == 1 and eqns[0].primitive.name in ("pjit", "jit", "closed_call")
         and list(eqns[0].outvars) == list(outvars) and len(invars) == 1):
    eqn = eqns[0]
    body, bconsts = call_body(eqn)
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
  ``jit`` call or the inlined max-shift / exp / sum pattern), return ``(a, kind)`` with kind
  ``"softmax"`` / ``"log_softmax"``; else ``(outvar, None)``."""
  prod = _producers(eqns)

  def p(v):
    return prod.get(v) if isinstance(v, Var) else None

  def pname(v):
    e = p(v)
    return e.primitive.name if e is not None else None

  e = p(outvar)
  if e is None:
    return outvar, None
  name = e.primitive.name
  cname = str(e.params.get("name", ""))
  if name in CALLS and cname in ("log_softmax", "softmax", "_softmax"):
    return e.invars[0], "log_softmax" if cname == "log_softmax" else "softmax"
  if name in ("sub", "div"):
    first = e.invars[0]
    if name == "div" and pname(first) == "exp":
      first = p(first).invars[0]
    elif name == "sub" and pname(e.invars[1]) != "log":
      return outvar, None
    s = p(first)
    if s is not None and s.primitive.name == "sub" and pname(s.invars[1]) == "stop_gradient":
      return s.invars[0], "softmax" if name == "div" else "log_softmax"
  return outvar, None


def needed_inputs(jaxpr, used_outputs: Sequence[bool]) -> list[bool]:
  """Which of ``jaxpr``'s inputs its used outputs depend on, looking inside calls (jit,
  checkpoint / remat, custom_jvp / custom_vjp bodies), so an input that a call takes but
  never reads for a used output does not count."""
  live = {v for v, u in zip(jaxpr.outvars, used_outputs) if u and isinstance(v, Var)}
  for e in reversed(jaxpr.eqns):
    used = [o in live for o in e.outvars]
    if not any(used):
      continue
    ins = [True] * len(e.invars)
    if e.primitive.name in CALLS:
      body, _ = call_body(e)
      if len(body.invars) == len(e.invars) and len(body.outvars) == len(e.outvars):
        ins = needed_inputs(body, used)
    live.update(v for v, n in zip(e.invars, ins) if n and isinstance(v, Var))
  return [v in live for v in jaxpr.invars]


def dce(eqns, outvars) -> list:
  """Equations needed to compute ``outvars`` (effect-free jaxprs)."""
  live = {v for v in outvars if isinstance(v, Var)}
  kept = []
  for e in reversed(eqns):
    if any(o in live for o in e.outvars):
      kept.append(e)
      live.update(v for v in e.invars if isinstance(v, Var))
  return kept[::-1]

