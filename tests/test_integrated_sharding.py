"""IG on a batch sharded over two forced host CPU devices: the chunks stay on their devices.

``--xla_force_host_platform_device_count`` must be set before JAX starts, so the check runs
in a fresh Python process.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, re
import numpy as np, jax, jax.numpy as jnp
import jaxplain
from jaxplain.data import data_mesh, shard_batch

rng = np.random.default_rng(0)
k1 = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
w2 = jnp.asarray(rng.normal(size=(4 * 4 * 4, 3)), jnp.float32)

def f(x):  # a small conv net, (B, 4, 4, 2) -> (B, 3)
  h = jax.lax.conv_general_dilated(x, k1, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.tanh(h).reshape(x.shape[0], -1) @ w2

x = rng.uniform(size=(4, 4, 4, 2)).astype(np.float32)
t = np.array([0, 1, 2, 1], np.int32)
d = shard_batch({"x": x, "t": t}, data_mesh())
fn = jax.jit(lambda x, t: jaxplain.integrated_gradients(f, x, t, steps=6, chunk=4))
hlo = fn.lower(d["x"], d["t"]).compile().as_text()
ig = fn(d["x"], d["t"])

# independent: a Python loop over the 6 Gauss-Legendre nodes, per example, in float64
a, w = np.polynomial.legendre.leggauss(6)
a, w = (a + 1) / 2, w / 2
with jax.enable_x64(True):
  k64, w64 = jnp.asarray(k1, jnp.float64), jnp.asarray(w2, jnp.float64)
  def f1(z):
    h = jax.lax.conv_general_dilated(z[None], k64, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (jnp.tanh(h).reshape(1, -1) @ w64)[0]
  ref = np.zeros(x.shape)
  for b in range(4):
    for ak, wk in zip(a, w):
      g = jax.grad(lambda z: f1(z)[int(t[b])])(jnp.asarray(ak * x[b], jnp.float64))
      ref[b] += wk * np.asarray(g)
  ref *= x
print("@@" + json.dumps({
    "devices": len(jax.devices()),
    "sharded_over": len(ig.sharding.device_set),
    "collectives": re.findall(r"(all-gather|all-reduce|all-to-all|collective-permute)\(", hlo),
    "max_err": float(np.max(np.abs(np.asarray(ig, np.float64) - ref))),
    "scale": float(np.max(np.abs(ref)))}))
"""


def test_ig_on_a_batch_sharded_over_two_host_devices_needs_no_collectives():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
  assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
  out = json.loads(lines[0][2:])
  assert out["devices"] == 2 and out["sharded_over"] == 2, out
  # rows ordered (example, step) and a per-example sequencing term: nothing crosses devices
  # (the (step, example) order all-gathered every chunk's points onto both devices)
  assert out["collectives"] == [], out
  assert out["max_err"] < 1e-5 * max(1.0, out["scale"]), out
