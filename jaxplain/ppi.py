"""Proactive Pseudo-Intervention (PPI) training (seed 004, section 3.1; SPEC section 5).

PPI adds three terms to the classification loss, all built from the saliency map
``s = s_y(x)`` of the true class, normalised per example to [0, 1]:

- negative contrast ``x* = x - T(s(x)) * x`` (eq. 1) with the soft mask
  ``T(s) = sigmoid(omega (s - sigma))`` (eq. 2), or the hard variant that removes the smallest
  box covering the thresholded map; loss ``L_con`` (eq. 3) = one-vs-others cross-entropy
  ``-log(1 - p_y(x*))`` by default, ``-CE(x*, y)`` (the paper's "l = -l") as an option;
- adversarial positive contrast ``x' = x - T(s(x_j)) * x`` with ``j != i`` (eq. 4), i.e.
  another example's map, loss ``L_ad = CE(x', y)`` (eq. 5);
- saliency regulariser ``L_reg = ||s||_1``;

``L = L_cls + w1 L_con + w2 L_reg + w3 L_ad`` with the paper's weights w1 = 1, w2 = 0.1,
w3 = 1 (section 4). The saliency depends on the parameters, so by default ``L_reg`` and the
masks are differentiated through the saliency map (second-order gradients);
``PPIConfig.stop_saliency_gradient`` switches that off.

Readings chosen here where the paper is silent (all are ``PPIConfig`` fields):

- A map shaped like ``x`` (B, H, W, C) is summed over channels to one value per pixel
  (gradient x input / WBP contributions add up); (B, H, W) maps (Grad-CAM) are used as they
  are. The (B, H, W) mask multiplies every channel.
- Per-example normalisation ``"relu_max"`` (default): keep the positive evidence for ``y`` and
  divide by the per-example maximum, so removing the masked pixels removes evidence *for* the
  class; ``"abs_max"`` and ``"minmax"`` are the alternatives.
- ``L_reg = ||s||_1`` is the paper's: the L1 norm of the raw (un-normalised, channel-summed)
  map of each example, averaged over the batch (``reg_target="l1"``, default). Measured on
  LeNet after a 4-epoch plain warm-up on decoy digits (batch 64, WBP): L_cls 0.014 (gradient
  norm 0.68), L_con 8.2 (29.7), L_reg 38 (the gradient of L_cls + L_reg has norm 43.6), so at
  w2 = 0.1 the regulariser's gradient is ~15 % of L_con's and 6x L_cls's: w2 matters. The
  earlier reading, the pixel mean of the normalised map (``"normalized"``, 0.04 there, total
  gradient norm 0.681 against 0.677 for L_cls alone), contributes nothing at w2 = 0.1;
  ``"raw"`` is the pixel mean of |s| (0.05). For a ReLU network without biases, WBP's map sums
  to the logit, so ``"l1"`` also bounds the logit scale.
- ``pairing``: ``j`` for the adversarial contrast is the batch rolled by one (``"roll"``,
  batches are reshuffled every epoch), rolled by a random shift in [1, B - 1]
  (``"random_shift"``, uses the key), or the nearest other example with the same label
  (``"same_label"``, the roll-by-one partner when the batch has none). With a
  position-coded confounder, only a same-label partner's map removes an example's own
  confounder from ``x'``; with roll-by-one that happens in ~1/K of the pairs.
- Every loss term is a batch mean (the paper writes sums over examples).
- The box mask is a discrete function of the saliency: the gradient flows through the
  classifier on ``x*``/``x'`` but not through the box (only ``L_reg`` reaches the saliency).
- The appendix with the paper's sigma/omega is not in the seed: omega = 50 (a transition of
  width ~0.1 around sigma) and sigma = 0.3, chosen by a validation sweep
  (``experiments/ppi_claims.py --full``: SmallCNN, 25 % of the training digits, 400 steps,
  3 seeds; clean validation accuracy 0.927 / 0.931 / 0.938 / 0.931 at sigma 0.1 / 0.2 / 0.3 /
  0.5, SD ~0.01, so the choice is within noise there). sigma is the method's most sensitive
  setting: on a max-normalised map it sets how much of the image ``x*`` removes (on decoy
  digits sigma 0.5 removed ~2.6 % of the pixels, a third of the patch, and sigma 0.2 vs 0.5
  moved the out-of-distribution accuracy by 0.15); sweep it on validation data.
- Batch norm: the saliency is computed with inference statistics (the WBP rule for batch
  norm, SPEC section 3, and Grad-CAM's default); the classifier on ``x`` runs in training mode
  and alone updates the running statistics; ``x*`` and ``x'`` run in training mode without
  updating them.

Training: PPI is a loss of the shared trainer, ``loss_fn = make_ppi_loss(model, config)``
given to :func:`jaxplain.train.make_train_step` or :func:`jaxplain.train.fit` (one step for
every loss: ``fold_in(key, step)``, donated state, data parallel over a device mesh, orbax
checkpoints with exact resume).

Saliency methods are pluggable: a callable ``(f, x, target) -> map`` or one of the names
``"wbp"`` (default, :func:`jaxplain.rules.wbp`), ``"gradient"``, ``"gradient_x_input"``,
``"grad_cam"`` (on ``PPIConfig.grad_cam_layer``, default: the last convolution in execution
order) and ``"lrp"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxplain import _maps
from jaxplain import _validate
from jaxplain.train import weighted_mean

__all__ = [
    "PPIConfig", "SALIENCY_NAMES", "pixel_saliency", "normalize_saliency", "soft_mask",
    "threshold_mask", "box_mask", "apply_mask", "one_vs_others_loss", "ppi_objective",
    "make_ppi_loss", "make_ppi_train_step", "partner_indices",
]

SaliencyFn = Callable[[Callable[[jax.Array], jax.Array], jax.Array, jax.Array], jax.Array]

SALIENCY_NAMES = ("wbp", "gradient", "gradient_x_input", "grad_cam", "lrp")
_CONTRAST_LOSSES = ("one_vs_others", "neg_ce")
_MASKS = ("soft", "box")
# the [0, 1]-valued normalisations of the shared vocabulary (jaxplain._maps)
_NORMALIZE = ("relu_max", "abs_max", "minmax")
_REG_TARGETS = ("l1", "normalized", "raw")
_PAIRINGS = ("roll", "random_shift", "same_label")


@dataclasses.dataclass(frozen=True)
class PPIConfig:
  """Hyper-parameters of PPI (seed 004, section 3.1 and section 4 "Hyperparameters").

  Attributes:
    sigma: mask threshold on the [0, 1]-normalised saliency (eq. 2); the most sensitive
      setting (see the module docstring), default 0.3 from a validation sweep.
    omega: sigmoid sharpness (eq. 2), > 0.
    w1: weight of the negative-contrast loss ``L_con`` (paper: 1; 10 for LIDC).
    w2: weight of the saliency regulariser ``L_reg`` (paper: 0.1).
    w3: weight of the adversarial positive-contrast loss ``L_ad`` (paper: 1).
    contrast_loss: ``"one_vs_others"`` (``-log(1 - p_y(x*))``) or ``"neg_ce"`` (``-CE(x*, y)``).
    mask: ``"soft"`` (eq. 2) or ``"box"`` (remove the minimal box covering ``s > sigma``).
    stop_saliency_gradient: if True, treat the saliency map as a constant (first-order only).
    normalize: per-example normalisation, ``"relu_max"``, ``"abs_max"`` or ``"minmax"``.
    reg_target: ``"l1"`` (the paper's ``||s||_1`` of the raw map per example),
      ``"normalized"`` (pixel mean of the normalised map) or ``"raw"`` (pixel mean of |s|).
    pairing: how ``j != i`` is chosen for ``x'``: ``"roll"``, ``"random_shift"`` or
      ``"same_label"`` (see :func:`partner_indices`).
    warmup_steps: plain classification for steps < ``warmup_steps``, PPI afterwards.
    grad_cam_layer: layer for the ``"grad_cam"`` saliency (None: the last convolution in
      execution order).
    eps: added to the normaliser of the map.

  >>> PPIConfig(sigma=0.2).w2
  0.1
  """
  sigma: float = 0.3
  omega: float = 50.0
  w1: float = 1.0
  w2: float = 0.1
  w3: float = 1.0
  contrast_loss: str = "one_vs_others"
  mask: str = "soft"
  stop_saliency_gradient: bool = False
  normalize: str = "relu_max"
  reg_target: str = "l1"
  pairing: str = "roll"
  warmup_steps: int = 0
  grad_cam_layer: str | None = None
  eps: float = 1e-12

  def __post_init__(self):
    for name, allowed in (("contrast_loss", _CONTRAST_LOSSES), ("mask", _MASKS),
                          ("normalize", _NORMALIZE), ("reg_target", _REG_TARGETS),
                          ("pairing", _PAIRINGS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"PPIConfig.{name}: expected one of {allowed}, "
                         f"got {getattr(self, name)!r}")
    if not self.omega > 0:
      raise ValueError(f"PPIConfig.omega: expected > 0, got {self.omega}")
    if not 0.0 <= self.sigma <= 1.0:
      raise ValueError(f"PPIConfig.sigma: expected a threshold in [0, 1] on the normalised "
                       f"map, got {self.sigma}")
    if self.warmup_steps < 0:
      raise ValueError(f"PPIConfig.warmup_steps: expected >= 0, got {self.warmup_steps}")
    for name in ("w1", "w2", "w3"):
      if getattr(self, name) < 0:
        raise ValueError(f"PPIConfig.{name}: expected a weight >= 0, got {getattr(self, name)}")


# -- masks --------------------------------------------------------------------------------------

def pixel_saliency(*args, **kwargs):
  """Removed: use :func:`jaxplain.pixel_saliency` with ``reduce="sum"``.

  ``ppi.pixel_saliency(saliency, x)`` (a signed channel sum) had the name but not the
  signature of ``jaxplain.pixel_saliency(attributions, reduce=...)``; there is now one.

  >>> pixel_saliency(None, None)
  Traceback (most recent call last):
  ...
  TypeError: ppi.pixel_saliency is removed: use jaxplain.pixel_saliency(saliency, reduce="sum") (the one channel reduction shared by metrics, plot and ppi)
  """
  del args, kwargs
  raise TypeError('ppi.pixel_saliency is removed: use jaxplain.pixel_saliency(saliency, '
                  'reduce="sum") (the one channel reduction shared by metrics, plot and ppi)')


def _pixel_map(saliency: jax.Array, x: jax.Array, name: str = "saliency") -> jax.Array:
  """One saliency value per pixel: (B, H, W, C) maps are summed over channels (the ``"sum"``
  reduction of ``jaxplain._maps``); (B, H, W) maps pass."""
  s = jnp.asarray(saliency)
  if x.ndim != 4:
    raise ValueError(f"x: expected an NHWC batch (B, H, W, C), got shape {x.shape}")
  if s.shape == x.shape:
    return _maps.reduce_channels(s, "sum")
  if s.shape == x.shape[:3]:
    return s
  raise ValueError(f"{name}: expected a map shaped like x {x.shape} or (B, H, W) = "
                   f"{x.shape[:3]}, got shape {s.shape}")


def normalize_saliency(s: jax.Array, method: str = "relu_max", eps: float = 1e-12) -> jax.Array:
  """Normalise each example's map to [0, 1] (SPEC section 5).

  Args:
    s: (B, ...) saliency maps.
    method: ``"relu_max"`` (max(s, 0) / max), ``"abs_max"`` (|s| / max |s|) or ``"minmax"``.
    eps: added to the denominator (an all-zero map stays zero).

  Returns:
    Array shaped like ``s`` with values in [0, 1], the maximum of each example 1 unless the
    example's map is constant (then 0).

  >>> import jax.numpy as jnp
  >>> normalize_saliency(jnp.array([[-1.0, 1.0, 2.0]]))
  Array([[0. , 0.5, 1. ]], dtype=float32)
  """
  s = _validate.check_batched(s, "s", min_rank=2)
  if method not in _NORMALIZE:
    _maps.check_normalization(method)  # a retired name says what replaced it
    raise ValueError(f"method: expected one of {_NORMALIZE} (maps in [0, 1]), got {method!r}")
  return _maps.normalize_maps(s, method, axes=tuple(range(1, s.ndim)), eps=eps)


def soft_mask(s: jax.Array, sigma: float = 0.5, omega: float = 50.0) -> jax.Array:
  """Thresholded sigmoid mask ``T(s) = 1 / (1 + exp(-omega (s - sigma)))`` (seed 004, eq. 2).

  Args:
    s: normalised saliency, any shape.
    sigma: threshold.
    omega: sharpness (> 0); as omega grows T tends to the hard threshold ``s > sigma``.

  Returns:
    Mask shaped like ``s`` with values in (0, 1).

  >>> import jax.numpy as jnp
  >>> soft_mask(jnp.array([0.0, 0.5, 1.0]), 0.5, 50.0).round(3)
  Array([0. , 0.5, 1. ], dtype=float32)
  """
  if not omega > 0:
    raise ValueError(f"omega: expected > 0, got {omega}")
  return jax.nn.sigmoid(omega * (jnp.asarray(s) - sigma))


def threshold_mask(s: jax.Array, sigma: float = 0.5) -> jax.Array:
  """The hard threshold ``s > sigma`` as a float mask (the omega -> infinity limit of eq. 2).

  >>> import jax.numpy as jnp
  >>> threshold_mask(jnp.array([0.2, 0.7]), 0.5)
  Array([0., 1.], dtype=float32)
  """
  s = jnp.asarray(s)
  return (s > sigma).astype(s.dtype)


def box_mask(s: jax.Array, sigma: float = 0.5) -> jax.Array:
  """Hard-mask variant of PPI: 1 on the smallest axis-aligned box covering ``s > sigma``.

  Args:
    s: (B, H, W) normalised saliency.
    sigma: threshold.

  Returns:
    (B, H, W) float mask, 1 inside each example's box (all 0 when no pixel exceeds sigma).

  >>> import jax.numpy as jnp
  >>> s = jnp.zeros((1, 4, 4)).at[0, 1, 1].set(1.0).at[0, 2, 3].set(1.0)
  >>> box_mask(s)[0]
  Array([[0., 0., 0., 0.],
         [0., 1., 1., 1.],
         [0., 1., 1., 1.],
         [0., 0., 0., 0.]], dtype=float32)
  """
  s = jnp.asarray(s)
  if s.ndim != 3:
    raise ValueError(f"s: expected (B, H, W) maps, got shape {s.shape}")
  _, h, w = s.shape
  th = s > sigma
  rows, cols = jnp.any(th, axis=2), jnp.any(th, axis=1)          # (B, H), (B, W)
  r, c = jnp.arange(h), jnp.arange(w)
  rmin = jnp.min(jnp.where(rows, r, h), axis=1)[:, None, None]
  rmax = jnp.max(jnp.where(rows, r, -1), axis=1)[:, None, None]
  cmin = jnp.min(jnp.where(cols, c, w), axis=1)[:, None, None]
  cmax = jnp.max(jnp.where(cols, c, -1), axis=1)[:, None, None]
  inside = ((r[None, :, None] >= rmin) & (r[None, :, None] <= rmax)
            & (c[None, None, :] >= cmin) & (c[None, None, :] <= cmax))
  return inside.astype(s.dtype)


def apply_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Remove the masked part of ``x``: ``x - mask * x`` (seed 004, eqs. 1 and 4).

  Args:
    x: (B, H, W, C) input.
    mask: (B, H, W) mask in [0, 1], applied to every channel.

  Returns:
    (B, H, W, C) intervened input.

  >>> import jax.numpy as jnp
  >>> apply_mask(jnp.ones((1, 1, 2, 1)), jnp.array([[[1.0, 0.0]]]))[..., 0]
  Array([[[0., 1.]]], dtype=float32)
  """
  if mask.shape != x.shape[:3]:
    raise ValueError(f"mask: expected (B, H, W) = {x.shape[:3]} to match x, got {mask.shape}")
  return x - mask[..., None] * x


# -- losses -------------------------------------------------------------------------------------

def one_vs_others_loss(logits: jax.Array, target: Any) -> jax.Array:
  """One-vs-others cross-entropy for the flipped label: ``-log(1 - p_y)`` per example.

  Computed stably as ``logsumexp(z) - logsumexp(z without z_y)``.

  Args:
    logits: (B, K) logits, K >= 2.
    target: int or (B,) int array, the label being flipped.

  Returns:
    (B,) losses.

  >>> import jax.numpy as jnp
  >>> one_vs_others_loss(jnp.log(jnp.array([[0.5, 0.25, 0.25]])), 0)  # -log(0.5)
  Array([0.6931472], dtype=float32)
  """
  logits = _validate.check_logits(jnp.asarray(logits), jnp.shape(logits)[0], "logits")
  b, k = logits.shape
  if k < 2:
    raise ValueError(f"logits: one-vs-others needs K >= 2 classes, got shape {logits.shape}")
  t = _validate.check_target(target, b, k)
  onehot = jax.nn.one_hot(t, k, dtype=bool)
  others = jnp.where(onehot, -jnp.inf, logits)
  return jax.nn.logsumexp(logits, axis=-1) - jax.nn.logsumexp(others, axis=-1)


def _cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _correct(logits: jax.Array, y: jax.Array) -> jax.Array:
  return (jnp.argmax(logits, axis=-1).astype(y.dtype) == y).astype(jnp.float32)


def partner_indices(y: jax.Array, pairing: str = "roll", *, key: jax.Array | None = None,
                    weights: jax.Array | None = None) -> jax.Array:
  """The partner ``j(i) != i`` whose map makes the adversarial contrast ``x'_i`` (eq. 4).

  Args:
    y: (B,) int labels, B >= 2.
    pairing: ``"roll"`` (``j = i - 1 mod B``), ``"random_shift"`` (``j = i - r mod B`` with
      one ``r`` drawn from [1, B - 1] with ``key``) or ``"same_label"`` (the nearest
      preceding example, cyclically, with ``y_j == y_i``; when the batch holds no other
      example of that label, ``i - 1 mod B``).
    key: PRNG key, needed for ``"random_shift"``.
    weights: optional (B,) weights; with ``"same_label"`` an example of weight 0 (padding)
      is never chosen as a same-label partner.

  Returns:
    (B,) int32 indices, never equal to their position.

  >>> import jax.numpy as jnp
  >>> partner_indices(jnp.array([0, 1, 0, 1, 2]), "same_label")
  Array([2, 3, 0, 1, 3], dtype=int32)
  """
  y = jnp.asarray(y)
  if y.ndim != 1 or y.shape[0] < 2:
    raise ValueError(f"y: expected (B,) labels with B >= 2, got shape {y.shape}")
  if pairing not in _PAIRINGS:
    raise ValueError(f"pairing: expected one of {_PAIRINGS}, got {pairing!r}")
  b = y.shape[0]
  i = jnp.arange(b, dtype=jnp.int32)
  if pairing == "roll":
    return (i - 1) % b
  if pairing == "random_shift":
    if key is None:
      raise ValueError("key: pairing='random_shift' needs a PRNG key")
    return (i - jax.random.randint(key, (), 1, b, dtype=jnp.int32)) % b
  # same_label: distance d(i, j) = (i - j) mod B in [1, B - 1]; the smallest one with y_j == y_i
  d = (i[:, None] - i[None, :]) % b
  ok = (y[:, None] == y[None, :]) & (d > 0)
  if weights is not None:
    ok = ok & jnp.asarray(weights).astype(bool)[None, :]
  cost = jnp.where(ok, d, b)
  j = jnp.argmin(cost, axis=1).astype(jnp.int32)
  return jnp.where(jnp.any(ok, axis=1), j, (i - 1) % b)


def ppi_objective(f: Callable[[jax.Array], jax.Array], x: jax.Array, y: Any,
                  saliency: jax.Array, config: PPIConfig | None = None, *,
                  key: jax.Array | None = None, logits: jax.Array | None = None,
                  weights: jax.Array | None = None, joint: bool = False,
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The PPI loss ``L = L_cls + w1 L_con + w2 L_reg + w3 L_ad`` for one batch (seed 004, 3.1).

  Args:
    f: pure batched classifier ``(B, H, W, C) -> (B, K)`` used on ``x*`` and ``x'`` (and on
      ``x`` unless ``logits`` is given).
    x: (B, H, W, C) inputs, B >= 2.
    y: (B,) int labels (or one int).
    saliency: raw saliency of the true class, (B, H, W, C) or (B, H, W); it is normalised
      here. Gradients flow through it unless ``config.stop_saliency_gradient``.
    config: hyper-parameters (default ``PPIConfig()``).
    key: PRNG key (needed only for ``pairing="random_shift"``).
    logits: ``f(x)`` if already computed (e.g. with batch-norm statistics updated).
    weights: optional (B,) per-example weights (e.g. the training driver's padding
      ``mask``); every batch mean becomes ``sum(w v) / max(sum(w), 1)``.
    joint: evaluate ``f`` on ``x*`` and ``x'`` in one call on the (2B, ...) concatenation
      (faster; only valid when examples do not interact in ``f``, e.g. no training-mode
      batch norm).

  Returns:
    ``(loss, metrics)``; metrics hold ``loss``, ``loss_cls``, ``loss_con``, ``loss_reg``,
    ``loss_ad``, ``accuracy`` (on x), ``accuracy_con`` (on x*; low is what PPI wants),
    ``accuracy_ad`` (on x'), ``mask_fraction`` (mean of the negative-contrast mask).

  >>> import jax, jax.numpy as jnp
  >>> w = jax.random.normal(jax.random.key(0), (16, 3))
  >>> f = lambda x: x.reshape(x.shape[0], -1) @ w
  >>> x = jax.random.uniform(jax.random.key(1), (4, 4, 4, 1)); y = jnp.array([0, 1, 2, 0])
  >>> s = jax.grad(lambda x: f(x)[jnp.arange(4), y].sum())(x) * x
  >>> loss, m = ppi_objective(f, x, y, s)
  >>> sorted(m)[:3]
  ['accuracy', 'accuracy_ad', 'accuracy_con']
  """
  config = PPIConfig() if config is None else config
  x = _validate.check_batched(x, "x", min_rank=4)
  b = x.shape[0]
  if b < 2:
    raise ValueError(f"x: PPI pairs each example with another one (x' uses s(x_j), j != i); "
                     f"the batch must hold >= 2 examples, got shape {x.shape}")
  if logits is None:
    logits = f(x)
  logits = _validate.check_logits(logits, b, "f(x)")
  y = _validate.check_target(y, b, None, "y")
  if weights is not None:
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (b,):
      raise ValueError(f"weights: expected shape ({b},), got {weights.shape}")
  mean = lambda v: weighted_mean(v, weights)

  s = _pixel_map(saliency, x)
  if config.stop_saliency_gradient:
    s = jax.lax.stop_gradient(s)
  s_norm = normalize_saliency(s, config.normalize, config.eps)
  if config.mask == "soft":
    m = soft_mask(s_norm, config.sigma, config.omega)
  else:
    m = box_mask(jax.lax.stop_gradient(s_norm), config.sigma)

  x_neg = apply_mask(x, m)                       # eq. 1
  partner = partner_indices(y, config.pairing, key=key, weights=weights)
  x_adv = apply_mask(x, jnp.take(m, partner, axis=0))   # eq. 4
  if joint:
    logits_neg, logits_adv = jnp.split(f(jnp.concatenate([x_neg, x_adv])), 2)
  else:
    logits_neg, logits_adv = f(x_neg), f(x_adv)

  per_pixel = lambda v: jnp.mean(v, axis=(1, 2))
  l_cls = mean(_cross_entropy(logits, y))
  if config.contrast_loss == "one_vs_others":
    l_con = mean(one_vs_others_loss(logits_neg, y))
  else:
    l_con = -mean(_cross_entropy(logits_neg, y))
  if config.reg_target == "l1":
    l_reg = mean(jnp.sum(jnp.abs(s), axis=(1, 2)))
  elif config.reg_target == "normalized":
    l_reg = mean(per_pixel(s_norm))
  else:
    l_reg = mean(per_pixel(jnp.abs(s)))
  l_ad = mean(_cross_entropy(logits_adv, y))
  loss = l_cls + config.w1 * l_con + config.w2 * l_reg + config.w3 * l_ad
  metrics = {
      "loss": loss, "loss_cls": l_cls, "loss_con": l_con, "loss_reg": l_reg, "loss_ad": l_ad,
      "accuracy": mean(_correct(logits, y)), "accuracy_con": mean(_correct(logits_neg, y)),
      "accuracy_ad": mean(_correct(logits_adv, y)), "mask_fraction": mean(per_pixel(m)),
  }
  return loss, metrics


# -- saliency resolution --------------------------------------------------------------------

def _resolve_saliency(saliency: str | SaliencyFn, model: Any, config: PPIConfig):
  """Returns ``sal(variables, f, x, y) -> map``."""
  if callable(saliency):
    return lambda variables, f, x, y: saliency(f, x, y)
  if saliency not in SALIENCY_NAMES:
    raise ValueError(f"saliency: expected a callable (f, x, target) -> map or one of "
                     f"{SALIENCY_NAMES}, got {saliency!r}")
  if saliency in ("wbp", "lrp"):
    from jaxplain import rules  # pylint: disable=import-outside-toplevel
    fn = getattr(rules, saliency)
    return lambda variables, f, x, y: fn(f, x, y)
  if saliency in ("gradient", "gradient_x_input"):
    from jaxplain import gradients  # pylint: disable=import-outside-toplevel
    fn = getattr(gradients, saliency)
    return lambda variables, f, x, y: fn(f, x, y)
  from jaxplain import cam  # pylint: disable=import-outside-toplevel

  from jaxplain.model import as_wrapped, train_parts  # pylint: disable=import-outside-toplevel
  module, _ = train_parts(model, "model")   # linen module or NNX / Equinox trainee

  def grad_cam(variables, f, x, y):
    del f
    m = as_wrapped(module, variables)       # the model interface (any framework)
    if m.channels_first:                    # x is PPI's NHWC view; the model takes NCHW
      x = _to_channels_first(x)
    layer = config.grad_cam_layer or _last_conv_in_order(m, x)
    return cam.grad_cam(m, x, y, layer=layer)      # (B, H, W) in either layout
  return grad_cam


def _to_channels_first(z: jax.Array) -> jax.Array:
  return jnp.moveaxis(z, -1, 1)


def _last_conv_in_order(m: Any, x: jax.Array) -> str:
  """The last convolution layer in execution order of a wrapped model (any framework; was:
  the alphabetically last 4-D kernel of linen params, so "conv9" after "conv10")."""
  for name in reversed(m.layer_names(x)):
    try:
      if m.linear(name).kind == "conv":
        return name
    except (TypeError, ValueError):
      continue
  raise ValueError("saliency='grad_cam': the model has no convolution layer; set "
                   "PPIConfig.grad_cam_layer")


# -- training-driver loss and the jitted step -----------------------------------------------

def make_ppi_loss(model: Any, config: PPIConfig | None = None, *,
                  saliency: str | SaliencyFn = "wbp"):
  """PPI as a loss for :func:`jaxplain.train.fit` (the ``loss_fn`` form that ``fit`` takes).

  Args:
    model: a Flax linen module returning (B, K) logits (or ``jaxplain.wrap(module,
      variables)``); models with batch norm take ``train: bool`` and have
      ``model_state = {"batch_stats": ...}``. A Flax NNX module (bare or wrapped) works the
      same way with the variables of :func:`jaxplain.train.init_state` (nested dicts;
      ``nnx.BatchNorm`` statistics are the ``"batch_stats"``); ``saliency="grad_cam"`` then
      hooks the NNX layer named by ``PPIConfig.grad_cam_layer`` (attribute path; default, in
      every framework, the last convolution in execution order). An Equinox module (bare or
      wrapped; stateless) takes its own channels-first images (B, C, H, W): PPI then works on
      the NHWC view (``x`` moved to channels-last, ``f`` moving it back), so masks cover a
      pixel's channels in either layout.
    config: :class:`PPIConfig` (default ``PPIConfig()``).
    saliency: a callable ``(f, x, target) -> map`` or a name in ``SALIENCY_NAMES`` (a
      callable sees the NHWC view: ``f`` and ``x`` channels-last).

  Returns:
    ``loss_fn(params, model_state, batch, key, step) -> (loss, (metrics, new_model_state))``
    with ``batch["image"]`` (B, H, W, C) ((B, C, H, W) for Equinox) and ``batch["label"]``
    (B,). For ``step < config.warmup_steps`` only ``L_cls`` is computed (the PPI metrics are
    reported as 0 and ``ppi_on`` as 0). A bool ``batch["mask"]`` (B,) (the driver's padded last batch) weights
    every batch mean.

  >>> import jax, jax.numpy as jnp
  >>> from jaxplain.models import LeNet
  >>> model = LeNet(); params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  >>> gxi = lambda f, x, t: jax.grad(lambda x: f(x)[jnp.arange(x.shape[0]), t].sum())(x) * x
  >>> loss_fn = make_ppi_loss(model, saliency=gxi)
  >>> batch = {"image": jnp.ones((2, 28, 28, 1)), "label": jnp.array([1, 2])}
  >>> loss, (metrics, state) = loss_fn(params, {}, batch, jax.random.key(1), 0)
  >>> float(metrics["ppi_on"])
  1.0
  """
  from jaxplain.model import train_parts  # pylint: disable=import-outside-toplevel
  config = PPIConfig() if config is None else config
  # a linen module (or wrap(module, variables)); an NNX / Equinox module becomes a trainee
  # with linen's init / apply (see jaxplain.train)
  model, _ = train_parts(model, "model")
  sal = _resolve_saliency(saliency, model, config)
  # PPI masks pixels across channels of NHWC images; a channels-first (Equinox) model is
  # seen through its NHWC view (x moved to channels-last, f moving it back)
  channels_first = getattr(model, "channels_first", False)
  to_model = _to_channels_first if channels_first else (lambda z: z)

  def loss_fn(params, model_state, batch, key, step):
    if "image" not in batch or "label" not in batch:
      raise ValueError(f"batch: expected keys 'image' and 'label', got {sorted(batch)}")
    x_model = _validate.check_batched(batch["image"], "batch['image']", min_rank=4)
    x = jnp.moveaxis(x_model, 1, -1) if channels_first else x_model
    y = _validate.check_target(batch["label"], x.shape[0], None, "batch['label']")
    model_state = dict(model_state or {})
    variables = {"params": params, **model_state}
    has_bn = "batch_stats" in model_state
    w = batch.get("mask")
    w = None if w is None else jnp.asarray(w, jnp.float32)
    mean = lambda v: weighted_mean(v, w)

    def f_eval(z):
      return model.apply(variables, to_model(z))

    def f_train(z):
      if has_bn:
        return model.apply(variables, to_model(z), train=True, mutable=["batch_stats"])[0]
      return model.apply(variables, to_model(z))

    if has_bn:
      logits, updates = model.apply(variables, x_model, train=True, mutable=["batch_stats"])
      new_state = {**model_state, **dict(updates)}
    else:
      logits, new_state = f_eval(x), model_state

    def ppi_branch(_):
      s = sal(variables, f_eval, x, y)
      loss, metrics = ppi_objective(f_train, x, y, s, config, key=key, logits=logits,
                                    weights=w, joint=not has_bn)
      return loss, {**metrics, "ppi_on": jnp.ones((), jnp.float32)}

    def cls_branch(_):
      l_cls = mean(_cross_entropy(logits, y))
      z = jnp.zeros((), l_cls.dtype)
      return l_cls, {"loss": l_cls, "loss_cls": l_cls, "loss_con": z, "loss_reg": z,
                     "loss_ad": z, "accuracy": mean(_correct(logits, y)),
                     "accuracy_con": jnp.zeros((), jnp.float32),
                     "accuracy_ad": jnp.zeros((), jnp.float32), "mask_fraction": z,
                     "ppi_on": jnp.zeros((), jnp.float32)}

    if config.warmup_steps == 0:
      loss, metrics = ppi_branch(None)
    else:
      loss, metrics = jax.lax.cond(jnp.asarray(step) >= config.warmup_steps,
                                   ppi_branch, cls_branch, None)
    return loss, (metrics, new_state)

  return loss_fn


def make_ppi_train_step(*args, **kwargs):
  """Removed: PPI trains with the shared trainer, :func:`jaxplain.train.make_train_step`.

  Raises:
    TypeError: always, with the replacement call.

  >>> make_ppi_train_step()  # doctest: +IGNORE_EXCEPTION_DETAIL
  Traceback (most recent call last):
  TypeError: make_ppi_train_step was removed ...
  """
  del args, kwargs
  raise TypeError(
      "make_ppi_train_step was removed: PPI is a loss of the shared trainer. Use\n"
      "  loss_fn = jaxplain.ppi.make_ppi_loss(model, config, saliency=...)\n"
      "  step = jaxplain.train.make_train_step(loss_fn, optimizer)\n"
      "  state = jaxplain.train.init_state(model, optimizer, x[:1])\n"
      "  state, metrics = step(state, {'image': x, 'label': y}, key)\n"
      "or jaxplain.train.fit(model, data, loss_fn=loss_fn, ...) (checkpoints, resume, data "
      "parallel).")
