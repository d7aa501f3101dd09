"""Capture and replace the input/output of a named linen submodule (private).

Built on ``flax.linen.intercept_methods``: a module is named by its path (``"conv2"``,
``"stage1_block1/conv1"``). ``capture`` runs the model once and records, for each named layer,
its input, its output and the module itself; ``replace_output`` runs the model with that
layer's output replaced by a given array. Under ``jax.jit`` the layers before the replaced one
are dead code and are removed; under ``jax.vmap`` over the replacement they are not batched.
If a module is called several times only its first call is captured / replaced.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax


def _name(module: nn.Module) -> str:
  return "/".join(module.path)


def capture(model: nn.Module, variables: Any, x: jax.Array, layers: Sequence[str], *,
            apply_kwargs: dict | None = None) -> tuple[jax.Array, dict[str, tuple]]:
  """Run ``model`` once; return its logits and ``{layer: (input, output, module)}``."""
  want = set(layers)
  got: dict[str, tuple] = {}
  seen: list[str] = []

  def interceptor(next_fun, args, kwargs, ctx):
    out = next_fun(*args, **kwargs)
    if ctx.method_name == "__call__":
      name = _name(ctx.module)
      seen.append(name)
      if name in want and name not in got:
        got[name] = (args[0], out, ctx.module.clone(parent=None))
    return out

  with nn.intercept_methods(interceptor):
    logits = model.apply(variables, x, **(apply_kwargs or {}))
  missing = [l for l in layers if l not in got]
  if missing:
    raise ValueError(f"layers: {missing} not called by the model; called submodules: "
                     f"{[s for s in seen if s]}")
  return logits, got


def replace_output(model: nn.Module, variables: Any, x: jax.Array, layer: str, value: Any, *,
                   apply_kwargs: dict | None = None) -> jax.Array:
  """Run ``model`` with the output of submodule ``layer`` replaced by ``value``."""
  done = []

  def interceptor(next_fun, args, kwargs, ctx):
    if ctx.method_name == "__call__" and not done and _name(ctx.module) == layer:
      done.append(True)
      return value
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = model.apply(variables, x, **(apply_kwargs or {}))
  if not done:
    raise ValueError(f"layer: {layer!r} was not called by the model")
  return out
