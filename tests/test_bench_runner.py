"""The benchmark runner times each contender in its own process and alternates them."""

import os
import subprocess
import time

import pytest

from benchmarks import _runner


def setup_sleep(seconds):
  """A contender: returns a callable that sleeps, and its pid so the test sees the process."""
  return {"run": lambda: time.sleep(seconds), "info": {"pid": os.getpid()}}


def test_compare_times_each_contender_in_a_fresh_process():
  res = _runner.compare({
      "short": _runner.Contender("tests.test_bench_runner:setup_sleep", {"seconds": 0.02}),
      "long": _runner.Contender("tests.test_bench_runner:setup_sleep", {"seconds": 0.08}),
  }, rounds=2, repeats=2, verbose=False)
  assert abs(res["short"]["median"] - 0.02) < 0.015
  assert abs(res["long"]["median"] - 0.08) < 0.03
  assert res["short"]["cpu"] < 0.5          # sleeping uses no CPU
  assert res["short"]["info"]["pid"] != os.getpid()
  r = _runner.ratio(res, "long", "short")
  assert 2.0 < r["ratio"] < 6.0 and len(r["per_round"]) == 2
  assert "| short |" in _runner.table(res, "sleep")


def test_compare_stops_a_contender_at_its_timeout():
  slow = _runner.Contender("tests.test_bench_runner:setup_sleep", {"seconds": 30.0})
  t0 = time.perf_counter()
  with pytest.raises(subprocess.TimeoutExpired):
    _runner.compare({"slow": slow}, rounds=1, repeats=1, verbose=False, timeout=8.0)
  assert time.perf_counter() - t0 < 25.0


def test_write_keeping_notes_keeps_the_hand_written_part(tmp_path):
  path = tmp_path / "bench.md"
  _runner.write_keeping_notes(path, ["# run 1", "a"])
  assert path.read_text() == "# run 1\na\n\n" + _runner.NOTES + "\n"
  path.write_text(path.read_text() + "what was tried\n")
  _runner.write_keeping_notes(path, ["# run 2"])
  assert path.read_text() == "# run 2\n\n" + _runner.NOTES + "\nwhat was tried\n"
