"""map_merged: perturbed copies of a batch merged into the model's batch axis, against loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxplain import _batching, evaluation as E
from jaxplain import perturbation as P
from jaxplain._batching import map_merged

RNG = np.random.default_rng(0)
W1 = jnp.asarray(RNG.normal(size=(6, 5)), jnp.float32)
W2 = jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)


def model(x):
  return jnp.tanh(x @ W1) @ W2


@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 10])
def test_map_merged_equals_a_loop_and_f_sees_merged_batches(chunk):
  x = jnp.asarray(RNG.normal(size=(4, 6)), jnp.float32)
  ks = jnp.arange(7)
  seen = []

  def make(k):
    kf = k.astype(jnp.float32)
    return (x * (kf + 1.0), jnp.full((4,), k % 3)), jnp.sum(x, 1) * kf

  def call(z, t):
    seen.append(z.shape[0])
    out = model(z)
    return jnp.take_along_axis(out, t[:, None], 1)[:, 0]

  out, extra = jax.jit(lambda: map_merged(make, call, ks, chunk, lambda o, e: (o, e)))()
  for k in range(7):
    ref = np.asarray(model(x * (k + 1.0)))[:, k % 3]
    np.testing.assert_allclose(np.asarray(out[k]), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(extra[k]), np.asarray(jnp.sum(x, 1) * k), rtol=1e-6)
  c = 7 if chunk is None else min(chunk, 7)
  expect = [4 * c] + ([4 * (7 % c)] if 7 % c else [])
  assert sorted(seen) == sorted(expect)


def test_pixel_flipping_stays_differentiable_through_the_merged_batches():
  x = jnp.asarray(RNG.normal(size=(3, 6)), jnp.float32)
  a = jnp.asarray(RNG.normal(size=(3, 6)), jnp.float32)
  steps = [0, 1, 3, 6]

  def loop(xx):                          # independent: one deletion per step, by hand
    order = np.argsort(-np.asarray(a), axis=1, kind="stable")
    tot = 0.0
    for k in steps:
      keep = np.ones((3, 6), np.float32)
      for b in range(3):
        keep[b, order[b, :k]] = 0.0
      tot = tot + jnp.sum(model(xx * keep)[:, 1])
    return tot

  g = jax.grad(lambda xx: jnp.sum(E.pixel_flipping(model, xx, 1, a, steps=steps, chunk=3)))(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(loop)(x)), rtol=1e-5, atol=1e-6)


def test_chunk_none_is_bounded_by_the_input_elements_per_call(monkeypatch):
  # chunk=None: all copies at once only while the merged batch stays under AUTO_ELEMENTS;
  # beyond it, as many copies per call as fit. Values against a plain loop over features.
  x = jnp.asarray(RNG.normal(size=(2, 6)), jnp.float32)
  seen = []

  def f(z):
    seen.append(z.shape[0])
    return model(z)

  loop = np.stack([np.asarray(model(x))[:, 1] - np.asarray(model(x.at[:, i].set(0.0)))[:, 1]
                   for i in range(6)], axis=1)
  monkeypatch.setattr(_batching, "AUTO_ELEMENTS", 50)    # one copy: 2 x 6 = 12 elements -> 4
  out = P.feature_ablation(f, x, 1)
  np.testing.assert_allclose(np.asarray(out), loop, rtol=1e-5, atol=1e-6)
  assert max(seen) * 6 <= 50 and max(seen) > 2 and 12 not in seen, seen  # several per call
  seen.clear()
  monkeypatch.setattr(_batching, "AUTO_ELEMENTS", 1 << 23)
  np.testing.assert_allclose(np.asarray(P.feature_ablation(f, x, 1)), loop, rtol=1e-5,
                             atol=1e-6)
  assert 12 in seen, seen                                # all 6 copies in one call


def test_unrolled_slices_equal_one_call_written_out_or_looped():
  # a few slices are written out, many run under lax.map; both equal the whole at once,
  # with a remainder slice, for a function that maps n rows to n results (a pytree)
  xs = {"a": jnp.arange(50.0).reshape(25, 2), "b": jnp.arange(25.0)}
  fn = lambda d: (d["a"].sum(1) * d["b"], d["a"] ** 2)
  want = fn(xs)
  for chunk in (None, 3, 1, 25, 40):   # 25 // 1 = 25 full slices: past MAX_UNROLLED
    got = jax.jit(lambda d, c=chunk: _batching.unrolled(fn, d, c))(xs)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w)
  jaxpr = jax.make_jaxpr(lambda d: _batching.unrolled(fn, d, 1))(xs)
  assert any(e.primitive.name == "scan" for e in jaxpr.eqns)
  jaxpr = jax.make_jaxpr(lambda d: _batching.unrolled(fn, d, 3))(xs)
  assert not any(e.primitive.name == "scan" for e in jaxpr.eqns)
