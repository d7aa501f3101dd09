"""Run an explainer x metric grid over a whole data split, sharded over the local devices.

:func:`evaluate` is a driver (like the training loop): it jits ONE step that explains a batch
with every explainer and scores every map with every metric, places each batch with its batch
axis split over a device mesh (``Mesh`` + ``NamedSharding``), and concatenates the
per-example scores. :func:`to_table` and :func:`to_json` format the result.

A *metric* is a function of one batch context ``ctx`` (a dict) returning per-example scores
``(B,)`` (or ``(B, ...)``): ``ctx`` holds ``"f"`` (the model), ``"x"``, ``"target"``,
``"attributions"`` (the explainer's output on ``x``), ``"explain"`` (the explainer, for
robustness metrics), ``"key"`` (a per-batch, per-metric key) and ``"mask"`` (when the data
carries ground-truth masks). :func:`default_metrics` builds the usual ones.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxplain import _validate
from jaxplain.evaluation._complexity import complexity as _complexity
from jaxplain.evaluation._complexity import sparseness as _sparseness
from jaxplain.evaluation.faithfulness import faithfulness_correlation as _faith_corr
from jaxplain.evaluation.faithfulness import pixel_flipping as _pixel_flipping
from jaxplain.evaluation.localisation import pointing_game as _pointing_game
from jaxplain.evaluation.localisation import relevance_mass_accuracy as _mass
from jaxplain.evaluation.localisation import relevance_rank_accuracy as _rank
from jaxplain.evaluation.robustness import max_sensitivity as _max_sensitivity

Array = jax.Array

__all__ = ["evaluate", "default_metrics", "to_table", "to_json"]


def default_metrics(*, steps: int = 10, n_samples: int = 8, n_runs: int = 20,
                    radius: float = 0.05, localisation: bool = False) -> dict[str, Callable[[dict], Array]]:
  """A standard metric set for :func:`evaluate` (small defaults; raise them for papers).

  Deletion AUC (pixel flipping to 0 on the softmax in ``steps`` steps, summarised by its
  area; lower is better), faithfulness correlation (``n_runs`` subsets of 1/8 of the
  features), max-sensitivity (``n_samples`` perturbations of ``radius``), sparseness,
  complexity, and with
  ``localisation=True`` (the data must carry masks) relevance mass accuracy, relevance rank
  accuracy and the pointing game on ``|a|``.

  >>> sorted(default_metrics())[:3]
  ['complexity', 'deletion_auc', 'faithfulness_correlation']
  """
  def deletion_auc(c):
    curve = _pixel_flipping(c["f"], c["x"], c["target"], jnp.abs(c["attributions"]),
                            steps=steps, output="softmax")
    return jnp.sum(curve[:, 1:] + curve[:, :-1], axis=1) / (2.0 * steps)

  def faith(c):
    n = math.prod(c["attributions"].shape[1:])
    return _faith_corr(c["f"], c["x"], c["target"], c["attributions"],
                       key=c["key"], n_runs=n_runs, subset_size=max(1, n // 8))

  def max_sens(c):
    return _max_sensitivity(c["explain"], c["x"], c["target"], key=c["key"],
                            n_samples=n_samples, radius=radius,
                            attributions=c["attributions"])

  out = {
      "deletion_auc": deletion_auc,
      "faithfulness_correlation": faith,
      "max_sensitivity": max_sens,
      "sparseness": lambda c: _sparseness(c["attributions"]),
      "complexity": lambda c: _complexity(c["attributions"]),
  }
  if localisation:
    out.update({
        "relevance_mass": lambda c: _mass(jnp.abs(c["attributions"]), c["mask"]),
        "relevance_rank": lambda c: _rank(jnp.abs(c["attributions"]), c["mask"]),
        "pointing_game": lambda c: _pointing_game(jnp.abs(c["attributions"]), c["mask"]),
    })
  return out


def _as_arrays(data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
  if isinstance(data, Mapping):
    return np.asarray(data["x"]), np.asarray(data["y"]), (
        None if data.get("mask") is None else np.asarray(data["mask"]))
  if isinstance(data, tuple) and len(data) in (2, 3) and all(
      hasattr(v, "shape") for v in data):
    return (np.asarray(data[0]), np.asarray(data[1]),
            np.asarray(data[2]) if len(data) == 3 else None)
  return None


def _batches(data: Any, batch_size: int) -> Iterable[tuple]:
  arrays = _as_arrays(data)
  if arrays is not None:
    x, y, m = arrays
    if len(x) != len(y) or (m is not None and len(m) != len(x)):
      raise ValueError(f"data: x, y (and mask) must have the same length, got {len(x)}, "
                       f"{len(y)}" + ("" if m is None else f", {len(m)}"))
    for s in range(0, len(x), batch_size):
      yield x[s:s + batch_size], y[s:s + batch_size], (None if m is None else
                                                       m[s:s + batch_size])
    return
  for item in data:
    arr = _as_arrays(item)
    if arr is None:
      raise TypeError("data: expected (x, y[, mask]) arrays, a dict with 'x', 'y'[, 'mask'], "
                      f"or an iterable of such batches; got an item of type {type(item)}")
    x, y, m = arr
    if len(x) > batch_size:
      raise ValueError(f"data: a batch of {len(x)} examples exceeds batch_size={batch_size}")
    yield x, y, m


def _pad(v: np.ndarray, n: int) -> np.ndarray:
  if len(v) == n:
    return v
  return np.concatenate([v, np.repeat(v[-1:], n - len(v), axis=0)])


def evaluate(explainers: Mapping[str, Callable[[Array, Array], Array]],
             metrics: Mapping[str, Callable[[dict], Array]], data: Any, *,
             f: Callable[[Array], Array], key: Array, batch_size: int = 64,
             target: str = "label", devices: Any = None,
             progress: bool = True) -> dict[str, Any]:
  """Score every explainer with every metric over a whole data split.

  Each batch is padded to ``batch_size`` (rounded up to a multiple of the number of
  devices), placed with its batch axis sharded over ``devices`` (default: all local devices)
  and passed to one jitted step; padding rows are dropped from the scores. Batch ``i`` and
  metric ``j`` get the key ``fold_in(fold_in(key, i), j)``, so the scores do not depend on
  the number of devices.

  Args:
    explainers: ``{name: explain(x, target) -> attributions}`` (batched, jittable).
    metrics: ``{name: metric(ctx) -> (B, ...)}`` (module docstring; :func:`default_metrics`).
    data: ``(x, y)`` or ``(x, y, mask)`` arrays, a dict with ``"x"``, ``"y"`` (and
      ``"mask"``), or an iterable of such batches (each at most ``batch_size``).
    f: the pure batched model ``x -> logits``.
    key: ``jax.random`` key.
    batch_size: examples per step.
    target: ``"label"`` (explain ``y``) or ``"predicted"`` (explain ``argmax f(x)``).
    devices: a sequence of devices for the mesh; default ``jax.local_devices()``.
    progress: show a tqdm progress bar.

  Returns:
    ``{"scores": {explainer: {metric: (N, ...) np.ndarray}},
    "mean": {explainer: {metric: float}}, "n": N, "devices": D}``.

  >>> import jax, jax.numpy as jnp, numpy as np, jaxplain
  >>> w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
  >>> f = lambda x: x @ w
  >>> data = (np.ones((5, 2), np.float32), np.zeros(5, np.int32))
  >>> r = evaluate({"gxi": lambda x, t: x * w[None, :, 0]},
  ...              {"sparseness": lambda c: jaxplain.evaluation.sparseness(c["attributions"])},
  ...              data, f=f, key=jax.random.key(0), batch_size=4, progress=False)
  >>> r["scores"]["gxi"]["sparseness"].shape, r["n"]
  ((5,), 5)
  """
  if target not in ("label", "predicted"):
    raise ValueError(f"target: expected 'label' or 'predicted', got {target!r}")
  f = _validate.nnx_as_function(f)   # a bare NNX module: its eval-mode copy
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
  if not explainers or not metrics:
    raise ValueError("explainers, metrics: expected non-empty dicts of callables")
  devs = list(jax.local_devices() if devices is None else devices)
  mesh = Mesh(np.asarray(devs), ("batch",))
  rows = NamedSharding(mesh, PartitionSpec("batch"))
  bs = -(-int(batch_size) // len(devs)) * len(devs)
  enames, mnames = list(explainers), list(metrics)

  def step(x, y, mask, k):
    t = jnp.argmax(f(x), axis=-1).astype(jnp.int32) if target == "predicted" else y
    out = {}
    for en in enames:
      ex = explainers[en]
      a = ex(x, t)
      ctx = {"f": f, "x": x, "target": t, "attributions": a, "explain": ex, "mask": mask}
      out[en] = {mn: metrics[mn](dict(ctx, key=jax.random.fold_in(k, j)))
                 for j, mn in enumerate(mnames)}
    return out

  jstep = jax.jit(step)
  parts: list[Any] = []
  counts: list[int] = []
  it = _batches(data, bs)
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(it, desc="evaluate", unit="batch")
  for i, (x, y, m) in enumerate(it):
    n = len(x)
    put = lambda v: None if v is None else jax.device_put(_pad(v, bs), rows)
    res = jstep(put(x), put(np.asarray(y).astype(np.int32)), put(m),
                jax.random.fold_in(key, i))
    parts.append(jax.tree_util.tree_map(lambda v: np.asarray(v)[:n], res))
    counts.append(n)
  if not parts:
    raise ValueError("data: no examples")
  scores = {en: {mn: np.concatenate([p[en][mn] for p in parts]) for mn in mnames}
            for en in enames}
  mean = {en: {mn: float(np.mean(v)) for mn, v in d.items()} for en, d in scores.items()}
  return {"scores": scores, "mean": mean, "n": int(sum(counts)), "devices": len(devs)}


def to_table(results: Mapping[str, Any], digits: int = 4) -> str:
  """A Markdown table of the mean scores: one row per explainer, one column per metric.

  >>> print(to_table({"mean": {"grad": {"sparseness": 0.5}}, "n": 2}))
  | explainer | sparseness |
  |---|---|
  | grad | 0.5 |
  """
  mean = results["mean"]
  cols = list(next(iter(mean.values())))
  lines = ["| explainer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for en, d in mean.items():
    lines.append(f"| {en} | " + " | ".join(f"{d[c]:.{digits}g}" for c in cols) + " |")
  return "\n".join(lines)


def to_json(results: Mapping[str, Any]) -> str:
  """The mean scores, the number of examples and devices as one JSON line.

  >>> to_json({"mean": {"grad": {"sparseness": 0.5}}, "n": 2, "devices": 1})
  '{"mean": {"grad": {"sparseness": 0.5}}, "n": 2, "devices": 1}'
  """
  return json.dumps({"mean": results["mean"], "n": results.get("n"),
                     "devices": results.get("devices")})
