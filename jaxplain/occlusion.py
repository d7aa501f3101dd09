"""Occlusion sensitivity: slide a patch over the image and record the drop of the target
output (Zeiler and Fergus 2014, section 4.2; the averaging of Captum's ``Occlusion``).

For every window position w (a ``patch`` rectangle over H x W, all channels, moved by
``stride``), ``d_w = out(x)[t] - out(x with the window set to value)[t]``; a pixel's
attribution is the mean of ``d_w`` over the windows that cover it (0 if none does). All
window positions of all examples are evaluated as one batch through ``f`` (or ``chunk``
windows at a time, to bound memory).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _validate
from jaxplain._batching import auto_chunk
from jaxplain.gradients import _check_output, _output_value

Array = jax.Array


def _pair(v: Any, name: str) -> tuple[int, int]:
  t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
  if len(t) != 2 or not all(isinstance(i, (int, np.integer)) and i >= 1 for i in t):
    raise ValueError(f"{name}: expected an int >= 1 or a pair (h, w) of them, got {v!r}")
  return int(t[0]), int(t[1])


def window_masks(height: int, width: int, patch: Any, stride: Any = None) -> np.ndarray:
  """The boolean masks of all window positions, (n_windows, H, W), row-major order.

  Windows start at 0, stride, 2 * stride, ... while they fit inside the image.

  >>> window_masks(3, 3, 2, 1).shape
  (4, 3, 3)
  """
  ph, pw = _pair(patch, "patch")
  sh, sw = _pair(patch if stride is None else stride, "stride")
  if ph > height or pw > width:
    raise ValueError(f"patch: ({ph}, {pw}) is larger than the image ({height}, {width})")
  rows = range(0, height - ph + 1, sh)
  cols = range(0, width - pw + 1, sw)
  masks = np.zeros((len(rows) * len(cols), height, width), bool)
  for k, (i, j) in enumerate((i, j) for i in rows for j in cols):
    masks[k, i:i + ph, j:j + pw] = True
  return masks


@_validate.accepts_nnx
def occlusion(f: Callable[[Array], Array], x: Array, target: Any, *, patch: Any = 4,
              stride: Any = None, value: Any = 0.0, output: str = "logit",
              chunk: int | None = None) -> Array:
  """Occlusion attributions for a batch of images.

  Args:
    f: pure batched model, (B, ...) -> logits (B, K).
    x: images, (B, H, W, C) or (B, H, W).
    target: an int or a (B,) int array.
    patch: window size, an int or (h, w).
    stride: window step, an int or (h, w); default ``patch`` (non-overlapping windows).
    value: what occluded pixels are set to: a scalar or an array broadcasting to ``x``
      (e.g. a blurred copy, or per-channel means of shape (C,)).
    output: the output whose drop is measured, as in :func:`jaxplain.gradient`.
    chunk: window positions per call of ``f`` (``chunk * B`` rows); ``None``: all at once up
      to 2^23 input elements per call, as many as fit under that otherwise.

  Returns:
    Attributions shaped like ``x`` (equal across the channels of a pixel).

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([x.sum((1, 2)), -x.sum((1, 2))], axis=1)
  >>> occlusion(f, jnp.ones((1, 2, 2)), 0, patch=1)
  Array([[[1., 1.],
          [1., 1.]]], dtype=float32)
  """
  _check_output(output)
  if jnp.ndim(x) == 2:
    raise ValueError(f"x: expected a batched array of rank >= 3, images (B, H, W[, C]); got "
                     f"shape {jnp.shape(x)}: one image needs its batch axis (x[None]); for "
                     f"tabular (B, D) data jaxplain.feature_ablation removes one feature at a "
                     f"time")
  x = _validate.check_batched(x, "x", min_rank=3)
  if x.ndim not in (3, 4):
    raise ValueError(f"x: expected images (B, H, W, C) or (B, H, W), got shape {x.shape}")
  _validate.check_chunk(chunk)
  b, h, w = x.shape[:3]
  logits = _validate.call_model(lambda: f(x), f, x)  # before the windows: x may be one example
  _validate.check_logits(logits, b, f=f, x=x)
  masks_np = window_masks(h, w, patch, stride)
  n = masks_np.shape[0]
  val = _validate.broadcast_to_x(value, x, "value")
  masks = jnp.asarray(masks_np, x.dtype)
  mshape = (n, 1, h, w) + (1,) * (x.ndim - 3)

  t = _validate.check_target(target, b, logits.shape[-1], "target")
  ref = _output_value(logits, t, output)
  c = auto_chunk(x.size, n) if chunk is None else min(int(chunk), n)
  drops = []
  for s in range(0, n, c):
    m = masks[s:s + c].reshape((-1,) + mshape[1:])
    k = m.shape[0]
    xo = (x[None] * (1 - m) + val[None] * m).reshape((k * b,) + x.shape[1:])
    out = _output_value(f(xo), jnp.tile(t, k), output).reshape(k, b)
    drops.append(ref[None] - out)
  drops = jnp.concatenate(drops, axis=0)                          # (n, B)
  count = masks_np.sum(axis=0)
  inv = jnp.asarray(np.where(count > 0, 1.0 / np.maximum(count, 1), 0.0), x.dtype)
  attr = jnp.einsum("nb,nhw->bhw", drops, masks) * inv[None]
  if x.ndim == 4:
    attr = jnp.broadcast_to(attr[..., None], x.shape)
  return attr
