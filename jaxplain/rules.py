"""Modified back-propagation on any JAX function: WBP, LRP-epsilon and DeepLIFT (rescale).

One engine serves the three methods. ``f`` (any pure batched ``f(x) -> logits``: a Flax linen
``apply`` closure, a Flax NNX module call, a plain ``jnp`` function) is traced to a jaxpr and
interpreted primitive by primitive (``jaxplain._jaxpr``). Along the ordinary forward pass the
interpreter builds a *modified tangent*: linear primitives (dense, conv, batch norm in
inference, reshape, pooling, ...) keep their true JVP, so biases drop out and max-pooling
routes to the arg-max; each elementwise nonlinearity ``y = g(v)`` multiplies the tangent by the
method's factor ``m`` instead of ``g'(v)``. The map is then ``jax.vjp`` of that linear tangent
map -- about one backward pass -- and, as the factors are ordinary JAX functions of the
forward values, it is differentiable to any order w.r.t. the parameters ``f`` closes over
(PPI trains through WBP with second-order gradients).

Rules (``m`` for a nonlinearity y = g(v); every other primitive uses its exact JVP):

* **WBP** (seed 004, sec. 3.2, Table 1 and eqs. 6-10): ``m = h(v) = g(v) / v``, with the limit
  ``g'(0)`` at ``v = 0``; for ``g(0) != 0`` (sigmoid, exp) ``h = (g(v) - g(0)) / v`` -- the
  constant ``g(0)`` is dropped like a bias. ``s_m(x) = W~0[m] * x`` (eq. 7). On networks of
  ReLU, max-pool, conv, dense and batch norm this is exactly gradient x input.
* **DeepLIFT rescale** (Shrikumar et al. 2017): ``m = (g(v) - g(v_ref)) / (v - v_ref)`` with the
  limit ``g'(v)``; attributions ``(x - x_ref) * multiplier``. With piecewise-linear routing
  (max-pool) the routing of ``x`` is used.
* **LRP-epsilon** (Bach et al. 2015): a "layer" is the affine map between two nonlinearities
  (or between the input / a nonlinearity and the output): every linear primitive on the way
  (dot_general, conv, batch-norm scale, pooling, reshapes, additions of skip connections) plus
  the constants added to it (biases, batch-norm shift) form ``z = A(a) + b``, and ``z`` is the
  value entering the next nonlinearity (or the output logit). The epsilon rule
  ``R_a = a * A^T (R_z / (z + eps * sign(z)))`` then becomes a modified gradient with
  ``m = g(z) / (z + eps * sign(z))`` at each nonlinearity and a start value
  ``z_t / (z_t + eps * sign(z_t))`` at the target logit; the relevance entering the output
  is the target logit ``z_t``. An addition of two input-dependent terms (a skip connection)
  passes the same ``R_z / z`` to both, i.e. splits the relevance in proportion to their
  contributions, so relevance is conserved through ResNets (up to epsilon and biases).
  Batch norm in inference is merged into the preceding conv (it is part of the same affine
  map), as LRP "canonization" does.

Output normalisation: the methods explain the *logits* (the paper's ``v_L``, "prior to the
softmax"). If ``f`` ends with ``jax.nn.softmax`` or ``jax.nn.log_softmax``, that last step is
cut off and the map explains the pre-normalisation logit of the target class.

Anything the engine has no rule for (a product of two different input-dependent values,
attention, sorting, ...) raises :class:`UnsupportedPrimitiveError` naming the primitive; it
never silently returns a wrong map. Custom elementwise activations should be wrapped in
``jax.jit`` (as ``jax.nn`` does) so that they are recognised as one nonlinearity.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxplain import _jaxpr
from jaxplain import _validate
from jaxplain._jaxpr import UnsupportedPrimitiveError as UnsupportedPrimitiveError
from jaxplain._validate import check_batched, check_logits, check_target

__all__ = ["wbp", "lrp", "deeplift", "UnsupportedPrimitiveError"]

Array = Any


def _modified_backprop(f: Callable, x: Array, target: Any, rule: _jaxpr.Rule,
                       reference: Array | None = None) -> Array:
  x = check_batched(x, "x")
  closed, out_shape = _validate.call_model(
      lambda: jax.make_jaxpr(f, return_shape=True)(jax.ShapeDtypeStruct(x.shape, x.dtype)), f, x)
  check_logits(out_shape, x.shape[0], f=f, x=x)
  jaxpr = closed.jaxpr
  if len(jaxpr.invars) != 1 or len(jaxpr.outvars) != 1:
    raise ValueError(f"f: expected a function of one array returning one (B, K) logits array; "
                     f"its jaxpr has {len(jaxpr.invars)} inputs, {len(jaxpr.outvars)} outputs")
  invars, constvars, consts, eqns, outvars = _jaxpr.unwrap_single_call(
      jaxpr.invars, jaxpr.constvars, closed.consts, jaxpr.eqns, jaxpr.outvars)
  out = _jaxpr.strip_output_normalisation(eqns, outvars[0])
  eqns = _jaxpr.dce(eqns, [out])
  with_ref = reference is not None
  ref = reference if with_ref else x

  def tangent(dx):
    (val,) = _jaxpr.evaluate(eqns, invars, constvars, [out], consts,
                             [_jaxpr.Val(x, ref, dx, True)], rule, with_ref)
    if val.t is None:
      raise ValueError(f"{rule.name}: the output of f does not depend on x through a "
                       "differentiable path")
    return val.t, (val.p, val.r)

  _, pullback, (logits, ref_logits) = jax.vjp(tangent, jnp.zeros_like(x), has_aux=True)
  del ref_logits
  check_logits(logits, x.shape[0])
  t = check_target(target, x.shape[0], logits.shape[1])
  cot = jax.nn.one_hot(t, logits.shape[1], dtype=logits.dtype)
  if rule.name == "lrp":
    z = jnp.take_along_axis(logits, t[:, None], axis=1)
    den = z + rule.epsilon * jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)
    zero = den == 0
    cot = cot * jnp.where(zero, 0.0, z / jnp.where(zero, 1.0, den)).astype(z.dtype)
  (c,) = pullback(cot)
  att = c * (x - ref) if with_ref else c * x
  return _validate.select_valid(att, t, logits.shape[1])  # NaN for a traced bad target


def wbp(f: Callable[[Array], Array], x: Array, target: Any) -> Array:
  """Weight Back-Propagation saliency (seed 004, sec. 3.2, eq. 7 and Table 1).

  ``s_m(x) = W~0[m] * x`` where the saliency matrix ``W~`` is collapsed from the logits back to
  the input: linear maps pass through with the bias dropped, batch norm scales, max-pool
  routes, average-pool distributes and an elementwise nonlinearity ``g`` scales by
  ``h(v) = g(v) / v`` (limit ``g'(0)`` at 0; ``(g(v) - g(0)) / v`` when ``g(0) != 0``).

  Args:
    f: pure batched function ``(B, ...) -> (B, K)`` logits (any JAX code built from supported
      primitives; see the module docstring).
    x: input, shape (B, ...).
    target: class index, an int or a (B,) int array (one per example).

  Returns:
    Saliency map shaped like ``x``. Jittable, vmappable and differentiable w.r.t. whatever
    ``f`` closes over.

  >>> import jax.numpy as jnp
  >>> W = jnp.array([[1., -1.], [2., 0.5]])
  >>> f = lambda x: jnp.tanh(x @ W)
  >>> wbp(f, jnp.array([[1., 0.]]), 0)  # tanh(1) / 1 * W[:, 0] * x
  Array([[0.7615942, 0.       ]], dtype=float32)
  """
  return _modified_backprop(f, x, target, _jaxpr.Rule("wbp"))


def deeplift(f: Callable[[Array], Array], x: Array, target: Any, *,
             reference: Array | None = None) -> Array:
  """DeepLIFT with the rescale rule (Shrikumar et al. 2017), zero reference by default.

  Each elementwise nonlinearity scales by ``(g(v) - g(v_ref)) / (v - v_ref)`` (``g'(v)`` where
  ``v ~ v_ref``), linear maps pass through; attributions are ``(x - ref) * multiplier`` and
  sum to ``f(x)[t] - f(ref)[t]`` on networks of linear maps and elementwise nonlinearities
  (summation-to-delta). Max-pooling routes with the arg-max at ``x``.

  Args:
    f: pure batched function ``(B, ...) -> (B, K)`` logits.
    x: input, shape (B, ...).
    target: an int or a (B,) int array.
    reference: reference input broadcastable to ``x`` (default zeros).

  Returns:
    Attributions shaped like ``x``.

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.tanh(x @ jnp.array([[2.], [1.]]) - 1.0)
  >>> a = deeplift(f, jnp.array([[1., 1.]]), 0)
  >>> delta = f(jnp.ones((1, 2))) - f(jnp.zeros((1, 2)))  # summation to delta
  >>> round(float(a.sum()), 4), round(float(delta[0, 0]), 4)
  (1.7256, 1.7256)
  """
  x = check_batched(x, "x")
  # The barrier keeps XLA from constant-folding the whole reference pass at compile time.
  ref = (jax.lax.optimization_barrier(jnp.zeros_like(x)) if reference is None
         else jnp.asarray(reference, x.dtype))
  try:
    ref = jnp.broadcast_to(ref, x.shape)
  except ValueError as e:
    raise ValueError(f"reference: expected an array broadcastable to x.shape={x.shape}, "
                     f"got shape {jnp.shape(reference)}") from e
  if reference is not None:
    _validate.check_finite(reference, "reference")
  return _modified_backprop(f, x, target, _jaxpr.Rule("deeplift"), reference=ref)


def lrp(f: Callable[[Array], Array], x: Array, target: Any, *, epsilon: float = 1e-6) -> Array:
  """Layer-wise Relevance Propagation, epsilon rule (Bach et al. 2015), on any JAX function.

  For each affine "layer" ``z = A(a) + b`` (the linear primitives between two nonlinearities,
  biases included in ``z``): ``R_a = a * A^T (R_z / (z + epsilon * sign(z)))``; relevance
  passes elementwise activations unchanged; the output relevance is the target logit.
  Skip connections split relevance in proportion to the contributions of the summands.

  Args:
    f: pure batched function ``(B, ...) -> (B, K)`` logits.
    x: input, shape (B, ...).
    target: an int or a (B,) int array.
    epsilon: stabiliser (>= 0) added with the sign of ``z`` to every denominator.

  Returns:
    Relevance shaped like ``x``; it sums to the target logit up to the relevance absorbed by
    biases and epsilon.

  >>> import jax, jax.numpy as jnp
  >>> W = jnp.array([[1., -1.], [2., 1.]])
  >>> f = lambda x: jax.nn.relu(x @ W) @ jnp.ones((2, 1))
  >>> lrp(f, jnp.array([[1., 1.]]), 0, epsilon=0.0)  # relevance conserved: sums to f(x) = 3
  Array([[1., 2.]], dtype=float32)
  """
  if not float(epsilon) >= 0:
    raise ValueError(f"epsilon: expected a number >= 0, got {epsilon}")
  return _modified_backprop(f, x, target, _jaxpr.Rule("lrp", float(epsilon)))
