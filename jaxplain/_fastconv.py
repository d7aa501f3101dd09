"""Small-channel convolutions for gradients on XLA:CPU (private; a speed rewrite, same values).

XLA:CPU runs a convolution with few input channels badly, and its input gradient (a
convolution with few *output* channels) worse. Measured on the project's 2-core x86_64
machine (jaxlib 0.10.2, batch 512, medians; ``benchmarks``' LeNet and SmallCNN layers):

=====================================  ==============  ==============  ==================
layer                                  XLA conv        shifted sums    explicit im2col
=====================================  ==============  ==============  ==================
LeNet conv1 5x5, 1 -> 6, 28x28         fwd 49, vjp 72  fwd 7.7         vjp 28
LeNet conv2 5x5, 6 -> 16, 14x14        fwd 13, vjp 37  fwd 41          vjp 24
SmallCNN conv1 3x3, 3 -> 32, 32x32 /4  fwd 12, vjp 30  fwd 65          vjp 13
=====================================  ==============  ==============  ==================

(ms). The whole LeNet input gradient took 176-263 ms on 512 images where torch took 76-91 ms.
:func:`with_fast_convs` wraps a model ``f`` so that each convolution whose input has at most
``_jaxpr.PATCH_CONV_MAX_CHANNELS`` channels is a ``custom_jvp`` function: its value is XLA's
convolution (or, with one input channel, a sum of shifted slices times the kernel taps) and
its tangent in the input is the explicit im2col of ``_jaxpr._conv_as_patches``, whose
transpose, the input gradient, is a matrix product and padded additions. Forward- and
reverse-mode differentiation both work, to any order. The rewrite reaches convolutions at the
top level of ``f`` and inside ``jit`` calls; those inside other higher-order primitives (``scan``
and ``while`` bodies, ``remat``, custom derivatives) stay XLA's. The gradient explainers
(``gradients._grad_rows``) use it on the CPU backend; ``JAXPLAIN_FAST_CONV=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from jaxplain import _jaxpr

Array = jax.Array
OPT_OUT = "JAXPLAIN_FAST_CONV"
_CALLS = ("pjit", "jit", "closed_call", "core_call")


def enabled() -> bool:
  """On for the CPU backend unless ``JAXPLAIN_FAST_CONV=0``."""
  return os.environ.get(OPT_OUT, "1") != "0" and jax.default_backend() == "cpu"


def _conv_shifted(eqn, x: Array, w: Array) -> Array:
  """A one-input-channel convolution as the sum over kernel taps of shifted input slices
  times the tap's output-channel weights (one fused elementwise loop on XLA:CPU)."""
  k, taps, to_out = _jaxpr.conv_taps(eqn, x, w)
  o = k.shape[3]
  acc = None
  for i, j, s in taps:
    term = s * k[i, j, 0].reshape(1, 1, 1, o)
    acc = term if acc is None else acc + term
  return to_out(acc)


def _fast_conv(eqn) -> Callable[[Array, Array], Array]:
  prm = eqn.params
  dn = prm["dimension_numbers"]
  one_channel = eqn.invars[0].aval.shape[dn.lhs_spec[1]] == 1
  plain = lambda x, w: jax.lax.conv_general_dilated_p.bind(x, w, **prm)

  @jax.custom_jvp
  def conv(x, w):
    return _conv_shifted(eqn, x, w) if one_channel else plain(x, w)

  def jvp(primals, tangents):
    x, w = primals
    tx, tw = tangents
    y = conv(x, w)
    zero = jax.custom_derivatives.SymbolicZero
    t = None
    if not isinstance(tx, zero):
      t = _jaxpr._conv_as_patches(eqn, tx, w)
    if not isinstance(tw, zero):
      tw_part = plain(x, tw)
      t = tw_part if t is None else t + tw_part
    return y, (jnp.zeros_like(y) if t is None else t)

  conv.defjvp(jvp, symbolic_zeros=True)
  return conv


def _wanted(eqn) -> bool:
  return eqn.primitive.name == "conv_general_dilated" and _jaxpr._patch_conv_ok(eqn)


def _has_wanted(jaxpr) -> bool:
  for e in jaxpr.eqns:
    if _wanted(e):
      return True
    if e.primitive.name in _CALLS and _has_wanted(e.params["jaxpr"].jaxpr):
      return True
  return False


def _eval(jaxpr, consts, *args):
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for e in jaxpr.eqns:
    ins = [read(v) for v in e.invars]
    if _wanted(e):
      outs = [_fast_conv(e)(*ins)]
    elif e.primitive.name in _CALLS and _has_wanted(e.params["jaxpr"].jaxpr):
      closed = e.params["jaxpr"]
      outs = _eval(closed.jaxpr, closed.consts, *ins)
    else:
      with e.ctx.manager:  # as jax.core.eval_jaxpr (jax 0.10: get_bind_params -> params)
        outs = e.primitive.bind(*ins, **e.primitive.get_bind_params(e.params))
      if not e.primitive.multiple_results:
        outs = [outs]
    for v, o in zip(e.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def with_fast_convs(f: Callable[..., Any]) -> Callable[..., Any]:
  """``f`` with its small-channel convolutions rewritten (see the module docstring); ``f``
  itself where it has none or where :func:`enabled` is false."""
  if not enabled():
    return f

  @functools.wraps(f)
  def g(*args):
    # f is traced once (tests count the forward passes); without a small-channel convolution
    # the evaluation below is plain jax.core.eval_jaxpr
    closed, shape = jax.make_jaxpr(f, return_shape=True)(*args)
    outs = _eval(closed.jaxpr, closed.consts, *jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)

  return g
