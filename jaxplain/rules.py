"""Modified back-propagation on any JAX function: WBP, LRP (rules and composites), DeepLIFT,
guided backprop and deconvnet.

One engine serves every method. ``f`` (any pure batched ``f(x) -> logits``: a Flax linen
``apply`` closure, a Flax NNX module call, a plain ``jnp`` function) is traced to a jaxpr and
interpreted primitive by primitive (``jaxplain._jaxpr``). Along the ordinary forward pass the
interpreter builds a *modified tangent*, linear in the input perturbation, asking a rule
value (``jaxplain._rules``) at every nonlinearity and affine layer; the map is ``jax.vjp``
of that linear map -- about one backward pass -- and, as the rules are ordinary JAX
functions of the forward values, it is differentiable to any order w.r.t. the parameters
``f`` closes over (PPI trains through WBP with second-order gradients).

Canonization: every dense / conv / average-pool / reduce_sum equation is merged with the
chain of elementwise affine maps by constants that follows it (bias, inference batch norm,
the 1 / n of a mean), so that a rule sees one affine layer ``z = s * A(a) + c``, as Zennit's
canonizers merge batch norm into the preceding convolution.

Methods:

* **WBP** (seed 004, sec. 3.2, Table 1 and eqs. 6-10): each nonlinearity scales the tangent
  by ``h(v) = g(v) / v`` (limit ``g'(0)`` at ``v = 0``; ``(g(v) - g(0)) / v`` for
  ``g(0) != 0``: the constant is dropped like a bias); linear maps are exact, so
  ``s_m(x) = W~0[m] * x`` (eq. 7). On networks of ReLU, max-pool, conv, dense and batch norm
  this is exactly gradient x input.
* **DeepLIFT rescale** (Shrikumar et al. 2017): ``m = (g(v) - g(v_ref)) / (v - v_ref)`` with
  the limit ``g'(v)``; attributions ``(x - x_ref) * multiplier``. Max-pool routes with the
  arg-max at ``x``.
* **LRP** (Bach et al. 2015; Montavon et al. 2019; Zennit 0.5.1 conventions): relevance
  passes activations unchanged; each affine layer gets the rule of a :class:`Composite`
  (epsilon, z+, alpha-beta, gamma, flat, w-square, z-box; ``Norm`` at average pooling and
  sums); max pooling routes relevance to the arg-max; a sum of several input-dependent terms
  (a skip connection) splits relevance in proportion to the terms, so it is conserved
  through ResNets (up to stabilisers and biases); elementwise scales by constants that are
  not merged into a layer pass relevance through, unmerged additions of constants absorb
  their share (Norm). The output relevance is the target logit.
* **Guided backprop / deconvnet**: the gradient with the ReLU backward clamped (see each).

Output: ``f``'s output is explained as given, with the same ``output=`` choices as
:func:`jaxplain.gradient`. A trailing ``jax.nn.softmax`` / ``log_softmax`` (a probability
head, as Keras applications have) is not propagated by the rule: it is differentiated
exactly, i.e. its Jacobian maps the cotangent of the explained score to the logits before
it. So ``wbp(softmax(g))`` is ``wbp(g, output="softmax")`` and, on a ReLU network, equals
``gradient_x_input(softmax(g))``: one ``f``, consistent maps across methods. To explain
the pre-softmax score of such a model, pass the function without its softmax.

Anything the engine has no rule for (a product of two different input-dependent values,
attention, sorting, ...) raises :class:`UnsupportedPrimitiveError` naming the primitive; it
never silently returns a wrong map. A product that only feeds ``jax.lax.stop_gradient`` is
a constant. Custom elementwise activations should be wrapped in ``jax.jit`` (as ``jax.nn``
does) so that they are recognised as one nonlinearity.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _jaxpr
from jaxplain import _pack
from jaxplain import _rules
from jaxplain import _validate
from jaxplain._batching import unrolled
from jaxplain._jaxpr import UnsupportedPrimitiveError as UnsupportedPrimitiveError
from jaxplain._rules import AlphaBeta as AlphaBeta
from jaxplain._rules import Composite as Composite
from jaxplain._rules import Epsilon as Epsilon
from jaxplain._rules import Flat as Flat
from jaxplain._rules import Gamma as Gamma
from jaxplain._rules import Norm as Norm
from jaxplain._rules import WSquare as WSquare
from jaxplain._rules import ZBox as ZBox
from jaxplain._rules import ZPlus as ZPlus
from jaxplain._validate import check_batched, check_logits, check_target
from jaxplain.gradients import OUTPUTS, _cotangent

__all__ = ["wbp", "lrp", "deeplift", "guided_backprop", "deconvnet", "Composite", "Epsilon",
           "Norm", "ZPlus", "AlphaBeta", "Gamma", "Flat", "WSquare", "ZBox",
           "UnsupportedPrimitiveError"]

Array = Any


# The Args entries every method shares, filled into each docstring at its markers by _doc.
_SHARED_ARGS = {
    "<f, x, target, output>": """\
f: pure batched function ``(B, ...) -> (B, K)`` logits (any JAX code built from supported
      primitives; see the module docstring). Its output is explained as given, as by
      :func:`jaxplain.gradient`: a trailing ``jax.nn.softmax`` / ``log_softmax`` is not
      propagated by the rule but differentiated exactly (see the module docstring).
    x: input, shape (B, ...); or a tuple or dict of such batches (a model with
      several inputs: the maps come back in that structure, each shaped like its input).
    target: an int, a (B,) int array (one class per example), a (B, T) int array (T classes
      per example) or ``"all"`` (every class 0..K-1, T = K). With several targets the map
      has shape (B, T, ...) and the forward pass is shared.
    output: which score of ``f(x)`` is explained, as in :func:`jaxplain.gradient`:
      ``"logit"`` (``f(x)[t]``, default), ``"log_softmax"``, ``"softmax"`` or
      ``"cross_entropy"``; the rule is seeded with the cotangent of that score.""",
    "<target_chunk>":
        "target_chunk: with several targets, how many are pulled back at once (memory bound).",
}


def _doc(fn):
  """Fill the shared Args entries (``_SHARED_ARGS``) into ``fn``'s docstring."""
  for marker, text in _SHARED_ARGS.items():
    if fn.__doc__:  # None under python -OO
      fn.__doc__ = fn.__doc__.replace(marker, text)
  return fn


def _targets(target: Any, batch: int, num_classes: int) -> tuple[Array, bool]:
  """(B, T) int32 targets and whether the caller asked for several per example."""
  if isinstance(target, str):
    if target != "all":
      raise ValueError(f"target: expected an int, a (B,) or (B, T) int array or 'all', "
                       f"got {target!r}")
    return jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32),
                            (batch, num_classes)), True
  t = jnp.asarray(target)
  if t.ndim == 2:
    if not jnp.issubdtype(t.dtype, jnp.integer):
      raise TypeError(f"target: expected an integer (B, T) array, got dtype {t.dtype}")
    if t.shape[0] != batch:
      raise ValueError(f"target: a (B, T) array needs B = {batch} rows, got shape {t.shape}")
    if not isinstance(t, jax.core.Tracer):
      tn = np.asarray(t)
      if tn.size and (tn.min() < 0 or tn.max() >= num_classes):
        raise ValueError(f"target: class index out of range [0, {num_classes}): "
                         f"got values in [{tn.min()}, {tn.max()}]")
    return t.astype(jnp.int32), True
  return check_target(t, batch, num_classes)[:, None], False


def _modified_backprop(f: Callable, x: Array, target: Any, rule, *, output: str = "logit",
                       reference: Array | None = None,
                       target_chunk: int | None = None) -> Array:
  x = check_batched(x, "x")
  if output not in OUTPUTS:
    raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
  _validate.check_chunk(target_chunk, "target_chunk")
  closed, out_shape = _validate.call_model(
      lambda: jax.make_jaxpr(f, return_shape=True)(jax.ShapeDtypeStruct(x.shape, x.dtype)), f, x)
  check_logits(out_shape, x.shape[0], f=f, x=x)
  jaxpr = closed.jaxpr
  if len(jaxpr.invars) != 1 or len(jaxpr.outvars) != 1:
    raise ValueError(f"f: expected a function of one array returning one (B, K) logits array; "
                     f"its jaxpr has {len(jaxpr.invars)} inputs, {len(jaxpr.outvars)} outputs")
  invars, constvars, consts, eqns, outvars = _jaxpr.unwrap_single_call(
      jaxpr.invars, jaxpr.constvars, closed.consts, jaxpr.eqns, jaxpr.outvars)
  out, norm = _jaxpr.strip_output_normalisation(eqns, outvars[0])
  eqns = _jaxpr.dce(eqns, [out])
  ref = reference if reference is not None else x
  if rule.needs_ref and ref.shape[0] == 1 and x.shape[0] > 1:
    ref = _one_row_reference(f, x, ref, rule, (invars, constvars, consts, eqns, out, norm))

  def tangent(dx):
    (val,) = _jaxpr.evaluate(eqns, invars, constvars, [out], consts,
                             [_jaxpr.Val(x, ref, dx, True, True)], rule)
    if val.t is None:
      raise ValueError(f"{rule.name}: the output of f does not depend on x through a "
                       "differentiable path")
    return val.t, val.p

  _, pullback, logits = jax.vjp(tangent, jnp.zeros_like(x), has_aux=True)
  check_logits(logits, x.shape[0])
  t, several = _targets(target, x.shape[0], logits.shape[1])
  # f's output is explained as given (as jaxplain.gradient does): a trailing softmax is not
  # propagated by the rule but differentiated exactly, so its Jacobian maps the cotangent of
  # the explained score from f's output to the pre-normalisation logits.
  if norm is None:
    fout, to_logits = logits, lambda c: c
  else:
    nfn = jax.nn.softmax if norm == "softmax" else jax.nn.log_softmax
    fout, nvjp = jax.vjp(nfn, logits)
    to_logits = lambda c: nvjp(c)[0]
    _validate.warn_if_probabilities(fout)

  def one(tj):
    cot = rule.seed(logits, to_logits(_cotangent(fout, tj, output)))
    (c,) = pullback(cot.astype(logits.dtype))
    return rule.finish(x, ref, c)

  if not several:  # NaN for a traced out-of-range target, as in every other method
    return _validate.select_valid(one(t[:, 0]), t[:, 0], logits.shape[1])
  maps = unrolled(jax.vmap(one), t.T, target_chunk)  # (T, B, ...)
  return jnp.moveaxis(maps, 0, 1)


def _one_row_reference(f, x, ref, rule, traced):
  """A reference equal for every example runs its pass on one row: ``f`` is traced at batch
  1 too and zipped with the batch-B trace equation by equation (``rule.pairs``), so the
  reference values have a leading 1 and broadcast against the input's. Costs no forward at
  batch B (DeepLIFT at the zero reference: about one gradient). Where the two traces differ
  in structure, the reference is broadcast to the batch instead."""
  invars, constvars, consts, eqns, out, norm = traced
  try:
    closed1 = jax.make_jaxpr(f)(jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype))
    j1 = closed1.jaxpr
    _, cv1, c1, eq1, ov1 = _jaxpr.unwrap_single_call(j1.invars, j1.constvars, closed1.consts,
                                                     j1.eqns, j1.outvars)
    out1, norm1 = _jaxpr.strip_output_normalisation(eq1, ov1[0])
    eq1 = _jaxpr.dce(eq1, [out1])
  except Exception:  # pylint: disable=broad-except  (any failure: the batch-B reference)
    return jnp.broadcast_to(ref, x.shape)
  pairs, ref_consts = {}, dict(zip(constvars, c1))
  if (norm1 != norm or len(cv1) != len(constvars)
      or not _jaxpr.pair_eqns(eqns, eq1, pairs, ref_consts)):
    return jnp.broadcast_to(ref, x.shape)
  rule.pairs, rule.ref_consts = pairs, ref_consts
  return ref


@_validate.accepts_nnx
@_pack.several_inputs()
@_doc
def wbp(f: Callable[[Array], Array], x: Array, target: Any, *, output: str = "logit",
        target_chunk: int | None = None) -> Array:
  """Weight Back-Propagation saliency (seed 004, sec. 3.2, eq. 7 and Table 1).

  ``s_m(x) = W~0[m] * x`` where the saliency matrix ``W~`` is collapsed from the logits back to
  the input: linear maps pass through with the bias dropped, batch norm scales, max-pool
  routes, average-pool distributes and an elementwise nonlinearity ``g`` scales by
  ``h(v) = g(v) / v`` (limit ``g'(0)`` at 0; ``(g(v) - g(0)) / v`` when ``g(0) != 0``).

  Args:
    <f, x, target, output>
    <target_chunk>

  Returns:
    Saliency map shaped like ``x`` (or (B, T, ...)). Jittable, vmappable and differentiable
    w.r.t. whatever ``f`` closes over.

  >>> import jax.numpy as jnp
  >>> W = jnp.array([[1., -1.], [2., 0.5]])
  >>> f = lambda x: jnp.tanh(x @ W)
  >>> wbp(f, jnp.array([[1., 0.]]), 0)  # tanh(1) / 1 * W[:, 0] * x
  Array([[0.7615942, 0.       ]], dtype=float32)
  """
  return _modified_backprop(f, x, target, _rules.WBP(), output=output,
                            target_chunk=target_chunk)


@_validate.accepts_nnx
@_pack.several_inputs("reference")
@_doc
def deeplift(f: Callable[[Array], Array], x: Array, target: Any, *,
             reference: Array | None = None, output: str = "logit",
             target_chunk: int | None = None) -> Array:
  """DeepLIFT with the rescale rule (Shrikumar et al. 2017), zero reference by default.

  Each elementwise nonlinearity scales by ``(g(v) - g(v_ref)) / (v - v_ref)`` (``g'(v)`` where
  ``v ~ v_ref``), linear maps pass through; attributions are ``(x - ref) * multiplier`` and
  sum to ``f(x)[t] - f(ref)[t]`` on networks of linear maps and elementwise nonlinearities
  (summation-to-delta). Max-pooling routes with the arg-max at ``x``.

  Args:
    <f, x, target, output>
    reference: reference input broadcastable to ``x`` (default zeros). One equal for
      every example (the default, no batch axis or a leading 1) has its pass run on one
      row (``f`` traced at batch 1 too), so DeepLIFT costs about one gradient; ``f`` must
      treat the examples of a batch independently, as every method here assumes.
    <target_chunk>

  Returns:
    Attributions shaped like ``x`` (or (B, T, ...)).

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.tanh(x @ jnp.array([[2.], [1.]]) - 1.0)
  >>> a = deeplift(f, jnp.array([[1., 1.]]), 0)
  >>> delta = f(jnp.ones((1, 2))) - f(jnp.zeros((1, 2)))  # summation to delta
  >>> round(float(a.sum()), 4), round(float(delta[0, 0]), 4)
  (1.7256, 1.7256)
  """
  x = check_batched(x, "x")
  # One row when the reference is the same for every example (the default zeros, or a
  # reference without a batch axis / with a leading 1): its pass then runs at batch 1.
  # The barrier keeps XLA from constant-folding the whole reference pass at compile time.
  row = (1,) + x.shape[1:]
  ref = (jax.lax.optimization_barrier(jnp.zeros(row, x.dtype)) if reference is None
         else jnp.asarray(reference, x.dtype))
  try:
    jnp.broadcast_shapes(jnp.shape(ref), x.shape)
    if jnp.ndim(ref) < x.ndim or jnp.shape(ref)[0] == 1:
      ref = jnp.broadcast_to(ref, row)
    ref = jnp.broadcast_to(ref, row if ref.shape[0] == 1 else x.shape)
  except ValueError as e:
    raise ValueError(f"reference: expected an array broadcastable to x.shape={x.shape}, "
                     f"got shape {jnp.shape(reference)}") from e
  if reference is not None:
    _validate.check_finite(reference, "reference")
  return _modified_backprop(f, x, target, _rules.DeepLIFT(), output=output, reference=ref,
                            target_chunk=target_chunk)


@_validate.accepts_nnx
@_pack.several_inputs("low", "high")
@_doc
def lrp(f: Callable[[Array], Array], x: Array, target: Any, *, epsilon: float = 1e-6,
        composite: Any = None, low: Any = None, high: Any = None, output: str = "logit",
        target_chunk: int | None = None) -> Array:
  """Layer-wise Relevance Propagation (Bach et al. 2015) with per-layer rules, on any JAX
  function.

  Every affine layer (a dense / conv / average-pool / sum equation with the constant scales
  and shifts that follow it merged in: bias, inference batch norm) gets a rule of
  ``composite``; relevance passes elementwise activations unchanged and max pooling routes
  it to the arg-max; the output relevance is the target logit. Sums of several
  input-dependent terms (skip connections) split relevance in proportion to the
  contributions (Zennit's ``Norm`` on its ``Sum``), so it is not doubled.

  Args:
    <f, x, target, output>
    epsilon: stabiliser (>= 0) of the epsilon rule, added with the sign of ``z``.
    composite: ``None`` (the epsilon rule at dense and conv layers, ``Norm`` with stabiliser
      ``min(epsilon, 1e-6)`` at average pooling and sums), a name
      (Zennit's meanings and defaults, stabiliser 1e-6): ``"epsilon_plus"`` (conv z+, dense
      epsilon), ``"epsilon_alpha2_beta1"`` (conv alpha 2 beta 1), ``"epsilon_plus_flat"``
      (epsilon_plus with a flat first layer), ``"epsilon_gamma_box"`` (first layer z-box
      with ``low`` / ``high``, conv gamma 0.25, dense epsilon); pooling and sums get
      ``Norm``. Or a :class:`Composite`. Where Zennit applies a first-layer rule to
      convolutions only, ours applies it to the first dense or conv layer.
    low: lowest input value(s) for z-box (broadcastable to ``x``).
    high: highest input value(s) for z-box.
    <target_chunk>

  Returns:
    Relevance shaped like ``x`` (or (B, T, ...)); it sums to the target logit up to the
    relevance absorbed by biases and stabilisers.

  >>> import jax, jax.numpy as jnp
  >>> W = jnp.array([[1., -1.], [2., 1.]])
  >>> f = lambda x: jax.nn.relu(x @ W) @ jnp.ones((2, 1))
  >>> lrp(f, jnp.array([[1., 1.]]), 0, epsilon=0.0)  # relevance conserved: sums to f(x) = 3
  Array([[1., 2.]], dtype=float32)
  """
  if not float(epsilon) >= 0:
    raise ValueError(f"epsilon: expected a number >= 0, got {epsilon}")
  comp = _rules.make_composite(composite, float(epsilon), low, high)
  rule = _rules.LRP(comp)
  out = _modified_backprop(f, x, target, rule, output=output, target_chunk=target_chunk)
  rule.check_names()
  return out


@_validate.accepts_nnx
@_pack.several_inputs()
@_doc
def guided_backprop(f: Callable[[Array], Array], x: Array, target: Any, *,
                    output: str = "logit", target_chunk: int | None = None) -> Array:
  """Guided backpropagation (Springenberg et al. 2015), seeded with 1 at the target.

  The gradient, except that at every ReLU (any positively homogeneous activation: leaky
  ReLU, ...) the backward signal is ``grad * g'(v) * 1[grad > 0]``, as Captum's
  ``GuidedBackprop``. Other activations use their gradient.

  Args:
    <f, x, target, output>
    <target_chunk>

  Returns:
    The modified gradient, shaped like ``x`` (or (B, T, ...)).

  >>> import jax, jax.numpy as jnp
  >>> W1, W2 = jnp.array([[1., -1.]]), jnp.array([[1.], [-1.]])
  >>> f = lambda x: jax.nn.relu(x @ W1) @ W2
  >>> guided_backprop(f, jnp.array([[2.]]), 0)  # the gradient is 1: positive, kept
  Array([[1.]], dtype=float32)
  """
  return _modified_backprop(f, x, target, _rules.GuidedBackprop(), output=output,
                            target_chunk=target_chunk)


@_validate.accepts_nnx
@_pack.several_inputs()
@_doc
def deconvnet(f: Callable[[Array], Array], x: Array, target: Any, *, output: str = "logit",
              target_chunk: int | None = None) -> Array:
  """Deconvnet (Zeiler & Fergus 2014), seeded with 1 at the target: at every ReLU the
  backward signal is ``relu(grad)``, whatever the sign of the pre-activation.

  Args:
    <f, x, target, output>
    <target_chunk>

  Returns:
    The modified gradient, shaped like ``x`` (or (B, T, ...)).

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x: jax.nn.relu(x @ jnp.array([[1.]])) @ jnp.array([[2.]])
  >>> deconvnet(f, jnp.array([[-1.]]), 0)  # the ReLU is off, deconvnet passes anyway
  Array([[2.]], dtype=float32)
  """
  return _modified_backprop(f, x, target, _rules.Deconvnet(), output=output,
                            target_chunk=target_chunk)
