"""Perturbation attributions against loops, enumeration and a NumPy ridge fit."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxplain import perturbation as P


def _mlp(d_in, k=3, seed=0):
  r = np.random.default_rng(seed)
  w1 = jnp.asarray(r.normal(size=(d_in, 8)), jnp.float32)
  w2 = jnp.asarray(r.normal(size=(8, k)), jnp.float32)

  def f(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2
  return f


def _masked(x, fm, keep, base):
  """x with the features not in ``keep`` set to base (NumPy, one example)."""
  m = np.isin(fm, np.flatnonzero(keep))
  return np.where(m, x, base)


def test_grid_segments():
  g = P.grid_segments((3, 5), 2)
  assert g.shape == (3, 5) and g.max() == 5
  assert g[0, 0] == g[1, 1] == 0 and g[0, 2] == 1 and g[2, 4] == 5


def test_feature_ablation_equals_loop_images():
  f = _mlp(4 * 4 * 2)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
  seg = P.grid_segments((4, 4), 2)                          # 4 superpixels, both channels
  t = jnp.array([0, 2])
  a = np.asarray(P.feature_ablation(f, x, t, feature_mask=seg, baseline=0.5))
  a2 = np.asarray(P.feature_ablation(f, x, t, feature_mask=seg, baseline=0.5, chunk=3))
  xn = np.asarray(x)
  fm = np.broadcast_to(seg[:, :, None], (4, 4, 2))
  for b in range(2):
    ref = float(f(x[b:b + 1])[0, t[b]])
    for i in range(4):
      keep = np.ones(4, bool)
      keep[i] = False
      xi = _masked(xn[b], fm, keep, 0.5)
      want = ref - float(f(jnp.asarray(xi[None]))[0, t[b]])
      np.testing.assert_allclose(a[b][fm == i], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a, a2, rtol=1e-6, atol=1e-6)


def test_feature_permutation_equals_loop_with_its_documented_permutations():
  f = _mlp(4 * 4 * 2)
  x = jax.random.normal(jax.random.key(3), (3, 4, 4, 2))
  seg = P.grid_segments((4, 4), 2)
  t = jnp.array([1, 0, 2])
  key = jax.random.key(4)
  a = np.asarray(P.feature_permutation(f, x, t, key=key, feature_mask=seg))
  a2 = np.asarray(jax.jit(lambda z: P.feature_permutation(f, z, t, key=key, feature_mask=seg,
                                                          num_features=4, chunk=3))(x))
  np.testing.assert_allclose(a, a2, rtol=1e-5, atol=1e-6)
  # a NumPy mask closed over by the jitted function is known: num_features not needed (jnp
  # made it a tracer before its ids were read); a traced mask still needs it
  a3 = np.asarray(jax.jit(lambda z: P.feature_permutation(
      f, z, t, key=key, feature_mask=P.grid_segments((4, 4), 2)))(x))
  np.testing.assert_allclose(a, a3, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="num_features: required when feature_mask is traced"):
    jax.jit(lambda z, s: P.feature_permutation(f, z, t, key=key, feature_mask=s))(x, seg)
  xn = np.asarray(x)
  fm = np.broadcast_to(seg[:, :, None], (4, 4, 2))
  for i in range(4):
    s = np.asarray(jax.random.permutation(jax.random.fold_in(key, i), 3))
    src = np.empty(3, int)
    src[s] = np.roll(s, -1)                 # s[k] takes its values from s[k + 1]
    assert np.all(src != np.arange(3))      # no example keeps its own values
    for b in range(3):
      xi = np.where(fm == i, xn[src[b]], xn[b])
      want = float(f(x[b:b + 1])[0, t[b]]) - float(f(jnp.asarray(xi[None]))[0, t[b]])
      np.testing.assert_allclose(a[b][fm == i], want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="at least 2 examples"):
    P.feature_permutation(f, x[:1], 0, key=key)


def test_feature_ablation_sequences_per_token():
  f = _mlp(5 * 3)
  x = jax.random.normal(jax.random.key(1), (2, 5, 3))        # (B, L, E)
  tokens = jnp.arange(5)                                       # one feature per token
  a = np.asarray(P.feature_ablation(f, x, 1, feature_mask=tokens))
  for b in range(2):
    for l in range(5):
      xo = np.asarray(x[b]).copy()
      xo[l] = 0.0
      want = float(f(x[b:b + 1])[0, 1] - f(jnp.asarray(xo[None]))[0, 1])
      np.testing.assert_allclose(a[b, l], want, rtol=1e-5, atol=1e-5)


def _exact_shapley(f, x, t, base):
  """Shapley values by enumeration of all coalitions (float64 sums)."""
  d = x.shape[0]
  phi = np.zeros(d)
  val = {}
  for r in range(d + 1):
    for s in itertools.combinations(range(d), r):
      keep = np.zeros(d, bool)
      keep[list(s)] = True
      val[s] = float(f(jnp.asarray(np.where(keep, x, base)[None]))[0, t])
  for i in range(d):
    others = [j for j in range(d) if j != i]
    for r in range(d):
      for s in itertools.combinations(others, r):
        wgt = math.factorial(r) * math.factorial(d - r - 1) / math.factorial(d)
        phi[i] += wgt * (val[tuple(sorted(s + (i,)))] - val[s])
  return phi


@functools.lru_cache(maxsize=None)
def _six():
  f = _mlp(6, seed=3)
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 6)), np.float32)
  base = np.full((6,), 0.3, np.float32)
  exact = np.stack([_exact_shapley(f, x[b], b, base) for b in range(2)])
  return f, jnp.asarray(x), jnp.array([0, 1]), base, exact


def test_kernel_shap_enumeration_equals_exact_shapley():
  f, x, t, base, exact = _six()
  a = np.asarray(P.kernel_shap(f, x, t, n_samples=None, baseline=base))
  np.testing.assert_allclose(a, exact, rtol=1e-4, atol=1e-4)


def test_kernel_shap_sampling_converges_to_shapley():
  f, x, t, base, exact = _six()
  a = np.asarray(P.kernel_shap(f, x, t, key=jax.random.key(0), n_samples=3000,
                               baseline=base))
  scale = np.abs(exact).max()
  assert np.abs(a - exact).max() < 0.05 * scale, (a, exact)
  # efficiency holds exactly by construction
  full = np.asarray(f(x))[np.arange(2), np.asarray(t)]
  empty = np.asarray(f(jnp.asarray(np.tile(base, (2, 1)))))[np.arange(2), np.asarray(t)]
  np.testing.assert_allclose(a.sum(1), full - empty, rtol=1e-4, atol=1e-4)


def test_shapley_value_sampling_efficiency_and_convergence():
  f, x, t, base, exact = _six()
  a = np.asarray(P.shapley_value_sampling(f, x, t, key=jax.random.key(1), n_samples=400,
                                          baseline=base, chunk=700))
  full = np.asarray(f(x))[np.arange(2), np.asarray(t)]
  empty = np.asarray(f(jnp.asarray(np.tile(base, (2, 1)))))[np.arange(2), np.asarray(t)]
  np.testing.assert_allclose(a.sum(1), full - empty, rtol=1e-4, atol=1e-4)
  assert np.abs(a - exact).max() < 0.06 * np.abs(exact).max(), (a, exact)


def test_lime_closed_form_equals_numpy_ridge():
  f = _mlp(4 * 4, seed=5)
  x = jax.random.normal(jax.random.key(3), (2, 4, 4))
  seg = P.grid_segments((4, 4), 2)
  fit = P.lime(f, x, jnp.array([1, 2]), key=jax.random.key(4), n_samples=40,
               feature_mask=seg, alpha=0.5, return_fit=True)
  z = np.asarray(fit["samples"], np.float64)
  y = np.asarray(fit["scores"], np.float64)
  w = np.asarray(fit["weights"], np.float64)
  xn = np.asarray(x)
  for b in range(2):
    # the scores are f on the masked inputs (a loop over a few samples)
    for s in range(3):
      xi = _masked(xn[b], seg, z[b, s] > 0, 0.0)
      np.testing.assert_allclose(y[b, s], float(f(jnp.asarray(xi[None]))[0, b + 1]),
                                 rtol=1e-5, atol=1e-5)
    k = z[b].sum(1)
    d = 1.0 - k / np.sqrt(np.maximum(k, 1.0) * 4)
    np.testing.assert_allclose(w[b], np.exp(-d ** 2 / 0.25 ** 2), rtol=1e-5)
    sw = np.sqrt(w[b])[:, None]
    z1 = np.concatenate([z[b], np.ones((40, 1))], 1)
    lhs = np.concatenate([sw * z1, np.concatenate([np.sqrt(0.5) * np.eye(4),
                                                    np.zeros((4, 1))], 1)])
    rhs = np.concatenate([sw[:, 0] * y[b], np.zeros(4)])
    theta = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    for i in range(4):
      np.testing.assert_allclose(np.asarray(fit["attributions"][b])[seg == i], theta[i],
                                 rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(fit["intercept"][b]), theta[4], rtol=1e-4, atol=1e-4)


def test_rise_binary_masks_equal_loop():
  f = _mlp(6, seed=7)
  x = jax.random.normal(jax.random.key(5), (2, 6))
  key = jax.random.key(6)
  s = np.asarray(P.rise(f, x, 0, key=key, n_masks=20, p=0.3, output="logit", chunk=7))
  want = np.zeros((2, 6))
  for n in range(20):
    m = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, n), 0.3, (2, 6)), np.float64)
    out = np.asarray(f(x * jnp.asarray(m, jnp.float32)))[:, 0]
    want += out[:, None] * m
  np.testing.assert_allclose(s, want / (20 * 0.3), rtol=1e-4, atol=1e-4)


def test_rise_smooth_masks_all_kept_give_the_score():
  f = _mlp(8 * 8 * 3, seed=8)
  x = jax.random.normal(jax.random.key(7), (2, 8, 8, 3))
  s = np.asarray(P.rise(f, x, 1, key=jax.random.key(0), n_masks=5, p=1.0, grid=3,
                        output="logit"))
  want = np.asarray(f(x))[:, 1]
  np.testing.assert_allclose(s, np.broadcast_to(want[:, None, None, None], s.shape),
                             rtol=1e-5, atol=1e-5)


def test_errors_name_the_argument():
  f = _mlp(6)
  x = jnp.ones((2, 6))
  with pytest.raises(ValueError, match="feature_mask"):
    P.feature_ablation(f, x, 0, feature_mask=jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match="baseline"):
    P.feature_ablation(f, x, 0, baseline=jnp.zeros((3,)))
  with pytest.raises(ValueError, match="key"):
    P.kernel_shap(f, x, 0, n_samples=10)
  with pytest.raises(ValueError, match="chunk"):
    P.lime(f, x, 0, key=jax.random.key(0), chunk=0)
  # without a mask every element is a feature: a different count was silently ignored
  with pytest.raises(ValueError, match="num_features=3 without a feature_mask"):
    P.shapley_value_sampling(f, x, 0, key=jax.random.key(0), num_features=3)
  P.feature_ablation(f, x, 0, num_features=6)             # the element count is consistent


def test_regressions_of_a_bfloat16_model_are_solved_in_float32():
  # a linear bfloat16 model with small integer weights on {0, 1} inputs computes exactly, so
  # Shapley values and a ridge fit without penalty are w * x (closed form); the solve in
  # bfloat16 raised NotImplementedError
  w = jnp.asarray([[1.0, -2.0, 3.0, 0.5, -1.0, 2.0]], jnp.bfloat16).T     # (6, 1)
  f = lambda z: jnp.concatenate([z @ w, -(z @ w)], axis=1)
  x = jnp.asarray([[1, 0, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1]], jnp.bfloat16)
  want = np.asarray(x, np.float32) * np.asarray(w, np.float32)[:, 0][None]
  a = P.kernel_shap(f, x, 0, n_samples=None)
  assert a.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(a), want, atol=1e-5)
  fit = P.lime(f, x, 0, key=jax.random.key(0), n_samples=200, alpha=0.0, return_fit=True)
  assert fit["attributions"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(fit["attributions"]) * np.asarray(x, np.float32),
                             want, atol=1e-4)


def test_jit_with_traced_inputs():
  f = _mlp(6)
  x = jax.random.normal(jax.random.key(9), (3, 6))
  g = jax.jit(lambda x, k: P.kernel_shap(f, x, 0, key=k, n_samples=32))
  assert g(x, jax.random.key(0)).shape == (3, 6)
