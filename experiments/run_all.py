"""Run every experiment of the repository and write ``metrics.json`` and ``report.md``.

    python -m experiments.run_all [--only NAME[,NAME...]] [--full | --smoke] [--out outputs]

Each experiment module ``experiments.<name>`` exposes ``run(out_dir, *, full, smoke, seed)``
returning ``{"metrics", "figures", "summary"}`` (see experiments/README.md). The modules are
imported by name, in the order of :data:`EXPERIMENTS` (model training first, so that the later
experiments restore its checkpoints); a module that is not in the repository is reported and
skipped, and an experiment that raises is reported (traceback printed), the others still run
and the exit status is 1.

Outputs under ``--out``:
  * ``results/<name>.json``: each experiment's full result, status and wall time;
  * ``metrics.json``: one key per experiment that has a result (its ``metrics``), plus
    ``"run_all"`` (status, seconds and settings of each experiment);
  * ``report.md``: every experiment's summary with its figures embedded (paths relative to
    ``--out``).
``metrics.json`` and ``report.md`` are rebuilt from every ``results/*.json`` present, so
``--only NAME`` refreshes one experiment and keeps the others' earlier results (each section
states when and with which settings it ran).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import pathlib
import sys
import time
import traceback
from typing import Any

# Training first (checkpoints), then the experiments in the order of the source documents.
EXPERIMENTS = (
    "train_models",
    "seed000_saliency",
    "seed001_interventions",
    "seed003_shift",
    "method_comparison",
    "ppi_decoy",
    "ppi_claims",
)


def _import(name: str):
  """The experiment module, or ``None`` when ``experiments.<name>`` is not in the repo."""
  full = f"experiments.{name}"
  try:
    return importlib.import_module(full)
  except ModuleNotFoundError as e:
    if e.name == full:
      return None
    raise


def _jsonable(obj: Any) -> Any:
  """Convert NumPy/JAX scalars and arrays (and tuples) into plain JSON types."""
  import numpy as np
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (str, bool, int, float)) or obj is None:
    if isinstance(obj, float) and not np.isfinite(obj):
      return None if np.isnan(obj) else (1e308 if obj > 0 else -1e308)
    return obj
  if isinstance(obj, pathlib.Path):
    return str(obj)
  if hasattr(obj, "tolist"):
    return _jsonable(np.asarray(obj).tolist())
  return str(obj)


def run_one(name: str, out: pathlib.Path, *, full: bool, smoke: bool, seed: int) -> dict:
  """Import and run one experiment; return its record (status, seconds, result)."""
  settings = "full" if full else ("smoke" if smoke else "fast")
  record = {"name": name, "settings": settings, "seed": seed,
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
  module = _import(name)
  if module is None:
    print(f"[run_all] NOTE: experiments.{name} is not in this repository (yet) -- skipped",
          flush=True)
    record.update(status="missing", seconds=0.0)
    return record
  if not hasattr(module, "run"):
    print(f"[run_all] NOTE: experiments.{name} has no run(out_dir, ...) -- skipped", flush=True)
    record.update(status="missing", seconds=0.0)
    return record
  t0 = time.perf_counter()
  try:
    result = module.run(out, full=full, smoke=smoke, seed=seed)
    record["status"] = "ok"
  except Exception as e:  # noqa: BLE001 -- report and continue with the next experiment
    traceback.print_exc()
    print(f"[run_all] ERROR: experiments.{name} failed: {type(e).__name__}: {e}", flush=True)
    result = None
    record.update(status="failed", error=f"{type(e).__name__}: {e}")
  record["seconds"] = round(time.perf_counter() - t0, 2)
  if result is not None:
    missing_keys = {"metrics", "figures", "summary"} - set(result)
    if missing_keys:
      record.update(status="failed", error=f"run() result lacks keys {sorted(missing_keys)}")
    else:
      figs = [str(p) for p in result["figures"]]
      absent = [p for p in figs if not (out / p).is_file()]
      if absent:
        print(f"[run_all] WARNING: {name} lists figures that do not exist: {absent}",
              flush=True)
      record.update(metrics=_jsonable(result["metrics"]), figures=figs,
                    summary=str(result["summary"]))
  return record


def _load_records(out: pathlib.Path) -> dict[str, dict]:
  records = {}
  for p in sorted((out / "results").glob("*.json")):
    try:
      rec = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
      continue
    records[rec.get("name", p.stem)] = rec
  order = {n: i for i, n in enumerate(EXPERIMENTS)}
  return dict(sorted(records.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def write_outputs(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """Rebuild ``metrics.json`` and ``report.md`` from ``out/results/*.json``."""
  records = _load_records(out)
  metrics: dict[str, Any] = {n: r["metrics"] for n, r in records.items() if "metrics" in r}
  metrics["run_all"] = {n: {k: r.get(k) for k in ("status", "seconds", "settings", "seed",
                                                    "started", "error") if k in r}
                        for n, r in records.items()}
  mpath = out / "metrics.json"
  mpath.write_text(json.dumps(metrics, indent=1, sort_keys=False, allow_nan=False))

  lines = ["# jaxplain experiment report", "",
           "Written by `python -m experiments.run_all`; every number below is in "
           "`metrics.json`.", "",
           "| experiment | status | settings | seconds | ran |", "|---|---|---|---:|---|"]
  for n, r in records.items():
    lines.append(f"| {n} | {r.get('status')} | {r.get('settings')} | "
                 f"{r.get('seconds', 0):.1f} | {r.get('started', '')} |")
  for n, r in records.items():
    lines += ["", f"## {n}", ""]
    if r.get("status") == "missing":
      lines.append(f"_experiments.{n} is not in the repository yet._")
      continue
    if r.get("status") == "failed" and "summary" not in r:
      lines.append(f"**Failed:** `{r.get('error')}`")
      continue
    summary = r.get("summary", "").strip()
    lines.append(summary)
    for fig in r.get("figures", []):
      if f"]({fig})" not in summary:  # not embedded by the summary itself
        lines += ["", f"![{pathlib.Path(fig).stem}]({fig})"]
  rpath = out / "report.md"
  rpath.write_text("\n".join(lines) + "\n")
  return mpath, rpath


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.run_all",
      description="Run every jaxplain experiment and write metrics.json and report.md.")
  parser.add_argument("--only", default=None,
                      help=f"comma-separated experiment names, from {', '.join(EXPERIMENTS)}")
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--full", action="store_true", help="paper-size settings (slow)")
  size.add_argument("--smoke", action="store_true", help="tiny settings (end-to-end test)")
  parser.add_argument("--out", default="outputs", help="output folder (default: outputs)")
  parser.add_argument("--seed", type=int, default=0, help="seed passed to every experiment")
  args = parser.parse_args(argv)

  names = list(EXPERIMENTS)
  if args.only:
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS and _import(n) is None]
    if unknown:
      parser.error(f"--only: unknown or missing experiment(s) {unknown}; "
                   f"known: {', '.join(EXPERIMENTS)}")
  out = pathlib.Path(args.out)
  (out / "results").mkdir(parents=True, exist_ok=True)
  settings = "full" if args.full else ("smoke" if args.smoke else "fast")
  print(f"[run_all] {len(names)} experiment(s), {settings} settings, output in {out}/",
        flush=True)
  t_all = time.perf_counter()
  failed = []
  for i, name in enumerate(names, 1):
    print(f"[run_all] ({i}/{len(names)}) {name} ... "
          f"[{time.perf_counter() - t_all:.0f} s elapsed]", flush=True)
    record = run_one(name, out, full=args.full, smoke=args.smoke, seed=args.seed)
    (out / "results" / f"{name}.json").write_text(
        json.dumps(_jsonable(record), indent=1, allow_nan=False))
    if record["status"] == "failed":
      failed.append(name)
    print(f"[run_all] ({i}/{len(names)}) {name}: {record['status']} in "
          f"{record['seconds']:.1f} s", flush=True)
    if record.get("summary"):
      print(record["summary"].strip() + "\n", flush=True)
    write_outputs(out)  # keep the report current after every experiment
  mpath, rpath = write_outputs(out)
  print(f"[run_all] done in {time.perf_counter() - t_all:.0f} s: wrote {mpath} and {rpath}"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
