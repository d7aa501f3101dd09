"""The benchmarks' peer comparisons on a GPU: jaxplain (JAX on the GPU) vs Captum, Zennit,
Quantus and a plain PyTorch loop (torch on the same GPU), plus jaxplain's own ratios
(rule maps and PPI steps over one gradient / one plain step).

Every case reuses the ``setup_*`` contender of the CPU benchmark that defines it (same
models, weights, data and settings; torch contenders take ``device="cuda"``), so the two
sets of numbers describe the same computations:

==========================  ===================================  ==============================
case                        jaxplain                             peer
==========================  ===================================  ==============================
gradient, B = 64 / 512      ``gradient``                         Captum ``Saliency``
IG m = 32, B = 64 / 512     ``integrated_gradients`` (GL nodes)  Captum IG, all points at once
IG to 1 % / 0.1 %, B = 64   ``tol=`` (while and local drivers)   Captum IG, least n_steps [1]_
target="all" (m = 16)       one call, 10 maps                    10 jaxplain calls
LRP EpsilonPlus, B = 64     ``lrp(composite="epsilon_plus")``    Zennit ``EpsilonPlus``
rules / grad, B = 64        WBP, LRP, composites, DeepLIFT, ...  ``jax.grad`` of the target
PPI step, LeNet B = 64      ``ppi.make_ppi_loss`` step           torch PPI step; plain step
filter ablation (128)       ``sweep_layer`` (channelwise)        torch loop over filters
pixel flipping, N = 256     ``evaluation.pixel_flipping``        Quantus ``PixelFlipping``
max-sensitivity, N = 256    ``evaluation.max_sensitivity``       Quantus ``MaxSensitivity``
KernelSHAP, N = 64          ``kernel_shap`` (200 samples)        Captum ``KernelShap``
GradientSHAP, B = 16        ``gradient_shap`` (32 draws)         Captum ``GradientShap``
noise tunnel IG, B = 16     ``noise_tunnel`` of IG, 8 x 16       Captum ``NoiseTunnel(IG)``
DeepLiftShap, B = 16        ``deeplift_shap`` (16 references)    Captum ``DeepLiftShap``
==========================  ===================================  ==============================

.. [1] Captum's smallest ``n_steps`` for which every example meets the tolerance, searched
   before timing (bench_ig_accuracy's contender), 4,096 rows per forward.

Both libraries compute in full float32 (``jax_default_matmul_precision="highest"``; torch's
TF32 switches off), so equal work is compared and the maps can be checked against each other.
Each library runs in its own process (all of its cases in that process, compiled / warmed
first, then timed in interleaved order, the median of ``repeats`` calls each, every call
waiting for the device), the two processes alternating A B A B over ``--rounds``; a round's
JAX process reuses the compilations of the one before (a persistent compilation cache in a
temporary folder). Median over all timed calls of all rounds. Maps and metric values are
saved by the processes and compared in the parent.

  python benchmarks/bench_gpu.py            # 2 rounds
  python benchmarks/bench_gpu.py --quick    # 1 round, fewer repeats (about a minute warm)

Writes benchmarks/bench_gpu.md (the hand-written notes below its marker kept) and ends with
one JSON line: ``captum_over_gradient``, ``captum_over_ig`` (B = 64 and ``_b512``),
``captum_over_adaptive_1pct`` / ``_01pct``, ``all_targets_speedup``, ``zennit_over_lrp``,
``*_over_grad`` of every rule, ``ppi_over_plain``, ``torch_over_ppi``,
``torch_loop_over_sweep``, ``quantus_over_pixel_flipping``, ``quantus_over_max_sensitivity``,
``kernelshap_over_captum``, ``captum_over_gradient_shap`` / ``_noise_tunnel_ig`` /
``_deeplift_shap``, the medians, and the device.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks import _runner  # noqa: E402

NOTES = _runner.NOTES
RULES = ("wbp", "lrp", "lrp epsilon_plus", "lrp epsilon_alpha2_beta1", "lrp epsilon_gamma_box",
         "deeplift", "guided_backprop")


AVERAGED = ("gradient_shap", "noise_tunnel_ig", "deeplift_shap")  # bench_averaged's cases


def _cases(lib: str, quick: bool, device: str = "cuda", smoke: bool = False) -> dict:
  """name -> (target "module:function", kwargs) of the existing contenders; ``device``: the
  torch device (the CPU only to try this script on a machine without a GPU, with ``smoke``:
  16 images for the metrics, 4 for KernelSHAP and IG to a tolerance)."""
  B = "benchmarks.bench_"
  n, ns, bt = (16, 4, 4) if smoke else (256, 64, 64)
  if lib == "jax":
    c = {
        "gradient_b64": (B + "attribution:setup_jax", dict(kind="gradient")),
        "ig32_b64": (B + "attribution:setup_jax", dict(kind="ig", m=32, chunk="default")),
        "lrp_epsilon_plus_b64": (B + "rules:setup_jaxplain", dict(batch=64)),
        "ppi_step": (B + "ppi:setup_jax", dict(saliency="wbp")),
        "plain_step": (B + "ppi:setup_jax", dict(saliency="plain")),
        "sweep": (B + "interventions:setup_jax", dict(kind="chanwise")),
        "sweep_prefix": (B + "interventions:setup_jax", dict(kind="prefix")),
        "all_targets": (B + "ig_accuracy:setup_all_targets",
                        dict(model="smallcnn", b=64, mode="all")),
        "loop10": (B + "ig_accuracy:setup_all_targets",
                   dict(model="smallcnn", b=64, mode="loop")),
        "pixel_flipping": (B + "metrics:setup_jax", dict(metric="pixel_flipping", n=n)),
        "max_sensitivity": (B + "metrics:setup_jax", dict(metric="max_sensitivity", n=n)),
        "kernelshap": (B + "metrics:setup_jax_kernelshap", dict(n=ns, n_samples=200)),
        "rules": ("benchmarks.bench_gpu:setup_rules", dict(batch=64)),
    }
    c.update({k: (B + "averaged:setup_jax", dict(kind=k)) for k in AVERAGED})
    for tol in ("1pct", "01pct"):
      for drv in ("while", "local"):
        c[f"adaptive_{drv}_{tol}"] = (B + "ig_accuracy:setup_adaptive", dict(
            model="smallcnn", b=bt, tol={"1pct": 1e-2, "01pct": 1e-3}[tol], driver=drv))
    if not quick:
      c["gradient_b512"] = ("benchmarks.bench_gpu:setup_jax_b512", dict(kind="gradient"))
      c["ig32_b512"] = ("benchmarks.bench_gpu:setup_jax_b512", dict(kind="ig"))
    return c
  dev = dict(device=device)
  c = {
      "gradient_b64": (B + "attribution:setup_captum", dict(kind="gradient", **dev)),
      "ig32_b64": (B + "attribution:setup_captum", dict(kind="ig", m=32, ibs=None, **dev)),
      "lrp_epsilon_plus_b64": (B + "rules:setup_zennit", dict(batch=64, **dev)),
      "ppi_step": (B + "ppi:setup_torch", dict(kind="ppi", **dev)),
      "plain_step": (B + "ppi:setup_torch", dict(kind="plain", **dev)),
      "sweep": (B + "interventions:setup_torch", dict(kind="loop", **dev)),
      "pixel_flipping": (B + "metrics:setup_quantus", dict(metric="pixel_flipping", n=n,
                                                            **dev)),
      "max_sensitivity": (B + "metrics:setup_quantus", dict(metric="max_sensitivity", n=n,
                                                             **dev)),
      "kernelshap": (B + "metrics:setup_captum_kernelshap", dict(n=ns, n_samples=200, **dev)),
  }
  c.update({k: (B + "averaged:setup_captum", dict(kind=k, **dev)) for k in AVERAGED})
  for tol in ("1pct", "01pct"):
    c[f"ig_tol_{tol}"] = (B + "ig_accuracy:setup_captum", dict(
        model="smallcnn", b=bt, tol={"1pct": 1e-2, "01pct": 1e-3}[tol], ibs=4096, **dev))
  if not quick:
    c["gradient_b512"] = ("benchmarks.bench_gpu:setup_captum_b512", dict(kind="gradient", **dev))
    c["ig32_b512"] = ("benchmarks.bench_gpu:setup_captum_b512", dict(kind="ig", **dev))
  return c


# -- cases that exist only here -----------------------------------------------------------------

def setup_rules(batch: int = 64):
  """jax.grad and every rule of bench_rules on its SmallCNN, one jitted function each."""
  import jax
  from benchmarks import bench_rules
  f, _, x, t = bench_rules._cnn(batch)  # pylint: disable=protected-access
  fns = bench_rules._jax_fns(f, t)      # pylint: disable=protected-access
  calls = {k: (fns[k], x) for k in ("grad",) + RULES}
  fv, xv, tv = bench_rules._vit()       # pylint: disable=protected-access
  vit = bench_rules._jax_fns(fv, tv)    # pylint: disable=protected-access
  calls.update({"vit grad": (vit["grad"], xv), "vit lrp": (vit["lrp"], xv)})
  for fn, a in calls.values():
    jax.block_until_ready(fn(a))
  return {"multi": {k: (lambda fn=fn, a=a: jax.block_until_ready(fn(a)))
                    for k, (fn, a) in calls.items()}}


def setup_jax_b512(kind: str):
  from benchmarks import bench_attribution as ba
  return ba.setup_jax(kind, m=32, chunk="default", batch=512)


def setup_captum_b512(kind: str, device: str = "cuda"):
  from benchmarks import bench_attribution as ba
  return ba.setup_captum(kind, m=32, ibs=None, device=device, batch=512)


# -- the per-library worker -----------------------------------------------------------------------

def _sync(lib):
  if lib == "torch":
    import torch
    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
  return lambda: None  # the jax contenders block on their results themselves


def worker(lib: str, quick: bool, out: str, smoke: bool = False) -> None:
  import importlib
  if lib == "jax":
    import jaxplain  # noqa: F401  first: on a CPU its import sets an XLA:CPU flag
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    device = str(jax.devices()[0].device_kind)
  else:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
  sync = _sync(lib)
  runs, infos, setup_s, errors = {}, {}, {}, {}
  cases = _cases(lib, quick, "cpu" if device == "cpu" else "cuda", smoke)
  for name, (target, kw) in cases.items():
    mod, fn = target.split(":")
    t0 = time.perf_counter()
    try:
      res = getattr(importlib.import_module(mod), fn)(**kw)
    except Exception as e:  # noqa: BLE001  one failing case must not hide the others
      errors[name] = f"{type(e).__name__}: {str(e)[:400]}"
      print(f"[{lib}] {name} FAILED: {errors[name]}", file=sys.stderr, flush=True)
      continue
    setup_s[name] = time.perf_counter() - t0
    if isinstance(res, dict) and "multi" in res:
      runs.update({f"{name}:{k}": r for k, r in res["multi"].items()})
      print(f"[{lib}] {name} ready ({setup_s[name]:.1f} s)", file=sys.stderr, flush=True)
      continue
    run, info = (res["run"], res.get("info", {})) if isinstance(res, dict) else (res, {})
    runs[name], infos[name] = run, info
    print(f"[{lib}] {name} ready ({setup_s[name]:.1f} s)", file=sys.stderr, flush=True)
  # one untimed call each (warm), then interleaved timed calls; slow cases get fewer repeats
  first = {}
  for name, run in runs.items():
    t0 = time.perf_counter()
    run()
    sync()
    first[name] = time.perf_counter() - t0
  reps = {k: max(3, min(15 if not quick else 5, int(3.0 / max(v, 1e-4)))) for k, v in
          first.items()}
  times = {k: [] for k in runs}
  for i in range(max(reps.values(), default=0)):
    for name, run in runs.items():
      if i < reps[name]:
        t0 = time.perf_counter()
        run()
        sync()
        times[name].append(time.perf_counter() - t0)
  pathlib.Path(out).write_text(json.dumps({
      "device": device, "times": times, "info": infos, "setup_s": setup_s, "errors": errors}))


# -- the parent ---------------------------------------------------------------------------------

PAIRS = [  # (JSON key, peer case, jaxplain case): key = peer time / jaxplain time
    ("captum_over_gradient", "gradient_b64", "gradient_b64"),
    ("captum_over_gradient_b512", "gradient_b512", "gradient_b512"),
    ("captum_over_ig", "ig32_b64", "ig32_b64"),
    ("captum_over_ig_b512", "ig32_b512", "ig32_b512"),
    ("zennit_over_lrp", "lrp_epsilon_plus_b64", "lrp_epsilon_plus_b64"),
    ("torch_over_ppi", "ppi_step", "ppi_step"),
    ("torch_loop_over_sweep", "sweep", "sweep"),
    ("quantus_over_pixel_flipping", "pixel_flipping", "pixel_flipping"),
    ("quantus_over_max_sensitivity", "max_sensitivity", "max_sensitivity"),
    ("kernelshap_over_captum", "kernelshap", "kernelshap"),
] + [(f"captum_over_{k}", k, k) for k in AVERAGED]


_fmt = _runner._fmt  # pylint: disable=protected-access


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="1 round, fewer cases and repeats")
  ap.add_argument("--rounds", type=int, default=None)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".md")))
  ap.add_argument("--start-rounds-within", type=float, default=None, metavar="S",
                  help="start no further round after S seconds (a lease-limited device)")
  ap.add_argument("--raw", default=None, metavar="DIR",
                  help="also write each worker's raw timings there (kept if the run is cut)")
  ap.add_argument("--smoke", action="store_true",
                  help="with --quick: small metric sizes, to try the script without a GPU")
  ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  ap.add_argument("--result", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    return worker(args.worker, args.quick, args.result, args.smoke)
  rounds = args.rounds or (1 if args.quick else 2)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_gpu_"))
  base = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
      TMPDIR=str(tmp), JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"))
  envs = {"jax": base,
          # the torch process builds its weights with JAX on the CPU, leaving the GPU to torch
          "torch": dict(base, JAX_PLATFORMS="cpu")}
  per = {"jax": [], "torch": []}
  start = time.perf_counter()
  for r in range(rounds):
    if r and args.start_rounds_within and time.perf_counter() - start > args.start_rounds_within:
      print(f"round {r + 1} not started: {time.perf_counter() - start:.0f} s spent", file=sys.stderr)
      rounds = r
      break
    for lib in ("jax", "torch"):
      res = pathlib.Path(args.raw or tmp) / f"{lib}{r}.json"
      t0 = time.perf_counter()
      proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--worker", lib,
                             "--result", str(res)] + (["--quick"] if args.quick else [])
                            + (["--smoke"] if args.smoke else []),
                            cwd=ROOT, env=envs[lib], capture_output=True, text=True)
      print(f"round {r + 1}/{rounds} {lib}: exit {proc.returncode}, "
            f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
      if proc.returncode != 0 or not res.exists():
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        continue
      print(proc.stderr[-1500:] if r == 0 else "", file=sys.stderr, end="")
      per[lib].append(json.loads(res.read_text()))
  med = {lib: {} for lib in per}
  for lib, rs in per.items():
    for name in {k for r in rs for k in r["times"]}:
      ts = [t for r in rs for t in r["times"].get(name, [])]
      if ts:
        med[lib][name] = statistics.median(ts)
  info = {lib: (rs[-1]["info"] if rs else {}) for lib, rs in per.items()}
  errors = {lib: (rs[-1]["errors"] if rs else {"all": "no result"}) for lib, rs in per.items()}
  device = {lib: (rs[-1]["device"] if rs else None) for lib, rs in per.items()}
  out = {}
  for key, peer, ours in PAIRS:
    if peer in med["torch"] and ours in med["jax"]:
      out[key] = med["torch"][peer] / med["jax"][ours]
  for tol in ("1pct", "01pct"):
    ad = [med["jax"][k] for k in (f"adaptive_while_{tol}", f"adaptive_local_{tol}")
          if k in med["jax"]]
    if ad and f"ig_tol_{tol}" in med["torch"]:
      out[f"captum_over_adaptive_{tol}"] = med["torch"][f"ig_tol_{tol}"] / min(ad)
  j = med["jax"]
  if "loop10" in j and "all_targets" in j:
    out["all_targets_speedup"] = j["loop10"] / j["all_targets"]
  if "rules:grad" in j:
    for r in RULES:
      if f"rules:{r}" in j:
        out[r.replace("lrp ", "").replace(" ", "_") + "_over_grad"] = j[f"rules:{r}"] / j[
            "rules:grad"]
  if "rules:vit grad" in j and "rules:vit lrp" in j:
    out["lrp_vit_over_grad"] = j["rules:vit lrp"] / j["rules:vit grad"]
  if "ppi_step" in j and "plain_step" in j:
    out["ppi_over_plain"] = j["ppi_step"] / j["plain_step"]
  agree = _agreement(tmp, info)
  lines = [f"# GPU benchmarks{' (--quick)' if args.quick else ''}", "",
           f"Device: {device['jax']} (JAX), {device['torch']} (torch); {rounds} round(s), "
           f"host load average {_runner.load_average()}; {platform.python_version()}.", "",
           "| case | jaxplain | peer | peer / jaxplain |", "|---|---|---|---|"]
  for key, peer, ours in PAIRS:
    if key in out:
      lines.append(f"| {ours} | {_fmt(j[ours])} | {_fmt(med['torch'][peer])} "
                   f"| {out[key]:.2f} |")
  for tol in ("1pct", "01pct"):
    k = f"captum_over_adaptive_{tol}"
    if k in out:
      best = min(j.get(f"adaptive_while_{tol}", np.inf), j.get(f"adaptive_local_{tol}", np.inf))
      n = info["torch"].get(f"ig_tol_{tol}", {}).get("n_steps")
      lines.append(f"| IG to {tol} (Captum n_steps {n}) | {_fmt(best)} "
                   f"| {_fmt(med['torch'][f'ig_tol_{tol}'])} | {out[k]:.2f} |")
  lines += ["", "jaxplain alone:", "", "| case | median | ratio |", "|---|---|---|"]
  for k in sorted(j):
    lines.append(f"| {k} | {_fmt(j[k])} | |")
  lines += ["", "Ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()), "",
            "Agreement: " + json.dumps(agree), "",
            "Errors: " + json.dumps(errors), ""]
  print("\n".join(lines))
  _runner.write_keeping_notes(args.out, lines, NOTES)
  print(json.dumps({**{k: round(v, 3) for k, v in out.items()},
                    "medians_s": {lib: {k: round(v, 6) for k, v in m.items()}
                                  for lib, m in med.items()},
                    "device": device, "errors": errors, "agreement": agree,
                    "rounds": rounds, "quick": args.quick}))


def _agreement(tmp: pathlib.Path, info: dict) -> dict:
  """Maps and metric values of the two libraries against each other (saved by the workers)."""
  from benchmarks import bench_metrics
  out = {}
  maps = tmp / "bench_rules_maps"
  if (maps / "jaxplain.npy").exists() and (maps / "zennit.npy").exists():
    a, z = np.load(maps / "jaxplain.npy"), np.load(maps / "zennit.npy")
    out["lrp_epsilon_plus_max_abs_over_max_zennit"] = float(np.max(np.abs(a - z))
                                                            / np.max(np.abs(z)))
  for m in ("pixel_flipping", "max_sensitivity"):
    if m in info["jax"] and m in info["torch"]:
      out[m] = bench_metrics._agreement(  # pylint: disable=protected-access
          m, np.asarray(info["jax"][m]["result"]), info["torch"][m]["result"])
  if "kernelshap" in info["jax"] and "kernelshap" in info["torch"]:
    a = np.asarray(info["jax"]["kernelshap"]["result"]).ravel()
    c = np.asarray(info["torch"]["kernelshap"]["result"]).ravel()
    out["kernelshap_pearson"] = float(np.corrcoef(a, c)[0, 1])
  for tol in ("1pct", "01pct"):
    for drv in ("while", "local"):
      k = f"adaptive_{drv}_{tol}"
      if k in info["jax"]:
        out[k] = {q: info["jax"][k][q] for q in ("all_met", "max_rel_gap", "steps_max")}
    if f"ig_tol_{tol}" in info["torch"]:
      out[f"captum_{tol}"] = {q: info["torch"][f"ig_tol_{tol}"][q]
                              for q in ("all_met", "max_rel_gap", "n_steps")}
  return out


if __name__ == "__main__":
  main()
