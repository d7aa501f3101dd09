"""Models with several inputs: ``x`` a tuple or dict of (B, ...) arrays.

The attribution methods work on one array. For a model ``f((image, features))`` they run
on the inputs packed into one (B, D) array, each input flattened after its batch axis and
the pieces concatenated, with ``f`` called on the unpacked pieces; the maps come back in
``x``'s structure, each shaped like its input (with a target axis (B, T, ...) where one
was asked for). Packing is slicing and reshaping, so gradients, paths and the rule
engine see the model itself: every method's result equals the one of the same model
written on one concatenated input (Captum's tuple inputs).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Packing(NamedTuple):
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]  # each input's shape after the batch axis
  dtype: Any

  @property
  def sizes(self) -> list[int]:
    return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

  def pack(self, tree: Any, name: str) -> jax.Array:
    """A tree like ``x`` (each leaf (B, ...) or (1, ...), or a scalar) -> (B | 1, D)."""
    leaves = _leaves_like(self, tree, name)
    rows = max(np.shape(l)[0] if np.ndim(l) else 1 for l in leaves)
    parts = [jnp.broadcast_to(jnp.asarray(l, self.dtype), (rows,) + s).reshape(rows, -1)
             for l, s in zip(leaves, self.shapes)]
    return jnp.concatenate(parts, axis=1)

  def pack_ids(self, tree: Any, x: Any, name: str) -> jax.Array:
    """Feature ids like ``x`` (each input's: a leading part of its shape, with or without
    the batch axis, as for one input) -> (B, D) int32. Ids are global: the same id in two
    inputs is one feature."""
    from jaxplain.perturbation import _features  # pylint: disable=import-outside-toplevel
    masks = _flatten_like(self, tree, name)
    parts = []
    for i, (m, xi) in enumerate(zip(masks, self.treedef.flatten_up_to(x))):
      try:
        parts.append(_features(jnp.asarray(xi), m, None)[0])
      except (ValueError, TypeError) as err:
        raise type(err)(f"{name}, input {i}: {err}") from err
    return jnp.concatenate(parts, axis=1)

  def unpack(self, z: jax.Array) -> Any:
    """(..., D) -> a tree like ``x`` of (..., *input shape)."""
    cuts = np.cumsum(self.sizes)[:-1].tolist()
    parts = jnp.split(z, cuts, axis=-1) if cuts else [z]
    return jax.tree_util.tree_unflatten(
        self.treedef, [p.reshape(z.shape[:-1] + s) for p, s in zip(parts, self.shapes)])


def _flatten_like(p: Packing, tree: Any, name: str) -> list:
  try:
    return p.treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as err:
    raise ValueError(f"{name}: expected the structure of x ({p.treedef}); got "
                     f"{jax.tree_util.tree_structure(tree)}") from err


def _leaves_like(p: Packing, tree: Any, name: str) -> list:
  leaves = _flatten_like(p, tree, name)
  for i, (l, s) in enumerate(zip(leaves, p.shapes)):
    shape = tuple(np.shape(l))
    if shape and (shape[len(shape) - len(s):] != s or len(shape) != len(s) + 1):
      raise ValueError(f"{name}: input {i} has shape {shape}; expected (B, *{s}) or "
                       f"(1, *{s}) as x's input {i}, or a scalar")
  return leaves


#: Method keyword arguments given like ``x`` (a tree of x's structure for several inputs),
#: for the wrappers that pass a method's keywords through (``noise_tunnel``, ``per_example``).
X_LIKE_KWARGS = ("baseline", "reference")


def is_several(x: Any) -> bool:
  """A tuple or dict of inputs. A list stays one array (``[[0., 1.], [2., 3.]]`` is a batch,
  as ``jnp.asarray`` reads it)."""
  return isinstance(x, (tuple, dict))


def packing(x: Any) -> Packing:
  leaves, treedef = jax.tree_util.tree_flatten(x)
  if not leaves:
    raise ValueError(f"x: an empty {type(x).__name__}; expected one or more (B, ...) arrays")
  leaves = [jnp.asarray(l) for l in leaves]
  if any(l.ndim < 1 for l in leaves):
    raise ValueError(f"x: every input needs a batch axis; got shapes "
                     f"{[l.shape for l in leaves]}")
  batches = {l.shape[0] for l in leaves}
  if len(batches) != 1:
    raise ValueError(f"x: the inputs have different batch sizes {[l.shape for l in leaves]}")
  dtypes = {l.dtype for l in leaves}
  if len(dtypes) != 1 or not jnp.issubdtype(leaves[0].dtype, jnp.floating):
    raise TypeError(f"x: the inputs must share one floating dtype to be attributed together; "
                    f"got {[str(l.dtype) for l in leaves]} (integer inputs such as token ids "
                    f"have no gradient: attribute an embedding with jaxplain.at_layer)")
  return Packing(treedef, tuple(l.shape[1:] for l in leaves), leaves[0].dtype)


def several_inputs(*x_like: str, strings: Sequence[str] = (), ids: Sequence[str] = (),
                   returns_map: bool = True) -> Callable:
  """Decorator of ``method(f, x, target, ...)``: a tuple or dict ``x`` runs packed
  (see the module docstring). ``x_like`` name the arguments given like ``x`` (a tree of the
  same structure; a scalar stays as it is), ``strings`` the string values of them that mean
  the same for packed inputs (``"black"``: zeros), ``ids`` the feature-id masks (one per
  input, see :meth:`Packing.pack_ids`). ``returns_map``: the result (or its first
  element) is shaped like x and is unpacked."""
  def deco(fn: Callable) -> Callable:
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(f, x, *args, **kwargs):
      if not is_several(x):
        return fn(f, x, *args, **kwargs)
      p = packing(x)
      bound = sig.bind(f, x, *args, **kwargs)
      for k in x_like:
        v = bound.arguments.get(k)
        if isinstance(v, str):
          if v not in strings:
            raise ValueError(f"{k}: {v!r} is not defined for several inputs; pass "
                             + "".join(repr(s) + ", " for s in strings)
                             + f"a scalar or a {type(x).__name__} like x")
        elif is_several(v) or (v is not None and np.ndim(v) > 0):
          bound.arguments[k] = p.pack(v, k)
      for k in ids:
        if bound.arguments.get(k) is not None:
          bound.arguments[k] = p.pack_ids(bound.arguments[k], x, k)
      bound.arguments["f"] = lambda z: f(p.unpack(z))
      bound.arguments["x"] = p.pack(x, "x")
      out = fn(*bound.args, **bound.kwargs)
      if not returns_map:
        return out
      if isinstance(out, tuple):
        return (p.unpack(out[0]),) + out[1:]
      return p.unpack(out)
    return wrapper
  return deco
