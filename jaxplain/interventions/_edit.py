"""Pure edits of a parameter pytree and the units of intervention (SPEC section 4).

An edit is ``params -> params``: ``set_value`` is the do-operator do(w = alpha) (alpha = 0 by
default), ``scale``, ``add_noise`` (keyed) and ``keep_only``. Which leaves are edited is a
static ``Selection``; which entries inside a leaf is an optional boolean mask (``where``), an
array, so that a sweep is a ``vmap`` over masks with a leading axis.

Units of intervention (``units``): in a dense layer a single weight w_ik or all the weights
leaving input unit i (toward a set K of outputs); in a conv layer the k x k kernel slice from
input channel i to output channel k, all the slices leaving input channel i (toward K), or a
whole filter (output channel k with its bias). Dense inputs after a flatten of conv features
(NHWC flatten: index = (h * W + w) * C + c) can be grouped by conv channel with ``channels=C``.
"""

from __future__ import annotations

import dataclasses
import functools

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _validate
from jaxplain.interventions._select import Selection, as_selection, path_str, tree_paths

KINDS = ("weight", "input", "filter")


def _map_selected(params: Any, selection: Selection | str, fn, where=None) -> Any:
  sel = as_selection(selection)
  chosen = sel.assign(params)
  where = {} if where is None else dict(where)
  unknown = [p for p in where if p not in chosen]
  if unknown:
    raise ValueError(f"where: paths {unknown} are not selected by {sel}; selected: "
                     f"{sorted(chosen)}")

  def edit(path, leaf):
    p = path_str(path)
    if p not in chosen:
      return leaf
    new = fn(p, leaf)
    if p in where:
      m = jnp.asarray(where[p])
      if m.shape != jnp.shape(leaf):
        raise ValueError(f"where[{p!r}]: mask shape {m.shape} != parameter shape "
                         f"{jnp.shape(leaf)}")
      new = jnp.where(m, new, leaf)
    return jnp.asarray(new, dtype=jnp.result_type(leaf))

  return jax.tree_util.tree_map_with_path(edit, params)


def set_value(params: Any, selection: Selection | str, value: Any = 0.0, *,
              where: dict[str, Any] | None = None) -> Any:
  """do(w = value): set the selected parameters (entries where ``where`` is True) to ``value``.

  Args:
    params: any parameter pytree.
    selection: a ``Selection`` (or a regex string) naming the edited leaves.
    value: scalar (or broadcastable array) alpha; 0 by default (the paper's alpha_n = 0).
    where: optional ``{path: bool mask shaped like the leaf}``; a selected leaf without an entry
      is set entirely.

  Returns:
    A new pytree; unselected leaves are the same objects.

  >>> p = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  >>> set_value(p, r"fc/kernel", where={"fc/kernel": np.eye(2, dtype=bool)})["fc"]["kernel"]
  Array([[0., 1.],
         [1., 0.]], dtype=float32)
  """
  _validate.check_finite(value, "value")
  return _map_selected(params, selection,
                       lambda p, w: jnp.broadcast_to(jnp.asarray(value, w.dtype), w.shape), where)


def scale(params: Any, selection: Selection | str, factor: Any, *,
          where: dict[str, Any] | None = None) -> Any:
  """Multiply the selected parameters by ``factor``.

  >>> scale({"w": jnp.ones(3)}, "w", 2.0)["w"]
  Array([2., 2., 2.], dtype=float32)
  """
  return _map_selected(params, selection, lambda p, w: w * factor, where)


def add_noise(params: Any, selection: Selection | str, key: jax.Array, *, std: Any = 0.1,
              where: dict[str, Any] | None = None) -> Any:
  """Add Gaussian noise N(0, std^2) to the selected parameters; each leaf draws from
  ``jax.random.fold_in(key, leaf number)``.

  >>> out = add_noise({"w": jnp.zeros(3)}, "w", jax.random.key(0), std=1.0)["w"]
  >>> bool(jnp.all(out != 0))
  True
  """
  order = {p: i for i, p in enumerate(tree_paths(params))}

  def noisy(p, w):
    k = jax.random.fold_in(key, order[p])
    return w + std * jax.random.normal(k, jnp.shape(w), jnp.result_type(w))

  return _map_selected(params, selection, noisy, where)


def keep_only(params: Any, selection: Selection | str,
              where: dict[str, Any] | None = None) -> Any:
  """Inside the selected leaves keep only the entries where ``where[path]`` is True and zero
  the rest (a selected leaf without a mask is zeroed entirely); other leaves are untouched.

  >>> keep_only({"w": jnp.ones(3), "b": jnp.ones(1)}, "w", {"w": np.array([1, 0, 1], bool)})["w"]
  Array([1., 0., 1.], dtype=float32)
  """
  sel = as_selection(selection)
  chosen = sel.assign(params)
  where = {} if where is None else dict(where)
  zero_where = {p: ~np.asarray(where[p], bool) if p in where else None for p in chosen}
  masks = {p: m for p, m in zero_where.items() if m is not None}
  return set_value(params, sel, 0.0, where=masks)


@dataclasses.dataclass(frozen=True, eq=False)
class Units:
  """N units of intervention of one layer.

  Attributes:
    layer: the module path of the layer (``"conv2"``, ``"stage1_block1/conv1"``).
    kind: ``"weight"`` (index (N, 2) = (i, k)), ``"input"`` (index (N,) = input unit or conv
      channel i, or flatten group c when ``channels`` is set) or ``"filter"`` (index (N,) =
      output unit / channel k, bias included when ``bias``).
    index: int array (N,) or (N, 2).
    outputs: bool (K_out,) mask of the output units K for ``"input"`` units (all by default).
    channels: flatten grouping (number of conv channels) or None.
    bias: whether ``"filter"`` units include the bias.
    kernel_path, kernel_shape, bias_path: where the layer's parameters are (``kernel_shape``
      is the canonical (..., in, out) shape).
    perm, bias_shape: the native layout (native kernel = canonical ``.transpose(perm)``,
      native bias shape); ``None`` when native = canonical.
    channels_first: flatten grouping order: ``False`` NHWC flatten (index % C = channel),
      ``True`` CHW flatten (index // (H * W) = channel, Equinox).
    masks: ``{variables path: bool array (N, *leaf shape)}``, the entries each unit sets
      (built on first use: sweep_layer and walk never need them).
  """
  layer: str
  kind: str
  index: np.ndarray
  outputs: np.ndarray | None
  channels: int | None
  bias: bool
  kernel_path: str
  kernel_shape: tuple
  bias_path: str | None
  perm: tuple | None = None
  bias_shape: tuple | None = None
  channels_first: bool = False

  def __len__(self) -> int:
    return int(self.index.shape[0])

  def mask(self, n: int) -> dict:
    """The ``where`` dict of unit ``n`` (for ``set_value`` and friends)."""
    return {p: m[n] for p, m in self.masks.items()}

  def group_rows(self, i: int, n_in: int) -> np.ndarray:
    """The input rows of flatten group (conv channel) ``i``."""
    if self.channels is None:
      return np.array([i])
    if self.channels_first:
      size = n_in // self.channels
      return np.arange(i * size, (i + 1) * size)
    return np.arange(i, n_in, self.channels)

  @functools.cached_property
  def masks(self) -> dict:
    kshape, idx, n = self.kernel_shape, self.index, len(self)
    n_in, n_out = kshape[-2], kshape[-1]
    out: dict[str, np.ndarray] = {}
    if self.kind == "weight":
      m = np.zeros((n,) + kshape, bool)
      m[np.arange(n), ..., idx[:, 0], idx[:, 1]] = True
    elif self.kind == "filter":
      m = np.zeros((n,) + kshape, bool)
      m[np.arange(n), ..., idx] = True
      if self.bias:
        b = np.eye(n_out, dtype=bool)[idx]
        out[self.bias_path] = b if self.bias_shape is None else b.reshape((n,) + self.bias_shape)
    else:
      rows = np.zeros((n, n_in), bool)
      for j, i in enumerate(idx):
        rows[j, self.group_rows(int(i), n_in)] = True
      m = rows[:, :, None] & self.outputs[None, None, :]          # (N, in, out)
      m = np.broadcast_to(m.reshape((n,) + (1,) * (len(kshape) - 2) + (n_in, n_out)),
                          (n,) + kshape)
    if self.perm is not None:
      m = np.transpose(m, (0,) + tuple(p + 1 for p in self.perm))
    out[self.kernel_path] = np.ascontiguousarray(m)
    return out


def layer_paths(variables: Any) -> list[str]:
  """Paths of the sub-trees that own a ``kernel`` leaf (the layers that can be intervened on).

  >>> layer_paths({"params": {"fc": {"kernel": 1., "bias": 0.}}})
  ['params/fc']
  """
  return [p[: -len("/kernel")] for p in tree_paths(variables) if p.endswith("/kernel")]


def resolve_layer(variables: Any, layer: str) -> tuple[str, str]:
  """Find the layer named ``layer`` (a module path such as ``conv2`` or
  ``stage1_block1/conv1``). Returns ``(variables prefix, module path)``."""
  if not isinstance(layer, str):
    raise TypeError(f"layer: expected a module path string such as 'conv1', got {layer!r}")
  owners = layer_paths(variables)
  hits = [o for o in owners if o == layer or o.endswith("/" + layer)]
  if len(hits) != 1:
    what = "no" if not hits else "more than one"
    raise ValueError(f"layer: {what} layer with a kernel matches {layer!r}; available layers: "
                     f"{owners}")
  owner = hits[0]
  mod = owner[len("params/"):] if owner.startswith("params/") else owner
  return owner, mod


def _leaf(variables: Any, path: str) -> Any:
  node = variables
  for part in path.split("/"):
    node = node[part]
  return node


def _check_index(idx: np.ndarray, size: int, what: str, layer: str) -> None:
  if idx.size and (idx.min() < 0 or idx.max() >= size):
    raise ValueError(f"index: {what} index out of range [0, {size}) for layer {layer!r}: got "
                     f"values in [{idx.min()}, {idx.max()}]")


def _resolve(obj: Any, layer: str) -> tuple[str, Any, Any, bool]:
  """``(layer name, model.Linear, params, channels_first)`` of a dense / conv layer of a
  wrapped model, a framework model, or a bare parameter tree in the linen layout
  (``{"params": {"fc": {"kernel": ...}}}`` or ``{"fc": {"kernel": ...}}``; the name may be a
  path suffix there)."""
  from jaxplain import model as model_lib  # pylint: disable=import-outside-toplevel
  if not isinstance(layer, str):
    raise TypeError(f"layer: expected a layer name string such as 'conv1', got {layer!r}")
  if is_model_like(obj):
    m = model_lib.wrap(obj)
    return layer, m.linear(layer), m.params, m.channels_first
  owner, mod = resolve_layer(obj, layer)
  paths = dict(zip(tree_paths(obj), jax.tree_util.tree_leaves(obj)))
  kpath, bpath = owner + "/kernel", owner + "/bias"
  bpath = bpath if bpath in paths else None
  nd = np.ndim(paths[kpath])
  bshape = None if bpath is None else tuple(np.shape(paths[bpath]))
  op = model_lib.dense_op if nd == 2 else None
  lin = model_lib.Linear("dense" if nd == 2 else "conv", kpath, bpath, tuple(range(nd)),
                         bshape, op)
  return mod, lin, obj, False


def is_model_like(obj: Any) -> bool:
  """A wrapped ``Model`` or a framework model that ``wrap`` takes without variables."""
  from jaxplain.model import is_wrappable  # pylint: disable=import-outside-toplevel
  return is_wrappable(obj)


def units(model: Any, layer: str, kind: str, index: Any = None, *, outputs: Any = None,
          channels: int | None = None, bias: bool = True) -> Units:
  """Build N units of intervention of one layer (masks with a leading axis for a sweep).

  The units are defined on the canonical kernel (..., in, out) whatever the framework, and
  their masks are in the framework's native layout (Equinox (out, in, kh, kw) included).

  Args:
    model: a wrapped model (:func:`jaxplain.wrap`), an NNX / Equinox / Keras model, or a
      parameter tree in the linen layout (linen variables ``{"params": ...}`` or bare params).
    layer: the layer's name (``"fc1"``, ``"conv2"``, ``"layers/0"``, a Keras layer name).
    kind: ``"weight"``: single weight w_ik / conv slice i -> k, index (N, 2) (default all
      pairs); ``"input"``: all weights leaving input unit i (toward ``outputs``), index (N,)
      (default all inputs); ``"filter"``: output unit / filter k (with its bias), index (N,).
    index: which units; see ``kind``.
    outputs: for ``"input"``: the set K of output units (ints or a bool mask); default all.
    channels: for a dense layer after a flatten of conv features with C channels: group
      the inputs by conv channel (``"input"`` units are then the C channels); the flatten
      order is NHWC (index % C) except for Equinox models (CHW: index // (H W)).
    bias: ``"filter"`` units also set the bias entry (zeroing a filter and its bias equals
      zeroing that channel's output).

  Returns:
    A ``Units`` value.

  >>> from jaxplain.models import LeNet
  >>> v = LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> u = units(v, "conv2", "filter")
  >>> len(u), u.masks["params/conv2/kernel"].shape
  (16, (16, 5, 5, 6, 16))
  """
  if kind not in KINDS:
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
  name, lin, params, cf = _resolve(model, layer)
  leaves = dict(zip(tree_paths(params), jax.tree_util.tree_leaves(params)))
  native = tuple(np.shape(leaves[lin.kernel]))
  kshape = tuple(native[i] for i in np.argsort(lin.perm))
  has_bias = lin.bias is not None
  identity = tuple(lin.perm) == tuple(range(len(native)))
  if len(kshape) < 2:
    raise ValueError(f"layer: {layer!r} has a kernel of shape {kshape}; expected a Dense (in, out)"
                     " or Conv (..., in, out) kernel")
  n_in, n_out = kshape[-2], kshape[-1]
  dense = len(kshape) == 2
  if channels is not None:
    if not dense or kind != "input":
      raise ValueError("channels: flatten grouping applies to 'input' units of a Dense layer")
    if channels <= 0 or n_in % channels:
      raise ValueError(f"channels: {n_in} inputs of layer {layer!r} cannot be grouped into "
                       f"{channels} conv channels")
  out_mask = None
  if kind == "weight":
    idx = (np.stack(np.meshgrid(np.arange(n_in), np.arange(n_out), indexing="ij"), -1)
           .reshape(-1, 2) if index is None else np.asarray(index, np.int64).reshape(-1, 2))
    _check_index(idx[:, 0], n_in, "input unit", layer)
    _check_index(idx[:, 1], n_out, "output unit", layer)
  elif kind == "filter":
    idx = np.arange(n_out) if index is None else np.asarray(index, np.int64).reshape(-1)
    _check_index(idx, n_out, "output unit", layer)
  else:
    groups = n_in if channels is None else channels
    idx = np.arange(groups) if index is None else np.asarray(index, np.int64).reshape(-1)
    _check_index(idx, groups, "input unit" if channels is None else "channel", layer)
    out_mask = _as_mask(outputs, n_out, "outputs")
  bshape = None if (not has_bias or lin.bias_shape == (n_out,)) else lin.bias_shape
  return Units(name, kind, idx, out_mask, channels, bool(bias and has_bias and kind == "filter"),
               lin.kernel, kshape, lin.bias, None if identity else tuple(lin.perm), bshape, cf)


def _as_mask(sel: Any, size: int, name: str) -> np.ndarray:
  if sel is None:
    return np.ones(size, bool)
  a = np.asarray(sel)
  if a.dtype == bool:
    if a.shape != (size,):
      raise ValueError(f"{name}: a boolean mask must have shape ({size},), got {a.shape}")
    return a
  a = a.astype(np.int64).reshape(-1)
  if a.size and (a.min() < 0 or a.max() >= size):
    raise ValueError(f"{name}: unit index out of range [0, {size}): got values in "
                     f"[{a.min()}, {a.max()}]")
  m = np.zeros(size, bool)
  m[a] = True
  return m
