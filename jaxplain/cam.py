"""Grad-CAM on a layer chosen by name (Selvaraju et al. 2017, eqs. 1 and 2).

With ``A`` the output of the chosen layer, (B, h, w, C), and ``out = y[t]`` (or another
output of the logits, as in :func:`jaxplain.gradient`):

  alpha_c = mean_{i, j} d out / d A_ij^c          (eq. 1, global-average-pooled gradients)
  map     = ReLU(sum_c alpha_c A^c)               (eq. 2; the ReLU is a flag)

then upsampled to the input's H x W (bilinear by default, nearest on request).

The model is any :func:`jaxplain.wrap`-able model (Flax linen + variables, NNX, Equinox,
Keras 3, or a ``(features, head)`` pair); the layer is named by the framework's own name and
its output ``A`` is read and perturbed through the model interface: a zero ``delta`` is added
to ``A`` so that ``d out / d delta = d out / d A``.

Feature layouts (``A`` is channels-last, whatever the framework):

- (B, h, w, C) image maps: alpha_c averages over (h, w); the map is (B, h, w), upsampled to
  the input's spatial size.
- (B, L, C) token / sequence features (a ViT block, a conv1d or embedding-fed layer): alpha_c
  averages over the L tokens; the map is over tokens, (B, L) (resized to the input's length
  when the input is a sequence and ``upsample`` is set).
- (B, C) features: there is nothing to average over, alpha = d out / d A, and the map is over
  features, ``ReLU(alpha * A)`` (B, C) (gradient x activation), never resized.

The named layer's output is taken as it is. In the zoo's models (:mod:`jaxplain.models`)
``"conv3"`` is the convolution's pre-activation output and ``"conv3_relu"`` the rectified
feature maps, the usual Grad-CAM choice (with pre-activations, negative values enter the
weighted sum before the final ReLU and maps are often blank). A layer called twice in one
forward pass is an error (see :mod:`jaxplain.model`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxplain import _pack
from jaxplain import _validate
from jaxplain.gradients import _check_output, _cotangent
from jaxplain.model import wrap

Array = jax.Array

UPSAMPLE = ("bilinear", "nearest", None)


def grad_cam(model: Any, *args: Any, layer: str | None = None, relu: bool = True,
             upsample: str | None = "bilinear", output: str = "logit",
             apply_kwargs: dict | None = None) -> Array:
  """Grad-CAM maps for a batch (Selvaraju et al. 2017, eqs. 1-2).

  Called as ``grad_cam(model, x, target, layer=...)``; the older
  ``grad_cam(model, variables, x, target, layer=...)`` still works.

  Args:
    model: anything :func:`jaxplain.wrap` accepts (a ``Model``, an NNX / Equinox / Keras
      model, a ``(features, head)`` pair with ``head(features(x))`` the logits; a linen module
      goes with its variables: ``grad_cam(wrap(module, variables), x, t, layer=...)``).
    *args: ``x, target``: inputs (B, ...) (any dtype: token ids too) and an int or (B,) ints;
      ``x`` may be a tuple or dict of batches for a model with several inputs (the map
      is upsampled to the first input of its kind).
    layer: the framework's layer name (``"conv3"``, ``"stage3_block1/conv2"``,
      ``"blocks/0"``, ``"mixed10"``; ``"features"`` or ``None`` for a ``(features, head)`` pair).
      Its output must be (B, ..., C) channels-last (Equinox maps are moved for you).
    relu: apply the final ReLU of eq. 2 (default ``True``).
    upsample: ``"bilinear"`` (default), ``"nearest"`` or ``None`` (the map at the layer's
      resolution).
    output: the differentiated output, as in :func:`jaxplain.gradient`.
    apply_kwargs: extra keyword arguments for a linen / NNX model call (e.g. ``{"train": False}``).

  Returns:
    Maps (B, H, W) for images (or (B, h, w) with ``upsample=None``), (B, L) over tokens,
    (B, C) over features (see the module docstring).

  >>> import jax, jax.numpy as jnp
  >>> from jaxplain import wrap
  >>> from jaxplain.models import SmallCNN
  >>> variables = SmallCNN().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> grad_cam(wrap(SmallCNN(), variables), jnp.ones((2, 32, 32, 3)), 3, layer="conv3").shape
  (2, 32, 32)
  """
  _check_output(output)
  if upsample not in UPSAMPLE:
    raise ValueError(f"upsample: expected one of {UPSAMPLE}, got {upsample!r}")
  if len(args) == 3 and args[0] is None:   # the old (model, None, x, t) call
    args = args[1:]
  if len(args) not in (2, 3):
    raise TypeError(f"grad_cam: expected grad_cam(model, x, target, layer=...), got "
                    f"{len(args)} positional arguments after the model")
  kw = {} if apply_kwargs is None else {"apply_kwargs": apply_kwargs}
  m = wrap(model, args[0], **kw) if len(args) == 3 else wrap(model, **kw)
  x, target = args[-2:]
  layer = m.default_layer if layer is None else layer
  # several inputs (a tuple or dict of batches) go to the model as they are
  xs = [jnp.asarray(v) for v in (jax.tree_util.tree_leaves(x) if _pack.is_several(x) else [x])]
  x = x if _pack.is_several(x) else xs[0]
  for v in xs:
    if v.ndim < 2:
      raise ValueError(f"x: expected a batch (B, ...); got shape {v.shape}")
    if jnp.issubdtype(v.dtype, jnp.inexact):
      _validate.check_finite(v, "x")
  if len({v.shape[0] for v in xs}) != 1:
    raise ValueError(f"x: the inputs have different batch sizes {[v.shape for v in xs]}")
  if not isinstance(layer, str):
    raise ValueError(f"layer: expected a layer name such as 'conv3', got {layer!r}; available "
                     f"layers: {list(m.layer_names(x))}")
  b = xs[0].shape[0]
  a_shape = _validate.call_model(
      lambda: jax.eval_shape(lambda z: m.capture(z, [layer])[1][layer][1], x), m, x)
  if not hasattr(a_shape, "shape") or len(a_shape.shape) < 2 or a_shape.shape[0] != b:
    shape = getattr(a_shape, "shape", type(a_shape).__name__)
    raise ValueError(f"layer: the output of {layer!r} is {shape}; Grad-CAM needs features of "
                     f"shape (B, ..., C) with B = {b}")

  def fwd(delta):
    return m.perturb(x, layer, delta)

  logits, vjp, acts = jax.vjp(fwd, jnp.zeros(a_shape.shape, a_shape.dtype), has_aux=True)
  _validate.check_logits(logits, b)
  t = _validate.check_target(target, b, logits.shape[-1], "target")
  (grads,) = vjp(_cotangent(logits, t, output))
  if acts.ndim == 2:                                        # (B, C): a map over features
    cam = grads * acts
    return jax.nn.relu(cam) if relu else cam
  alpha = jnp.mean(grads, axis=tuple(range(1, acts.ndim - 1)))   # eq. 1: (B, C)
  cam = jnp.einsum("b...c,bc->b...", acts, alpha)                # eq. 2
  if relu:
    cam = jax.nn.relu(cam)
  if upsample is None:
    return cam
  spatial = cam.ndim - 1
  for v in xs:  # the input the map is upsampled to: the first of the map's kind
    if jnp.issubdtype(v.dtype, jnp.integer) and v.ndim == cam.ndim:   # token ids (B, L)
      return jax.image.resize(cam, (b,) + v.shape[1:], method=upsample)
    if v.ndim == spatial + 2:                                        # (B, *spatial, C)
      size = v.shape[2:] if m.channels_first else v.shape[1:-1]
      return jax.image.resize(cam, (b,) + tuple(size), method=upsample)
  return cam


def guided_grad_cam(model: Any, x: Any, target: Any, *, layer: str | None = None,
                    output: str = "logit", apply_kwargs: dict | None = None) -> Array:
  """Guided Grad-CAM (Selvaraju et al. 2017, section 3.1): guided backpropagation times the
  Grad-CAM map upsampled to the input (bilinear), broadcast over the channels; Captum's
  ``GuidedGradCam``.

  Args:
    model, x, target, layer, output, apply_kwargs: as in :func:`grad_cam` (image inputs
      (B, H, W, C), or (B, C, H, W) for a channels-first model).

  Returns:
    Attributions shaped like ``x``.

  >>> import jax, jax.numpy as jnp
  >>> from jaxplain import wrap
  >>> from jaxplain.models import SmallCNN
  >>> variables = SmallCNN().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> guided_grad_cam(wrap(SmallCNN(), variables), jnp.ones((2, 32, 32, 3)), 3,
  ...                 layer="conv3").shape
  (2, 32, 32, 3)
  """
  from jaxplain.rules import guided_backprop  # pylint: disable=import-outside-toplevel
  kw = {} if apply_kwargs is None else {"apply_kwargs": apply_kwargs}
  m = wrap(model, **kw)
  cam = grad_cam(m, x, target, layer=layer, output=output, upsample="bilinear")
  gbp = guided_backprop(m, x, target, output=output)
  axis = 1 if m.channels_first else gbp.ndim - 1
  spatial = gbp.shape[:axis] + gbp.shape[axis + 1:]
  if gbp.ndim != cam.ndim + 1 or spatial != cam.shape:
    raise ValueError(f"guided_grad_cam: needs image inputs whose Grad-CAM map {cam.shape} "
                     f"covers x {gbp.shape} but for the channels; use grad_cam and "
                     f"guided_backprop separately for other inputs")
  return gbp * jnp.expand_dims(cam, axis).astype(gbp.dtype)
