"""Randomisation metrics: MPRT (cascading and independent), eMPRT and the random-logit test.

The randomised models are one leading axis of a stacked parameter pytree, explained in one
``vmap`` (or ``chunk`` models at a time) rather than a Python loop. Cascading MPRT is
:func:`jaxplain.cascading_randomization` (Adebayo et al. 2018), re-exported here as
:func:`mprt`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxplain import _validate
from jaxplain._batching import unrolled
from jaxplain.evaluation import _common as C
from jaxplain.metrics import cascade_layers, cascading_randomization, randomised_leaves, ssim

Array = jax.Array

__all__ = ["mprt", "independent_randomization", "emprt", "histogram_entropy", "random_logit"]

mprt = cascading_randomization


def _spearman(a: Array, b: Array) -> Array:
  return C.pearson(C.average_ranks(C.flat(a)), C.average_ranks(C.flat(b)))


_SIMILARITIES = ("spearman", "pearson", "ssim")


def _similarity(name: str, a: Array, b: Array) -> Array:
  a, b = _validate.as_float(a), _validate.as_float(b)
  if name == "spearman":
    return _spearman(a, b)
  if name == "pearson":
    return C.pearson(C.flat(a), C.flat(b))
  return ssim(a, b, reduce="sum")


def independent_randomization(explain: Callable[[Any, Array, Array], Array], params: Any,
                              x: Array, target: Any, *, random_params: Any = None,
                              key: Array | None = None, layers: Sequence[str] | None = None,
                              model: Any = None, similarity: str = "spearman",
                              chunk: int | None = None) -> dict[str, Array]:
  """Independent model-parameter randomisation (Adebayo et al. 2018, section 3.1).

  Model ``l`` re-initialises only ``layers[l]`` (all other weights trained); every map is
  compared with the trained model's map. All ``L + 1`` models are one stacked parameter tree
  explained by ``vmap``.

  Args:
    explain, params, x, target, random_params, key, layers, model: as in
      :func:`jaxplain.cascading_randomization` (any input rank here; without ``layers`` the
      order comes from ``model``, see :func:`jaxplain.cascade_layers`).
    similarity: ``"spearman"`` (rank correlation over all elements), ``"pearson"`` or
      ``"ssim"`` (images; signed channel sums).
    chunk: models explained at a time, the chunks one after another (``1`` is the fastest on
      CPU, see :func:`jaxplain.cascading_randomization`); ``None``: one ``vmap``.

  Returns:
    ``{"similarity": (L + 1, B), "maps": (L + 1, *attribution shape)}``; row 0 is the
    trained model, row ``l + 1`` has ``layers[l]`` randomised
    (labels ``["original", *cascade_layers(params, layers)]``).

  >>> import jax, jax.numpy as jnp
  >>> p = {"w1": jnp.ones((4, 3)), "w2": jnp.ones((3, 2))}
  >>> ex = lambda p, x, t: jax.grad(lambda z: (jnp.tanh(z @ p["w1"]) @ p["w2"])[:, 0].sum())(x)
  >>> r = independent_randomization(ex, p, jnp.ones((2, 4)), 0, key=jax.random.key(0),
  ...                               layers=["w2", "w1"])
  >>> r["similarity"].shape
  (3, 2)
  """
  if similarity not in _SIMILARITIES:
    raise ValueError(f"similarity: expected one of {_SIMILARITIES}, got {similarity!r}")
  C.check_chunk(chunk)
  x = C.check_x(x)
  t = _validate.check_target(target, x.shape[0])
  layers = cascade_layers(params, layers, model=model, x=x)
  treedef, _, orig, rnd, layer_of = randomised_leaves(params, random_params, key, layers)
  n = len(layers) + 1
  model = jnp.arange(n)
  stacked = []
  for a, r, j in zip(orig, rnd, layer_of):
    a = jnp.asarray(a)
    sel = (model == j + 1).reshape((n,) + (1,) * a.ndim)
    stacked.append(jnp.where(sel, jnp.asarray(r, a.dtype)[None], a[None]))
  stacked = jax.tree_util.tree_unflatten(treedef, stacked)
  maps = unrolled(jax.vmap(lambda p: explain(p, x, t)), stacked, chunk)
  ref = jnp.broadcast_to(maps[0], maps.shape)
  fl = lambda m: m.reshape((n * m.shape[1],) + m.shape[2:])
  sim = _similarity(similarity, fl(ref), fl(maps)).reshape(n, -1)
  return {"similarity": sim, "maps": maps}


def histogram_entropy(attributions: Array, *, n_bins: int = 100) -> Array:
  """Entropy of the histogram of each example's attribution values (eMPRT's complexity).

  ``n_bins`` equal bins over ``[min, max]`` of the example (the last bin closed, as
  ``np.histogram``), then ``-sum p log p`` of the bin frequencies (``scipy.stats.entropy``),
  as Quantus's ``discrete_entropy``.

  Returns:
    ``(B,)``.

  >>> import jax.numpy as jnp
  >>> round(float(histogram_entropy(jnp.array([[0.0, 0.0, 1.0, 1.0]]), n_bins=4)[0]), 4)
  0.6931
  """
  n_bins = C.check_count(n_bins, "n_bins")
  a = C.flat(_validate.as_float(attributions))
  lo = jnp.min(a, axis=1, keepdims=True)
  hi = jnp.max(a, axis=1, keepdims=True)
  span = jnp.where(hi > lo, hi - lo, 1.0)
  idx = jnp.clip(jnp.floor((a - lo) / span * n_bins).astype(jnp.int32), 0, n_bins - 1)
  counts = jnp.sum(jax.nn.one_hot(idx, n_bins, dtype=a.dtype), axis=1)
  p = counts / jnp.sum(counts, axis=1, keepdims=True)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=1)


def emprt(explain: Callable[[Any, Array, Array], Array], params: Any, x: Array, target: Any,
          *, random_params: Any = None, key: Array | None = None, n_bins: int = 100,
          chunk: int | None = None) -> dict[str, Array]:
  """Efficient MPRT (Hedstrom et al. 2023): the rise of explanation complexity under full
  randomisation.

  ``eMPRT = H(e_random) / H(e_trained)`` with ``H`` the :func:`histogram_entropy` of the
  explanation, ``e_random`` explained with every parameter randomised (Quantus's
  ``EfficientMPRT`` with ``skip_layers=True``). Higher is better (a method sensitive to the
  weights turns noisy when they are random). Trained and random models are one ``vmap``.

  Args:
    explain, params, x, target, random_params, key: as in
      :func:`jaxplain.cascading_randomization`.
    n_bins: histogram bins.
    chunk: models explained at a time (of 2), as in :func:`independent_randomization`.

  Returns:
    ``{"emprt": (B,), "entropy_trained": (B,), "entropy_random": (B,)}``.

  >>> import jax, jax.numpy as jnp
  >>> p = {"w": jnp.ones((4, 2))}
  >>> ex = lambda p, x, t: x * p["w"][None, :, 0]
  >>> x = jax.random.normal(jax.random.key(1), (2, 4))
  >>> emprt(ex, p, x, 0, key=jax.random.key(0))["emprt"].shape
  (2,)
  """
  C.check_chunk(chunk)
  x = C.check_x(x)
  t = _validate.check_target(target, x.shape[0])
  treedef, _, orig, rnd, owner = randomised_leaves(params, random_params, key)
  stacked = jax.tree_util.tree_unflatten(
      treedef, [jnp.stack([jnp.asarray(a), jnp.asarray(r if o == 0 else a, jnp.result_type(a))])
                for a, r, o in zip(orig, rnd, owner)])
  maps = unrolled(jax.vmap(lambda p: explain(p, x, t)), stacked, chunk)
  h0 = histogram_entropy(maps[0], n_bins=n_bins)
  h1 = histogram_entropy(maps[1], n_bins=n_bins)
  return {"emprt": h1 / jnp.where(h0 > 0, h0, 1.0), "entropy_trained": h0,
          "entropy_random": h1}


def random_logit(explain: Callable[[Array, Array], Array], x: Array, target: Any, *,
                 key: Array, num_classes: int, attributions: Array | None = None,
                 similarity: str = "ssim") -> Array:
  """Random-logit test (Sixt et al. 2020): similarity of the map for the target with the map
  for a uniformly random other class (keyed, per example). Lower is better.

  As Quantus's ``RandomLogit`` (default similarity SSIM on the maps; Quantus uses
  ``skimage``'s SSIM on unnormalised maps, ours min-max normalises them first,
  :func:`jaxplain.ssim`).

  Args:
    explain: batched explainer ``(x, target) -> attributions``.
    x: ``(B, ...)`` inputs (``"ssim"`` needs images: maps ``(B, H, W)`` or like ``x``).
    target: an int or ``(B,)`` ints.
    key: ``jax.random`` key for the other class.
    num_classes: number of classes ``K >= 2``.
    attributions: the explanation of ``target`` if already computed.
    similarity: ``"ssim"``, ``"spearman"`` or ``"pearson"``.

  Returns:
    ``(B,)`` similarities.

  >>> import jax, jax.numpy as jnp
  >>> ex = lambda x, t: x * (1.0 + t[:, None].astype(x.dtype))   # same ranking for all
  >>> r = random_logit(ex, jnp.arange(8.0)[None], 0, key=jax.random.key(0), num_classes=3,
  ...                  similarity="spearman")
  >>> round(float(r[0]), 4)
  1.0
  """
  if similarity not in _SIMILARITIES:
    raise ValueError(f"similarity: expected one of {_SIMILARITIES}, got {similarity!r}")
  k = C.check_count(num_classes, "num_classes", 2)
  x = C.check_x(x)
  t = _validate.check_target(target, x.shape[0], k)
  off = (t + jax.random.randint(key, t.shape, 1, k, dtype=t.dtype)) % k
  a = C.given_or_explained(explain, x, t, attributions)
  return _similarity(similarity, a, explain(x, off.astype(jnp.int32)))
