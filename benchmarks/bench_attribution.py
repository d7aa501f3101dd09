"""Attribution speed: jaxplain Integrated Gradients vs its floor and vs Captum; gradient vs
Captum Saliency. Same weights, measured side by side (interleaved rounds) in one run.

Model: jaxplain.models.SmallCNN (conv 32-64-pool-128-pool, dense 256-10) on 32x32x3, batch
64, ported to an equivalent torch ``nn.Sequential`` (logits checked equal before timing; IG
checked to agree at ~1e-3 before timing).

  python benchmarks/bench_attribution.py            # m = 32 and 128, 3 rounds
  python benchmarks/bench_attribution.py --quick    # m = 32, 1 round (about a minute idle)

Writes benchmarks/bench_attribution.md and ends with one JSON line of medians and ratios:
ig_over_floor (jaxplain IG / (m x one jitted forward+backward), worst over m),
captum_over_ig (Captum IG / jaxplain IG, worst over m), captum_over_gradient.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxplain  # noqa: E402
from jaxplain.models import SmallCNN  # noqa: E402

B = 64
METHOD = "gausslegendre"  # the same nodes and weights in Captum and jaxplain


def torch_model(params):
  """The same network in torch; NHWC flattening order restored before the dense layers."""
  import torch
  from torch import nn

  class ToNHWC(nn.Module):
    def forward(self, x):
      return x.permute(0, 2, 3, 1)

  net = nn.Sequential(
      nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
      nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
      ToNHWC(), nn.Flatten(), nn.Linear(8 * 8 * 128, 256), nn.ReLU(), nn.Linear(256, 10))
  convs = [net[0], net[2], net[5]]
  dense = [net[10], net[12]]
  with torch.no_grad():
    for mod, name in zip(convs, ("conv1", "conv2", "conv3")):
      k = np.asarray(params[name]["kernel"])           # (kh, kw, in, out)
      mod.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
      mod.bias.copy_(torch.from_numpy(np.asarray(params[name]["bias"])))
    for mod, name in zip(dense, ("fc1", "fc2")):
      mod.weight.copy_(torch.from_numpy(np.asarray(params[name]["kernel"]).T.copy()))
      mod.bias.copy_(torch.from_numpy(np.asarray(params[name]["bias"])))
  return net.eval()


def peak_rss_delta(fn):
  """Run fn once; return (result, increase of the process's peak RSS in MB during it)."""
  def read(key):
    with open("/proc/self/status") as fh:
      for line in fh:
        if line.startswith(key):
          return int(line.split()[1]) / 1e3
    return float("nan")
  try:
    with open("/proc/self/clear_refs", "w") as fh:
      fh.write("5")
  except OSError:
    return fn(), float("nan")
  before = read("VmRSS")
  out = fn()
  return out, read("VmHWM") - before


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="m = 32 only, 1 round")
  ap.add_argument("--rounds", type=int, default=None)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".md")))
  args = ap.parse_args()
  import captum
  import torch
  from captum.attr import IntegratedGradients, Saliency
  torch.set_num_threads(os.cpu_count())
  steps_list = (32,) if args.quick else (32, 128)
  rounds = args.rounds or (1 if args.quick else 3)

  model = SmallCNN()
  x_np = np.random.default_rng(0).uniform(size=(B, 32, 32, 3)).astype(np.float32)
  t_np = (np.arange(B) % 10).astype(np.int64)
  x, t = jnp.asarray(x_np), jnp.asarray(t_np, jnp.int32)
  variables = model.init(jax.random.key(0), x[:1])
  f = functools.partial(model.apply, variables)
  net = torch_model(variables["params"])
  xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
  tt = torch.from_numpy(t_np)

  with torch.no_grad():
    dlogit = np.max(np.abs(net(xt).numpy() - np.asarray(f(x))))
  print(f"torch vs flax logits: max |diff| = {dlogit:.2e}")
  assert dlogit < 1e-4, "the torch port does not match the flax model"

  cig = IntegratedGradients(net)
  sal = Saliency(net)
  jgrad = jax.jit(lambda z: jaxplain.gradient(f, z, t))

  def jig(m, **kw):
    return jax.jit(lambda z: jaxplain.integrated_gradients(f, z, t, steps=m, method=METHOD,
                                                           **kw))

  def captum_ig(m, ibs):
    return lambda: cig.attribute(xt, baselines=0.0, target=tt, n_steps=m, method=METHOD,
                                 internal_batch_size=ibs)

  # Captum's internal_batch_size: pick the fastest of a few at m = 32 (rows per forward)
  ibs_times = {}
  for ibs in (64, 256, 512, 1024):
    fn = captum_ig(32, ibs)
    fn()
    runs = []
    for _ in range(2):
      t0 = time.perf_counter()
      fn()
      runs.append(time.perf_counter() - t0)
    ibs_times[ibs] = min(runs)
  best_ibs = min(ibs_times, key=ibs_times.get)
  print("Captum IG m=32 by internal_batch_size:",
        {k: round(v, 2) for k, v in ibs_times.items()}, "-> best", best_ibs)

  # jitted jaxplain functions: compile time separately, XLA temp memory from the compiler
  jax_fns, compile_s, temp_mb = {}, {}, {}

  def add(name, jitted):
    t0 = time.perf_counter()
    compiled = jitted.lower(x).compile()
    jax.block_until_ready(compiled(x))
    compile_s[name] = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    temp_mb[name] = ma.temp_size_in_bytes / 1e6 if ma is not None else float("nan")
    jax_fns[name] = compiled

  add("gradient", jgrad)
  for m in steps_list:
    add(f"ig{m}", jig(m))
  add("ig32_scan", jig(32, loop="scan"))

  # agreement before timing
  ig_j = np.asarray(jax_fns["ig32"](x))
  ig_c = captum_ig(32, best_ibs)().numpy().transpose(0, 2, 3, 1)
  ig_err = np.max(np.abs(ig_j - ig_c)) / np.max(np.abs(ig_c))
  g_c = sal.attribute(xt, target=tt, abs=False).numpy().transpose(0, 2, 3, 1)
  g_err = np.max(np.abs(np.asarray(jax_fns["gradient"](x)) - g_c)) / np.max(np.abs(g_c))
  print(f"IG m=32 jaxplain vs Captum: max |diff| / max |IG| = {ig_err:.1e}; "
        f"gradient vs Saliency: {g_err:.1e}")
  assert ig_err < 1e-3 and g_err < 1e-4, "jaxplain and Captum disagree"

  # interleaved rounds
  tasks = {"gradient": lambda: jax.block_until_ready(jax_fns["gradient"](x)),
           "captum_saliency": lambda: sal.attribute(xt, target=tt, abs=False)}
  for m in steps_list:
    tasks[f"ig{m}"] = functools.partial(lambda m: jax.block_until_ready(jax_fns[f"ig{m}"](x)), m)
    tasks[f"captum_ig{m}"] = captum_ig(m, best_ibs)
  if not args.quick:
    tasks["ig32_scan"] = lambda: jax.block_until_ready(jax_fns["ig32_scan"](x))
  tasks["captum_saliency"]()  # warm-up
  times = {k: [] for k in tasks}
  peak = {}
  for r in range(rounds):
    for k, fn in tasks.items():
      reps = 5 if k in ("gradient", "captum_saliency") else 1
      for _ in range(reps):
        if r == 0 and k.startswith("captum_ig") and k not in peak:
          t0 = time.perf_counter()
          _, peak[k] = peak_rss_delta(fn)
          times[k].append(time.perf_counter() - t0)
          continue
        t0 = time.perf_counter()
        fn()
        times[k].append(time.perf_counter() - t0)
    print(f"round {r + 1}/{rounds} done", flush=True)
  med = {k: float(np.median(v)) for k, v in times.items()}

  res = {"batch": B, "method": METHOD, "captum_internal_batch_size": best_ibs,
         "gradient_s": med["gradient"], "captum_saliency_s": med["captum_saliency"],
         "captum_over_gradient": med["captum_saliency"] / med["gradient"]}
  rows = []
  ratios_floor, ratios_captum = [], []
  for m in steps_list:
    floor = m * med["gradient"]
    r_floor = med[f"ig{m}"] / floor
    r_captum = med[f"captum_ig{m}"] / med[f"ig{m}"]
    ratios_floor.append(r_floor)
    ratios_captum.append(r_captum)
    res.update({f"ig{m}_s": med[f"ig{m}"], f"floor{m}_s": floor,
                f"captum_ig{m}_s": med[f"captum_ig{m}"], f"ig_over_floor_m{m}": r_floor,
                f"captum_over_ig_m{m}": r_captum})
    rows.append((f"IG m={m} (chunk=4, unroll)", med[f"ig{m}"], compile_s[f"ig{m}"],
                 temp_mb[f"ig{m}"], f"{r_floor:.2f} x floor, Captum {r_captum:.2f} x slower"))
    rows.append((f"floor m={m} (m x gradient)", floor, float("nan"), temp_mb["gradient"], ""))
    rows.append((f"Captum IG m={m} (ibs={best_ibs})", med[f"captum_ig{m}"], float("nan"),
                 peak.get(f"captum_ig{m}", float("nan")), "peak RSS increase"))
  if "ig32_scan" in med:
    res["ig32_scan_s"] = med["ig32_scan"]
    rows.append(("IG m=32 (chunk=4, loop=scan)", med["ig32_scan"], compile_s["ig32_scan"],
                 temp_mb["ig32_scan"], f"{med['ig32_scan'] / (32 * med['gradient']):.2f} x floor"))
  rows.append(("jaxplain.gradient", med["gradient"], compile_s["gradient"],
               temp_mb["gradient"], ""))
  rows.append(("Captum Saliency", med["captum_saliency"], float("nan"), float("nan"),
               f"{res['captum_over_gradient']:.2f} x jaxplain"))
  res["ig_over_floor"] = max(ratios_floor)
  res["captum_over_ig"] = min(ratios_captum)
  res["ig_vs_captum_max_rel_diff"] = float(ig_err)

  load = os.getloadavg()
  lines = [
      "# bench_attribution: jaxplain IG / gradient vs floor and Captum",
      "",
      f"Machine: {os.cpu_count()}-core CPU (no GPU), jax {jax.__version__}, torch "
      f"{torch.__version__} ({torch.get_num_threads()} threads), captum {captum.__version__}. "
      f"**Shared machine**: other jobs were running (load average {load[0]:.1f} / "
      f"{load[1]:.1f} / {load[2]:.1f} at the end on {os.cpu_count()} cores), so absolute "
      "times are inflated and noisy; the ratios come from interleaved rounds (each round "
      "runs every contender once), medians of "
      f"{rounds} round(s){' (--quick)' if args.quick else ''}.",
      "",
      f"SmallCNN 32x32x3, batch {B}, targets b mod 10, same weights in flax and torch "
      f"(logits max |diff| {dlogit:.1e}); IG method {METHOD}, black baseline; IG vs Captum "
      f"max |diff| / max |IG| = {ig_err:.1e} (m = 32). Captum's internal_batch_size chosen as "
      f"the fastest of {sorted(ibs_times)} at m = 32: {best_ibs} "
      f"({', '.join(f'{k}: {v:.2f} s' for k, v in ibs_times.items())}).",
      "",
      "| contender | median s | compile s | memory MB | note |",
      "|---|---:|---:|---:|---|",
  ]
  for name, s, c, mb, note in rows:
    cs = "" if np.isnan(c) else f"{c:.1f}"
    ms = "" if np.isnan(mb) else f"{mb:.0f}"
    lines.append(f"| {name} | {s:.3f} | {cs} | {ms} | {note} |")
  lines += [
      "",
      "Memory: for jaxplain the XLA temp buffer size from `compiled.memory_analysis()`; for "
      "Captum the increase of the process's peak RSS during one call.",
      "",
      "Findings: on XLA:CPU an unrolled sequence of chunks of steps is the fast layout; a "
      "`lax.scan` over the same chunks (`loop=\"scan\"`) runs its loop body 2-3.5x slower "
      "here (inside the while loop XLA:CPU does not route the backward convolutions to its "
      "YNNPACK kernels). Left independent, the unrolled chunks were scheduled as if "
      "concurrent and all kept live (temp memory about 48 MB per step: 1.5 GB at m = 32, "
      "6.2 GB at m = 128; an `optimization_barrier` between chunks was removed by XLA's "
      "passes); `loop=\"unroll\"` now gives each chunk's nodes an exactly-zero data "
      "dependency on the previous chunks' sum (`a + min(|sum[0]|, 0)`), which sequences them: "
      "temp memory is one chunk's (about 0.22 GB at chunk = 4) whatever m, at the same speed "
      "and with the same results.",
      "",
      "```json",
      json.dumps(res),
      "```",
  ]
  pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
  print("\n".join(lines[8:8 + len(rows) + 2]))
  print(json.dumps(res))


if __name__ == "__main__":
  main()
