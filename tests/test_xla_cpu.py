"""``import jaxplain`` and XLA:CPU's convolution flag (jaxplain/_xla_cpu.py).

Each case runs in a fresh Python process: XLA reads ``XLA_FLAGS`` once, when the first backend
starts, so the pytest process itself (whose backend is already running) cannot show it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxplain import _xla_cpu

# Compiles one convolution large enough for jaxlib 0.10's cost model to hand it to YNNPACK by
# default, and prints what the compiled program does with it.
_PROBE = r"""
import json, os, sys, warnings
warnings.simplefilter("always")
if sys.argv[1] == "jax-first":
  import jax
  jax.numpy.zeros(1).block_until_ready()        # the backend starts before jaxplain
with warnings.catch_warnings(record=True) as caught:
  import jaxplain
import jax, jax.numpy as jnp
x, w = jnp.ones((8, 32, 32, 32)), jnp.ones((3, 3, 32, 64))
conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
hlo = jax.jit(conv).lower(x, w).compile().as_text()
print(json.dumps({"status": jaxplain.xla_cpu_tuning(), "flags": os.environ.get("XLA_FLAGS", ""),
                  "ynn": "__ynn_fusion" in hlo, "warnings": [str(c.message) for c in caught],
                  "heavy": sorted(m for m in ("matplotlib", "optax", "flax", "scipy",
                                              "tensorflow_datasets", "sklearn") if m in sys.modules)}))
"""


def _probe(order: str = "jaxplain-first", **env_overrides) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", _xla_cpu.OPT_OUT)}
  env.update(env_overrides)
  out = subprocess.run([sys.executable, "-c", _PROBE, order], env=env, capture_output=True,
                       text=True, check=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


needs_verified_jaxlib = pytest.mark.skipif(
    not _xla_cpu._VERIFIED.fullmatch(_xla_cpu._jaxlib_version()),  # pylint: disable=protected-access
    reason="the flag is applied only on the jaxlib versions where it was measured")


@needs_verified_jaxlib
def test_import_moves_convolutions_off_ynnpack():
  # The opt-out run is the independent reference: there jaxlib's default hands the same
  # convolution to YNNPACK, so this test fails if the flag stops having an effect.
  default = _probe(**{_xla_cpu.OPT_OUT: "0"})
  assert default["status"] == f"disabled by {_xla_cpu.OPT_OUT}=0"
  assert default["ynn"] and _xla_cpu.CONV_FLAG not in default["flags"]
  tuned = _probe()
  assert tuned["status"] == "applied"
  assert tuned["flags"].split() == [_xla_cpu.CONV_FLAG]
  assert not tuned["ynn"]
  assert tuned["warnings"] == []
  # submodules are imported on first use (jaxplain/__init__.py): ``import jaxplain`` alone
  # pulls in none of the heavy dependencies
  assert tuned["heavy"] == []


@needs_verified_jaxlib
def test_user_setting_and_other_flags_are_kept():
  mine = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
  kept = _probe(XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {mine}")
  assert kept["status"] == "user setting kept"
  assert kept["flags"] == f"--xla_force_host_platform_device_count=2 {mine}"
  assert kept["ynn"]  # the user's choice (YNNPACK convolutions) is what runs
  added = _probe(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  assert added["flags"].split() == ["--xla_force_host_platform_device_count=2", _xla_cpu.CONV_FLAG]
  assert not added["ynn"]


@needs_verified_jaxlib
def test_backend_started_first_warns_with_the_flag():
  late = _probe("jax-first")
  assert late["status"] == "backend already started"
  assert late["ynn"]  # too late: the flag could not take effect
  assert len(late["warnings"]) == 1 and _xla_cpu.CONV_FLAG in late["warnings"][0]
  quiet = _probe("jax-first", **{_xla_cpu.OPT_OUT: "0"})
  assert quiet["warnings"] == []


def test_unverified_jaxlib_is_left_alone(monkeypatch):
  monkeypatch.setattr(_xla_cpu, "_jaxlib_version", lambda: "0.11.0")
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert _xla_cpu.apply(env) == "jaxlib 0.11.0 not verified"
  assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  monkeypatch.setattr(_xla_cpu, "_jaxlib_version", lambda: "0.10.7")
  monkeypatch.setattr(_xla_cpu, "_backends_started", lambda: False)
  assert _xla_cpu.apply(env) == "applied"
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                      _xla_cpu.CONV_FLAG]


def test_lazy_public_names_resolve_to_their_modules():
  import importlib  # pylint: disable=import-outside-toplevel
  import jaxplain  # pylint: disable=import-outside-toplevel
  importlib.import_module("jaxplain.occlusion")  # the submodule does not shadow the function
  assert callable(jaxplain.occlusion) and jaxplain.occlusion.__module__ == "jaxplain.occlusion"
  for name in jaxplain.__all__:
    assert name in dir(jaxplain)
    value = getattr(jaxplain, name)
    if name != "XLA_CPU_CONV_FLAG":  # a string
      home = getattr(value, "__module__", getattr(value, "__name__", ""))
      assert home.startswith("jaxplain"), (name, home)
  assert jaxplain.causal_walk is importlib.import_module("jaxplain.interventions").walk
  assert jaxplain.plot is importlib.import_module("jaxplain.plot")
  with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
    jaxplain.no_such_name  # pylint: disable=pointless-statement
