"""LRP layer rules, composites, guided backprop / deconvnet and several targets per call.

Every expected value is an independent computation: each rule's equation written out in
NumPy on an explicit weight matrix (a convolution is turned into its matrix by loops),
jax.grad of the same network with the ReLU backward replaced by a custom_vjp, or a Python
loop over classes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxplain import gradients, rules

STAB = 1e-6


def J(method, f, x, t, **kw):
  return jax.jit(lambda x: method(f, x, t, **kw))(x)


# ------------------------------------------------------------------------------------------
# NumPy: each rule's equation on an explicit matrix M (n_in, n_out) with bias b (n_out,)


def _stab(z, eps):
  return z + eps * np.where(z >= 0, 1.0, -1.0)


def _np_rule(rule, x, M, b, R, low=None, high=None):
  """R_in = sum_k c_jk R_k with the contributions c_jk of ``rule`` (SPEC.md section 8)."""
  p, n = (lambda a: np.maximum(a, 0)), (lambda a: np.minimum(a, 0))
  xj = x[:, None]
  if rule == "epsilon":
    C, den = xj * M, x @ M + b
  elif rule == "zplus":
    C = p(xj) * p(M) + n(xj) * n(M)
    den = C.sum(0) + p(b)
  elif rule in ("alphabeta", "gamma"):
    if rule == "alphabeta":
      P, N = p(xj) * p(M) + n(xj) * n(M), p(xj) * n(M) + n(xj) * p(M)
      return (2 * P @ (R / _stab(P.sum(0) + p(b), STAB))
              - 1 * N @ (R / _stab(N.sum(0) + n(b), STAB)))
    g = 0.25
    z = x @ M + b
    Cp = p(xj) * (M + g * p(M)) + n(xj) * (M + g * n(M))
    Cn = p(xj) * (M + g * n(M)) + n(xj) * (M + g * p(M))
    Rp = np.where(z > 0, R / _stab(Cp.sum(0) + b + g * p(b), STAB), 0.0)
    Rn = np.where(z < 0, R / _stab(Cn.sum(0) + b + g * n(b), STAB), 0.0)
    return Cp @ Rp + Cn @ Rn
  elif rule == "flat":
    C = (M != 0).astype(float) * np.ones_like(xj)
    den = C.sum(0)
  elif rule == "wsquare":
    C = M ** 2 * np.ones_like(xj)
    den = C.sum(0)
  elif rule == "zbox":
    C = xj * M - low[:, None] * p(M) - high[:, None] * n(M)
    den = C.sum(0)
  else:
    raise ValueError(rule)
  eps = 1e-3 if rule == "epsilon" else STAB
  return C @ (R / _stab(den, eps))


def _conv_matrix(w, h, wd):
  """(h*wd*c, h*wd*o) matrix of a stride-1 SAME convolution, NHWC / HWIO, by loops."""
  kh, kw, c, o = w.shape
  M = np.zeros((h, wd, c, h, wd, o))
  for i in range(h):
    for j in range(wd):
      for di in range(kh):
        for dj in range(kw):
          ii, jj = i + di - kh // 2, j + dj - kw // 2
          if 0 <= ii < h and 0 <= jj < wd:
            M[ii, jj, :, i, j, :] += w[di, dj]
  return M.reshape(h * wd * c, h * wd * o)


def _pool_matrix(h, wd, c):
  """2x2 stride-2 average pooling as a matrix."""
  M = np.zeros((h, wd, c, h // 2, wd // 2, c))
  for i in range(h):
    for j in range(wd):
      for k in range(c):
        M[i, j, k, i // 2, j // 2, k] = 0.25
  return M.reshape(h * wd * c, (h // 2) * (wd // 2) * c)


def _np_lrp(layers, x, t, low=None, high=None):
  """Layer by layer: layers = [(rule, M, b, relu_after)], relevance of the target logit."""
  acts, zs, a = [], [], x
  for _, M, b, relu in layers:
    acts.append(a)
    z = a @ M + b
    zs.append(z)
    a = np.maximum(z, 0) if relu else z
  R = np.zeros_like(zs[-1])
  R[t] = zs[-1][t]
  for (rule, M, b, _), a in zip(reversed(layers), reversed(acts)):
    R = _np_rule(rule, a, M, b, R, low, high)  # relu passes relevance unchanged
  return R


RULES = {"epsilon": rules.Epsilon(1e-3), "zplus": rules.ZPlus(), "alphabeta":
         rules.AlphaBeta(2.0, 1.0), "gamma": rules.Gamma(0.25), "flat": rules.Flat(),
         "wsquare": rules.WSquare()}


def _rand(key, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(key), shape, jnp.float64)


NAMES = list(RULES) + ["zbox"]


def _all_rules(f, x, t, kind, low, high):
  """One jit: the map of each rule at the first (dense) / conv layer, dense epsilon above."""
  def maps(x):
    out = []
    for name in NAMES:
      rule = rules.ZBox(low, high) if name == "zbox" else RULES[name]
      comp = (rules.Composite(dense=rules.Epsilon(1e-3), first=rule) if kind == "dense" else
              rules.Composite(dense=rules.Epsilon(1e-3), conv=rule))
      out.append(rules.lrp(f, x, t, composite=comp))
    return out
  return dict(zip(NAMES, jax.jit(maps)(x)))


def test_each_rule_on_a_dense_layer_matches_numpy():
  with jax.enable_x64(True):
    w1, b1 = _rand(0, (5, 6)), _rand(1, (6,), 0.5)
    w2, b2 = _rand(2, (6, 3)), _rand(3, (3,), 0.5)
    x = _rand(4, (3, 5))
    f = lambda x: jax.nn.relu(x @ w1 + b1[None]) @ w2 + b2[None]
    low, high = -2.0 * jnp.ones(5), 2.0 + jnp.arange(5.0)
    t = jnp.array([0, 2, 1])
    got = _all_rules(f, x, t, "dense", low, high)
    for name in NAMES:
      np_layers = [(name, np.asarray(w1), np.asarray(b1), True),
                   ("epsilon", np.asarray(w2), np.asarray(b2), False)]
      for b in range(3):
        want = _np_lrp(np_layers, np.asarray(x[b]), int(t[b]), np.asarray(low),
                       np.asarray(high))
        np.testing.assert_allclose(np.asarray(got[name][b]), want, rtol=1e-8, atol=1e-12,
                                   err_msg=name)
      assert float(jnp.abs(got[name]).max()) > 1e-3


def test_each_rule_on_a_conv_layer_matches_numpy():
  with jax.enable_x64(True):
    h = wd = 4
    w1, b1 = _rand(5, (3, 3, 2, 3)), _rand(6, (3,), 0.5)
    w2, b2 = _rand(7, (h * wd * 3, 2)), _rand(8, (2,), 0.5)
    x = _rand(9, (2, h, wd, 2))

    def f(x):
      y = jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = y + b1[None, None, None]
      return jax.nn.relu(y).reshape(x.shape[0], -1) @ w2 + b2[None]

    low, high = -3.0 * jnp.ones((h, wd, 2)), 3.0 * jnp.ones((h, wd, 2))
    t = jnp.array([1, 0])
    got = _all_rules(f, x, t, "conv", low, high)
    M = _conv_matrix(np.asarray(w1), h, wd)
    for name in NAMES:
      np_layers = [(name, M, np.tile(np.asarray(b1), h * wd), True),
                   ("epsilon", np.asarray(w2), np.asarray(b2), False)]
      for b in range(2):
        want = _np_lrp(np_layers, np.asarray(x[b]).ravel(), int(t[b]),
                       np.asarray(low).ravel(), np.asarray(high).ravel())
        np.testing.assert_allclose(np.asarray(got[name][b]).ravel(), want, rtol=1e-8,
                                   atol=1e-12, err_msg=name)


@pytest.mark.parametrize("act", ["relu", "neg_relu", "leaky_relu", "abs_maxpool"])
def test_sign_split_rules_after_signed_and_nonnegative_inputs_match_numpy(act):
  """z+, alpha-beta and gamma skip the negative input part when the jaxpr proves the layer
  input >= 0 (a ReLU, |v| then max-pool); other inputs (-1.5 relu(v) <= 0, leaky ReLU)
  keep it. Each against the NumPy equation at the layer input (the steps before it pass
  relevance unchanged)."""
  acts = {"relu": jax.nn.relu, "neg_relu": lambda v: -1.5 * jax.nn.relu(v),
          "leaky_relu": lambda v: jax.nn.leaky_relu(v, 0.2),
          "abs_maxpool": lambda v: jax.lax.reduce_window(jnp.abs(v), -jnp.inf, jax.lax.max,
                                                         (1, 1, 1, 1), (1, 1, 1, 1), "SAME")}
  with jax.enable_x64(True):
    h = wd = 3
    rng = np.random.default_rng(3)  # NumPy draws: no compilation per shape
    w1, b1 = rng.standard_normal((3, 3, 2, 3)), 0.5 * rng.standard_normal(3)
    w2, b2 = rng.standard_normal((h * wd * 3, 2)), 0.5 * rng.standard_normal(2)
    x = jnp.asarray(rng.standard_normal((2, h, wd, 2)))
    g = acts[act]

    def f(x):
      y = jax.lax.conv_general_dilated(g(x), w1, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jax.nn.relu(y + b1[None, None, None]).reshape(x.shape[0], -1) @ w2 + b2[None]

    t = jnp.array([1, 0])
    names = ("zplus", "alphabeta", "gamma")
    got = jax.jit(lambda x: [rules.lrp(f, x, t, composite=rules.Composite(
        dense=rules.Epsilon(1e-3), conv=RULES[n])) for n in names])(x)
    a = np.asarray(g(x))
    assert (a.min() >= 0) == (act in ("relu", "abs_maxpool"))
    M = _conv_matrix(np.asarray(w1), h, wd)
    for name, r in zip(names, got):
      layers = [(name, M, np.tile(np.asarray(b1), h * wd), True),
                ("epsilon", np.asarray(w2), np.asarray(b2), False)]
      for b in range(2):
        want = _np_lrp(layers, a[b].ravel(), int(t[b]))  # relevance at the conv input
        np.testing.assert_allclose(np.asarray(r[b]).ravel(), want, rtol=1e-8, atol=1e-12,
                                   err_msg=f"{act} {name}")


def test_residual_block_does_not_double_relevance():
  with jax.enable_x64(True):
    w1, w2, w3 = _rand(10, (4, 4)), _rand(11, (4, 4)), _rand(12, (4, 2))
    x = _rand(13, (3, 4))
    f = lambda x: jax.nn.relu(jax.nn.relu(x @ w1) @ w2 + x) @ w3   # bias-free, skip
    t = jnp.array([0, 1, 1])
    r = J(rules.lrp, f, x, t, epsilon=0.0)
    np.testing.assert_allclose(r.sum(1), jnp.take_along_axis(f(x), t[:, None], 1)[:, 0],
                               rtol=1e-10)
    # by hand: the sum z = u + x splits R_z into u / z and x / z shares
    for b in range(3):
      xb = np.asarray(x[b])
      a1 = np.maximum(xb @ np.asarray(w1), 0)
      u = a1 @ np.asarray(w2)
      z = u + xb
      a2 = np.maximum(z, 0)
      out = a2 @ np.asarray(w3)
      R = np.zeros(2)
      R[int(t[b])] = out[int(t[b])]
      Rz = a2 * (np.asarray(w3) @ (R / out))
      Ru, Rx = u * Rz / z, xb * Rz / z
      Ra1 = a1 * (np.asarray(w2) @ (Ru / u))
      Rin = xb * (np.asarray(w1) @ (Ra1 / (xb @ np.asarray(w1)))) + Rx
      np.testing.assert_allclose(np.asarray(r[b]), Rin, rtol=1e-8)


# ------------------------------------------------------------------------------------------
# composites on a CNN with batch norm (canonized) and average pooling


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(x))
    # average pooling as a window sum over 4 (nn.avg_pool divides by an int: strict dtypes)
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
    x = nn.Conv(4, (3, 3), name="conv2")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn2")(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(5, name="fc1")(x))
    return nn.Dense(3, name="fc2")(x)


def _bn_merge(conv, bn, hw):
  s = np.asarray(bn["scale"]) / np.sqrt(np.asarray(bn["var"]) + 1e-5)
  M = _conv_matrix(np.asarray(conv["kernel"]), hw, hw) * np.tile(s, hw * hw)
  b = np.tile(s * (np.asarray(conv["bias"]) - np.asarray(bn["mean"])) + np.asarray(
      bn["bias"]), hw * hw)
  return M, b


def test_named_composites_match_a_hand_composed_cnn():
  with jax.enable_x64(True):
    model = _CNN()
    x = jax.random.uniform(jax.random.key(14), (2, 4, 4, 2), jnp.float64)
    v = model.init(jax.random.key(15), x.astype(jnp.float32))   # f64 params below
    v = jax.tree_util.tree_map_with_path(
        lambda p, a: (jax.random.uniform(jax.random.key(len(str(p))), a.shape, jnp.float64,
                                         0.5, 2) if p[-1].key in ("var", "scale") else
                      0.3 * jax.random.normal(jax.random.key(len(str(p)) + 1), a.shape,
                                              jnp.float64)
                      if p[-1].key in ("mean", "bias") else a.astype(jnp.float64)), v)
    f = lambda x: model.apply(v, x)
    t = jnp.array([2, 0])
    names = {"epsilon_plus": ("zplus", "zplus"),
             "epsilon_alpha2_beta1": ("alphabeta", "alphabeta"),
             "epsilon_plus_flat": ("flat", "zplus"),
             "epsilon_gamma_box": ("zbox", "gamma")}
    got = jax.jit(lambda x: [rules.lrp(f, x, t, composite=c, low=0.0, high=1.0)
                             for c in names])(x)
    P, S = v["params"], v["batch_stats"]
    M1, b1 = _bn_merge(P["conv1"], {**P["bn1"], **S["bn1"]}, 4)
    M2, b2 = _bn_merge(P["conv2"], {**P["bn2"], **S["bn2"]}, 2)
    for (composite, (first, conv)), r in zip(names.items(), got):
      layers = [(first, M1, b1, True), ("norm", _pool_matrix(4, 4, 3), np.zeros(12), False),
                (conv, M2, b2, True),
                ("epsilon6", np.asarray(P["fc1"]["kernel"]), np.asarray(P["fc1"]["bias"]),
                 True),
                ("epsilon6", np.asarray(P["fc2"]["kernel"]), np.asarray(P["fc2"]["bias"]),
                 False)]
      for b in range(2):
        want = _np_lrp_named(layers, np.asarray(x[b]).ravel(), int(t[b]))
        np.testing.assert_allclose(np.asarray(r[b]).ravel(), want, rtol=1e-7, atol=1e-12,
                                   err_msg=composite)
      assert float(jnp.abs(r).max()) > 1e-4
    # DeepLIFT on the same network (affine layers, batch norm, ReLU, average pooling): the
    # default zero reference runs its pass on one row; the attributions sum to f(x) - f(0)
    a, fx, f0 = jax.jit(lambda x: (rules.deeplift(f, x, t), f(x), f(jnp.zeros_like(x))))(x)
    delta = np.take_along_axis(np.asarray(fx - f0), np.asarray(t)[:, None], 1)[:, 0]
    np.testing.assert_allclose(np.asarray(a).sum(axis=(1, 2, 3)), delta, rtol=1e-9)


def _np_lrp_named(layers, x, t):
  acts, zs, a = [], [], x
  for _, M, b, relu in layers:
    acts.append(a)
    z = a @ M + b
    zs.append(z)
    a = np.maximum(z, 0) if relu else z
  R = np.zeros_like(zs[-1])
  R[t] = zs[-1][t]
  for (rule, M, b, _), a in zip(reversed(layers), reversed(acts)):
    if rule in ("norm", "epsilon6"):   # Norm / Epsilon(1e-6): the epsilon equation
      R = (a[:, None] * M) @ (R / _stab(a @ M + b, STAB))
    else:
      n = a.size
      R = _np_rule(rule, a, M, b, R, np.zeros(n), np.ones(n))
  return R


def test_composite_by_layer_name_and_errors():
  with jax.enable_x64(True):
    model = _CNN()
    x = jax.random.uniform(jax.random.key(16), (1, 4, 4, 2), jnp.float64)
    v = jax.tree.map(lambda a: a.astype(jnp.float64),
                     model.init(jax.random.key(17), x.astype(jnp.float32)))
    f = lambda x: model.apply(v, x)
    named = rules.Composite(names=((r".*conv1", rules.ZPlus()), (r".*conv2", rules.ZPlus())))
    np.testing.assert_allclose(J(rules.lrp, f, x, 1, composite=named),
                               J(rules.lrp, f, x, 1, composite="epsilon_plus"), rtol=1e-10)
    with pytest.raises(ValueError, match="low, high"):
      rules.lrp(f, x, 1, composite="epsilon_gamma_box")
    with pytest.raises(ValueError, match="composite"):
      rules.lrp(f, x, 1, composite="zplus_everywhere")
    with pytest.raises(ValueError, match="alpha - beta = 1"):
      rules.AlphaBeta(2.0, 2.0)
    # a name pattern that chooses no layer is an error naming it and the layers (it used to
    # leave every layer to its kind's rule, silently), eagerly and under jit
    typo = rules.Composite(names=((r".*conv1", rules.ZPlus()), (r".*cnov2", rules.ZPlus())))
    for call in (rules.lrp, jax.jit(rules.lrp, static_argnums=(0, 2),
                                    static_argnames="composite")):
      with pytest.raises(ValueError, match=r"\['\.\*cnov2'\] match no layer.*conv2"):
        call(f, x, 1, composite=typo)
    w = jnp.ones((32, 3), jnp.float64)
    plain = lambda z: jax.nn.relu(z.reshape(z.shape[0], -1)) @ w      # no name stack
    with pytest.raises(ValueError, match="layers carry no names"):
      rules.lrp(plain, x, 1, composite=rules.Composite(names=(("conv.*", rules.ZPlus()),)))


def test_composite_names_inside_jit_and_scan_bodies_are_the_full_paths():
  """A body's equations carry name stacks relative to the jit / scan equation holding it; the
  engine prepends the enclosing names, so 'outer/fc' chooses the layers inside a jitted call
  and a lax.scan exactly as in the same network written out flat (it matched nothing there)."""
  r = np.random.default_rng(21)
  w0 = jnp.asarray(r.normal(size=(4, 6)), jnp.float32)
  ws = jnp.asarray(r.normal(size=(3, 6, 6)) * 0.5, jnp.float32)
  bs = jnp.asarray(r.normal(size=(3, 6)) * 0.1, jnp.float32)
  wo = jnp.asarray(r.normal(size=(6, 3)), jnp.float32)

  def block(h, w, b):
    with jax.named_scope("fc"):
      return jax.nn.relu(h @ w + b[None])

  def flat(x):
    with jax.named_scope("outer"):
      h = jax.nn.relu(x @ w0)
      for i in range(3):
        h = block(h, ws[i], bs[i])
      return h @ wo

  def jitted(x):
    with jax.named_scope("outer"):
      h = jax.nn.relu(x @ w0)
      for i in range(3):
        h = jax.jit(block)(h, ws[i], bs[i])
      return h @ wo

  def scanned(x):
    with jax.named_scope("outer"):
      h = jax.nn.relu(x @ w0)
      h, _ = jax.lax.scan(lambda h, wb: (block(h, *wb), None), h, (ws, bs))
      return h @ wo

  x = jnp.asarray(r.normal(size=(2, 4)), jnp.float32)
  named = rules.Composite(names=((r"outer/fc", rules.ZPlus()),))
  want = rules.lrp(flat, x, 1, composite=named)
  assert float(jnp.abs(want - rules.lrp(flat, x, 1)).max()) > 1e-3 * float(jnp.abs(want).max())
  for f in (jitted, scanned):
    np.testing.assert_allclose(rules.lrp(f, x, 1, composite=named), want, rtol=1e-5,
                               atol=1e-6, err_msg=f.__name__)


# ------------------------------------------------------------------------------------------
# guided backprop and deconvnet vs a custom_vjp ReLU


def _relu_with_backward(bwd_fn):
  @jax.custom_vjp
  def relu(v):
    return jnp.maximum(v, 0.0)

  relu.defvjp(lambda v: (jnp.maximum(v, 0.0), v), lambda v, g: (bwd_fn(v, g),))
  return relu


@pytest.mark.parametrize("method,bwd", [
    (rules.guided_backprop, lambda v, g: jnp.where((v > 0) & (g > 0), g, 0.0)),
    (rules.deconvnet, lambda v, g: jnp.maximum(g, 0.0)),
], ids=["guided_backprop", "deconvnet"])
def test_guided_backprop_and_deconvnet_match_custom_vjp_relu(method, bwd):
  w1 = jax.random.normal(jax.random.key(18), (3, 3, 2, 4))
  w2 = jax.random.normal(jax.random.key(19), (4 * 4 * 4, 6)) / 8
  w3 = jax.random.normal(jax.random.key(20), (6, 3))

  def net(relu):
    def f(x):
      y = jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = relu(y + 0.1)
      y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
      y = relu(y.reshape(y.shape[0], -1) @ w2 - 0.05)
      return y @ w3
    return f

  x = jax.random.normal(jax.random.key(21), (3, 8, 8, 2))
  t = jnp.array([0, 1, 2])
  custom = _relu_with_backward(bwd)
  want = jax.grad(lambda x: jnp.sum(jnp.take_along_axis(net(custom)(x), t[:, None], 1)))(x)
  got = J(method, net(jax.nn.relu), x, t)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  plain = jax.grad(lambda x: jnp.sum(jnp.take_along_axis(net(jax.nn.relu)(x), t[:, None],
                                                         1)))(x)
  assert float(jnp.abs(plain - want).max()) > 1e-3  # the modification matters here


# ------------------------------------------------------------------------------------------
# several targets per call, output=


def _small_net():
  w1 = jax.random.normal(jax.random.key(22), (5, 7))
  w2 = jax.random.normal(jax.random.key(23), (7, 4))
  return lambda x: jax.nn.relu(x @ w1 + 0.1) @ w2 - 0.2


@pytest.mark.parametrize("method", [rules.wbp, rules.lrp, rules.deeplift,
                                    rules.guided_backprop, rules.deconvnet])
def test_target_all_and_per_example_lists_equal_a_loop(method):
  f = _small_net()
  x = jax.random.normal(jax.random.key(24), (3, 5))
  tt = jnp.array([[3, 0], [1, 1], [2, 0]])
  allm, loop, some, chunked = jax.jit(lambda x: (
      method(f, x, "all"), [method(f, x, k) for k in range(4)],
      method(f, x, tt, target_chunk=1), method(f, x, "all", target_chunk=3)))(x)
  assert allm.shape == (3, 4, 5) and some.shape == (3, 2, 5)
  for k in range(4):
    np.testing.assert_allclose(allm[:, k], loop[k], rtol=1e-5, atol=1e-6)
  for b in range(3):
    for j in range(2):
      np.testing.assert_allclose(some[b, j], loop[int(tt[b, j])][b], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(chunked, allm, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="target"):
    method(f, x, "every")
  with pytest.raises(ValueError, match=r"out of range \[0, 4\)"):
    method(f, x, jnp.array([[0, 4], [0, 0], [0, 0]]))


def test_output_argument_matches_gradient_x_input_on_relu_net():
  f = _small_net()
  x = jax.random.normal(jax.random.key(25), (3, 5))
  t = jnp.array([0, 3, 1])
  got = jax.jit(lambda x: [rules.wbp(f, x, t, output=o) for o in gradients.OUTPUTS])(x)
  want = jax.jit(lambda x: [gradients.gradient_x_input(f, x, t, output=o)
                            for o in gradients.OUTPUTS])(x)
  for o, a, b in zip(gradients.OUTPUTS, got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=o)
  with pytest.raises(ValueError, match="output"):
    rules.wbp(f, x, t, output="probability")
