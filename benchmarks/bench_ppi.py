"""Benchmark: one PPI training step vs a plain classification step, and vs PyTorch.

Model LeNet (28x28x1, ReLU, max pool), batch 64, Adam. Every step is the shared trainer's,
``jaxplain.train.make_train_step`` (donated state, ``fold_in(key, step)``), with the loss
``train.classification_loss`` (plain) or ``ppi.make_ppi_loss`` (PPI, default ``PPIConfig``,
second order through the saliency) with each saliency method: WBP (default), gradient x input,
gradient, Grad-CAM (conv2), LRP, and WBP with the stop-gradient switch (first order only).
PyTorch (CPU, eager): a plain step and a PPI step with gradient x input saliency by
``torch.autograd.grad(..., create_graph=True)``: for this ReLU / max-pool / conv / dense
network gradient x input *is* WBP (SPEC section 3), so the torch PPI step computes the same loss
as the JAX WBP step on the same weights and batch (both losses are printed).

Each contender runs in its own process, alternating A B A B (``benchmarks/_runner.py``); a
process builds and compiles its step, then times ``repeats`` calls. ``ppi_flop_ratio`` is XLA's
cost-analysis FLOP count of the compiled PPI (WBP) step over the plain step's, and
``ppi_over_flop_floor = ppi_over_plain / ppi_flop_ratio`` says how far the PPI step's time is
above what its extra arithmetic alone would cost (goal <= 1.15).

``python benchmarks/bench_ppi.py [--quick]``; writes benchmarks/bench_ppi.md (its title says
``--quick`` when the run was: WBP, plain and torch PPI only, 2 rounds) and ends with one
JSON line (``ppi_over_plain``, ``ppi_flop_ratio``, ``ppi_over_flop_floor``, ``torch_over_ppi``
and the medians).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def _init(batch: int):
  import jax
  import jax.numpy as jnp
  from jaxplain.models import LeNet
  model = LeNet()
  x = jax.random.uniform(jax.random.key(1), (batch, 28, 28, 1))
  y = (jnp.arange(batch) % 10).astype(jnp.int32)
  variables = model.init(jax.random.key(0), x[:1])
  return model, x, y, variables


def setup_jax(saliency: str = "wbp", stop_gradient: bool = False, batch: int = 64):
  """Contender: the shared trainer's step with the plain or the PPI loss (see the docstring)."""
  import jax
  import optax
  from jaxplain import ppi, train
  model, x, y, variables = _init(batch)
  opt = optax.adam(1e-3)
  if saliency == "plain":
    loss_fn = train.classification_loss(model)
  else:
    cfg = ppi.PPIConfig(stop_saliency_gradient=stop_gradient, grad_cam_layer="conv2")
    loss_fn = ppi.make_ppi_loss(model, cfg, saliency=saliency)
  step = train.make_train_step(loss_fn, opt)
  batch_d = {"image": x, "label": y}
  key = jax.random.key(0)
  st = jax.device_put(train.init_state(model, opt, x[:1], variables=variables))
  ca = step.lower(st, batch_d, key).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  flops = float(ca.get("flops", float("nan")))
  holder = {"state": st}
  new, metrics = step(holder["state"], batch_d, key)     # warm-up (compile)
  loss0 = float(metrics["loss"])
  holder["state"] = new

  def run():
    holder["state"], m = step(holder["state"], batch_d, key)
    jax.block_until_ready((holder["state"], m))
  return {"run": run, "info": {"flops": flops, "loss_at_init": loss0}}


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
  """The same PPI loss as jaxplain.ppi's defaults with gradient x input saliency (= WBP)."""
  import torch
  import torch.nn.functional as F
  if (cfg.reg_target, cfg.pairing, cfg.normalize, cfg.mask, cfg.contrast_loss) != (
      "l1", "roll", "relu_max", "soft", "one_vs_others"):
    raise ValueError(f"_torch_ppi_loss implements the default PPIConfig readings, got {cfg}")
  x = x.detach().requires_grad_(True)
  logits = net(x)
  sel = logits.gather(1, y[:, None]).sum()
  g, = torch.autograd.grad(sel, x, create_graph=True)
  s_raw = (g * x).sum(1)                                         # (B, H, W)
  s = torch.relu(s_raw)
  s = s / (s.flatten(1).max(1).values[:, None, None] + cfg.eps)
  m = torch.sigmoid(cfg.omega * (s - cfg.sigma))
  xd = x.detach()
  x_neg = xd - m[:, None] * xd
  x_adv = xd - torch.roll(m, 1, 0)[:, None] * xd
  l_cls = F.cross_entropy(logits, y)
  ln = net(x_neg)
  l_con = (torch.logsumexp(ln, 1) - torch.logsumexp(
      ln.masked_fill(F.one_hot(y, ln.shape[1]).bool(), float("-inf")), 1)).mean()
  l_reg = s_raw.abs().flatten(1).sum(1).mean()
  l_ad = F.cross_entropy(net(x_adv), y)
  return l_cls + cfg.w1 * l_con + cfg.w2 * l_reg + cfg.w3 * l_ad


def setup_torch(kind: str = "ppi", batch: int = 64, device: str = "cpu"):
  """Contender: the PyTorch plain or PPI step (eager, os.cpu_count() threads)."""
  import torch
  from jaxplain import ppi
  torch.set_num_threads(os.cpu_count())
  _, x, y, variables = _init(batch)
  net = _torch_lenet(variables["params"]).to(device)
  tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(device)
  ty = torch.from_numpy(np.asarray(y).astype(np.int64)).to(device)
  cfg = ppi.PPIConfig()
  topt = torch.optim.Adam(net.parameters(), lr=1e-3)
  loss_fn = ((lambda: _torch_ppi_loss(net, tx, ty, cfg)) if kind == "ppi" else
             (lambda: torch.nn.functional.cross_entropy(net(tx), ty)))
  loss0 = float(loss_fn().detach())

  def run():
    topt.zero_grad()
    loss_fn().backward()
    topt.step()
  run()
  return {"run": run, "info": {"loss_at_init": loss0}}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="~1 minute: WBP, plain and torch PPI")
  ap.add_argument("--batch", type=int, default=64)
  args = ap.parse_args()
  from benchmarks import _runner
  b = args.batch
  C = _runner.Contender
  mod = "benchmarks.bench_ppi"
  contenders = {
      "JAX plain (CE + Adam)": C(f"{mod}:setup_jax", {"saliency": "plain", "batch": b}),
      "JAX PPI wbp": C(f"{mod}:setup_jax", {"saliency": "wbp", "batch": b}),
      "torch PPI grad x input (= WBP), create_graph": C(f"{mod}:setup_torch",
                                                          {"kind": "ppi", "batch": b}),
  }
  if not args.quick:
    for sal in ("gradient_x_input", "gradient", "grad_cam", "lrp"):
      contenders[f"JAX PPI {sal}"] = C(f"{mod}:setup_jax", {"saliency": sal, "batch": b})
    contenders["JAX PPI wbp, stop-gradient"] = C(
        f"{mod}:setup_jax", {"saliency": "wbp", "stop_gradient": True, "batch": b})
    contenders["torch plain (CE + Adam)"] = C(f"{mod}:setup_torch", {"kind": "plain",
                                                                     "batch": b})
  rounds, repeats = (2, 5) if args.quick else (4, 10)
  res = _runner.compare(contenders, rounds=rounds, repeats=repeats)
  plain, wbp = "JAX plain (CE + Adam)", "JAX PPI wbp"
  tppi = "torch PPI grad x input (= WBP), create_graph"
  ppi_over_plain = _runner.ratio(res, wbp, plain)
  torch_over_ppi = _runner.ratio(res, tppi, wbp)
  flop_ratio = res[wbp]["info"]["flops"] / res[plain]["info"]["flops"]
  floor = ppi_over_plain["ratio"] / flop_ratio
  l_jax, l_torch = res[wbp]["info"]["loss_at_init"], res[tppi]["info"]["loss_at_init"]
  from jaxplain import ppi
  cfg = ppi.PPIConfig()
  import jax
  import torch
  lines = [
      "# PPI step time (benchmarks/bench_ppi.py" + (" --quick)" if args.quick else ")"), "",
      f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
      f"JAX {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}. "
      f"LeNet 28x28x1, batch {b}, Adam; each contender in its own process, alternating "
      f"({rounds} rounds x {repeats} timed calls after a warm-up); the steps are "
      "jaxplain.train.make_train_step with the plain or the PPI loss. PPI config: defaults "
      f"(sigma {cfg.sigma}, omega {cfg.omega}, w = {cfg.w1} / {cfg.w2} / {cfg.w3}, L_reg "
      f"{cfg.reg_target}, pairing {cfg.pairing}, one-vs-others, soft mask, second order).",
      f"Same weights and batch: L_jax = {l_jax:.6f}, L_torch = {l_torch:.6f} (torch: gradient x "
      "input with create_graph=True = WBP on this ReLU network).", "",
      _runner.table(res, "Step times"), "",
      f"- ppi_over_plain (WBP) = {ppi_over_plain['ratio']:.2f} (per round "
      f"{', '.join(f'{r:.2f}' for r in ppi_over_plain['per_round'])})",
      f"- ppi_flop_ratio (XLA cost analysis, PPI WBP step / plain step) = {flop_ratio:.2f}",
      f"- ppi_over_flop_floor = {floor:.2f} (goal <= 1.15)",
      f"- torch_over_ppi = {torch_over_ppi['ratio']:.2f} (per round "
      f"{', '.join(f'{r:.2f}' for r in torch_over_ppi['per_round'])})",
  ]
  text = "\n".join(lines)
  print(text)
  (HERE / "bench_ppi.md").write_text(text + "\n")
  out = {"ppi_over_plain": round(ppi_over_plain["ratio"], 3),
         "ppi_flop_ratio": round(flop_ratio, 3), "ppi_over_flop_floor": round(floor, 3),
         "torch_over_ppi": round(torch_over_ppi["ratio"], 3),
         **{f"{k}_ms": round(1e3 * v["median"], 3) for k, v in res.items()},
         "loss_abs_diff_jax_torch": abs(l_jax - l_torch), "batch": b,
         "load_average": _runner.load_average(), "quick": args.quick}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
