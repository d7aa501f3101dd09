"""Method comparison: deletion/insertion AUC and the model-randomisation sanity check.

On LeNet trained on the embedded digits (``experiments.common.get_trained("lenet")``), every
attribution method explains the predicted class of the same test images. For each method:

* deletion and insertion curves (SPEC section 6; seed 004 fig. 4): the pixels are ranked by
  the method's pixel map, the top fraction is set to 0 (black, the digits' background) or --
  for insertion -- only the top fraction of the image is kept on a black canvas; the score is
  the softmax probability of the class (deletion also on the logit). Area under the curve
  over fractions 0..1; lower deletion AUC and higher insertion AUC are better. The baseline is
  a random pixel order (mean of several keyed orders).
* the cascading model-randomisation sanity check (Adebayo et al. 2018): re-initialise fc3,
  fc2, fc1, conv2, conv1 in turn (fresh Flax initialisation, another seed) and report the
  Spearman rank correlation and SSIM of each map with the trained model's map. A method that
  depends on the weights should fall towards 0.
* the explainer x metric grid of :func:`jaxplain.evaluate` (faithfulness correlation,
  max-sensitivity, sparseness, complexity, deletion AUC of |map|), batched and sharded over
  the local devices.
* for Integrated Gradients, every quadrature rule at the same number of steps with its
  completeness gap ``sum IG - (f(x)[t] - f(0)[t])``.

Pixel maps: gradient and SmoothGrad are unsigned sensitivities (sum over channels of |a|, the
seed-000 grayscale); the attribution methods (gradient x input, IG, occlusion, WBP, LRP) are
ranked by their signed value (evidence *for* the class first); Grad-CAM is already a
non-negative pixel map, computed on the rectified ``conv2`` features (:func:`lenet_split`).

    python -m experiments.method_comparison [--full | --smoke] [--out outputs]
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxplain
from jaxplain import _progress
from jaxplain import metrics as jm
from jaxplain import rules

NAME = "method_comparison"
SMOKE_METHODS = ("gradient", "grad x input", "IG (black)", "Grad-CAM", "WBP")
UNSIGNED = ("gradient", "SmoothGrad", "Grad-CAM")  # drawn with 'hot'; the rest signed (red +)
RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
         "gausslegendre")


def _settings(full: bool, smoke: bool) -> dict[str, Any]:
  if smoke:
    return dict(n=4, steps=5, ig_steps=4, sg_samples=4, orders=2, n_show=3,
                occ_patch=7, occ_stride=7, occ_chunk=None, stage_chunk=None, epochs=1)
  if full:
    return dict(n=270, steps=50, ig_steps=64, sg_samples=50, orders=16, n_show=8,
                occ_patch=4, occ_stride=2, occ_chunk=16, stage_chunk=1, epochs=None)
  return dict(n=32, steps=20, ig_steps=16, sg_samples=16, orders=4, n_show=6,
              occ_patch=4, occ_stride=4, occ_chunk=None, stage_chunk=None, epochs=None)



def lenet_split(params: dict):
  """``(features, head)`` of LeNet around the rectified ``conv2`` output (10x10x16).

  Grad-CAM (Selvaraju et al. 2017) weights rectified feature maps; the zoo's LeNet applies its
  ReLUs as functions, so ``layer="conv2"`` in :func:`jaxplain.grad_cam` would capture the
  pre-activation. ``head(features(x))`` equals the model's logits (checked in :func:`run`).
  """
  import flax.linen as nn
  from jaxplain.models import max_pool_2x2

  def conv(name, z, padding):
    k = params[name]["kernel"]
    return nn.Conv(k.shape[-1], k.shape[:2], padding=padding).apply({"params": params[name]}, z)

  def dense(name, a):
    return nn.Dense(params[name]["kernel"].shape[-1]).apply({"params": params[name]}, a)

  def features(z):
    z = max_pool_2x2(nn.relu(conv("conv1", z, "SAME")))
    return nn.relu(conv("conv2", z, "VALID"))

  def head(a):
    a = max_pool_2x2(a)
    a = a.reshape(a.shape[0], -1)
    return dense("fc3", nn.relu(dense("fc2", nn.relu(dense("fc1", a)))))

  return features, head


def methods(model, cfg: dict, key: jax.Array) -> dict[str, tuple[Callable, str]]:
  """name -> (explain(params, x, t) -> attribution, channel reduction for the pixel map)."""
  def fwd(p):
    return lambda z: model.apply({"params": p}, z)

  return {
      "gradient": (lambda p, x, t: jaxplain.gradient(fwd(p), x, t), "sum_abs"),
      "grad x input": (lambda p, x, t: jaxplain.gradient_x_input(fwd(p), x, t), "sum"),
      "SmoothGrad": (lambda p, x, t: jaxplain.smoothgrad(
          fwd(p), x, t, key=key, num_samples=cfg["sg_samples"]), "sum_abs"),
      "IG (black)": (lambda p, x, t: jaxplain.integrated_gradients(
          fwd(p), x, t, baseline="black", steps=cfg["ig_steps"]), "sum"),
      "Grad-CAM": (lambda p, x, t: jaxplain.grad_cam(lenet_split(p), None, x, t), "sum"),
      "occlusion": (lambda p, x, t: jaxplain.occlusion(
          fwd(p), x, t, patch=cfg["occ_patch"], stride=cfg["occ_stride"],
          chunk=cfg["occ_chunk"]), "sum"),
      "WBP": (lambda p, x, t: rules.wbp(fwd(p), x, t), "sum"),
      "LRP (epsilon)": (lambda p, x, t: rules.lrp(fwd(p), x, t), "sum"),
  }


def _figures(out: pathlib.Path, x, maps: dict[str, np.ndarray], fractions, curves, sanity,
             layer_names, n_show: int) -> list[str]:
  from matplotlib.figure import Figure
  from jaxplain import plot as jplot

  folder = out / NAME
  folder.mkdir(parents=True, exist_ok=True)
  figs = []
  # methods x examples grid
  signed = [n for n in maps if n not in UNSIGNED]
  fig = jplot.method_grid(np.asarray(x[:n_show]), {n: m[:n_show] for n, m in maps.items()},
                          signed=signed, normalization="minmax", cell=1.2)
  p = folder / "methods_grid.png"
  jplot.save_png(fig, p, dpi=70)
  figs.append(str(p.relative_to(out)))
  # deletion / insertion curves
  fig = Figure(figsize=(9, 3.4))
  for ax, kind in zip(fig.subplots(1, 2), ("deletion", "insertion")):
    jplot.curves(curves[kind], fractions=fractions, ax=ax, title=kind, ylabel="p(class)",
                 xlabel="fraction of pixels " + ("removed" if kind == "deletion" else "inserted"))
  p = folder / "deletion_insertion.png"
  jplot.save_png(fig, p, dpi=80)
  figs.append(str(p.relative_to(out)))
  # sanity check
  fig = Figure(figsize=(9, 3.4))
  for ax, key in zip(fig.subplots(1, 2), ("spearman", "ssim")):
    jplot.randomisation(sanity, layer_names, key=key, ax=ax,
                        title="cascading randomisation" if key == "spearman" else None)
  p = folder / "sanity_check.png"
  jplot.save_png(fig, p, dpi=80)
  figs.append(str(p.relative_to(out)))
  return figs


def run(out_dir: pathlib.Path, *, full: bool = False, smoke: bool = False,
        seed: int = 0) -> dict:
  """Run the comparison; return ``{"metrics", "figures", "summary"}`` (experiments/README.md)."""
  from experiments.common import get_trained, md_table, pick_round_robin

  out = pathlib.Path(out_dir)
  cfg = _settings(full, smoke)
  t0 = time.perf_counter()
  model, variables, data = get_trained("lenet", seed=seed, out_dir=out, epochs=cfg["epochs"],
                                       progress=not smoke)
  params = variables["params"]
  f = jax.jit(lambda z: model.apply({"params": params}, z))
  x, y = pick_round_robin(data["test"], cfg["n"])
  x = jnp.asarray(x)
  pred = jnp.argmax(f(x), -1)
  feats, head = lenet_split(params)
  np.testing.assert_allclose(np.asarray(head(feats(x))), np.asarray(f(x)), rtol=1e-4, atol=1e-4)
  accuracy = float(jnp.mean(pred == jnp.asarray(y)))
  key = jax.random.key(seed)
  meths = methods(model, cfg, jax.random.fold_in(key, 1))
  if smoke:  # fewer compilations; the fast and full settings run every method
    meths = {n: v for n, v in meths.items() if n in SMOKE_METHODS}

  # -- sanity check (cascading randomisation, Adebayo et al. 2018), one jitted cascade per
  # method on every image; its stage 0 (the trained model) gives the maps for the deletion
  # and insertion curves
  init_key = jax.random.key(seed + 1000)
  random_params = model.init(init_key, x[:1])["params"]
  layers = jm.cascade_layers(params, model=model, x=x[:1])  # the model's execution order
  maps, sanity, seconds = {}, {}, {}
  for name, (explain, reduce) in _progress.iterate(meths.items(),
                                                  desc="methods + sanity check",
                                                  disable=smoke):
    fn = jax.jit(lambda p, rp, x, t, explain=explain:
                 jm.cascading_randomization(explain, p, x, t, random_params=rp, layers=layers,
                                            reduce="sum_abs", chunk=cfg["stage_chunk"]))
    t1 = time.perf_counter()
    r = fn(params, random_params, x, pred)
    sanity[name] = {"spearman": np.asarray(r["spearman"]), "ssim": np.asarray(r["ssim"]),
                    "spearman_signed": np.asarray(r["spearman_signed"])}
    maps[name] = np.asarray(r["maps"][0] if reduce == "sum_abs" else r["maps_signed"][0])
    seconds[name] = time.perf_counter() - t1
  n_pix = x.shape[1] * x.shape[2]
  fractions = jm.step_fractions(cfg["steps"], n_pix)
  rand = [np.asarray(jm.random_saliency(jax.random.fold_in(key, 100 + i), x))
          for i in range(cfg["orders"])]

  # -- deletion / insertion: all methods and random orders stacked into one batch
  names = list(maps)
  stacked = jnp.asarray(np.concatenate([maps[n] for n in names] + rand))
  reps = len(names) + len(rand)
  xs, ts = jnp.tile(x, (reps, 1, 1, 1)), jnp.tile(pred, reps)
  b = x.shape[0]

  @jax.jit
  def curves_fn(xs, ts, sal):
    kw = dict(steps=cfg["steps"], value=0.0, chunk=None)
    return (jm.deletion_curve(f, xs, ts, sal, output="probability", **kw),
            jm.insertion_curve(f, xs, ts, sal, output="probability", **kw),
            jm.deletion_curve(f, xs, ts, sal, output="logit", **kw))

  dele, ins, dele_logit = (np.asarray(c) for c in curves_fn(xs, ts, stacked))

  def split(c):
    per = {n: c[i * b:(i + 1) * b] for i, n in enumerate(names)}
    per["random"] = c[len(names) * b:].reshape(len(rand), b, -1).mean(0)
    return per
  curves = {"deletion": split(dele), "insertion": split(ins), "deletion_logit": split(dele_logit)}
  auc = {k: {n: np.asarray(jm.area_under_curve(c, fractions)) for n, c in v.items()}
         for k, v in curves.items()}

  # -- IG quadrature rules: completeness gap and deletion AUC at the same step count
  ig_rules = {}
  delta = np.asarray(jnp.take_along_axis(f(x) - f(jnp.zeros_like(x)), pred[:, None], 1)[:, 0])
  del_fn = jax.jit(lambda sal: jm.deletion_curve(f, x, pred, sal, steps=cfg["steps"],
                                                 output="probability"))
  for rule in (RULES[-2:] if smoke else RULES):
    fn = jax.jit(lambda x, t, rule=rule: jaxplain.integrated_gradients(
        f, x, t, baseline="black", steps=max(cfg["ig_steps"], 2), method=rule))
    att = fn(x, pred)
    gap = np.abs(np.asarray(jaxplain.completeness_gap(f, x, pred, att, baseline="black")))
    d = del_fn(jm.pixel_saliency(att, reduce="sum"))
    ig_rules[rule] = {
        "mean_abs_gap": float(np.mean(gap)),
        "mean_relative_gap": float(np.mean(gap / np.maximum(np.abs(delta), 1e-6))),
        "deletion_auc": float(np.mean(np.asarray(jm.area_under_curve(d, fractions)))),
    }

  # -- the explainer x metric grid of jaxplain.evaluate (issue 16): faithfulness correlation,
  # max-sensitivity, sparseness, complexity and the deletion AUC of |map| in one sharded,
  # jitted pass per batch over the same images
  ev = jaxplain.evaluate(
      {n: (lambda x, t, e=e: e(params, x, t)) for n, (e, _) in meths.items()},
      jaxplain.evaluation.default_metrics(steps=cfg["steps"], n_samples=cfg["orders"]),
      (np.asarray(x), np.asarray(pred)), f=lambda z: model.apply({"params": params}, z),
      key=jax.random.fold_in(key, 7), batch_size=64, progress=not smoke)

  layer_names = ["trained", *layers]
  figs = _figures(out, x, maps, fractions, curves, sanity, layer_names, min(cfg["n_show"], b))

  # -- metrics and summary
  rows, met_methods = [], {}
  for name in names + ["random"]:
    m = {"deletion_auc": float(auc["deletion"][name].mean()),
         "insertion_auc": float(auc["insertion"][name].mean()),
         "deletion_auc_logit": float(auc["deletion_logit"][name].mean())}
    if name in sanity:
      sp, ss = sanity[name]["spearman"].mean(1), sanity[name]["ssim"].mean(1)
      sps = sanity[name]["spearman_signed"].mean(1)
      m.update(sanity_spearman=sp.tolist(), sanity_spearman_signed=sps.tolist(),
               sanity_ssim=ss.tolist(), seconds_with_compile=seconds[name])
      rows.append([name, m["deletion_auc"], m["insertion_auc"], m["deletion_auc_logit"],
                   float(sp[1]), float(sp[-1]), float(sps[-1]), float(ss[-1])])
    else:
      rows.append([name, m["deletion_auc"], m["insertion_auc"], m["deletion_auc_logit"],
                   "-", "-", "-", "-"])
    met_methods[name] = m
  beats = [n for n in names if met_methods[n]["deletion_auc"] < met_methods["random"]
           ["deletion_auc"] and met_methods[n]["insertion_auc"] > met_methods["random"]
           ["insertion_auc"]]
  best_del = min(names, key=lambda n: met_methods[n]["deletion_auc"])
  best_ins = max(names, key=lambda n: met_methods[n]["insertion_auc"])
  passed = [n for n in names if met_methods[n]["sanity_spearman"][-1] < 0.5]
  failed = [n for n in names if n not in passed]
  wbp_gxi = float(np.max(np.abs(maps["WBP"] - maps["grad x input"]))
                  / max(np.max(np.abs(maps["grad x input"])), 1e-12))
  summary = "\n".join([
      f"LeNet on the embedded digits (test accuracy on these {b} images: {accuracy:.3f}); "
      f"{b} test images, target = predicted class, {len(fractions)} steps, removal/insertion "
      f"value 0 (black), random baseline = mean of {cfg['orders']} keyed orders. Sanity check "
      f"on the same images, layers re-initialised from the top (fresh Flax initialisation): "
      f"{', '.join(layers)}.",
      "",
      md_table(["method", "deletion AUC (p), lower = better",
                 "insertion AUC (p), higher = better", "deletion AUC (logit)",
                 f"Spearman abs, {layers[0]} random", "Spearman abs, all random",
                 "Spearman signed, all random", "SSIM abs, all random"], rows),
      "",
      f"- Beat the random order on both deletion and insertion: {', '.join(beats) or 'none'}. "
      f"Best deletion: {best_del}; best insertion: {best_ins}.",
      f"- Sanity check (mean Spearman of |map| < 0.5 once every layer is re-initialised; "
      f"Adebayo et al. compare absolute-value maps): passed by "
      f"{', '.join(passed) or 'none'}; not passed by {', '.join(failed) or 'none'}.",
      ("- The maps that vanish where x = 0 (gradient x input, IG-black, WBP, LRP, and "
       "occlusion with a black patch) keep the digit's outline after full re-initialisation, "
       "as Adebayo et al. report for gradient x input; "
       "their signed maps decorrelate (column 'Spearman signed'). Pure gradient maps and "
       "Grad-CAM lose the structure." if failed else
       "- Every method's |map| decorrelates from the trained model's."),
      f"- WBP vs gradient x input (ReLU, max-pool, conv, dense network; SPEC section 3 says "
      f"they are equal): max relative difference of the pixel maps {wbp_gxi:.2e}, so their "
      f"rows coincide. LRP-epsilon tends to gradient x input as epsilon -> 0 on ReLU networks "
      f"(Ancona et al. 2018); with epsilon = 1e-6 its row is nearly identical.",
      "",
      "IG quadrature rules (black baseline, "
      f"{max(cfg['ig_steps'], 2)} steps): completeness gap = sum IG - (f(x)[t] - f(0)[t]) "
      "(jaxplain.completeness_gap)",
      "",
      md_table(["rule", "mean abs gap", "mean abs gap / abs(f(x)[t] - f(0)[t])",
                 "deletion AUC (p)"],
                [[r, v["mean_abs_gap"], v["mean_relative_gap"], v["deletion_auc"]]
                 for r, v in ig_rules.items()]),
      "",
      f"jaxplain.evaluate over the same {ev['n']} images ({ev['devices']} device(s); "
      f"deletion AUC of |map| on p(class), lower = better; faithfulness correlation, higher "
      f"= better; max-sensitivity ({cfg['orders']} perturbations of radius 0.05), lower = "
      f"more robust; sparseness (Gini) and complexity (entropy) of |map|):",
      "",
      jaxplain.evaluation.to_table(ev, digits=3),
  ])
  metrics = {"model": "lenet", "num_images": int(b), "accuracy": accuracy,
             "fractions": fractions.tolist(), "methods": met_methods,
             "sanity_layers": layer_names, "ig_rules": ig_rules,
             "wbp_vs_gxi_max_rel_diff": wbp_gxi, "beats_random": beats,
             "evaluation": ev["mean"],
             "sanity_passed": passed, "seconds": time.perf_counter() - t0}
  return {"metrics": metrics, "figures": figs, "summary": summary}


if __name__ == "__main__":
  from experiments.common import cli
  cli(run, __doc__)
