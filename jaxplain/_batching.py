"""Many perturbed copies of a batch through one model call (private).

The perturbation metrics and attributions evaluate a batched model ``f`` on ``S`` perturbed
copies of a batch ``(B, ...)``. Written as ``vmap(lambda k: f(perturb(k)))`` the model runs
under ``vmap``: XLA:CPU ran the SmallCNN's forward pass that way 1.4-1.5x slower than the same
``S * B`` images as one plain batch (1,024 images: 2.7-2.9 s vs 1.9 s; pixel flipping on 128
images 15.5-18 s vs 11.5-12.6 s, CPU use 147 % vs 196 %). :func:`map_merged` builds the
copies with ``vmap`` and merges the copy axis into the model's batch axis instead, so ``f``
(and anything it calls) sees one ordinary batch of ``chunk * B`` rows. Plain JAX, so it
stays differentiable (a ``custom_vmap`` would not be).

``chunk=None`` is automatic (:func:`auto_chunk`): all copies in one call when the merged batch
has at most :data:`AUTO_ELEMENTS` input elements, otherwise the most copies per call that stay
under it. All at once without a bound let a plausible call abort the process: Shapley value
sampling of four 32x32x3 images, one feature per element (2 x 3,073 orders and steps) asked
XLA for one batch of 24,584 images and died in ``std::bad_alloc`` (no Python exception) after
7 GB; at 5,460 images per call (the bound) it used 2.5 GB and took 16 s, at 2,048 1.2 GB and 15 s.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array

#: Input elements per call of the model when ``chunk=None`` (2^23: 32 MiB of float32, 2,730
#: images of 32x32x3, 55 of 224x224x3).
AUTO_ELEMENTS = 1 << 23


def auto_chunk(per_copy: int, n: int) -> int:
  """Copies per call when ``chunk=None``: all ``n`` if ``n * per_copy <= AUTO_ELEMENTS``, else
  the most that stay under it (at least 1); ``per_copy`` is one copy's input elements."""
  return max(1, min(n, AUTO_ELEMENTS // max(int(per_copy), 1)))


def _merge(v: Array) -> Array:
  return v.reshape((v.shape[0] * v.shape[1],) + v.shape[2:])


def map_merged(make: Callable[[Array], tuple[tuple[Any, ...], Any]],
               call: Callable[..., Any], ks: Array, chunk: int | None,
               post: Callable[[Any, Any], Any] | None = None, *,
               backward: bool = False) -> Any:
  """``post(call(*args_k), extra_k)`` for every ``k`` in ``ks``, stacked on a leading axis.

  ``make(k)`` returns ``(args, extra)``: ``args`` a tuple of arrays with the batch axis ``B``
  first (the model's inputs for copy ``k``: perturbed inputs, targets), ``extra`` any pytree.
  For ``chunk`` copies at a time (``None``: :func:`auto_chunk` of the args' size) the args
  are stacked to ``(c, B, ...)`` and merged to ``(c * B, ...)``; ``call`` runs once on them
  and each leaf of its result (leading axis ``c * B``) is split back to ``(c, B, ...)``. ``post(out, extra)``
  (default: ``out`` alone) then sees the chunk's ``(c, B, ...)`` outputs and extras, so a
  reduction there keeps memory per chunk. Full chunks run under ``jax.lax.map``, a remainder
  as one more call; with ``backward=True`` (``call`` runs a backward pass: an explainer)
  they are written out as :func:`unrolled` does, where XLA:CPU runs them faster.
  """
  post = post or (lambda out, extra: out)

  def block(kc: Array) -> Any:
    args, extra = jax.vmap(make)(kc)
    c = kc.shape[0]
    out = call(*(_merge(a) for a in args))
    out = jax.tree_util.tree_map(lambda v: v.reshape((c, v.shape[0] // c) + v.shape[1:]), out)
    return post(out, extra)

  ks = jnp.asarray(ks)
  n = ks.shape[0]
  if chunk is None:
    args, _ = jax.eval_shape(make, ks[0])
    chunk = auto_chunk(sum(a.size for a in jax.tree_util.tree_leaves(args)), n)
  if int(chunk) >= n:
    return block(ks)
  c = int(chunk)
  if backward:
    return unrolled(block, ks, c)
  full = (n // c) * c
  parts = jax.lax.map(block, ks[:full].reshape((n // c, c) + ks.shape[1:]))
  parts = jax.tree_util.tree_map(_merge, parts)
  if full == n:
    return parts
  rest = block(ks[full:])
  return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), parts, rest)


#: Full slices :func:`unrolled` writes out before it loops instead.
MAX_UNROLLED = 16


def unrolled(fn: Callable[[Any], Any], xs: Any, chunk: int | None) -> Any:
  """``fn`` over the leading axis of ``xs`` in slices of ``chunk`` (``fn`` maps a slice of n
  to n stacked results: a ``vmap``, or a call on n * B merged rows), the slices unrolled in
  the traced program and the results concatenated; ``None``: one slice.

  Not a ``lax.map``: on XLA:CPU a gradient (backward convolutions) ran 2.4x slower inside a
  loop body (SmallCNN, 4 x 128 rows: 1.17 s in a scan vs 0.49 s unrolled; LRP of 10 targets
  of 32 images: 669 ms under ``lax.map`` vs 155 ms unrolled), while forward passes did not
  slow down. So compile time grows with the number of slices instead; beyond
  :data:`MAX_UNROLLED` full slices they run under ``lax.map`` after all (a program of
  hundreds of copies of a backward pass would take longer to compile than it saves). (A
  ``vmap`` over convolution weights, e.g. randomised models, is a grouped convolution on
  CPU: there ``chunk=1`` is the fastest.)"""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  step = n if chunk is None else max(1, min(int(chunk), n))
  full = n // step
  if full > MAX_UNROLLED:  # many slices: one compiled loop body rather than a huge program
    looped = jax.lax.map(fn, jax.tree_util.tree_map(
        lambda a: a[:full * step].reshape((full, step) + a.shape[1:]), xs))
    parts = [jax.tree_util.tree_map(_merge, looped)]
    if full * step < n:
      parts.append(fn(jax.tree_util.tree_map(lambda a: a[full * step:], xs)))
  else:
    parts = [fn(jax.tree_util.tree_map(lambda a, s=s: a[s:s + step], xs))
             for s in range(0, n, step)]
  if len(parts) == 1:
    return parts[0]
  return jax.tree_util.tree_map(lambda *p: jnp.concatenate(p, axis=0), *parts)

