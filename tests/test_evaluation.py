"""Evaluation metrics against their defining formulas, known answers and plain loops."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import scipy.stats

from jaxplain import evaluation as E
from jaxplain import perturbation as P

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _linear(w):
  """Linear model with K = 2 logits: x . w and -x . w (any input rank)."""
  w = jnp.asarray(w, jnp.float32)

  def f(x):
    s = jnp.sum((x * w[None]).reshape(x.shape[0], -1), axis=1)
    return jnp.stack([s, -s], axis=1)
  return f


def _mlp(d_in, k=3, seed=0):
  r = np.random.default_rng(seed)
  w1 = jnp.asarray(r.normal(size=(d_in, 8)), jnp.float32)
  w2 = jnp.asarray(r.normal(size=(8, k)), jnp.float32)
  return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


# -- faithfulness --------------------------------------------------------------------------------

def test_pixel_flipping_linear_known_answer_and_loop():
  r = np.random.default_rng(0)
  w = r.normal(size=(3, 3, 2)).astype(np.float32)
  x = r.normal(size=(2, 3, 3, 2)).astype(np.float32)
  f = _linear(w)
  ideal = x * w[None]
  # known answer: removing features (elements) in order of w * x drops exactly those terms
  c = np.asarray(E.pixel_flipping(f, jnp.asarray(x), 0, jnp.asarray(ideal), steps=18))
  for b in range(2):
    contrib = np.sort(ideal[b].ravel())[::-1]
    want = ideal[b].sum() - np.concatenate([[0.0], np.cumsum(contrib)])
    np.testing.assert_allclose(c[b], want, rtol=1e-4, atol=1e-4)
  # pixel map (B, H, W) covering both channels, random-baseline removal, a plain loop
  g = _mlp(18, seed=1)
  pm = r.normal(size=(2, 3, 3)).astype(np.float32)
  base = r.uniform(size=x.shape).astype(np.float32)
  c = np.asarray(E.pixel_flipping(g, jnp.asarray(x), jnp.array([1, 2]), jnp.asarray(pm),
                                  steps=[0, 2, 5, 9], value=jnp.asarray(base), chunk=3,
                                  output="softmax"))
  for b, t in enumerate([1, 2]):
    order = np.argsort(-pm[b].ravel(), kind="stable")
    for s, k in enumerate([0, 2, 5, 9]):
      xi = x[b].copy().reshape(9, 2)
      xi[order[:k]] = base[b].reshape(9, 2)[order[:k]]
      p = jax.nn.softmax(g(jnp.asarray(xi.reshape(1, 3, 3, 2))))[0, t]
      np.testing.assert_allclose(c[b, s], float(p), rtol=1e-5, atol=1e-6)


def test_pixel_flipping_sequences_per_token():
  r = np.random.default_rng(1)
  w = r.normal(size=(4, 3)).astype(np.float32)
  x = r.normal(size=(2, 4, 3)).astype(np.float32)
  tok = (x * w[None]).sum(-1)                                  # (B, L) per-token evidence
  c = np.asarray(E.pixel_flipping(_linear(w), jnp.asarray(x), 0, jnp.asarray(tok), steps=4))
  for b in range(2):
    want = tok[b].sum() - np.concatenate([[0.0], np.cumsum(np.sort(tok[b])[::-1])])
    np.testing.assert_allclose(c[b], want, rtol=1e-4, atol=1e-4)


def _impute_spsolve(img, removed):
  """Rong et al.'s linear imputation by an exact sparse solve (loop over pixels, float64)."""
  h, w, ch = img.shape
  ids = {p: i for i, p in enumerate(zip(*np.nonzero(removed)))}
  a = scipy.sparse.lil_matrix((len(ids), len(ids)))
  rhs = np.zeros((len(ids), ch))
  for (i, j), v in ids.items():
    for di in (-1, 0, 1):
      for dj in (-1, 0, 1):
        if (di, dj) == (0, 0) or not (0 <= i + di < h and 0 <= j + dj < w):
          continue
        wt = 1 / 12 if di and dj else 1 / 6
        a[v, v] += wt
        if (i + di, j + dj) in ids:
          a[v, ids[(i + di, j + dj)]] -= wt
        else:
          rhs[v] += wt * img[i + di, j + dj]
  sol = scipy.sparse.linalg.spsolve(a.tocsc(), rhs)
  out = img.astype(np.float64).copy()
  for (i, j), v in ids.items():
    out[i, j] = sol[v]
  return out


def test_linear_imputation_equals_sparse_solve():
  r = np.random.default_rng(2)
  x = r.normal(size=(2, 5, 6, 2)).astype(np.float32)
  removed = r.uniform(size=(2, 5, 6)) < 0.5
  got = np.asarray(E.linear_imputation(jnp.asarray(x), jnp.asarray(removed)))
  for b in range(2):
    np.testing.assert_allclose(got[b], _impute_spsolve(x[b], removed[b]), rtol=1e-4,
                               atol=1e-4)


def test_road_equals_loop():
  r = np.random.default_rng(3)
  x = r.normal(size=(2, 4, 4, 1)).astype(np.float32)
  pm = r.normal(size=(2, 4, 4)).astype(np.float32)
  f = _mlp(16, seed=2)
  key = jax.random.key(0)
  pct = [0.0, 25.0, 50.0, 90.0]
  got = np.asarray(E.road(f, jnp.asarray(x), 1, jnp.asarray(pm), key=key, percentages=pct,
                          noise=0.05, output="logit"))
  acc = np.asarray(E.road(f, jnp.asarray(x), 1, jnp.asarray(pm), key=key, percentages=pct,
                          noise=0.05))
  for i, p in enumerate(pct):
    noise = np.asarray(0.05 * jax.random.normal(jax.random.fold_in(key, i), x.shape))
    for b in range(2):
      k = int(round(p / 100 * 16))
      removed = np.zeros(16, bool)
      removed[np.argsort(-pm[b].ravel(), kind="stable")[:k]] = True
      removed = removed.reshape(4, 4)
      xi = _impute_spsolve(x[b], removed)
      xi[removed] += noise[b][removed]
      logits = np.asarray(f(jnp.asarray(xi[None], jnp.float32)))[0]
      np.testing.assert_allclose(got[b, i], logits[1], rtol=1e-3, atol=1e-3)
      assert acc[b, i] == float(np.argmax(logits) == 1)


def _impute_tokens(seq, removed):
  """1-D linear imputation by a dense solve (float64): each removed token equals the mean of
  its in-range left / right neighbours (weight 1/2 each), known tokens fixed."""
  n, e = seq.shape
  ids = {i: k for k, i in enumerate(np.flatnonzero(removed))}
  a, rhs = np.zeros((len(ids), len(ids))), np.zeros((len(ids), e))
  for i, v in ids.items():
    for j in (i - 1, i + 1):
      if 0 <= j < n:
        a[v, v] += 0.5
        if j in ids:
          a[v, ids[j]] -= 0.5
        else:
          rhs[v] += 0.5 * seq[j]
  out = seq.astype(np.float64).copy()
  if ids:
    sol = np.linalg.solve(a, rhs)
    for i, v in ids.items():
      out[i] = sol[v]
  return out


def test_road_on_sequences_imputes_tokens_from_their_neighbours():
  r = np.random.default_rng(13)
  x = r.normal(size=(2, 7, 3)).astype(np.float32)                # (B, L, E)
  removed = np.array([[0, 1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 1, 0]], bool)
  got = np.asarray(E.linear_imputation(jnp.asarray(x), jnp.asarray(removed)))
  for b in range(2):
    np.testing.assert_allclose(got[b], _impute_tokens(x[b], removed[b]), rtol=1e-4, atol=1e-4)
  f = _mlp(21, seed=4)
  tok = r.normal(size=(2, 7)).astype(np.float32)                 # per-token scores
  key, pct = jax.random.key(1), [0.0, 30.0, 60.0]
  res = np.asarray(E.road(f, jnp.asarray(x), 2, jnp.asarray(tok), key=key, percentages=pct,
                          noise=0.05, output="logit"))
  for i, p in enumerate(pct):
    noise = np.asarray(0.05 * jax.random.normal(jax.random.fold_in(key, i), x.shape))
    for b in range(2):
      rm = np.zeros(7, bool)
      rm[np.argsort(-tok[b], kind="stable")[:int(round(p / 100 * 7))]] = True
      xi = _impute_tokens(x[b], rm)
      xi[rm] += noise[b][rm]
      want = np.asarray(f(jnp.asarray(xi[None], jnp.float32)))[0, 2]
      np.testing.assert_allclose(res[b, i], want, rtol=1e-3, atol=1e-3)
  with pytest.raises(ValueError, match="tabular data have none"):
    E.road(f, jnp.ones((2, 21)), 0, jnp.ones((2, 21)), key=key)


def test_irof_grid_segments_equals_loop():
  r = np.random.default_rng(4)
  x = r.uniform(0.1, 1.0, size=(2, 4, 4, 2)).astype(np.float32)
  a = r.normal(size=(2, 4, 4, 2)).astype(np.float32)
  f = _mlp(32, seed=3)
  seg = P.grid_segments((4, 4), 2)
  res = E.irof(f, jnp.asarray(x), 0, jnp.asarray(a), segments=seg)
  for b in range(2):
    means = np.array([a[b][seg == s].mean() for s in range(4)])
    order = np.argsort(-means, kind="stable")
    base = x[b].mean(axis=(0, 1))
    p0 = float(jax.nn.softmax(f(jnp.asarray(x[b:b + 1])))[0, 0])
    xi, curve = x[b].copy(), [1.0]
    for s in order:
      xi[seg == s] = base
      curve.append(float(jax.nn.softmax(f(jnp.asarray(xi[None])))[0, 0]) / p0)
    np.testing.assert_allclose(np.asarray(res["curve"][b]), curve, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(res["irof"][b]), 1 - np.trapezoid(curve, dx=0.25),
                               rtol=1e-5, atol=1e-6)
  # errors name irof's own arguments (they said feature_mask / num_features)
  with pytest.raises(ValueError, match=r"^segments: .*got \(\) \(square superpixels: "
                                       r"jaxplain.perturbation.grid_segments\(\(4, 4\), cell\)"):
    E.irof(f, jnp.asarray(x), 0, jnp.asarray(a), segments=4)
  with pytest.raises(ValueError, match=r"^segments: ids must lie in \[0, 2\)"):
    E.irof(f, jnp.asarray(x), 0, jnp.asarray(a), segments=seg, num_segments=2)
  with pytest.raises(ValueError, match=r"^num_segments: required when segments is traced"):
    jax.jit(lambda s: E.irof(f, jnp.asarray(x), 0, jnp.asarray(a), segments=s))(seg)


def test_infidelity_known_answers_and_loop():
  r = np.random.default_rng(5)
  w = r.normal(size=(6,)).astype(np.float32)
  x = r.normal(size=(2, 6)).astype(np.float32)
  f = _linear(w)
  key = jax.random.key(1)
  grad = jnp.broadcast_to(jnp.asarray(w)[None], x.shape)
  # the gradient of a linear model is perfectly faithful; 2 x gradient only once rescaled
  assert np.max(np.asarray(E.infidelity(f, jnp.asarray(x), 0, grad, key=key))) < 1e-9
  assert np.min(np.asarray(E.infidelity(f, jnp.asarray(x), 0, 2 * grad, key=key))) > 1e-3
  np.testing.assert_allclose(
      np.asarray(E.infidelity(f, jnp.asarray(x), 0, 2 * grad, key=key, normalize=True)), 0.0,
      atol=1e-8)
  gxi = x * w[None]
  got = np.asarray(E.infidelity(f, jnp.asarray(x), 0, jnp.asarray(gxi), key=key,
                                n_samples=16, sigma=0.3, chunk=5))
  want = np.zeros(2)
  for i in range(16):
    noise = np.asarray(0.3 * jax.random.normal(jax.random.fold_in(key, i), x.shape))
    delta = (x * w).sum(1) - ((x - noise) * w).sum(1)
    want += ((noise * gxi).sum(1) - delta) ** 2 / 16
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_faithfulness_correlation_known_answer_and_loop():
  r = np.random.default_rng(6)
  w = r.normal(size=(12,)).astype(np.float32)
  x = r.normal(size=(2, 12)).astype(np.float32)
  f = _linear(w)
  key = jax.random.key(2)
  ideal = jnp.asarray(x * w[None])
  np.testing.assert_allclose(np.asarray(E.faithfulness_correlation(
      f, jnp.asarray(x), 0, ideal, key=key, n_runs=20, subset_size=4)), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(E.faithfulness_correlation(
      f, jnp.asarray(x), 0, -ideal, key=key, n_runs=20, subset_size=4)), -1.0, atol=1e-5)
  g = _mlp(12, seed=4)
  a = r.normal(size=(2, 12)).astype(np.float32)
  got = np.asarray(E.faithfulness_correlation(g, jnp.asarray(x), 2, jnp.asarray(a), key=key,
                                              n_runs=10, subset_size=3, chunk=4))
  ref = np.asarray(g(jnp.asarray(x)))[:, 2]
  sums, deltas = np.zeros((2, 10)), np.zeros((2, 10))
  for i in range(10):
    u = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), (2, 12)))
    for b in range(2):
      s = np.argsort(-u[b], kind="stable")[:3]
      xi = x[b].copy()
      xi[s] = 0.0
      sums[b, i] = a[b, s].sum()
      deltas[b, i] = ref[b] - float(g(jnp.asarray(xi[None]))[0, 2])
  want = [scipy.stats.pearsonr(sums[b], deltas[b])[0] for b in range(2)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# -- robustness -------------------------------------------------------------------------------

def test_sensitivity_and_lipschitz_linear_known_answers_and_loop():
  r = np.random.default_rng(7)
  w = r.normal(size=(5,)).astype(np.float32)
  x = r.normal(size=(3, 5)).astype(np.float32)
  key = jax.random.key(3)
  grad = lambda x, t: jnp.broadcast_to(jnp.asarray(w)[None], x.shape)
  gxi = lambda x, t: x * jnp.asarray(w)[None]
  xj = jnp.asarray(x)
  np.testing.assert_allclose(np.asarray(E.max_sensitivity(grad, xj, 0, key=key,
                                                          n_samples=6)), 0.0, atol=1e-7)
  mx = np.asarray(E.max_sensitivity(gxi, xj, 0, key=key, n_samples=6, radius=0.1))
  av = np.asarray(E.avg_sensitivity(gxi, xj, 0, key=key, n_samples=6, radius=0.1, chunk=4))
  ll = np.asarray(E.local_lipschitz(gxi, xj, 0, key=key, n_samples=6, sigma=0.2))
  sens, lip = np.zeros((3, 6)), np.zeros((3, 6))
  for j in range(6):
    d = np.asarray(jax.random.uniform(jax.random.fold_in(key, j), x.shape, jnp.float32,
                                      -0.1, 0.1))
    sens[:, j] = np.linalg.norm(w * d, axis=1) / np.linalg.norm(w * x, axis=1)
    g = np.asarray(0.2 * jax.random.normal(jax.random.fold_in(key, j), x.shape))
    lip[:, j] = np.linalg.norm(w * g, axis=1) / np.linalg.norm(g, axis=1)
  np.testing.assert_allclose(mx, sens.max(1), rtol=1e-4)
  np.testing.assert_allclose(av, sens.mean(1), rtol=1e-4)
  np.testing.assert_allclose(ll, lip.max(1), rtol=1e-4)
  assert np.all(ll <= np.abs(w).max() + 1e-5)                # Lipschitz bound of w * x


# -- complexity and localisation: a model that ignores half of its input --------------------------

def _half_model():
  w = np.zeros((4, 4, 1), np.float32)
  w[:, :2] = np.arange(1, 9, dtype=np.float32).reshape(4, 2, 1)
  used = np.zeros((4, 4), bool)
  used[:, :2] = True
  return _linear(w), w, used


def test_sparseness_and_complexity_formulas():
  r = np.random.default_rng(8)
  a = r.normal(size=(3, 2, 5)).astype(np.float32)
  got_g = np.asarray(E.sparseness(jnp.asarray(a), eps=0.0))
  got_h = np.asarray(E.complexity(jnp.asarray(a)))
  for b in range(3):
    v = np.abs(a[b].ravel()).astype(np.float64)
    gini = np.abs(v[:, None] - v[None]).sum() / (2 * v.size * v.sum())   # mean-difference form
    np.testing.assert_allclose(got_g[b], gini, rtol=1e-5)
    np.testing.assert_allclose(got_h[b], scipy.stats.entropy(v / v.sum()), rtol=1e-5)
  # a model that ignores half the input: its gradient x input lives on 8 of 16 pixels
  f, w, used = _half_model()
  x = jnp.ones((1, 4, 4, 1))
  gxi = jax.grad(lambda z: f(z)[0, 0])(x) * x
  ones_half = jnp.asarray(np.broadcast_to(used[None, :, :, None], (1, 4, 4, 1)), jnp.float32)
  np.testing.assert_allclose(np.asarray(E.sparseness(ones_half, eps=0.0)), 0.5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(E.complexity(ones_half)), np.log(8), rtol=1e-6)
  assert float(E.sparseness(gxi)[0]) > 0.5 and float(E.complexity(gxi)[0]) < np.log(8)


def test_sparseness_sorts_on_the_host_under_jit_and_vmap_in_every_float_width():
  """On the CPU the Gini index's sort runs in NumPy through a callback: jitted, vmapped and for
  16- / 32- / 64-bit floats it equals the mean-difference form computed in float64."""
  r = np.random.default_rng(9)
  a = np.abs(r.normal(size=(2, 3, 40))) * (r.uniform(size=(2, 3, 40)) < 0.6)
  def gini(v):
    v = v.astype(np.float64).ravel() + 1e-7
    return np.abs(v[:, None] - v[None]).sum() / (2 * v.size * v.sum())
  with jax.enable_x64(True):
    for dtype, rtol in ((jnp.bfloat16, 2e-2), (jnp.float32, 1e-5), (jnp.float64, 1e-12)):
      x = jnp.asarray(a, dtype)
      want = np.array([[gini(np.asarray(x[i, j], np.float64)) for j in range(3)]
                       for i in range(2)])
      got_v = np.asarray(jax.jit(jax.vmap(E.sparseness))(x))
      np.testing.assert_allclose(got_v, want, rtol=rtol, err_msg=str(dtype))
      np.testing.assert_allclose(np.asarray(jax.jit(E.sparseness)(x[0])), want[0], rtol=rtol)


def test_localisation_half_model_and_loops():
  f, w, used = _half_model()
  x = jax.random.uniform(jax.random.key(4), (2, 4, 4, 1), minval=0.5, maxval=1.0)
  gxi = jax.grad(lambda z: f(z)[:, 0].sum())(x) * x
  mask = jnp.asarray(np.broadcast_to(used, (2, 4, 4)))
  for fn in (E.relevance_mass_accuracy, E.relevance_rank_accuracy, E.pointing_game, E.auc):
    np.testing.assert_allclose(np.asarray(fn(gxi, mask)), 1.0, atol=1e-6)
  r = np.random.default_rng(9)
  a = r.normal(size=(3, 4, 4)).astype(np.float32)
  m = r.uniform(size=(3, 4, 4)) < 0.4
  a[0, 0, :2] = a[0, 1, :2]                                    # ties for the AUC
  mass = np.asarray(E.relevance_mass_accuracy(jnp.asarray(a), jnp.asarray(m)))
  rank = np.asarray(E.relevance_rank_accuracy(jnp.asarray(a), jnp.asarray(m)))
  point = np.asarray(E.pointing_game(jnp.asarray(a), jnp.asarray(m)))
  auc = np.asarray(E.auc(jnp.asarray(a), jnp.asarray(m)))
  for b in range(3):
    v, mb = a[b].ravel(), m[b].ravel()
    np.testing.assert_allclose(mass[b], v[mb].sum() / v.sum(), rtol=1e-4)
    k = mb.sum()
    np.testing.assert_allclose(rank[b], mb[np.argsort(-v, kind="stable")[:k]].mean(), rtol=1e-6)
    assert point[b] == float(mb[np.argmax(v)])
    pos, neg = v[mb], v[~mb]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    np.testing.assert_allclose(auc[b], pairs, rtol=1e-5)


# -- randomisation ------------------------------------------------------------------------------

def _two_layer():
  r = np.random.default_rng(10)
  p = {"l1": {"w": jnp.asarray(r.normal(size=(6, 5)), jnp.float32)},
       "l2": {"w": jnp.asarray(r.normal(size=(5, 3)), jnp.float32)}}
  rp = {"l1": {"w": jnp.asarray(r.normal(size=(6, 5)), jnp.float32)},
        "l2": {"w": jnp.asarray(r.normal(size=(5, 3)), jnp.float32)}}
  f = lambda p, x: jnp.tanh(x @ p["l1"]["w"]) @ p["l2"]["w"]
  ex = lambda p, x, t: jax.vmap(jax.grad(lambda z, tt: f(p, z[None])[0, tt]))(x, t)
  return p, rp, f, ex


def test_independent_randomization_equals_loop():
  p, rp, f, ex = _two_layer()
  x = jax.random.normal(jax.random.key(5), (3, 6))
  t = jnp.array([0, 1, 2])
  res = E.independent_randomization(ex, p, x, t, random_params=rp, layers=["l2", "l1"],
                                    chunk=2)
  sim = np.asarray(res["similarity"])
  ref = np.asarray(ex(p, x, t))
  for row, layer in enumerate([None, "l2", "l1"]):
    q = dict(p) if layer is None else {**p, layer: rp[layer]}
    m = np.asarray(ex(q, x, t))
    np.testing.assert_allclose(np.asarray(res["maps"][row]), m, rtol=1e-5, atol=1e-6)
    for b in range(3):
      np.testing.assert_allclose(sim[row, b], scipy.stats.spearmanr(ref[b], m[b])[0],
                                 rtol=1e-4, atol=1e-5)
  assert E.mprt is __import__("jaxplain").cascading_randomization


def test_emprt_and_random_logit_equal_loops():
  p, rp, f, ex = _two_layer()
  x = jax.random.normal(jax.random.key(6), (3, 6))
  t = jnp.array([0, 1, 2])
  res = E.emprt(ex, p, x, t, random_params=rp, n_bins=5)
  ent = lambda v: scipy.stats.entropy(np.histogram(v, bins=5)[0])
  a0, a1 = np.asarray(ex(p, x, t)), np.asarray(ex(rp, x, t))
  for b in range(3):
    np.testing.assert_allclose(float(res["emprt"][b]), ent(a1[b]) / ent(a0[b]), rtol=1e-5)
  key = jax.random.key(7)
  explain = lambda x, t: ex(p, x, t)
  got = np.asarray(E.random_logit(explain, x, t, key=key, num_classes=3,
                                  similarity="spearman"))
  off = (np.asarray(t) + np.asarray(jax.random.randint(key, (3,), 1, 3))) % 3
  assert np.all(off != np.asarray(t))
  a_off = np.asarray(explain(x, jnp.asarray(off, jnp.int32)))
  for b in range(3):
    np.testing.assert_allclose(got[b], scipy.stats.spearmanr(a0[b], a_off[b])[0], rtol=1e-4,
                               atol=1e-5)


# -- evaluate ---------------------------------------------------------------------------------------

def _eval_case():
  r = np.random.default_rng(11)
  w = r.normal(size=(4, 4, 1)).astype(np.float32)
  x = r.normal(size=(10, 4, 4, 1)).astype(np.float32)
  y = r.integers(0, 2, size=10).astype(np.int32)
  return w, x, y


def test_evaluate_equals_direct_calls():
  w, x, y = _eval_case()
  f = _linear(w)
  gxi = lambda x, t: x * jnp.asarray(w)[None] * jnp.where(t == 0, 1.0, -1.0)[:, None, None, None]
  metrics = {"sparseness": lambda c: E.sparseness(c["attributions"]),
             "faith": lambda c: E.faithfulness_correlation(c["f"], c["x"], c["target"],
                                                           c["attributions"], key=c["key"],
                                                           n_runs=4, subset_size=3)}
  key = jax.random.key(8)
  res = E.evaluate({"gxi": gxi}, metrics, (x, y), f=f, key=key, batch_size=4, progress=False)
  assert res["n"] == 10 and res["scores"]["gxi"]["sparseness"].shape == (10,)
  a = gxi(jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_allclose(res["scores"]["gxi"]["sparseness"], np.asarray(E.sparseness(a)),
                             rtol=1e-6)
  # the ideal attribution of a linear model: correlation 1 for every example
  np.testing.assert_allclose(res["scores"]["gxi"]["faith"], 1.0, atol=1e-5)
  assert "| gxi |" in E.to_table(res) and json.loads(E.to_json(res))["n"] == 10


_SHARDED = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {root!r})
    from jaxplain import evaluation as E
    assert len(jax.devices()) == 4, jax.devices()
    r = np.random.default_rng(0)
    w1 = jnp.asarray(r.normal(size=(16, 6)), jnp.float32)
    w2 = jnp.asarray(r.normal(size=(6, 3)), jnp.float32)
    f = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2
    x = r.normal(size=(6, 4, 4, 1)).astype(np.float32)
    y = r.integers(0, 3, size=6).astype(np.int32)
    mask = r.uniform(size=(6, 4, 4)) < 0.5
    def grad(x, t):
      return jax.grad(lambda z: jnp.sum(jnp.take_along_axis(f(z), t[:, None], 1)))(x)
    full = E.default_metrics(steps=4, n_samples=3, n_runs=4, localisation=True)
    ms = {{k: full[k] for k in ("faithfulness_correlation", "max_sensitivity", "sparseness",
                                "relevance_mass")}}
    out = {{}}
    for n in (1, 4):
      res = E.evaluate({{"grad": grad}}, ms, (x, y, mask), f=f, key=jax.random.key(0),
                       batch_size=4, devices=jax.devices()[:n], progress=False)
      out[n] = {{k: v.tolist() for k, v in res["scores"]["grad"].items()}}
      out[str(n) + "_devices"] = res["devices"]
    print("@@" + json.dumps(out))
""")


def test_sharded_evaluate_equals_single_device():
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip(),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED.format(root=str(ROOT))], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("@@")][-1]
  out = json.loads(line[2:])
  assert out["1_devices"] == 1 and out["4_devices"] == 4
  assert set(out["1"]) == set(out["4"]) and len(out["1"]) == 4
  assert all(len(v) == 6 for v in out["4"].values())
  for k in out["1"]:
    np.testing.assert_allclose(out["4"][k], out["1"][k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_channels_first_images_warn_in_the_image_metrics():
  """An Equinox-style (B, C, H, W) batch would have its rows of one channel treated as pixels:
  the metrics warn and say what to pass; channels-last, sequence and tabular inputs do not."""
  import warnings
  from jaxplain import metrics
  f = lambda z: jnp.stack([z.sum(axis=tuple(range(1, z.ndim))), -z.mean(
      axis=tuple(range(1, z.ndim)))], 1)
  chw = jnp.ones((2, 3, 8, 8))
  with pytest.warns(UserWarning, match=r"\(2, 3, 8, 8\) looks channels-first.*moveaxis"):
    E.pixel_flipping(f, chw, jnp.zeros(2, jnp.int32), chw, steps=2)
  with pytest.warns(UserWarning, match="looks channels-first"):
    metrics.deletion_curve(f, chw, 0, chw, steps=2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for x in (jnp.ones((2, 8, 8, 3)), jnp.ones((2, 3, 8)), jnp.ones((2, 5))):
      E.pixel_flipping(f, x, jnp.zeros(2, jnp.int32), x, steps=2)
      metrics.deletion_curve(f, x, 0, x, steps=2)


def test_errors_name_the_argument():
  f = _linear(np.ones((3,), np.float32))
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="attributions"):
    E.pixel_flipping(f, x, 0, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="subset_size"):
    E.faithfulness_correlation(f, x, 0, x, key=jax.random.key(0), subset_size=5)
  with pytest.raises(ValueError, match="mask"):
    E.auc(jnp.ones((2, 3)), jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="x"):
    E.road(f, x, 0, x, key=jax.random.key(0))
  with pytest.raises(ValueError, match="target"):
    E.evaluate({"a": lambda x, t: x}, {"m": lambda c: c["x"][:, 0]}, (x, np.zeros(2)),
               f=f, key=jax.random.key(0), target="other")
  # attributions handed to the robustness / randomisation metrics and the map-only metrics
  ex = lambda x, t: 2.0 * x
  key = jax.random.key(0)
  bad_nan = x.at[0, 1].set(jnp.nan)
  for given, msg in ((jnp.ones((2, 4)), r"explainer's output shape \(2, 3\)"),
                     (x[:1], r"explainer's output shape"), (bad_nan, "non-finite")):
    for metric in (E.max_sensitivity, E.avg_sensitivity, E.local_lipschitz):
      with pytest.raises(ValueError, match=msg):
        metric(ex, x, 0, key=key, n_samples=2, attributions=given)
    with pytest.raises(ValueError, match=msg):
      E.random_logit(ex, x, 0, key=key, num_classes=3, attributions=given,
                     similarity="spearman")
  for metric in (E.sparseness, E.complexity, lambda a: E.auc(a, x > 1.0),
                 lambda a: E.relevance_mass_accuracy(a, x > 1.0)):
    with pytest.raises(ValueError, match="attributions: contains 1 non-finite"):
      metric(bad_nan)


def test_independent_randomization_leaves_integer_leaves_alone():
  # a step counter beside the weights: it must neither crash the draw nor change the result
  w = jax.random.normal(jax.random.key(3), (4, 3))
  ex = lambda p, x, t: jax.grad(lambda z: jnp.tanh(z @ p["w"])[:, 0].sum())(x)
  x = jax.random.normal(jax.random.key(4), (2, 4))
  key = jax.random.key(5)
  plain = E.independent_randomization(ex, {"w": w}, x, 0, key=key,
                                                        layers=["w"])
  counted = E.independent_randomization(
      ex, {"w": w, "zstep": jnp.array(7, jnp.int32)}, x, 0, key=key, layers=["w"])
  np.testing.assert_allclose(counted["similarity"], plain["similarity"], rtol=1e-6)
  np.testing.assert_allclose(counted["maps"], plain["maps"], rtol=1e-6)
  assert not np.allclose(plain["maps"][1], plain["maps"][0])  # w really was randomised


def test_independent_and_emprt_take_a_wrapped_model_and_keep_its_batch_statistics():
  # they used to fail on a wrapped model ("Cannot determine dtype of Model") and, given the
  # full variables dict, to randomise the batch statistics as weights (cascading refuses it)
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jaxplain  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.BatchNorm(use_running_average=True, name="bn")(nn.Dense(5, name="l1")(x))
      return nn.Dense(3, name="l2")(jnp.tanh(h))

  net, x, t = Net(), jax.random.normal(jax.random.key(0), (3, 6)), jnp.array([0, 1, 2])
  v = net.init(jax.random.key(1), x)
  stats = {"mean": jnp.linspace(-1.0, 1.0, 5), "var": jnp.linspace(0.5, 2.0, 5)}
  v = {"params": v["params"], "batch_stats": {"bn": stats}}
  rv = net.init(jax.random.key(2), x)
  rv = {"params": rv["params"], "batch_stats": {"bn": {k: a + 3.0 for k, a in stats.items()}}}
  m, rm = jaxplain.wrap(net, v), jaxplain.wrap(net, rv)
  ex = lambda p, z, tt: jaxplain.gradient(lambda q: m.apply(p, q), z, tt)
  # the independent computation: maps of the model with params swapped, v's statistics kept
  grad_at = lambda params: np.asarray(jaxplain.gradient(
      lambda q: net.apply({"params": params, "batch_stats": v["batch_stats"]}, q), x, t))
  ent = lambda a: scipy.stats.entropy(np.histogram(a, bins=7)[0])
  res = E.emprt(ex, m, x, t, random_params=rm, n_bins=7)
  a0, a1 = grad_at(v["params"]), grad_at(rv["params"])
  for b in range(3):
    np.testing.assert_allclose(float(res["emprt"][b]), ent(a1[b]) / ent(a0[b]), rtol=1e-5)
  ind = E.independent_randomization(ex, m, x, t, random_params=rm, layers=["l2", "l1"])
  for row, layer in enumerate([None, "l2", "l1"]):
    q = v["params"] if layer is None else {**v["params"], layer: rv["params"][layer]}
    np.testing.assert_allclose(np.asarray(ind["maps"][row]), grad_at(q), rtol=1e-5, atol=1e-6)
  for fn in (E.emprt, lambda *a, **k: E.independent_randomization(*a, layers=["params/l2"], **k)):
    with pytest.raises(ValueError, match=r"params: got a full variables dict with collections "
                                         r"\['batch_stats', 'params'\]"):
      fn(lambda p, z, tt: z, v, x, t, key=jax.random.key(0))


def test_every_submodule_is_reachable_and_no_function_shadows_one():
  # `jaxplain.evaluation.complexity` is the function; its module is `_complexity`
  import importlib
  import pkgutil
  import types
  assert isinstance(E.complexity, types.FunctionType)
  for m in pkgutil.iter_modules(E.__path__):
    mod = importlib.import_module(f"jaxplain.evaluation.{m.name}")
    assert getattr(E, m.name) is mod, m.name
  assert importlib.import_module("jaxplain.evaluation._complexity").complexity is E.complexity


@pytest.mark.parametrize("chunk", [1, 2])
def test_cascading_randomization_chunks_equal_loop(chunk):
  p, rp, f, _ = _two_layer()
  g = lambda p, x: f(p, x.reshape(x.shape[0], -1))
  ex = lambda p, x, t: jax.vmap(jax.grad(lambda z, tt: g(p, z[None])[0, tt]))(x, t)
  x = jax.random.normal(jax.random.key(6), (3, 2, 3, 1))
  t = jnp.array([0, 1, 2])
  res = __import__("jaxplain").cascading_randomization(ex, p, x, t, random_params=rp,
                                                       layers=["l2", "l1"], chunk=chunk)
  for stage, q in enumerate([p, {**p, "l2": rp["l2"]}, rp]):         # cascade from the top
    m = np.asarray(ex(q, x, t))[..., 0]
    np.testing.assert_allclose(np.asarray(res["maps_signed"][stage]), m, rtol=1e-5, atol=1e-6)


def test_bfloat16_maps_and_models_score_in_float32():
  # The scores of a bfloat16 model / map are computed in float32 and equal the float32
  # computation on the same values (a linear model with small integer weights on {0, 1}
  # inputs computes exactly in bfloat16). Before: sparseness / complexity returned bfloat16
  # (3e-3 relative off), SSIM (MPRT, random-logit) raised a dtype error in its convolution.
  r = np.random.default_rng(7)
  w32 = jnp.asarray(r.integers(-3, 4, size=(8, 8, 1)), jnp.float32)
  x32 = jnp.asarray(r.integers(0, 2, size=(3, 8, 8, 1)), jnp.float32)
  a32 = jnp.asarray(r.normal(size=(3, 8, 8, 1)), jnp.bfloat16).astype(jnp.float32)
  mask = jnp.asarray(r.random((3, 8, 8)) < 0.3)
  lin = lambda w: (lambda x: jnp.stack([jnp.sum((x * w[None]).reshape(x.shape[0], -1), 1),
                                        -jnp.sum((x * w[None]).reshape(x.shape[0], -1), 1)],
                                       axis=1))
  explain = lambda w: (lambda x, t: jnp.where(t[:, None, None, None] == 0, 1, -1).astype(
      x.dtype) * x * w[None])
  k = jax.random.key(0)
  t = jnp.array([0, 1, 0])
  runs = {}
  for dt in (jnp.float32, jnp.bfloat16):
    w, x, a = w32.astype(dt), x32.astype(dt), a32.astype(dt)
    runs[dt] = {
        "sparseness": E.sparseness(a), "complexity": E.complexity(a),
        "mass": E.relevance_mass_accuracy(a, mask), "auc": E.auc(a, mask),
        "flip": E.pixel_flipping(lin(w), x, t, a, steps=4),
        "max_sens": E.max_sensitivity(explain(w), x, t, key=k, n_samples=3),
        "logit_ssim": E.random_logit(explain(w), x, t, key=k, num_classes=2),
        # bfloat16 noise times the float32 map raised under strict promotion
        "infidelity": E.infidelity(lin(w), x, t, a, key=k, n_samples=3),
    }
  for name, ref in runs[jnp.float32].items():
    got = runs[jnp.bfloat16][name]
    assert got.dtype == jnp.float32, name
    if name in ("max_sens", "infidelity"):   # noise drawn in x's dtype: other perturbations
      assert np.all(np.isfinite(np.asarray(got)))
      continue
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-6, atol=1e-6,
                               err_msg=name)
