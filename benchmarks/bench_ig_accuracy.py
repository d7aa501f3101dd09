"""IG to a requested accuracy: the time until EVERY example of a batch has a completeness gap
|sum_i IG_i - (f(x)[t] - f(x')[t])| <= max(tol * |f(x)[t] - f(x')[t]|, ATOL), for tol = 1 %
and 0.1 %.

Contenders, each in its own process, alternating A B A B (benchmarks/_runner.py):

- ``adaptive``: ``jaxplain.integrated_gradients(..., tol=tol)`` under ``jax.jit`` (the
  ``lax.while_loop`` driver), ``adaptive_host`` (the host driver over jitted levels, only
  the examples not yet converged are evaluated at each level) and ``adaptive_local`` (the
  host driver that bisects only the intervals with the largest local gaps).
- ``exact``: ``method="exact"`` (breakpoints of the piecewise-linear network along the path,
  exact integral); its gap is float rounding, so it meets both tolerances.
- ``captum``: Captum ``IntegratedGradients`` (Gauss-Legendre) at the smallest ``n_steps``
  (one for the whole batch) for which every example meets the tolerance. That ``n_steps`` is
  searched in the Captum process before timing (doubling from 4, then bisection; --quick:
  doubling only) and only the final call is timed: the search is free for Captum.
- ``all`` vs ``loop10``: ``target="all"`` (10 maps per example, one shared forward per path
  point) vs 10 calls with one target each (Gauss-Legendre, ``STEPS_ALL`` steps, jitted).

Models: jaxplain.models.SmallCNN (32x32x3, uniform random inputs, targets b mod 10; its
biases are drawn N(0, 0.1^2) because at flax's zero-bias init a ReLU network is positively
homogeneous along a black-baseline path, the integrand is constant and every rule is exact)
and a trained jaxplain.models.LeNet (experiments.common.get_trained("lenet"): 8 epochs of
jaxplain.train.fit on the embedded digits; trained once into outputs/checkpoints/ and
restored after that; test images, true labels). Black baseline. The torch ports get the flax
weights and their logits are checked against flax's before timing.

  python benchmarks/bench_ig_accuracy.py            # B = 64, 3 rounds
  python benchmarks/bench_ig_accuracy.py --quick    # B = 8, 1 round; tolerances on LeNet
                                                    # only, target="all" on the SmallCNN

Writes benchmarks/bench_ig_accuracy.md and ends with one JSON line: captum_over_adaptive_1pct,
captum_over_adaptive_01pct (Captum time / jaxplain adaptive time, the faster driver, worst
over the two models), captum_over_exact (Captum at 0.1 % / exact, LeNet), all_targets_speedup
(10 calls / target="all", SmallCNN), and the per-model medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import _runner  # noqa: E402

HERE = "benchmarks.bench_ig_accuracy"
ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLS = {"1pct": 1e-2, "01pct": 1e-3}
ATOL = 1e-6
MAX_STEPS = 4097  # adaptive: at most 2^12 + 1 nodes; Captum: n_steps <= 4096
STEPS_ALL = 16
NOTES = "<!-- notes: kept across runs -->"


# ---- the two problems (built identically in every process) -------------------------------

def problem(model: str, b: int):
  """(f, params, x (B, H, W, C) float32 numpy, t (B,) int32 numpy)."""
  import jax
  import jax.numpy as jnp
  from jaxplain import models
  if model == "smallcnn":
    net = models.SmallCNN()
    v = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: (jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype)
                      if "bias" in jax.tree_util.keystr(p) else a), v["params"])
    x = np.random.default_rng(0).uniform(size=(b, 32, 32, 3)).astype(np.float32)
    t = (np.arange(b) % 10).astype(np.int32)
  elif model == "lenet":
    from experiments import common
    net, v, data = common.get_trained("lenet", out_dir=ROOT / "outputs", progress=False)
    params = v["params"]
    x, t = data["test"]["image"][:b], data["test"]["label"][:b].astype(np.int32)
  else:
    raise ValueError(f"model: expected 'smallcnn' or 'lenet', got {model!r}")
  f = functools.partial(net.apply, {"params": params})
  return f, params, x, t


def torch_net(model: str, params):
  import torch
  from torch import nn
  if model == "smallcnn":
    from benchmarks.bench_attribution import torch_model
    return torch_model(params)

  class ToNHWC(nn.Module):
    def forward(self, x):
      return x.permute(0, 2, 3, 1)

  net = nn.Sequential(
      nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
      nn.ReLU(), nn.MaxPool2d(2), ToNHWC(), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
      nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
  with torch.no_grad():
    for mod, name in ((net[0], "conv1"), (net[3], "conv2")):
      k = np.asarray(params[name]["kernel"])  # (kh, kw, in, out)
      mod.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
      mod.bias.copy_(torch.from_numpy(np.asarray(params[name]["bias"])))
    for mod, name in ((net[8], "fc1"), (net[10], "fc2"), (net[12], "fc3")):
      mod.weight.copy_(torch.from_numpy(np.asarray(params[name]["kernel"]).T.copy()))
      mod.bias.copy_(torch.from_numpy(np.asarray(params[name]["bias"])))
  return net.eval()


def _met(gap, delta, tol):
  return np.abs(np.asarray(gap, np.float64)) <= np.maximum(tol * np.abs(delta), ATOL)


def _delta(f, x, t):
  import jax.numpy as jnp
  y, y0 = np.asarray(f(jnp.asarray(x)), np.float64), np.asarray(f(jnp.zeros_like(x)), np.float64)
  i = np.arange(len(t))
  return y[i, t] - y0[i, t]


_DRIVER_KEY = {"while": "adaptive_{}", "host": "adaptive_host_{}", "local": "adaptive_local_{}"}

# ---- contenders ----------------------------------------------------------------------------

def setup_adaptive(model: str, b: int, tol: float, driver: str = "while"):
  import jax
  import jax.numpy as jnp
  import jaxplain
  f, _, x_np, t_np = problem(model, b)
  x, t = jnp.asarray(x_np), jnp.asarray(t_np)

  def ig(x, t):
    return jaxplain.integrated_gradients(f, x, t, tol=tol, atol=ATOL, max_steps=MAX_STEPS,
                                         driver=driver, return_info=True)

  fn = jax.jit(ig) if driver == "while" else ig
  attr, info = jax.block_until_ready(fn(x, t))
  gap = np.asarray(jaxplain.completeness_gap(f, x, t, attr), np.float64)  # its own forward
  delta = _delta(f, x_np, t_np)
  steps = np.asarray(info["steps"])
  return {"run": lambda: jax.block_until_ready(fn(x, t)),
          "info": {"all_met": bool(_met(gap, delta, tol).all()),
                   "max_rel_gap": float(np.max(np.abs(gap) / np.abs(delta))),
                   "steps_max": int(steps.max()), "steps_median": float(np.median(steps)),
                   "evaluations": int(steps.sum())}}


def setup_exact(model: str, b: int):
  import jax
  import jax.numpy as jnp
  import jaxplain
  f, _, x_np, t_np = problem(model, b)
  x, t = jnp.asarray(x_np), jnp.asarray(t_np)

  def run():
    return jax.block_until_ready(jaxplain.integrated_gradients(f, x, t, method="exact",
                                                               return_info=True))

  attr, info = run()
  gap = np.asarray(jaxplain.completeness_gap(f, x, t, attr), np.float64)
  delta = _delta(f, x_np, t_np)
  seg = np.asarray(info["steps"])
  return {"run": run, "info": {"all_met_01pct": bool(_met(gap, delta, 1e-3).all()),
                               "max_rel_gap": float(np.max(np.abs(gap) / np.abs(delta))),
                               "segments_median": float(np.median(seg)),
                               "segments_max": int(seg.max())}}


def setup_captum(model: str, b: int, tol: float, bisect: bool = True, ibs: int = 512,
                 device: str = "cpu"):
  import captum
  import torch
  from captum.attr import IntegratedGradients
  torch.set_num_threads(os.cpu_count())
  f, params, x_np, t_np = problem(model, b)
  net = torch_net(model, params).to(device)
  xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)
  tt = torch.from_numpy(t_np.astype(np.int64)).to(device)
  with torch.no_grad():
    y = net(xt).double().cpu().numpy()
    y0 = net(torch.zeros_like(xt)).double().cpu().numpy()
  delta = y[np.arange(b), t_np] - y0[np.arange(b), t_np]
  cig = IntegratedGradients(net)

  def attribute(n):
    return cig.attribute(xt, baselines=0.0, target=tt, n_steps=n, method="gausslegendre",
                         internal_batch_size=ibs, return_convergence_delta=True)

  def ok(n):
    _, gap = attribute(n)
    return bool(_met(gap.detach().double().cpu().numpy(), delta, tol).all())

  tried = {}
  n = 4
  while n <= 4096 and not tried.setdefault(n, ok(n)):
    n *= 2
  met = n <= 4096
  if met and bisect and n > 4:
    lo, hi = n // 2, n  # lo fails, hi meets
    while hi - lo > max(1, hi // 16):  # to 1/16 of n
      mid = (lo + hi) // 2
      if tried.setdefault(mid, ok(mid)):
        hi = mid
      else:
        lo = mid
    n = hi
  n = min(n, 4096)
  _, gap = attribute(n)
  return {"run": lambda: attribute(n),
          "info": {"n_steps": n,
                   "all_met": bool(_met(gap.double().cpu().numpy(), delta, tol).all()),
                   "max_rel_gap": float(np.max(np.abs(gap.double().cpu().numpy())
                                               / np.abs(delta))),
                   "tried": {str(k): v for k, v in sorted(tried.items())},
                   "torch": torch.__version__, "captum": captum.__version__}}


def setup_all_targets(model: str, b: int, mode: str):
  import jax
  import jax.numpy as jnp
  import jaxplain
  f, _, x_np, _ = problem(model, b)
  x = jnp.asarray(x_np)
  if mode == "all":
    fn = jax.jit(lambda x: jaxplain.integrated_gradients(f, x, "all", steps=STEPS_ALL))
    run = lambda: jax.block_until_ready(fn(x))
  else:
    fn = jax.jit(lambda x, t: jaxplain.integrated_gradients(f, x, t, steps=STEPS_ALL))
    ts = [jnp.full((b,), c, jnp.int32) for c in range(10)]
    run = lambda: [jax.block_until_ready(fn(x, t)) for t in ts]
  run()
  return run


# ---- the parent ----------------------------------------------------------------------------

def agreement(model: str, b: int) -> float:
  """max |torch logits - flax logits| / max |flax logits| on the batch (before timing)."""
  import jax.numpy as jnp
  import torch
  f, params, x, _ = problem(model, b)
  with torch.no_grad():
    yt = torch_net(model, params)(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  yf = np.asarray(f(jnp.asarray(x)))
  err = float(np.abs(yt - yf).max() / np.abs(yf).max())
  if err > 1e-4:
    raise RuntimeError(f"{model}: torch and flax logits differ ({err:.1e} relative)")
  return err


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--rounds", type=int, default=None)
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".md")))
  ap.add_argument("--models", default="smallcnn,lenet",
                  help="comma-separated subset of smallcnn,lenet")
  ap.add_argument("--drivers", default="while,host,local",
                  help="adaptive drivers to time (comma-separated subset of while,host,local;"
                       " the while and host drivers need up to 1,025 nodes per example at "
                       "0.1 %% on the SmallCNN, minutes per call)")
  ap.add_argument("--tols", default="1pct,01pct",
                  help="tolerances to time (comma-separated subset of 1pct,01pct; Captum's "
                       "search at 0.1 %% on the SmallCNN at batch 64 needs thousands of steps)")
  ap.add_argument("--process-timeout", type=float, default=1800.0, metavar="S",
                  help="seconds one contender's process may take, its n_steps search included "
                       "(Captum at 1 %% on the SmallCNN, batch 64: about 40 min on 2 cores)")
  ap.add_argument("--no-exact", action="store_true", help="skip method='exact' (LeNet)")
  ap.add_argument("--no-all", action="store_true", help="skip target='all' vs 10 calls")
  args = ap.parse_args()
  models = [m for m in args.models.split(",") if m]
  drivers = [d for d in args.drivers.split(",") if d]
  if not models or set(models) - {"smallcnn", "lenet"}:
    ap.error(f"--models: expected a subset of smallcnn,lenet, got {args.models!r}")
  if not drivers or set(drivers) - {"while", "host", "local"}:
    ap.error(f"--drivers: expected a subset of while,host,local, got {args.drivers!r}")
  chosen = [k for k in args.tols.split(",") if k]
  if not chosen or set(chosen) - set(TOLS):
    ap.error(f"--tols: expected a subset of 1pct,01pct, got {args.tols!r}")
  b = args.batch or (8 if args.quick else 64)
  rounds = args.rounds or (1 if args.quick else 3)
  repeats = 1 if args.quick else 2
  out = {"load_start": _runner.load_average(), "batch": b}
  agree = {m: agreement(m, b) for m in models}
  results, sections = {}, []
  for model in models:
    cs = {}
    # --quick: the tolerance comparison on LeNet only (on the SmallCNN one Captum search at
    # 0.1 % alone took minutes on the loaded machine), target="all" on the SmallCNN only
    tols = {} if (args.quick and model == "smallcnn") else {k: TOLS[k] for k in chosen}
    for key, tol in tols.items():
      for d in drivers:
        cs[_DRIVER_KEY[d].format(key)] = _runner.Contender(
            f"{HERE}:setup_adaptive", dict(model=model, b=b, tol=tol, driver=d))
      cs[f"captum_{key}"] = _runner.Contender(
          f"{HERE}:setup_captum", dict(model=model, b=b, tol=tol, bisect=not args.quick))
    if model == "lenet" and not args.no_exact:  # SmallCNN: see the notes (too many breakpoints)
      cs["exact"] = _runner.Contender(f"{HERE}:setup_exact", dict(model=model, b=b))
    if model == "smallcnn" and not args.no_all:
      cs["all"] = _runner.Contender(f"{HERE}:setup_all_targets",
                                    dict(model=model, b=b, mode="all"))
      cs["loop10"] = _runner.Contender(f"{HERE}:setup_all_targets",
                                       dict(model=model, b=b, mode="loop"))
    res = _runner.compare(cs, rounds=rounds, repeats=repeats, timeout=args.process_timeout)
    results[model] = res
    sections.append((model, res))
    for key in tols:
      names = {d: _DRIVER_KEY[d].format(key) for d in drivers}
      best = min(names, key=lambda d: res[names[d]]["median"])
      out[f"{model}_captum_over_adaptive_{key}"] = _runner.ratio(res, f"captum_{key}",
                                                                 names[best])["ratio"]
      out[f"{model}_best_driver_{key}"] = best
      if "local" in names:
        out[f"{model}_captum_over_local_{key}"] = _runner.ratio(res, f"captum_{key}",
                                                                names["local"])["ratio"]
      if "host" in names and "while" in names:
        out[f"{model}_host_over_while_{key}"] = _runner.ratio(res, names["host"],
                                                              names["while"])["ratio"]
      out[f"{model}_captum_n_steps_{key}"] = res[f"captum_{key}"]["info"]["n_steps"]
    for k, r in res.items():
      out[f"{model}_{k}_s"] = r["median"]
  for key in chosen:  # worst over the models that ran this tolerance (--quick: not SmallCNN)
    ratios = [out[f"{m}_captum_over_adaptive_{key}"] for m in results
              if f"{m}_captum_over_adaptive_{key}" in out]
    if ratios:
      out[f"captum_over_adaptive_{key}"] = min(ratios)
  if "exact" in results.get("lenet", {}) and "captum_01pct" in results["lenet"]:
    out["captum_over_exact"] = _runner.ratio(results["lenet"], "captum_01pct",
                                             "exact")["ratio"]
  if "all" in results.get("smallcnn", {}):
    out["all_targets_speedup"] = _runner.ratio(results["smallcnn"], "loop10", "all")["ratio"]
  out["load_end"] = _runner.load_average()
  lines = _report(sections, out, agree, b, rounds, args)
  _runner.write_keeping_notes(args.out, lines, NOTES)
  print("\n".join(lines))
  print(json.dumps(out))


def _report(sections, out, agree, b, rounds, args):
  import jax
  lines = [
      "# bench_ig_accuracy: time until every example meets a completeness tolerance",
      "",
      f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}), jax {jax.__version__}. "
      f"Load average (1/5/15 min) {out['load_start']} at the start, "
      f"{out['load_end']} at the end. Batch {b}, {rounds} round(s)"
      f"{' (--quick: Captum n_steps by doubling only)' if args.quick else ''}, each contender "
      "in its own process, alternating (`benchmarks/_runner.py`). Criterion per example: "
      f"|gap| <= max(tol |f(x)[t] - f(x')[t]|, {ATOL:g}); black baseline. Torch logits vs "
      "flax (max |diff| / max |logit|): "
      + ", ".join(f"{m} {e:.1e}" for m, e in agree.items()) + ".",
      "",
  ]
  for model, res in sections:
    lines += [f"## {model}", "", "| contender | median | min - max | CPU use | result |",
              "|---|---:|---:|---:|---|"]
    for k, r in res.items():
      i = r["info"]
      if k.startswith("captum"):
        note = (f"n_steps {i['n_steps']}, all met {i['all_met']}, max rel gap "
                f"{i['max_rel_gap']:.1e}")
      elif k.startswith("adaptive"):
        note = (f"steps median {i['steps_median']:.0f} / max {i['steps_max']}, all met "
                f"{i['all_met']}, max rel gap {i['max_rel_gap']:.1e}")
      elif k == "exact":
        note = (f"segments median {i['segments_median']:.0f} / max {i['segments_max']}, max "
                f"rel gap {i['max_rel_gap']:.1e}")
      else:
        note = f"target='all' vs 10 calls, Gauss-Legendre {STEPS_ALL} steps"
      lines.append(f"| {k} | {_runner._fmt(r['median'])} | {_runner._fmt(r['min'])} - "
                   f"{_runner._fmt(r['max'])} | {100 * r['cpu']:.0f} % | {note} |")
    lines += [""]
    for key in (k for k in TOLS if f"{model}_captum_over_adaptive_{k}" in out):
      line = (f"- tol {TOLS[key]:g}: Captum / adaptive (driver "
              f"{out[f'{model}_best_driver_{key}']}) = "
              f"{out[f'{model}_captum_over_adaptive_{key}']:.2f}")
      if f"{model}_host_over_while_{key}" in out:
        line += f"; host / while driver = {out[f'{model}_host_over_while_{key}']:.2f}"
      if f"{model}_captum_over_local_{key}" in out:
        line += f"; Captum / local driver = {out[f'{model}_captum_over_local_{key}']:.2f}"
      lines.append(line)
    lines += [""]
  tail = []
  if "captum_over_exact" in out:
    tail.append(f"Captum (0.1 %) / exact on LeNet: {out['captum_over_exact']:.2f}")
  if "all_targets_speedup" in out:
    tail.append(f"target='all' speed-up over 10 calls (SmallCNN): "
                f"{out['all_targets_speedup']:.2f}")
  if args.models != "smallcnn,lenet" or args.drivers != "while,host,local" or args.no_exact \
     or args.no_all:
    tail.append(f"run with --models {args.models} --drivers {args.drivers}"
                f"{' --no-exact' if args.no_exact else ''}{' --no-all' if args.no_all else ''}")
  lines += ["; ".join(tail) + ".", "", "```json", json.dumps(out), "```"]
  return lines


if __name__ == "__main__":
  main()
