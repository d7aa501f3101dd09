"""PPI's own claims (seed 004, Tables 2 and 3), tested on data built from the embedded digits.

    python -m experiments.ppi_claims [--full | --smoke] [--out outputs] [--seed 0]

Every training run is :func:`jaxplain.train.fit` (Adam, batch 32, a fixed number of optimizer
steps whatever the training-set size: ``steps``; the first ``warmup`` of them are plain
cross-entropy, PPI switches on after them through ``PPIConfig.warmup_steps``), on a small CNN
(16x16x1 inputs: conv 8@3x3 - ReLU - pool - conv 16@3x3 - ReLU - pool - dense 10; Grad-CAM on
``conv2``). The baseline is the same run with plain cross-entropy all along; for a given seed
both start from the same initialisation and see the same batches, so PPI - baseline is a
paired difference. Seeds ``seed .. seed + n - 1``; intervals are 95 % t-intervals of the
paired per-seed differences.

Data (all 16x16, from the digits' train/validation/test splits; every random draw is seeded
by ``(construction, split)``):

- **Table 2 analogue (small data)**: the clean digits; the training set is a seeded random
  10 %, 25 % or 100 % of the 1257 training digits; metric: clean test accuracy (270 images).
- **Background confounder (CUB analogue)**: ten textures, sinusoidal gratings
  ``0.5 + 0.5 sin(2 pi f (u cos t + v sin t) + phase)`` with orientation ``t = 18 k`` degrees
  and ``f = 0.25 + 0.05 (k mod 2)`` cycles / pixel, a random phase per image, blended behind
  the digit over the whole image: ``x = d + 0.45 * texture * (1 - d)``. In train and validation
  the texture index equals the label with probability 0.95 (otherwise a random one); in test it
  is random. Metrics: test accuracy (random texture) and the confounder-free accuracy (the
  clean test digits, no texture).
- **Cross-domain (Table 3 analogue)**: four sites that differ by acquisition, each with its own
  quarter of the training digits (indices ``k::4``) and the whole test split: A clean; B low
  contrast ``0.3 + 0.4 d``; C 3x3 box blur plus Gaussian noise (SD 0.08); D Gaussian noise (SD
  0.05) plus a site-specific spurious marker, a 3x3 bright square whose position along the
  border codes the label (train and test of D; the paper's site D). Train on one site, test on
  all four: the 4x4 table, baseline vs PPI (WBP), and D's marker-free accuracy.
- **Sigma sweep** (``--full``): PPI (WBP) at sigma in {0.1, 0.2, 0.3, 0.5} on 25 % of the
  clean training digits, accuracy on the clean *validation* split: the sigma with the best mean
  is used for every PPI arm of the run (the fast default uses ``PPIConfig().sigma``).
- **Ablations** (WBP): on the background confounder w1 = 0, w3 = 0, the other sigmas and
  ``pairing="same_label"`` (``ablations``); on the cross-domain runs trained on site D and on
  the Table 2 analogue's 100 % the same four (``xablations``), as paired PPI - baseline.

Runs are cached in ``out/ppi_claims/runs-steps=<steps>-warmup=<warmup>.jsonl`` (one line per
finished run, keyed by claim, arm, seed and sigma), so an interrupted ``--full`` resumes where it
stopped, a run with more seeds / fractions / methods / sites reuses the cells it shares with an
earlier one, and the report states how many seeds each cell holds.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

if __name__ == "__main__" and __package__ in (None, ""):  # `python experiments/ppi_claims.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxplain import data as jdata
from jaxplain import ppi
from jaxplain import train as jtrain
from jaxplain.models import max_pool_2x2

SIZE = 16
METHODS = ("gradient", "grad_cam", "lrp", "wbp")
LABELS = {"gradient": "Gradient", "lrp": "LRP", "grad_cam": "GradCAM", "wbp": "WBP"}
SITES = ("A", "B", "C", "D")
SIGMAS = (0.1, 0.2, 0.3, 0.5)
CLAIMS = ("confounder", "cross_domain", "table2")


class SmallCNN(nn.Module):
  """conv 8@3x3 - ReLU - pool - conv 16@3x3 - ReLU - pool - dense ``num_classes``."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = max_pool_2x2(nn.relu(nn.Conv(8, (3, 3), name="conv1")(x)))
    x = max_pool_2x2(nn.relu(nn.Conv(16, (3, 3), name="conv2")(x)))
    return nn.Dense(self.num_classes, name="fc")(x.reshape(x.shape[0], -1))


def _settings(full: bool, smoke: bool) -> dict:
  if smoke:
    return {"name": "smoke", "seeds": 1, "steps": 20, "warmup": 8, "fractions": (0.25,),
            "methods": ("wbp",), "train_sites": ("D",), "ablations": (), "sweep": (),
            "xablations": ()}
  if full:
    return {"name": "full", "seeds": 5, "steps": 400, "warmup": 160,
            "fractions": (0.1, 0.25, 1.0), "methods": METHODS, "train_sites": SITES,
            "ablations": ("w1=0", "w3=0", "sigma", "same_label"), "sweep": SIGMAS,
            "xablations": ("w1=0", "w3=0", "sigma", "same_label")}
  return {"name": "fast", "seeds": 2, "steps": 200, "warmup": 80, "fractions": (0.25,),
          "methods": ("wbp",), "train_sites": ("D",), "ablations": (), "sweep": (),
          "xablations": ()}


# -- data constructions ---------------------------------------------------------------------

def _stable(name: str) -> int:
  return int.from_bytes(name.encode(), "little") % (2 ** 31)


def textures(index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """(N, SIZE, SIZE) gratings in [0, 1] for texture indices 0..9 (random phase each)."""
  v, u = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
  t = np.deg2rad(18.0 * index)[:, None, None]
  f = (0.25 + 0.05 * (index % 2))[:, None, None]
  phase = rng.uniform(0, 2 * np.pi, (len(index), 1, 1))
  return 0.5 + 0.5 * np.sin(2 * np.pi * f * (u * np.cos(t) + v * np.sin(t)) + phase)


def confounded(d: dict, split: str, p: float = 0.95) -> dict:
  """The digits on a class-correlated (train/validation) or random (test) texture."""
  rng = np.random.default_rng([_stable("texture"), _stable(split)])
  y = d["label"]
  idx = np.where(rng.uniform(size=len(y)) < p, y, rng.integers(0, 10, len(y)))
  if split == "test":
    idx = rng.integers(0, 10, len(y))
  x = d["image"][..., 0].astype(np.float64)
  x = x + 0.45 * textures(idx, rng) * (1.0 - x)
  return {"image": x[..., None].astype(np.float32), "label": y}


def _box_blur(x: np.ndarray) -> np.ndarray:
  p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
  return sum(p[:, i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)) / 9.0


def site(d: dict, name: str, split: str) -> dict:
  """Digits as acquired at site A/B/C/D (see the module docstring)."""
  rng = np.random.default_rng([_stable("site" + name), _stable(split)])
  x = d["image"][..., 0].astype(np.float64)
  if name == "B":
    x = 0.3 + 0.4 * x
  elif name == "C":
    x = _box_blur(x) + rng.normal(0, 0.08, x.shape)
  elif name == "D":
    x = x + rng.normal(0, 0.05, x.shape)
    for i, y in enumerate(d["label"]):
      r0 = 0 if y < 5 else SIZE - 3
      c0 = int(round((y % 5) * (SIZE - 3) / 4))
      x[i, r0:r0 + 3, c0:c0 + 3] = 1.0
  return {"image": np.clip(x, 0, 1)[..., None].astype(np.float32), "label": d["label"]}


def _strip_marker(d: dict, clean: dict) -> dict:
  """Site D without its marker: the same noise model, no label-coded square."""
  rng = np.random.default_rng([_stable("siteD-nomarker"), _stable("test")])
  x = clean["image"][..., 0].astype(np.float64) + rng.normal(0, 0.05, clean["image"].shape[:3])
  return {"image": np.clip(x, 0, 1)[..., None].astype(np.float32), "label": d["label"]}


def subset(d: dict, fraction: float, seed: int) -> dict:
  n = len(d["label"])
  k = max(32, int(round(fraction * n)))
  idx = np.sort(np.random.default_rng([_stable("subset"), seed]).permutation(n)[:k])
  return {key: v[idx] for key, v in d.items()}


# -- training -------------------------------------------------------------------------------

def _config(arm: str, sigma: float, warmup: int) -> tuple[ppi.PPIConfig | None, str]:
  """``(PPIConfig or None for the baseline, saliency method)`` of an arm name."""
  if arm == "baseline":
    return None, ""
  parts = arm.split(":")
  method = parts[1]
  kw = {"sigma": sigma, "grad_cam_layer": "conv2", "warmup_steps": warmup}
  for p in parts[2:]:
    if p == "same_label":
      kw["pairing"] = "same_label"
    else:
      k, v = p.split("=")
      kw[k] = float(v)
  return ppi.PPIConfig(**kw), method


def train_run(train: dict, arm: str, seed: int, S: dict, sigma: float) -> dict:
  """Variables after ``S["steps"]`` Adam steps of one arm on ``train``."""
  model = SmallCNN()
  bs = 32
  spe = len(train["label"]) // bs
  epochs = -(-S["steps"] // spe)
  cfg, method = _config(arm, sigma, S["warmup"])
  loss_fn = None if cfg is None else ppi.make_ppi_loss(model, cfg, saliency=method)
  return jtrain.fit(model, train, epochs=epochs, batch_size=bs, optimizer=optax.adam(3e-3),
                    seed=seed, loss_fn=loss_fn, progress=False).variables


class _Cache:
  """One JSON line per finished run, keyed by (claim, arm, seed, condition)."""

  def __init__(self, path: pathlib.Path, cache_only: bool = False):
    self.path = path
    self.cache_only = cache_only
    self.rows = {}
    if path.exists():
      for line in path.read_text().splitlines():
        if line.strip():
          r = json.loads(line)
          self.rows[r["key"]] = r["value"]

  def get(self, key, fn):
    k = json.dumps(key)
    if k not in self.rows and self.cache_only:
      return None
    if k not in self.rows:
      t0 = time.time()
      v = fn()
      v["seconds"] = time.time() - t0
      self.rows[k] = v
      with self.path.open("a") as f:
        f.write(json.dumps({"key": k, "value": v}) + "\n")
    return self.rows[k]


def _acc(variables, d) -> float:
  return jtrain.evaluate(SmallCNN(), variables, d)["accuracy"]


def paired(a, b) -> dict:
  """Mean of the paired differences b - a with a 95 % t-interval, and wins of b."""
  from scipy import stats
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n = min(len(a), len(b))
  d = b[:n] - a[:n]
  half = (float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)) if n > 1
          else float("nan"))
  return {"n": n, "mean": float(d.mean()) if n else float("nan"), "half": half,
          "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


def _fmt_pair(p: dict) -> str:
  if p["n"] == 0:
    return "n/a"
  ci = "" if not np.isfinite(p["half"]) else f" ± {p['half']:.3f}"
  return f"{p['mean']:+.3f}{ci} ({p['wins']}/{p['n']} better)"


def _ms(v) -> str:
  v = np.asarray(v, np.float64)
  if v.size == 0:
    return "n/a"
  return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1 else f"{v.mean():.3f}"


# -- the experiment -------------------------------------------------------------------------

def run(out_dir: pathlib.Path, *, full: bool = False, smoke: bool = False, seed: int = 0,
        progress: bool | None = None, overrides: dict | None = None) -> dict:
  """All three claims (see the module docstring); with a persistent compilation cache.

  ``overrides`` replaces entries of the settings (``seeds``, ``steps``, ``warmup``,
  ``fractions``, ``methods``, ``train_sites``, ``ablations``, ``sweep``, ``sigma``); the run
  cache then gets its own file.
  """
  del progress
  out_dir = pathlib.Path(out_dir)
  if jax.config.jax_compilation_cache_dir:
    return _run(out_dir, full=full, smoke=smoke, seed=seed, overrides=overrides)
  old = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", str(out_dir / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    return _run(out_dir, full=full, smoke=smoke, seed=seed, overrides=overrides)
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old)


def _ablation_arms(ablations, sigma: float) -> list[str]:
  """WBP arm names of ablations ``"w1=0"``, ``"same_label"``, ...; ``"sigma"`` = 0.2 and 0.5."""
  arms = []
  for ab in ablations:
    if ab == "sigma":
      arms += [f"ppi:wbp:sigma={sg}" for sg in (0.2, 0.5) if sg != sigma]
    else:
      arms.append(f"ppi:wbp:{ab}")
  return arms


def _run(out_dir: pathlib.Path, *, full: bool, smoke: bool, seed: int,
         overrides: dict | None = None) -> dict:
  t_start = time.time()
  S = _settings(full, smoke)
  if overrides:
    unknown = set(overrides) - set(S) - {"sigma", "claims", "cache_only"}
    if unknown:
      raise ValueError(f"overrides: unknown settings {sorted(unknown)}; known: {sorted(S)}")
    S = {**S, **overrides}
    S["name"] += "-" + "-".join(f"{k}={v}" for k, v in sorted(overrides.items())
                                if k not in ("claims", "cache_only")).replace(
        " ", "").replace("(", "").replace(")", "").replace(",", "_").replace("'", "")
  claims = S.get("claims", CLAIMS)
  fig_dir = out_dir / "ppi_claims"
  fig_dir.mkdir(parents=True, exist_ok=True)
  # The keys hold claim, arm, seed and sigma; steps and warmup are the other settings a run
  # depends on, so runs with equal steps / warmup share one file whatever the other settings.
  cache = _Cache(fig_dir / f"runs-steps={S['steps']}-warmup={S['warmup']}.jsonl",
                 cache_only=S.get("cache_only", False))
  keep = lambda lst, v: lst.append(v) if v is not None else None
  digits = {s: jdata.load("digits", s, image_size=SIZE) for s in ("train", "validation",
                                                                  "test")}
  seeds = [seed + k for k in range(S["seeds"])]
  log = lambda *a: print("[ppi_claims]", *a, f"({time.time() - t_start:.0f} s)", flush=True)

  # -- sigma sweep on validation --------------------------------------------------------------
  sigma = ppi.PPIConfig().sigma
  sweep = {}
  for sg in S["sweep"]:
    got = [cache.get(["sweep", sg, s], lambda sg=sg, s=s: {"val": _acc(
        train_run(subset(digits["train"], 0.25, s), "ppi:wbp", s, S, sg),
        digits["validation"])}) for s in seeds[:3]]
    sweep[sg] = [g["val"] for g in got if g is not None]
    log(f"sweep sigma {sg}: val acc {_ms(sweep[sg])}")
  if sweep:
    sigma = max(sweep, key=lambda k: np.mean(sweep[k]))
  sigma = S.get("sigma", sigma)

  # -- background confounder ------------------------------------------------------------------
  conf = {s: confounded(digits[s], s) for s in ("train", "validation", "test")}
  conf_arms = ["baseline", "ppi:wbp"] + _ablation_arms(S["ablations"], sigma)
  conf_res = {}
  for arm in conf_arms if "confounder" in claims else ():
    for s in seeds:
      def go(arm=arm, s=s):
        v = train_run(conf["train"], arm, s, S, sigma)
        return {"test": _acc(v, conf["test"]), "val": _acc(v, conf["validation"]),
                "clean": _acc(v, digits["test"])}
      keep(conf_res.setdefault(arm, []), cache.get(["confounder", arm, s, sigma], go))
    log(f"confounder {arm}: test {_ms([r['test'] for r in conf_res[arm]])}")

  # -- cross-domain ---------------------------------------------------------------------------
  quarters = {k: {key: v[i::4] for key, v in digits["train"].items()}
              for i, k in enumerate(SITES)}
  site_train = {k: site(quarters[k], k, "train") for k in SITES}
  site_test = {k: site(digits["test"], k, "test") for k in SITES}
  d_nomarker = _strip_marker(site_test["D"], digits["test"])
  xd = {}
  for src in S["train_sites"] if "cross_domain" in claims else ():
    for arm in ("baseline", "ppi:wbp"):
      for s in seeds:
        def go(src=src, arm=arm, s=s):
          v = train_run(site_train[src], arm, s, S, sigma)
          return {**{t: _acc(v, site_test[t]) for t in SITES},
                  "D_nomarker": _acc(v, d_nomarker)}
        keep(xd.setdefault((src, arm), []), cache.get(["cross", src, arm, s, sigma], go))
      log(f"cross-domain train {src} {arm}: " + ", ".join(
          f"{t} {_ms([r[t] for r in xd[(src, arm)]])}" for t in SITES))

  # ablations of the other two claims (WBP): cross-domain trained on D, Table 2 on 100 %
  xab_arms = _ablation_arms(S.get("xablations", ()), sigma)
  xab = {}
  for arm in xab_arms if "cross_domain" in claims and "D" in S["train_sites"] else ():
    for s in seeds:
      def go(arm=arm, s=s):
        v = train_run(site_train["D"], arm, s, S, sigma)
        return {**{t: _acc(v, site_test[t]) for t in SITES},
                "D_nomarker": _acc(v, d_nomarker)}
      keep(xab.setdefault(("cross", arm), []), cache.get(["cross", "D", arm, s, sigma], go))
    log(f"cross-domain train D {arm}: " + ", ".join(
        f"{t} {_ms([r[t] for r in xab[('cross', arm)]])}" for t in SITES))

  # -- Table 2 analogue -----------------------------------------------------------------------
  t2_arms = ["baseline"] + [f"ppi:{m}" for m in S["methods"]]
  t2 = {}
  for fr in S["fractions"] if "table2" in claims else ():
    for arm in t2_arms:
      for s in seeds:
        def go(fr=fr, arm=arm, s=s):
          v = train_run(subset(digits["train"], fr, s), arm, s, S, sigma)
          return {"test": _acc(v, digits["test"])}
        keep(t2.setdefault((fr, arm), []), cache.get(["table2", fr, arm, s, sigma], go))
      log(f"table2 {fr} {arm}: {_ms([r['test'] for r in t2[(fr, arm)]])}")
  for arm in xab_arms if "table2" in claims and 1.0 in S["fractions"] else ():
    for s in seeds:
      def go(arm=arm, s=s):
        v = train_run(subset(digits["train"], 1.0, s), arm, s, S, sigma)
        return {"test": _acc(v, digits["test"])}
      keep(xab.setdefault(("table2", arm), []), cache.get(["table2", 1.0, arm, s, sigma], go))
    log(f"table2 1.0 {arm}: {_ms([r['test'] for r in xab[('table2', arm)]])}")
  xab = {k: v for k, v in xab.items() if v}
  xab_base = {"cross": xd.get(("D", "baseline"), []), "table2": t2.get((1.0, "baseline"), [])}
  xab_ppi = {"cross": xd.get(("D", "ppi:wbp"), []), "table2": t2.get((1.0, "ppi:wbp"), [])}

  # only cells with runs (a --cache-only report of an unfinished run)
  conf_arms = [a for a in conf_arms if conf_res.get(a)]
  conf_res = {a: conf_res[a] for a in conf_arms}
  xd = {k: v for k, v in xd.items() if v}
  xd = {k: v for k, v in xd.items() if xd.get((k[0], "baseline")) and xd.get((k[0], "ppi:wbp"))}
  t2 = {k: v for k, v in t2.items() if v}
  t2_arms = [a for a in t2_arms if any(k[1] == a for k in t2)]
  t2 = {k: v for k, v in t2.items() if all((k[0], a) in t2 for a in t2_arms)}
  return _report(S, seeds, sigma, sweep, conf_arms, conf_res, xd, t2, t2_arms, fig_dir,
                 t_start, (xab, xab_base, xab_ppi))


def _arm_label(arm: str) -> str:
  if arm == "baseline":
    return "baseline"
  parts = arm.split(":")
  return "PPI " + LABELS[parts[1]] + "".join(f", {p}" for p in parts[2:])


def _report(S, seeds, sigma, sweep, conf_arms, conf_res, xd, t2, t2_arms, fig_dir, t_start,
            ablations=({}, {}, {})):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figures, lines, metrics = [], [], {"settings": {k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in S.items()},
                                     "seeds": seeds, "sigma": sigma}
  lines += ["## PPI's claims on digit constructions (seed 004, Tables 2 and 3)", "",
            f"SmallCNN 16x16, Adam 3e-3, batch 32, {S['steps']} steps ({S['warmup']} plain "
            f"warm-up, then PPI: w = 1/0.1/1, L_reg = ||s||_1, one-vs-others, soft mask, "
            f"omega 50, sigma {sigma}); up to {len(seeds)} seed(s) per cell (n in the paired "
            "columns); "
            "differences are paired PPI - baseline per seed with 95 % t-intervals. "
            "Constructions: `experiments/ppi_claims.py`.", ""]
  if sweep:
    lines += ["**Sigma sweep** (PPI WBP, 25 % of the training digits, clean validation "
              "accuracy): " + ", ".join(f"sigma {k}: {_ms(v)}" for k, v in sweep.items())
              + f" -> sigma = {sigma}.", ""]
    metrics["sweep"] = {str(k): v for k, v in sweep.items()}

  if conf_res:
    _confounder_section(conf_arms, conf_res, lines, metrics, figures, fig_dir, plt)
  if xd:
    _cross_section(xd, lines, metrics, figures, fig_dir, plt)
  if t2:
    _table2_section(t2, t2_arms, lines, metrics, figures, fig_dir, plt)
  if ablations[0]:
    _ablation_section(*ablations, lines, metrics)
  lines += ["", f"Wall time {time.time() - t_start:.0f} s."]
  metrics["seconds"] = time.time() - t_start
  (fig_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
  return {"metrics": metrics, "figures": figures, "summary": "\n".join(lines)}


def _confounder_section(conf_arms, conf_res, lines, metrics, figures, fig_dir, plt):
  base = conf_res["baseline"]
  rows = ["| arm | test acc (random texture) | paired diff | confounder-free acc | paired "
          "diff | val acc (correlated) |", "|---|---|---|---|---|---|"]
  metrics["confounder"] = {}
  for arm in conf_arms:
    r = conf_res[arm]
    pt = paired([b["test"] for b in base], [x["test"] for x in r])
    pc = paired([b["clean"] for b in base], [x["clean"] for x in r])
    rows.append(f"| {_arm_label(arm)} | {_ms([x['test'] for x in r])} | "
                f"{'' if arm == 'baseline' else _fmt_pair(pt)} | "
                f"{_ms([x['clean'] for x in r])} | {'' if arm == 'baseline' else _fmt_pair(pc)}"
                f" | {_ms([x['val'] for x in r])} |")
    metrics["confounder"][arm] = {"runs": r, "diff_test": pt, "diff_clean": pc}
  lines += ["### Background confounder (CUB analogue)", "", *rows, ""]
  fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(conf_arms), 3))
  xs = np.arange(len(conf_arms))
  for off, key, lab in ((-0.2, "test", "random texture"), (0.2, "clean", "no texture")):
    vals = [[x[key] for x in conf_res[a]] for a in conf_arms]
    ax.bar(xs + off, [np.mean(v) for v in vals], 0.4, label=lab,
           yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals])
  ax.set_xticks(xs, [_arm_label(a).replace("PPI WBP", "PPI").replace(", ", "\n")
                     for a in conf_arms], fontsize=7)
  ax.set_ylabel("test accuracy")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(fig_dir / "confounder.png", dpi=90)
  plt.close(fig)
  figures.append("ppi_claims/confounder.png")
  lines += ["![confounder](ppi_claims/confounder.png)", ""]


def _cross_section(xd, lines, metrics, figures, fig_dir, plt):
  srcs = [s for s in SITES if (s, "baseline") in xd]
  hdr = "| train \\ test | " + " | ".join(SITES) + " | D without marker |"
  sep = "|---|" + "---|" * (len(SITES) + 1)
  tb, tp, td = [hdr, sep], [hdr, sep], [hdr, sep]
  metrics["cross_domain"] = {}
  mats = {k: np.full((len(srcs), len(SITES) + 1), np.nan) for k in ("b", "p", "d")}
  for i, src in enumerate(srcs):
    b, p = xd[(src, "baseline")], xd[(src, "ppi:wbp")]
    cells_b, cells_p, cells_d = [], [], []
    for j, t in enumerate(list(SITES) + ["D_nomarker"]):
      pr = paired([x[t] for x in b], [x[t] for x in p])
      mats["b"][i, j], mats["p"][i, j] = np.mean([x[t] for x in b]), np.mean([x[t] for x in p])
      mats["d"][i, j] = pr["mean"]
      cells_b.append(f"{np.mean([x[t] for x in b]):.3f}")
      cells_p.append(f"{np.mean([x[t] for x in p]):.3f}")
      cells_d.append(_fmt_pair(pr))
      metrics["cross_domain"][f"{src}->{t}"] = {"baseline": [x[t] for x in b],
                                                "ppi": [x[t] for x in p], "diff": pr}
    tb.append(f"| {src} | " + " | ".join(cells_b) + " |")
    tp.append(f"| {src} | " + " | ".join(cells_p) + " |")
    td.append(f"| {src} | " + " | ".join(cells_d) + " |")
  lines += ["### Cross-domain (Table 3 analogue)", "",
            "Sites: A clean, B low contrast, C blur + noise, D noise + label-coded marker "
            "(site D's spurious correlation). Baseline accuracy:", "", *tb, "",
            "PPI (WBP) accuracy:", "", *tp, "", "PPI - baseline (paired, 95 % interval):", "",
            *td, ""]
  fig, axes = plt.subplots(1, 3, figsize=(11, 3))
  for ax, k, title in zip(axes, ("b", "p", "d"), ("baseline", "PPI (WBP)", "PPI - baseline")):
    kw = {"cmap": "RdBu", "vmin": -0.2, "vmax": 0.2} if k == "d" else {"vmin": 0, "vmax": 1}
    im = ax.imshow(mats[k], **kw)
    ax.set_xticks(range(len(SITES) + 1), list(SITES) + ["D-"])
    ax.set_yticks(range(len(srcs)), srcs)
    ax.set_xlabel("test site")
    ax.set_ylabel("train site")
    ax.set_title(title)
    for (i, j), v in np.ndenumerate(mats[k]):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(fig_dir / "cross_domain.png", dpi=90)
  plt.close(fig)
  figures.append("ppi_claims/cross_domain.png")
  lines += ["![cross-domain](ppi_claims/cross_domain.png)", ""]


def _table2_section(t2, t2_arms, lines, metrics, figures, fig_dir, plt):
  rows = ["| training digits | " + " | ".join(_arm_label(a) for a in t2_arms) + " |",
          "|---|" + "---|" * len(t2_arms)]
  rows_d = ["| training digits | " + " | ".join(_arm_label(a) for a in t2_arms[1:]) + " |",
            "|---|" + "---|" * (len(t2_arms) - 1)]
  metrics["table2"] = {}
  fracs = sorted({fr for fr, _ in t2})
  for fr in fracs:
    base = [x["test"] for x in t2[(fr, "baseline")]]
    rows.append(f"| {100 * fr:.0f} % | " + " | ".join(
        _ms([x["test"] for x in t2[(fr, a)]]) for a in t2_arms) + " |")
    prs = [paired(base, [x["test"] for x in t2[(fr, a)]]) for a in t2_arms[1:]]
    rows_d.append(f"| {100 * fr:.0f} % | " + " | ".join(_fmt_pair(p) for p in prs) + " |")
    metrics["table2"][str(fr)] = {a: [x["test"] for x in t2[(fr, a)]] for a in t2_arms}
    metrics["table2"][str(fr)]["diff"] = dict(zip(t2_arms[1:], prs))
  lines += ["### Table 2 analogue (clean accuracy, small data)", "",
            "Clean test accuracy (mean ± SD over seeds):", "", *rows, "",
            "PPI - baseline (paired, 95 % interval):", "", *rows_d, ""]
  fig, ax = plt.subplots(figsize=(4.5, 3))
  for a in t2_arms:
    ax.errorbar([100 * f for f in fracs], [np.mean([x["test"] for x in t2[(f, a)]])
                                           for f in fracs],
                yerr=[np.std([x["test"] for x in t2[(f, a)]], ddof=1)
                      if len(t2[(f, a)]) > 1 else 0 for f in fracs],
                marker="o", capsize=3, label=_arm_label(a),
                linestyle="--" if a == "baseline" else "-")
  ax.set_xscale("log")
  ax.set_xlabel("% of training digits")
  ax.set_ylabel("clean test accuracy")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(fig_dir / "table2.png", dpi=90)
  plt.close(fig)
  figures.append("ppi_claims/table2.png")
  lines += ["![table2](ppi_claims/table2.png)"]


def _ablation_section(xab, base, full_ppi, lines, metrics):
  """PPI - baseline (paired) of the ablation arms next to full PPI, per claim."""
  metrics["ablations"] = {}
  cols = {"cross": list(SITES) + ["D_nomarker"], "table2": ["test"]}
  heads = {"cross": "Cross-domain, trained on site D: PPI - baseline (paired) on each test "
                    "site", "table2": "Table 2 analogue, 100 % of the digits: PPI - baseline "
                                      "(paired), clean test accuracy"}
  for claim in ("cross", "table2"):
    arms = [a for (c, a) in xab if c == claim]
    if not arms or not base[claim]:
      continue
    rows = ["| arm | " + " | ".join(c.replace("D_nomarker", "D without marker")
                                    for c in cols[claim]) + " |",
            "|---|" + "---|" * len(cols[claim])]
    for arm, runs in [("ppi:wbp", full_ppi[claim])] + [(a, xab[(claim, a)]) for a in arms]:
      if not runs:
        continue
      prs = [paired([b[c] for b in base[claim]], [x[c] for x in runs]) for c in cols[claim]]
      rows.append(f"| {_arm_label(arm)} | " + " | ".join(_fmt_pair(p) for p in prs) + " |")
      metrics["ablations"][f"{claim}/{arm}"] = {"runs": runs, "diff": dict(zip(cols[claim],
                                                                               prs))}
    lines += ["", f"### Ablations: {heads[claim]}", "", *rows]


def main(argv=None) -> dict:
  """``[--full | --smoke] [--out DIR] [--seed N]`` plus overrides of the settings, e.g.
  ``--seeds 5 --steps 200 --fractions 0.1,1.0 --methods wbp --train-sites A,D --sigma 0.3``."""
  import argparse
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  g = ap.add_mutually_exclusive_group()
  g.add_argument("--full", action="store_true")
  g.add_argument("--smoke", action="store_true")
  ap.add_argument("--out", default="outputs")
  ap.add_argument("--seed", type=int, default=0)
  for name in ("seeds", "steps", "warmup"):
    ap.add_argument(f"--{name}", type=int)
  ap.add_argument("--sigma", type=float)
  ap.add_argument("--cache-only", action="store_true",
                  help="report the runs already in the cache, train nothing")
  for name in ("fractions", "methods", "train-sites", "ablations", "xablations", "sweep",
               "claims"):
    ap.add_argument(f"--{name}", help="comma-separated ('' for none)")
  a = ap.parse_args(argv)
  ov = {k: getattr(a, k) for k in ("seeds", "steps", "warmup", "sigma")
        if getattr(a, k) is not None}
  if a.cache_only:
    ov["cache_only"] = True
  for name in ("fractions", "methods", "train_sites", "ablations", "xablations", "sweep",
               "claims"):
    v = getattr(a, name)
    if v is not None:
      items = [t for t in v.split(",") if t]
      ov[name] = tuple(float(t) for t in items) if name in ("fractions", "sweep") else tuple(
          items)
  result = run(pathlib.Path(a.out), full=a.full, smoke=a.smoke, seed=a.seed,
               overrides=ov or None)
  print(result["summary"])
  return result


if __name__ == "__main__":
  main()
