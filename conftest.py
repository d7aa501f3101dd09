"""pytest setup for the whole repository: the tests in ``tests/`` and the doctests of
``jaxplain/`` (``pytest --doctest-modules jaxplain tests``).

- JAX runs with strict dtype promotion and rank promotion = raise (as equinox's suite does),
  so an accidental promotion or broadcast is an error.
- Nothing is written outside temporary directories: the tfds data directory
  (``JAXPLAIN_DATA_DIR`` / ``TFDS_DATA_DIR``), matplotlib's and Keras' config/cache folders
  point into one pytest temporary directory per session. With ``pytest -n`` the controller
  creates it before the workers start and the workers inherit it through the environment, so
  the embedded digits are prepared once per session (``jaxplain.data`` serialises the
  preparation with a file lock). A data directory set beforehand is overridden on purpose:
  the tests must pass on a machine that never prepared the data.
- ``jaxplain`` is imported before anything starts a JAX backend, so the suite runs with the
  XLA:CPU convolution flag that ``import jaxplain`` sets (``jaxplain/_xla_cpu.py``).
- JAX's persistent compilation cache lives in the same directory, so a program compiled by
  one test (or one xdist worker, or a test's subprocess) is reused by the others in the same
  session; it starts empty, like the data.
- XLA compiles with most optimisations off (``jax_disable_most_optimizations``; also set in
  the environment, so the tests' subprocesses inherit it). The suite is compile-bound: most
  tests compile a program once and run it on a few examples. Measured on the 2-core CI-sized
  machine (2026-12-04): 1,086 s with XLA's optimisations, 728 s without; five compile-heavy
  tests alone 148 s -> 85 s. The numbers the tests check do not depend on it (each compares
  with an independent computation at a float32 tolerance). ``JAX_DISABLE_MOST_OPTIMIZATIONS=0``
  in the environment runs the suite with XLA's full optimisations.
- With optimisations off, XLA:CPU also compiles with its older loop emitters and one codegen
  split (``--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1``,
  added to ``XLA_FLAGS`` before any backend starts, unless ``XLA_FLAGS`` already names them).
  Measured on the 2-core machine (2026-12-05, jaxlib 0.10.2): a tiny jitted function compiles
  in 26-29 ms instead of 50-52 ms, the gradient of a 6-convolution net in 73-133 ms instead
  of 209-212 ms; three smoke experiments (train_models, seed000_saliency, ppi_decoy, run
  alternately A B A B) 72-80 s -> 59-63 s. The whole suite was not A/B-timed: two single runs
  on different hours took 781 s without and 926 s with it, while the machine's own speed
  varies by more than that between runs (1,003 s for the same code on 12-05 morning).
  ``JAX_DISABLE_MOST_OPTIMIZATIONS=0`` runs without either setting. These two flags are
  added for jaxlib 0.10 only (where they were measured): jaxlib 0.11 no longer knows the
  first, and XLA aborts on an unknown flag.
"""

from __future__ import annotations

import os

_NO_OPT = "JAX_DISABLE_MOST_OPTIMIZATIONS"
_FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def _no_opt() -> bool:
  return os.environ.get(_NO_OPT, "1").strip().lower() not in ("0", "false", "no", "off", "n",
                                                              "f", "")


def _flags_known() -> bool:
  """Whether this jaxlib knows the _FAST_COMPILE flags: XLA aborts the process at its first
  computation on an unknown flag in XLA_FLAGS, and jaxlib 0.11 removed the first one."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version("jaxlib").startswith("0.10.")
  except metadata.PackageNotFoundError:
    return False


if _no_opt() and _flags_known():  # before a JAX backend starts (XLA reads XLA_FLAGS once)
  _flags = os.environ.get("XLA_FLAGS", "").split()
  _flags += [f for f in _FAST_COMPILE if not any(g.startswith(f.split("=")[0]) for g in _flags)]
  os.environ["XLA_FLAGS"] = " ".join(_flags)

import jax  # noqa: E402
import pytest  # noqa: E402

import jaxplain  # noqa: F401  first, so that its XLA:CPU flag is set before a backend starts

_MARK = "JAXPLAIN_TEST_TMP"  # set by the controller, inherited by the xdist workers


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has configured itself
def pytest_configure(config):
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  jax.config.update("jax_numpy_rank_promotion", "raise")
  os.environ.setdefault(_NO_OPT, "1")   # inherited by the tests' subprocesses
  jax.config.update("jax_disable_most_optimizations", _no_opt())
  if hasattr(config, "workerinput") and os.environ.get(_MARK):
    root = os.environ[_MARK]  # an xdist worker: share the controller's directory
  else:
    root = str(config._tmp_path_factory.getbasetemp() / "jaxplain-session")  # pylint: disable=protected-access
    os.environ[_MARK] = root
  for var, sub in (("JAXPLAIN_DATA_DIR", "tensorflow_datasets"),
                   ("TFDS_DATA_DIR", "tensorflow_datasets"),
                   ("MPLCONFIGDIR", "matplotlib"), ("KERAS_HOME", "keras"),
                   ("JAX_COMPILATION_CACHE_DIR", "jax-cache")):
    path = os.path.join(root, sub)
    os.makedirs(path, exist_ok=True)
    os.environ[var] = path
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
