"""All-filter ablation of SmallCNN's conv3 (128 filters) on a batch of 64 32x32x3 images.

Contenders, each in its own process, alternating A B A B (benchmarks/_runner.py):
  * torch loop: for each filter, clone the weight and bias, zero filter k (kernel and bias),
    forward, restore (torch.no_grad, ``os.cpu_count()`` threads);
  * jaxplain ``sweep`` (general path: vmap over edited parameter pytrees, chunk 16);
  * jaxplain ``sweep_layer`` (prefix reuse: conv1/conv2/conv3 once, the rest per filter);
  * jaxplain ``sweep_layer(channelwise_until="fc1")`` (the ablation carried through ReLU and
    max pool to fc1: fc1 output minus channel k's contribution, only fc1's ReLU and fc2 per
    filter);
  * one jax forward and one torch forward of the batch (the per-forward gap).
Every jaxplain result is checked against the torch loop in the parent process before timing.

  python benchmarks/bench_interventions.py [--quick] [--rounds N]

Writes benchmarks/bench_interventions.md and ends with one JSON line (keys as before:
torch_loop_over_sweep, ..._prefix, ..._general, sweep*_per_intervention_over_forward, the
medians in seconds, quick).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
from benchmarks import _runner  # noqa: E402

HERE = "benchmarks.bench_interventions"
N_FILTERS = 128


def _jax_setup():
  import jax
  from jaxplain import interventions as iv
  from jaxplain.models import SmallCNN
  model = SmallCNN()
  x = jax.random.uniform(jax.random.key(1), (64, 32, 32, 3))
  v = jax.jit(model.init)(jax.random.key(0), x[:1])
  return model, v, x, iv.units(v, "conv3", "filter")  # 128 filters, bias included


def _jax_fns(model, u):
  import jax
  from jaxplain import interventions as iv
  return {
      "forward": jax.jit(model.apply),
      "general": jax.jit(lambda v, x: iv.sweep(model.apply, v, x, u, chunk=16)),
      "prefix": jax.jit(lambda v, x: iv.sweep_layer(model, v, x, u)),
      "chanwise": jax.jit(lambda v, x: iv.sweep_layer(model, v, x, u, channelwise_until="fc1")),
  }


def _torch_setup(device: str = "cpu"):
  import torch

  class TorchSmallCNN(torch.nn.Module):
    """SmallCNN in torch with the jax weights (NHWC flatten order kept by a permute)."""

    def __init__(self, p):
      super().__init__()
      t = lambda a: torch.tensor(np.asarray(a))
      self.conv = torch.nn.ModuleList()
      for name in ("conv1", "conv2", "conv3"):
        k = p[name]["kernel"]
        c = torch.nn.Conv2d(k.shape[2], k.shape[3], 3, padding=1)
        c.weight.data = t(k).permute(3, 2, 0, 1).contiguous()
        c.bias.data = t(p[name]["bias"])
        self.conv.append(c)
      self.fc1 = torch.nn.Linear(*p["fc1"]["kernel"].shape)
      self.fc1.weight.data = t(p["fc1"]["kernel"]).T.contiguous()
      self.fc1.bias.data = t(p["fc1"]["bias"])
      self.fc2 = torch.nn.Linear(*p["fc2"]["kernel"].shape)
      self.fc2.weight.data = t(p["fc2"]["kernel"]).T.contiguous()
      self.fc2.bias.data = t(p["fc2"]["bias"])

    def forward(self, x):  # x NCHW
      f = torch.nn.functional
      x = f.relu(self.conv[0](x))
      x = f.max_pool2d(f.relu(self.conv[1](x)), 2)
      x = f.max_pool2d(f.relu(self.conv[2](x)), 2)
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
      return self.fc2(f.relu(self.fc1(x)))

  torch.set_num_threads(os.cpu_count())
  _, v, x, _ = _jax_setup()
  tm = TorchSmallCNN(v["params"]).eval().to(device)
  xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous().to(device)

  def torch_loop():
    outs = []
    conv = tm.conv[2]
    with torch.no_grad():
      for k in range(N_FILTERS):
        w0, b0 = conv.weight.clone(), conv.bias.clone()
        conv.weight[k] = 0
        conv.bias[k] = 0
        outs.append(tm(xt))
        conv.weight.copy_(w0)
        conv.bias.copy_(b0)
    return torch.stack(outs)

  def forward():
    with torch.no_grad():
      return tm(xt)

  return tm, xt, torch_loop, forward


# ---- contenders (each runs in its own process) -------------------------------------------

def setup_jax(kind: str):
  """One jitted jaxplain sweep (or the plain forward), compiled before timing."""
  import time
  import jax
  model, v, x, u = _jax_setup()
  fn = _jax_fns(model, u)[kind]
  t0 = time.perf_counter()
  jax.block_until_ready(fn(v, x))
  return {"run": lambda: jax.block_until_ready(fn(v, x)),
          "info": {"compile_s": time.perf_counter() - t0, "jax": jax.__version__}}


def setup_torch(kind: str, device: str = "cpu"):
  """The torch loop over filters (or one torch forward)."""
  import torch
  _, _, torch_loop, forward = _torch_setup(device)
  fn = torch_loop if kind == "loop" else forward
  fn()
  return {"run": fn, "info": {"torch": torch.__version__, "threads": torch.get_num_threads()}}


def check():
  """Max |jaxplain - torch loop| of every sweep, and the forward pass, in this process."""
  import jax
  model, v, x, u = _jax_setup()
  fns = _jax_fns(model, u)
  _, _, torch_loop, forward = _torch_setup()
  np.testing.assert_allclose(forward().numpy(), np.asarray(fns["forward"](v, x)), rtol=1e-3,
                             atol=1e-4)
  ref = torch_loop().numpy()
  errs = {k: float(np.max(np.abs(np.asarray(jax.block_until_ready(fns[k](v, x))) - ref)))
          for k in ("general", "prefix", "chanwise")}
  assert max(errs.values()) < 1e-3, errs
  return errs


NAMES = {
    "torch_loop": "torch loop (clone, zero filter+bias, forward, restore)",
    "sweep_general": "jaxplain sweep, general (vmap edited params, chunk=16)",
    "sweep_prefix": "jaxplain sweep_layer, prefix reuse",
    "sweep": "jaxplain sweep_layer, prefix reuse + channelwise_until='fc1'",
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="2 rounds")
  ap.add_argument("--rounds", type=int, default=None)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".md")))
  args = ap.parse_args()
  rounds = args.rounds or (2 if args.quick else 5)
  load_start = _runner.load_average()
  errs = check()
  print("max |jaxplain - torch loop|:", errs, flush=True)
  res = _runner.compare({
      "torch_loop": _runner.Contender(f"{HERE}:setup_torch", {"kind": "loop"}),
      "sweep_general": _runner.Contender(f"{HERE}:setup_jax", {"kind": "general"}),
      "sweep_prefix": _runner.Contender(f"{HERE}:setup_jax", {"kind": "prefix"}),
      "sweep": _runner.Contender(f"{HERE}:setup_jax", {"kind": "chanwise"}),
  }, rounds=rounds, repeats=1)
  res.update(_runner.compare({
      "jax_forward": _runner.Contender(f"{HERE}:setup_jax", {"kind": "forward"}),
      "torch_forward": _runner.Contender(f"{HERE}:setup_torch", {"kind": "forward"}),
  }, rounds=rounds, repeats=10))
  load_end = _runner.load_average()
  import jax
  import torch
  t_fwd, t_tfwd = res["jax_forward"]["median"], res["torch_forward"]["median"]
  err_of = {"sweep_general": errs["general"], "sweep_prefix": errs["prefix"],
            "sweep": errs["chanwise"], "torch_loop": 0.0}

  lines = [
      "# Interventions benchmark: all-filter ablation of SmallCNN conv3",
      "",
      f"{N_FILTERS} filters of conv3, batch 64 of 32x32x3, float32. Machine: "
      f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), jax "
      f"{jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
      f"({res['torch_loop']['info']['threads']} threads). **Shared machine**: "
      f"load average (1/5/15 min) {load_start} at the start, "
      f"{load_end} at the end. Each contender runs in its own process, alternating "
      f"A B A B over {rounds} rounds (`benchmarks/_runner.py`); medians, min - max, CPU use "
      "= (user + sys) / wall while timing; ratios are median / median with the per-round "
      "ratios beside them. Compile time is excluded (reported separately).",
      "",
      "| method | median | min - max | CPU use | compile (s) | per intervention / one jax "
      "forward | torch loop / this (per round) | max abs diff vs torch |",
      "|---|---:|---:|---:|---:|---:|---|---:|",
  ]
  for k in ("torch_loop", "sweep_general", "sweep_prefix", "sweep"):
    r = res[k]
    comp = r["info"].get("compile_s")
    q = _runner.ratio(res, "torch_loop", k)
    lines.append(
        f"| {NAMES[k]} | {_runner._fmt(r['median'])} | {_runner._fmt(r['min'])} - "
        f"{_runner._fmt(r['max'])} | {100 * r['cpu']:.0f} % | "
        f"{'-' if comp is None else f'{comp:.2f}'} | {r['median'] / N_FILTERS / t_fwd:.3f} | "
        f"{q['ratio']:.1f}x ({', '.join(f'{v:.1f}' for v in q['per_round'])}) | "
        f"{err_of[k]:.2e} |")
  best = _runner.ratio(res, "torch_loop", "sweep")["ratio"]
  lines += [
      "", f"One jax forward (batch 64): {t_fwd * 1e3:.2f} ms (CPU use "
      f"{100 * res['jax_forward']['cpu']:.0f} %); one torch forward: {t_tfwd * 1e3:.2f} ms "
      f"(CPU use {100 * res['torch_forward']['cpu']:.0f} %), each in its own process. torch / "
      f"jax forward = {t_tfwd / t_fwd:.2f}: part of every 'torch loop / this' ratio is that "
      f"per-forward gap; divided by it, the best sweep is {best / (t_tfwd / t_fwd):.0f}x.",
      "", "The general sweep and plain prefix reuse still run the layers after conv3 "
      "(ReLU, max pool, fc1, fc2) 128 times on a batch of 64; carrying the ablation to fc1 "
      "(channel k's fc1 contribution subtracted: a (64 x 64) @ (64 x 256) product per "
      "filter) removes all of that, leaving ~1/200 of a forward pass per intervention."]
  summary = {
      "torch_loop_over_sweep": best,
      "torch_loop_over_sweep_prefix": _runner.ratio(res, "torch_loop", "sweep_prefix")["ratio"],
      "torch_loop_over_sweep_general": _runner.ratio(res, "torch_loop",
                                                     "sweep_general")["ratio"],
      "sweep_per_intervention_over_forward": res["sweep"]["median"] / N_FILTERS / t_fwd,
      "sweep_prefix_per_intervention_over_forward":
          res["sweep_prefix"]["median"] / N_FILTERS / t_fwd,
      "sweep_general_per_intervention_over_forward":
          res["sweep_general"]["median"] / N_FILTERS / t_fwd,
      "torch_loop_s": res["torch_loop"]["median"], "sweep_s": res["sweep"]["median"],
      "sweep_prefix_s": res["sweep_prefix"]["median"],
      "sweep_general_s": res["sweep_general"]["median"],
      "jax_forward_s": t_fwd, "torch_forward_s": t_tfwd, "quick": args.quick,
      "rounds": rounds, "load_start": load_start, "load_end": load_end,
  }
  lines += ["", "```json", json.dumps(summary), "```"]
  table = "\n".join(lines)
  print(table)
  pathlib.Path(args.out).write_text(table + "\n")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
