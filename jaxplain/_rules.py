"""Rules as values for the modified-backprop engine (private; public names in ``rules``).

A *method rule* is a value with the hooks a modified backward pass needs; the interpreter
(``jaxplain._jaxpr``) knows primitives only and asks the rule at each one:

* ``activation(act)`` -- the tangent out of an elementwise nonlinearity ``y = g(v)``;
* ``layer(layer)`` -- the tangent out of a canonized affine layer (``None``: the exact map);
* ``combine(z, inputs, tangents, jvp)`` -- a sum of several input-dependent terms (a skip
  connection); ``unary(name, z, a, t, jvp)`` -- an elementwise map by constants that was not
  merged into a layer (``None``: the exact JVP);
* ``seed(logits, cot)`` -- the output cotangent; ``finish(x, ref, c)`` -- the map from the
  pulled-back cotangent ``c``; ``needs_ref`` -- whether a reference pass is carried.

The tangent is linear in the input perturbation, so ``jax.vjp`` of it is the modified
backward pass. WBP, DeepLIFT and guided backprop / deconvnet live in the *gradient space*
(the pulled-back value is a modified gradient, multiplied by the input at the end); LRP
lives in the *relevance space* (the tangent of each layer is ``A'(m * t) / den``, so its
transpose maps the relevance of the outputs to the relevance of the inputs directly).

A *layer rule* (Epsilon, ZPlus, AlphaBeta, Gamma, Flat, WSquare, ZBox, Norm) is the LRP
treatment of one affine layer; a :class:`Composite` maps layers to layer rules.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxplain._jaxpr import Activation, Layer, slope, value_and_slope

Array = Any


def _stab(z: Array, eps: float) -> Array:
  """z + eps * sign(z) with sign(0) = +1 (Zennit's Stabilizer)."""
  return z + jnp.asarray(eps, z.dtype) * jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)


def _div(n: Array, d: Array) -> Array:
  """n / d, 0 where d == 0 (only possible with a zero stabiliser)."""
  zero = d == 0
  return jnp.where(zero, jnp.zeros_like(n), n / jnp.where(zero, jnp.ones_like(d), d))


def _epsilon(layer: Layer, eps: float) -> Array:
  """The epsilon rule's tangent A(a * t) / (z + eps sign(z)) (Epsilon and Norm)."""
  return _div(layer.full(layer.a * layer.t), _stab(layer.z, eps))


# ------------------------------------------------------------------------------------------
# layer rules (LRP; Zennit 0.5.1 conventions, see SPEC.md section 8)
# Each returns the tangent of the layer, t_out = sum_i M_i(m_i * t) / den_i, whose transpose
# is R_in = sum_i m_i * M_i^T (R_out / den_i).


@dataclasses.dataclass(frozen=True)
class Epsilon:
  """``R_j = sum_k a_j w_jk / (z_k + epsilon sign(z_k)) R_k`` (Bach et al. 2015)."""
  epsilon: float = 1e-6

  def __call__(self, layer: Layer) -> Array:
    return _epsilon(layer, self.epsilon)


@dataclasses.dataclass(frozen=True)
class Norm:
  """Zennit's ``Norm`` (average pooling, sums): the epsilon rule with only a stabiliser."""
  stabilizer: float = 1e-6

  def __call__(self, layer: Layer) -> Array:
    return _epsilon(layer, self.stabilizer)


def _split(a):
  return jnp.maximum(a, 0), jnp.minimum(a, 0)


@dataclasses.dataclass(frozen=True)
class ZPlus:
  """z+ (Zennit ``ZPlus``, alpha 1 beta 0 with negative inputs allowed):
  ``R_j = sum_k (a_j+ w_jk+ + a_j- w_jk-) / z_k+ R_k``,
  ``z_k+ = sum_j (a_j+ w_jk+ + a_j- w_jk-) + b_k+``."""
  stabilizer: float = 1e-6

  def __call__(self, layer: Layer) -> Array:
    ap, an = layer.split()
    den = layer.pos(ap) + jnp.maximum(layer.bias, 0)
    num = layer.pos(ap * layer.t)
    if an is not None:  # None: the input is provably >= 0 (after a ReLU), no negative part
      den, num = den + layer.neg(an), num + layer.neg(an * layer.t)
    return _div(num, _stab(den, self.stabilizer))


@dataclasses.dataclass(frozen=True)
class AlphaBeta:
  """alpha times the positive contributions over their sum (positive bias included) minus
  beta times the negative ones over theirs (Zennit ``AlphaBeta``); alpha - beta = 1."""
  alpha: float = 2.0
  beta: float = 1.0
  stabilizer: float = 1e-6
  signed = True  # computes the positive- and negative-weight maps of its input (not a field)

  def __post_init__(self):
    if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1.0) > 1e-12:
      raise ValueError(f"alpha, beta: expected alpha >= 0, beta >= 0 and alpha - beta = 1, "
                       f"got alpha={self.alpha}, beta={self.beta}")

  def __call__(self, layer: Layer) -> Array:
    ap, an = layer.split()
    bp, bn = _split(layer.bias)
    t = layer.t
    zp, zn = layer.pos(ap) + bp, layer.neg(ap) + bn
    np_, nn_ = layer.pos(ap * t), layer.neg(ap * t)
    if an is not None:
      zp, zn = zp + layer.neg(an), zn + layer.pos(an)
      np_, nn_ = np_ + layer.neg(an * t), nn_ + layer.pos(an * t)
    return (self.alpha * _div(np_, _stab(zp, self.stabilizer))
            - self.beta * _div(nn_, _stab(zn, self.stabilizer)))


@dataclasses.dataclass(frozen=True)
class Gamma:
  """Generalised gamma rule (Zennit ``Gamma``): where z > 0 the weights w + gamma w+ for
  positive inputs and w + gamma w- for negative ones (bias b + gamma b+), normalised by
  their output; where z < 0 the mirrored pair; z = 0 gets nothing."""
  gamma: float = 0.25
  stabilizer: float = 1e-6
  signed = True  # computes the positive- and negative-weight maps of its input (not a field)

  def __call__(self, layer: Layer) -> Array:
    # With P / N the maps of the positive / negative weights (full = P + N), the modified
    # maps are m0 = (1 + g) P + N and m1 = P + (1 + g) N; written through P and N of each
    # input part, each map is computed once: 2 maps forward and 2 transposed backward per
    # part of the input (the negative part is skipped when the input is provably >= 0).
    ap, an = layer.split()
    bp, bn = _split(layer.bias)
    g, t = self.gamma, layer.t
    g1 = 1.0 + g
    pa, na, pt, nt = layer.pos(ap), layer.neg(ap), layer.pos(ap * t), layer.neg(ap * t)
    dp, dn = g1 * pa + na, pa + g1 * na
    up, un = g1 * pt + nt, pt + g1 * nt
    if an is not None:
      pa, na, pt, nt = layer.pos(an), layer.neg(an), layer.pos(an * t), layer.neg(an * t)
      dp, dn = dp + pa + g1 * na, dn + g1 * pa + na
      up, un = up + pt + g1 * nt, un + g1 * pt + nt
    dp, dn = dp + layer.bias + g * bp, dn + layer.bias + g * bn
    z = layer.z
    tp = _div(up, _stab(dp, self.stabilizer))
    tn = _div(un, _stab(dn, self.stabilizer))
    return (jnp.where(z > 0, tp, 0.0) + jnp.where(z < 0, tn, 0.0)).astype(z.dtype)


@dataclasses.dataclass(frozen=True)
class Flat:
  """``R_j = sum_k R_k / (fan-in of k)``: unit weights and inputs, no bias (Zennit ``Flat``)."""
  stabilizer: float = 1e-6

  def __call__(self, layer: Layer) -> Array:
    den = layer.ones(jnp.ones_like(layer.a))
    return _div(layer.ones(layer.t), _stab(den, self.stabilizer))


@dataclasses.dataclass(frozen=True)
class WSquare:
  """``R_j = sum_k w_jk^2 / sum_i w_ik^2 R_k`` (Montavon et al. 2017). Zennit 0.5.1 also
  squares the bias into the denominator; here the bias is left out, as SPEC.md defines it."""
  stabilizer: float = 1e-6

  def __call__(self, layer: Layer) -> Array:
    den = layer.square(jnp.ones_like(layer.a))
    return _div(layer.square(layer.t), _stab(den, self.stabilizer))


@dataclasses.dataclass(frozen=True)
class ZBox:
  """z^B for inputs bounded by ``[low, high]`` (Montavon et al. 2017; Zennit ``ZBox``):
  ``R_j = sum_k (a_j w_jk - l_j w_jk+ - h_j w_jk-) / sum_i (same) R_k`` (the bias cancels)."""
  low: Any
  high: Any
  stabilizer: float = 1e-6

  def __call__(self, layer: Layer) -> Array:
    a, t = layer.a, layer.t
    lo = jnp.broadcast_to(jnp.asarray(self.low, a.dtype), a.shape)
    hi = jnp.broadcast_to(jnp.asarray(self.high, a.dtype), a.shape)
    den = layer.full(a) - layer.pos(lo) - layer.neg(hi)
    num = layer.full(a * t) - layer.pos(lo * t) - layer.neg(hi * t)
    return _div(num, _stab(den, self.stabilizer))

  def __hash__(self):
    return id(self)


LAYER_RULES = (Epsilon, Norm, ZPlus, AlphaBeta, Gamma, Flat, WSquare, ZBox)


@dataclasses.dataclass(frozen=True)
class Composite:
  """Which layer rule each affine layer gets.

  Resolution order for a layer: the first ``(pattern, rule)`` of ``names`` whose regex
  ``fullmatch``es the layer's name stack (a Flax linen module path such as ``"CNN/conv1"``,
  a wrapped Flax NNX module's class and attribute path, ``jaxplain.wrap(net)``:
  ``"CNN/blocks/0"``, Keras ``"sequential/dense"``, Equinox the class,
  ``"vmap(eqx.nn.Conv)"``; a bare NNX module or plain function leaves none, so choose by
  kind there; a pattern that matches no layer raises),
  then ``first`` for the first layer (no layer between ``f``'s input and it), then the rule
  of its kind: ``dense`` (dot_general), ``conv`` (convolution), ``pool`` (average pooling,
  a window sum) and ``sum`` (reduce_sum: global pooling, means).
  """
  dense: Any = Epsilon()
  conv: Any = Epsilon()
  pool: Any = Norm()
  sum: Any = Norm()
  first: Any = None
  names: tuple = ()

  def rule_for(self, layer: Layer):
    return self.rule_and_pattern(layer)[0]

  def rule_and_pattern(self, layer: Layer) -> tuple[Any, int | None]:
    """The layer's rule and the index in ``names`` of the pattern that chose it (or None)."""
    for i, (pattern, rule) in enumerate(self.names):
      if re.fullmatch(pattern, layer.name):
        return rule, i
    if layer.first and self.first is not None and layer.kind in ("dense", "conv"):
      return self.first, None
    return getattr(self, layer.kind), None


COMPOSITES = ("epsilon", "epsilon_plus", "epsilon_alpha2_beta1", "epsilon_plus_flat",
              "epsilon_gamma_box")


def make_composite(composite, epsilon: float, low, high) -> Composite:
  """A :class:`Composite` from ``None`` (epsilon at dense and conv layers, ``Norm`` at pools
  and sums, as Zennit's composites), a name of
  ``COMPOSITES`` (Zennit's meanings and defaults) or a Composite."""
  if isinstance(composite, Composite):
    return composite
  eps = Epsilon(epsilon)
  if composite is None or composite == "epsilon":
    norm = Norm(min(epsilon, 1e-6))  # exact conservation at epsilon = 0
    return Composite(dense=eps, conv=eps, pool=norm, sum=norm)
  if composite == "epsilon_plus":
    return Composite(dense=eps, conv=ZPlus())
  if composite == "epsilon_alpha2_beta1":
    return Composite(dense=eps, conv=AlphaBeta(2.0, 1.0))
  if composite == "epsilon_plus_flat":
    return Composite(dense=eps, conv=ZPlus(), first=Flat())
  if composite == "epsilon_gamma_box":
    if low is None or high is None:
      raise ValueError("low, high: composite='epsilon_gamma_box' needs the input bounds, e.g. "
                       "lrp(f, x, t, composite='epsilon_gamma_box', low=0.0, high=1.0)")
    return Composite(dense=eps, conv=Gamma(0.25), first=ZBox(low, high))
  raise ValueError(f"composite: expected None, one of {COMPOSITES} or a Composite, "
                   f"got {composite!r}")


# ------------------------------------------------------------------------------------------
# method rules


class _GradientSpace:
  """Defaults of the gradient-space methods: exact linear maps, one-hot seed, c * x."""
  needs_ref = False

  def layer(self, layer):
    del layer
    return None

  def signed_forward(self, layer):
    """Whether the layer's forward value is summed from its sign-split maps (see LRP)."""
    del layer
    return False

  def combine(self, z, inputs, tangents, jvp):
    del z, inputs, tangents, jvp
    return None

  def unary(self, name, z, a, t, jvp):
    del name, z, a, t, jvp
    return None

  def bilinear(self, prod, a, b, z):
    """z = prod(a, b), both input-dependent: the uniform rule (AttnLRP): each operand's
    term gets half, so x . map stays equal to z for a product of two linear maps."""
    del z
    return 0.5 * (prod(a.t, b.p) + prod(a.p, b.t))

  def softmax(self, a, s, axes):
    """softmax inside the network: its exact JVP s * (t - sum(s * t))."""
    return s * (a.t - jnp.sum(s * a.t, axis=axes, keepdims=True))

  def seed(self, logits, cot):
    del logits
    return cot

  def finish(self, x, ref, c):
    del ref
    return c * x


class WBP(_GradientSpace):
  """m = h(v) = (g(v) - g(0)) / v (limit g'(0) at 0), seed 004 Table 1. Where g(0) is not
  finite (log, rsqrt, 1 / v) the spec's literal h(v) = g(v) / v, and where that is not
  finite either (v = 0) the local slope g'(v), so that the map stays finite."""
  name = "wbp"

  def activation(self, act: Activation):
    v = act.v.p
    finfo = jnp.finfo(jnp.result_type(v))
    g0, d0 = value_and_slope(act.g, jnp.zeros_like(v))
    g0 = jnp.where(jnp.isfinite(g0), g0, jnp.zeros_like(g0))
    tol = jnp.where(g0 == 0, finfo.tiny, jnp.sqrt(finfo.eps))
    small = jnp.abs(v) <= tol
    m = jnp.where(small, d0, (act.y - g0) / jnp.where(small, jnp.ones_like(v), v))
    m = jnp.where(jnp.isfinite(m), m, slope(act.g, v))  # v = 0 where g(0) is not finite
    if act.homogeneous:
      # g(v) / v is piecewise constant (ReLU: 1[v > 0]): its exact derivative is zero, so
      # differentiating it (PPI's second order) would only add a backward pass through the
      # network that sums to zero. Same value, no gradient path.
      m = jax.lax.stop_gradient(m)
    return m * act.v.t


class DeepLIFT(_GradientSpace):
  """Rescale rule: m = (g(v) - g(v_ref)) / (v - v_ref), limit g'(v)."""
  name = "deeplift"
  needs_ref = True
  pairs = None  # set per call when the reference pass runs on one row (rules.py)
  ref_consts = None

  def activation(self, act: Activation):
    v, vr = act.v.p, act.v.r
    finfo = jnp.finfo(jnp.result_type(v))
    dv = v - vr
    small = jnp.abs(dv) <= jnp.sqrt(finfo.eps) * jnp.maximum(1.0, jnp.abs(v))
    m = jnp.where(small, slope(act.g, v),
                  (act.y - act.yr) / jnp.where(small, jnp.ones_like(dv), dv))
    return m * act.v.t

  def bilinear(self, prod, a, b, z):
    """The exact split of a product's change: a b - a' b' = da (b + b') / 2 + (a + a') / 2 db
    (Shapley values of the two operands), so summation-to-delta holds through it."""
    del z
    return prod(a.t, 0.5 * (b.p + b.r)) + prod(0.5 * (a.p + a.r), b.t)

  def finish(self, x, ref, c):
    return c * (x - ref)


def _clamped(mask):
  """t -> mask * t forward; cotangent -> mask * relu(cotangent) backward."""

  @jax.custom_vjp
  def f(t):
    return mask * t

  def fwd(t):
    return mask * t, None

  def bwd(_, ct):
    return (mask * jnp.maximum(ct, 0),)

  f.defvjp(fwd, bwd)
  return f


class GuidedBackprop(_GradientSpace):
  """At a positively homogeneous activation (ReLU, leaky ReLU): grad * g'(v) * 1[grad > 0]
  (Springenberg et al. 2015; Captum's GuidedBackprop clamps at ReLU modules); other
  activations use their gradient. The map is the modified gradient (not times x)."""
  name = "guided_backprop"

  def activation(self, act: Activation):
    m = jax.lax.stop_gradient(slope(act.g, act.v.p))
    if act.homogeneous:
      return _clamped(m)(act.v.t)
    return m * act.v.t

  def finish(self, x, ref, c):
    del x, ref
    return c


class Deconvnet(GuidedBackprop):
  """At a positively homogeneous activation: relu(grad), ignoring v (Zeiler & Fergus 2014)."""
  name = "deconvnet"

  def activation(self, act: Activation):
    if act.homogeneous:
      return _clamped(jnp.ones_like(act.v.p))(act.v.t)
    return slope(act.g, act.v.p) * act.v.t


class LRP:
  """Relevance space: activations pass relevance unchanged, each canonized affine layer
  gets the rule of ``composite``, sums of several terms (skip connections) and unmerged
  additions of constants the Norm rule (relevance split by contribution), unmerged scales
  pass relevance through; the output relevance is ``cot * logits`` (the target logit)."""
  name = "lrp"
  needs_ref = False

  def __init__(self, composite: Composite):
    self.composite = composite
    self.layer_names: list[str] = []   # the layers the interpretation met (check_names)
    self.matched: set[int] = set()      # the composite's name patterns that chose a rule

  def _rule(self, layer: Layer):
    rule, i = self.composite.rule_and_pattern(layer)
    self.layer_names.append(layer.name)
    if i is not None:
      self.matched.add(i)
    return rule

  def activation(self, act: Activation):
    return act.v.t

  def layer(self, layer: Layer):
    return self._rule(layer)(layer)

  def signed_forward(self, layer: Layer) -> bool:
    """True for layer rules that compute the maps of the positive and negative weights of
    the input anyway (alpha-beta, gamma): the forward value is their sum (one map fewer)."""
    return bool(getattr(self._rule(layer), "signed", False))

  def check_names(self) -> None:
    """After an interpretation: raise if a name pattern of the composite chose no layer
    (a typo would otherwise silently leave every layer to its kind's rule)."""
    unused = [p for i, (p, _) in enumerate(self.composite.names) if i not in self.matched]
    if not unused or not self.layer_names:
      return
    names = sorted({n for n in self.layer_names if n})
    if not names:
      raise ValueError(
          f"composite: name pattern(s) {unused} match no layer: this function's layers carry "
          "no names (Flax linen, Keras, Equinox and wrapped Flax NNX modules name theirs, "
          "e.g. 'CNN/conv1', 'sequential/dense', 'vmap(eqx.nn.Conv)'; pass an NNX module as "
          "jaxplain.wrap(module); plain functions carry none); choose rules by layer kind "
          "instead (dense=, conv=, first=, pool=, sum=)")
    raise ValueError(f"composite: name pattern(s) {unused} match no layer (patterns are "
                     f"re.fullmatch-ed against the layers' name stacks); the layers here: "
                     f"{names}")

  def _norm(self):
    rule = self.composite.sum
    return getattr(rule, "stabilizer", getattr(rule, "epsilon", 1e-6))

  def combine(self, z, inputs, tangents, jvp):
    return _div(jvp(*[a * t for a, t in zip(inputs, tangents)]), _stab(z, self._norm()))

  def unary(self, name, z, a, t, jvp):
    if name in ("add", "sub", "add_any"):
      return _div(jvp(a * t), _stab(z, self._norm()))
    return t

  def bilinear(self, prod, a, b, z):
    """AttnLRP's uniform rule: R_a = R_b = (epsilon rule of the product) / 2."""
    num = prod(a.p * a.t, b.p) + prod(a.p, b.p * b.t)
    return 0.5 * _div(num, _stab(z, self._norm()))

  def softmax(self, a, s, axes):
    """AttnLRP (Achtibat et al. 2024, Prop. 3.1; as lxt's ``softmax_fn``):
    R_in = a * (R - s * sum(R)) with ``a`` the softmax input, ``s`` its output; the tangent
    is its transpose, a * t - sum(s * a * t).

    A first-order Taylor decomposition at ``a`` with a bias term, so NOT conservative: per
    softmax row sum(R_in) = sum_j R_j (a_j - sum_i s_i a_i), which is sum(R) minus the bias
    share sum_j R_j (1 - a_j + sum_i s_i a_i). In gradient terms (R = s * g), the relevance
    it passes is a * (exact softmax gradient of g): on a bias-free network at epsilon = 0,
    LRP with it equals x * grad of the network with LayerNorm divisors detached, products
    halved and activation gradients g(v) / v (tests/test_rules_transformer.py)."""
    at = a.p * a.t
    return at - jnp.sum(s * at, axis=axes, keepdims=True)

  def seed(self, logits, cot):
    return cot * logits

  def finish(self, x, ref, c):
    del x, ref
    return c
