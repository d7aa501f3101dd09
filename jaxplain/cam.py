"""Grad-CAM on a layer chosen by name (Selvaraju et al. 2017, eqs. 1 and 2).

With ``A`` the output of the chosen layer, (B, h, w, C), and ``out = y[t]`` (or another
output of the logits, as in :func:`jaxplain.gradient`):

  alpha_c = mean_{i, j} d out / d A_ij^c          (eq. 1, global-average-pooled gradients)
  map     = ReLU(sum_c alpha_c A^c)               (eq. 2; the ReLU is a flag)

then upsampled to the input's H x W (bilinear by default, nearest on request).

How the layer is reached, without changing the model:

- Flax linen: the named submodule's ``__call__`` is intercepted with
  ``flax.linen.intercept_methods``; its output ``A`` is captured and a zero perturbation
  ``delta`` is added to it, so ``d out / d delta = d out / d A`` (the perturbation trick of
  ``Module.perturb``, applied from outside). Layer names are submodule paths joined by ``/``
  (``"conv3"``, ``"stage3_block1/conv2"``).
- Flax NNX: the module is split and merged into a private copy inside the traced function,
  and the named submodule (attribute path, list indices as numbers: ``"blocks/0/conv"``) is
  replaced in that copy by a wrapper doing the same capture and perturbation.
- A plain function: pass ``model=(features, head)`` with ``head(features(x)) = logits``.

The named layer's output is taken as it is. In the zoo's models (:mod:`jaxplain.models`)
``"conv3"`` is the convolution's pre-activation output and ``"conv3_relu"`` the rectified
feature maps, the usual Grad-CAM choice (with pre-activations, negative values enter the
weighted sum before the final ReLU and maps are often blank).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxplain import _validate
from jaxplain.gradients import _check_output, _cotangent

Array = jax.Array

UPSAMPLE = ("bilinear", "nearest", None)


def _linen_run(model: nn.Module, variables: Any, layer: str, apply_kwargs: dict,
               x: Array, delta: Array | None, called: list[str] | None = None):
  """Apply a linen model, capturing (and perturbing by ``delta``) ``layer``'s output."""
  captured = []

  def interceptor(next_fun, args, kwargs, ctx):
    if ctx.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = "/".join(str(p) for p in ctx.module.path)
    if called is not None and path and path not in called:
      called.append(path)
    out = next_fun(*args, **kwargs)
    if path == layer:
      if captured:
        raise ValueError(f"layer: {layer!r} is called more than once in one forward pass; "
                         "Grad-CAM needs a layer applied once")
      captured.append(out)
      if delta is not None:
        out = out + delta
    return out

  with nn.intercept_methods(interceptor):
    logits = model.apply(variables, x, **apply_kwargs)
  return logits, captured


def _nnx_modules(model: nnx.Module) -> list[str]:
  return sorted("/".join(str(p) for p in path) for path, _ in nnx.iter_modules(model) if path)


def _nnx_run(graphdef: Any, state: Any, layer: str, x: Array, delta: Array | None,
             apply_kwargs: dict):
  """Apply a private copy of an NNX model whose ``layer`` output is captured/perturbed."""
  m = nnx.merge(graphdef, state)
  *parents, last = layer.split("/")
  parent = m
  for p in parents:
    parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
  inner = parent[int(last)] if last.isdigit() else getattr(parent, last)
  captured = []

  def hook(*args, **kwargs):
    out = inner(*args, **kwargs)
    if captured:
      raise ValueError(f"layer: {layer!r} is called more than once in one forward pass; "
                       "Grad-CAM needs a layer applied once")
    captured.append(out)
    return out if delta is None else out + delta

  if last.isdigit():
    parent[int(last)] = hook
  else:
    object.__setattr__(parent, last, hook)  # bypass NNX attribute checks: a private copy
  return m(x, **apply_kwargs), captured


def _unknown_layer(layer: Any, names: list[str]) -> ValueError:
  return ValueError(f"layer: unknown layer name {layer!r}; available layers: "
                    + ", ".join(repr(n) for n in names))


def grad_cam(model: Any, variables: Any, x: Array, target: Any, *, layer: str | None = None,
             relu: bool = True, upsample: str | None = "bilinear", output: str = "logit",
             apply_kwargs: dict | None = None) -> Array:
  """Grad-CAM maps for a batch (Selvaraju et al. 2017, eqs. 1-2).

  Args:
    model: a Flax linen ``Module`` (with ``variables``), a Flax NNX ``Module``
      (``variables=None``), or a pair ``(features, head)`` of pure batched functions with
      ``head(features(x))`` the logits (``variables=None``; ``layer`` is ignored).
    variables: the linen variables (``{'params': ..., 'batch_stats': ...}``), else ``None``.
    x: inputs, (B, H, W, C).
    target: an int or a (B,) int array.
    layer: the submodule path, e.g. ``"conv3"`` or ``"stage3_block1/conv2"`` (linen), or
      ``"blocks/0/conv"`` (NNX). Its output must be (B, h, w, C').
    relu: apply the final ReLU of eq. 2 (default ``True``).
    upsample: ``"bilinear"`` (default), ``"nearest"`` or ``None`` (return (B, h, w)).
    output: the differentiated output, as in :func:`jaxplain.gradient`.
    apply_kwargs: extra keyword arguments for the model call (e.g. ``{"train": False}``).

  Returns:
    Maps of shape (B, H, W) (or (B, h, w) with ``upsample=None``).

  >>> import jax, jax.numpy as jnp
  >>> from jaxplain.models import SmallCNN
  >>> model = SmallCNN()
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> grad_cam(model, variables, jnp.ones((2, 32, 32, 3)), 3, layer="conv3").shape
  (2, 32, 32)
  """
  _check_output(output)
  if upsample not in UPSAMPLE:
    raise ValueError(f"upsample: expected one of {UPSAMPLE}, got {upsample!r}")
  x = _validate.check_batched(x, "x", min_rank=4)
  if x.ndim != 4:
    raise ValueError(f"x: expected images of shape (B, H, W, C), got shape {x.shape}")
  b = x.shape[0]
  kw = dict(apply_kwargs or {})

  if isinstance(model, nn.Module):
    if not isinstance(layer, str):
      raise ValueError(f"layer: expected a submodule path such as 'conv3', got {layer!r}")
    called: list[str] = []
    probe = jax.eval_shape(
        lambda z: _linen_run(model, variables, layer, kw, z, None, called)[1], x)
    if not probe:
      raise _unknown_layer(layer, called)
    run = lambda d: _linen_run(model, variables, layer, kw, x, d)  # noqa: E731
  elif isinstance(model, nnx.Module):
    names = _nnx_modules(model)
    if not isinstance(layer, str) or layer not in names:
      raise _unknown_layer(layer, names)
    graphdef, state = nnx.split(model)
    probe = jax.eval_shape(lambda z: _nnx_run(graphdef, state, layer, z, None, kw)[1], x)
    run = lambda d: _nnx_run(graphdef, state, layer, x, d, kw)  # noqa: E731
  elif isinstance(model, (tuple, list)) and len(model) == 2 and all(map(callable, model)):
    if variables is not None:
      raise ValueError("variables: must be None when model is a (features, head) pair")
    features, head = model
    probe = [jax.eval_shape(features, x)]

    def run(d):
      a = features(x)
      return head(a + d), [a]
  else:
    raise TypeError("model: expected a flax.linen Module, a flax.nnx Module or a "
                    f"(features, head) pair of functions, got {type(model).__name__}")

  a_shape = probe[0]
  if not hasattr(a_shape, "shape") or len(a_shape.shape) != 4 or a_shape.shape[0] != b:
    shape = getattr(a_shape, "shape", type(a_shape).__name__)
    raise ValueError(f"layer: the output of {layer!r} is {shape}; Grad-CAM needs a feature "
                     f"map of shape (B, h, w, C) = ({b}, h, w, C)")

  def fwd(delta):
    logits, cap = run(delta)
    return logits, cap[0]

  logits, vjp, acts = jax.vjp(fwd, jnp.zeros(a_shape.shape, a_shape.dtype), has_aux=True)
  _validate.check_logits(logits, b)
  t = _validate.check_target(target, b, logits.shape[-1], "target")
  (grads,) = vjp(_cotangent(logits, t, output))
  alpha = jnp.mean(grads, axis=(1, 2))                      # eq. 1: (B, C)
  cam = jnp.einsum("bhwc,bc->bhw", acts, alpha)              # eq. 2
  if relu:
    cam = jax.nn.relu(cam)
  if upsample is None:
    return cam
  return jax.image.resize(cam, (b,) + x.shape[1:3], method=upsample)
