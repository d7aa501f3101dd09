"""Occlusion: against a Python loop over windows, chunking, per-example targets, errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxplain


class Tiny(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), padding="SAME", name="conv1")(x))
    return nn.Dense(4, name="fc")(x.reshape(x.shape[0], -1))


X_SHAPE = (2, 7, 6, 2)


@pytest.fixture(scope="module")
def tiny():
  model = Tiny()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(X_SHAPE))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=X_SHAPE), jnp.float32)
  return jax.jit(functools.partial(model.apply, params)), x


def loop_occlusion(f, x, t, patch, stride, value):
  """One window at a time, one example at a time, numpy bookkeeping."""
  x = np.asarray(x)
  b, h, w = x.shape[:3]
  total = np.zeros((b, h, w))
  count = np.zeros((h, w))
  for i in range(0, h - patch[0] + 1, stride[0]):
    for j in range(0, w - patch[1] + 1, stride[1]):
      count[i:i + patch[0], j:j + patch[1]] += 1
      for e in range(b):
        xo = x[e].copy()
        xo[i:i + patch[0], j:j + patch[1]] = np.broadcast_to(value, x.shape)[e][
            i:i + patch[0], j:j + patch[1]]
        d = float(f(x[e:e + 1])[0, t[e]] - f(xo[None])[0, t[e]])
        total[e, i:i + patch[0], j:j + patch[1]] += d
  out = np.where(count > 0, total / np.maximum(count, 1), 0.0)
  return np.broadcast_to(out[..., None], x.shape) if x.ndim == 4 else out


@pytest.mark.parametrize("patch,stride,value", [((2, 2), (2, 2), 0.0), ((3, 2), (3, 1), 0.5),
                                                ((2, 3), (1, 3), "blur")])
def test_occlusion_matches_loop_over_windows(tiny, patch, stride, value):
  f, x = tiny
  t = np.array([1, 3])
  if value == "blur":  # an array value, one per example
    value = np.asarray(jaxplain.make_baseline(x, "blur", blur_sigma=1.0))
  got = jaxplain.occlusion(f, x, jnp.asarray(t), patch=patch, stride=stride, value=value)
  ref = loop_occlusion(f, x, t, patch, stride, value)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  if patch == (3, 2):  # windows that do not tile the image leave uncovered pixels at 0
    assert np.all(np.asarray(got)[:, 6] == 0.0)


def test_chunk_jit_and_rank3_input(tiny):
  f, x = tiny
  ref = jaxplain.occlusion(f, x, 2, patch=2, stride=1)
  got = jax.jit(lambda z: jaxplain.occlusion(f, z, 2, patch=2, stride=1, chunk=7))(x)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # (B, H, W) input, no channel axis
  g = lambda z: f(jnp.stack([z, z], axis=-1))  # noqa: E731
  x3 = x[..., 0]
  got3 = jaxplain.occlusion(g, x3, jnp.array([0, 1]), patch=(2, 3))
  np.testing.assert_allclose(got3, loop_occlusion(g, x3, [0, 1], (2, 3), (2, 3), 0.0),
                             rtol=1e-4, atol=1e-5)


def test_per_example_targets(tiny):
  f, x = tiny
  t = jnp.array([3, 0])
  both = jaxplain.occlusion(f, x, t, patch=3, stride=2)
  for b in range(2):
    one = jaxplain.occlusion(f, x[b:b + 1], int(t[b]), patch=3, stride=2)
    np.testing.assert_allclose(both[b:b + 1], one, rtol=1e-5, atol=1e-6)


def test_bad_input_errors_name_the_argument(tiny):
  f, x = tiny
  with pytest.raises(ValueError, match=r"x: expected a batched array of rank >= 3"):
    jaxplain.occlusion(f, x[0, 0], 0)
  with pytest.raises(ValueError, match=r"tabular \(B, D\) data jaxplain.feature_ablation"):
    jaxplain.occlusion(f, x[:, 0, 0], 0)
  with pytest.raises(ValueError, match="x: contains 1 non-finite"):
    jaxplain.occlusion(f, x.at[0, 1, 1, 1].set(jnp.nan), 0)
  with pytest.raises(ValueError, match=r"target: class index out of range \[0, 4\)"):
    jaxplain.occlusion(f, x, jnp.array([0, 4]))
  with pytest.raises(ValueError, match=r"patch: \(8, 8\) is larger than the image \(7, 6\)"):
    jaxplain.occlusion(f, x, 0, patch=8)
  with pytest.raises(ValueError, match="stride: expected an int >= 1"):
    jaxplain.occlusion(f, x, 0, patch=2, stride=0)
  with pytest.raises(ValueError, match=r"value: shape \(3,\) does not broadcast"):
    jaxplain.occlusion(f, x, 0, value=jnp.zeros(3))
