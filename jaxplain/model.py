"""One model interface for every layer-level method: ``wrap`` (framework adapters live here).

``wrap(obj, variables=None)`` turns a Flax linen module (+ variables), a Flax NNX module, an
Equinox module, a Keras 3 model (JAX backend) or an ``(apply_fn, params)`` pair into a
``Model``: a pure ``apply(params, x) -> logits``, the parameter pytree ``params``, and hooks
that read, perturb or replace the output of a layer named by the framework's own name:

==========  =====================================================  ==========================
framework   layer name                                             parameter layout (native)
==========  =====================================================  ==========================
linen       module path ``"block/conv"``                           Dense (in, out), Conv
                                                                   (kh, kw, in, out)
NNX         attribute path, list indices as numbers ``"blocks/0"``  as linen (``.../value``)
Equinox     pytree path ``"layers/0"``                             Linear (out, in), Conv2d
                                                                   (out, in, kh, kw)
Keras 3     layer name ``"mixed10"``                               as linen
==========  =====================================================  ==========================

Conventions every method relies on (so that no method branches on the framework):

- **Intermediates are batched and channels-last**: a captured layer output is (B, ..., C)
  (Equinox modules run per example under ``jax.vmap`` and produce (C, H, W): the adapter moves
  the channel axis last when it reads and back when it writes).
- **Linear layers** (dense and convolution) are described by a ``Linear``: where the kernel
  and bias live in ``params``, the permutation between the canonical (..., in, out) kernel and
  the native one, and the layer's op in canonical layout (used by ``sweep_layer`` / ``walk``).
  Keras layers with a fused ``activation`` report it; methods recompute the pre-activation.
- **Inference mode**: batch norm uses its running statistics in every framework (linen: pass
  ``apply_kwargs`` such as ``{"train": False}`` when the module needs it; NNX: ``.eval()``
  on a private copy; Equinox: ``eqx.nn.inference_mode``; Keras: ``training=False``).
- **A layer called twice** in one forward pass (a shared layer): hooking it raises
  ``ValueError``; one call of a layer is one intermediate. Give the two uses distinct
  submodules (the policy of every method in the library).
- ``layer_names(x)`` lists the hookable layers in execution order (probed with
  ``jax.eval_shape``, so nothing is computed). ``layer_names()`` without ``x`` works only
  where the framework's listing is the execution order (Keras); linen and NNX (sorted by
  name) and Equinox (declaration order) need ``x``.

To add a framework, write one adapter class below (``apply``, ``run``, ``linear``,
``trainable_paths``, ``names``) and one branch in ``wrap``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import sys
import types
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxplain import _pack, _validate
from jaxplain.interventions._select import path_str

Array = jax.Array
HookFn = Callable[[Any, Any, Any], tuple[Any, Any]]


class Linear(NamedTuple):
  """A dense or convolution layer as the intervention methods see it.

  Attributes:
    kind: ``"dense"`` or ``"conv"``.
    kernel: ``/``-joined path of the kernel leaf in ``Model.params``.
    bias: path of the bias leaf, or ``None``.
    perm: native kernel = canonical kernel ``.transpose(perm)``; canonical is (..., in, out).
    bias_shape: the native bias shape (Equinox conv: (out, 1, 1)).
    op: ``op(h, kernel, bias) -> z`` in canonical layout, ``h`` channels-last (bias may be
      ``None``); the layer without its activation.
    activation: a fused activation applied after ``op`` (Keras ``activation=``), or ``None``.
  """
  kind: str
  kernel: str
  bias: str | None
  perm: tuple[int, ...]
  bias_shape: tuple[int, ...] | None
  op: Callable[..., Array]
  activation: Callable[[Array], Array] | None = None

  def canonical(self, w: Array) -> Array:
    """Native kernel -> canonical (..., in, out)."""
    return jnp.transpose(w, np.argsort(self.perm))

  def native_mask(self, m: np.ndarray) -> np.ndarray:
    """Canonical (N, ..., in, out) masks -> native (N, *native shape)."""
    return np.transpose(m, (0,) + tuple(p + 1 for p in self.perm))


# -- helpers shared by the adapters ----------------------------------------------------------


def _leaves(params: Any) -> dict[str, Any]:
  return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _unknown(layer: Any, names: Sequence[str]) -> ValueError:
  return ValueError(f"layer: unknown layer name {layer!r}; available layers: "
                    + ", ".join(repr(n) for n in names))


def _twice(name: str) -> ValueError:
  return ValueError(f"layer: {name!r} is called more than once in one forward pass; a hooked "
                    "layer must be applied once (give each use its own submodule; a layer "
                    "inside a lifted transform such as nn.scan, whose body is traced more "
                    "than once, cannot be hooked)")


def _stacked(layer: str, kpath: str, shape: tuple, what: str) -> ValueError:
  """The error for a layer whose kernel is a stack of layers' kernels."""
  return ValueError(f"layer: {layer!r} holds a stack of kernels {tuple(shape)} {what}; "
                    f"sweep_layer / walk / units edit one layer. Edit the stack with a mask "
                    f"over its leaf: sweep(m, x, {{{kpath!r}: mask (N, "
                    f"{', '.join(map(str, shape))})}})")


def _lax_padding(padding: Any, nd: int) -> Any:
  if isinstance(padding, str):
    p = padding.upper()
    if p not in ("SAME", "VALID"):
      raise ValueError(f"layer: padding {padding!r} is not supported by sweep_layer/walk; use "
                       "sweep (the general path)")
    return p
  if isinstance(padding, int):
    return [(padding, padding)] * nd
  out = []
  for q in padding:
    out.append((q, q) if isinstance(q, int) else tuple(int(v) for v in q))
  return out


def _bcast(b: Array, ndim: int) -> Array:
  return jnp.reshape(b, (1,) * (ndim - 1) + (-1,))


def _tuple(v: Any, nd: int) -> tuple[int, ...]:
  return (int(v),) * nd if isinstance(v, int) else tuple(int(a) for a in v)


def conv_op(nd: int, strides: Any = 1, padding: Any = "VALID", dilation: Any = 1,
            groups: int = 1, input_dilation: Any = 1) -> Callable[..., Array]:
  """A channels-last convolution ``op(h, kernel (..., in, out), bias)`` (private helper)."""
  spatial = "DHW"[-nd:] if nd <= 3 else None
  if spatial is None:
    raise ValueError(f"layer: {nd}-D convolutions are not supported")
  dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
  strides, dilation = _tuple(strides, nd), _tuple(dilation, nd)
  lhs_dil = _tuple(input_dilation, nd)
  pad = _lax_padding(padding, nd)

  def op(h, w, b=None):
    # A restricted kernel (one input channel of a grouped conv) runs ungrouped.
    g = groups if w.shape[-2] * groups == h.shape[-1] else 1
    z = jax.lax.conv_general_dilated(h, w.astype(h.dtype), strides, pad, lhs_dilation=lhs_dil,
                                     rhs_dilation=dilation, dimension_numbers=dn,
                                     feature_group_count=g)
    return z if b is None else z + _bcast(b.astype(z.dtype), z.ndim)
  return op


def dense_op(h, w, b=None):
  """``h @ w (+ b)`` over the last axis (private helper)."""
  z = jnp.tensordot(h, w.astype(h.dtype), axes=((-1,), (0,)))
  return z if b is None else z + _bcast(b.astype(z.dtype), z.ndim)


def _select_output(out: Any, output: Any) -> Any:
  if output is not None:
    return output(out) if callable(output) else out[output]
  if isinstance(out, (tuple, list)):
    raise ValueError(f"output: the model returns a {type(out).__name__} of "
                     f"{len(out)} values; pass wrap(..., output=0) (an index or a function) "
                     "to select the logits")
  return out


# -- adapters --------------------------------------------------------------------------------


_LINEN_AUX = "jaxplain_hooks"  # the variable collection linen hooks hand their values out in


class _Linen:
  framework = "linen"
  channels_first = False
  static_order, listing = False, "parameter-tree (sorted)"

  def __init__(self, module, variables, apply_kwargs, output):
    if variables is None:
      raise ValueError("variables: a flax.linen module needs its variables: "
                       "wrap(module, variables)")
    self.module, self.kw, self.output = module, dict(apply_kwargs or {}), output
    self.variables = variables
    self.mods: dict[str, Any] = {}

  def apply(self, params, x):
    return _select_output(self._apply_checked(params, x, **self.kw), self.output)

  def _apply_checked(self, params, x, **kw):
    import flax.errors  # pylint: disable=import-outside-toplevel
    try:
      return self.module.apply(params, x, **kw)
    except (flax.errors.InvalidRngError, flax.errors.ModifyScopeVariableError) as err:
      raise ValueError(f"{err}\n\njaxplain.wrap runs the module as given: it is in training "
                      f"mode here (dropout / batch-norm statistics). Pass its inference flag, "
                      f"e.g. wrap(module, variables, apply_kwargs={self._flag_hint()})") from err

  def _flag_hint(self) -> str:
    import inspect  # pylint: disable=import-outside-toplevel
    try:
      sig = inspect.signature(type(self.module).__call__)
    except (TypeError, ValueError):  # pragma: no cover
      sig = None
    for p in (sig.parameters.values() if sig else ()):
      if isinstance(p.default, bool) and p.name not in self.kw:
        return "{" + repr(p.name) + ": " + repr(not p.default) + "}"
    return "{'train': False}"

  def run(self, params, x, hooks, extra):
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    seen, order = set(), []

    def interceptor(next_fun, args, kwargs, ctx):
      if ctx.method_name != "__call__":
        return next_fun(*args, **kwargs)
      name = "/".join(str(p) for p in ctx.module.path)
      if name and name not in order:
        order.append(name)
      out = next_fun(*args, **kwargs)
      if name in hooks:
        if name in seen:
          raise _twice(name)
        seen.add(name)
        self.mods[name] = ctx.module.clone(parent=None)
        out, aux = hooks[name](args[0] if args else None, out, extra.get(name))
        # out of the module through its variables: a layer inside a lifted transform
        # (nn.remat, nn.jit) hands its values back through them, where a Python side
        # effect would leak that transform's tracers
        ctx.module.sow(_LINEN_AUX, "aux", aux, init_fn=lambda: None,
                       reduce_fn=lambda _, v: v)
      return out

    from flax import traverse_util  # pylint: disable=import-outside-toplevel
    kw = dict(self.kw)
    user = kw.pop("mutable", False)  # apply_kwargs may ask for mutable collections too
    mutable = True if user is True else (
        ([user] if isinstance(user, str) else list(user or [])) + [_LINEN_AUX])
    with nn.intercept_methods(interceptor):
      out, state = self._apply_checked(params, x, mutable=mutable, **kw)
    state = dict(state)
    found = traverse_util.flatten_dict(dict(state.pop(_LINEN_AUX, {})), sep="/")
    aux = {name[: -len("/aux")]: v for name, v in found.items()}
    return _select_output(out if user is False else (out, state), self.output), aux, order

  def names(self):
    return None  # linen submodules exist only while the model runs: probe

  def _owners(self, params):
    return [p[: -len("/kernel")] for p in _leaves(params) if p.endswith("/kernel")]

  def linear(self, layer):
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    paths = _leaves(self.variables)
    kpath = f"params/{layer}/kernel"
    if kpath not in paths:
      raise ValueError(f"layer: no layer with a kernel matches {layer!r}; available layers: "
                       f"{[o[len('params/'):] for o in self._owners(self.variables)]}")
    bpath = f"params/{layer}/bias" if f"params/{layer}/bias" in paths else None
    nd = np.ndim(paths[kpath])
    perm = tuple(range(nd))
    bshape = None if bpath is None else tuple(np.shape(paths[bpath]))
    if bshape is not None and len(bshape) > 1:  # one bias per layer of a stack (nn.scan)
      raise _stacked(layer, kpath, np.shape(paths[kpath]),
                     f"with biases {bshape} (a layer run by nn.scan / nn.vmap?), not one kernel")
    if nd == 2:
      return Linear("dense", kpath, bpath, perm, bshape, dense_op)
    mods = self.mods

    def op(h, w, b=None):
      mod = mods.get(layer)
      if mod is None:
        raise RuntimeError(f"layer: {layer!r} must be captured before its op is used")
      if not isinstance(mod, nn.Conv):
        raise TypeError(f"layer: sweep_layer needs a Dense or Conv layer, got "
                        f"{type(mod).__name__}; use sweep (the general path)")
      groups = mod.feature_group_count
      m = mod.clone(features=w.shape[-1], use_bias=b is not None,
                    feature_group_count=groups if w.shape[-2] * groups == h.shape[-1] else 1)
      p = {"kernel": w} if b is None else {"kernel": w, "bias": b}
      return m.apply({"params": p}, h)
    return Linear("conv", kpath, bpath, perm, bshape, op)

  def trainable_paths(self, params):
    return [p for p in _leaves(params) if p.startswith("params/")]

  def param_prefix(self, layer):
    return f"params/{layer}/"


def _nnx_get(node, part):
  return node[int(part)] if part.isdigit() else getattr(node, part)


# the hook of a named submodule call (module, its name, the call, args, kwargs) while an NNX
# adapter runs its private copy
_NNX_CALLS = contextvars.ContextVar("jaxplain_nnx_calls", default=None)
_NNX_SUBCLASSES: dict = {}
_NNX_AUX = "_jaxplain_hook_aux"  # the Variable attribute a hook hands its value out in
_NNX_SEL, _NNX_EXTRA = "_jaxplain_hook_sel", "_jaxplain_hook_extra"  # "stack[i]" hooks


def _stack_index(name: str) -> tuple[str, int | None]:
  """``"blocks[2]"`` -> ``("blocks", 2)``; other names -> ``(name, None)``."""
  if name.endswith("]") and "[" in name:
    base, _, idx = name[:-1].rpartition("[")
    if idx.isdigit():
      return base, int(idx)
  return name, None


def _nnx_hookable(cls: type) -> type:
  """A subclass of the NNX module class ``cls`` whose ``__call__`` goes through the hook in
  ``_NNX_CALLS`` when the instance carries a ``_jaxplain_path`` (one subclass per class,
  cached).

  The adapter gives its private merged copy's submodules this class instead of replacing
  them with proxy objects, so a submodule passed as a value (``nnx.scan(body)(x,
  self.blocks)``, ``nnx.remat``) is still the NNX graph node that lifted transforms expect;
  the copies those transforms make keep the class and the (static) path, so they are hooked
  too.
  """
  sub = _NNX_SUBCLASSES.get(cls)
  if sub is None:
    def __call__(self, *args, **kwargs):
      hook = _NNX_CALLS.get()
      call = lambda *a, **k: cls.__call__(self, *a, **k)  # noqa: E731
      path = getattr(self, "_jaxplain_path", None)
      if hook is None or path is None:
        return call(*args, **kwargs)
      return hook(self, path, call, *args, **kwargs)
    sub = types.new_class(cls.__name__, (cls,), exec_body=lambda ns: ns.update(
        __call__=__call__, __module__=cls.__module__, __qualname__=cls.__qualname__))
    _NNX_SUBCLASSES[cls] = sub
  return sub


@functools.cache
def _nnx_aux_variable() -> type:
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class HookAux(nnx.Variable):
    """A jaxplain hook's value, handed out of the module run."""
  return HookAux


class _NNX:
  framework = "nnx"
  channels_first = False
  static_order, listing = False, "attribute (alphabetical)"

  def __init__(self, module, apply_kwargs, output):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, state)
    copy.eval()
    self.graphdef, self.state = nnx.split(copy)
    self.kw, self.output = dict(apply_kwargs or {}), output
    self.copy = copy
    params = nnx.split(copy, nnx.Param, ...)[1]
    self.param_paths = set(_leaves(params))
    self._names = ["/".join(str(p) for p in path)
                   for path, mod in nnx.iter_modules(copy) if path and callable(mod)]

  def apply(self, params, x):
    return self.run(params, x, {}, {})[0]

  def run(self, params, x, hooks, extra):
    """Run a fresh merged copy; every submodule call records its name in ``order``, runs
    under ``jax.named_scope`` (so jaxprs carry the attribute path, as linen's module path:
    ``"CNN/conv1"``, ``"Net/blocks/0/fc"``) and goes through ``hooks``."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    # Fresh containers: a Variable made outside the current trace makes NNX's lifted
    # transforms (nnx.scan, nnx.vmap inside the model) raise "different trace level".
    m = nnx.merge(self.graphdef, jax.tree_util.tree_map(lambda a: a, params))
    shapes, order, active = {}, [], []
    mods = {"/".join(str(p) for p in path): mod for path, mod in nnx.iter_modules(m)}
    # "blocks[i]": call i of a stack that nnx.scan / nnx.vmap map over (module state on
    # axis 0); its selector and extra ride in the module's state, so each call sees its own
    stacked = {}
    for key in hooks:
      base, i = _stack_index(key)
      if i is not None:
        if base in stacked or base in hooks:
          other = stacked[base][0] if base in stacked else base
          raise ValueError(f"layer: one hook per layer stack and run; got {other!r} and "
                           f"{key!r} (run them one at a time)")
        stacked[base] = (key, i, self._stack(mods, base, i, extra.get(key)))

    def scoped(name, call, *args, **kwargs):
      outer = next((a for a in reversed(active) if name.startswith(a + "/")), None)
      active.append(name)
      try:
        with jax.named_scope(name if outer is None else name[len(outer) + 1:]):
          return call(*args, **kwargs)
      finally:
        active.pop()

    def hook(mod, name, call, *args, **kwargs):
      if name not in order:
        order.append(name)
      out = scoped(name, call, *args, **kwargs)
      key = name if name in hooks else stacked.get(name, (None,))[0]
      if key is not None:
        if key in shapes:
          raise _twice(key)
        if name in stacked:
          sel = getattr(mod, _NNX_SEL).get_value()
          if jnp.ndim(sel) != 0:
            raise ValueError(f"layer: {key!r} indexes a stack, but {name!r} is called whole "
                             "(not by nnx.scan / nnx.vmap over its axis 0): hook "
                             f"{name!r} without an index")
          ext = getattr(mod, _NNX_EXTRA, None)
          new, aux = hooks[key](args[0] if args else None, out,
                                None if ext is None else ext.get_value())
          out = jax.tree_util.tree_map(lambda a, b: jnp.where(sel, a, b), new, out)
        else:
          out, aux = hooks[key](args[0] if args else None, out, extra.get(key))
        shapes[key] = jax.tree_util.tree_map(jnp.shape, aux)
        # out through a Variable: a copy made by a lifted transform (nnx.remat) hands it
        # back to the original module, where a Python side effect would leak the
        # transform's tracers
        setattr(mod, _NNX_AUX, _nnx_aux_variable()(aux))
      return out

    for name in self._names:
      mod = mods[name]
      object.__setattr__(mod, "__class__", _nnx_hookable(type(mod)))
      # a static attribute, so the copies that nnx.remat / nnx.scan make keep their name
      object.__setattr__(mod, "_jaxplain_path", name)
    token = _NNX_CALLS.set(hook)
    try:
      with jax.named_scope(type(self.copy).__name__):
        out = m(x, **self.kw)
    finally:
      _NNX_CALLS.reset(token)
    aux = {}
    for key, shape in shapes.items():
      base, i = _stack_index(key)
      var = getattr(mods[base], _NNX_AUX, None)
      value = None if var is None else var.get_value()
      if var is not None and i is not None:
        value = jax.tree_util.tree_map(lambda a, i=i: a[i], value)
      if var is None or jax.tree_util.tree_map(jnp.shape, value) != shape:
        raise ValueError(f"layer: {key!r} runs inside a transform that maps it over an axis "
                         "(nnx.scan / nnx.vmap over a stack of layers): its values come back "
                         f"stacked; hook one call of it by its index, e.g. '{base}[0]'")
      aux[key] = value
    return _select_output(out, self.output), aux, order

  def _stack(self, mods, base, i, extra):
    """Put the selector of call ``i`` (and ``extra``, copied for every call) into the state
    of the stacked module ``base``, which the transform slices along axis 0."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    if base not in mods or base not in self._names:
      raise _unknown(f"{base}[{i}]", self._names)
    leads = {np.shape(a)[0] if np.ndim(a) else 0
             for a in jax.tree_util.tree_leaves(nnx.state(mods[base], nnx.Param))}
    n = int(leads.pop()) if len(leads) == 1 else 0  # a stack: one leading size for all
    if not 0 <= i < n:
      raise ValueError(f"layer: index {i} of {base!r} is out of range: its parameters stack "
                       f"{n} layers on axis 0" if n else
                       f"layer: {base!r} holds no stacked parameters to index")
    var = _nnx_aux_variable()
    setattr(mods[base], _NNX_SEL, var(jnp.arange(n) == i))
    if extra is not None:
      setattr(mods[base], _NNX_EXTRA, var(jnp.broadcast_to(extra[None], (n,) + extra.shape)))

  def names(self):
    return list(self._names)

  def linear(self, layer):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    if layer not in self._names:
      raise _unknown(layer, self._names)
    mod = self.copy
    for p in layer.split("/"):
      mod = _nnx_get(mod, p)
    paths = _leaves(self.state)
    kpath, bpath = f"{layer}/kernel/value", f"{layer}/bias/value"
    bpath = bpath if bpath in paths else None
    if kpath not in paths:
      raise ValueError(f"layer: {layer!r} ({type(mod).__name__}) has no kernel; layers with "
                       f"one: {[n for n in self._names if f'{n}/kernel/value' in paths]}")
    nd = np.ndim(paths[kpath])
    bshape = None if bpath is None else tuple(np.shape(paths[bpath]))
    want = (2 if isinstance(mod, nnx.Linear) else len(mod.kernel_size) + 2
            if isinstance(mod, nnx.Conv) else nd)
    if nd != want:
      raise _stacked(layer, kpath, np.shape(paths[kpath]),
                     f"(a {type(mod).__name__} made by nnx.vmap, run by nnx.scan?), not one "
                     f"{want}-d kernel")
    if isinstance(mod, nnx.Linear):
      return Linear("dense", kpath, bpath, (0, 1), bshape, dense_op)
    if isinstance(mod, nnx.Conv):
      op = conv_op(nd - 2, mod.strides or 1, mod.padding, mod.kernel_dilation or 1,
                   mod.feature_group_count, mod.input_dilation or 1)
      return Linear("conv", kpath, bpath, tuple(range(nd)), bshape, op)
    raise TypeError(f"layer: {layer!r} is a {type(mod).__name__}; sweep_layer/walk/units need "
                    "an nnx.Linear or nnx.Conv")

  def trainable_paths(self, params):
    return [p for p in _leaves(params) if p in self.param_paths]

  def param_prefix(self, layer):
    return f"{layer}/"


def _eqx_get(node, key):
  if isinstance(key, jax.tree_util.GetAttrKey):
    return getattr(node, key.name)
  if isinstance(key, jax.tree_util.SequenceKey):
    return node[key.idx]
  return node[key.key]


class _EqxHook:
  """Placeholder type (defined lazily as an equinox Module)."""


def _eqx_hook_cls():
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  global _EqxHook  # pylint: disable=global-statement
  if isinstance(_EqxHook, type) and issubclass(_EqxHook, eqx.Module):
    return _EqxHook

  class Hook(eqx.Module):
    inner: Any
    name: str = eqx.field(static=True)
    callback: Callable = eqx.field(static=True)

    def __call__(self, *args, **kwargs):
      return self.callback(self.name, self.inner, args, kwargs)

  _EqxHook = Hook
  return Hook


class _Equinox:
  framework = "equinox"
  channels_first = True
  static_order, listing = False, "field-declaration"

  def __init__(self, module, output):
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    module = eqx.nn.inference_mode(module)
    self.params, self.static = eqx.partition(module, eqx.is_array)
    self.module, self.output = module, output
    self._keys: dict[str, tuple] = {}

    def visit(node, keys):
      kids = jax.tree_util.tree_flatten_with_path(
          node, is_leaf=lambda n: n is not node and isinstance(n, eqx.Module))[0]
      for kp, child in kids:
        if isinstance(child, eqx.Module):
          full = keys + tuple(kp)
          self._keys[path_str(full)] = full
          visit(child, full)
    visit(module, ())

  def _get(self, tree, name):
    node = tree
    for k in self._keys[name]:
      node = _eqx_get(node, k)
    return node

  def apply(self, params, x):
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    return _select_output(jax.vmap(eqx.combine(params, self.static))(x), self.output)

  def _conv_like(self, mod):
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    return isinstance(mod, (eqx.nn.Conv, eqx.nn.ConvTranspose, eqx.nn.Pool))

  def run(self, params, x, hooks, extra):
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    hook_cls = _eqx_hook_cls()
    order: list[str] = []
    conv_like = {n: self._conv_like(self._get(self.module, n)) for n in self._keys}

    def moved(a, name):
      return isinstance(a, jax.Array) and a.ndim >= 2 and (conv_like[name] or a.ndim >= 3)

    def per_example(p, xb, ex):
      model = eqx.combine(p, self.static)
      aux = {}

      def callback(name, inner, args, kwargs):
        if name not in order:
          order.append(name)
        out = inner(*args, **kwargs)
        if name in hooks:
          if name in aux:
            raise _twice(name)
          inp = args[0] if args else None
          inp = jnp.moveaxis(inp, 0, -1) if moved(inp, name) else inp
          flip = moved(out, name)
          new, aux[name] = hooks[name](inp, jnp.moveaxis(out, 0, -1) if flip else out,
                                       ex.get(name))
          out = jnp.moveaxis(new, -1, 0) if flip else new
        return out

      # deepest first, so that a parent's hook wraps its hooked children
      for name in sorted(self._keys, key=lambda n: -len(self._keys[n])):
        model = eqx.tree_at(lambda m, n=name: self._get(m, n), model,
                            replace_fn=lambda mod, n=name: hook_cls(mod, n, callback))
      return _select_output(model(xb), self.output), aux

    logits, aux = jax.vmap(per_example, in_axes=(None, 0, 0))(params, x, extra)
    return logits, aux, order

  def names(self):
    return list(self._keys)

  def linear(self, layer):
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    if layer not in self._keys:
      raise _unknown(layer, list(self._keys))
    mod = self._get(self.module, layer)
    bpath = f"{layer}/bias" if getattr(mod, "bias", None) is not None else None
    bshape = None if bpath is None else tuple(mod.bias.shape)
    if isinstance(mod, eqx.nn.Linear):
      if mod.in_features == "scalar" or mod.out_features == "scalar":
        raise ValueError(f"layer: {layer!r} is a scalar Linear; not supported")
      return Linear("dense", f"{layer}/weight", bpath, (1, 0), bshape, dense_op)
    if isinstance(mod, eqx.nn.Conv) and not isinstance(mod, eqx.nn.ConvTranspose):
      if getattr(mod, "padding_mode", "ZEROS") != "ZEROS":
        raise ValueError(f"layer: {layer!r} uses padding_mode={mod.padding_mode!r}; use sweep")
      nd = mod.num_spatial_dims
      perm = (nd + 1, nd) + tuple(range(nd))
      op = conv_op(nd, mod.stride, mod.padding, mod.dilation, mod.groups)
      return Linear("conv", f"{layer}/weight", bpath, perm, bshape, op)
    raise TypeError(f"layer: {layer!r} is a {type(mod).__name__}; sweep_layer/walk/units need "
                    "an eqx.nn.Linear or eqx.nn.Conv")

  def trainable_paths(self, params):
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    return [p for p, v in _leaves(params).items() if eqx.is_inexact_array(v)]

  def param_prefix(self, layer):
    return f"{layer}/"


class _Keras:
  framework = "keras"

  def __init__(self, model, output):
    import keras  # pylint: disable=import-outside-toplevel
    if keras.backend.backend() != "jax":
      raise ValueError("obj: a Keras model needs the JAX backend (set KERAS_BACKEND=jax before "
                       "importing keras)")
    self.model, self.output = model, output
    self.layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    self.keys: list[tuple[Any, str, str]] = []   # (variable, layer name, variable key)
    seen = set()
    params: dict[str, dict[str, Any]] = {}
    self.trainable = set()
    for l in self.layers:
      train_ids = {id(v) for v in l.trainable_weights}
      for v in l.weights:
        if id(v) in seen:
          continue
        seen.add(id(v))
        key, i = v.name, 1
        while key in params.get(l.name, {}):
          key, i = f"{v.name}_{i}", i + 1
        params.setdefault(l.name, {})[key] = v.value
        self.keys.append((v, l.name, key))
        if id(v) in train_ids:
          self.trainable.add(f"{l.name}/{key}")
    rest = [v for v in model.variables if id(v) not in seen]
    for j, v in enumerate(rest):
      params.setdefault("_other", {})[f"{j}"] = v.value
      self.keys.append((v, "_other", f"{j}"))
    self.params = params
    self.by_name = {l.name: l for l in self.layers}
    # convolutions / pooling with data_format="channels_first" take (B, C, ...): then every
    # intermediate of rank >= 3 is read channels-last and written back (as for Equinox)
    self.channels_first = any(getattr(l, "data_format", None) == "channels_first"
                              for l in self.layers if not isinstance(l, keras.layers.Flatten))

  def apply(self, params, x):
    import keras  # pylint: disable=import-outside-toplevel
    mapping = [(v, params[l][k]) for v, l, k in self.keys]
    # Keras' own layers rely on numpy rank promotion and standard dtype promotion.
    with keras.StatelessScope(state_mapping=mapping), jax.numpy_rank_promotion("allow"), \
        jax.numpy_dtype_promotion("standard"):
      out = self.model(x, training=False)
    return _select_output(out, self.output)

  def run(self, params, x, hooks, extra):
    aux, order = {}, []
    patched = []
    try:
      for layer in self.layers:
        name, orig = layer.name, layer.call

        def call(*args, _name=name, _orig=orig, **kwargs):
          if _name not in order:
            order.append(_name)
          out = _orig(*args, **kwargs)
          if _name in hooks:
            if _name in aux:
              raise _twice(_name)
            inp = args[0] if args else None
            flip = self.channels_first and getattr(out, "ndim", 0) >= 3
            if self.channels_first and getattr(inp, "ndim", 0) >= 3:
              inp = jnp.moveaxis(inp, 1, -1)
            new, aux[_name] = hooks[_name](inp, jnp.moveaxis(out, 1, -1) if flip else out,
                                           extra.get(_name))
            out = jnp.moveaxis(new, -1, 1) if flip else new
          return out
        object.__setattr__(layer, "call", call)
        patched.append(layer)
      logits = self.apply(params, x)
    finally:
      for layer in patched:
        object.__delattr__(layer, "call")
    return logits, aux, order

  def names(self):
    return [l.name for l in self.layers]

  def linear(self, layer):
    import keras  # pylint: disable=import-outside-toplevel
    if layer not in self.by_name:
      raise _unknown(layer, self.names())
    l = self.by_name[layer]
    act = getattr(l, "activation", None)
    act = None if act in (None, keras.activations.linear) else act
    bpath = f"{layer}/bias" if getattr(l, "use_bias", False) else None
    bshape = None if bpath is None else tuple(l.bias.shape)
    if isinstance(l, keras.layers.Dense):
      return Linear("dense", f"{layer}/kernel", bpath, (0, 1), bshape, dense_op, act)
    base = getattr(keras.src.layers.convolutional.base_conv, "BaseConv", None)
    if base is not None and isinstance(l, base) and not isinstance(
        l, (keras.layers.Conv2DTranspose, keras.layers.DepthwiseConv2D,
            keras.layers.SeparableConv2D)):
      if l.data_format != "channels_last":
        raise ValueError(f"layer: {layer!r} is channels_first; sweep_layer / walk / units "
                         "need channels-last convolutions: use sweep (the general path)")
      nd = l.rank
      op = conv_op(nd, l.strides, l.padding, l.dilation_rate, l.groups)
      return Linear("conv", f"{layer}/kernel", bpath, tuple(range(nd + 2)), bshape, op, act)
    raise TypeError(f"layer: {layer!r} is a {type(l).__name__}; sweep_layer/walk/units need a "
                    "keras Dense or ConvND layer")

  def trainable_paths(self, params):
    return [p for p in _leaves(params) if p in self.trainable]

  def param_prefix(self, layer):
    return f"{layer}/"


class _Split:
  """``(features, head)``: two functions with ``head(features(x))`` the logits; one layer."""
  framework = "split"
  channels_first = False
  default_layer = "features"

  def __init__(self, features, head):
    self.features, self.head = features, head

  def apply(self, params, x):
    del params
    return self.head(self.features(x))

  def run(self, params, x, hooks, extra):
    del params
    unknown = [h for h in hooks if h != "features"]
    if unknown:
      raise _unknown(unknown[0], ["features"])
    a = self.features(x)
    aux = {}
    if "features" in hooks:
      a, aux["features"] = hooks["features"](x, a, extra.get("features"))
    return self.head(a), aux, ["features"]

  def names(self):
    return ["features"]

  def linear(self, layer):
    raise TypeError("model: a (features, head) pair has no parameter layout; use "
                    "wrap(apply_fn, params) with sweep / first_order")

  def trainable_paths(self, params):
    return []

  def param_prefix(self, layer):
    return f"{layer}/"


class _Function:
  """``(apply_fn, params)``: a pure function; no named layers."""
  framework = "function"
  channels_first = False

  def __init__(self, apply_fn, output):
    self.fn, self.output = apply_fn, output

  def apply(self, params, x):
    return _select_output(self.fn(params, x), self.output)

  def run(self, params, x, hooks, extra):
    raise ValueError("model: an (apply_fn, params) pair has no named layers; wrap a Flax, "
                     "Equinox or Keras model to hook layer outputs")

  def names(self):
    return []

  def linear(self, layer):
    paths = _leaves(self._params)
    owners = [p[: -len("/kernel")] for p in paths if p.endswith("/kernel")]
    hits = [o for o in owners if o == layer or o.endswith("/" + layer)]
    if len(hits) != 1:
      what = "no" if not hits else "more than one"
      raise ValueError(f"layer: {what} layer with a kernel matches {layer!r}; available "
                       f"layers: {owners}")
    owner = hits[0]
    kpath, bpath = owner + "/kernel", owner + "/bias"
    bpath = bpath if bpath in paths else None
    nd = np.ndim(paths[kpath])
    bshape = None if bpath is None else tuple(np.shape(paths[bpath]))
    op = dense_op if nd == 2 else conv_op(nd - 2, 1, "SAME")
    return Linear("dense" if nd == 2 else "conv", kpath, bpath, tuple(range(nd)), bshape, op)

  def trainable_paths(self, params):
    return list(_leaves(params))

  def param_prefix(self, layer):
    return f"{layer}/"


# -- the model value -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A wrapped model: ``apply(params, x) -> logits`` (B, K), ``params``, and layer hooks.

  Build it with :func:`wrap`. ``model(x)`` is ``model.apply(model.params, x)``. Every hook
  method takes ``params=`` (default ``self.params``), so an edited or stacked parameter tree
  runs through the same hooks (under ``jax.vmap`` too).
  """
  apply: Callable[[Any, Array], Array]
  params: Any
  adapter: Any = dataclasses.field(repr=False)

  def __repr__(self) -> str:
    # the dataclass repr printed every weight: JAX formats a callable's repr when it traces
    # it (its debug info), so an eager call on a DenseNet spent ~0.5 s printing parameters,
    # and an error naming the model ran to megabytes
    leaves = [l for l in jax.tree_util.tree_leaves(self.params) if hasattr(l, "shape")]
    n = sum(int(np.prod(l.shape, dtype=np.int64)) for l in leaves)
    dtypes = sorted({str(l.dtype) for l in leaves})
    return (f"Model(framework={self.framework!r}, params=<{n:,} values in {len(leaves)} "
            f"arrays, {'/'.join(dtypes) or 'none'}>)")

  @property
  def framework(self) -> str:
    """``"linen"``, ``"nnx"``, ``"equinox"``, ``"keras"``, ``"split"`` or ``"function"``."""
    return self.adapter.framework

  @property
  def default_layer(self) -> str | None:
    """The layer a method uses when none is named: ``"features"`` for a ``(features, head)``
    pair (its only layer), else ``None`` (a layer must be named)."""
    return getattr(self.adapter, "default_layer", None)

  @property
  def channels_first(self) -> bool:
    """Whether the model's *inputs* are channels-first (Equinox); intermediates never are."""
    return self.adapter.channels_first

  def __call__(self, x: Array) -> Array:
    return self.apply(self.params, x)

  def with_params(self, params: Any) -> "Model":
    """The same model with another parameter tree (same structure)."""
    return dataclasses.replace(self, params=params)

  def run(self, x: Array, hooks: Mapping[str, HookFn], extra: Mapping[str, Any] | None = None,
          *, params: Any = None) -> tuple[Array, dict[str, Any]]:
    """Run with ``hooks[name](input, output, extra[name]) -> (new output, aux)`` on the named
    layers (batched, channels-last; per example for Equinox, so hooks must not mix examples
    and ``extra`` leaves carry a leading batch axis). Returns ``(logits, {name: aux})``.
    NNX: ``"blocks[i]"`` names call ``i`` of a layer stack that ``nnx.scan`` / ``nnx.vmap``
    map over (the hook runs in every call and its output is kept in call ``i`` only)."""
    params = self.params if params is None else params
    extra = dict(extra or {})
    hooks = dict(hooks)
    logits, aux, order = self.adapter.run(params, x, hooks, extra)
    missing = [h for h in hooks if h not in aux]
    if missing and missing[0] in (self.adapter.names() or []):
      raise ValueError(f"layer: {missing[0]!r} is not called as a layer of this forward pass "
                       "(unused, or run inside a transform that re-creates it without the "
                       "module, e.g. jax.vmap of a pure function); layers called: "
                       + ", ".join(repr(n) for n in order))
    if missing:
      raise _unknown(missing[0], order or self.adapter.names() or [])
    return logits, aux

  def capture(self, x: Array, layers: Sequence[str] | str, *,
              params: Any = None) -> tuple[Array, dict[str, tuple[Array, Array]]]:
    """Logits and ``{layer: (input, output)}`` of the named layers (channels-last).

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> net = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(3)])
    >>> m = wrap(net, net.init(jax.random.key(0), jnp.ones((1, 2))))
    >>> logits, caps = m.capture(jnp.ones((5, 2)), ["layers_0"])
    >>> [a.shape for a in caps["layers_0"]]
    [(5, 2), (5, 4)]
    """
    layers = [layers] if isinstance(layers, str) else list(layers)
    return self.run(x, {l: (lambda i, o, e: (o, (i, o))) for l in layers}, params=params)

  def perturb(self, x: Array, layer: str, delta: Array, *,
              params: Any = None) -> tuple[Array, Array]:
    """Logits with ``delta`` added to ``layer``'s output, and that (unperturbed) output.
    ``d logits / d delta = d logits / d output`` (the mechanism of Grad-CAM)."""
    logits, aux = self.run(x, {layer: lambda i, o, e: (o + e, o)}, {layer: delta},
                           params=params)
    return logits, aux[layer]

  def replace(self, x: Array, layer: str, value: Array, *, params: Any = None) -> Array:
    """Logits with ``layer``'s output replaced by ``value`` (B, ..., C) (channels-last).
    Under ``jax.jit`` the layers before ``layer`` that nothing else needs are dead code."""
    logits, _ = self.run(x, {layer: lambda i, o, e: (e, None)}, {layer: value}, params=params)
    return logits

  def layer_names(self, x: Array | None = None) -> tuple[str, ...]:
    """Layer names in execution order, probed on an input batch ``x`` with
    ``jax.eval_shape`` (nothing is computed).

    Without ``x``, only where the framework's own listing is the execution order: Keras
    (``model.layers``, graph order) and a ``(features, head)`` pair. Flax linen variables and
    Flax NNX attributes are sorted by name and Equinox fields are in declaration order, none
    of which is the order of the forward pass: there ``x`` is required (``ValueError``
    otherwise, showing the call).
    """
    if x is None:
      if not getattr(self.adapter, "static_order", True):
        raise ValueError(f"x: a {self.framework} model knows its layers only in "
                         f"{self.adapter.listing} order, not in execution order; pass an "
                         f"input batch: model.layer_names(x)")
      names = self.adapter.names()
      if names is None:
        return tuple(p[len("params/"):] for p in self.adapter._owners(self.params))
      return tuple(names)
    order: list[str] = []

    def probe(p, z):
      _, _, o = self.adapter.run(p, z, {}, {})
      order[:] = o
      return 0
    jax.eval_shape(probe, self.params, x)
    return tuple(order)

  def linear(self, layer: str) -> Linear:
    """The ``Linear`` description of a dense / convolution layer (see module docstring)."""
    if not isinstance(layer, str):
      raise TypeError(f"layer: expected a layer name string, got {layer!r}")
    return self.adapter.linear(layer)

  def layer_params(self, layer: str, params: Any = None) -> list[str]:
    """Paths (in ``params``) of the trainable leaves owned by ``layer`` (float leaves only)."""
    params = self.params if params is None else params
    pre = self.adapter.param_prefix(layer)
    return [p for p in self.adapter.trainable_paths(params) if p.startswith(pre)]


def _is_keras(obj: Any) -> bool:
  if "keras" not in sys.modules:
    return False
  import keras  # pylint: disable=import-outside-toplevel
  return isinstance(obj, keras.Model)


def _is_eqx(obj: Any) -> bool:
  if "equinox" not in sys.modules:
    return False
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  return isinstance(obj, eqx.Module)


def wrap(obj: Any, variables: Any = None, *, apply_kwargs: dict | None = None,
         output: int | Callable | None = None) -> Model:
  """Wrap any supported model as a ``Model`` (see the module docstring).

  Args:
    obj: a ``flax.linen.Module`` (with ``variables``), a ``flax.nnx.Module``, an
      ``equinox.Module`` (called per example; ``apply`` vmaps it over the batch), a Keras 3
      ``keras.Model`` (JAX backend), a pair ``(apply_fn, params)`` with
      ``apply_fn(params, x) -> logits``, a pair ``(features, head)`` of functions, or a
      ``Model`` (returned as is).
    variables: the linen variables (``{"params": ..., "batch_stats": ...}``); else ``None``.
    apply_kwargs: keyword arguments of every model call (linen / NNX), e.g. ``{"train": False}``.
    output: when the model returns a tuple or dict, the index / key of the logits or a
      function selecting them.

  Returns:
    A ``Model``.

  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return nn.Dense(3, name="out")(nn.relu(nn.Dense(4, name="hidden")(x)))
  >>> v = Net().init(jax.random.key(0), jnp.ones((1, 2)))
  >>> m = wrap(Net(), v)
  >>> m.layer_names(jnp.ones((1, 2))), m(jnp.ones((5, 2))).shape
  (('hidden', 'out'), (5, 3))
  """
  if isinstance(obj, Model):
    if variables is not None or apply_kwargs is not None or output is not None:
      raise ValueError("variables, apply_kwargs, output: must be None when obj is already a "
                       "wrapped Model (give them to wrap)")
    return obj
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if isinstance(obj, nn.Module):
    a = _Linen(obj, variables, apply_kwargs, output)
    return Model(a.apply, variables, a)
  if variables is not None:
    raise ValueError(f"variables: only a flax.linen module takes variables; got a "
                     f"{type(obj).__name__} (wrap(obj) alone)")
  if isinstance(obj, nnx.Module):
    a = _NNX(obj, apply_kwargs, output)
    return Model(a.apply, a.state, a)
  if _is_keras(obj):
    a = _Keras(obj, output)
    return Model(a.apply, a.params, a)
  if _is_eqx(obj):
    a = _Equinox(obj, output)
    return Model(a.apply, a.params, a)
  if isinstance(obj, (tuple, list)) and len(obj) == 2 and callable(obj[0]):
    if callable(obj[1]) and not _is_eqx(obj[1]) and not isinstance(obj[1], (dict, list, tuple)):
      a = _Split(obj[0], obj[1])
      return Model(a.apply, {}, a)
    a = _Function(obj[0], output)
    a._params = obj[1]
    return Model(a.apply, obj[1], a)
  raise TypeError(f"obj: expected a flax.linen Module (with variables), a flax.nnx Module, an "
                  f"equinox Module, a keras.Model (JAX backend), an (apply_fn, params) pair or "
                  f"a (features, head) pair of functions; got {type(obj).__name__}")


def at_layer(model: Any, x: Array, layer: str, *,
             with_input: bool = False) -> tuple[Callable[..., Array], Array]:
  """The model as a function of one layer's output, and that output at ``x``: ``(f_h, h)``.

  Any attribution method then explains the layer instead of the input (Captum's
  ``LayerIntegratedGradients`` / ``LayerGradientXActivation``, for one): token ids cannot be
  differentiated, their embeddings can. ``f_h(h_rows)`` runs ``model`` with ``layer``'s output
  replaced by ``h_rows`` (channels-last, as :meth:`Model.capture` gives it), for any number
  of rows: what the model computes after ``layer`` must depend on ``x`` only through that
  output, which is checked (a padding mask read from token ids, or a skip connection around
  ``layer``, raises). For such a model ask for ``with_input=True``: ``f_h(h_rows, x_rows)``
  then runs the model on ``x_rows`` with the layer's output replaced by ``h_rows``, and
  :func:`per_example` runs any method on it with each example's own ``x`` (Captum's
  ``additional_forward_args``): ``per_example(integrated_gradients, f_h, h, t, side=x)``.

  Args:
    model: anything :func:`wrap` takes (or a wrapped ``Model``).
    x: the input batch (B, ...), any dtype (token ids included).
    layer: the layer's name (see ``Model.layer_names(x)``).
    with_input: return ``f_h(h_rows, x_rows)`` (nothing checked) instead of ``f_h(h_rows)``.

  Returns:
    ``f_h`` (rows, ...) -> logits (rows, K) and ``h`` (B, ...), the layer's output at ``x``.

  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> class Tok(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, ids):
  ...     return nn.Dense(2, name="head")(nn.Embed(5, 3, name="embed")(ids).mean(1))
  >>> ids = jnp.array([[1, 2, 0], [4, 4, 3]])
  >>> m = wrap(Tok(), Tok().init(jax.random.key(0), ids))
  >>> f_h, h = at_layer(m, ids, "embed")
  >>> h.shape, bool(jnp.allclose(f_h(h), m(ids)))
  ((2, 3, 3), True)
  """
  from jaxplain import _jaxpr  # pylint: disable=import-outside-toplevel
  m = model if isinstance(model, Model) else wrap(model)
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"x: expected a batch (B, ...), got shape {x.shape}")
  _, caps = m.capture(x, [layer])
  h = caps[layer][1]
  if with_input:
    return (lambda hr, xr: m.replace(xr, layer, hr)), h
  closed = jax.make_jaxpr(lambda xx, hh: m.replace(xx, layer, hh))(x, h)
  if _jaxpr.needed_inputs(closed.jaxpr, [True] * len(closed.jaxpr.outvars))[0]:
    raise ValueError(f"layer: the model reads x again after {layer!r} (a mask computed from "
                     "the input, or a connection around the layer), so it is not a function "
                     "of that layer's output alone; pair each example with its own x: "
                     f"f_h, h = at_layer(model, x, {layer!r}, with_input=True); "
                     "per_example(integrated_gradients, f_h, h, target, side=x)")
  row = x[:1]

  def f_h(hr: Array) -> Array:
    return m.replace(jnp.broadcast_to(row, (hr.shape[0],) + x.shape[1:]), layer, hr)
  return f_h, h


def per_example(method: Callable[..., Any], f: Callable[[Array, Any], Array], x: Any,
                target: Any, *, side: Any, key: Array | None = None, **kwargs: Any) -> Any:
  """``method`` run on each example with its own side inputs: ``f(x_rows, side_rows)``.

  An attribution method calls ``f`` on rows it builds from ``x`` (path points, noisy copies,
  perturbations), laid out its own way, so a per-example value that is not attributed (a
  padding mask, the token ids a model reads after an explained layer: Captum's
  ``additional_forward_args``) cannot be paired with the rows from outside. Here each
  example runs as a batch of one under ``jax.vmap``: all of its rows belong to it, and its
  side values are broadcast to them. The vmap batches the examples back into one
  computation, so the cost is the batched method's (SmallCNN, 16 images, jitted, medians of
  7 alternating calls: IG at 32 steps 387 vs 375 ms batched, LRP 13.2 vs 12.9 ms; same maps
  to 4e-9).

  Args:
    method: any method ``method(f, x, target, **kwargs)`` taking a function (gradient,
      integrated_gradients, smoothgrad, lrp, occlusion, kernel_shap, noise_tunnel via
      ``functools.partial``, ...).
    f: ``f(x_rows, side_rows) -> logits (rows, K)``, e.g. ``at_layer(..., with_input=True)``.
    x: ``(B, ...)`` what is attributed (a layer's output, an input).
    target: an int, ``(B,)`` ints, ``(B, T)`` or ``"all"``.
    side: a pytree of ``(B, ...)`` arrays of any dtype, passed to ``f`` unattributed.
    key: for keyed methods; example ``b`` gets ``fold_in(key, b)``.
    **kwargs: the method's; ``baseline`` / ``reference`` arrays shaped like ``x`` are split
      by example, everything else is passed as it is.

  Returns:
    The method's result for the whole batch (every output with its batch axis).

  >>> import jax, jax.numpy as jnp, jaxplain
  >>> f = lambda h, mask: (h * mask[..., None]).sum(1) @ jnp.ones((2, 3))   # (B, L, 2)
  >>> h, mask = jnp.ones((2, 4, 2)), jnp.array([[1., 1, 0, 0], [1, 1, 1, 1]])
  >>> per_example(jaxplain.gradient, f, h, 0, side=mask)[:, :, 0]
  Array([[1., 1., 0., 0.],
         [1., 1., 1., 1.]], dtype=float32)
  """
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"x: expected a batch (B, ...), got shape {x.shape}")
  b = x.shape[0]
  for leaf in jax.tree_util.tree_leaves(side):
    if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != b:
      raise ValueError(f"side: every array needs x's batch axis first (B = {b}); got shape "
                       f"{jnp.shape(leaf)}")
  _validate.check_finite(x, "x")
  row = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:1], tree)
  out = _validate.call_model(lambda: jax.eval_shape(f, row(x), row(side)),
                             lambda z: f(z, row(side)), x)
  k = _validate.check_logits(out, 1, "f(x, side)").shape[1]
  static_t = isinstance(target, str)
  if static_t:
    if target != "all":
      raise ValueError(f"target: expected an int, (B,), (B, T) ints or 'all', got {target!r}")
    t = None
  else:
    t = jnp.asarray(target)
    t = _validate.check_target(t, b, k) if t.ndim < 2 else t
    if t.ndim == 2 and t.shape[0] != b:
      raise ValueError(f"target: a (B, T) array needs B = {b} rows, got shape {t.shape}")
  split = {n: jnp.asarray(kwargs.pop(n)) for n in _pack.X_LIKE_KWARGS
           if n in kwargs and jnp.ndim(kwargs[n]) == x.ndim and jnp.shape(kwargs[n])[0] == b}
  keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(
      jnp.arange(b, dtype=jnp.uint32))

  def one(xb, sb, tb, kb, sp):
    fb = lambda rows: f(rows, jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, (rows.shape[0],) + a.shape[1:]), sb))
    kw = dict(kwargs, **sp)
    if kb is not None:
      kw["key"] = kb
    res = method(fb, xb, "all" if static_t else tb, **kw)
    return jax.tree_util.tree_map(lambda a: a[0], res)

  add = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:, None], tree)
  return jax.vmap(one)(add(x), add(side), None if t is None else add(t), keys, add(split))


def to_layer(model: Any, layer: str, *, per: str = "unit") -> Callable[[Array], Array]:
  """The model up to one layer, as a function of ``x`` whose "logits" are that layer's units:
  ``f(x) -> (B, N)``. Any method then explains a hidden unit or channel (``target`` = its
  index) instead of a class: Captum's ``NeuronGradient`` / ``NeuronIntegratedGradients``,
  Zennit's relevance of an intermediate neuron, a filter's input pattern. The layers after
  ``layer`` are dead code under ``jax.jit`` and for the rule methods.

  Args:
    model: anything :func:`wrap` takes (or a wrapped ``Model``).
    layer: the layer's name (see ``Model.layer_names(x)``).
    per: ``"unit"``: the output (B, ..., C) flattened after the batch axis, channels-last
      (the unit at position (i, j) of channel c of a conv layer is
      ``np.ravel_multi_index((i, j, c), out_shape[1:])``); ``"channel"``: summed over every
      axis but the last, (B, C) (a filter's total activation).

  Returns:
    ``f``: (B, ...) inputs -> (B, N) the layer's units.

  >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxplain
  >>> net = nn.Sequential([nn.Dense(4, use_bias=False), nn.relu, nn.Dense(2)])
  >>> x = jnp.ones((3, 2))
  >>> f = to_layer(wrap(net, net.init(jax.random.key(0), x)), "layers_0")
  >>> f(x).shape, jaxplain.gradient(f, x, 1).shape    # unit 1 of the first dense layer
  ((3, 4), (3, 2))
  """
  if per not in ("unit", "channel"):
    raise ValueError(f"per: expected 'unit' or 'channel', got {per!r}")
  m = model if isinstance(model, Model) else wrap(model)

  def f(x: Array) -> Array:
    out = m.capture(x, [layer])[1][layer][1]
    if not hasattr(out, "ndim") or out.ndim < 2:
      raise ValueError(f"layer: the output of {layer!r} is "
                       f"{getattr(out, 'shape', type(out).__name__)}; expected one (B, ...) "
                       "array of units")
    if per == "unit":
      return out.reshape(out.shape[0], -1)
    return out.sum(axis=tuple(range(1, out.ndim - 1))) if out.ndim > 2 else out
  return f


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


class _Nested:
  """A pytree <-> nested dict of its leaves (string keys): the trainer's ``variables`` are
  plain nested dicts in every framework (optax, orbax and checksums see only dicts)."""

  def __init__(self, tree, drop_last_value: bool = False):
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
    self.paths = []
    for kp, _ in flat:
      parts = [_key_str(k) for k in kp]
      if drop_last_value and parts and parts[-1] == "value":
        parts = parts[:-1]
      self.paths.append(tuple(parts))
    self.empty = not flat

  def to_dict(self, tree) -> dict:
    out: dict = {}
    for path, leaf in zip(self.paths, jax.tree_util.tree_leaves(tree)):
      node = out
      for p in path[:-1]:
        node = node.setdefault(p, {})
      node[path[-1]] = leaf
    return out

  def from_dict(self, d: Mapping) -> Any:
    leaves = []
    for path in self.paths:
      node = d
      for p in path:
        node = node[p]
      leaves.append(node)
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


class _NNXTrainee:
  """A Flax NNX module seen through linen's ``init`` / ``apply`` (what ``train.fit`` and
  ``ppi.make_ppi_loss`` call). ``variables = {"params": nnx.Param values, ["batch_stats":
  every other variable (BatchStat, ...)]}`` as nested dicts; rng streams stay with the module
  and are reseeded from the step key in training mode (``rngs={"dropout": key}``)."""
  framework = "nnx"

  def __init__(self, module):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    self.user_graphdef = nnx.split(module)[0]
    g, p, rng, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
    self.p, self.rest = _Nested(p, True), _Nested(rest, True)
    self.rng_leaves, self.rng_def = jax.tree_util.tree_flatten(rng)
    copy = nnx.merge(g, p, rng, rest)
    copy.train()
    self.g_train = nnx.split(copy, nnx.Param, nnx.RngState, ...)[0]
    copy.eval()
    self.g_eval = nnx.split(copy, nnx.Param, nnx.RngState, ...)[0]
    self.variables0 = self._variables(p, rest)
    self.name = type(module).__name__
    self.signature = [(k, tuple(np.shape(v))) for k, v in _leaves(self.variables0).items()]

  def __repr__(self):
    return f"nnx.{self.name}({self.signature})"

  def _variables(self, p, rest):
    v = {"params": self.p.to_dict(p)}
    if not self.rest.empty:
      v["batch_stats"] = self.rest.to_dict(rest)
    return v

  def _states(self, variables):
    p = self.p.from_dict(variables["params"])
    rest = self.rest.from_dict(variables.get("batch_stats", {}))
    return p, rest

  def _rng(self, key=None):
    """Fresh rng variables: the module's own, or every stream reseeded from ``key`` (key
    leaves ``fold_in(key, i)``, counts 0)."""
    leaves = []
    for i, v in enumerate(self.rng_leaves):
      if key is None:
        leaves.append(v)
      elif jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
        leaves.append(jnp.broadcast_to(jax.random.fold_in(key, i), v.shape))
      else:
        leaves.append(jnp.zeros_like(v))
    return jax.tree_util.tree_unflatten(self.rng_def, leaves)

  def module(self, variables, graphdef=None, key=None):
    """The NNX module holding ``variables`` (the user's train/eval mode by default)."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    p, rest = self._states(variables)
    return nnx.merge(self.user_graphdef if graphdef is None else graphdef, p, self._rng(key),
                     rest)

  def init(self, key, sample):
    del key, sample  # an NNX module is initialised when it is built
    return self.variables0

  def apply(self, variables, x, *, train: bool = False, mutable: Any = None, rngs=None):
    """Linen's ``apply``: training mode (``module.train()``) when ``train``, ``mutable`` or
    ``rngs`` is given, else ``module.eval()``; ``mutable`` returns ``(logits, {"batch_stats":
    ...})``."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    training = bool(train or mutable or rngs)
    key = None
    if training and rngs:
      key = rngs.get("dropout", next(iter(rngs.values())))
    m = self.module(variables, self.g_train if training else self.g_eval, key)
    out = m(x)
    if not mutable:
      return out
    _, _, _, rest = nnx.split(m, nnx.Param, nnx.RngState, ...)
    return out, ({"batch_stats": self.rest.to_dict(rest)} if not self.rest.empty else {})

  def export(self, variables):
    return self.module(variables)

  def as_model(self, variables) -> "Model":
    return wrap(self.module(variables, self.g_eval))


class _EqxTrainee:
  """A stateless Equinox module seen through linen's ``init`` / ``apply``: ``variables =
  {"params": its floating-point arrays}`` (nested dicts); it runs per example under
  ``jax.vmap`` in inference mode (``eqx.nn.inference_mode``: dropout off) in training too."""
  framework = "equinox"
  channels_first = True    # as the wrapped Equinox model: convolutions take (C, H, W)

  def __init__(self, module):
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    stateful = [type(n).__name__ for n in jax.tree_util.tree_leaves(
        module, is_leaf=lambda n: isinstance(n, (eqx.nn.BatchNorm, eqx.nn.StateIndex)))
                if isinstance(n, (eqx.nn.BatchNorm, eqx.nn.StateIndex))]
    if stateful:
      raise TypeError(f"model: train.fit trains stateless Equinox modules only; this one has "
                      f"{stateful[0]} (eqx.nn.State); train it with your own loop")
    self.user = module
    params, self.static = eqx.partition(module, eqx.is_inexact_array)
    self.p = _Nested(params)
    self.variables0 = {"params": self.p.to_dict(params)}
    self.name = type(module).__name__
    self.signature = [(k, tuple(np.shape(v))) for k, v in _leaves(self.variables0).items()]

  def __repr__(self):
    return f"equinox.{self.name}({self.signature})"

  def module(self, variables):
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    return eqx.combine(self.p.from_dict(variables["params"]), self.static)

  def init(self, key, sample):
    del key, sample
    return self.variables0

  def apply(self, variables, x, *, train: bool = False, mutable: Any = None, rngs=None):
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    del train, rngs
    out = jax.vmap(eqx.nn.inference_mode(self.module(variables)))(x)
    return (out, {}) if mutable else out

  def export(self, variables):
    return self.module(variables)

  def as_model(self, variables) -> "Model":
    return wrap(self.module(variables))


def train_parts(model: Any, what: str = "model") -> tuple[Any, Any]:
  """``(trainee, variables)`` for the entry points that train a model (``train.fit``,
  ``train.init_state``, ``train.evaluate``, ``ppi.make_ppi_loss``).

  ``trainee`` has linen's ``init(key, x)`` / ``apply(variables, x, *, train, mutable,
  rngs)``: a linen module is its own trainee (``variables`` from ``wrap(module, variables)``
  or ``None``); a Flax NNX or Equinox module (bare or wrapped) becomes one whose variables
  are nested dicts (``trainee.export(variables)`` rebuilds the module, ``trainee.as_model``
  the wrapped ``Model``). Keras and plain functions raise ``TypeError``.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if isinstance(model, (_NNXTrainee, _EqxTrainee)):
    return model, None
  if isinstance(model, Model):
    if model.framework == "linen":
      return model.adapter.module, model.params
    if model.framework == "nnx":
      t = _NNXTrainee(nnx.merge(model.adapter.graphdef, model.params))
      return t, t.variables0
    if model.framework == "equinox":
      import equinox as eqx  # pylint: disable=import-outside-toplevel
      t = _EqxTrainee(eqx.combine(model.params, model.adapter.static))
      return t, t.variables0
    raise TypeError(f"{what}: training supports Flax linen, Flax NNX and Equinox models (got "
                    f"a wrapped {model.framework} model)")
  if isinstance(model, nn.Module):
    return model, None
  if isinstance(model, nnx.Module):
    return _NNXTrainee(model), None
  if _is_eqx(model):
    return _EqxTrainee(model), None
  raise TypeError(f"{what}: training supports a flax.linen Module (or wrap(module, "
                  f"variables)), a flax.nnx Module or an equinox Module; got "
                  f"{type(model).__name__}")


def trained_model(trainee: Any, variables: Any) -> Any:
  """The trained model in its own framework: an NNX / Equinox module holding ``variables``;
  ``None`` for linen (a linen module holds no weights: use the variables)."""
  export = getattr(trainee, "export", None)
  return None if export is None else export(variables)


def as_wrapped(trainee: Any, variables: Any) -> "Model":
  """``wrap`` of a trainee with these variables (the model interface of a trained model)."""
  if hasattr(trainee, "as_model"):
    return trainee.as_model(variables)
  return wrap(trainee, variables)


def as_model(model: Any, args: tuple, n: int, what: str, sig: str = "...") -> tuple[Model, tuple]:
  """Accept ``f(model, *args)`` (n args, ``model`` anything ``wrap`` takes) and the older
  ``f(module_or_apply_fn, variables_or_params, *args)``.

  Returns ``(wrapped model, args)`` (private helper of the layer-level methods).
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  if len(args) == n + 1:
    if isinstance(model, nn.Module):
      return wrap(model, args[0]), tuple(args[1:])
    return wrap((model, args[0])), tuple(args[1:])
  if len(args) != n:
    raise TypeError(f"{what}: expected {what}(model, {sig}), got {len(args)} positional "
                    "arguments after the model")
  return wrap(model), tuple(args)


def is_wrappable(obj: Any) -> bool:
  """A wrapped ``Model`` or a framework model object (linen, NNX, Equinox, Keras), as
  opposed to a bare parameter tree (private helper of the layer-level methods)."""
  if isinstance(obj, Model):
    return True
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if isinstance(obj, nnx.Module) or _is_eqx(obj) or _is_keras(obj):
    return True
  if "flax.linen" in sys.modules:
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    return isinstance(obj, nn.Module)
  return False
