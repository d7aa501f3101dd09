"""XLA:CPU convolutions on every core: one flag, set when jaxplain is imported.

jaxlib 0.10 sends every convolution on the CPU to YNNPACK (its default
``--xla_cpu_experimental_ynn_fusion_type`` contains ``individual_convolution``), and there
each convolution runs on one core: on a 2-core machine one XLA:CPU device kept 100-110 % of
the cores busy where torch keeps 199 %. With the convolutions left to XLA's own (Eigen)
kernels, which use the intra-op thread pool, the same programs run at 170-199 %. Measured on
the project's 2-core x86_64 machine (jaxlib 0.10.2, quiet, medians of separate processes):

=====================================  =========  =================================
program                                default    ``-individual_convolution``
=====================================  =========  =================================
conv 3x3, 32 -> 64, 64x32x32           78.6 ms    35.4 ms (100 % -> 199 % CPU)
its input gradient                     160 ms     74.6 ms
SmallCNN gradient, batch 64            381 ms     204-262 ms
SmallCNN IG m = 32, batch 64           12.9 s     6.3-8.1 s
SmallCNN LRP epsilon_plus, batch 64    498 ms     301-315 ms
2048 x 2048 matmul                     250 ms     245 ms (YNNPACK's dot is kept)
=====================================  =========  =================================

XLA reads ``XLA_FLAGS`` once, when the first backend starts (not when jax is imported), so
``import jaxplain`` appends :data:`CONV_FLAG` to ``XLA_FLAGS`` when all of these hold:

- no JAX backend has started yet in this process;
- the installed jaxlib is one whose flag was measured (0.10.x): XLA aborts the process on a
  flag it does not know, so an unknown jaxlib is left alone;
- ``XLA_FLAGS`` does not already set ``--xla_cpu_experimental_ynn_fusion_type`` (the
  user's choice wins);
- ``JAXPLAIN_XLA_CPU_FLAGS`` is not ``0`` (the opt-out).

The flag only concerns the CPU backend; GPU and TPU programs are unchanged. When a backend
had already started and runs on the CPU, the import warns once with the flag to set.
:func:`xla_cpu_tuning` reports what happened.
"""

from __future__ import annotations

import os
import re
import warnings

CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
OPT_OUT = "JAXPLAIN_XLA_CPU_FLAGS"
_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
_VERIFIED = re.compile(r"0\.10\.\d+")  # jaxlib versions where CONV_FLAG was measured

_status = "not attempted"


def _jaxlib_version() -> str:
  import jaxlib.version  # pylint: disable=import-outside-toplevel
  return jaxlib.version.__version__


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return bool(xla_bridge.backends_are_initialized())


def apply(environ=None) -> str:
  """Adds :data:`CONV_FLAG` to ``XLA_FLAGS`` if that is still possible and safe.

  Called by ``import jaxplain``; returns (and records for :func:`xla_cpu_tuning`) one of
  ``"applied"``, ``"user setting kept"``, ``"disabled by JAXPLAIN_XLA_CPU_FLAGS=0"``,
  ``"jaxlib X not verified"`` or ``"backend already started"``.

  Args:
    environ: the environment to edit (``os.environ`` by default; a dict in tests).
  """
  global _status  # pylint: disable=global-statement
  env = os.environ if environ is None else environ
  flags = env.get("XLA_FLAGS", "")
  if env.get(OPT_OUT, "").strip() == "0":
    _status = f"disabled by {OPT_OUT}=0"
  elif _FLAG_NAME in flags:
    _status = "user setting kept"
  elif not _VERIFIED.fullmatch(version := _jaxlib_version()):
    _status = f"jaxlib {version} not verified"
  elif _backends_started():
    _status = "backend already started"
    import jax  # pylint: disable=import-outside-toplevel
    if jax.default_backend() == "cpu":
      warnings.warn(
          "jaxplain was imported after JAX's CPU backend started, so XLA:CPU runs each "
          "convolution on one core (YNNPACK, jaxlib 0.10). Import jaxplain before the first "
          f"JAX computation, or start Python with XLA_FLAGS='{CONV_FLAG}' "
          f"(about 2x faster on 2 cores); {OPT_OUT}=0 silences this.", stacklevel=3)
  else:
    env["XLA_FLAGS"] = f"{flags} {CONV_FLAG}".strip()
    _status = "applied"
  return _status


def xla_cpu_tuning() -> str:
  """What ``import jaxplain`` did with XLA:CPU's convolution flag (see the module docstring).

  >>> import jaxplain
  >>> jaxplain.xla_cpu_tuning() != "not attempted"  # e.g. "applied"
  True
  """
  return _status
