"""The README's code runs as written against the current API (its "In one screen" block and
the two-device example that follows it), in a fresh interpreter: a renamed argument or a
changed output shape fails here instead of in a user's first minute."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run_and_give_the_stated_shapes():
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  assert len(blocks) >= 2, "README: expected the one-screen block and the sharding block"
  screen, sharded = blocks[0], blocks[1].splitlines()
  env_lines = [ln for ln in sharded if "XLA_FLAGS" in ln or ln.strip() == "import os"]
  rest = [ln for ln in sharded if ln not in env_lines]
  # the sharding block sets XLA_FLAGS before jax is imported, then reuses f, x, t of the first
  checks = """
assert g.shape == x.shape and ig.shape == x.shape and s.shape == x.shape, (g.shape, ig.shape)
assert gap.shape == (8,) and cam.shape == (8, 28, 28), (gap.shape, cam.shape)
assert logits_do.shape == (16, 8, 10), logits_do.shape
assert len(jax.devices()) == 2 and d["x"].sharding.num_devices == 2
print("@@ok")
"""
  script = "\n".join(env_lines) + "\n" + screen + "\n" + "\n".join(rest) + "\n" + checks
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert "@@ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
