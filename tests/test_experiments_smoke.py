"""End-to-end smoke run of the main command (``python -m experiments.run_all --smoke``): every
experiment in the repository runs with tiny settings and every file it should write exists."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import pytest

from experiments import run_all


def _present() -> list[str]:
  return [n for n in run_all.EXPERIMENTS
          if importlib.util.find_spec(f"experiments.{n}") is not None]


# The smoke run is split into groups of experiments so that ``pytest -n 2`` can spread it
# over both workers (one test of the whole run took 222 s of a 480 s suite on 2 cores). Every
# group is a real ``run_all.main(["--smoke", "--only", ...])`` into its own folder; the trained
# checkpoints are shared through one folder of the session (``experiments.common.get_trained``
# serialises training with a file lock, so two workers train a model once between them).
_GROUPS = (("train_models", "seed000_saliency", "seed001_interventions"),
           ("seed003_shift", "method_comparison"),
           ("ppi_decoy", "ppi_claims"))


def _group_params():
  known = {n for g in _GROUPS for n in g}
  rest = tuple(n for n in run_all.EXPERIMENTS if n not in known)
  groups = _GROUPS + ((rest,) if rest else ())
  return [pytest.param(g, id="+".join(g)) for g in groups]


def test_smoke_groups_cover_every_experiment():
  covered = [n for p in _group_params() for n in p.values[0]]
  assert sorted(covered) == sorted(run_all.EXPERIMENTS)
  assert len(covered) == len(set(covered))
  assert {"seed000_saliency", "seed003_shift", "method_comparison"} <= set(_present())


def _shared_checkpoints(tmp_path: pathlib.Path) -> pathlib.Path:
  root = os.environ.get("JAXPLAIN_TEST_TMP")  # set by conftest.py, shared by xdist workers
  shared = pathlib.Path(root) / "smoke-checkpoints" if root else tmp_path / "checkpoints-shared"
  shared.mkdir(parents=True, exist_ok=True)
  return shared


@pytest.mark.parametrize("group", _group_params())
def test_run_all_smoke_writes_every_file(group, tmp_path: pathlib.Path, capsys):
  present = [n for n in group if n in _present()]
  (tmp_path / "checkpoints").symlink_to(_shared_checkpoints(tmp_path), target_is_directory=True)
  rc = run_all.main(["--smoke", "--only", ",".join(group), "--out", str(tmp_path)])
  printed = capsys.readouterr().out
  assert rc == 0, printed[-3000:]

  metrics = json.loads((tmp_path / "metrics.json").read_text())
  status = metrics["run_all"]
  assert set(status) == set(group)
  for name in group:
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
    assert f"{name}: ok" in printed  # progress lines
  # the key figures and numbers of the seed experiments
  if "seed000_saliency" in present:
    assert len(json.loads((tmp_path / "results" / "seed000_saliency.json").read_text())
               ["figures"]) == 3
  if "seed003_shift" in present:
    assert "claims" in metrics["seed003_shift"]
  if "method_comparison" in present:
    mc = metrics["method_comparison"]["methods"]
    assert "random" in mc and all("deletion_auc" in v for v in mc.values())


def test_run_all_reports_missing_modules(tmp_path: pathlib.Path, capsys):
  record = run_all.run_one("no_such_experiment", tmp_path, full=False, smoke=True, seed=0)
  assert record["status"] == "missing"
  assert "not in this repository" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    run_all.main(["--only", "no_such_experiment", "--out", str(tmp_path)])
