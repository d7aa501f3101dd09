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
"""

from __future__ import annotations

import os

import jax
import pytest

import jaxplain  # noqa: F401  first, so that its XLA:CPU flag is set before a backend starts

_MARK = "JAXPLAIN_TEST_TMP"  # set by the controller, inherited by the xdist workers


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has configured itself
def pytest_configure(config):
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  jax.config.update("jax_numpy_rank_promotion", "raise")
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
