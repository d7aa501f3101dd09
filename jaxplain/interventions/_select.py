"""Selections of parameters by path (SPEC section 4: "interventions are pure edits of the
parameter pytree, selected by path").

A leaf's path is its pytree keys joined by ``/`` (``params/conv1/kernel``). A ``Selection`` is
a static, hashable value: regex patterns matched with ``re.fullmatch`` (big_vision style) or a
predicate ``(path, leaf) -> bool``. With several patterns the first pattern that matches a leaf
claims it (``Selection.assign``); a pattern that matches no leaf at all is an error that lists
the available paths.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: tuple) -> str:
  """``/``-joined string of a ``jax.tree_util`` key path."""
  return "/".join(_key_str(k) for k in path)


def tree_paths(tree: Any) -> list[str]:
  """The ``/``-joined path of every leaf of ``tree``, in flattening order.

  >>> tree_paths({"conv1": {"bias": 0., "kernel": 1.}, "fc": {"kernel": 2.}})
  ['conv1/bias', 'conv1/kernel', 'fc/kernel']
  """
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@dataclasses.dataclass(frozen=True)
class Selection:
  """A static, hashable set of parameter paths: regex ``patterns`` (full match) and/or a
  ``predicate(path: str, leaf) -> bool``. Build it with ``select``."""
  patterns: tuple[str, ...] = ()
  predicate: Callable[[str, Any], bool] | None = None

  def assign(self, tree: Any) -> dict[str, int]:
    """Map each selected leaf path to the index of the first pattern matching it (the
    predicate counts as index ``len(patterns)``). Raises ``ValueError`` listing the
    available paths when a pattern (or the predicate) matches nothing."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [path_str(p) for p, _ in leaves]
    out: dict[str, int] = {}
    hit = [False] * (len(self.patterns) + 1)
    for (_, leaf), p in zip(leaves, paths):
      for i, pat in enumerate(self.patterns):
        if re.fullmatch(pat, p):
          hit[i] = True
          out.setdefault(p, i)
      if self.predicate is not None and self.predicate(p, leaf):
        hit[-1] = True
        out.setdefault(p, len(self.patterns))
    missing = [pat for pat, h in zip(self.patterns, hit) if not h]
    if self.predicate is not None and not hit[-1]:
      missing.append(f"<predicate {getattr(self.predicate, '__name__', self.predicate)}>")
    if missing:
      raise ValueError(f"selection: {missing} matched no parameter; available paths: {paths}")
    return out

  def paths(self, tree: Any) -> tuple[str, ...]:
    """The selected leaf paths, in flattening order."""
    a = self.assign(tree)
    return tuple(p for p in tree_paths(tree) if p in a)


def select(*patterns: str, predicate: Callable[[str, Any], bool] | None = None) -> Selection:
  """Select parameters by regex full match on ``/``-joined paths, or by a predicate.

  Args:
    *patterns: regular expressions; a leaf is selected when one matches its whole path.
    predicate: optional ``(path, leaf) -> bool``.

  Returns:
    A hashable ``Selection`` (usable as a static argument under ``jax.jit``).

  >>> params = {"conv1": {"kernel": 1., "bias": 0.}, "fc": {"kernel": 2., "bias": 0.}}
  >>> select(r".*/kernel").paths(params)
  ('conv1/kernel', 'fc/kernel')
  """
  if not patterns and predicate is None:
    raise ValueError("select: give at least one pattern or a predicate")
  for i, p in enumerate(patterns):
    if not isinstance(p, str):
      raise TypeError(f"patterns: expected regex strings, got {p!r} at position {i}")
    try:
      re.compile(p)
    except re.error as err:
      raise ValueError(f"patterns: {p!r} (position {i}) is not a valid regular expression: "
                       f"{err}") from err
  return Selection(tuple(patterns), predicate)


def as_selection(sel: Selection | str | tuple | list) -> Selection:
  """Accept a ``Selection``, a pattern string or a sequence of patterns."""
  if isinstance(sel, Selection):
    return sel
  if isinstance(sel, str):
    return select(sel)
  if isinstance(sel, (tuple, list)):
    return select(*sel)
  raise TypeError(f"selection: expected a Selection, a regex string or a list of them, got {sel!r}")
