"""Tests for jaxplain._progress: tqdm frames on a terminal, one line per item in a log."""

from __future__ import annotations

import io
import sys

from jaxplain import _progress


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_log_gets_one_line_per_item(capsys):
  seen = list(_progress.iterate(["a", "b", "c"], desc="runs"))
  assert seen == ["a", "b", "c"]
  err = capsys.readouterr().err
  assert "\r" not in err
  lines = err.splitlines()
  assert [l.split(" done")[0] for l in lines] == ["runs: 1/3", "runs: 2/3", "runs: 3/3"]
  list(_progress.iterate(iter(range(2)), desc="gen"))  # no len: total unknown
  assert capsys.readouterr().err.splitlines()[0].startswith("gen: 1/? done")
  list(_progress.iterate(range(2), desc="quiet", disable=True))
  assert capsys.readouterr().err == ""


def test_terminal_gets_a_tqdm_bar(monkeypatch):
  fake = _Terminal()
  monkeypatch.setattr(sys, "stderr", fake)
  assert _progress.is_terminal()
  assert list(_progress.iterate(range(3), desc="runs")) == [0, 1, 2]
  out = fake.getvalue()
  assert "\r" in out and "runs" in out and "3/3" in out
  assert not _progress.is_terminal(io.StringIO())
