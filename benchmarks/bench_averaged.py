"""Averaged attributions: jaxplain's gradient_shap, noise_tunnel(integrated_gradients) and
deeplift_shap vs Captum's GradientShap, NoiseTunnel(IntegratedGradients) and DeepLiftShap.

Model: jaxplain.models.SmallCNN on 32x32x3 and its torch port (benchmarks/bench_attribution.py),
batch 16, a background of 16 images. Each contender runs in its own process, alternating
A B A B (benchmarks/_runner.py). jaxplain calls are jitted (compile time reported apart).

  GradientSHAP: 32 draws per example, no input noise.
  NoiseTunnel IG: 8 noisy copies (sigma 0.15: Captum's absolute stdevs, jaxplain's
    noise_level x the input range, which is ~1 for these uniform [0, 1) images), IG with 16
    Gauss-Legendre steps (Captum internal_batch_size 64).
  DeepLiftShap: every one of the 16 references.

Before timing, the parent checks that the logits agree and reports how the maps compare:
DeepLiftShap is deterministic (a difference in the rule at max-pool shows as a difference
of maps); GradientSHAP and the noise tunnel are random in both libraries, so they are
compared by their completeness error (GradientSHAP: |sum - (f(x) - mean f(bg))| relative to
it, per example) and by the Pearson correlation of the two libraries' maps.

  python benchmarks/bench_averaged.py            # 4 rounds
  python benchmarks/bench_averaged.py --quick    # 2 rounds, about a minute

Writes benchmarks/bench_averaged.md and ends with one JSON line with the keys
captum_over_gradient_shap, captum_over_noise_tunnel_ig, captum_over_deeplift_shap.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import _runner  # noqa: E402
from benchmarks.bench_attribution import flax_model, torch_model  # noqa: E402

B, M = 16, 16
SAMPLES, NT, STEPS, SIGMA = 32, 8, 16, 0.15
HERE = "benchmarks.bench_averaged"
NOTES = "<!-- notes: kept across runs -->"


def data():
  r = np.random.default_rng(1)
  x = r.uniform(size=(B, 32, 32, 3)).astype(np.float32)
  bg = r.uniform(size=(M, 32, 32, 3)).astype(np.float32)
  return x, bg, (np.arange(B) % 10).astype(np.int32)


def _jax_fns():
  import jax
  import jaxplain
  f, _ = flax_model()
  key = jax.random.key(0)
  return {
      "gradient_shap": lambda x, bg, t: jaxplain.gradient_shap(
          f, x, t, background=bg, key=key, num_samples=SAMPLES),
      "noise_tunnel_ig": lambda x, bg, t: jaxplain.noise_tunnel(
          jaxplain.integrated_gradients, f, x, t, key=key, num_samples=NT, noise_level=SIGMA,
          steps=STEPS),
      "deeplift_shap": lambda x, bg, t: jaxplain.deeplift_shap(f, x, t, background=bg),
  }, f


def _captum_fns(net):
  import torch
  from captum.attr import DeepLiftShap, GradientShap, IntegratedGradients, NoiseTunnel
  gs, nt, dls = GradientShap(net), NoiseTunnel(IntegratedGradients(net)), DeepLiftShap(net)
  return {
      "gradient_shap": lambda x, bg, t: gs.attribute(x, baselines=bg, target=t,
                                                     n_samples=SAMPLES, stdevs=0.0),
      "noise_tunnel_ig": lambda x, bg, t: nt.attribute(
          x, nt_type="smoothgrad", nt_samples=NT, stdevs=SIGMA, target=t, n_steps=STEPS,
          method="gausslegendre", internal_batch_size=64, baselines=0.0),
      "deeplift_shap": lambda x, bg, t: dls.attribute(x, baselines=bg, target=t),
  }, torch


def setup_jax(kind: str):
  import time
  import jax
  import jax.numpy as jnp
  fns, _ = _jax_fns()
  x, bg, t = (jnp.asarray(a) for a in data())
  fn = jax.jit(fns[kind])
  t0 = time.perf_counter()
  compiled = fn.lower(x, bg, t).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(x, bg, t))
  return {"run": lambda: jax.block_until_ready(compiled(x, bg, t)),
          "info": {"compile_s": compile_s, "jax": jax.__version__}}


def setup_captum(kind: str, device: str = "cpu"):
  import captum
  _, params = flax_model()
  net = torch_model(params).to(device)
  fns, torch = _captum_fns(net)
  torch.set_num_threads(os.cpu_count())
  x, bg, t = data()
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
  bt = torch.from_numpy(bg.transpose(0, 3, 1, 2).copy()).to(device)
  tt = torch.from_numpy(t.astype(np.int64)).to(device)
  run = lambda: fns[kind](xt, bt, tt)
  run()
  return {"run": run, "info": {"torch": torch.__version__, "captum": captum.__version__,
                               "threads": torch.get_num_threads()}}


def agreement():
  """Logits of the port; DeepLiftShap map difference; completeness error and map correlation
  for the random methods."""
  import jax
  import jax.numpy as jnp
  import torch
  fns_j, f = _jax_fns()
  _, params = flax_model()
  net = torch_model(params)
  fns_c, _ = _captum_fns(net)
  x, bg, t = data()
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  bt = torch.from_numpy(bg.transpose(0, 3, 1, 2).copy())
  tt = torch.from_numpy(t.astype(np.int64))
  with torch.no_grad():
    dlogit = float(np.max(np.abs(net(xt).numpy() - np.asarray(f(jnp.asarray(x))))))
  assert dlogit < 1e-4, dlogit
  out = {"logits_max_abs_diff": dlogit}
  delta = (np.asarray(f(jnp.asarray(x)))[np.arange(B), t]
           - np.asarray(f(jnp.asarray(bg))).mean(0)[t])
  for kind in fns_j:
    a = np.asarray(jax.jit(fns_j[kind])(jnp.asarray(x), jnp.asarray(bg), jnp.asarray(t)),
                   np.float64)
    c = fns_c[kind](xt, bt, tt).detach().numpy().transpose(0, 2, 3, 1).astype(np.float64)
    corr = [np.corrcoef(a[i].ravel(), c[i].ravel())[0, 1] for i in range(B)]
    out[f"{kind}_median_corr"] = float(np.median(corr))
    if kind == "deeplift_shap":
      e = np.abs(a - c).reshape(B, -1).max(1) / np.abs(c).reshape(B, -1).max(1)
      out[f"{kind}_max_rel_diff"] = float(e.max())
      out[f"{kind}_median_rel_diff"] = float(np.median(e))
    if kind in ("gradient_shap", "deeplift_shap"):
      for name, m in (("jaxplain", a), ("captum", c)):
        err = np.abs(m.reshape(B, -1).sum(1) - delta) / np.abs(delta)
        out[f"{kind}_completeness_{name}"] = float(np.median(err))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="2 rounds")
  ap.add_argument("--rounds", type=int, default=None)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".md")))
  args = ap.parse_args()
  rounds = args.rounds or (2 if args.quick else 4)
  load_start = _runner.load_average()
  agree = agreement()
  print("agreement:", agree, flush=True)
  res = {}
  for kind in ("gradient_shap", "noise_tunnel_ig", "deeplift_shap"):
    print(f"{kind}: 2 contenders x {rounds} rounds", file=sys.stderr, flush=True)
    res.update(_runner.compare({
        f"captum_{kind}": _runner.Contender(f"{HERE}:setup_captum", {"kind": kind}),
        f"jaxplain_{kind}": _runner.Contender(f"{HERE}:setup_jax", {"kind": kind})},
        rounds=rounds, repeats=2))
  out = {"batch": B, "background": M, "rounds": rounds, "load_start": load_start,
         "load_end": _runner.load_average()}
  for kind in ("gradient_shap", "noise_tunnel_ig", "deeplift_shap"):
    out[f"jaxplain_{kind}_s"] = res[f"jaxplain_{kind}"]["median"]
    out[f"captum_{kind}_s"] = res[f"captum_{kind}"]["median"]
    out[f"captum_over_{kind}"] = _runner.ratio(res, f"captum_{kind}", f"jaxplain_{kind}")["ratio"]
  out.update(agree)
  lines = [
      "# Averaged attributions: jaxplain vs Captum", "",
      f"SmallCNN, batch {B}, background {M}; {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores; load average {out['load_start']} (start), {out['load_end']} "
      f"(end); {rounds} rounds, each library in its own process, alternating.", "",
      _runner.table(res), "",
      "| method | Captum / jaxplain |", "|---|---:|"]
  for kind in ("gradient_shap", "noise_tunnel_ig", "deeplift_shap"):
    lines.append(f"| {kind} | {out[f'captum_over_{kind}']:.2f} |")
  lines += ["", "Agreement (before timing): " + ", ".join(f"{k} {v:.3g}" for k, v in
                                                         agree.items()), "",
            f"Run: `python benchmarks/bench_averaged.py`.", "", "```json", json.dumps(out),
            "```"]
  _runner.write_keeping_notes(args.out, lines, NOTES)
  print("\n".join(lines))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
