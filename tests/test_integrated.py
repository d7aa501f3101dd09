"""Integrated Gradients: every rule against closed-form path integrals with its convergence
order, against a Python loop over steps, chunk invariance, completeness, baselines, errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import pytest
from flax import nnx

import jaxplain

METHODS = ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
           "gausslegendre"]

# Closed forms. Output 0: sum_i exp(c_i x_i), whose IG is exactly exp(c_i x_i) - exp(c_i x'_i).
# Output 1: x^T A x (A symmetric), whose IG is exactly (x - x')_i (A (x + x'))_i.
D = 5
C = np.linspace(-1.5, 2.0, D)
A = np.array([[2.0, 0.5, 0.0, -0.3, 0.1], [0.5, 1.0, 0.2, 0.0, 0.0], [0.0, 0.2, -1.0, 0.4, 0.0],
              [-0.3, 0.0, 0.4, 0.5, 0.3], [0.1, 0.0, 0.0, 0.3, 1.5]])


def closed_f(x):
  c, a = jnp.asarray(C, x.dtype), jnp.asarray(A, x.dtype)
  return jnp.stack([jnp.sum(jnp.exp(c[None] * x), axis=1),
                    jnp.einsum("bi,ij,bj->b", x, a, x)], 1)


def exact_ig(x, base, target):
  if target == 0:
    return np.exp(C * x) - np.exp(C * base)
  return (x - base) * ((x + base) @ A)


def closed_data():
  rng = np.random.default_rng(0)
  return rng.normal(size=(3, D)), rng.normal(size=(3, D)) * 0.5


def test_quadrature_weights_sum_to_one():
  for method in METHODS:
    for m in (2, 3, 7, 32):
      a, w = jaxplain.quadrature_rule(method, m)
      assert a.shape == w.shape == (m,)
      assert abs(w.sum() - 1.0) < 1e-13, method
      assert np.all((a >= 0) & (a <= 1)) and np.all(w > 0)
  a, w = jaxplain.quadrature_rule("riemann_trapezoid", 5)  # not Captum's (m-1)/m weights
  np.testing.assert_allclose(a, [0, 0.25, 0.5, 0.75, 1])
  np.testing.assert_allclose(w, [0.125, 0.25, 0.25, 0.25, 0.125])
  np.testing.assert_allclose(jaxplain.quadrature_rule("riemann_left", 4)[0], [0, .25, .5, .75])
  np.testing.assert_allclose(jaxplain.quadrature_rule("riemann_right", 4)[0], [.25, .5, .75, 1])
  np.testing.assert_allclose(jaxplain.quadrature_rule("riemann_middle", 2)[0], [.25, .75])


@pytest.mark.parametrize("method", METHODS)
def test_rules_converge_at_their_order_on_closed_forms(method):
  x, base = closed_data()
  with jax.enable_x64(True):
    f = jax.jit(closed_f)

    def err(m, target):
      ig = jaxplain.integrated_gradients(f, jnp.asarray(x), target, baseline=jnp.asarray(base),
                                         steps=m, method=method, chunk=None)
      assert ig.dtype == jnp.float64
      return np.max(np.abs(np.asarray(ig) - exact_ig(x, base, target)))

    ms = (9, 17, 33) if method == "riemann_trapezoid" else (8, 16, 32)  # h halves each time
    errs = np.array([err(m, 0) for m in ms])
    quad = err(8, 1)
  ratios = errs[:-1] / errs[1:]
  if method in ("riemann_left", "riemann_right"):  # O(h): halving h halves the error
    assert np.all((ratios > 1.8) & (ratios < 2.2)), ratios
    assert quad > 1e-3  # a linear integrand is not integrated exactly
  elif method in ("riemann_middle", "riemann_trapezoid"):  # O(h^2)
    assert np.all((ratios > 3.6) & (ratios < 4.4)), ratios
    assert quad < 1e-12  # exact for a linear integrand
  else:  # Gauss-Legendre: exact to degree 2m - 1, spectral on exp
    assert errs[0] < 1e-12 and quad < 1e-12, (errs, quad)
  assert errs[0] > 1e-4 or method == "gausslegendre"


class Tiny(nn.Module):
  act: str = "relu"

  @nn.compact
  def __call__(self, x):
    a = jnp.tanh if self.act == "tanh" else nn.relu
    x = a(nn.Conv(3, (3, 3), padding="SAME", name="conv1")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(4, name="fc")(x)


X_SHAPE = (2, 4, 4, 2)


@pytest.fixture(scope="module")
def tiny():
  model = Tiny()
  params = model.init(jax.random.key(0), jnp.zeros(X_SHAPE))
  x = jax.random.uniform(jax.random.key(1), X_SHAPE)
  return jax.jit(functools.partial(model.apply, params)), x


@pytest.fixture(scope="module")
def tiny64():
  """A smooth (tanh) tiny CNN with float64 weights (call it under jax.enable_x64)."""
  model = Tiny(act="tanh")
  x = np.random.default_rng(1).normal(size=X_SHAPE)
  params = jax.tree.map(lambda a: np.asarray(a, np.float64),
                        jax.jit(model.init)(jax.random.key(0), jnp.zeros(X_SHAPE)))
  return jax.jit(functools.partial(model.apply, params)), x


def hand_rule(method, m):
  """Nodes and weights written out independently of jaxplain.quadrature_rule."""
  k = np.arange(m)
  if method == "riemann_left":
    return k / m, np.ones(m) / m
  if method == "riemann_right":
    return (k + 1) / m, np.ones(m) / m
  if method == "riemann_middle":
    return (k + 0.5) / m, np.ones(m) / m
  if method == "riemann_trapezoid":
    w = np.ones(m) / (m - 1)
    w[[0, -1]] /= 2
    return k / (m - 1), w
  n, w = np.polynomial.legendre.leggauss(m)
  return (n + 1) / 2, w / 2


@pytest.mark.parametrize("method", METHODS)
def test_vectorised_ig_equals_python_loop_over_steps(tiny, method):
  f, x = tiny
  t = jnp.array([1, 3])
  base = 0.5 * jnp.ones(X_SHAPE[1:])
  m = 6
  ig = jaxplain.integrated_gradients(f, x, t, baseline=base, steps=m, method=method)
  alphas, weights = hand_rule(method, m)
  total = np.zeros(X_SHAPE)
  for a, w in zip(alphas, weights):
    for b in range(2):
      pt = base + a * (x[b] - base)
      total[b] += w * np.asarray(jax.grad(lambda z: f(z[None])[0, int(t[b])])(pt))
  np.testing.assert_allclose(ig, (x - base[None]) * total, rtol=1e-5, atol=1e-6)


def test_chunk_and_loop_do_not_change_the_result(tiny):
  f, x = tiny
  kw = dict(steps=10, method="riemann_trapezoid", baseline="white")
  ref = jaxplain.integrated_gradients(f, x, 2, chunk=None, **kw)
  for chunk, loop in ((1, "unroll"), (3, "unroll"), (3, "scan"), (4, "scan"), (64, "unroll")):
    ig = jax.jit(lambda z: jaxplain.integrated_gradients(f, z, 2, chunk=chunk, loop=loop,
                                                         **kw))(x)
    np.testing.assert_allclose(ig, ref, rtol=1e-5, atol=1e-7, err_msg=f"{chunk} {loop}")


def test_auto_loop_scans_the_chunks_of_a_model_that_loops_itself():
  """loop="auto" unrolls the chunks of a loop-free model and scans those of a model that runs
  a lax.scan itself (an RNN; also found inside a jitted call), with the same values as the
  steps summed by a Python loop."""
  rng = np.random.default_rng(3)
  wx, wh, wo = (jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)
                for s in ((3, 4), (4, 4), (4, 2)))

  def rnn(x):  # (B, L, 3) -> (B, 2)
    h, _ = jax.lax.scan(lambda h, xt: (jnp.tanh(xt @ wx + h @ wh), None),
                        jnp.zeros((x.shape[0], 4), x.dtype), jnp.swapaxes(x, 0, 1))
    return h @ wo

  def flat(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ jnp.tile(wx, (5, 1))) @ wo

  x = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
  t = jnp.array([1, 0])
  for f, loops in ((rnn, True), (jax.jit(rnn), True), (flat, False)):
    ig = lambda z, loop: jaxplain.integrated_gradients(f, z, t, steps=12, chunk=2, loop=loop)
    outer = {loop: sum(e.primitive.name == "scan"
                       for e in jax.make_jaxpr(functools.partial(ig, loop=loop))(x).eqns)
             for loop in ("auto", "unroll", "scan")}
    assert outer["auto"] == outer["scan" if loops else "unroll"], outer
    assert outer["unroll"] != outer["scan"], outer
    alphas, weights = jaxplain.integrated.quadrature_rule("gausslegendre", 12)
    total = sum(w * jax.grad(lambda z: jnp.take_along_axis(f(z), t[:, None], 1).sum())(a * x)
                for a, w in zip(alphas, weights))
    np.testing.assert_allclose(ig(x, "auto"), x * total, rtol=1e-5, atol=1e-6)


def test_unrolled_chunks_run_in_sequence_so_memory_does_not_grow_with_steps():
  # XLA:CPU keeps independent unrolled chunks all live (LeNet, B = 4: 0.36 MB at 2 steps,
  # 2.7 MB at 16 without the chunk-to-chunk dependency); chained, one chunk's buffers suffice.
  from jaxplain.models import LeNet
  model = LeNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 1))
  variables = model.init(jax.random.PRNGKey(1), x)
  f = functools.partial(model.apply, variables)
  temp = {}
  for steps in (2, 16):
    compiled = jax.jit(lambda z: jaxplain.integrated_gradients(f, z, 0, steps=steps, chunk=1)
                       ).lower(x).compile()
    temp[steps] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[16] < 1.5 * temp[2], temp


def test_completeness_gap_goes_to_zero(tiny64):
  f, x = tiny64
  t = np.array([0, 2])
  gaps = []
  with jax.enable_x64(True):
    y, y0 = np.asarray(f(x)), np.asarray(f(np.zeros_like(x)))
    delta = y[[0, 1], t] - y0[[0, 1], t]
    for m in (2, 4, 8):
      ig, gap = jax.jit(lambda z: jaxplain.integrated_gradients(
          f, z, t, steps=m, method="riemann_trapezoid", return_gap=True))(x)
      assert ig.dtype == jnp.float64
      np.testing.assert_allclose(gap, np.asarray(ig).sum(axis=(1, 2, 3)) - delta, atol=1e-12)
      gaps.append(np.max(np.abs(gap)))
    np.testing.assert_allclose(jax.jit(lambda z, a: jaxplain.completeness_gap(f, z, t, a))(x, ig),
                               gap, atol=1e-12)
    _, gap_gl = jax.jit(lambda z: jaxplain.integrated_gradients(f, z, t, steps=16,
                                                                return_gap=True))(x)
  assert gaps[0] > 1e-3 and all(a > 3 * b for a, b in zip(gaps, gaps[1:])), gaps
  assert np.max(np.abs(gap_gl)) < 1e-9


def test_per_example_targets_and_vmap(tiny):
  f, x = tiny
  t = jnp.array([3, 0])
  ig = jaxplain.integrated_gradients(f, x, t, steps=4)
  for b in range(2):
    one = jaxplain.integrated_gradients(f, x[b:b + 1], int(t[b]), steps=4)
    np.testing.assert_allclose(ig[b:b + 1], one, rtol=1e-5, atol=1e-7)
  xs = jnp.stack([x, 1 - x])
  igv = jax.vmap(lambda xx: jaxplain.integrated_gradients(f, xx, t, steps=4))(xs)
  np.testing.assert_allclose(igv[1], jaxplain.integrated_gradients(f, 1 - x, t, steps=4),
                             rtol=1e-5, atol=1e-7)


def test_linen_nnx_and_plain_function_agree():
  model = Tiny()
  params = model.init(jax.random.key(0), jnp.zeros(X_SHAPE))
  p = params["params"]

  class TinyNNX(nnx.Module):
    def __init__(self):
      self.conv1 = nnx.Conv(2, 3, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
      self.fc = nnx.Linear(48, 4, rngs=nnx.Rngs(0))
      self.conv1.kernel[...] = p["conv1"]["kernel"]
      self.conv1.bias[...] = p["conv1"]["bias"]
      self.fc.kernel[...] = p["fc"]["kernel"]
      self.fc.bias[...] = p["fc"]["bias"]

    def __call__(self, x):
      x = nnx.relu(self.conv1(x))
      return self.fc(x.reshape(x.shape[0], -1))

  def plain(x):
    y = jax.lax.conv_general_dilated(x, p["conv1"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y + p["conv1"]["bias"].reshape(1, 1, 1, -1)).reshape(x.shape[0], -1)
    return y @ p["fc"]["kernel"] + p["fc"]["bias"][None]

  graphdef, state = nnx.split(TinyNNX())
  fs = [functools.partial(model.apply, params), lambda x: nnx.merge(graphdef, state)(x), plain]
  x = jax.random.uniform(jax.random.key(1), X_SHAPE)
  kw = dict(steps=5, baseline="blur", return_gap=True)
  (ref, ref_gap), *others = [jax.jit(lambda z, f=f: jaxplain.integrated_gradients(f, z, 1, **kw))(x)
                             for f in fs]
  for ig, gap in others:
    np.testing.assert_allclose(ig, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gap, ref_gap, rtol=1e-4, atol=1e-5)


def test_baselines():
  x = jax.random.uniform(jax.random.key(1), (2, 6, 5, 3))
  np.testing.assert_array_equal(jaxplain.make_baseline(x, "black"), np.zeros(x.shape))
  white = jaxplain.make_baseline(x, "white")
  np.testing.assert_allclose(white[:, 0, 0, 0], x.reshape(2, -1).max(1))
  np.testing.assert_allclose(jaxplain.make_baseline(x, "white", value_range=(0, 1)), 1.0)
  r1 = jaxplain.make_baseline(x, "random", key=jax.random.key(0), value_range=(0.0, 1.0))
  r2 = jaxplain.make_baseline(x, "random", key=jax.random.key(0), value_range=(0.0, 1.0))
  np.testing.assert_array_equal(r1, r2)
  assert r1.min() >= 0 and r1.max() <= 1 and r1.std() > 0.2
  # blur: a constant image stays constant; a point spreads as a normalised 2-D Gaussian
  np.testing.assert_allclose(jaxplain.make_baseline(jnp.full((1, 9, 9, 1), 0.3), "blur"), 0.3,
                             rtol=1e-6)
  point = jnp.zeros((1, 21, 21, 1)).at[0, 10, 10, 0].set(1.0)
  blur = np.asarray(jaxplain.make_baseline(point, "blur", blur_sigma=1.5))[0, :, :, 0]
  i = np.arange(21) - 10
  g = np.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / (2 * 1.5 ** 2))
  np.testing.assert_allclose(blur, g / g.sum(), atol=1e-6)
  # an array baseline broadcasts: one image for all examples, or a scalar
  one = jax.random.uniform(jax.random.key(2), (1, 6, 5, 3))
  np.testing.assert_allclose(jaxplain.make_baseline(x, one)[1], one[0])
  np.testing.assert_allclose(jaxplain.make_baseline(x, 0.25), 0.25)


def test_bad_input_errors_name_the_argument(tiny):
  f, x = tiny
  ig = jaxplain.integrated_gradients
  with pytest.raises(ValueError, match=r"baseline: shape \(3, 4, 4, 2\) does not broadcast"):
    ig(f, x, 0, baseline=jnp.zeros((3, 4, 4, 2)))
  with pytest.raises(ValueError, match=r"baseline: shape \(4, 4\) does not broadcast"):
    ig(f, x, 0, baseline=jnp.zeros((4, 4)))
  with pytest.raises(ValueError, match="baseline: contains 1 non-finite"):
    ig(f, x, 0, baseline=jnp.zeros(X_SHAPE[1:]).at[0, 0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="baseline: expected one of"):
    ig(f, x, 0, baseline="grey")
  with pytest.raises(ValueError, match="key: baseline='random' needs"):
    ig(f, x, 0, baseline="random")
  with pytest.raises(ValueError, match="x: expected a batched array"):
    ig(f, x[0, 0, 0, 0], 0)
  with pytest.raises(ValueError, match="x: contains 1 non-finite"):
    ig(f, x.at[1, 2, 3, 0].set(jnp.inf), 0)
  with pytest.raises(ValueError, match=r"target: class index out of range \[0, 4\)"):
    ig(f, x, jnp.array([0, 7]))
  with pytest.raises(ValueError, match="method: expected one of"):
    ig(f, x, 0, method="simpson")
  with pytest.raises(ValueError, match="steps: expected an int >= 1"):
    ig(f, x, 0, steps=0)
  with pytest.raises(ValueError, match="steps: riemann_trapezoid needs steps >= 2"):
    ig(f, x, 0, steps=1, method="riemann_trapezoid")
  with pytest.raises(ValueError, match="chunk: expected None or an int >= 1"):
    ig(f, x, 0, chunk=0)
  with pytest.raises(ValueError, match=r"attributions: expected shape \(2, 4, 4, 2\)"):
    jaxplain.completeness_gap(f, x, 0, x[:1])


def test_all_targets_equal_a_loop_over_classes(tiny):
  f, x = tiny
  kw = dict(steps=5, baseline="white", return_gap=True)
  ig_all, gap_all = jaxplain.integrated_gradients(f, x, "all", **kw)
  assert ig_all.shape == (2, 4) + X_SHAPE[1:] and gap_all.shape == (2, 4)
  for k in range(4):
    ig, gap = jaxplain.integrated_gradients(f, x, k, **kw)
    np.testing.assert_allclose(ig_all[:, k], ig, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gap_all[:, k], gap, rtol=1e-4, atol=1e-6)
  t = jnp.array([[3, 1, 1], [0, 2, 3]])  # a per-example list of targets, chunked
  ig_t = jax.jit(lambda z: jaxplain.integrated_gradients(f, z, t, steps=5, baseline="white",
                                                         target_chunk=2, chunk=2))(x)
  for b in range(2):
    for j in range(3):
      np.testing.assert_allclose(ig_t[b, j], ig_all[b, int(t[b, j])], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
      jaxplain.completeness_gap(f, x, "all", ig_all, baseline="white"), gap_all, atol=1e-6)


def test_bfloat16_inputs_accumulate_in_float32():
  # Before: nodes, weights and the running sum were bf16, so the error grew with m (issue 10,
  # item 7). Reference: the exact path integral in float64 of the bf16-rounded x and x'.
  x, base = closed_data()
  xb = jnp.asarray(x, jnp.bfloat16)
  bb = jnp.asarray(base, jnp.bfloat16)
  exact = exact_ig(np.asarray(xb, np.float64), np.asarray(bb, np.float64), 0)
  errs = {}
  for m in (8, 128):
    ig = jaxplain.integrated_gradients(closed_f, xb, 0, baseline=bb, steps=m,
                                       method="riemann_middle", chunk=None)
    assert ig.dtype == jnp.float32
    errs[m] = np.max(np.abs(np.asarray(ig, np.float64) - exact)) / np.max(np.abs(exact))
  # m = 8 carries the O(1/m^2) rule error; at m = 128 the bf16 evaluation of f remains,
  # 1.9e-4 measured (a bf16 sum or a bf16 result: 1.9e-3, the bf16 rounding of the output)
  assert errs[128] < 6e-4 and errs[128] < errs[8] / 10, errs


# -- IG to a tolerance ---------------------------------------------------------------------

W_KINK = np.linspace(-1.0, 1.5, D)


def kink_f(x):
  """relu(w . x - 0.3): along a straight path the integrand is a step at one known alpha."""
  w = jnp.asarray(W_KINK, x.dtype)
  z = x @ w - 0.3
  return jnp.stack([jax.nn.relu(z), z], 1)


def kink_ig(x, base):
  d = x - base
  z0, z1 = base @ W_KINK - 0.3, x @ W_KINK - 0.3
  a = np.clip(-z0 / (z1 - z0), 0, 1)  # where w . x(a) - 0.3 crosses 0
  on = np.where(z1 > z0, 1 - a, a)  # the fraction of the path on which relu' = 1
  on = np.where(np.sign(z0) == np.sign(z1), (z0 > 0).astype(float), on)
  return W_KINK * d * on[:, None]


def counting(f, rows):
  def g(z):  # counts the rows that f evaluates at run time (also inside jit / while loops)
    jax.debug.callback(lambda n: rows.append(int(n)), z.shape[0])
    return f(z)
  return g


def test_adaptive_ig_meets_tol_on_closed_forms_and_counts_fewer_evaluations():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, D)) * np.array([0.25, 0.5, 1.0, 2.0])[:, None]  # unequal difficulty
  tol = 1e-3
  with jax.enable_x64(True):
    xj = jnp.asarray(x)
    delta = np.asarray(closed_f(xj) - closed_f(jnp.zeros_like(xj)))[:, 0]
    res = {}
    for driver in ("while", "host"):
      rows = []
      ig, info = jaxplain.integrated_gradients(counting(closed_f, rows), xj, 0, tol=tol,
                                               driver=driver, return_info=True, chunk=4,
                                               max_steps=257)
      res[driver] = (np.asarray(ig), {k: np.asarray(v) for k, v in info.items()}, sum(rows))
    ig, info, rows_host = res["host"]
    np.testing.assert_allclose(res["while"][0], ig, rtol=1e-12)
    np.testing.assert_array_equal(res["while"][1]["steps"], info["steps"])
    gap = ig.sum(1) - delta  # recomputed here, not read from info
    np.testing.assert_allclose(info["gap"], gap, atol=1e-12)
    assert info["converged"].all() and np.all(np.abs(gap) <= tol * np.abs(delta))
    # exp is convex along the path: the trapezoid errors of all features share a sign, so
    # the gap bounds the summed attribution error
    err = np.abs(ig - np.exp(C * x) + 1).sum(1)
    assert np.all(err <= tol * np.abs(delta) * (1 + 1e-9)), (err, tol * np.abs(delta))
    assert len(set(info["steps"])) > 1  # the examples stopped at different levels
    # the fixed trapezoid m that reaches tol for the worst example, found by a scan over m
    # (numpy: d/dx_i exp(c_i x_i) at a x is c_i exp(c_i a x_i))
    def trap_gap(m):
      a, w = hand_rule("riemann_trapezoid", m)
      g = C * np.exp(C * a[:, None, None] * x[None])  # (m, B, D)
      return np.abs(np.einsum("m,mbd->b", w, g * x[None]) - delta)
    m_fixed = next(m for m in range(2, 1100) if np.all(trap_gap(m) <= tol * np.abs(delta)))
    assert info["steps"].sum() <= rows_host < m_fixed * 4, (info["steps"], rows_host, m_fixed)
    # under jit (the while driver) it compiles and gives the same
    ig_jit, info_jit = jax.jit(lambda z: jaxplain.integrated_gradients(
        closed_f, z, 0, tol=tol, return_info=True, chunk=4, max_steps=257))(xj)
    np.testing.assert_allclose(ig_jit, ig, rtol=1e-12)
    np.testing.assert_array_equal(info_jit["steps"], info["steps"])
    # the quadratic has a linear integrand: the first level (5 nodes) is exact
    _, info_q = jaxplain.integrated_gradients(closed_f, xj, 1, tol=1e-9, return_info=True,
                                              driver="host")
    np.testing.assert_array_equal(np.asarray(info_q["steps"]), 5)


def test_adaptive_ig_warns_when_examples_do_not_converge():
  """A spike at the baseline (x / sqrt(x^2 + 1e-10): gradient 1e5 at 0) defeats the nested
  trapezoid within 17 nodes for the example whose path starts there; a warning says so
  unless return_info is asked for (which reports it), and a converged call is silent."""
  import warnings
  spiky = lambda z: jnp.stack([jnp.sum(z / jnp.sqrt(z * z + 1e-10), 1), z.sum(1)], 1)
  x = jnp.array([[1.0, -2.0], [0.5, 0.5]])
  base = jnp.array([[0.0, 0.0], [0.4, 0.4]])  # the second path stays away from 0
  kw = dict(baseline=base, tol=1e-3, max_steps=17, driver="while")
  with pytest.warns(RuntimeWarning, match=r"1 of 2 examples did not reach tol=0.001 within "
                                          r"max_steps=17 .*return_info=True"):
    jaxplain.integrated_gradients(spiky, x, 0, **kw)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, info = jaxplain.integrated_gradients(spiky, x, 0, return_info=True, **kw)
    assert np.asarray(info["converged"]).tolist() == [False, True]
    jaxplain.integrated_gradients(spiky, x, 1, **kw)  # linear: converges at once


def test_adaptive_ig_on_a_kink_within_the_trapezoid_bound():
  rng = np.random.default_rng(1)
  x, base = rng.normal(size=(3, D)), rng.normal(size=(3, D)) * 0.3
  with jax.enable_x64(True):
    ig, info = jaxplain.integrated_gradients(kink_f, jnp.asarray(x), 0, tol=1e-3,
                                             baseline=jnp.asarray(base), return_info=True,
                                             max_steps=4097, driver="host")
    steps = np.asarray(info["steps"])
  exact = kink_ig(x, base)
  delta = exact.sum(1)  # completeness of the exact integral
  assert np.all(np.abs(np.asarray(ig).sum(1) - delta) <= 1e-3 * np.abs(delta) + 1e-6)
  # a step in the integrand: the trapezoid error of feature i is at most h/2 |w_i d_i|
  h = 1.0 / (steps - 1)
  bound = 0.5 * h[:, None] * np.abs(W_KINK * (x - base))
  assert np.all(np.abs(np.asarray(ig) - exact) <= bound + 1e-12)
  _, info1 = jaxplain.integrated_gradients(kink_f, jnp.asarray(x), 0, tol=1e-12,
                                           baseline=jnp.asarray(base), return_info=True,
                                           max_steps=17, driver="host")
  assert not np.asarray(info1["converged"]).all()  # reported, not hidden
  np.testing.assert_array_equal(np.asarray(info1["steps"])[~np.asarray(info1["converged"])],
                                17)


def test_local_driver_refines_at_the_kink_and_equals_one_example_at_a_time():
  rng = np.random.default_rng(1)
  x, base = rng.normal(size=(3, D)), rng.normal(size=(3, D)) * 0.3
  tol, atol = 1e-3, 1e-6
  with jax.enable_x64(True):
    out = {}
    for driver in ("host", "local"):
      rows = []
      ig, info = jaxplain.integrated_gradients(
          counting(kink_f, rows), jnp.asarray(x), 0, tol=tol, atol=atol, driver=driver,
          baseline=jnp.asarray(base), return_info=True, max_steps=4097)
      out[driver] = (np.asarray(ig), {k: np.asarray(v) for k, v in info.items()}, sum(rows))
    ig, info, rows_local = out["local"]
    # the loop: each example alone takes the same nodes and gives the same map
    for i in range(3):
      ig1, info1 = jaxplain.integrated_gradients(
          kink_f, jnp.asarray(x[i:i + 1]), 0, tol=tol, atol=atol, driver="local",
          baseline=jnp.asarray(base[i:i + 1]), return_info=True, max_steps=4097)
      np.testing.assert_allclose(np.asarray(ig1)[0], ig[i], rtol=1e-12, atol=1e-15)
      assert int(info1["steps"][0]) == info["steps"][i]
  exact = kink_ig(x, base)
  wd = W_KINK * (x - base)
  delta = exact.sum(1)
  gap = ig.sum(1) - delta  # recomputed here, not read from info
  np.testing.assert_allclose(info["gap"], gap, atol=1e-12)
  assert info["converged"].all() and np.all(np.abs(gap) <= np.maximum(tol * np.abs(delta), atol))
  # one step in the integrand, at the same alpha for every feature: each feature's error is
  # w_i d_i times one common error of the "on" fraction, so the gap fixes every feature's error
  bound = np.abs(wd) * np.maximum(tol * np.abs(delta), atol)[:, None] / np.abs(wd.sum(1))[:, None]
  assert np.all(np.abs(ig - exact) <= bound * (1 + 1e-9) + 1e-12)
  # nodes gather at the kink: far fewer evaluations than uniform doubling (the host driver)
  steps_uniform = out["host"][1]["steps"]
  assert np.all(info["steps"] <= steps_uniform), (info["steps"], steps_uniform)
  assert info["steps"].sum() * 4 < steps_uniform.sum(), (info["steps"], steps_uniform)
  assert info["steps"].sum() <= rows_local <= 2 * info["steps"].sum()  # padding at most 2x


def test_auto_driver_is_local_when_concrete_and_while_under_jit():
  rng = np.random.default_rng(2)
  x, base = jnp.asarray(rng.normal(size=(3, D))), jnp.asarray(rng.normal(size=(3, D)) * 0.3)
  kw = dict(tol=1e-3, baseline=base, return_info=True, max_steps=257)
  with jax.enable_x64(True):
    for drv, call in (("local", lambda **k: jaxplain.integrated_gradients(kink_f, x, 0, **k)),
                      ("while", lambda **k: jax.jit(lambda z: jaxplain.integrated_gradients(
                          kink_f, z, 0, **k))(x))):
      ig, info = call(**kw)
      ig_d, info_d = call(driver=drv, **kw)
      np.testing.assert_array_equal(np.asarray(info["steps"]), np.asarray(info_d["steps"]))
      np.testing.assert_allclose(ig, ig_d, rtol=1e-12)
    # x concrete but f traced (jax.jvp over a parameter): auto falls back to while
    w_scale = lambda c: jaxplain.integrated_gradients(lambda z: kink_f(z * c), x, 0,
                                                      **kw)[0].sum()
    primal, tangent = jax.jvp(w_scale, (1.0,), (1.0,))
    want = jax.jvp(lambda c: jaxplain.integrated_gradients(
        lambda z: kink_f(z * c), x, 0, driver="while", **kw)[0].sum(), (1.0,), (1.0,))
    np.testing.assert_allclose([primal, tangent], want, rtol=1e-12)
    # the two drivers do differ (local places its nodes at the kink)
    _, info_w = jaxplain.integrated_gradients(kink_f, x, 0, driver="while", **kw)
    assert np.asarray(info_w["steps"]).sum() != np.asarray(
        jaxplain.integrated_gradients(kink_f, x, 0, **kw)[1]["steps"]).sum()


def test_local_driver_on_a_smooth_integrand_and_its_errors():
  rng = np.random.default_rng(0)
  # c_i x_i > 0: every feature's integrand c_i x_i exp(c_i x_i a) is convex in a
  x = np.abs(rng.normal(size=(4, D))) * np.sign(C) * np.array([0.25, 0.5, 1.0, 2.0])[:, None]
  tol = 1e-3
  with jax.enable_x64(True):
    xj = jnp.asarray(x)
    delta = np.asarray(closed_f(xj) - closed_f(jnp.zeros_like(xj)))[:, 0]
    ig, info = jaxplain.integrated_gradients(closed_f, xj, 0, tol=tol, driver="local",
                                             return_info=True, max_steps=257)
    ig = np.asarray(ig)
    assert np.asarray(info["converged"]).all()
    # convex integrands: on any nodes the trapezoid errors are all positive, so the gap
    # bounds the summed attribution error
    err = np.abs(ig - np.exp(C * x) + 1).sum(1)
    assert np.all(err <= tol * np.abs(delta) * (1 + 1e-9)), (err, tol * np.abs(delta))
    assert np.all(ig >= np.exp(C * x) - 1 - 1e-15)  # overestimates, feature by feature
    _, info1 = jaxplain.integrated_gradients(kink_f, xj, 0, tol=1e-12, driver="local",
                                             return_info=True, max_steps=9)
    conv = np.asarray(info1["converged"])
    assert not conv.all()  # reported, not hidden
    assert np.all(np.asarray(info1["steps"])[~conv] <= 9)
  with pytest.raises(ValueError, match="driver: 'local'.*cannot be traced"):
    jax.jit(lambda z: jaxplain.integrated_gradients(closed_f, z, 0, tol=tol,
                                                    driver="local"))(jnp.asarray(x, jnp.float32))


# -- exact IG for piecewise-linear networks -------------------------------------------------


def pl_params(dtype):
  r = np.random.default_rng(3)
  return {"w1": r.normal(size=(3, 3, 1, 3)), "b1": r.normal(size=3) * 0.5,
          "w2": r.normal(size=(12, 5)) * 0.5, "b2": r.normal(size=5) * 0.5,
          "w3": r.normal(size=(5, 3)), "b3": r.normal(size=3) * 0.1,
          "dtype": dtype}


def pl_net(p, x, pattern=False):
  """conv -> relu -> 2x2 max-pool (lax.reduce_window) -> dense -> leaky relu -> dense."""
  dt = p["dtype"]
  z1 = jax.lax.conv_general_dilated(x, jnp.asarray(p["w1"], dt), (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  z1 = z1 + jnp.asarray(p["b1"], dt).reshape(1, 1, 1, -1)
  h = nn.max_pool(jax.nn.relu(z1), (2, 2), (2, 2))
  z2 = h.reshape(x.shape[0], -1) @ jnp.asarray(p["w2"], dt) + jnp.asarray(p["b2"], dt)[None]
  out = jax.nn.leaky_relu(z2, 0.1) @ jnp.asarray(p["w3"], dt) + jnp.asarray(p["b3"], dt)[None]
  if not pattern:
    return out
  r = jax.nn.relu(z1).reshape(x.shape[0], 2, 2, 2, 2, 3).transpose(0, 1, 3, 5, 2, 4)
  win = jnp.argmax(r.reshape(x.shape[0], 2, 2, 3, 4), axis=-1)  # the pool's arg-max
  return jnp.concatenate([(z1 > 0).reshape(x.shape[0], -1).astype(jnp.int32),
                          win.reshape(x.shape[0], -1).astype(jnp.int32),
                          (z2 > 0).reshape(x.shape[0], -1).astype(jnp.int32)], axis=1)


def _pl_problem(seed: int, n: int):
  """The float32 piecewise-linear net, n random inputs and baselines (half the scale)."""
  p = pl_params(jnp.float32)
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(n, 4, 4, 1)), jnp.float32)
  base = jnp.asarray(r.normal(size=(n, 4, 4, 1)) * 0.5, jnp.float32)
  return p, functools.partial(pl_net, p), x, base


def test_exact_ig_on_a_relu_maxpool_cnn():
  p, f, x, base = _pl_problem(4, 2)
  t = jnp.array([0, 2])
  ig, info = jaxplain.integrated_gradients(f, x, t, method="exact", baseline=base,
                                           return_info=True)
  y, y0 = np.asarray(f(x)), np.asarray(f(base))
  delta = y[[0, 1], [0, 2]] - y0[[0, 1], [0, 2]]
  gap = np.asarray(ig, np.float64).sum(axis=(1, 2, 3)) - delta
  assert np.all(np.abs(gap) <= 1e-5 * np.abs(delta)), (gap, delta)
  # Gauss-Legendre at m = 4096, computed here (jax.grad on 512-node chunks): it converges only
  # as O(1/m) on this step-wise integrand (its own gap is ~1e-4 here), so it agrees to that
  a, w = scipy.special.roots_legendre(4096)   # NumPy's leggauss: same to 3e-13, 14x slower
  a, w = (a + 1) / 2, w / 2
  grad = jax.jit(jax.grad(lambda z, k: f(z)[:, k].sum()), static_argnums=1)
  gl = np.zeros(x.shape)
  for b in range(2):
    for s in range(0, 4096, 512):
      pts = base[b][None] + jnp.asarray(a[s:s + 512], jnp.float32).reshape(-1, 1, 1, 1) * (
          x - base)[b][None]
      gl[b] += np.tensordot(w[s:s + 512], np.asarray(grad(pts, int(t[b])), np.float64), 1)
  gl *= np.asarray(x - base, np.float64)
  gl_gap = gl.sum(axis=(1, 2, 3)) - delta
  scale = np.abs(np.asarray(ig)).max()
  assert np.abs(np.asarray(ig) - gl).max() <= 1e-3 * scale
  assert np.all(np.abs(gap) < np.abs(gl_gap))
  # the breakpoints equal those of a dense scan of the activation pattern along the path
  n = 20001
  grid = np.linspace(0, 1, n)
  for b in range(2):
    pts = base[b][None] + jnp.asarray(grid, jnp.float32).reshape(-1, 1, 1, 1) * (x - base)[b][None]
    pat = np.asarray(jax.jit(lambda z: pl_net(p, z, pattern=True))(pts))
    changed = set(np.flatnonzero(np.any(pat[1:] != pat[:-1], axis=1)))
    bp = np.asarray(info["breakpoints"][b])
    found = set(np.searchsorted(grid, bp) - 1)
    off = found ^ changed  # cells where the scan and the breakpoints disagree: only where a
    # breakpoint lies within float32 rounding (1e-6) of a grid point (it may land one cell over)
    assert len(bp) > 5 and len(off) <= 4, (sorted(off), len(bp))
    for i in off:
      assert min(np.min(np.abs(bp - grid[i])), np.min(np.abs(bp - grid[i + 1]))) < 1e-6, i
    assert int(info["steps"][b]) == len(bp) + 1


def test_exact_ig_batches_of_examples_equal_one_at_a_time(capfd):
  # the search runs 8 examples together (each segment knows its example): 10 examples span
  # two groups; each example's breakpoints and map must equal a call on it alone
  _, f, x, base = _pl_problem(6, 10)
  t = jnp.arange(10) % 3
  capfd.readouterr()
  ig, info = jaxplain.integrated_gradients(f, x, t, method="exact", baseline=base,
                                           return_info=True)
  # progress (stderr is not a terminal here): one line per group of 8 examples
  lines = [ln for ln in capfd.readouterr().err.splitlines() if "exact IG: breakpoints" in ln]
  assert [ln.split(": ")[2].split(" ")[0] for ln in lines] == ["1/2", "2/2"], lines
  for b in (0, 7, 8, 9):
    ig1, info1 = jaxplain.integrated_gradients(f, x[b:b + 1], t[b:b + 1], method="exact",
                                               baseline=base[b:b + 1], return_info=True)
    assert "exact IG" not in capfd.readouterr().err     # one group: no progress
    np.testing.assert_allclose(info["breakpoints"][b], info1["breakpoints"][0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(ig[b]), np.asarray(ig1[0]), rtol=1e-4, atol=1e-5)
  y, y0 = np.asarray(f(x), np.float64), np.asarray(f(base), np.float64)
  delta = y[np.arange(10), np.asarray(t)] - y0[np.arange(10), np.asarray(t)]
  gap = np.asarray(ig, np.float64).sum(axis=(1, 2, 3)) - delta
  assert np.all(np.abs(gap) <= 1e-5 * np.abs(delta) + 1e-6), gap
  jaxplain.integrated_gradients(f, x, t, method="exact", baseline=base, progress=False)
  assert "exact IG" not in capfd.readouterr().err


def test_exact_ig_float64_completeness_and_errors():
  with jax.enable_x64(True):
    p = pl_params(jnp.float64)
    f = functools.partial(pl_net, p)
    r = np.random.default_rng(5)
    x = jnp.asarray(r.normal(size=(1, 4, 4, 1)))
    base = jnp.asarray(r.normal(size=(1, 4, 4, 1)) * 0.5)
    ig, gap = jaxplain.integrated_gradients(f, x, 1, method="exact", baseline=base,
                                            return_gap=True)
    delta = float(f(x)[0, 1] - f(base)[0, 1])
    assert ig.dtype == jnp.float64
    assert abs(float(np.asarray(ig).sum()) - delta) <= 1e-10 * abs(delta)
    assert abs(float(gap[0])) <= 1e-10 * abs(delta)
  smooth = lambda z: jnp.tanh(z.reshape(z.shape[0], -1)[:, :3])
  with pytest.raises(jaxplain.NotPiecewiseLinearError,
                     match="first non-piecewise-linear primitive is 'tanh'"):
    jaxplain.integrated_gradients(smooth, jnp.ones((1, 4)), 0, method="exact")
  with pytest.raises(ValueError, match="output: method='exact' needs output='logit'"):
    jaxplain.integrated_gradients(smooth, jnp.ones((1, 4)), 0, method="exact",
                                  output="softmax")
  with pytest.raises(ValueError, match="cannot be traced"):
    jax.jit(lambda z: jaxplain.integrated_gradients(smooth, z, 0, method="exact"))(
        jnp.ones((1, 4)))


def test_exact_ig_breakpoints_of_abs_min_and_array_thresholds_in_closed_form():
  # one affine layer z(a) = z0 + a (z1 - z0) along the path, then abs (kink at z = 0), a
  # minimum of two affine operands (z = c - z at z = c / 2) and a where against a constant
  # array (z = c_u; continuous there, or the path integral would miss the jump): every
  # breakpoint is the closed-form a = (thr - z0) / (z1 - z0) in (0, 1)
  with jax.enable_x64(True):
    r = np.random.default_rng(12)
    w, bias = jnp.asarray(r.normal(size=(5, 9))), jnp.asarray(r.normal(size=9) * 0.3)
    c = jnp.asarray(r.normal(size=3) * 0.5)
    head = jnp.asarray(r.normal(size=(9, 2)))

    def f(x):
      z = x @ w + bias[None]
      h = jnp.concatenate([jnp.abs(z[:, :3]), jnp.minimum(z[:, 3:6], c[None] - z[:, 3:6]),
                           jnp.where(z[:, 6:] > c[None], z[:, 6:],
                                     0.5 * (z[:, 6:] + c[None]))], axis=1)
      return h @ head

    x, base = jnp.asarray(r.normal(size=(3, 5)) * 2), jnp.asarray(r.normal(size=(3, 5)) * 0.2)
    ig, info = jaxplain.integrated_gradients(f, x, 1, method="exact", baseline=base,
                                             return_info=True)
    delta = np.asarray(f(x)[:, 1] - f(base)[:, 1])
    np.testing.assert_allclose(np.asarray(ig).sum(1), delta, rtol=1e-10, atol=1e-12)
    z0, z1 = np.asarray(base @ w + bias[None]), np.asarray(x @ w + bias[None])
    cn = np.asarray(c)
    thr = np.concatenate([np.zeros(3), cn / 2, cn])
    for b in range(3):
      a = (thr - z0[b]) / (z1[b] - z0[b])
      want = np.sort(a[(a > 0) & (a < 1)])
      assert want.size >= 2
      np.testing.assert_allclose(np.asarray(info["breakpoints"][b]), want, rtol=1e-9,
                                 atol=1e-12)


def test_exact_ig_through_stack_unstack_and_split():
  # these bind primitives of their own in jax 0.10; linear, so the exact path integral still
  # holds completeness to float64 rounding and equals fine Gauss-Legendre IG
  with jax.enable_x64(True):
    r = np.random.default_rng(11)
    w1, w2 = jnp.asarray(r.normal(size=(6, 6))), jnp.asarray(r.normal(size=(6, 3)))

    def f(x):
      a, b = jnp.split(jax.nn.relu(x @ w1), 2, axis=1)
      u, v = jnp.unstack(jnp.stack([a, jnp.maximum(b, 0.1 * b)], axis=1), axis=1)
      return jnp.concatenate([u, jax.nn.relu(u - v)], axis=1) @ w2

    x, base = jnp.asarray(r.normal(size=(2, 6))), jnp.zeros((2, 6))
    ig = jaxplain.integrated_gradients(f, x, 2, method="exact", baseline=base)
    delta = np.asarray(f(x)[:, 2] - f(base)[:, 2])
    np.testing.assert_allclose(np.asarray(ig).sum(1), delta, rtol=1e-10, atol=1e-12)
    fine = jaxplain.integrated_gradients(f, x, 2, steps=4096, baseline=base)
    np.testing.assert_allclose(ig, fine, rtol=1e-3, atol=1e-4)


def test_exact_ig_unrolls_scans_like_the_loop_written_out():
  # a ReLU recurrent net over a sequence (scanned inputs and stacked outputs, forward and
  # reverse) and a fori_loop: the exact IG and its breakpoints equal those of the same
  # loops written out in Python (no scan in the trace)
  from jaxplain import _exact_ig
  with jax.enable_x64(True):
    r = np.random.default_rng(12)
    wx, wh = jnp.asarray(r.normal(size=(3, 4))), jnp.asarray(r.normal(size=(4, 4)) * 0.5)
    wo = jnp.asarray(r.normal(size=(8, 3)))
    cell = lambda h, xt: (jax.nn.relu(xt @ wx + h @ wh - 0.3),) * 2
    step = lambda i, h: jnp.maximum(h @ wh, 0.2 * h) + 0.1

    def scanned(x):                                     # x: (B, L, 3)
      xs = jnp.swapaxes(x, 0, 1)
      h0 = jnp.zeros((x.shape[0], 4), x.dtype)
      h, ys = jax.lax.scan(cell, h0, xs)
      hb, _ = jax.lax.scan(cell, h0, xs, reverse=True)
      h = jax.lax.fori_loop(0, 2, step, h + ys.sum(0))
      return jnp.concatenate([h, hb], axis=1) @ wo

    def written_out(x):
      h0 = jnp.zeros((x.shape[0], 4), x.dtype)
      h, ys = h0, []
      for t in range(x.shape[1]):
        h, y = cell(h, x[:, t])
        ys.append(y)
      hb = h0
      for t in reversed(range(x.shape[1])):
        hb, _ = cell(hb, x[:, t])
      h = h + sum(ys)
      for i in range(2):
        h = step(i, h)
      return jnp.concatenate([h, hb], axis=1) @ wo

    x, base = jnp.asarray(r.normal(size=(2, 5, 3))), jnp.asarray(r.normal(size=(2, 5, 3)))
    np.testing.assert_allclose(scanned(x), written_out(x), rtol=1e-12)
    assert "scan" in {e.primitive.name for e in jax.make_jaxpr(scanned)(x).eqns}
    ig = jaxplain.integrated_gradients(scanned, x, 1, method="exact", baseline=base)
    want = jaxplain.integrated_gradients(written_out, x, 1, method="exact", baseline=base)
    np.testing.assert_allclose(ig, want, rtol=1e-9, atol=1e-12)
    delta = np.asarray(scanned(x)[:, 1] - scanned(base)[:, 1])
    np.testing.assert_allclose(np.asarray(ig).sum((1, 2)), delta, rtol=1e-10)
    bp = _exact_ig.breakpoints(scanned, x[:1], base[:1])
    assert len(bp) > 3
    np.testing.assert_allclose(bp, _exact_ig.breakpoints(written_out, x[:1], base[:1]),
                               atol=1e-12)
  loop = lambda z: jax.lax.while_loop(lambda h: jnp.sum(h) < 10.0, lambda h: h + 1.0, z)
  with pytest.raises(jaxplain.NotPiecewiseLinearError, match="'while' .a while loop"):
    jaxplain.integrated_gradients(loop, jnp.ones((1, 4)), 0, method="exact")


def test_exact_ig_through_average_pooling_and_checkpoint():
  # average pooling (reduce_window_sum, as linen's avg_pool) inside jax.checkpoint (remat:
  # a call primitive of its own) against the same network with the pooling written as a
  # reshape-mean and no checkpoint: the same breakpoints and maps, completeness to float64
  # rounding
  from jaxplain import _exact_ig
  with jax.enable_x64(True):
    r = np.random.default_rng(21)
    w = jnp.asarray(r.normal(size=(3, 3, 2, 4)))
    head = jnp.asarray(r.normal(size=(16, 3)))
    conv = lambda z: jax.nn.relu(jax.lax.conv_general_dilated(
        z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) - 0.2)

    def pooled(x):
      pool = lambda z: jax.lax.reduce_window(z, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                                             "VALID") / 4.0
      h = jax.checkpoint(lambda z: pool(conv(z)))(x)
      return jax.nn.relu(h).reshape(x.shape[0], -1) @ head

    def written(x):
      h = conv(x).reshape(x.shape[0], 2, 2, 2, 2, 4).mean((2, 4))
      return jax.nn.relu(h).reshape(x.shape[0], -1) @ head

    x, base = jnp.asarray(r.normal(size=(2, 4, 4, 2))), jnp.zeros((2, 4, 4, 2))
    names = {e.primitive.name for e in jax.make_jaxpr(pooled)(x).eqns}
    assert "remat2" in names or "checkpoint" in names, names
    np.testing.assert_allclose(pooled(x), written(x), rtol=1e-12)
    ig = jaxplain.integrated_gradients(pooled, x, 2, method="exact", baseline=base)
    want = jaxplain.integrated_gradients(written, x, 2, method="exact", baseline=base)
    np.testing.assert_allclose(ig, want, rtol=1e-9, atol=1e-12)
    delta = np.asarray(pooled(x)[:, 2] - pooled(base)[:, 2])
    np.testing.assert_allclose(np.asarray(ig).sum((1, 2, 3)), delta, rtol=1e-10)
    bp = _exact_ig.breakpoints(pooled, x[:1], base[:1])
    assert len(bp) > 3
    np.testing.assert_allclose(bp, _exact_ig.breakpoints(written, x[:1], base[:1]),
                               atol=1e-12)



def test_layer_conductance_equals_a_hand_loop_and_sums_to_ig():
  """Conductance of the units of a hidden conv layer: a Python loop over Gauss-Legendre
  nodes (scipy's) with jax.jvp of the network up to the layer written in jnp and jax.grad of
  the rest; summed over the units it equals IG's total at the same nodes."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(3, (3, 3), name="c1")(x))
      h = nn.relu(nn.Conv(4, (3, 3), name="c2")(h))
      return nn.Dense(3, name="head")(h.mean((1, 2)))

  x = jax.random.normal(jax.random.key(3), (2, 5, 5, 2))
  v = Net().init(jax.random.key(0), x)
  p = v["params"]
  conv = lambda z, q: jax.lax.conv_general_dilated(
      z, q["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + \
      q["bias"][None, None, None]
  upto = lambda z: conv(z, p["c1"])
  rest = lambda y: jax.nn.relu(conv(jax.nn.relu(y), p["c2"])).mean((1, 2)) @ \
      p["head"]["kernel"] + p["head"]["bias"][None]
  t = jnp.array([2, 0])
  base = jnp.full_like(x, 0.1)
  a, w = scipy.special.roots_legendre(12)
  a, w = (a + 1) / 2, w / 2

  @jax.jit
  def node(ak):
    y, y_dot = jax.jvp(upto, (base + ak * (x - base),), (x - base,))
    dy = jax.grad(lambda yy: jnp.take_along_axis(rest(yy), t[:, None], 1).sum())(y)
    return dy * y_dot

  want = sum(wk * np.asarray(node(jnp.float32(ak)), np.float64) for ak, wk in zip(a, w))
  m = jaxplain.wrap(Net(), v)
  for chunk in (5, None):
    got = jax.jit(lambda z, c=chunk: jaxplain.layer_conductance(
        m, z, t, "c1", baseline=base, steps=12, chunk=c))(x)
    assert got.shape == (2, 5, 5, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  ig = jaxplain.integrated_gradients(m, x, t, baseline=base, steps=12)
  np.testing.assert_allclose(np.asarray(got).sum((1, 2, 3)), np.asarray(ig).sum((1, 2, 3)),
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="class index out of range"):
    jaxplain.layer_conductance(m, x, 7, "c1")
