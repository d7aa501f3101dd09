"""PPI on decoy digits (seed 004, Table 2 / Figures 3-4 in miniature).

    python -m experiments.ppi_decoy [--full | --smoke] [--out outputs] [--seed 0]

Data: :func:`jaxplain.data.load` ``"decoy_digits"`` at 28x28: every image carries a white 6x6
patch at one of ten border positions (five along the top edge, five along the bottom); the
position is the label in ``train`` and ``validation`` (in-distribution, "ID") and random in
``test`` (out-of-distribution, "OOD").
Model: LeNet. Arms, for each seed:

- *classification*: plain cross-entropy for ``warmup + epochs`` epochs;
- *+PPI <method>* for method in gradient, LRP, Grad-CAM (conv2), WBP: the same plain warm-up
  (the first ``warmup`` epochs are shared with the baseline: PPI switched on after N steps),
  then ``epochs`` epochs of PPI (:func:`jaxplain.ppi.make_ppi_loss`, paper weights
  w1 = 1, w2 = 0.1, w3 = 1, default ``PPIConfig``) inside :func:`jaxplain.train.fit`;
- *+PPI WBP, same_label* (not in ``--smoke``): the WBP arm with ``pairing="same_label"``.

Measured per arm (mean and SD over seeds): ID and OOD accuracy, the decoy-free accuracy (the
same test digits from ``"digits"``, no patch); the share of saliency mass on
the decoy patch (sum of |s| over the patch pixels / sum over the image, validation images; the
patch is 6x6 = 4.6 % of the 28x28 image) for every saliency method; deletion curves (SPEC section 6:
probability of the true class after removing the top-k salient pixels, replaced by 0) and
their area, for the baseline and the PPI models, with each method.

Every :func:`jaxplain.train.fit` call builds a new jitted step; to avoid recompiling the same
step for every seed, ``run`` turns on JAX's persistent compilation cache under
``out_dir/jax_cache`` when none is configured (restored afterwards).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

if __name__ == "__main__" and __package__ in (None, ""):  # `python experiments/ppi_decoy.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxplain import cam, gradients, metrics, ppi, rules
from jaxplain import data as jdata
from jaxplain import plot as jplot
from jaxplain import train as jtrain
from jaxplain.models import LeNet

METHODS = ("gradient", "lrp", "grad_cam", "wbp")
LABELS = {"gradient": "Gradient", "lrp": "LRP", "grad_cam": "GradCAM", "wbp": "WBP"}
CAM_LAYER = "conv2"
FRACTIONS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def _settings(full: bool, smoke: bool) -> dict:
  if smoke:
    return {"seeds": 1, "warmup": 1, "epochs": 1, "train_n": 256, "eval_n": 64,
            "methods": ("gradient", "wbp"), "lr": 3e-3, "batch": 64, "same_label": False}
  if full:
    return {"seeds": 5, "warmup": 10, "epochs": 10, "train_n": None, "eval_n": None,
            "methods": METHODS, "lr": 2e-3, "batch": 64, "same_label": True}
  return {"seeds": 3, "warmup": 4, "epochs": 3, "train_n": None, "eval_n": 135,
          "methods": METHODS, "lr": 3e-3, "batch": 64, "same_label": True}


def _saliency_fns(model):
  """Jitted ``(variables, x, y) -> (B, H, W)`` maps, compiled once per method."""

  def make(method):
    def fn(variables, x, y):
      f = lambda z: model.apply(variables, z)
      if method == "grad_cam":
        return cam.grad_cam(model, variables, x, y, layer=CAM_LAYER)
      if method == "gradient":
        s = gradients.gradient(f, x, y)
      else:
        s = getattr(rules, method)(f, x, y)
      return jnp.sum(s, axis=-1)
    return jax.jit(fn)
  return {m: make(m) for m in METHODS}


def _deletion_fn(model):
  def fn(variables, x, y, s):
    f = lambda z: model.apply(variables, z)
    return metrics.deletion_curve(f, x, y, s, steps=list(FRACTIONS), output="probability")
  return jax.jit(fn)


def decoy_share(s: np.ndarray, decoy_mask: np.ndarray) -> np.ndarray:
  """Per-example share of |saliency| on the decoy pixels: (B, H, W), (B, H, W) -> (B,)."""
  a = np.abs(np.asarray(s, np.float64))
  return (a * decoy_mask).sum((1, 2)) / np.maximum(a.sum((1, 2)), 1e-30)


def _subset(d: dict, n: int | None) -> dict:
  return d if n is None else {k: v[:n] for k, v in d.items()}


def _mean_sd(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _fmt(values, digits=3) -> str:
  m, s = _mean_sd(values)
  return f"{m:.{digits}f} ± {s:.{digits}f}"


def run(out_dir: pathlib.Path, *, full: bool = False, smoke: bool = False, seed: int = 0,
        progress: bool | None = None) -> dict:
  """Baseline vs PPI with each saliency method on decoy digits (see the module docstring)."""
  out_dir = pathlib.Path(out_dir)
  if jax.config.jax_compilation_cache_dir:
    return _run(out_dir, full=full, smoke=smoke, seed=seed, progress=progress)
  old = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", str(out_dir / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    return _run(out_dir, full=full, smoke=smoke, seed=seed, progress=progress)
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old)


def _run(out_dir: pathlib.Path, *, full: bool, smoke: bool, seed: int,
         progress: bool | None) -> dict:
  t_start = time.time()
  fig_dir = out_dir / "ppi_decoy"
  fig_dir.mkdir(parents=True, exist_ok=True)
  cfg_run = _settings(full, smoke)
  progress = (not smoke) if progress is None else progress
  methods = cfg_run["methods"]
  data = {s: jdata.load("decoy_digits", s, image_size=28) for s in ("train", "validation",
                                                                      "test")}
  train = _subset(data["train"], cfg_run["train_n"])
  val = _subset(data["validation"], cfg_run["eval_n"])
  test = data["test"]
  # The same test digits without any decoy (the decoy-free accuracy).
  free = jdata.load("digits", "test", image_size=28)
  if not np.array_equal(free["label"], test["label"]):
    raise RuntimeError("digits and decoy_digits test splits are not the same examples")
  model = LeNet(num_classes=10)
  ppi_cfg = ppi.PPIConfig(grad_cam_layer=CAM_LAYER)
  sal_fns, del_fn = _saliency_fns(model), _deletion_fn(model)
  xv, yv = jnp.asarray(val["image"]), jnp.asarray(val["label"])
  same_label = cfg_run["same_label"] and "wbp" in methods
  arms = ["classification"] + [f"ppi_{m}" for m in methods] + (
      ["ppi_wbp_same_label"] if same_label else [])
  res: dict = {a: {"id_acc": [], "ood_acc": [], "free_acc": [], "share": {m: [] for m in methods},
                   "deletion": {m: [] for m in methods}} for a in arms}
  examples = {}
  for k in range(cfg_run["seeds"]):
    s = seed + k
    opt = optax.adam(cfg_run["lr"])
    warm = jtrain.fit(model, train, epochs=cfg_run["warmup"], batch_size=cfg_run["batch"],
                      optimizer=opt, seed=s, progress=progress).variables
    trained = {"classification": jtrain.fit(
        model, train, epochs=cfg_run["epochs"], batch_size=cfg_run["batch"], optimizer=opt,
        seed=s + 1000, init_variables=warm, progress=progress).variables}
    for m in methods:
      loss_fn = ppi.make_ppi_loss(model, ppi_cfg, saliency=m)
      trained[f"ppi_{m}"] = jtrain.fit(
          model, train, epochs=cfg_run["epochs"], batch_size=cfg_run["batch"], optimizer=opt,
          seed=s + 1000, init_variables=warm, loss_fn=loss_fn, progress=progress).variables
    if same_label:
      loss_fn = ppi.make_ppi_loss(
          model, dataclasses.replace(ppi_cfg, pairing="same_label"), saliency="wbp")
      trained["ppi_wbp_same_label"] = jtrain.fit(
          model, train, epochs=cfg_run["epochs"], batch_size=cfg_run["batch"], optimizer=opt,
          seed=s + 1000, init_variables=warm, loss_fn=loss_fn, progress=progress).variables
    for arm, variables in trained.items():
      r = res[arm]
      r["id_acc"].append(jtrain.evaluate(model, variables, val)["accuracy"])
      r["ood_acc"].append(jtrain.evaluate(model, variables, test)["accuracy"])
      r["free_acc"].append(jtrain.evaluate(model, variables, free)["accuracy"])
      for m in methods:
        smap = sal_fns[m](variables, xv, yv)
        r["share"][m].append(float(decoy_share(np.asarray(smap), val["decoy_mask"]).mean()))
        curve = np.asarray(del_fn(variables, xv, yv, smap)).mean(0)
        r["deletion"][m].append(curve.tolist())
        if k == 0:
          examples[(arm, m)] = np.asarray(smap[:4])

  # -- tables ----------------------------------------------------------------------------------
  fr = np.asarray(FRACTIONS)

  def auc_drop(curves):
    """Area under (score at 0 - score after removing the top fraction), per seed."""
    c = np.asarray(curves)
    drop = c[:, :1] - c
    return [float(np.trapezoid(d, fr) / (fr[-1] - fr[0])) for d in drop]

  rows = ["| Model | ID acc | OOD acc | decoy-free acc | decoy share (own saliency) | "
          "deletion drop AUC (own saliency) |", "|---|---|---|---|---|---|"]
  base = res["classification"]
  rows.append(f"| Classification | {_fmt(base['id_acc'])} | {_fmt(base['ood_acc'])} | "
              f"{_fmt(base['free_acc'])} | "
              f"{_fmt(base['share'].get('wbp', base['share'][methods[-1]]))} (WBP) | "
              f"{_fmt(auc_drop(base['deletion'].get('wbp', base['deletion'][methods[-1]])))} "
              "(WBP) |")
  for m in methods:
    r = res[f"ppi_{m}"]
    rows.append(f"| +PPI {LABELS[m]} | {_fmt(r['id_acc'])} | {_fmt(r['ood_acc'])} | "
                f"{_fmt(r['free_acc'])} | "
                f"{_fmt(r['share'][m])} | {_fmt(auc_drop(r['deletion'][m]))} |")
  if same_label:
    r = res["ppi_wbp_same_label"]
    rows.append(f"| +PPI WBP, same_label | {_fmt(r['id_acc'])} | {_fmt(r['ood_acc'])} | "
                f"{_fmt(r['free_acc'])} | "
                f"{_fmt(r['share']['wbp'])} | {_fmt(auc_drop(r['deletion']['wbp']))} |")
  rows2 = ["| saliency | decoy share: baseline | decoy share: +PPI (same method) | deletion "
           "drop AUC: baseline | deletion drop AUC: +PPI |", "|---|---|---|---|---|"]
  for m in methods:
    r = res[f"ppi_{m}"]
    rows2.append(f"| {LABELS[m]} | {_fmt(base['share'][m], 4)} | {_fmt(r['share'][m], 4)} | "
                 f"{_fmt(auc_drop(base['deletion'][m]))} | {_fmt(auc_drop(r['deletion'][m]))} |")

  # -- figures ---------------------------------------------------------------------------------
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figures = []
  fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3), squeeze=False)
  for ax, m in zip(axes[0], methods):
    jplot.curves({"baseline": np.asarray(res["classification"]["deletion"][m]),
                  "+PPI": np.asarray(res[f"ppi_{m}"]["deletion"][m])},
                 fractions=fr, references=("baseline",), ax=ax, title=LABELS[m],
                 xlabel="fraction of pixels removed", ylabel="p(true class)")
  fig.tight_layout()
  fig.savefig(fig_dir / "deletion.png", dpi=90)
  plt.close(fig)
  figures.append("ppi_decoy/deletion.png")

  n_ex = 4
  cols = 1 + 2 * len(methods)
  fig, axes = plt.subplots(n_ex, cols, figsize=(1.3 * cols, 1.4 * n_ex), squeeze=False)
  for i in range(n_ex):
    axes[i][0].imshow(np.asarray(val["image"][i, ..., 0]), cmap="gray", vmin=0, vmax=1)
    axes[i][0].contour(val["decoy_mask"][i], levels=[0.5], colors="c", linewidths=0.8)
    if i == 0:
      axes[i][0].set_title("input", fontsize=7)
    for j, m in enumerate(methods):
      for q, arm in enumerate(("classification", f"ppi_{m}")):
        a = np.abs(examples[(arm, m)][i])
        ax = axes[i][1 + 2 * j + q]
        ax.imshow(a / max(a.max(), 1e-12), cmap="hot", vmin=0, vmax=1)
        ax.contour(val["decoy_mask"][i], levels=[0.5], colors="c", linewidths=0.8)
        if i == 0:
          ax.set_title(f"{LABELS[m]}\n{'base' if q == 0 else '+PPI'}", fontsize=7)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(fig_dir / "saliency_maps.png", dpi=90)
  plt.close(fig)
  figures.append("ppi_decoy/saliency_maps.png")

  # -- summary ---------------------------------------------------------------------------------
  def delta(metric):
    return {m: float(np.mean(res[f"ppi_{m}"][metric]) - np.mean(base[metric])) for m in methods}

  d_ood, d_id, d_free = delta("ood_acc"), delta("id_acc"), delta("free_acc")
  share_ratio = {m: float(np.mean(res[f"ppi_{m}"]["share"][m]) /
                          max(np.mean(base["share"][m]), 1e-12)) for m in methods}
  area = float(val["decoy_mask"].mean())
  del_better = all(np.mean(auc_drop(res[f"ppi_{m}"]["deletion"][m]))
                   > np.mean(auc_drop(base["deletion"][m])) for m in methods)
  ood_worse = all(d < 0 for d in d_ood.values())
  if same_label:
    sl = res["ppi_wbp_same_label"]
    d_sl = np.asarray(sl["ood_acc"]) - np.asarray(base["ood_acc"])
    d_sl_free = np.asarray(sl["free_acc"]) - np.asarray(base["free_acc"])
  findings = [
      f"- Decoy patch area: {100 * area:.1f} % of the image. The baseline's ID - OOD accuracy "
      f"gap is {np.mean(base['id_acc']) - np.mean(base['ood_acc']):+.3f}: "
      + ("the baseline barely uses the decoy in this run, so there is little spurious "
         "reliance for PPI to remove."
         if abs(np.mean(base["id_acc"]) - np.mean(base["ood_acc"])) < 0.03 else
         "the baseline relies on the decoy."),
      "- PPI - baseline accuracy (ID / OOD / decoy-free): " + ", ".join(
          f"{LABELS[m]} {d_id[m]:+.3f} / {d_ood[m]:+.3f} / {d_free[m]:+.3f}" for m in methods)
      + ".",
      *([] if not same_label else [
          "- `pairing=\"same_label\"` (WBP; x' takes the map of another example with the same "
          "label, whose decoy is at the same position): OOD "
          f"{d_sl.mean():+.3f} ({int((d_sl > 0).sum())}/{d_sl.size} seeds better), decoy-free "
          f"{d_sl_free.mean():+.3f} vs the baseline (paired per seed)."]),
      "- Decoy share of saliency, PPI / baseline (same method): " + ", ".join(
          f"{LABELS[m]} {share_ratio[m]:.2f}" for m in methods) + ".",
      "- Deletion drop AUC, baseline -> PPI (same method): " + ", ".join(
          f"{LABELS[m]} {np.mean(auc_drop(base['deletion'][m])):.3f} -> "
          f"{np.mean(auc_drop(res[f'ppi_{m}']['deletion'][m])):.3f}" for m in methods)
      + (": PPI trains the model so that removing the salient pixels removes the evidence "
         "(its negative-contrast loss asks for exactly that), as in the paper's Figure 4."
         if del_better else ": no consistent deletion gain in this run."),
      *([] if not ood_worse else [
          "- Reading: with the decoy sufficient for the label, L_con (\"after removing the "
          "salient pixels, do not predict y\") is satisfied just as well by a model that needs "
          "the decoy, and L_ad only removes an example's own decoy when the partner's patch is "
          "at the same border position (1 in 10); on this data PPI does not steer the model away from "
          "the decoy, and the OOD accuracy falls. LRP-epsilon (epsilon 1e-6) and WBP give "
          "nearly the same maps on this ReLU network (both ~ gradient x input)."]),
  ]
  summary = "\n".join([
      "## PPI on decoy digits (seed 004, Table 2 / Figures 3-4)",
      "",
      f"LeNet on 28x28 decoy digits; {cfg_run['seeds']} seed(s); {cfg_run['warmup']} warm-up "
      f"epochs (plain, shared) + {cfg_run['epochs']} epochs plain (baseline) or PPI (Adam "
      f"{cfg_run['lr']}, batch {cfg_run['batch']}, PPI defaults sigma {ppi_cfg.sigma}, omega "
      f"{ppi_cfg.omega}, w = {ppi_cfg.w1}/{ppi_cfg.w2}/{ppi_cfg.w3}, one-vs-others, soft "
      "mask, second order). ID = validation split (decoy encodes the label), OOD = test split "
      f"(decoy random); saliency and deletion on {len(val['label'])} validation images. "
      "Mean ± SD over seeds.",
      "",
      *rows,
      "",
      *rows2,
      "",
      "Deletion drop AUC: mean over the removed fraction (0 to 0.5) of p(true class at 0) - "
      "p(true class after removal); larger = the map finds pixels the model needs.",
      "",
      *findings,
      "",
      f"Wall time {time.time() - t_start:.0f} s.",
  ])
  out_metrics = {
      "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg_run.items()},
      "fractions": list(FRACTIONS),
      "arms": {a: {"id_acc": r["id_acc"], "ood_acc": r["ood_acc"], "free_acc": r["free_acc"],
                   "decoy_share": r["share"],
                   "deletion_curve": r["deletion"],
                   "deletion_drop_auc": {m: auc_drop(r["deletion"][m]) for m in methods}}
               for a, r in res.items()},
      "ppi_minus_baseline_ood_acc": d_ood, "ppi_minus_baseline_id_acc": d_id,
      "ppi_minus_baseline_free_acc": d_free,
      "decoy_share_ratio_ppi_over_baseline": share_ratio,
      "decoy_area": area, "seconds": time.time() - t_start,
  }
  (fig_dir / "metrics.json").write_text(json.dumps(out_metrics, indent=1))
  return {"metrics": out_metrics, "figures": figures, "summary": summary}


if __name__ == "__main__":
  from experiments.common import cli
  cli(run, __doc__)
