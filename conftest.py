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
"""

from __future__ import annotations

import os

import jax
import pytest

import jaxplain  # noqa: F401  first, so that its XLA:CPU flag is set before a backend starts

_MARK = "JAXPLAIN_TEST_TMP"  # set by the controller, inherited by the xdist workers
_NO_OPT = "JAX_DISABLE_MOST_OPTIMIZATIONS"


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has configured itself
def pytest_configure(config):
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  jax.config.update("jax_numpy_rank_promotion", "raise")
  os.environ.setdefault(_NO_OPT, "1")   # inherited by the tests' subprocesses
  jax.config.update("jax_disable_most_optimizations",
                    os.environ[_NO_OPT].strip().lower()
                    not in ("0", "false", "no", "off", "n", "f", ""))
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
