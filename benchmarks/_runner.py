"""Run each contender of a comparison in its own process, alternating A B A B.

In one process JAX's and torch's thread pools compete and a peer's time swings 2-6x, which is
not a result. So every peer comparison in ``benchmarks/`` goes through this runner:

  * a *contender* is a top-level function ``setup(**kwargs)`` in some module. It builds its
    model and data, warms up (compiles), and returns either a zero-argument callable to time
    or a dict ``{"run": callable, "info": {...}}`` (``info`` is JSON-serialisable and comes
    back as it is: agreement numbers, the steps used, ...). The callable must block until its
    result is ready (``jax.block_until_ready``; torch on CPU is synchronous).
  * ``compare(contenders, rounds=5, repeats=3)`` starts one fresh ``python`` per contender
    and round, in the order A B A B ..., reads back the timings and returns, per contender,
    the median over all timed calls, min / max, and the CPU utilisation
    ((user + sys) / wall while timing; 1.0 = one core busy).
  * ``ratio(results, a, b)`` is median(a) / median(b), with the per-round ratios beside it.

Usage from a benchmark script::

  from benchmarks import _runner
  res = _runner.compare({
      "jaxplain": _runner.Contender("benchmarks.bench_x:setup_jax", dict(m=32)),
      "captum": _runner.Contender("benchmarks.bench_x:setup_captum", dict(m=32),
                                  env={"OMP_NUM_THREADS": "2"}),
  }, rounds=5)
  print(_runner.table(res))
  r = _runner.ratio(res, "captum", "jaxplain")

The worker is this file run as a module: ``python -m benchmarks._runner TARGET KWARGS_JSON
REPEATS``; it prints one JSON line prefixed with ``@@RESULT``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
_TAG = "@@RESULT "


@dataclasses.dataclass(frozen=True)
class Contender:
  """``target`` is ``"module:function"``; ``env`` entries are added to the worker's environment."""
  target: str
  kwargs: dict = dataclasses.field(default_factory=dict)
  env: dict = dataclasses.field(default_factory=dict)


def load_average() -> str:
  """The 1, 5 and 15 minute load averages, for the table's header."""
  try:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "n/a"


def _worker(target: str, kwargs: dict, repeats: int) -> dict:
  module, func = target.split(":")
  t0 = time.perf_counter()
  out = getattr(importlib.import_module(module), func)(**kwargs)
  setup_s = time.perf_counter() - t0
  run, info = (out["run"], out.get("info", {})) if isinstance(out, dict) else (out, {})
  times, cpus = [], []
  for _ in range(repeats):
    c0, w0 = os.times(), time.perf_counter()
    run()
    w1, c1 = time.perf_counter(), os.times()
    wall = w1 - w0
    times.append(wall)
    cpus.append((c1.user - c0.user + c1.system - c0.system) / max(wall, 1e-9))
  jaxplain = sys.modules.get("jaxplain")  # what its import did with XLA:CPU's flag, if loaded
  return {"times": times, "cpu": statistics.median(cpus), "setup_s": setup_s, "info": info,
          "xla_cpu": jaxplain.xla_cpu_tuning() if jaxplain else None}


def run_once(c: Contender, repeats: int = 3, timeout: float = 1800.0) -> dict:
  """One fresh process for contender ``c``; returns its timings (see ``_worker``)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  env.update({k: str(v) for k, v in c.env.items()})
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks._runner", c.target, json.dumps(c.kwargs), str(repeats)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  for line in proc.stdout.splitlines():
    if line.startswith(_TAG):
      return json.loads(line[len(_TAG):])
  raise RuntimeError(f"contender {c.target} failed (exit {proc.returncode}):\n"
                     f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def compare(contenders: dict, rounds: int = 5, repeats: int = 3, verbose: bool = True,
            timeout: float = 1800.0) -> dict:
  """Alternate the contenders A B A B over ``rounds``, each call in its own process (killed
  after ``timeout`` seconds, setup included).

  Returns ``{name: {"median", "min", "max", "cpu", "rounds": [per-round medians], "info"}}``
  (seconds; ``info`` from the last round).
  """
  per = {name: [] for name in contenders}
  for r in range(rounds):
    for name, c in contenders.items():
      res = run_once(c, repeats, timeout)
      per[name].append(res)
      if verbose:
        print(f"  round {r + 1}/{rounds} {name}: median {statistics.median(res['times']):.4g} s "
              f"(cpu {res['cpu']:.2f}, setup {res['setup_s']:.1f} s)", file=sys.stderr, flush=True)
  out = {}
  for name, rs in per.items():
    times = [t for res in rs for t in res["times"]]
    out[name] = {
        "median": statistics.median(times), "min": min(times), "max": max(times),
        "cpu": statistics.median([res["cpu"] for res in rs]),
        "rounds": [statistics.median(res["times"]) for res in rs],
        "info": rs[-1]["info"], "xla_cpu": rs[-1].get("xla_cpu"),
    }
  return out


def ratio(results: dict, a: str, b: str) -> dict:
  """median(a) / median(b), and the ratio of each round's medians (A and B of one round)."""
  ra, rb = results[a]["rounds"], results[b]["rounds"]
  return {"ratio": results[a]["median"] / results[b]["median"],
          "per_round": [x / y for x, y in zip(ra, rb)]}


def table(results: dict, title: str = "") -> str:
  """A Markdown table of the medians, min-max and CPU use, headed by the load average."""
  lines = [f"{title} (load average {load_average()})" if title else
           f"load average {load_average()}", "",
           "| contender | median | min - max | CPU use |", "|---|---|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | {_fmt(r['median'])} | {_fmt(r['min'])} - {_fmt(r['max'])} "
                 f"| {100 * r['cpu']:.0f} % |")
  return "\n".join(lines)


NOTES = "<!-- notes: kept across runs -->"


def write_keeping_notes(path, lines: list[str], marker: str = NOTES) -> None:
  """Write a benchmark's ``.md``: the generated ``lines``, then everything the old file had
  from ``marker`` on (hand-written notes on what was tried), or just the marker."""
  path = pathlib.Path(path)
  old = path.read_text() if path.exists() else ""
  notes = old[old.index(marker):] if marker in old else marker + "\n"
  path.write_text("\n".join(lines) + "\n\n" + notes)


def _fmt(s: float) -> str:
  return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


if __name__ == "__main__":
  target, kwargs, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
  print(_TAG + json.dumps(_worker(target, kwargs, repeats)), flush=True)
