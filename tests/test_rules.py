"""Tests of the modified-backprop engine (jaxplain.rules): WBP, LRP-epsilon, DeepLIFT.

Every expected value is an independent computation: jax.grad, a layer-by-layer NumPy
recursion written out here, finite differences, or a conservation identity.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from jaxplain import rules
from jaxplain.models import BasicBlock, max_pool_2x2

RNG = np.random.default_rng(0)


def J(method, f, x, t, **kw):
  """``method(f, x, t)`` under one jax.jit (one compile instead of op-by-op dispatch)."""
  return jax.jit(lambda x, t: method(f, x, t, **kw))(x, jnp.asarray(t))


def _grad_x_input(f, x, t):
  def obj(x):
    return jnp.sum(jnp.take_along_axis(f(x), t[:, None], axis=1))
  return jax.grad(obj)(x) * x


# ------------------------------------------------------------------------------------------
# WBP


class _ReluBNCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(x))
    x = max_pool_2x2(x)                               # ours: stop-gradient routing mask
    x = nn.Conv(6, (3, 3), use_bias=False, name="conv2")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))        # flax: reduce_window_max
    # average pooling as reduce_window_sum / 4 (nn.avg_pool divides by an int, which strict
    # dtype promotion rejects)
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(7, name="fc1")(x))
    return nn.Dense(5, name="fc2")(x)


def _random_bn_stats(variables, key):
  """Non-trivial inference statistics and BN affine parameters."""
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(key, len(leaves))
  new = [jnp.abs(jax.random.normal(k, l.shape)) + 0.5 if l.ndim == 1 else l
         for k, l in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(tree, new)


def test_wbp_equals_gradient_x_input_relu_cnn_maxpool_batchnorm():
  model = _ReluBNCNN()
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 2))
  variables = _random_bn_stats(model.init(jax.random.key(1), x), jax.random.key(2))
  f = lambda x: model.apply(variables, x)
  t = jnp.array([0, 3, 4])
  s = J(rules.wbp, f, x, t)
  expected = _grad_x_input(f, x, t)
  assert s.shape == x.shape
  assert float(jnp.abs(expected).max()) > 1e-3
  np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-6)


def _mlp_params(sizes, key, dtype=jnp.float64, bias=True):
  ps = []
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    k1, k2, key = jax.random.split(jax.random.fold_in(key, i), 3)
    w = jax.random.normal(k1, (a, b), dtype) / np.sqrt(a)
    bb = 0.3 * jax.random.normal(k2, (b,), dtype) if bias else jnp.zeros((b,), dtype)
    ps.append((w, bb))
  return ps


def _mlp(params, act):
  def f(x):
    for w, b in params[:-1]:
      x = act(x @ w + b[None])
    w, b = params[-1]
    return x @ w + b[None]
  return f


def _np_gelu_tanh(v):
  return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))


def _np_gelu_erf(v):
  from math import erf
  return 0.5 * v * (1 + np.vectorize(erf)(v / np.sqrt(2)))


def _np_silu(v):
  return v / (1 + np.exp(-v))


def _table1_recursion(params, x, t, g):
  """Seed 004 Table 1 by hand: W~L = e_t; activation W~l = h(v) o W~(l+1) with
  h(v) = g(v) / v; FC layer W~l = W~(l+1) W_l (bias omitted); s = W~0 * x."""
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    # forward, keeping the pre-activations v_l
    a, vs = x[b], []
    for w, bias in params[:-1]:
      v = a @ w + bias
      vs.append(v)
      a = g(v)
    w_tilde = np.asarray(params[-1][0])[:, t[b]]        # W~ at the last hidden activation
    for (w, _), v in zip(reversed(params[:-1]), reversed(vs)):
      w_tilde = g(v) / v * w_tilde                       # activation layer: h o W~
      w_tilde = np.asarray(w) @ w_tilde                  # FC layer: W~(l+1) W_l
    out[b] = w_tilde * x[b]
  return out


@pytest.mark.parametrize("act,np_act", [
    (jnp.tanh, np.tanh),
    (jax.nn.gelu, _np_gelu_tanh),                       # inlined: an elementwise sub-graph
    (lambda v: jax.nn.gelu(v, approximate=False), _np_gelu_erf),
    (jax.nn.silu, _np_silu),                            # a jitted elementwise call
], ids=["tanh", "gelu_tanh", "gelu_erf", "silu"])
def test_wbp_matches_table1_recursion(act, np_act):
  with jax.enable_x64(True):
    params = _mlp_params([5, 6, 4, 3], jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (4, 5), jnp.float64)
    t = np.array([0, 1, 2, 1])
    s = J(rules.wbp, _mlp(params, act), x, jnp.asarray(t))
    expected = _table1_recursion(jax.tree.map(np.asarray, params), np.asarray(x), t, np_act)
    np.testing.assert_allclose(np.asarray(s), expected, rtol=1e-9, atol=1e-12)
    # and it is not gradient x input (the rules differ for a smooth g)
    gxi = _grad_x_input(_mlp(params, act), x, jnp.asarray(t))
    assert float(jnp.abs(gxi - s).max()) > 1e-3


def test_wbp_sigmoid_drops_g0_like_a_bias():
  """g(0) != 0: h(v) = (g(v) - g(0)) / v (documented choice)."""
  with jax.enable_x64(True):
    params = _mlp_params([4, 5, 2], jax.random.key(5))
    x = jax.random.normal(jax.random.key(6), (3, 4), jnp.float64)
    t = np.array([1, 0, 1])
    s = J(rules.wbp, _mlp(params, jax.nn.sigmoid), x, jnp.asarray(t))
    (w1, b1), (w2, _) = jax.tree.map(np.asarray, params)
    v = np.asarray(x) @ w1 + b1
    h = (1 / (1 + np.exp(-v)) - 0.5) / v
    expected = np.stack([(w1 @ (h[b] * w2[:, t[b]])) for b in range(3)]) * np.asarray(x)
    np.testing.assert_allclose(np.asarray(s), expected, rtol=1e-9)


def test_wbp_relu_limit_at_zero_matches_gradient():
  # v == 0 exactly in some hidden units: h(0) = relu'(0) = 0 like jax.grad
  w1 = jnp.array([[1., -1., 0.], [1., 1., 0.]])
  w2 = jnp.array([[1., 2.], [3., 4.], [5., 6.]])
  f = lambda x: jax.nn.relu(x @ w1) @ w2
  x = jnp.array([[1., -1.], [2., 0.5]])
  t = jnp.array([0, 1])
  np.testing.assert_allclose(J(rules.wbp, f, x, t), _grad_x_input(f, x, t), atol=1e-7)


def test_softmax_and_log_softmax_at_the_output_are_explained_as_given():
  """One convention with jaxplain.gradient: f's output is explained as given, the trailing
  normalisation differentiated exactly (so wbp(softmax o g) = wbp(g, output='softmax'))."""
  from jaxplain import gradients
  params = _mlp_params([4, 5, 3], jax.random.key(7), jnp.float32)
  g = _mlp(params, jnp.tanh)
  x = jax.random.normal(jax.random.key(8), (2, 4))
  for post, out in ((jax.nn.softmax, "softmax"), (jax.nn.log_softmax, "log_softmax")):
    ref = J(rules.wbp, g, x, 2, output=out)
    np.testing.assert_allclose(J(rules.wbp, lambda x: post(g(x)), x, 2), ref, rtol=1e-5,
                               atol=1e-7)
    jitted = jax.jit(lambda x: post(g(x)))                # softmax hidden inside one jit call
    np.testing.assert_allclose(J(rules.wbp, jitted, x, 2), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(J(rules.lrp, lambda x: post(g(x)), x, 2),
                               J(rules.lrp, g, x, 2, output=out), rtol=1e-5, atol=1e-7)
  # on a ReLU net WBP is gradient x input, also through a softmax head
  h = _mlp(params, jax.nn.relu)
  fs = lambda x: jax.nn.softmax(h(x))
  np.testing.assert_allclose(J(rules.wbp, fs, x, 1),
                             jax.jit(lambda x: gradients.gradient_x_input(fs, x, 1))(x),
                             rtol=1e-5, atol=1e-7)


def test_wbp_param_gradient_matches_finite_differences():
  """d/dtheta of a scalar function of the WBP map (PPI's second-order gradient)."""
  with jax.enable_x64(True):
    params = _mlp_params([3, 4, 2], jax.random.key(9))
    x = jax.random.normal(jax.random.key(10), (2, 3), jnp.float64)
    t = jnp.array([0, 1])

    def loss(params):
      s = J(rules.wbp, _mlp(params, jnp.tanh), x, t)
      return jnp.sum(jnp.sin(3.0 * s)) + jnp.sum(jnp.abs(s))

    g = jax.jit(jax.grad(loss))(params)
    jloss = jax.jit(loss)
    flat, unravel = ravel_pytree(params)
    gflat, _ = ravel_pytree(g)
    eps = 1e-6
    fd = np.array([(jloss(unravel(flat.at[i].add(eps))) - jloss(unravel(flat.at[i].add(-eps))))
                   / (2 * eps) for i in range(flat.size)])
    np.testing.assert_allclose(np.asarray(gflat), fd, rtol=1e-6, atol=1e-8)


def test_jit_vmap_and_per_example_targets():
  params = _mlp_params([4, 5, 3], jax.random.key(11), jnp.float32)
  f = _mlp(params, jnp.tanh)
  x = jax.random.normal(jax.random.key(12), (3, 4))
  t = jnp.array([2, 0, 1])
  eager = rules.wbp(f, x, t)
  np.testing.assert_allclose(J(rules.wbp, f, x, t), eager,
                             rtol=1e-5, atol=1e-7)
  for b in range(3):  # per-example targets == one example at a time
    np.testing.assert_allclose(eager[b], J(rules.wbp, f, x[b:b + 1], int(t[b]))[0],
                               rtol=1e-5, atol=1e-7)
  # vmap over a stack of parameter sets (as a sweep over models would)
  stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
  out = jax.jit(jax.vmap(lambda p: rules.lrp(_mlp(p, jnp.tanh), x, t, epsilon=0.01)))(stacked)
  for i, scale in enumerate((1., 2.)):
    p = jax.tree.map(lambda a: scale * a, params)
    np.testing.assert_allclose(out[i], J(rules.lrp, _mlp(p, jnp.tanh), x, t, epsilon=0.01),
                               rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="target"):
    rules.wbp(f, x, jnp.array([0, 1]))
  with pytest.raises(ValueError, match=r"target: class index out of range \[0, 3\)"):
    rules.wbp(f, x, 3)
  with pytest.raises(ValueError, match="x: expected a batched array"):
    rules.wbp(f, x[0], 0)


# ------------------------------------------------------------------------------------------
# same model in linen, NNX and plain JAX


class _LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), padding="SAME", name="conv")(x))
    x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.gelu(nn.Dense(6, name="fc1")(x))
    return nn.Dense(4, name="fc2")(x)


class _NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 3, (3, 3), padding="SAME", rngs=rngs)
    self.fc1 = nnx.Linear(3 * 4 * 4, 6, rngs=rngs)
    self.fc2 = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x):
    x = max_pool_2x2(nnx.relu(self.conv(x)))
    x = x.reshape(x.shape[0], -1)
    return self.fc2(nnx.gelu(self.fc1(x)))


def test_linen_nnx_and_plain_function_give_identical_maps():
  x = jax.random.normal(jax.random.key(13), (2, 8, 8, 2))
  v = _LinenNet().init(jax.random.key(14), x)["params"]
  f_linen = lambda x: _LinenNet().apply({"params": v}, x)
  m = _NNXNet(nnx.Rngs(0))
  m.conv.kernel[...] = v["conv"]["kernel"]
  m.conv.bias[...] = v["conv"]["bias"]
  for name in ("fc1", "fc2"):
    getattr(m, name).kernel[...] = v[name]["kernel"]
    getattr(m, name).bias[...] = v[name]["bias"]
  f_nnx = lambda x: m(x)

  def f_plain(x):
    y = jax.lax.conv_general_dilated(x, v["conv"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jnp.maximum(y + v["conv"]["bias"][None, None, None], 0.0)  # relu as a bare max
    y = jnp.max(y.reshape(2, 4, 2, 4, 2, 3), axis=(2, 4))  # max-pool as reduce_max
    y = y.reshape(2, -1)
    y = jax.nn.gelu(y @ v["fc1"]["kernel"] + v["fc1"]["bias"][None])
    return y @ v["fc2"]["kernel"] + v["fc2"]["bias"][None]

  t = jnp.array([1, 3])
  np.testing.assert_allclose(f_nnx(x), f_linen(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f_plain(x), f_linen(x), rtol=1e-5, atol=1e-6)
  ref = J(rules.wbp, f_linen, x, t)
  assert float(jnp.abs(ref).max()) > 1e-3
  np.testing.assert_allclose(J(rules.wbp, f_nnx, x, t), ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(J(rules.wbp, f_plain, x, t), ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(J(rules.lrp, f_plain, x, t, epsilon=0.01),
                             J(rules.lrp, f_linen, x, t, epsilon=0.01), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# DeepLIFT


def test_deeplift_zero_reference_equals_wbp_on_bias_free_tanh_net():
  with jax.enable_x64(True):
    params = _mlp_params([5, 6, 4, 3], jax.random.key(15), bias=False)
    f = _mlp(params, jnp.tanh)
    x = jax.random.normal(jax.random.key(16), (3, 5), jnp.float64)
    t = jnp.array([0, 2, 1])
    np.testing.assert_allclose(J(rules.deeplift, f, x, t), J(rules.wbp, f, x, t), rtol=1e-10)
    # with biases the two differ (reference activations are no longer 0)
    fb = _mlp(_mlp_params([5, 6, 4, 3], jax.random.key(15)), jnp.tanh)
    assert float(jnp.abs(J(rules.deeplift, fb, x, t) - J(rules.wbp, fb, x, t)).max()) > 1e-3


def test_deeplift_summation_to_delta_relu_net_with_biases():
  with jax.enable_x64(True):
    params = _mlp_params([6, 8, 8, 4], jax.random.key(17))
    f = _mlp(params, jax.nn.relu)
    x = jax.random.normal(jax.random.key(18), (4, 6), jnp.float64)
    ref = 0.5 * jax.random.normal(jax.random.key(19), (1, 6), jnp.float64)
    t = jnp.array([0, 1, 2, 3])
    a = J(rules.deeplift, f, x, t, reference=ref)
    delta = jnp.take_along_axis(f(x) - f(jnp.broadcast_to(ref, x.shape)), t[:, None], 1)[:, 0]
    np.testing.assert_allclose(a.sum(axis=1), delta, rtol=1e-9, atol=1e-12)
    # a reference per example (its pass at batch B; the one above runs on one row)
    refs = 0.5 * jax.random.normal(jax.random.key(20), (4, 6), jnp.float64)
    delta_b = jnp.take_along_axis(f(x) - f(refs), t[:, None], 1)[:, 0]
    np.testing.assert_allclose(J(rules.deeplift, f, x, t, reference=refs).sum(axis=1),
                               delta_b, rtol=1e-9, atol=1e-12)
    # the multipliers are not the gradient: gradient x (x - ref) misses the delta
    g = _grad_x_input(f, x, t) / x * (x - ref)
    assert float(jnp.abs(g.sum(axis=1) - delta).max()) > 1e-3
    with pytest.raises(ValueError, match="reference"):
      J(rules.deeplift, f, x, t, reference=jnp.zeros((3, 6)))


# ------------------------------------------------------------------------------------------
# LRP


def _np_lrp_eps(params, x, t, eps):
  """Epsilon rule layer by layer: R_L = e_t * z_L; R_in = a * W (R / (z + eps sign z))."""
  out = np.zeros_like(x)
  stab = lambda z: z + eps * np.where(z >= 0, 1.0, -1.0)
  for b in range(x.shape[0]):
    acts, zs, a = [], [], x[b]
    for i, (w, bias) in enumerate(params):
      acts.append(a)
      z = a @ w + bias
      zs.append(z)
      a = np.maximum(z, 0) if i < len(params) - 1 else z
    rel = np.zeros_like(zs[-1])
    rel[t[b]] = zs[-1][t[b]]
    for (w, _), a, z in zip(reversed(params), reversed(acts), reversed(zs)):
      rel = a * (w @ (rel / stab(z)))                  # relu passes relevance unchanged
    out[b] = rel
  return out


def test_lrp_epsilon_matches_hand_computation_dense_relu_with_biases():
  with jax.enable_x64(True):
    params = _mlp_params([6, 7, 5, 3], jax.random.key(20))
    x = jax.random.normal(jax.random.key(21), (4, 6), jnp.float64)
    t = np.array([0, 1, 2, 0])
    for eps in (1e-9, 0.1, 1.0):
      r = J(rules.lrp, _mlp(params, jax.nn.relu), x, jnp.asarray(t), epsilon=eps)
      expected = _np_lrp_eps(jax.tree.map(np.asarray, params), np.asarray(x), t, eps)
      np.testing.assert_allclose(np.asarray(r), expected, rtol=1e-9, atol=1e-12)


class _SkipNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="stem")(x))
    x = BasicBlock(4, name="block")(x)                   # identity skip: relu(x + F(x))
    x = BasicBlock(6, strides=2, name="block2")(x)       # projected skip
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(3, use_bias=False, name="head")(x)


def test_lrp_relevance_conserved_through_resnet_skip_connections():
  with jax.enable_x64(True):
    model = _SkipNet()
    x = jax.random.normal(jax.random.key(22), (2, 8, 8, 2), jnp.float64)
    variables = model.init(jax.random.key(23), x.astype(jnp.float32))  # f64 params below
    # inference batch norm as a pure scale (zero mean, zero shift): no bias anywhere
    variables = jax.tree_util.tree_map_with_path(
        lambda p, a: (jnp.zeros_like(a) if p[-1].key in ("mean", "bias") else
                      jnp.abs(jax.random.normal(jax.random.key(len(str(p))), a.shape,
                                                a.dtype)) + 0.5 if p[-1].key in ("var", "scale")
                      else a).astype(jnp.float64), variables)
    f = lambda x: model.apply(variables, x)
    t = jnp.array([0, 2])
    r = J(rules.lrp, f, x, t, epsilon=0.0)
    logit = jnp.take_along_axis(f(x), t[:, None], 1)[:, 0]
    np.testing.assert_allclose(r.sum(axis=(1, 2, 3)), logit, rtol=1e-9)
    # with biases (BN shift) the relevance absorbed by them is no longer conserved
    vb = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.5 if p[-1].key == "bias" else a, variables)
    fb = lambda x: model.apply(vb, x)
    rb = J(rules.lrp, fb, x, t, epsilon=0.0)
    lb = jnp.take_along_axis(fb(x), t[:, None], 1)[:, 0]
    assert float(jnp.abs(rb.sum(axis=(1, 2, 3)) - lb).max()) > 1e-4


# ------------------------------------------------------------------------------------------
# errors


def test_unsupported_primitive_raises_a_clear_error():
  w = jnp.ones((3, 2))
  x = jnp.ones((2, 3))
  with pytest.raises(rules.UnsupportedPrimitiveError, match="primitive 'cumlogsumexp'"):
    J(rules.lrp, lambda x: jax.lax.cumlogsumexp(x @ w, axis=1), x, 0)
  with pytest.raises(rules.UnsupportedPrimitiveError, match="primitive 'cumprod'"):
    J(rules.wbp, lambda x: jnp.cumprod(x @ w, axis=1), x, 0)


def test_wbp_where_g0_is_not_finite_uses_g_over_v():
  """log has g(0) = -inf: the spec's literal h(v) = g(v) / v, not (g(v) - g(0)) / v = inf."""
  with jax.enable_x64(True):
    w1 = jax.random.uniform(jax.random.key(11), (4, 5), jnp.float64)
    w2 = jax.random.normal(jax.random.key(12), (5, 3), jnp.float64)
    f = lambda x: jnp.log(x @ w1 + 0.5) @ w2
    x = jax.random.uniform(jax.random.key(13), (3, 4), jnp.float64)
    t = np.array([0, 2, 1])
    s = J(rules.wbp, f, x, jnp.asarray(t))
    xn, w1n, w2n = (np.asarray(a) for a in (x, w1, w2))
    v = xn @ w1n + 0.5
    expected = np.stack([w1n @ (np.log(v[b]) / v[b] * w2n[:, t[b]]) for b in range(3)]) * xn
    np.testing.assert_allclose(np.asarray(s), expected, rtol=1e-9)
  # logsumexp pooling (log of a sum of exponentials) in a classifier: a finite map
  w = jax.random.normal(jax.random.key(14), (6, 8))
  g = lambda x: jax.nn.logsumexp((x @ w).reshape(-1, 4, 2), axis=-1)
  m = rules.wbp(g, jax.random.normal(jax.random.key(15), (5, 6)), 1)
  assert bool(jnp.all(jnp.isfinite(m))) and float(jnp.abs(m).max()) > 1e-3


def test_sort_and_top_k_route_like_max_pooling():
  # sort / top_k move values: in a bias-free ReLU network through them WBP and the z-rule
  # equal gradient x input, as through max pooling
  w1 = jax.random.normal(jax.random.key(16), (6, 8))
  w2 = jax.random.normal(jax.random.key(17), (11, 3))

  def f(x):
    h = jax.nn.relu(x @ w1)
    top = jax.lax.top_k(h, 3)[0]
    return jnp.concatenate([jnp.sort(h, axis=1), top], axis=1) @ w2

  x = jax.random.normal(jax.random.key(18), (4, 6))
  t = jnp.array([0, 1, 2, 1])
  expected = _grad_x_input(f, x, t)
  assert float(jnp.abs(expected).max()) > 1e-3
  np.testing.assert_allclose(rules.wbp(f, x, t), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rules.lrp(f, x, t, epsilon=1e-9), expected, rtol=1e-4, atol=1e-5)


def test_stack_unstack_and_split_are_linear_structure():
  # jax 0.10 binds jnp.stack / unstack / split as primitives of their own: routed like
  # concatenate and slicing (a ReLU network through them: WBP = gradient x input)
  w1 = jax.random.normal(jax.random.key(7), (6, 6))
  w2 = jax.random.normal(jax.random.key(8), (12, 3))

  def f(x):
    a, b = jnp.split(jax.nn.relu(x @ w1), 2, axis=1)
    s = jnp.stack([a, jax.nn.relu(b)], axis=1)                  # (B, 2, 3)
    u, v = jnp.unstack(s, axis=1)
    return jnp.concatenate([u, v, jax.nn.relu(u - v), u + v], axis=1) @ w2

  assert {"stack", "unstack", "split"} <= {
      e.primitive.name for e in jax.make_jaxpr(f)(jnp.ones((1, 6))).jaxpr.eqns}
  x = jax.random.normal(jax.random.key(9), (4, 6))
  t = jnp.array([0, 1, 2, 1])
  expected = _grad_x_input(f, x, t)
  assert float(jnp.abs(expected).max()) > 1e-3
  np.testing.assert_allclose(rules.wbp(f, x, t), expected, rtol=1e-5, atol=1e-6)
  lrp = rules.lrp(f, x, t, epsilon=1e-9)  # bias-free ReLU network: z-rule = gradient x input
  np.testing.assert_allclose(lrp, expected, rtol=1e-4, atol=1e-5)


def test_a_custom_jvp_routing_function_is_differentiated_by_its_own_rule():
  # a custom_jvp whose body only moves / selects values (max_pool_2x2's form) gets its exact
  # JVP, which is its custom rule: the maps follow jax.grad, which uses the same rule. The rule
  # here deliberately differs from the body's derivative, so reading the body would fail.
  @jax.custom_jvp
  def route(v):
    return jnp.where(v > 0, v, v[:, ::-1])

  route.defjvp(lambda p, t: (route(p[0]), 2.0 * t[0]))
  w = jax.random.normal(jax.random.key(3), (5, 4))
  f = lambda x: route(jax.nn.relu(x @ w.T).reshape(x.shape[0], 5)) @ w
  x = jax.random.normal(jax.random.key(4), (3, 4))
  t = jnp.array([0, 3, 1])
  expected = _grad_x_input(f, x, t)
  assert float(jnp.abs(expected).max()) > 1e-3
  np.testing.assert_allclose(rules.wbp(f, x, t), expected, rtol=1e-5, atol=1e-6)
  body_derivative = _grad_x_input(lambda x: jnp.where(
      x @ w.T > 0, jax.nn.relu(x @ w.T), jax.nn.relu(x @ w.T)[:, ::-1]) @ w, x, t)
  assert float(jnp.abs(body_derivative - expected).max()) > 1e-3


def test_a_custom_vjp_activation_gets_the_rules_of_the_same_builtin():
  """A user's leaky ReLU written as a jax.custom_vjp has no forward mode: WBP, DeepLIFT and
  guided backprop raised "can't apply forward-mode autodiff (jvp) to a custom_vjp function".
  Its slope now comes from its VJP; the maps equal those of jax.nn.leaky_relu."""
  @jax.custom_vjp
  def leaky(v):
    return jnp.where(v > 0, v, 0.1 * v)

  leaky.defvjp(lambda v: (leaky(v), v), lambda v, g: (g * jnp.where(v > 0, 1.0, 0.1),))
  w1 = jax.random.normal(jax.random.key(5), (4, 6))
  w2 = jax.random.normal(jax.random.key(6), (6, 3))
  b1 = 0.3 * jax.random.normal(jax.random.key(7), (6,))
  net = lambda act: lambda x: act(x @ w1 + b1[None]) @ w2  # noqa: E731
  x = jax.random.normal(jax.random.key(8), (5, 4))
  t = jnp.array([0, 2, 1, 1, 0])
  builtin = net(lambda v: jax.nn.leaky_relu(v, 0.1))
  for method in (rules.wbp, rules.deeplift, rules.guided_backprop, rules.deconvnet,
                 rules.lrp):
    want = method(builtin, x, t)
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(method(net(leaky), x, t), want, rtol=1e-5, atol=1e-6,
                               err_msg=method.__name__)
