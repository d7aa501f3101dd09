"""End-to-end smoke run of the main command (``python -m experiments.run_all --smoke``): every
experiment in the repository runs with tiny settings and every file it should write exists."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from experiments import run_all


def _present() -> list[str]:
  return [n for n in run_all.EXPERIMENTS
          if importlib.util.find_spec(f"experiments.{n}") is not None]


def test_run_all_smoke_writes_every_file(tmp_path: pathlib.Path, capsys):
  present = _present()
  assert {"seed000_saliency", "seed003_shift", "method_comparison"} <= set(present)
  rc = run_all.main(["--smoke", "--out", str(tmp_path)])
  printed = capsys.readouterr().out
  assert rc == 0, printed[-3000:]

  metrics = json.loads((tmp_path / "metrics.json").read_text())
  status = metrics["run_all"]
  assert set(status) == set(run_all.EXPERIMENTS)
  for name in run_all.EXPERIMENTS:
    expected = "ok" if name in present else "missing"
    assert status[name]["status"] == expected, (name, status[name])
    assert status[name]["settings"] == "smoke"
  for name in present:
    assert isinstance(metrics[name], dict) and metrics[name], name
    record = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    assert record["summary"].strip(), name
    for fig in record["figures"]:
      path = tmp_path / fig
      assert path.suffix == ".png" and path.is_file(), fig
      assert path.read_bytes()[:4] == b"\x89PNG", fig
      assert path.stat().st_size < 5 * 2 ** 20, fig

  report = (tmp_path / "report.md").read_text()
  for name in present:
    assert f"## {name}" in report
    record = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    for fig in record["figures"]:
      assert f"]({fig})" in report, fig
  # my three experiments: their figures and key numbers
  assert len(json.loads((tmp_path / "results" / "seed000_saliency.json").read_text())
             ["figures"]) == 3
  assert "claims" in metrics["seed003_shift"]
  mc = metrics["method_comparison"]["methods"]
  assert "random" in mc and all("deletion_auc" in v for v in mc.values())
  for name in present:
    assert f"{name}: ok" in printed  # progress lines


def test_run_all_reports_missing_modules(tmp_path: pathlib.Path, capsys):
  record = run_all.run_one("no_such_experiment", tmp_path, full=False, smoke=True, seed=0)
  assert record["status"] == "missing"
  assert "not in this repository" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    run_all.main(["--only", "no_such_experiment", "--out", str(tmp_path)])
