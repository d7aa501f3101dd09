"""Benchmark: one PPI training step vs a plain classification step, and vs PyTorch.

Model LeNet (28x28x1, ReLU, max pool), batch 64, Adam. Steps compared (all jitted, the same
weights and batch):

- plain: softmax cross-entropy + Adam;
- PPI (second-order through the saliency, the default) with each saliency method: WBP
  (default), gradient, Grad-CAM (on conv2, when ``jaxplain.cam`` is present), LRP; and WBP with
  the stop-gradient switch (first-order only);
- PyTorch (CPU, eager) plain step and PPI step with gradient x input saliency computed by
  ``torch.autograd.grad(..., create_graph=True)``: for this ReLU / max-pool / conv / dense
  network gradient x input *is* WBP (SPEC section 3), so the torch PPI step computes the same
  loss as the JAX WBP step (checked below on the same weights: |L_jax - L_torch| is printed).

Timings: median of repeats after one warm-up call (the compile is reported separately);
the repeats of the JAX steps are interleaved round-robin so that load changes hit all alike,
then those of the torch steps (a separate phase: torch's spinning OpenMP threads would slow
down a JAX step timed right after a torch step).
``python benchmarks/bench_ppi.py [--quick]``; writes benchmarks/bench_ppi.md and ends with one
JSON line (``ppi_over_plain`` = WBP PPI step / plain step, ``torch_over_ppi`` = torch PPI
step / JAX WBP PPI step).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxplain import ppi
from jaxplain.models import LeNet

HERE = pathlib.Path(__file__).resolve().parent


def _jax_runner(step, variables, opt_state, batch):
  state = {"v": variables, "o": opt_state, "i": 0}
  key = jax.random.key(0)

  def run():
    v, o, m = step(state["v"], state["o"], batch, jax.random.fold_in(key, state["i"]),
                   state["i"])
    jax.block_until_ready((v, o, m))
    state.update(v=v, o=o, i=state["i"] + 1)
  return run


def _flops(step, variables, opt_state, batch):
  """XLA's cost-analysis FLOP count of one compiled step."""
  ca = step.lower(variables, opt_state, batch, jax.random.key(0), 0).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", float("nan")))


def plain_step_factory(model, opt):
  def step(variables, opt_state, batch, key, step=0):
    del key, step
    def loss(p):
      logits = model.apply({"params": p}, batch["image"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    l, g = jax.value_and_grad(loss)(variables["params"])
    u, opt_state = opt.update(g, opt_state, variables["params"])
    return {"params": optax.apply_updates(variables["params"], u)}, opt_state, {"loss": l}
  return jax.jit(step)


# -- PyTorch -----------------------------------------------------------------------------------

def _torch_lenet(params):
  import torch
  from torch import nn

  class TLeNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
      self.conv2 = nn.Conv2d(6, 16, 5)
      self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):  # x NCHW
      x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
      x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)   # NHWC flatten order, as in Flax
      x = torch.relu(self.fc1(x))
      x = torch.relu(self.fc2(x))
      return self.fc3(x)

  net = TLeNet()
  with torch.no_grad():
    for name in ("conv1", "conv2"):
      getattr(net, name).weight.copy_(torch.from_numpy(
          np.asarray(params[name]["kernel"]).transpose(3, 2, 0, 1).copy()))
      getattr(net, name).bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
    for name in ("fc1", "fc2", "fc3"):
      getattr(net, name).weight.copy_(torch.from_numpy(
          np.asarray(params[name]["kernel"]).T.copy()))
      getattr(net, name).bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
  return net


def _torch_ppi_loss(net, x, y, cfg):
  """The same PPI loss as jaxplain.ppi with gradient x input saliency (= WBP here)."""
  import torch
  import torch.nn.functional as F
  x = x.detach().requires_grad_(True)
  logits = net(x)
  sel = logits.gather(1, y[:, None]).sum()
  g, = torch.autograd.grad(sel, x, create_graph=True)
  s = (g * x).sum(1)                                             # (B, H, W)
  s = torch.relu(s)
  s = s / (s.flatten(1).max(1).values[:, None, None] + cfg.eps)
  m = torch.sigmoid(cfg.omega * (s - cfg.sigma))
  xd = x.detach()
  x_neg = xd - m[:, None] * xd
  x_adv = xd - torch.roll(m, 1, 0)[:, None] * xd
  l_cls = F.cross_entropy(logits, y)
  ln = net(x_neg)
  l_con = (torch.logsumexp(ln, 1) - torch.logsumexp(
      ln.masked_fill(F.one_hot(y, ln.shape[1]).bool(), float("-inf")), 1)).mean()
  l_reg = s.mean()
  l_ad = F.cross_entropy(net(x_adv), y)
  return l_cls + cfg.w1 * l_con + cfg.w2 * l_reg + cfg.w3 * l_ad


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--batch", type=int, default=64)
  args = ap.parse_args()
  repeats = 5 if args.quick else 20

  import torch
  torch.set_num_threads(os.cpu_count())

  model, cfg = LeNet(), ppi.PPIConfig()
  b = args.batch
  x = jax.random.uniform(jax.random.key(1), (b, 28, 28, 1))
  y = jnp.arange(b) % 10
  batch = {"image": x, "label": y}
  variables = model.init(jax.random.key(0), x[:1])
  opt = optax.adam(1e-3)
  opt_state = opt.init(variables["params"])

  saliencies = ["wbp", "gradient_x_input", "gradient", "lrp"]
  try:
    from jaxplain import cam  # noqa: F401  pylint: disable=unused-import
    saliencies.insert(2, "grad_cam")
  except ImportError:
    pass

  # all runners first; then repeats interleaved round-robin, so that a change in machine
  # load hits every step alike
  plain_step = plain_step_factory(model, opt)
  runners = [("JAX plain (CE + Adam)", "plain",
              _jax_runner(plain_step, variables, opt_state, batch))]
  flop_steps = {"plain": plain_step}
  for sal in saliencies:
    step = ppi.make_ppi_train_step(model, opt, cfg, saliency=sal)
    runners.append((f"JAX PPI {sal}", sal, _jax_runner(step, variables, opt_state, batch)))
    if sal == "wbp":
      flop_steps["wbp"] = step
  step = ppi.make_ppi_train_step(
      model, opt, ppi.PPIConfig(stop_saliency_gradient=True), saliency="wbp")
  runners.append(("JAX PPI wbp, stop-gradient", "wbp_stopgrad",
                  _jax_runner(step, variables, opt_state, batch)))

  # torch, same weights and batch
  net = _torch_lenet(variables["params"])
  tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  ty = torch.from_numpy(np.asarray(y).astype(np.int64))
  jax_loss = float(ppi.make_ppi_loss(model, cfg, saliency="wbp")(
      variables["params"], {}, batch, jax.random.key(0), 0)[0])
  torch_loss = float(_torch_ppi_loss(net, tx, ty, cfg).detach())
  topt = torch.optim.Adam(net.parameters(), lr=1e-3)

  def torch_plain():
    topt.zero_grad()
    torch.nn.functional.cross_entropy(net(tx), ty).backward()
    topt.step()

  def torch_ppi():
    topt.zero_grad()
    _torch_ppi_loss(net, tx, ty, cfg).backward()
    topt.step()

  runners.append(("torch plain (CE + Adam)", "torch_plain", torch_plain))
  runners.append(("torch PPI grad x input (= WBP), create_graph", "torch_ppi", torch_ppi))

  first = {}
  for _, key, fn in runners:
    t0 = time.perf_counter()
    fn()
    first[key] = time.perf_counter() - t0
  # after the first calls (lowering again reuses their compilation)
  flops = {k: _flops(st, variables, opt_state, batch) for k, st in flop_steps.items()}
  # JAX steps and torch steps are interleaved within their own phase: torch's OpenMP worker
  # threads keep spinning for a while after each call, and a short JAX step timed right after
  # a torch step runs on a busy CPU (this inflated the plain step ~2x in an earlier version).
  times = {key: [] for _, key, _ in runners}
  for phase in ("jax", "torch"):
    group = [(key, fn) for _, key, fn in runners if key.startswith("torch") == (phase == "torch")]
    for _ in range(repeats):
      for key, fn in group:
        t0 = time.perf_counter()
        fn()
        times[key].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  plain, t_plain, t_ppi = med["plain"], med["torch_plain"], med["torch_ppi"]
  res = {k: med[k] for _, k, _ in runners if k not in ("plain", "torch_plain", "torch_ppi")}
  rows = [(name, first[key], med[key]) for name, key, _ in runners]

  ppi_over_plain = res["wbp"] / plain
  flops_ratio = flops["wbp"] / flops["plain"]
  torch_over_ppi = t_ppi / res["wbp"]
  load = os.getloadavg()[0]
  lines = [
      "# PPI step time (benchmarks/bench_ppi.py)",
      "",
      f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
      f"JAX {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}; "
      f"load average at the end {load:.1f}"
      + (" (measured with other jobs running)" if load > 1.5 else "") + ".",
      f"LeNet 28x28x1, batch {b}, Adam; median of {repeats} repeats after one warm-up call "
      "(first call = compile + run for JAX); JAX steps interleaved round-robin, then the "
      "torch steps in their own phase. PPI config: defaults (sigma 0.5, omega 50, "
      "w = 1 / 0.1 / 1, one-vs-others, soft mask, second order through the saliency).",
      "The torch PPI step uses gradient x input with create_graph=True, which equals WBP on this "
      f"ReLU network; same weights and batch: L_jax = {jax_loss:.6f}, L_torch = "
      f"{torch_loss:.6f}.",
      "",
      "| step | first call (s) | median (ms) | / JAX plain |",
      "|---|---:|---:|---:|",
  ]
  for name, first, med in rows:
    lines.append(f"| {name} | {first:.2f} | {1e3 * med:.2f} | {med / plain:.2f} |")
  lines += ["", f"ppi_over_plain (WBP) = {ppi_over_plain:.2f} (target <= 3); "
            f"torch_over_ppi = {torch_over_ppi:.2f}.",
            "", f"WBP (jaxplain.rules, a jaxpr rule engine) / gradient x input = "
            f"{res['wbp'] / res['gradient_x_input']:.2f} (the same map on this ReLU network). "
            "The engine treats the ReLU factor relu(v) / v as a constant under "
            "differentiation (it is piecewise constant, so its exact derivative is zero), "
            "which keeps the second-order graph as small as gradient x input's, and it "
            "carries the tangent of convolutions with <= 8 input channels as patches @ kernel, "
            "whose backward (and second-order) pass XLA's CPU backend runs faster than a "
            "convolution with few output channels. The stop-gradient switch removes the "
            "second-order part. The rest of the PPI cost is inherent: a forward on x, the "
            "saliency backward, a forward and backward on the 2B contrast batch (x*, x') "
            f"including input gradients, and the second-order pass ({flops_ratio:.1f}x the "
            "FLOPs of the plain step by XLA's cost analysis). torch runs eager with os.cpu_count() "
            "threads: on a loaded machine it loses more than XLA, so read torch_over_ppi from "
            "an idle run."]
  text = "\n".join(lines)
  print(text)
  if not args.quick:
    (HERE / "bench_ppi.md").write_text(text + "\n")
  out = {"ppi_over_plain": round(ppi_over_plain, 3), "torch_over_ppi": round(torch_over_ppi, 3),
         "plain_ms": round(1e3 * plain, 3),
         **{f"ppi_{k}_ms": round(1e3 * v, 3) for k, v in res.items()},
         **{f"ppi_{k}_over_plain": round(v / plain, 3) for k, v in res.items()},
         "torch_plain_ms": round(1e3 * t_plain, 3), "torch_ppi_ms": round(1e3 * t_ppi, 3),
         "loss_abs_diff_jax_torch": abs(jax_loss - torch_loss), "batch": b,
         "ppi_wbp_flops_over_plain": round(flops_ratio, 3), "quick": args.quick}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
