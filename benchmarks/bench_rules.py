"""Benchmark: the rule engine (jaxplain.rules) vs one jax.grad, and vs Zennit 0.5.1 on the
same weights.

* JAX methods (WBP, LRP epsilon and every named composite, DeepLIFT, guided backprop,
  deconvnet) on jaxplain.models.SmallCNN (batch 64, 32x32x3) and LRP on a small Flax linen
  ViT (batch 16, 4x4 patches, 2 blocks), each against jax.grad of the target logit (one
  forward + one backward) on the same model and batch: one process, jitted, timed in
  interleaved order (same library, so no cross-library thread contention).
* Peer comparison: jaxplain LRP ``composite="epsilon_plus"`` vs Zennit's ``EpsilonPlus`` on a
  torch port of SmallCNN with identical weights, each library in its own process, alternating
  A B A B (``benchmarks/_runner.py``). The maps are compared (max |diff| / max |Zennit|).
  Zennit 0.5.1 imports torchvision, whose compiled ops do not load with torch 2.13 here; the
  Zennit process puts a stub ``torchvision.models.resnet`` in ``sys.modules`` first (Zennit
  only uses it for its ResNet canonizer, unused here).

Cost floors (convolution maps per conv layer; jax.grad w.r.t. the input: 1 forward + 1
transposed): WBP / LRP-epsilon / guided backprop 2 (x 1.0); z+ 3 (forward z, the
positive-weight forward for the denominator, one transposed; the negative input part is
skipped when the input is provably >= 0, e.g. after a ReLU) -> x 1.5 on conv-dominated
nets; alpha-beta and gamma 4 (positive- and negative-weight forwards, whose sum is z, and
their two transposes) -> x 2.0; DeepLIFT 3 (the extra forward at the reference) -> x 1.5.
Tried and not kept: the two forwards of a z+ layer as one convolution stacked on the output
channels (batch 32, 32x32x32 -> 64: 50.2 ms stacked vs 44.5 ms as two convolutions).

  python benchmarks/bench_rules.py [--quick]

Prints a table with the load average, writes benchmarks/bench_rules.md (saying which mode
ran) and ends with one JSON line of medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import types

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MAPS = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "bench_rules_maps"


def _cnn(batch):
  import jax
  from jaxplain.models import SmallCNN
  x = jax.random.uniform(jax.random.key(0), (batch, 32, 32, 3))
  t = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
  model = SmallCNN()
  v = model.init(jax.random.key(2), x[:1])
  # non-zero biases, so that the rules differ from gradient x input
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: 0.05 * jax.random.normal(jax.random.key(len(str(p))), a.shape)
      if p[-1].key == "bias" else a, v)
  return (lambda x: model.apply(v, x)), v, x, t


def _vit():
  import flax.linen as nn
  import jax

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64)(nn.LayerNorm()(x))
      return x + nn.Dense(64)(nn.gelu(nn.Dense(128)(nn.LayerNorm()(x))))

  class ViT(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(64, (4, 4), strides=(4, 4), padding="VALID")(x)
      x = x.reshape(x.shape[0], -1, 64)
      for _ in range(2):
        x = Block()(x)
      return nn.Dense(10)(nn.LayerNorm()(x).mean(axis=1))

  x = jax.random.uniform(jax.random.key(3), (16, 32, 32, 3))
  t = jax.random.randint(jax.random.key(4), (16,), 0, 10)
  v = ViT().init(jax.random.key(5), x[:1])
  return (lambda x: ViT().apply(v, x)), x, t


def _jax_fns(f, t):
  import jax
  import jax.numpy as jnp
  from jaxplain import rules

  def grad(x):
    return jax.grad(lambda x: jnp.sum(jnp.take_along_axis(f(x), t[:, None], 1)))(x)

  fns = {"grad": grad, "wbp": lambda x: rules.wbp(f, x, t),
         "lrp": lambda x: rules.lrp(f, x, t)}
  for c in ("epsilon_plus", "epsilon_alpha2_beta1", "epsilon_plus_flat", "epsilon_gamma_box"):
    fns[f"lrp {c}"] = (lambda c: lambda x: rules.lrp(f, x, t, composite=c, low=0.0,
                                                     high=1.0))(c)
  fns.update({"deeplift": lambda x: rules.deeplift(f, x, t),
              "guided_backprop": lambda x: rules.guided_backprop(f, x, t),
              "deconvnet": lambda x: rules.deconvnet(f, x, t)})
  return {k: jax.jit(v) for k, v in fns.items()}


def _interleaved(fns, x, repeats):
  import jax
  compile_s = {}
  for k, fn in fns.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    compile_s[k] = time.perf_counter() - t0
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(x))
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}, compile_s


def _flops(fns, x):
  """XLA's cost-analysis flop count of each compiled function (load-independent; the
  executables are cached by the timed calls, so this compiles nothing)."""
  out = {}
  for k, fn in fns.items():
    ca = fn.lower(x).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out[k] = float(ca.get("flops", float("nan")))
  return out


# ------------------------------------------------------------------------------------------
# contenders of the peer comparison (each runs in its own process)


def setup_jaxplain(batch: int = 64, devices: int = 1):
  """jaxplain LRP EpsilonPlus; with ``devices`` > 1 the batch is sharded over that many host
  devices (the worker's XLA_FLAGS force them; the README's CPU advice)."""
  import jax
  from jaxplain import rules
  from jaxplain.data import data_mesh, shard_batch
  if len(jax.local_devices()) != devices:
    raise RuntimeError(f"expected {devices} devices, got {jax.local_devices()}")
  f, _, x, t = _cnn(batch)
  if devices > 1:
    d = shard_batch({"x": np.asarray(x), "t": np.asarray(t)}, data_mesh())
    x, t = d["x"], d["t"]
  fn = jax.jit(lambda x, t: rules.lrp(f, x, t, composite="epsilon_plus"))
  out = jax.block_until_ready(fn(x, t))
  if devices == 1:
    MAPS.mkdir(parents=True, exist_ok=True)
    np.save(MAPS / "jaxplain.npy", np.asarray(out))
    np.save(MAPS / "grad.npy", np.asarray(jax.grad(
        lambda x: (f(x)[jax.numpy.arange(batch), t]).sum())(x)))
  return lambda: jax.block_until_ready(fn(x, t))


def _stub_torchvision():
  tv = types.ModuleType("torchvision")
  models = types.ModuleType("torchvision.models")
  resnet = types.ModuleType("torchvision.models.resnet")
  resnet.Bottleneck = type("Bottleneck", (), {})
  resnet.BasicBlock = type("BasicBlock", (), {})
  tv.models, models.resnet = models, resnet
  sys.modules.update({"torchvision": tv, "torchvision.models": models,
                      "torchvision.models.resnet": resnet})


def zennit_net(p):
  """SmallCNN in torch (ReLU and pooling as modules, so that Zennit's composites see them)
  with the weights of the params dict ``p`` (Flax layout: HWIO kernels, (in, out) dense)."""
  import torch
  from torch import nn as tnn

  class Net(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv1, self.relu1 = tnn.Conv2d(3, 32, 3, padding=1), tnn.ReLU()
      self.conv2, self.relu2 = tnn.Conv2d(32, 64, 3, padding=1), tnn.ReLU()
      self.pool1 = tnn.MaxPool2d(2)
      self.conv3, self.relu3 = tnn.Conv2d(64, 128, 3, padding=1), tnn.ReLU()
      self.pool2 = tnn.MaxPool2d(2)
      self.fc1, self.relu4 = tnn.Linear(8 * 8 * 128, 256), tnn.ReLU()
      self.fc2 = tnn.Linear(256, 10)

    def forward(self, x):  # x: NCHW
      x = self.pool1(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
      x = self.pool2(self.relu3(self.conv3(x)))
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # flatten in Flax's (H, W, C) order
      return self.fc2(self.relu4(self.fc1(x)))

  net = Net().eval()
  with torch.no_grad():
    for name in ("conv1", "conv2", "conv3"):
      getattr(net, name).weight.copy_(torch.from_numpy(
          np.asarray(p[name]["kernel"]).transpose(3, 2, 0, 1).copy()))
      getattr(net, name).bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"])))
    for name in ("fc1", "fc2"):
      getattr(net, name).weight.copy_(torch.from_numpy(np.asarray(p[name]["kernel"]).T.copy()))
      getattr(net, name).bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"])))
  return net


def setup_zennit(batch: int = 64, device: str = "cpu"):
  import torch
  _stub_torchvision()
  from zennit.attribution import Gradient
  from zennit.composites import EpsilonPlus
  f, v, x, t = _cnn(batch)
  net = zennit_net(v["params"]).to(device)
  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(device)
  onehot = torch.nn.functional.one_hot(torch.from_numpy(np.asarray(t)).long(), 10).float()
  onehot = onehot.to(device)
  with torch.no_grad():
    logit_err = float(np.abs(net(xt).cpu().numpy() - np.asarray(f(x))).max())

  def run():
    with Gradient(model=net, composite=EpsilonPlus()) as attributor:
      # output relevance = the target logit, as jaxplain.lrp
      _, rel = attributor(xt, lambda out: onehot * out)
    return rel

  rel = run()
  MAPS.mkdir(parents=True, exist_ok=True)
  np.save(MAPS / "zennit.npy", rel.detach().cpu().numpy().transpose(0, 2, 3, 1))
  return {"run": run, "info": {"torch_logit_max_abs_diff": logit_err,
                               "threads": torch.get_num_threads()}}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  from benchmarks import _runner
  import jax
  repeats = 3 if args.quick else 10

  f, _, x, t = _cnn(64)
  cnn_fns = _jax_fns(f, t)
  cnn, cnn_c = _interleaved(cnn_fns, x, repeats)
  cnn_f = _flops(cnn_fns, x)
  fv, xv, tv = _vit()
  vit_fns = {k: fn for k, fn in _jax_fns(fv, tv).items() if k in ("grad", "wbp", "lrp",
                                                                    "deeplift")}
  vit, vit_c = _interleaved(vit_fns, xv, repeats)
  vit_f = _flops(vit_fns, xv)

  peer = _runner.compare({
      "jaxplain lrp epsilon_plus": _runner.Contender("benchmarks.bench_rules:setup_jaxplain"),
      "zennit EpsilonPlus": _runner.Contender("benchmarks.bench_rules:setup_zennit"),
      "jaxplain lrp epsilon_plus, 2 host devices": _runner.Contender(
          "benchmarks.bench_rules:setup_jaxplain", kwargs={"devices": 2},
          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
  }, rounds=2 if args.quick else 4, repeats=3 if args.quick else 5)
  ours, theirs = np.load(MAPS / "jaxplain.npy"), np.load(MAPS / "zennit.npy")
  grad = np.load(MAPS / "grad.npy").reshape(64, -1)
  per_ex = (np.abs(ours - theirs).reshape(64, -1).max(1)
            / (np.abs(theirs).reshape(64, -1).max(1) + 1e-30))
  z_over = _runner.ratio(peer, "zennit EpsilonPlus", "jaxplain lrp epsilon_plus")
  z_over2 = _runner.ratio(peer, "zennit EpsilonPlus", "jaxplain lrp epsilon_plus, 2 host devices")

  lines = [f"# bench_rules (load average {_runner.load_average()}, {os.cpu_count()} cores, "
           f"jax {jax.__version__}, {jax.devices()[0].device_kind})", "",
           f"SmallCNN, batch 64, median of {repeats} interleaved repeats (jitted; compile "
           "separate; XLA flops: the compiled program's cost analysis, load-independent):", "",
           "| method | median ms | compile s | x jax.grad | XLA flops x jax.grad |",
           "|---|---:|---:|---:|---:|"]
  for k, s in cnn.items():
    lines.append(f"| {k} | {s * 1e3:.1f} | {cnn_c[k]:.1f} | {s / cnn['grad']:.2f} | "
                 f"{cnn_f[k] / cnn_f['grad']:.2f} |")
  lines += ["", "Flax linen ViT (2 blocks, 64 tokens, dim 64), batch 16:", "",
            "| method | median ms | compile s | x jax.grad | XLA flops x jax.grad |",
            "|---|---:|---:|---:|---:|"]
  for k, s in vit.items():
    lines.append(f"| {k} | {s * 1e3:.1f} | {vit_c[k]:.1f} | {s / vit['grad']:.2f} | "
                 f"{vit_f[k] / vit_f['grad']:.2f} |")
  lines += ["", _runner.table(peer, "jaxplain vs Zennit 0.5.1, SmallCNN batch 64, separate "
                              "processes A B A B"), "",
            f"Zennit / jaxplain time: {z_over['ratio']:.2f} (per round "
            f"{', '.join(f'{r:.2f}' for r in z_over['per_round'])}); with the batch sharded over "
            f"2 host devices {z_over2['ratio']:.2f} (per round "
            f"{', '.join(f'{r:.2f}' for r in z_over2['per_round'])}). Maps (EpsilonPlus, "
            f"output relevance = target logit): max |diff| / max |Zennit| per example: median "
            f"{np.median(per_ex):.1e}, max {per_ex.max():.1e}; torch port logits vs Flax max "
            f"|diff| {peer['zennit EpsilonPlus']['info']['torch_logit_max_abs_diff']:.1e}.",
            "Measured on a shared machine; the load average above is the honest context."]
  lines.append(f"Run: `python benchmarks/bench_rules.py{' --quick' if args.quick else ''}`.")
  text = "\n".join(lines)
  print(text)
  (pathlib.Path(__file__).parent / "bench_rules.md").write_text(text + "\n")
  summary = {
      "wbp_over_grad": cnn["wbp"] / cnn["grad"], "lrp_over_grad": cnn["lrp"] / cnn["grad"],
      "deeplift_over_grad": cnn["deeplift"] / cnn["grad"],
      "zennit_over_lrp": z_over["ratio"], "zennit_over_lrp_2dev": z_over2["ratio"],
      "lrp_vit_over_grad": vit["lrp"] / vit["grad"],
      **{f"{k.replace(' ', '_')}_over_grad": s / cnn["grad"] for k, s in cnn.items()
         if k not in ("grad", "wbp", "lrp", "deeplift")},
      **{f"{k.replace(' ', '_')}_flops_over_grad": v / cnn_f["grad"] for k, v in cnn_f.items()
         if k != "grad"},
      **{f"vit_{k}_flops_over_grad": v / vit_f["grad"] for k, v in vit_f.items() if k != "grad"},
      "vit_wbp_over_grad": vit["wbp"] / vit["grad"],
      "vit_deeplift_over_grad": vit["deeplift"] / vit["grad"],
      "grad_ms": cnn["grad"] * 1e3, "vit_grad_ms": vit["grad"] * 1e3,
      "jaxplain_epsilon_plus_ms": peer["jaxplain lrp epsilon_plus"]["median"] * 1e3,
      "zennit_epsilon_plus_ms": peer["zennit EpsilonPlus"]["median"] * 1e3,
      "zennit_map_max_rel_diff": float(per_ex.max()),
      "zennit_map_median_rel_diff": float(np.median(per_ex)),
      "load_average": _runner.load_average(), "repeats": repeats}
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
