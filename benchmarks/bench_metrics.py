"""jaxplain.evaluation vs Quantus 0.6.0, and jaxplain.kernel_shap vs Captum KernelShap.

The 32x32x3 SmallCNN (``jaxplain.models.SmallCNN``) with identical weights on both sides
(drawn once by NumPy, copied into Flax and into an equivalent torch module), N random images,
the model's own predictions as targets and one fixed attribution array for the metrics that
take one. Every contender runs in its own process, alternating A B A B
(``benchmarks/_runner.py``). Metrics and their settings:

* pixel flipping: 64 elements (of 3072) removed per step, baseline 0, logits, no
  normalisation (Quantus ``PixelFlipping(features_in_step=64, perturb_baseline=0.0,
  normalise=False)``; ours ``evaluation.pixel_flipping(steps=[64, 128, ..., 3072])``).
  Same definition: the curves are compared element by element.
* ROAD: percentages 12.5, 25, ..., 87.5 of the 1024 pixels (counts that are exact on both
  sides), noise 0.01, accuracy. Same definition (Quantus: exact ``spsolve``; ours: conjugate
  gradients). Quantus 0.6's ROAD raises an IndexError on RGB images with a pixel map (it
  ranks channel-pixels and indexes pixels with them), so its own imputation is called through
  a wrapper on pixel indices (``_road_perturb``). The noise draws differ (NumPy's global RNG vs
  a JAX key), and Quantus returns only the mean accuracy per percentage: the two mean curves
  are compared.
* max-sensitivity: the input gradient of the target logit, ``n_samples`` uniform
  perturbations of radius 0.2, Frobenius norm of the difference over that of the map. Same
  definition, different noise draws: the means are reported.
* sparseness: the Gini index of ``|a|`` (Quantus ``normalise=True`` divides by the max,
  which does not change the Gini index; both add 1e-7). Same definition: compared.
* MPRT (cascading, top down, 5 layers + the original, Spearman rank correlation with the
  original map): Quantus re-initialises each layer with torch's ``reset_parameters`` and
  correlates ``|grad|`` over all 3072 elements after max-normalisation; ours
  (``cascading_randomization``) draws Gaussian weights with each leaf's own standard
  deviation and correlates the channel sums of ``|grad|`` (1024 pixels), all six stages in
  one ``vmap``. Different random weights and map reduction: timings compared, numbers only
  summarised.
* KernelSHAP: 64 superpixels (4x4 cells), ``n_samples`` coalitions per image, baseline 0.
  Captum fits a linear model with intercept on its own samples (empty and full coalitions
  with a large weight), one image per call with all samples in one forward batch; ours
  draws from the Shapley kernel and solves the constrained least squares for all images at
  once. Both estimate the Shapley values: the Pearson correlation of the two is reported.

    python benchmarks/bench_metrics.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks import _runner  # noqa: E402

NAME = "bench_metrics"
ROAD_PCT = [12.5, 25.0, 37.5, 50.0, 62.5, 75.0, 87.5]


# -- shared, framework-free data ----------------------------------------------------------------

def _weights(seed: int = 0) -> dict:
  r = np.random.default_rng(seed)
  def he(shape, fan_in):
    return (r.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
  shapes = {"conv1": ((3, 3, 3, 32), 27), "conv2": ((3, 3, 32, 64), 288),
            "conv3": ((3, 3, 64, 128), 576), "fc1": ((8 * 8 * 128, 256), 8192),
            "fc2": ((256, 10), 256)}
  return {k: {"kernel": he(s, fi), "bias": (0.01 * r.normal(size=s[-1])).astype(np.float32)}
          for k, (s, fi) in shapes.items()}


def _data(n: int, seed: int = 1):
  r = np.random.default_rng(seed)
  x = r.uniform(size=(n, 32, 32, 3)).astype(np.float32)
  a = r.normal(size=(n, 32, 32, 3)).astype(np.float32)
  return x, a


# -- jaxplain side ------------------------------------------------------------------------------

def _jax_model():
  import jax
  import jax.numpy as jnp
  from jaxplain.models import SmallCNN
  params = jax.tree_util.tree_map(jnp.asarray, _weights())
  model = SmallCNN()
  return (lambda p, x: model.apply({"params": p}, x)), params


def setup_jax(metric: str, n: int, n_samples: int = 10):
  import jax
  import jax.numpy as jnp
  import jaxplain
  from jaxplain import evaluation as E
  apply, params = _jax_model()
  xn, an = _data(n)
  x, a = jnp.asarray(xn), jnp.asarray(an)
  y = jnp.argmax(jax.jit(apply)(params, x), axis=-1).astype(jnp.int32)
  key = jax.random.key(0)
  # the weights are arguments of the jitted function, not constants folded into it
  if metric == "pixel_flipping":
    fn = jax.jit(lambda p, x, y, a: E.pixel_flipping(
        lambda z: apply(p, z), x, y, a, steps=list(range(64, 3073, 64)), chunk=8))
    args = (params, x, y, a)
  elif metric == "road":
    fn = jax.jit(lambda p, x, y, a, k: E.road(
        lambda z: apply(p, z), x, y, jnp.sum(a, -1), key=k, percentages=ROAD_PCT,
        noise=0.01, chunk=2))
    args = (params, x, y, a, key)
  elif metric == "max_sensitivity":
    fn = jax.jit(lambda p, x, y, k: E.max_sensitivity(
        lambda z, t: jaxplain.gradient(lambda u: apply(p, u), z, t), x, y, key=k,
        n_samples=n_samples, radius=0.2, chunk=5))
    args = (params, x, y, key)
  elif metric == "sparseness":
    fn = jax.jit(E.sparseness)
    args = (a,)
  elif metric == "mprt":
    ex = lambda p, x, t: jaxplain.gradient(lambda z: apply(p, z), x, t)
    fn = jax.jit(lambda p, x, y, k: jaxplain.cascading_randomization(
        ex, p, x, y, key=k, layers=["fc2", "fc1", "conv3", "conv2", "conv1"],
        chunk=2)["spearman"])
    args = (params, x, y, key)
  else:
    raise ValueError(metric)
  out = jax.block_until_ready(fn(*args))

  def run():
    jax.block_until_ready(fn(*args))
  return {"run": run, "info": {"result": np.asarray(out, np.float64).tolist()}}


def setup_jax_kernelshap(n: int, n_samples: int):
  import jax
  import jax.numpy as jnp
  import jaxplain
  apply, params = _jax_model()
  xn, _ = _data(n)
  x = jnp.asarray(xn)
  y = jnp.argmax(jax.jit(apply)(params, x), axis=-1).astype(jnp.int32)
  seg = jaxplain.perturbation.grid_segments((32, 32), 4)
  fn = jax.jit(lambda p, x, y, k: jaxplain.kernel_shap(
      lambda z: apply(p, z), x, y, key=k, n_samples=n_samples, feature_mask=seg,
      num_features=64, chunk=50))
  out = jax.block_until_ready(fn(params, x, y, jax.random.key(0)))
  per_seg = np.asarray(out)[:, ::4, ::4, 0].reshape(n, 64)

  def run():
    jax.block_until_ready(fn(params, x, y, jax.random.key(0)))
  return {"run": run, "info": {"result": per_seg.tolist()}}


# -- torch / Quantus / Captum side ------------------------------------------------------------

def _torch_model():
  import torch
  from torch import nn

  class TorchCNN(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
      self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
      self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
      self.fc1 = nn.Linear(8 * 8 * 128, 256)
      self.fc2 = nn.Linear(256, 10)

    def forward(self, x):                                  # x: (B, 3, 32, 32)
      x = torch.relu(self.conv1(x))
      x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
      x = torch.nn.functional.max_pool2d(torch.relu(self.conv3(x)), 2)
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)   # flatten in Flax's (H, W, C) order
      return self.fc2(torch.relu(self.fc1(x)))

  m = TorchCNN()
  w = _weights()
  with torch.no_grad():
    for name in ("conv1", "conv2", "conv3"):
      getattr(m, name).weight.copy_(torch.from_numpy(w[name]["kernel"].transpose(3, 2, 0, 1)))
      getattr(m, name).bias.copy_(torch.from_numpy(w[name]["bias"]))
    for name in ("fc1", "fc2"):
      getattr(m, name).weight.copy_(torch.from_numpy(w[name]["kernel"].T.copy()))
      getattr(m, name).bias.copy_(torch.from_numpy(w[name]["bias"]))
  return m.eval()


def _import_quantus():
  """Quantus imports zennit, whose torchvision module does not load with this torch; hide
  the optional frameworks from Quantus's ``find_spec`` checks while importing it."""
  import importlib.util as u
  find = u.find_spec
  u.find_spec = lambda name, *a, **k: (None if name.split(".")[0] in (
      "zennit", "torchvision", "tensorflow", "tf_explain") else find(name, *a, **k))
  try:
    import quantus
  finally:
    u.find_spec = find
  return quantus


def _torch_grad(model, inputs, targets, **kwargs):
  import torch
  del kwargs
  x = torch.tensor(np.asarray(inputs), dtype=torch.float32, requires_grad=True)
  out = model(x)
  out[torch.arange(x.shape[0]), torch.as_tensor(np.asarray(targets)).long()].sum().backward()
  return x.grad.detach().numpy()


def _road_perturb(arr, indices, **kwargs):
  """Quantus's own noisy linear imputation, on pixel indices.

  Quantus's ROAD broadcasts a (B, 1, H, W) pixel map to the channels and ranks the
  3 * H * W channel-pixels, then indexes H * W pixels with them (an IndexError on RGB). The
  three copies of a pixel tie, so they are adjacent in the ranking: with the percentages
  tripled and the indices taken modulo H * W, exactly p% of the pixels are imputed.
  """
  from quantus.functions.perturb_func import noisy_linear_imputation
  idx = np.unique(np.asarray(indices) % (arr.shape[1] * arr.shape[2]))
  return noisy_linear_imputation(arr=arr, indices=idx, **kwargs)


def setup_quantus(metric: str, n: int, n_samples: int = 10):
  import warnings
  import torch
  warnings.filterwarnings("ignore")
  quantus = _import_quantus()
  model = _torch_model()
  xn, an = _data(n)
  x = np.ascontiguousarray(xn.transpose(0, 3, 1, 2))
  a = np.ascontiguousarray(an.transpose(0, 3, 1, 2))
  with torch.no_grad():
    y = model(torch.from_numpy(x)).argmax(-1).numpy()
  common = dict(model=model, x_batch=x, y_batch=y, device="cpu", batch_size=n,
                channel_first=True)
  kw = dict(disable_warnings=True)
  if metric == "pixel_flipping":
    m = quantus.PixelFlipping(features_in_step=64, perturb_baseline=0.0, normalise=False,
                              abs=False, **kw)
    call = lambda: m(a_batch=a, softmax=False, **common)
  elif metric == "road":
    m = quantus.ROAD(percentages=[3 * p for p in ROAD_PCT], noise=0.01, normalise=False,
                     abs=False, perturb_func=_road_perturb, **kw)
    call = lambda: m(a_batch=a.sum(1, keepdims=True), softmax=False, **common)
  elif metric == "max_sensitivity":
    m = quantus.MaxSensitivity(nr_samples=n_samples, lower_bound=0.2, normalise=False,
                               abs=False, **kw)
    call = lambda: m(a_batch=None, explain_func=_torch_grad, softmax=False, **common)
  elif metric == "sparseness":
    m = quantus.Sparseness(**kw)
    call = lambda: m(a_batch=a, softmax=False, **common)
  elif metric == "mprt":
    m = quantus.MPRT(layer_order="top_down", return_average_correlation=False, **kw)
    call = lambda: m(a_batch=None, explain_func=_torch_grad, softmax=False, **common)
  else:
    raise ValueError(metric)
  out = call()
  if metric == "road":
    out = list(out.values()) if isinstance(out, dict) else list(m.evaluation_scores.values())
  elif metric == "mprt":
    out = [np.asarray(v, np.float64).tolist() for v in out.values()]
  return {"run": call, "info": {"result": np.asarray(out, np.float64).tolist()}}


def setup_captum_kernelshap(n: int, n_samples: int):
  import torch
  from captum.attr import KernelShap
  from jaxplain.perturbation import grid_segments
  model = _torch_model()
  xn, _ = _data(n)
  x = torch.from_numpy(np.ascontiguousarray(xn.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    y = model(x).argmax(-1)
  seg = torch.from_numpy(grid_segments((32, 32), 4).astype(np.int64))[None, None]
  ks = KernelShap(model)

  def call():
    outs = []
    for b in range(n):
      outs.append(ks.attribute(x[b:b + 1], target=int(y[b]), baselines=0.0,
                               feature_mask=seg.expand(1, 3, 32, 32), n_samples=n_samples,
                               perturbations_per_eval=n_samples))
    return torch.cat(outs)
  out = call()
  per_seg = out.numpy()[:, 0, ::4, ::4].reshape(n, 64)
  return {"run": call, "info": {"result": per_seg.tolist()}}


# -- driver ------------------------------------------------------------------------------------

def _agreement(metric: str, jx: np.ndarray, qt: Any) -> dict:
  if metric in ("pixel_flipping", "sparseness"):
    q = np.asarray(qt)
    return {"max_abs_diff": float(np.max(np.abs(jx - q))),
            "max_rel_diff": float(np.max(np.abs(jx - q)) / max(np.max(np.abs(q)), 1e-12))}
  if metric == "road":
    q = np.asarray(qt)                                   # Quantus: mean accuracy per step
    return {"max_abs_diff_of_mean_accuracy": float(np.max(np.abs(jx.mean(0) - q))),
            "jax_mean": jx.mean(0).round(4).tolist(), "quantus_mean": q.round(4).tolist()}
  if metric == "max_sensitivity":
    q = np.asarray(qt)
    return {"jax_mean": float(jx.mean()), "quantus_mean": float(q.mean())}
  if metric == "mprt":
    q = np.asarray(qt)                                   # (layers, N)
    return {"jax_mean_per_stage": jx.mean(1).tolist(),
            "quantus_mean_per_layer": q.mean(1).tolist()}
  return {}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="32 images, 2 rounds (~ minutes)")
  ap.add_argument("--n", type=int, default=None)
  ap.add_argument("--rounds", type=int, default=None)
  args = ap.parse_args(argv)
  n = args.n or (32 if args.quick else 256)
  rounds = args.rounds or (2 if args.quick else 3)
  ns = 10
  ks_n, ks_samples = (4, 200) if args.quick else (16, 200)
  t0 = time.time()
  lines = [f"# {NAME}", "", f"SmallCNN 32x32x3, N = {n} images, {rounds} rounds alternating "
           f"A B, 1 timed call per process; KernelSHAP on {ks_n} images, {ks_samples} "
           f"samples, 64 superpixels.", ""]
  summary: dict[str, Any] = {"n": n, "rounds": rounds}
  for metric in ("pixel_flipping", "road", "max_sensitivity", "sparseness", "mprt"):
    kw = dict(metric=metric, n=n, n_samples=ns)
    res = _runner.compare({
        "jaxplain": _runner.Contender("benchmarks.bench_metrics:setup_jax", kw),
        "quantus": _runner.Contender("benchmarks.bench_metrics:setup_quantus", kw),
    }, rounds=rounds, repeats=1)
    r = _runner.ratio(res, "quantus", "jaxplain")
    agree = _agreement(metric, np.asarray(res["jaxplain"]["info"]["result"]),
                       res["quantus"]["info"]["result"])
    lines += [_runner.table(res, title=metric), "",
              f"quantus / jaxplain = {r['ratio']:.2f} (per round "
              f"{', '.join(f'{v:.2f}' for v in r['per_round'])})", "",
              "agreement: " + json.dumps(agree), ""]
    summary[f"quantus_over_{metric}"] = r["ratio"]
    summary[f"jaxplain_{metric}_s"] = res["jaxplain"]["median"]
    summary[f"quantus_{metric}_s"] = res["quantus"]["median"]
    summary[f"agreement_{metric}"] = agree
    print("\n".join(lines[-6:]), flush=True)
  kw = dict(n=ks_n, n_samples=ks_samples)
  res = _runner.compare({
      "jaxplain": _runner.Contender("benchmarks.bench_metrics:setup_jax_kernelshap", kw),
      "captum": _runner.Contender("benchmarks.bench_metrics:setup_captum_kernelshap", kw),
  }, rounds=rounds, repeats=1)
  r = _runner.ratio(res, "captum", "jaxplain")
  jx = np.asarray(res["jaxplain"]["info"]["result"])
  cp = np.asarray(res["captum"]["info"]["result"])
  corr = float(np.mean([np.corrcoef(jx[b], cp[b])[0, 1] for b in range(len(jx))]))
  lines += [_runner.table(res, title="KernelSHAP"), "",
            f"captum / jaxplain = {r['ratio']:.2f} (per round "
            f"{', '.join(f'{v:.2f}' for v in r['per_round'])}); mean Pearson correlation of "
            f"the two estimates per image: {corr:.3f}", ""]
  summary["kernelshap_over_captum"] = r["ratio"]
  summary["kernelshap_correlation"] = corr
  summary["jaxplain_kernelshap_s"] = res["jaxplain"]["median"]
  summary["captum_kernelshap_s"] = res["captum"]["median"]
  summary["wall_s"] = time.time() - t0
  print("\n".join(lines[-4:]), flush=True)
  lines += ["Definitions and differences: see the module docstring of "
            "benchmarks/bench_metrics.py.", ""]
  (ROOT / "benchmarks" / f"{NAME}.md").write_text("\n".join(lines))
  keys = ["quantus_over_pixel_flipping", "quantus_over_road", "quantus_over_max_sensitivity",
          "quantus_over_mprt", "kernelshap_over_captum"]
  out = {k: summary[k] for k in keys}
  out.update({k: v for k, v in summary.items() if k not in keys and not k.startswith("agree")})
  print(json.dumps(out))


if __name__ == "__main__":
  main()
