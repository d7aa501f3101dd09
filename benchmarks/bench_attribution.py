"""Attribution speed: jaxplain Integrated Gradients vs its floor and vs Captum; gradient vs
Captum Saliency. Every contender runs in its own process, alternating A B A B
(benchmarks/_runner.py), so JAX's and torch's thread pools never compete in one process.

Model: jaxplain.models.SmallCNN (conv 32-64-pool-128-pool, dense 256-10) on 32x32x3, batch
64, ported to an equivalent torch ``nn.Sequential``. Before timing, the parent process checks
that the logits agree and that jaxplain's IG agrees with Captum's (m = 32).

Contenders: Captum (torch with ``os.cpu_count()`` threads, ``internal_batch_size`` 64);
jaxplain at its defaults on one CPU device; jaxplain with the batch sharded over
``--xla_force_host_platform_device_count=2`` host devices (``jaxplain.data.shard_batch``), the
README's CPU advice. The floor of IG is m x one jitted gradient (forward + backward) of the
same batch in the same device setting.

  python benchmarks/bench_attribution.py            # m = 32 and 128, 5 rounds
  python benchmarks/bench_attribution.py --quick    # m = 32, 2 rounds
  python benchmarks/bench_attribution.py --table    # also the chunk x devices table (m = 32)

Writes benchmarks/bench_attribution.md and ends with one JSON line of medians and ratios:
captum_over_ig (Captum IG / jaxplain IG at its defaults, worst over m), captum_over_gradient
(Captum Saliency / jaxplain.gradient, defaults), ig_over_floor (jaxplain IG / its floor,
defaults, worst over m), and the same with the suffix ``_2dev`` for two host devices.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import _runner  # noqa: E402

B = 64
METHOD = "gausslegendre"  # the same nodes and weights in Captum and jaxplain
HERE = "benchmarks.bench_attribution"
# Everything in the .md from this line on is hand-written (what was tried) and kept as it is.
NOTES = "<!-- notes: kept across runs -->"


def data(batch: int = B):
  x = np.random.default_rng(0).uniform(size=(batch, 32, 32, 3)).astype(np.float32)
  return x, (np.arange(batch) % 10).astype(np.int32)


def flax_model():
  import jax
  import jax.numpy as jnp
  from jaxplain.models import SmallCNN
  model = SmallCNN()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
  return functools.partial(model.apply, variables), variables["params"]


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


def _peak_rss_delta_mb(fn):
  """Run fn once; the increase of this process's peak RSS during it, in MB."""
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
    fn()
    return float("nan")
  before = read("VmRSS")
  fn()
  return read("VmHWM") - before


# ---- contenders (each runs in its own process) -------------------------------------------

def setup_jax(kind: str, m: int = 32, chunk=4, devices: int = 1, batch: int = B):
  """jaxplain IG (``kind="ig"``) or gradient; the batch sharded when ``devices`` > 1 (the
  worker's XLA_FLAGS force that many host devices)."""
  import jax
  import jaxplain
  from jaxplain.data import data_mesh, shard_batch
  if len(jax.local_devices()) != devices:
    raise RuntimeError(f"expected {devices} devices, got {jax.local_devices()}")
  f, _ = flax_model()
  x_np, t_np = data(batch)
  d = shard_batch({"x": x_np, "t": t_np}, data_mesh())
  x, t = d["x"], d["t"]
  if kind == "ig":
    kw = {} if chunk == "default" else {"chunk": chunk}
    fn = jax.jit(lambda x, t: jaxplain.integrated_gradients(f, x, t, steps=m, method=METHOD,
                                                            **kw))
  else:
    fn = jax.jit(lambda x, t: jaxplain.gradient(f, x, t))
  compiled = fn.lower(x, t).compile()
  jax.block_until_ready(compiled(x, t))
  ma = compiled.memory_analysis()
  info = {"temp_mb": ma.temp_size_in_bytes / 1e6 if ma is not None else None,
          "jax": jax.__version__}
  return {"run": lambda: jax.block_until_ready(compiled(x, t)), "info": info}


def setup_captum(kind: str, m: int = 32, ibs: int = 64, device: str = "cpu",
                 batch: int = B):
  """Captum IntegratedGradients (``kind="ig"``) or Saliency on the torch port (``ibs``
  None: all ``m`` path points of the batch in one forward, the fastest on a GPU)."""
  import captum
  import torch
  from captum.attr import IntegratedGradients, Saliency
  torch.set_num_threads(os.cpu_count())
  _, params = flax_model()
  net = torch_model(params).to(device)
  x_np, t_np = data(batch)
  xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)
  tt = torch.from_numpy(t_np.astype(np.int64)).to(device)
  if kind == "ig":
    cig = IntegratedGradients(net)
    run = lambda: cig.attribute(xt, baselines=0.0, target=tt, n_steps=m, method=METHOD,
                                internal_batch_size=ibs)
  else:
    sal = Saliency(net)
    run = lambda: sal.attribute(xt, target=tt, abs=False)
  run()
  info = {"peak_rss_delta_mb": _peak_rss_delta_mb(run), "torch": torch.__version__,
          "captum": captum.__version__, "threads": torch.get_num_threads()}
  return {"run": run, "info": info}


def _jax(kind, devices=1, ynn=False, **kw):
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"} if devices > 1 else {}
  if ynn:  # jaxlib 0.10's own defaults: convolutions in YNNPACK, one core (jaxplain/_xla_cpu.py)
    env.update(JAXPLAIN_XLA_CPU_FLAGS="0", XLA_FLAGS="")  # not the flag this process's import set
  return _runner.Contender(f"{HERE}:setup_jax", dict(kind=kind, devices=devices, **kw), env=env)


def _captum(kind, **kw):
  return _runner.Contender(f"{HERE}:setup_captum", dict(kind=kind, **kw))


# ---- the parent: agreement check, the alternating runs, the report ------------------------

def agreement():
  """Logits, IG (m = 32) and gradients of both libraries on the same weights, in this process
  (before any timing)."""
  import jax
  import jax.numpy as jnp
  import jaxplain
  import torch
  from captum.attr import IntegratedGradients, Saliency
  f, params = flax_model()
  net = torch_model(params)
  x_np, t_np = data()
  x, t = jnp.asarray(x_np), jnp.asarray(t_np)
  xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
  tt = torch.from_numpy(t_np.astype(np.int64))
  with torch.no_grad():
    dlogit = float(np.max(np.abs(net(xt).numpy() - np.asarray(f(x)))))
  ig_j = np.asarray(jax.jit(lambda x: jaxplain.integrated_gradients(
      f, x, t, steps=32, method=METHOD))(x))
  ig_c = IntegratedGradients(net).attribute(xt, baselines=0.0, target=tt, n_steps=32,
                                            method=METHOD).numpy().transpose(0, 2, 3, 1)
  g_c = Saliency(net).attribute(xt, target=tt, abs=False).numpy().transpose(0, 2, 3, 1)
  g_j = np.asarray(jax.jit(lambda x: jaxplain.gradient(f, x, t))(x))
  # Per example: a ReLU or max-pool switch that float32 rounding flips in one library changes
  # that example's gradient by percents (seen once: 1 of 64 examples 2.4 %, torch float64 =
  # JAX float64 to 8e-16), so the check is on how many examples agree, not on the one maximum.
  def per_example(a, c):
    return np.max(np.abs(a - c).reshape(len(a), -1), axis=1) / np.max(np.abs(c))
  ig_e, g_e = per_example(ig_j, ig_c), per_example(g_j, g_c)
  out = {"logits_max_abs_diff": dlogit,
         "ig_max_rel_diff": float(ig_e.max()), "gradient_max_rel_diff": float(g_e.max()),
         "ig_median_rel_diff": float(np.median(ig_e)),
         "gradient_median_rel_diff": float(np.median(g_e)),
         "ig_examples_over_1e-3": int(np.sum(ig_e >= 1e-3)),
         "gradient_examples_over_1e-4": int(np.sum(g_e >= 1e-4))}
  assert dlogit < 1e-4, f"the torch port does not match the flax model: {out}"
  assert (out["ig_examples_over_1e-3"] <= len(t_np) // 16
          and out["gradient_examples_over_1e-4"] <= len(t_np) // 16), out
  return out


SUFFIXES = ("", "_2dev", "_ynn")  # one device (jaxplain's flag), 2 host devices, jaxlib defaults


def _cpu_s(r):
  return r["median"] * r["cpu"]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="m = 32 only, 2 rounds")
  ap.add_argument("--rounds", type=int, default=None)
  ap.add_argument("--table", action="store_true",
                  help="also time chunk in (1, 2, 4, 8) x devices in (1, 2) at m = 32")
  ap.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".md")))
  args = ap.parse_args()
  steps_list = (32,) if args.quick else (32, 128)
  rounds = args.rounds or (2 if args.quick else 5)
  load_start = _runner.load_average()
  agree = agreement()
  print("agreement:", agree, flush=True)

  groups = {"gradient": ({
      "captum_saliency": _captum("saliency"),
      "gradient": _jax("gradient"),
      "gradient_2dev": _jax("gradient", devices=2),
      "gradient_ynn": _jax("gradient", ynn=True)}, 10)}
  for m in steps_list:
    groups[f"ig{m}"] = ({
        f"captum_ig{m}": _captum("ig", m=m),
        f"ig{m}": _jax("ig", m=m, chunk="default"),
        f"ig{m}_2dev": _jax("ig", m=m, chunk="default", devices=2),
        f"ig{m}_ynn": _jax("ig", m=m, chunk="default", ynn=True)}, 3 if m <= 32 else 1)
  if args.table:
    groups["table"] = ({f"ig32_chunk{c}_{d}dev": _jax("ig", m=32, chunk=c, devices=d)
                        for d in (1, 2) for c in (1, 2, 4, 8)}, 2)
  res = {}
  for name, (contenders, repeats) in groups.items():
    print(f"{name}: {len(contenders)} contenders x {rounds} rounds", file=sys.stderr, flush=True)
    res.update(_runner.compare(contenders, rounds=rounds if name != "table" else 2,
                               repeats=repeats))
  load_end = _runner.load_average()

  out = {"batch": B, "method": METHOD, "rounds": rounds, "load_start": load_start,
         "load_end": load_end, "ig_vs_captum_max_rel_diff": agree["ig_max_rel_diff"]}
  for k, r in res.items():
    out[f"{k}_s"] = r["median"]
  for sfx in SUFFIXES:
    g = res[f"gradient{sfx}"]["median"]
    out[f"captum_over_gradient{sfx}"] = _runner.ratio(res, "captum_saliency",
                                                      f"gradient{sfx}")["ratio"]
    floors, caps = [], []
    for m in steps_list:
      ig = res[f"ig{m}{sfx}"]["median"]
      out[f"ig_over_floor_m{m}{sfx}"] = ig / (m * g)
      out[f"captum_over_ig_m{m}{sfx}"] = _runner.ratio(res, f"captum_ig{m}", f"ig{m}{sfx}")["ratio"]
      floors.append(out[f"ig_over_floor_m{m}{sfx}"])
      caps.append(out[f"captum_over_ig_m{m}{sfx}"])
    out[f"ig_over_floor{sfx}"] = max(floors)
    out[f"captum_over_ig{sfx}"] = min(caps)

  lines = _report(res, out, agree, steps_list, rounds, args)
  _runner.write_keeping_notes(args.out, lines, NOTES)
  print("\n".join(lines))
  print(json.dumps(out))


def _pairs(res, a, b):
  r = _runner.ratio(res, a, b)
  return f"{r['ratio']:.2f} (rounds {', '.join(f'{v:.2f}' for v in r['per_round'])})"


def _report(res, out, agree, steps_list, rounds, args):
  import jax
  info_c = res["captum_saliency"]["info"]
  lines = [
      "# bench_attribution: jaxplain IG / gradient vs its floor and Captum",
      "",
      f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}, no GPU), jax "
      f"{jax.__version__}, torch {info_c['torch']} ({info_c['threads']} threads), captum "
      f"{info_c['captum']}. Load average (1/5/15 min) {out['load_start']} at the start, "
      f"{out['load_end']} at the end on {os.cpu_count()} cores. Each contender runs in its own process, alternating "
      f"A B A B over {rounds} rounds{' (--quick)' if args.quick else ''} "
      "(`benchmarks/_runner.py`); medians over all timed calls, min - max, CPU use = "
      "(user + sys) / wall while timing (100 % = one core), CPU-s = median x CPU use. "
      "Ratios are median / median with the per-round ratios (one A and one B run of the "
      "same round) beside them.",
      "",
      f"SmallCNN 32x32x3, batch {B}, targets b mod 10, same weights in flax and torch "
      f"(logits max |diff| {agree['logits_max_abs_diff']:.1e}); IG {METHOD}, black baseline, "
      f"Captum internal_batch_size 64. Per example max |diff| / max |map|: IG vs Captum "
      f"(m = 32) median {agree['ig_median_rel_diff']:.1e}, max {agree['ig_max_rel_diff']:.1e} "
      f"({agree['ig_examples_over_1e-3']} of {B} examples over 1e-3); gradient vs Saliency "
      f"median {agree['gradient_median_rel_diff']:.1e}, max "
      f"{agree['gradient_max_rel_diff']:.1e} ({agree['gradient_examples_over_1e-4']} over "
      "1e-4: a ReLU / max-pool switch that float32 rounding flips in one library). `2dev`: the batch sharded over two forced host "
      "devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`, "
      "`jaxplain.data.shard_batch`). `ynn`: one device with jaxlib 0.10's own XLA:CPU "
      "defaults (`JAXPLAIN_XLA_CPU_FLAGS=0`: convolutions in YNNPACK on one core); the other "
      "jaxplain rows run with the flag `import jaxplain` sets (`jaxplain/_xla_cpu.py`).",
      "",
      "| contender | median | min - max | CPU use | CPU-s | memory MB | note |",
      "|---|---:|---:|---:|---:|---:|---|",
  ]

  def row(k, note=""):
    r = res[k]
    mem = r["info"].get("temp_mb", r["info"].get("peak_rss_delta_mb"))
    mem = "" if mem is None or mem != mem else f"{mem:.0f}"
    lines.append(f"| {k} | {_runner._fmt(r['median'])} | {_runner._fmt(r['min'])} - "
                 f"{_runner._fmt(r['max'])} | {100 * r['cpu']:.0f} % | {_cpu_s(r):.2f} | "
                 f"{mem} | {note} |")

  for m in steps_list:
    row(f"captum_ig{m}", "peak RSS increase")
    for sfx in SUFFIXES:
      row(f"ig{m}{sfx}", f"{out[f'ig_over_floor_m{m}{sfx}']:.2f} x floor; Captum / this "
          f"{_pairs(res, f'captum_ig{m}', f'ig{m}{sfx}')}")
  row("captum_saliency")
  for sfx in SUFFIXES:
    row(f"gradient{sfx}", f"Captum / this {_pairs(res, 'captum_saliency', f'gradient{sfx}')}")
  if "ig32_chunk1_1dev" in res:
    lines += ["", "Chunk size x devices, IG m = 32 (2 rounds, alternating):", "",
              "| contender | median | CPU use | CPU-s | XLA temp MB |", "|---|---:|---:|---:|---:|"]
    for k, r in res.items():
      if k.startswith("ig32_chunk"):
        lines.append(f"| {k} | {_runner._fmt(r['median'])} | {100 * r['cpu']:.0f} % | "
                     f"{_cpu_s(r):.2f} | {r['info']['temp_mb']:.0f} |")
  lines += [
      "",
      "Memory: for jaxplain the XLA temp buffer size from `compiled.memory_analysis()` (per "
      "device); for Captum the increase of the process's peak RSS during one call.",
      "",
      "```json",
      json.dumps(out),
      "```",
  ]
  return lines


if __name__ == "__main__":
  main()
