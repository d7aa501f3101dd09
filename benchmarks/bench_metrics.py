"""jaxplain.evaluation vs Quantus 0.6.0, and jaxplain.kernel_shap vs Captum KernelShap.

The 32x32x3 SmallCNN (``jaxplain.models.SmallCNN``) with identical weights on both sides
(drawn once by NumPy, copied into Flax and into an equivalent torch module), N random images,
the model's own predictions as targets and one fixed attribution array for the metrics that
take one. Every contender runs in its own process, alternating A B A B
(``benchmarks/_runner.py``). Both sides are timed warm, as they are used: ours jitted and
compiled by one untimed call; Quantus called once on all N images in one batch
(``batch_size=N``, its fastest use), after an untimed call on the first 32 images that also
gives the numbers compared with ours. Metrics and their settings:

* pixel flipping: 64 elements (of 3072) removed per step, baseline 0, logits, no
  normalisation (Quantus ``PixelFlipping(features_in_step=64, perturb_baseline=0.0,
  normalise=False)``; ours ``evaluation.pixel_flipping(steps=[64, 128, ..., 3072])``).
  Same definition: the curves are compared element by element.
* ROAD: percentages 12.5, 25, ..., 87.5 of the 1024 pixels (counts that are exact on both
  sides), noise 0.01, accuracy. Same definition (Quantus: exact ``spsolve``; ours: conjugate
  gradients). Quantus 0.6's ROAD raises an IndexError on RGB images with a pixel map (it
  ranks channel-pixels and indexes pixels with them: re-checked this session, 2 images with a
  ``(B, 1, 32, 32)`` map and percentages 10, 50 give ``IndexError: index 1062 is out of
  bounds for axis 0 with size 1024``), so its own imputation is called through
  a wrapper on pixel indices (``_road_perturb``). The noise draws differ (NumPy's global RNG vs
  a JAX key), and Quantus returns only the mean accuracy per percentage: the two mean curves
  are compared.
* max-sensitivity: the input gradient of the target logit, ``n_samples`` = 10 uniform
  perturbations of radius 0.2 (all explained in one ``vmap``), Frobenius norm of the
  difference over that of the map. Same definition, different noise draws: the means are
  reported.
* sparseness: the Gini index of ``|a|`` (Quantus ``normalise=True`` divides by the max,
  which does not change the Gini index; both add 1e-7). Same definition: compared.
* MPRT (cascading, top down, 5 layers + the original, Spearman rank correlation with the
  original map): Quantus re-initialises each layer with torch's ``reset_parameters`` and
  correlates ``|grad|`` over all 3072 elements after max-normalisation; ours
  (``cascading_randomization``) draws Gaussian weights with each leaf's own standard
  deviation and correlates the channel sums of ``|grad|`` (1024 pixels), the six stages of
  one stacked parameter tree explained one after another (``chunk=1``, the fastest on CPU). Different random weights and map reduction: timings compared, numbers only
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
AGREE_N = 32               # images of the agreement check (Quantus's untimed first call)


PROFILE = """\
Measured in one process on the shared 2-core machine (load 5-14, so absolute times are only
indicative; 32 images unless stated). Both sides evaluate the model the same number of times
(pixel flipping 48 batches, ROAD 7, max-sensitivity 11 explanations, KernelSHAP 200 samples
per image; Quantus's MPRT explains the original twice, 7 explanations against our 6).

* Quantus 0.6 already batches: under cProfile 97 % of its pixel-flipping time is the 48 torch
  forward passes (0.23 s per 32-image batch against 0.05-0.08 s for the jitted Flax forward),
  and torch's backward dominates its max-sensitivity (10.4 of 16.9 s) and MPRT (5.3 of 10.2 s)
  and ROAD is half torch forwards, half scipy ``spsolve`` + LIL matrix building. So at equal
  model evaluations the ratio is about the ratio of the forward / backward speeds of XLA and
  torch on this CPU (3-4x forward, 4-6x backward): the issue's 20x is not reachable for the
  forward-bound metrics without evaluating the model fewer times, which would change the
  definitions.
* ours, warm and jitted, against the same number of plain jitted forwards in the same
  process: pixel flipping 2.94 s for 48 x 32 images vs 48 forwards of 32 at ~0.08 s (at its
  floor; ``chunk=8`` steps per call beat one vmap over all 48 steps, 4.3 s); ROAD 0.76 s with
  ``chunk=2`` (the batch's imputation by conjugate gradients is 0.15 s of it; ``None`` 1.28 s,
  ``7`` 1.18 s); KernelSHAP 2.84 s with ``chunk=50`` vs 2.66 s for one forward of the 800
  coalitions (``None`` 4.1 s).
* 2026-12-05: the perturbed copies of a chunk go through the model as one batch of
  ``chunk * B`` rows (``jaxplain/_batching.map_merged``) instead of a ``vmap`` over the
  model, which XLA:CPU ran 1.4-1.5x slower (SmallCNN forward, 1,024 images: 2.7-2.9 s vs
  1.9 s): pixel flipping 32.1 -> 22.4 s (142 -> 195 % CPU), ROAD 5.75 -> 4.79 s,
  max-sensitivity 13.9 -> 12.2 s, KernelSHAP 8.0 -> 5.9 s at the issue's size, same numbers.
  Pixel flipping is now at its forward floor (12,544 forwards in 22.4 s: 1.8 ms per image,
  as one plain batched forward), so the Quantus ratio there is torch's forward speed over
  XLA's.
* what changed in an earlier session: max-sensitivity's 10 perturbed copies in one ``vmap``
  (``chunk=None``: 1.9 s vs 5.1-5.6 s with ``chunk=1`` / ``5``, which run ``jax.lax.map``:
  a backward pass inside XLA's CPU while loop runs ~2.5x slower than outside; at 256 images
  23.8 s vs 51.5 s for ``chunk=5``, peak memory 3.4 GB vs 1.8 GB); MPRT's six
  stages one after another (``chunk=1``, now unrolled instead of ``jax.lax.map``: 1.36-1.41 s
  vs 4.75-4.97 s for one ``vmap`` over the stacked weights, which XLA lowers to grouped
  convolutions, and 4.0 s for ``chunk=2``; same numbers to 0.0); sparseness sorts the
  non-negative ``|a|`` as integer bit patterns (11 vs 47 ms for 32 maps, 73 vs 319 ms for
  256), and on the CPU with NumPy's sort through a callback (2026-12-06, ``--metrics
  sparseness --rounds 4``: 6.1 vs 30.7 ms for 256 maps, Quantus / jaxplain 44.2; XLA:CPU's
  sort of 256 x 3072 integers took 27 ms, NumPy's 3.8 ms). Compile times are not in the
  timings: MPRT's first call compiles for ~30 s under load (most of it the Gaussian draws of
  the ten weight leaves).
"""


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
        n_samples=n_samples, radius=0.2))                   # all samples in one vmap
    args = (params, x, y, key)
  elif metric == "sparseness":
    fn = jax.jit(E.sparseness)
    args = (a,)
  elif metric == "mprt":
    ex = lambda p, x, t: jaxplain.gradient(lambda z: apply(p, z), x, t)
    fn = jax.jit(lambda p, x, y, k: jaxplain.cascading_randomization(
        ex, p, x, y, key=k, layers=["fc2", "fc1", "conv3", "conv2", "conv1"],
        chunk=1)["spearman"])                               # stages one after another
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
  dev = next(model.parameters()).device
  x = torch.tensor(np.asarray(inputs), dtype=torch.float32, device=dev, requires_grad=True)
  out = model(x)
  t = torch.as_tensor(np.asarray(targets), device=dev).long()
  out[torch.arange(x.shape[0], device=dev), t].sum().backward()
  return x.grad.detach().cpu().numpy()


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


def setup_quantus(metric: str, n: int, n_samples: int = 10, device: str = "cpu"):
  import warnings
  import torch
  warnings.filterwarnings("ignore")
  quantus = _import_quantus()
  model = _torch_model().to(device)
  xn, an = _data(n)
  x = np.ascontiguousarray(xn.transpose(0, 3, 1, 2))
  a = np.ascontiguousarray(an.transpose(0, 3, 1, 2))
  with torch.no_grad():
    y = model(torch.from_numpy(x).to(device)).argmax(-1).cpu().numpy()
  kw = dict(disable_warnings=True)
  if metric == "pixel_flipping":
    m = quantus.PixelFlipping(features_in_step=64, perturb_baseline=0.0, normalise=False,
                              abs=False, **kw)
    a_in, ex = a, {}
  elif metric == "road":
    m = quantus.ROAD(percentages=[3 * p for p in ROAD_PCT], noise=0.01, normalise=False,
                     abs=False, perturb_func=_road_perturb, **kw)
    a_in, ex = a.sum(1, keepdims=True), {}
  elif metric == "max_sensitivity":
    m = quantus.MaxSensitivity(nr_samples=n_samples, lower_bound=0.2, normalise=False,
                               abs=False, **kw)
    a_in, ex = None, {"explain_func": _torch_grad}
  elif metric == "sparseness":
    m = quantus.Sparseness(**kw)
    a_in, ex = a, {}
  elif metric == "mprt":
    m = quantus.MPRT(layer_order="top_down", return_average_correlation=False, **kw)
    a_in, ex = None, {"explain_func": _torch_grad}
  else:
    raise ValueError(metric)

  def run_on(k):          # the first k images, all in one batch (Quantus's fastest use)
    return m(model=model, x_batch=x[:k], y_batch=y[:k],
             a_batch=None if a_in is None else a_in[:k], device=device, batch_size=k,
             channel_first=True, softmax=False, **ex)
  # the numbers compared with ours come from the first AGREE_N images (this call also warms
  # torch up); the timed call runs all n
  out = run_on(min(n, AGREE_N))
  call = lambda: run_on(n)
  if metric == "road":
    out = list(out.values()) if isinstance(out, dict) else list(m.evaluation_scores.values())
  elif metric == "mprt":
    out = [np.asarray(v, np.float64).tolist() for v in out.values()]
  return {"run": call, "info": {"result": np.asarray(out, np.float64).tolist()}}


def setup_captum_kernelshap(n: int, n_samples: int, device: str = "cpu"):
  import torch
  from captum.attr import KernelShap
  from jaxplain.perturbation import grid_segments
  model = _torch_model().to(device)
  xn, _ = _data(n)
  x = torch.from_numpy(np.ascontiguousarray(xn.transpose(0, 3, 1, 2))).to(device)
  with torch.no_grad():
    y = model(x).argmax(-1)
  seg = torch.from_numpy(grid_segments((32, 32), 4).astype(np.int64))[None, None].to(device)
  ks = KernelShap(model)

  def call():
    outs = []
    for b in range(n):
      outs.append(ks.attribute(x[b:b + 1], target=int(y[b]), baselines=0.0,
                               feature_mask=seg.expand(1, 3, 32, 32), n_samples=n_samples,
                               perturbations_per_eval=n_samples))
    return torch.cat(outs)
  out = call()
  per_seg = out.cpu().numpy()[:, 0, ::4, ::4].reshape(n, 64)
  return {"run": call, "info": {"result": per_seg.tolist()}}


# -- driver ------------------------------------------------------------------------------------

def _agreement(metric: str, jx: np.ndarray, qt: Any) -> dict:
  k = min(AGREE_N, jx.shape[1] if metric == "mprt" else jx.shape[0])
  jx = jx[:, :k] if metric == "mprt" else jx[:k]         # Quantus's numbers: first k images
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
  ap.add_argument("--quick", action="store_true",
                  help="16 images, 2 rounds (~4 min quiet; full run: 256 images, ~25 min)")
  ap.add_argument("--n", type=int, default=None)
  ap.add_argument("--rounds", type=int, default=None)
  ap.add_argument("--metrics", default=None,
                  help="comma-separated subset of pixel_flipping,road,max_sensitivity,"
                       "sparseness,mprt,kernelshap (printed only: the .md table is written "
                       "by full runs)")
  args = ap.parse_args(argv)
  every = ("pixel_flipping", "road", "max_sensitivity", "sparseness", "mprt", "kernelshap")
  chosen = every if args.metrics is None else tuple(args.metrics.split(","))
  if set(chosen) - set(every):
    ap.error(f"--metrics: unknown {sorted(set(chosen) - set(every))}; choose from {every}")
  n = args.n or (16 if args.quick else 256)
  rounds = args.rounds or 2
  ns = 10
  ks_n, ks_samples = (4, 200) if args.quick else (16, 200)
  t0 = time.time()
  lines = [f"# {NAME}", "", f"SmallCNN 32x32x3, N = {n} images, {rounds} rounds alternating "
           f"A B, 1 timed call per process; KernelSHAP on {ks_n} images, {ks_samples} "
           f"samples, 64 superpixels.", ""]
  summary: dict[str, Any] = {"n": n, "rounds": rounds}
  for metric in every[:-1]:
    if metric not in chosen:
      continue
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
  if args.metrics is not None:
    if "kernelshap" in chosen:
      _kernelshap(summary, lines, ks_n, ks_samples, rounds)
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("agree")}))
    return
  _kernelshap(summary, lines, ks_n, ks_samples, rounds)
  summary["wall_s"] = time.time() - t0
  lines += [f"Wall time of this run: {summary['wall_s']:.0f} s (load average now "
            f"{_runner.load_average()}).", "",
            "## What bounds each metric (profile)", "", PROFILE, "",
            "## Definitions, settings and differences", "",
            "(the module docstring of benchmarks/bench_metrics.py)", "",
            __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0], ""]
  (ROOT / "benchmarks" / f"{NAME}.md").write_text("\n".join(lines))
  keys = ["quantus_over_pixel_flipping", "quantus_over_road", "quantus_over_max_sensitivity",
          "quantus_over_mprt", "kernelshap_over_captum"]
  out = {k: summary[k] for k in keys}
  out.update({k: v for k, v in summary.items() if k not in keys and not k.startswith("agree")})
  print(json.dumps(out))


def _kernelshap(summary: dict, lines: list, n: int, n_samples: int, rounds: int) -> None:
  kw = dict(n=n, n_samples=n_samples)
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
  print("\n".join(lines[-4:]), flush=True)


if __name__ == "__main__":
  main()
