"""The causal-mechanism algorithm of seed 001 (SPEC section 4).

* ``effects``: e_n = y^(n)_j - y_j, the change of the target logit under intervention n.
* ``significance``: the reading of the paper's garbled eq. 1 chosen in SPEC section 4: with mu
  and sigma the mean and standard deviation of y^(n)_j over the layer's interventions,
  delta_l = |mu - y_j| / sigma and z_n = e_n / sigma; n is in I+ (positive causal: removing it
  lowers the logit) when z_n < -delta_l, in I- when z_n > +delta_l. (Since mu - y_j is the
  mean effect, this is e_n < -|mean e| resp. e_n > +|mean e|.) If sigma = 0 nothing is
  significant.
* ``causal_effect``: CS_l(n) = KL(p(y|X) || p(y|do(w_n = alpha), X)), p = softmax of logits
  (Prop. 2 with Appendix A.2).
* ``walk``: Algorithm 1, the retrospective walk. ``layers`` is an explicit list of Dense/Conv
  submodules in forward order whose last entry produces the logits. Starting at the last layer
  with K = {j}: for each input unit i of layer l intervene on w_(i,K) (all weights from input
  unit i -- a dense input, a conv input channel, or a flatten group of one conv channel --
  toward K), split into I+ / I-, record (layer, i, CS, e) in G+ / G-, then K = I+ and go to
  the previous layer in the list. The input units of layer l must be the output channels of
  the previous listed layer (equal counts, or a dense layer after a flatten of those channels);
  in a ResNet the block output channel i is conv2's channel i plus the skip. The walk is
  vectorised over inputs: each example keeps its own K, so one call gives local explanations
  for a batch, and ``WalkResult.frequency`` the global one.
* ``correct``: zero every analysed weight (w_(i,K) of each walked layer) that is not in G+.
* ``mediator_map``: the visual explanation, the mean over the causal channels of a conv layer's
  activation, upsampled to the input size.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _validate
from jaxplain.interventions import _hooks
from jaxplain.interventions._edit import resolve_layer, set_value, units as make_units
from jaxplain.interventions._select import select
from jaxplain.interventions._sweep import _kernel_bias, _map, _new_outputs


def effects(logits_do: jax.Array, logits: jax.Array, target: Any) -> jax.Array:
  """e_n = y^(n)_j - y_j for every intervention n and example.

  Args:
    logits_do: (N, B, K) logits under the N interventions.
    logits: (B, K) logits of the unedited model.
    target: int or (B,) int class j.

  Returns:
    (N, B) effects.

  >>> effects(jnp.array([[[1., 0.]], [[3., 0.]]]), jnp.array([[2., 0.]]), 0)
  Array([[-1.],
         [ 1.]], dtype=float32)
  """
  logits = _validate.check_logits(jnp.asarray(logits), jnp.shape(logits)[0], "logits")
  t = _validate.check_target(target, logits.shape[0], logits.shape[1])
  if jnp.ndim(logits_do) != 3 or jnp.shape(logits_do)[1:] != logits.shape:
    raise ValueError(f"logits_do: expected shape (N, {logits.shape[0]}, {logits.shape[1]}), got "
                     f"{jnp.shape(logits_do)}")
  y = _validate.select_target(logits, t)
  y_do = jnp.take_along_axis(logits_do, t[None, :, None], axis=2)[..., 0]
  return y_do - y[None]


def significance(e: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Split the interventions of one layer into I+ / I- (SPEC section 4 reading of eq. 1).

  Args:
    e: (N, B) effects of the layer's N interventions.

  Returns:
    ``(positive, negative, z, delta)``: bool (N, B) masks of I+ and I-, z = e / sigma (N, B),
    and delta = |mu - y_j| / sigma (B,) (statistics over the N interventions, per example).

  >>> pos, neg, z, d = significance(jnp.array([[-5.], [0.], [0.1], [0.2], [3.]]))
  >>> pos[:, 0].tolist(), neg[:, 0].tolist()
  ([True, False, False, False, False], [False, False, False, False, True])
  """
  e = jnp.asarray(e)
  if e.ndim != 2:
    raise ValueError(f"e: expected effects of shape (N, B), got {e.shape}")
  mean = jnp.mean(e, axis=0)
  sigma = jnp.std(e, axis=0)
  ok = sigma > 0
  safe = jnp.where(ok, sigma, 1.0)
  delta = jnp.abs(mean) / safe
  z = e / safe[None]
  pos = (z < -delta[None]) & ok[None]
  neg = (z > delta[None]) & ok[None]
  return pos, neg, z, delta


def causal_effect(logits: jax.Array, logits_do: jax.Array) -> jax.Array:
  """CS(n) = KL(p(y|X) || p(y|do(w_n = alpha), X)) with p = softmax (paper Prop. 2).

  Args:
    logits: (B, K) unedited logits.
    logits_do: (N, B, K) logits under the interventions (or (B, K)).

  Returns:
    (N, B) (or (B,)) KL divergences in nats.

  >>> float(causal_effect(jnp.array([[0., 0.]]), jnp.array([[0., 0.]]))[0])
  0.0
  """
  lp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  lq = jax.nn.log_softmax(jnp.asarray(logits_do), axis=-1)
  lp = jnp.broadcast_to(lp, lq.shape)  # (B, K) against (N, B, K)
  return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


@dataclasses.dataclass(frozen=True)
class LayerEffects:
  """Result of one layer of the walk (numpy arrays, B examples, N input units).

  Attributes:
    layer: module path.
    effect: (B, N) e_n; cs: (B, N) CS_l(n); positive / negative: (B, N) bool I+ / I-;
    outputs: (B, K_out) bool, the set K of output units intervened toward;
    delta: (B,) threshold; channels: flatten grouping used for this layer, or None.
  """
  layer: str
  effect: np.ndarray
  cs: np.ndarray
  positive: np.ndarray
  negative: np.ndarray
  outputs: np.ndarray
  delta: np.ndarray
  channels: int | None


@dataclasses.dataclass(frozen=True)
class WalkResult:
  """Output of ``walk``: per-layer effects (in forward order) plus the unedited logits."""
  layers: tuple[str, ...]
  per_layer: dict
  logits: np.ndarray
  target: np.ndarray

  def g_plus(self, b: int = 0) -> list[tuple[str, int, float, float]]:
    """G+ of example ``b``: (layer, unit, CS, effect) of the positive causal units."""
    return self._g(b, "positive")

  def g_minus(self, b: int = 0) -> list[tuple[str, int, float, float]]:
    """G- of example ``b``: (layer, unit, CS, effect) of the negative causal units."""
    return self._g(b, "negative")

  def _g(self, b, which):
    out = []
    for name in reversed(self.layers):
      r = self.per_layer[name]
      for i in np.flatnonzero(getattr(r, which)[b]):
        out.append((name, int(i), float(r.cs[b, i]), float(r.effect[b, i])))
    return out

  def subset(self, rows: Any) -> "WalkResult":
    """The result restricted to some examples (an index array, a slice or a bool mask)."""
    per = {n: dataclasses.replace(r, effect=r.effect[rows], cs=r.cs[rows],
                                  positive=r.positive[rows], negative=r.negative[rows],
                                  outputs=r.outputs[rows], delta=r.delta[rows])
           for n, r in self.per_layer.items()}
    return WalkResult(self.layers, per, self.logits[rows], self.target[rows])

  def frequency(self) -> dict[str, np.ndarray]:
    """Fraction of the examples in which each unit is positive causal: {layer: (N,)}."""
    return {n: self.per_layer[n].positive.mean(axis=0) for n in self.layers}

  def causal_units(self, threshold: float = 0.8) -> dict[str, np.ndarray]:
    """Global explanation: the units positive causal in at least ``threshold`` of examples."""
    if not 0.0 <= threshold <= 1.0:
      raise ValueError(f"threshold: expected a fraction in [0, 1], got {threshold}")
    return {n: np.flatnonzero(f >= threshold) for n, f in self.frequency().items()}


def _layer_sizes(variables: Any, layer: str) -> tuple[int, int]:
  w, _ = _kernel_bias(variables, layer)
  return int(w.shape[-2]), int(w.shape[-1])


def walk(model: nn.Module, variables: Any, x: jax.Array, target: Any, layers: Sequence[str], *,
         value: float = 0.0, chunk: int | None = None,
         apply_kwargs: dict | None = None) -> WalkResult:
  """Algorithm 1 of seed 001: the retrospective walk from the logits layer back to the first
  listed layer, following I+ (see the module docstring), vectorised over the inputs.

  Args:
    model: flax.linen module, ``model.apply(variables, x, **apply_kwargs) -> (B, K)``.
    variables: its variables.
    x: (B, ...) inputs (B = 1 for a local explanation, many inputs of a class for a global one).
    target: int or (B,) class j per example.
    layers: Dense/Conv module paths in forward order; the last one must produce the logits.
    value: intervention value alpha (the paper uses 0).
    chunk: interventions per vmapped chunk (memory bound), None for all at once.
    apply_kwargs: extra keyword arguments of ``model.apply``.

  Returns:
    A ``WalkResult``; ``g_plus(b)`` / ``g_minus(b)`` give G+ / G- as (layer, unit, CS, effect).

  >>> from jaxplain.models import LeNet
  >>> v = LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> r = walk(LeNet(), v, jnp.ones((1, 28, 28, 1)), 3, ["fc2", "fc3"])
  >>> r.per_layer["fc3"].effect.shape, r.per_layer["fc2"].effect.shape
  ((1, 84), (1, 120))
  """
  layers = list(layers)
  if not layers or not all(isinstance(l, str) for l in layers):
    raise ValueError(f"layers: expected a non-empty list of module paths, got {layers!r}")
  if len(set(layers)) != len(layers):
    raise ValueError(f"layers: duplicated entries in {layers}")
  x = _validate.check_batched(x, "x")
  mods = tuple(resolve_layer(variables, l)[1] for l in layers)
  kw = tuple(sorted((apply_kwargs or {}).items()))
  out = jax.eval_shape(lambda v, x: model.apply(v, x, **dict(kw)), variables, x)
  _validate.check_logits(out, x.shape[0], "model.apply")
  t = _validate.check_target(target, x.shape[0], out.shape[1])
  fn, info = _walk_fn(model, mods, float(value), chunk, kw)
  logits, per = fn(variables, x, t)
  per_layer = {}
  for name in mods:
    e, cs, pos, neg, om, delta = (np.asarray(a) for a in per[name])
    per_layer[name] = LayerEffects(name, e, cs, pos, neg, om, delta, info["grouping"][name])
  return WalkResult(mods, per_layer, np.asarray(logits), np.asarray(t))


@functools.lru_cache(maxsize=32)
def _walk_fn(model, mods, value, chunk, kw):
  """One jitted function for the whole walk of ``model`` over ``mods`` (cached)."""
  apply_kwargs = dict(kw)
  info: dict[str, Any] = {}

  def run(variables, x, t):
    logits, caps = _hooks.capture(model, variables, x, mods, apply_kwargs=apply_kwargs)
    bsz, n_cls = logits.shape
    order = [m for m in caps if m in mods]
    if order != list(mods):
      raise ValueError(f"layers: must be listed in forward (call) order; the model calls them "
                       f"in the order {order}, got {list(mods)}")
    if caps[mods[-1]][1] is not logits:
      raise ValueError(f"layers: the last layer {mods[-1]!r} must produce the logits (shape "
                       f"{logits.shape}); its output has shape {caps[mods[-1]][1].shape}")
    grouping: dict[str, int | None] = {mods[0]: None}
    for l in range(1, len(mods)):
      n_in, _ = _layer_sizes(variables, mods[l])
      _, prev_out = _layer_sizes(variables, mods[l - 1])
      if n_in == prev_out:
        grouping[mods[l]] = None
      elif caps[mods[l]][0].ndim == 2 and caps[mods[l - 1]][1].ndim > 2 and n_in % prev_out == 0:
        grouping[mods[l]] = prev_out
      else:
        raise ValueError(f"layers: cannot walk from {mods[l]!r} (with {n_in} input units) back "
                         f"to {mods[l - 1]!r} (with {prev_out} output channels): the input units "
                         "of a layer must be the output channels of the previous listed layer")
    info["grouping"] = grouping
    out_mask = jax.nn.one_hot(t, n_cls, dtype=bool)
    per = {}
    for l in reversed(range(len(mods))):
      name = mods[l]
      h, z, mod = caps[name]
      w, b = _kernel_bias(variables, name)
      u = make_units(variables, name, "input", channels=grouping[name])
      fn, data = _new_outputs(u, mod, h, z, w, b, value, out_mask=out_mask)
      logits_do = _map(lambda d, name=name, fn=fn: _hooks.replace_output(
          model, variables, x, name, fn(d), apply_kwargs=apply_kwargs), data, chunk)
      e = effects(logits_do, logits, t)
      pos, neg, _, delta = significance(e)
      cs = causal_effect(logits, logits_do)
      per[name] = (e.T, cs.T, pos.T, neg.T, out_mask, delta)
      out_mask = pos.T  # (B, N): K of the previous layer
    return logits, per

  return jax.jit(run), info


def _analysed_masks(variables: Any, result: WalkResult, keep_rows: dict, outputs: dict) -> dict:
  masks = {}
  for name in result.layers:
    owner, _ = resolve_layer(variables, name)
    w, _ = _kernel_bias(variables, name)
    n_in, n_out = w.shape[-2], w.shape[-1]
    r = result.per_layer[name]
    rows = np.asarray(keep_rows[name], bool)
    if r.channels is not None:
      rows = np.tile(rows, n_in // r.channels)  # NHWC flatten: input index % C = channel
    zero = (~rows)[:, None] & np.asarray(outputs[name], bool)[None, :]
    masks[owner + "/kernel"] = np.broadcast_to(
        zero.reshape((1,) * (w.ndim - 2) + (n_in, n_out)), w.shape)
  return masks


def correct(variables: Any, result: WalkResult, example: int | None = None, *,
            threshold: float = 0.8, layers: Sequence[str] | None = None) -> Any:
  """Correction (seed 001, section 3.2): in every walked layer zero each analysed weight
  w_(i,K) whose unit i is not in G+ (non-causal units and G-); other weights are untouched.

  Args:
    variables: the model's variables.
    result: a ``WalkResult`` (typically computed for the true class).
    example: use example ``example``'s own G+ (local correction); None: a global one, keeping
      the units positive in >= ``threshold`` of the examples and treating as analysed the
      output units that were in K for >= ``threshold`` of them.
    threshold: fraction for the global correction.
    layers: correct only these walked layers (default: all of them).

  Returns:
    Edited variables.

  >>> from jaxplain.models import LeNet
  >>> v = LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> r = walk(LeNet(), v, jnp.ones((1, 28, 28, 1)), 3, ["fc2", "fc3"])
  >>> w = correct(v, r, 0)["params"]["fc3"]["kernel"]
  >>> int((w[:, 3] != 0).sum()) == len([g for g in r.g_plus(0) if g[0] == "fc3"])
  True
  """
  if example is not None:
    if not 0 <= example < len(result.target):
      raise ValueError(f"example: index out of range [0, {len(result.target)}), got {example}")
    keep = {n: result.per_layer[n].positive[example] for n in result.layers}
    outs = {n: result.per_layer[n].outputs[example] for n in result.layers}
  else:
    keep = {n: result.per_layer[n].positive.mean(0) >= threshold for n in result.layers}
    outs = {n: result.per_layer[n].outputs.mean(0) >= threshold for n in result.layers}
  masks = _analysed_masks(variables, result, keep, outs)
  if layers is not None:
    chosen = [resolve_layer(variables, l) for l in layers]
    bad = [m for _, m in chosen if m not in result.layers]
    if bad:
      raise ValueError(f"layers: {bad} were not walked; walked: {list(result.layers)}")
    masks = {o + "/kernel": masks[o + "/kernel"] for o, _ in chosen}
  sel = select(*[re.escape(p) for p in masks])
  return set_value(variables, sel, 0.0, where=masks)


def mediator_map(model: nn.Module, variables: Any, x: jax.Array, result: WalkResult, layer: str,
                 *, relu: bool = True, size: tuple[int, int] | None = None,
                 apply_kwargs: dict | None = None) -> jax.Array:
  """Visual explanation: the mean over the causal channels of conv ``layer``'s activation,
  upsampled (bilinear) to the input size. The causal channels of ``layer`` are the I+ of the
  next walked layer (the units of its input), per example.

  Args:
    model, variables: the model.
    x: (B, H, W, C) the inputs the walk ran on.
    result: the ``WalkResult`` of those inputs.
    layer: a walked conv layer that is not the last walked layer.
    relu: apply ReLU to the layer's output before averaging.
    size: output (H, W); default the input's.
    apply_kwargs: extra keyword arguments of ``model.apply``.

  Returns:
    (B, H, W) heat maps (zeros where an example has no causal channel).

  >>> from jaxplain.models import LeNet
  >>> v = LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> x = jnp.ones((1, 28, 28, 1))
  >>> r = walk(LeNet(), v, x, 3, ["conv2", "fc1", "fc2", "fc3"])
  >>> mediator_map(LeNet(), v, x, r, "conv2").shape
  (1, 28, 28)
  """
  _, mod = resolve_layer(variables, layer)
  if mod not in result.layers[:-1]:
    raise ValueError(f"layer: {layer!r} must be a walked layer other than the last; walked: "
                     f"{list(result.layers)}")
  nxt = result.per_layer[result.layers[result.layers.index(mod) + 1]]
  _, caps = _hooks.capture(model, variables, x, [mod], apply_kwargs=apply_kwargs)
  act = caps[mod][1]
  if act.ndim != 4:
    raise ValueError(f"layer: {layer!r} is not a conv layer (output shape {act.shape})")
  if relu:
    act = jax.nn.relu(act)
  chans = jnp.asarray(nxt.positive, act.dtype)  # (B, C)
  if chans.shape != (act.shape[0], act.shape[-1]):
    raise ValueError(f"result: causal channels {chans.shape} do not match the activation "
                     f"{act.shape} (was the walk run on these inputs?)")
  count = jnp.maximum(chans.sum(-1), 1.0)
  m = jnp.einsum("bhwc,bc->bhw", act, chans) / count[:, None, None]
  size = tuple(x.shape[1:3]) if size is None else tuple(size)
  return jax.image.resize(m, (m.shape[0],) + size, "bilinear")
