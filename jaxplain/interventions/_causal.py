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

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _validate
from jaxplain.interventions._edit import set_value, units as make_units
from jaxplain.interventions._select import path_str, select
from jaxplain.interventions._sweep import (_as_model, _check_x, _kernel_bias, _map, _new_outputs,
                                           _post, _pre_activation)


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
  lp = jnp.reshape(lp, (1,) * (lq.ndim - lp.ndim) + lp.shape)
  return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["effect", "cs", "positive", "negative", "outputs", "delta"],
                   meta_fields=["layer", "channels", "channels_first"])
@dataclasses.dataclass(frozen=True)
class LayerEffects:
  """Result of one layer of the walk (B examples, N input units); a pytree of arrays, so that
  ``walk_step`` and ``walk`` can be jitted and vmapped.

  Attributes:
    layer: layer name.
    effect: (B, N) e_n; cs: (B, N) CS_l(n); positive / negative: (B, N) bool I+ / I-;
    outputs: (B, K_out) bool, the set K of output units intervened toward;
    delta: (B,) threshold; channels: flatten grouping used for this layer, or None;
    channels_first: the flatten order of that grouping (CHW for Equinox).
  """
  layer: str
  effect: Any
  cs: Any
  positive: Any
  negative: Any
  outputs: Any
  delta: Any
  channels: int | None
  channels_first: bool = False


@functools.partial(jax.tree_util.register_dataclass, data_fields=["per_layer", "logits", "target"],
                   meta_fields=["layers"])
@dataclasses.dataclass(frozen=True)
class WalkResult:
  """Output of ``walk``: per-layer effects (in forward order) plus the unedited logits (a
  pytree of arrays; the methods below read concrete values and run outside ``jit``)."""
  layers: tuple[str, ...]
  per_layer: dict
  logits: Any
  target: Any

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
      cs, eff = np.asarray(r.cs), np.asarray(r.effect)
      for i in np.flatnonzero(np.asarray(getattr(r, which))[b]):
        out.append((name, int(i), float(cs[b, i]), float(eff[b, i])))
    return out

  def subset(self, rows: Any) -> "WalkResult":
    """The result restricted to some examples (an index array, a slice or a bool mask)."""
    take = lambda a: np.asarray(a)[rows]  # noqa: E731
    per = {n: dataclasses.replace(r, effect=take(r.effect), cs=take(r.cs),
                                  positive=take(r.positive), negative=take(r.negative),
                                  outputs=take(r.outputs), delta=take(r.delta))
           for n, r in self.per_layer.items()}
    return WalkResult(self.layers, per, take(self.logits), take(self.target))

  def frequency(self) -> dict[str, np.ndarray]:
    """Fraction of the examples in which each unit is positive causal: {layer: (N,)}."""
    return {n: np.asarray(self.per_layer[n].positive).mean(axis=0) for n in self.layers}

  def causal_units(self, threshold: float = 0.8) -> dict[str, np.ndarray]:
    """Global explanation: the units positive causal in at least ``threshold`` of examples."""
    if not 0.0 <= threshold <= 1.0:
      raise ValueError(f"threshold: expected a fraction in [0, 1], got {threshold}")
    return {n: np.flatnonzero(f >= threshold) for n, f in self.frequency().items()}


def walk_step(model: Any, x: jax.Array, target: Any, layer: str, outputs: Any, *,
              channels: int | None = None, value: float = 0.0, chunk: int | None = None,
              logits: jax.Array | None = None) -> LayerEffects:
  """One layer of Algorithm 1: intervene on w_(i,K) for every input unit i of ``layer``
  (K = ``outputs`` per example), and split the units into I+ / I-. Pure: jit and vmap it.

  Args:
    model: a wrapped model (:func:`jaxplain.wrap`) or anything ``wrap`` takes alone.
    x: (B, ...) inputs (any dtype: token ids too).
    target: int or (B,) class j.
    layer: a dense / conv layer of the model.
    outputs: (B, K_out) bool, the output units K of ``layer`` (one-hot of the target for the
      logits layer; the previous step's ``positive`` otherwise).
    channels: group the dense inputs by this many conv channels (after a flatten).
    value: intervention value alpha.
    chunk: interventions per vmapped chunk.
    logits: the unedited logits (B, K), if already computed.

  Returns:
    A ``LayerEffects`` (arrays: traced under ``jit``).

  >>> from jaxplain import wrap
  >>> from jaxplain.models import LeNet
  >>> m = wrap(LeNet(), LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  >>> k = jax.nn.one_hot(jnp.array([3]), 10, dtype=bool)
  >>> jax.jit(lambda x: walk_step(m, x, 3, "fc3", k))(jnp.ones((1, 28, 28, 1))).effect.shape
  (1, 84)
  """
  from jaxplain.model import wrap  # pylint: disable=import-outside-toplevel
  m = wrap(model)
  x = _check_x(x)
  _, caps = m.capture(x, [layer])
  if logits is None:
    logits = m(x)
  t = _validate.check_target(target, x.shape[0], logits.shape[1])
  h, z = caps[layer]
  w, b, lin = _kernel_bias(m, layer)
  u = make_units(m, layer, "input", channels=channels)
  out_mask = jnp.asarray(outputs, bool)
  if out_mask.shape != (x.shape[0], z.shape[-1]):
    raise ValueError(f"outputs: expected a (B, K_out) = ({x.shape[0]}, {z.shape[-1]}) bool "
                     f"mask, got shape {out_mask.shape}")
  fn, data = _new_outputs(u, lin, h, _pre_activation(lin, h, z, w, b), w, b, value,
                          out_mask=out_mask)
  logits_do = _map(lambda d: m.replace(x, layer, _post(lin, fn(d))), data, chunk)
  e = effects(logits_do, logits, t)
  pos, neg, _, delta = significance(e)
  cs = causal_effect(logits, logits_do)
  return LayerEffects(layer, e.T, cs.T, pos.T, neg.T, out_mask, delta, channels,
                      m.channels_first)


def _groupings(m: Any, x: jax.Array, layers: list[str]) -> tuple[dict, Any]:
  """Static checks of the walked layers (on shapes) and the flatten grouping of each."""
  order = m.layer_names(x)
  called = [l for l in order if l in layers]
  missing = [l for l in layers if l not in order]
  if missing:
    raise ValueError(f"layers: {missing} are not called by the model; called layers: "
                     f"{list(order)}")
  if called != layers:
    raise ValueError(f"layers: must be listed in forward (call) order; the model calls them "
                     f"in the order {called}, got {layers}")
  out, caps = jax.eval_shape(lambda z: m.capture(z, layers), x)
  _validate.check_logits(out, x.shape[0], "model")
  if caps[layers[-1]][1].shape != out.shape:
    raise ValueError(f"layers: the last layer {layers[-1]!r} must produce the logits (shape "
                     f"{out.shape}); its output has shape {caps[layers[-1]][1].shape}")
  def size(l):
    native, perm = _native_shape(m, l), m.linear(l).perm
    return tuple(native[i] for i in np.argsort(perm))[-2:]
  grouping: dict[str, int | None] = {layers[0]: None}
  for l in range(1, len(layers)):
    n_in, _ = size(layers[l])
    _, prev_out = size(layers[l - 1])
    if n_in == prev_out:
      grouping[layers[l]] = None
    elif (caps[layers[l]][0].ndim == 2 and caps[layers[l - 1]][1].ndim > 2
          and n_in % prev_out == 0):
      grouping[layers[l]] = prev_out
    else:
      raise ValueError(f"layers: cannot walk from {layers[l]!r} (with {n_in} input units) back "
                       f"to {layers[l - 1]!r} (with {prev_out} output channels): the input units "
                       "of a layer must be the output channels of the previous listed layer")
  return grouping, out


def _native_shape(m: Any, layer: str) -> tuple:
  lin = m.linear(layer)
  leaves = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(m.params)[0]}
  return tuple(np.shape(leaves[lin.kernel]))


def walk(model: Any, *args: Any, value: float = 0.0, chunk: int | None = None,
         apply_kwargs: dict | None = None) -> WalkResult:
  """Algorithm 1 of seed 001: the retrospective walk from the logits layer back to the first
  listed layer, following I+ (see the module docstring), vectorised over the inputs.

  Pure and traced throughout: the data-dependent unit sets K are fixed-size boolean masks
  (B, K_out) carried from one ``walk_step`` to the previous layer's, so ``jax.jit(lambda x, t:
  walk(model, x, t, layers))`` compiles the whole walk once (jit it: nothing here calls
  ``jax.jit``). Only ``WalkResult.g_plus`` / ``g_minus`` / ``frequency`` read concrete values.

  Called as ``walk(model, x, target, layers)`` (the older ``walk(module, variables, x,
  target, layers)`` of linen still works).

  Args:
    model: anything :func:`jaxplain.wrap` takes (linen: ``wrap(module, variables)``).
    *args: ``x, target, layers``: (B, ...) inputs (any dtype: token ids too; B = 1 for a
      local explanation, many inputs of a class for a global one), int or (B,) class j per
      example, and the dense / conv layer names in forward order, the last producing the logits.
    value: intervention value alpha (the paper uses 0).
    chunk: interventions per vmapped chunk (memory bound), None for all at once.
    apply_kwargs: extra keyword arguments of a linen ``model.apply`` (old call only).

  Returns:
    A ``WalkResult``; ``g_plus(b)`` / ``g_minus(b)`` give G+ / G- as (layer, unit, CS, effect).

  >>> from jaxplain import wrap
  >>> from jaxplain.models import LeNet
  >>> m = wrap(LeNet(), LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  >>> r = walk(m, jnp.ones((1, 28, 28, 1)), 3, ["fc2", "fc3"])
  >>> r.per_layer["fc3"].effect.shape, r.per_layer["fc2"].effect.shape
  ((1, 84), (1, 120))
  """
  m, (x, target, layers) = _model_args(model, args, 3, "walk", apply_kwargs)
  layers = [layers] if isinstance(layers, str) else list(layers)
  if not layers or not all(isinstance(l, str) for l in layers):
    raise ValueError(f"layers: expected a non-empty list of layer names, got {layers!r}")
  if len(set(layers)) != len(layers):
    raise ValueError(f"layers: duplicated entries in {layers}")
  x = _check_x(x)
  grouping, out = _groupings(m, x, layers)
  t = _validate.check_target(target, x.shape[0], out.shape[1])
  logits = m(x)
  outputs = jax.nn.one_hot(t, out.shape[1], dtype=bool)
  per = {}
  for name in reversed(layers):
    r = walk_step(m, x, t, name, outputs, channels=grouping[name], value=value, chunk=chunk,
                  logits=logits)
    per[name] = r
    outputs = r.positive  # (B, N): K of the previous layer
  return WalkResult(tuple(layers), {n: per[n] for n in layers}, logits, t)


def _model_args(model, args, n, what, apply_kwargs):
  if apply_kwargs and len(args) == n + 1:
    from jaxplain.model import wrap  # pylint: disable=import-outside-toplevel
    return wrap(model, args[0], apply_kwargs=apply_kwargs), tuple(args[1:])
  return _as_model(model, args, n, what)


def _analysed_masks(m: Any, result: WalkResult, keep_rows: dict, outputs: dict) -> dict:
  masks = {}
  for name in result.layers:
    w, _, lin = _kernel_bias(m, name)
    n_in, n_out = w.shape[-2], w.shape[-1]
    r = result.per_layer[name]
    rows = np.asarray(keep_rows[name], bool)
    if r.channels is not None:
      grown = np.zeros(n_in, bool)
      size = n_in // r.channels
      for c in np.flatnonzero(rows):
        if r.channels_first:
          grown[c * size:(c + 1) * size] = True
        else:
          grown[c::r.channels] = True
      rows = grown
    zero = (~rows)[:, None] & np.asarray(outputs[name], bool)[None, :]
    canon = np.broadcast_to(zero.reshape((1,) * (w.ndim - 2) + (n_in, n_out)), w.shape)
    masks[lin.kernel] = lin.native_mask(canon[None])[0]
  return masks


def correct(model: Any, result: WalkResult, example: int | None = None, *,
            threshold: float = 0.8, layers: Sequence[str] | None = None) -> Any:
  """Correction (seed 001, section 3.2): in every walked layer zero each analysed weight
  w_(i,K) whose unit i is not in G+ (non-causal units and G-); other weights are untouched.

  Args:
    model: the wrapped model the walk ran on (or linen ``variables``, the older call).
    result: a ``WalkResult`` (typically computed for the true class).
    example: use example ``example``'s own G+ (local correction); None: a global one, keeping
      the units positive in >= ``threshold`` of the examples and treating as analysed the
      output units that were in K for >= ``threshold`` of them.
    threshold: fraction for the global correction.
    layers: correct only these walked layers (default: all of them).

  Returns:
    The edited parameter tree (``model.params`` edited; the variables for the older call).

  >>> from jaxplain import wrap
  >>> from jaxplain.models import LeNet
  >>> m = wrap(LeNet(), LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  >>> r = walk(m, jnp.ones((1, 28, 28, 1)), 3, ["fc2", "fc3"])
  >>> w = correct(m, r, 0)["params"]["fc3"]["kernel"]
  >>> int((w[:, 3] != 0).sum()) == len([g for g in r.g_plus(0) if g[0] == "fc3"])
  True
  """
  from jaxplain.model import wrap  # pylint: disable=import-outside-toplevel
  from jaxplain.interventions._edit import is_model_like  # pylint: disable=import-outside-toplevel
  if is_model_like(model):
    m = wrap(model)
  else:   # the older call: linen variables (or a bare params tree), linen layout
    m = wrap((lambda p, x: None, model))
  ntarget = len(np.asarray(result.target))
  if example is not None:
    if not 0 <= example < ntarget:
      raise ValueError(f"example: index out of range [0, {ntarget}), got {example}")
    keep = {n: np.asarray(result.per_layer[n].positive)[example] for n in result.layers}
    outs = {n: np.asarray(result.per_layer[n].outputs)[example] for n in result.layers}
  else:
    keep = {n: np.asarray(result.per_layer[n].positive).mean(0) >= threshold
            for n in result.layers}
    outs = {n: np.asarray(result.per_layer[n].outputs).mean(0) >= threshold
            for n in result.layers}
  masks = _analysed_masks(m, result, keep, outs)
  if layers is not None:
    bad = [l for l in layers if l not in result.layers]
    if bad:
      raise ValueError(f"layers: {bad} were not walked; walked: {list(result.layers)}")
    masks = {m.linear(l).kernel: masks[m.linear(l).kernel] for l in layers}
  sel = select(*[re.escape(p) for p in masks])
  return set_value(m.params, sel, 0.0, where=masks)


def mediator_map(model: Any, *args: Any, relu: bool = True, size: tuple[int, ...] | None = None,
                 apply_kwargs: dict | None = None) -> jax.Array:
  """Visual explanation: the mean over the causal channels of ``layer``'s activation,
  upsampled (bilinear) to the input size. The causal channels of ``layer`` are the I+ of the
  next walked layer (the units of its input), per example.

  Called as ``mediator_map(model, x, result, layer)`` (or the older ``mediator_map(module,
  variables, x, result, layer)``).

  Args:
    model: anything :func:`jaxplain.wrap` takes.
    *args: ``x, result, layer``: the inputs the walk ran on, its ``WalkResult``, and a walked
      layer that is not the last walked layer.
    relu: apply ReLU to the layer's output before averaging.
    size: output spatial size; default the input's (images (H, W), sequences (L,)).
    apply_kwargs: extra keyword arguments of a linen ``model.apply`` (old call only).

  Returns:
    (B, H, W) heat maps for (B, h, w, C) activations; (B, L) over tokens for (B, L, C)
    activations; (B, C) over features for (B, C) activations (the activation restricted to
    the causal units, divided by their count). Zeros where an example has no causal unit.

  >>> from jaxplain import wrap
  >>> from jaxplain.models import LeNet
  >>> m = wrap(LeNet(), LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  >>> x = jnp.ones((1, 28, 28, 1))
  >>> r = walk(m, x, 3, ["conv2", "fc1", "fc2", "fc3"])
  >>> mediator_map(m, x, r, "conv2").shape
  (1, 28, 28)
  """
  m, (x, result, layer) = _model_args(model, args, 3, "mediator_map", apply_kwargs)
  if layer not in result.layers[:-1]:
    raise ValueError(f"layer: {layer!r} must be a walked layer other than the last; walked: "
                     f"{list(result.layers)}")
  nxt = result.per_layer[result.layers[result.layers.index(layer) + 1]]
  x = _check_x(x)
  _, caps = m.capture(x, [layer])
  act = caps[layer][1]
  if relu:
    act = jax.nn.relu(act)
  chans = jnp.asarray(nxt.positive, act.dtype)  # (B, C)
  if chans.shape != (act.shape[0], act.shape[-1]):
    raise ValueError(f"result: causal channels {chans.shape} do not match the activation "
                     f"{act.shape} (was the walk run on these inputs?)")
  count = jnp.maximum(chans.sum(-1), 1.0)
  if act.ndim == 2:
    return act * chans / count[:, None]
  mm = jnp.einsum("b...c,bc->b...", act, chans) / count.reshape((-1,) + (1,) * (act.ndim - 2))
  if size is None:
    spatial = act.ndim - 2
    if jnp.issubdtype(x.dtype, jnp.integer) and x.ndim == spatial + 1:
      size = x.shape[1:]
    elif x.ndim == spatial + 2:
      size = x.shape[2:] if m.channels_first else x.shape[1:-1]
    else:
      return mm
  return jax.image.resize(mm, (mm.shape[0],) + tuple(size), "bilinear")
