"""Progress reporting (private): a tqdm bar on a terminal, one plain line per unit in a log.

When stderr is not a terminal (CI, ``nohup``, a file), tqdm's carriage-return frames would
fill the log with thousands of partial lines, so :func:`iterate` and the training loop print
one line per finished item / epoch to stderr instead.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def is_terminal(stream=None) -> bool:
  """True when ``stream`` (default ``sys.stderr``) is an interactive terminal."""
  stream = sys.stderr if stream is None else stream
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


def line(message: str) -> None:
  """Print one progress line to stderr (flushed, so it shows in a log at once)."""
  print(message, file=sys.stderr, flush=True)


def iterate(iterable: Iterable[T], *, desc: str, total: int | None = None,
            disable: bool = False) -> Iterator[T]:
  """Yield the items of ``iterable`` with progress: a tqdm bar on a terminal, else one line
  ``"desc: i/n done (s s)"`` on stderr after each item; nothing when ``disable``."""
  if disable:
    yield from iterable
    return
  if is_terminal():
    from tqdm.auto import tqdm
    yield from tqdm(iterable, desc=desc, total=total)
    return
  if total is None and hasattr(iterable, "__len__"):
    total = len(iterable)  # type: ignore[arg-type]
  start = time.perf_counter()
  for i, item in enumerate(iterable, 1):
    yield item
    line(f"{desc}: {i}/{'?' if total is None else total} done "
         f"({time.perf_counter() - start:.1f} s)")
