"""Metrics: deletion/insertion against closed forms and a plain loop, map similarity against
scipy / a NumPy loop, shift invariance on a linear model, and the cascading-randomisation
sanity check on a briefly trained (seeded) model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from sklearn.datasets import load_digits

from jaxplain import metrics


def _linear_model(key, shape, k=3):
  n = int(np.prod(shape[1:]))
  kw, kb = jax.random.split(key)
  w = jax.random.normal(kw, (n, k))
  b = jax.random.normal(kb, (k,))
  f = lambda x: x.reshape(x.shape[0], -1) @ w + b[None]
  return f, np.asarray(w), np.asarray(b)


def test_deletion_true_topk_beats_random_on_linear_model():
  shape = (4, 5, 6, 2)
  f, w, b = _linear_model(jax.random.key(0), shape)
  x = jax.random.normal(jax.random.key(1), shape)
  t = np.array([0, 1, 2, 1])
  # closed form: the contribution of pixel (h, w) to logit t is sum_c W[(h, w, c), t] x[h, w, c]
  contrib = np.stack([(w[:, t[i]].reshape(shape[1:]) * np.asarray(x[i])).sum(-1)
                      for i in range(shape[0])])                              # (B, H, W)
  n = shape[1] * shape[2]
  steps = list(range(n + 1))
  f_jit = jax.jit(metrics.deletion_curve, static_argnums=0,
                  static_argnames=("steps", "reduce", "output"))
  curve = np.asarray(f_jit(f, x, t, contrib, steps=tuple(steps), reduce="sum"))
  score0 = np.asarray(f(x))[np.arange(4), t]
  top = -np.sort(-contrib.reshape(4, -1), axis=1)
  expected = score0[:, None] - np.concatenate([np.zeros((4, 1)), np.cumsum(top, 1)], 1)
  np.testing.assert_allclose(curve, expected, rtol=1e-4, atol=1e-4)
  # the true top-k (the best k-subset for a linear model) drops at least as much as any order
  for i in range(5):
    rnd = np.asarray(f_jit(f, x, t, metrics.random_saliency(jax.random.key(10 + i), x),
                           steps=tuple(steps), reduce="sum"))
    assert np.all(curve <= rnd + 1e-4)
  worst = np.asarray(f_jit(f, x, t, -contrib, steps=tuple(steps), reduce="sum"))
  assert np.all(curve <= worst + 1e-4)
  assert np.mean(curve[:, 1:-1] < worst[:, 1:-1] - 1e-3) > 0.9
  fr = metrics.step_fractions(steps, n)
  rnd_mean = metrics.random_order_curve(f, x, t, key=jax.random.key(3), num_orders=8,
                                        steps=steps)
  assert np.all(np.asarray(metrics.area_under_curve(curve, fr))
                < np.asarray(metrics.area_under_curve(rnd_mean, fr)))
  ins = metrics.insertion_curve(f, x, t, contrib, steps=steps, reduce="sum")
  ins_rnd = metrics.random_order_curve(f, x, t, key=jax.random.key(3), num_orders=8,
                                       steps=steps, kind="insertion")
  assert np.all(np.asarray(metrics.area_under_curve(ins, fr))
                > np.asarray(metrics.area_under_curve(ins_rnd, fr)))


class _TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), name="conv1")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(4, name="fc1")(x)


def _loop_curve(f, x, t, sal, counts, value, insert, output):
  """Plain-Python reference: sort each example's pixels, replace the top k, score."""
  x = np.asarray(x)
  b, h, w, c = x.shape
  out = np.zeros((b, len(counts)))
  for i in range(b):
    order = np.argsort(-sal[i].reshape(-1), kind="stable")
    for j, k in enumerate(counts):
      keep = np.zeros(h * w, bool)
      keep[order[:k]] = True
      keep = keep.reshape(h, w)
      xi = x[i].copy()
      for yy in range(h):
        for xx in range(w):
          if keep[yy, xx] != insert:  # deletion: replace the top k; insertion: all others
            xi[yy, xx, :] = value
      logits = np.asarray(f(jnp.asarray(xi[None])))[0].astype(np.float64)
      if output == "probability":
        logits = np.exp(logits - logits.max())
        logits = logits / logits.sum()
      out[i, j] = logits[t[i]]
  return out


@pytest.mark.parametrize("steps", [[0, 3, 7, 30], [0.0, 0.25, 0.5, 1.0], 3])
def test_curves_match_plain_loop(steps):
  shape = (3, 6, 5, 2)
  model = _TinyCNN()
  params = model.init(jax.random.key(0), jnp.zeros(shape))
  f = lambda x: model.apply(params, x)
  x = jax.random.uniform(jax.random.key(1), shape)
  att = jax.random.normal(jax.random.key(2), shape)
  t = np.array([0, 3, 1])
  value = np.array([0.5, -1.0], np.float32)
  sal = np.abs(np.asarray(att)).sum(-1)
  counts = np.round(metrics.step_fractions(steps, 30) * 30).astype(int)
  for insert, fn in ((False, metrics.deletion_curve), (True, metrics.insertion_curve)):
    got = fn(f, x, t, att, steps=steps, value=value, output="probability")
    ref = _loop_curve(f, x, t, sal, counts, value, insert, "probability")
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    chunked = fn(f, x, t, att, steps=steps, value=value, output="probability", chunk=2)
    np.testing.assert_allclose(np.asarray(chunked), ref, rtol=1e-5, atol=1e-6)


def test_area_under_curve_matches_trapezoid_loop():
  rng = np.random.default_rng(0)
  curve = rng.normal(size=(3, 6))
  fr = np.array([0.0, 0.1, 0.2, 0.4, 0.7, 1.0])
  ref = [sum((fr[j + 1] - fr[j]) * (c[j] + c[j + 1]) / 2 for j in range(5)) for c in curve]
  np.testing.assert_allclose(metrics.area_under_curve(curve, fr), ref, rtol=1e-5)
  part = np.array([0.2, 0.4, 0.6])
  np.testing.assert_allclose(metrics.area_under_curve(np.array([1.0, 3.0, 5.0]), part), 3.0)


def test_bad_inputs_have_clear_errors():
  f, _, _ = _linear_model(jax.random.key(0), (2, 4, 4, 1))
  x = jnp.ones((2, 4, 4, 1))
  with pytest.raises(ValueError, match="saliency"):
    metrics.deletion_curve(f, x, 0, jnp.ones((2, 4, 3)))
  with pytest.raises(ValueError, match="value"):
    metrics.deletion_curve(f, x, 0, x, value=jnp.ones(3))
  with pytest.raises(ValueError, match="fractions must lie"):
    metrics.deletion_curve(f, x, 0, x, steps=[0.0, 1.5])
  with pytest.raises(ValueError, match="counts must lie"):
    metrics.insertion_curve(f, x, 0, x, steps=[0, 17])
  with pytest.raises(ValueError, match="target"):
    metrics.deletion_curve(f, x, jnp.array([0, 1, 2]), x)
  with pytest.raises(ValueError, match="reduce"):
    metrics.pixel_saliency(x, reduce="mean")
  with pytest.raises(ValueError, match="shift"):
    metrics.shift_invariance(f, lambda x, t: x, x, 0, jnp.ones(2))


def _ssim_loop(a, b, window=7, sigma=1.5):
  """NumPy reference SSIM: explicit windows, Gaussian weights, min-max normalised maps."""
  def mm(m):
    return (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)
  r = np.arange(window) - (window - 1) / 2
  g = np.exp(-0.5 * (r / sigma) ** 2)
  wgt = np.outer(g, g) / np.outer(g, g).sum()
  out = []
  for ai, bi in zip(a, b):
    ai, bi = mm(ai), mm(bi)
    vals = []
    for y in range(ai.shape[0] - window + 1):
      for x in range(ai.shape[1] - window + 1):
        pa, pb = ai[y:y + window, x:x + window], bi[y:y + window, x:x + window]
        ma, mb = (wgt * pa).sum(), (wgt * pb).sum()
        va = (wgt * (pa - ma) ** 2).sum()
        vb = (wgt * (pb - mb) ** 2).sum()
        cv = (wgt * (pa - ma) * (pb - mb)).sum()
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        vals.append((2 * ma * mb + c1) * (2 * cv + c2)
                    / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    out.append(np.mean(vals))
  return np.array(out)


def test_similarity_metrics():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(3, 10, 9, 2)).astype(np.float32)
  same = metrics.map_similarity(a, a)
  np.testing.assert_allclose(same["l1"], 0.0, atol=0)
  np.testing.assert_allclose(same["l2"], 0.0, atol=0)
  np.testing.assert_allclose(same["spearman"], 1.0, atol=1e-6)
  np.testing.assert_allclose(same["ssim"], 1.0, atol=1e-5)
  # known perturbations: doubling changes the relative norm by exactly 1, the shape not at all
  twice = metrics.map_change(a, 2 * a)
  np.testing.assert_allclose(twice["l1"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(twice["l2"], 1.0, rtol=1e-6)
  each = metrics.map_change(a, 2 * a, normalize="each")
  np.testing.assert_allclose(each["l1"], 0.0, atol=1e-6)
  np.testing.assert_allclose(metrics.rank_correlation(a, -a, reduce="sum"), -1.0, atol=1e-6)
  # a known additive perturbation: ||d||_p / ||a||_p on the aggregated maps
  d = rng.normal(size=a.shape).astype(np.float32) * 0.3
  sa, sb = np.abs(a).sum(-1).reshape(3, -1), np.abs(a + d).sum(-1).reshape(3, -1)
  got = metrics.map_change(a, a + d)
  np.testing.assert_allclose(got["l1"], np.abs(sb - sa).sum(1) / np.abs(sa).sum(1), rtol=1e-5)
  np.testing.assert_allclose(got["l2"], np.linalg.norm(sb - sa, axis=1)
                             / np.linalg.norm(sa, axis=1), rtol=1e-5)
  # Spearman with many ties (rounded maps, as zero backgrounds give) against scipy
  ta, tb = np.round(a, 0), np.round(a + d, 0)
  ref = [scipy.stats.spearmanr(np.abs(u).sum(-1).ravel(), np.abs(v).sum(-1).ravel())[0]
         for u, v in zip(ta, tb)]
  np.testing.assert_allclose(metrics.rank_correlation(ta, tb), ref, rtol=1e-5)
  np.testing.assert_allclose(metrics.ssim(a, a + d), _ssim_loop(np.abs(a).sum(-1),
                                                                  np.abs(a + d).sum(-1)),
                             rtol=1e-4, atol=1e-5)
  const = np.zeros((1, 8, 8))
  np.testing.assert_allclose(metrics.rank_correlation(const, const), 1.0)
  np.testing.assert_allclose(metrics.rank_correlation(const, np.ones((1, 8, 8)) +
                                                      rng.normal(size=(1, 8, 8))), 0.0)


def test_shift_invariance_on_linear_model():
  shape = (5, 8, 8, 3)
  f, w, b = _linear_model(jax.random.key(4), shape, k=4)
  x = jax.random.uniform(jax.random.key(5), shape)
  t = np.array([0, 1, 2, 3, 0])
  shift = np.array([0.2, -0.1, 0.4], np.float32)
  gxi = lambda x, t: jnp.stack([w[:, t[i]].reshape(shape[1:]) * x[i] for i in range(5)])
  r = metrics.shift_invariance(f, gxi, x, t, shift)
  xs = np.asarray(x) + shift
  lx, ls = np.asarray(f(x)), np.asarray(f(jnp.asarray(xs)))
  np.testing.assert_array_equal(r["prediction_unchanged"], lx.argmax(1) == ls.argmax(1))
  np.testing.assert_allclose(r["score_change"], ls[np.arange(5), t] - lx[np.arange(5), t],
                             rtol=1e-4, atol=1e-4)
  m0 = np.stack([np.abs(w[:, t[i]].reshape(shape[1:]) * np.asarray(x[i])).sum(-1)
                 for i in range(5)]).reshape(5, -1)
  m1 = np.stack([np.abs(w[:, t[i]].reshape(shape[1:]) * xs[i]).sum(-1)
                 for i in range(5)]).reshape(5, -1)
  np.testing.assert_allclose(r["l1"], np.abs(m1 - m0).sum(1) / np.abs(m0).sum(1), rtol=1e-4)
  ref = [scipy.stats.spearmanr(u, v)[0] for u, v in zip(m0, m1)]
  np.testing.assert_allclose(r["spearman"], ref, rtol=1e-4)
  # the plain gradient of a linear model does not depend on x: exactly invariant
  grad = lambda x, t: jnp.stack([jnp.broadcast_to(w[:, t[i]].reshape(shape[1:]), shape[1:])
                                 for i in range(5)])
  r = metrics.shift_invariance(f, grad, x, t, 0.5)
  np.testing.assert_allclose(r["l1"], 0.0, atol=0)
  np.testing.assert_allclose(r["spearman"], 1.0, atol=1e-6)


class _DigitsNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(32, name="fc1")(x))
    return nn.Dense(10, name="fc2")(x)


def _trained_digits_net():
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  model = _DigitsNet()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    def loss(p):
      logits = model.apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    g = jax.grad(loss)(params)
    with jax.numpy_dtype_promotion("standard"):  # optax adam: float ** int32 step
      upd, state = opt.update(g, state)
    return optax.apply_updates(params, upd), state

  rng = np.random.default_rng(0)
  for _ in range(150):
    idx = rng.choice(1500, 64, replace=False)
    params, state = step(params, state, x[idx], y[idx])
  acc = (model.apply({"params": params}, x[1500:]).argmax(1) == y[1500:]).mean()
  return model, params, x[1500:1508], y[1500:1508], acc


def test_cascading_randomization_on_trained_model():
  model, params, x, y, acc = _trained_digits_net()
  assert acc > 0.85  # the model really is trained
  random_params = model.init(jax.random.key(99), jnp.zeros((1, 8, 8, 1)))["params"]

  def explain(p, x, t):
    f = lambda z: model.apply({"params": p}, z)
    return jax.grad(lambda z: jnp.sum(jnp.take_along_axis(f(z), t[:, None], 1)))(x)

  r = jax.jit(lambda p, rp: metrics.cascading_randomization(
      explain, p, x, y, random_params=rp, model=model))(params, random_params)
  assert metrics.cascade_layers(params, model=model, x=x) == ["fc2", "fc1", "conv1"]
  sp, ss = np.asarray(r["spearman"]), np.asarray(r["ssim"])
  np.testing.assert_allclose(sp[0], 1.0, atol=1e-6)
  np.testing.assert_allclose(ss[0], 1.0, atol=1e-5)
  assert sp[-1].mean() < 0.5 and ss[-1].mean() < 0.5
  assert sp[-1].mean() < sp[1].mean() or sp[1].mean() < 0.9
  # independent check of the cascade: rebuild each stage's parameters by hand
  layers = metrics.cascade_layers(params, model=model, x=x)
  explain_jit = jax.jit(explain)
  m0 = np.abs(np.asarray(explain_jit(params, x, jnp.asarray(y)))).sum(-1)
  for s in range(len(layers) + 1):
    p = {k: (random_params[k] if k in layers[:s] else params[k]) for k in params}
    m_ref = np.abs(np.asarray(explain_jit(p, x, jnp.asarray(y)))).sum(-1)
    np.testing.assert_allclose(np.asarray(r["maps"][s]), m_ref, rtol=1e-4, atol=1e-6)
    ref = [scipy.stats.spearmanr(u.ravel(), v.ravel())[0] for u, v in zip(m0, m_ref)]
    np.testing.assert_allclose(sp[s], ref, rtol=1e-4, atol=1e-5)
  # the noise fallback (no random_params) also destroys the maps, and bad layers are errors
  r2 = jax.jit(lambda p: metrics.cascading_randomization(explain, p, x, y, model=model,
                                                         key=jax.random.key(1)))(params)
  assert np.asarray(r2["spearman"])[-1].mean() < 0.5
  with pytest.raises(ValueError, match="matches no parameter"):
    metrics.cascading_randomization(explain, params, x, y, key=jax.random.key(1),
                                    layers=["fc9"])


def test_cascade_order_is_the_execution_order_not_dict_order():
  """Issue 10, 2.1: after a tree_map (which sorts dict keys) the order must not change."""
  import jaxplain  # pylint: disable=import-outside-toplevel
  from jaxplain.models import ResNetSmall  # pylint: disable=import-outside-toplevel
  model = ResNetSmall(num_classes=3)
  x = jnp.zeros((1, 8, 8, 1))
  v = jax.eval_shape(model.init, jax.random.key(0), x)   # only shapes are needed
  mapped = jax.tree_util.tree_map(lambda a: a, v["params"])
  assert list(mapped)[0] != list(v["params"])[0] or list(mapped) == sorted(mapped)
  wrapped = jaxplain.wrap(model, v)
  order = metrics.cascade_layers(v["params"], model=wrapped, x=x)
  assert order == metrics.cascade_layers(mapped, model=wrapped, x=x)
  assert order[0] == "head" and order[-1] == "stem_conv"
  assert metrics.cascade_layers(wrapped, x=x) == order
  with pytest.raises(ValueError, match="a parameter dict does not record the model's layer "
                                       "order"):
    metrics.cascade_layers(mapped)
  with pytest.raises(ValueError, match=r"params: got a full variables dict with collections "
                                       r"\['batch_stats', 'params'\]"):
    metrics.cascading_randomization(lambda p, z, t: z, v, x, 0, key=jax.random.key(0))


def test_cascade_leaves_integer_leaves_alone_and_runs_on_a_wrapped_model():
  """Issue 10, 2.2: an integer leaf (a step counter, an NNX RNG count) is never randomised."""
  import jaxplain  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Net(nnx.Module):
    def __init__(self):
      r = nnx.Rngs(0)
      self.fc1 = nnx.Linear(16, 4, rngs=r)
      self.drop = nnx.Dropout(0.5, rngs=r)   # holds an integer RNG count
      self.fc2 = nnx.Linear(4, 3, rngs=r)

    def __call__(self, x):
      return self.fc2(self.drop(jnp.tanh(self.fc1(x.reshape(x.shape[0], -1)))))
  m = jaxplain.wrap(Net())
  x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1))
  is_int = lambda a: jnp.issubdtype(a.dtype, jnp.integer)  # noqa: E731
  is_float = lambda a: jnp.issubdtype(a.dtype, jnp.floating)  # noqa: E731

  def explain(p, z, t):
    # reads the integer leaves, so a randomised counter would show in the maps
    count = sum(jnp.sum(a).astype(jnp.float32) for a in jax.tree_util.tree_leaves(p)
                if is_int(a))
    g = jax.grad(lambda u: jnp.sum(jnp.take_along_axis(m.apply(p, u), t[:, None], 1)))(z)
    return g * (1.0 + count)
  # the noise fallback used to crash on the integer leaf
  r = jax.jit(lambda k: metrics.cascading_randomization(explain, m, x, 0, key=k))(
      jax.random.key(2))
  assert metrics.cascade_layers(m, x=x) == ["fc2", "fc1"]
  np.testing.assert_allclose(np.asarray(r["spearman"])[0], 1.0, atol=1e-6)
  # with re-initialised parameters whose counter differs: stage by stage by hand
  rnd = jax.tree_util.tree_map(
      lambda a: a + 7 if is_int(a) else (-2.0 * a + 0.3 if is_float(a) else a), m.params)
  assert any(is_int(a) for a in jax.tree_util.tree_leaves(m.params))
  r = jax.jit(lambda rp: metrics.cascading_randomization(explain, m, x, 0, random_params=rp))(
      rnd)
  t = jnp.zeros(2, jnp.int32)
  explain = jax.jit(explain)
  for s, swapped in enumerate([(), ("fc2",), ("fc2", "fc1")]):
    p = jax.tree_util.tree_map_with_path(
        lambda path, a, b: b if (str(path[0].key) in swapped and is_float(a)) else a,
        m.params, rnd)
    ref = np.abs(np.asarray(explain(p, x, t))).sum(-1)
    # atol relative to the map's scale: |grad| summed over a channel axis cancels in float32
    np.testing.assert_allclose(np.asarray(r["maps"][s]), ref, rtol=1e-5,
                               atol=1e-6 * np.abs(ref).max())


# -- deletion / insertion / shift invariance on tabular (B, D) and sequence (B, L, E) inputs ----

def _tabular_and_sequence_models():
  r = np.random.default_rng(7)
  w1 = jnp.asarray(r.normal(size=(7, 5)), jnp.float32)
  w2 = jnp.asarray(r.normal(size=(5, 3)), jnp.float32)
  tab = lambda x: jnp.tanh(x @ w1) @ w2                                  # (B, 7) -> (B, 3)
  e1 = jnp.asarray(r.normal(size=(4, 6)), jnp.float32)
  pos = jnp.asarray(r.normal(size=(6, 6)), jnp.float32)                  # L = 6 positions
  e2 = jnp.asarray(r.normal(size=(6, 3)), jnp.float32)
  seq = lambda x: jnp.mean(jnp.tanh(x @ e1 + pos[None]), axis=1) @ e2   # (B, 6, 4) -> (B, 3)
  w1, w2, e1, pos, e2 = (np.asarray(v, np.float64) for v in (w1, w2, e1, pos, e2))
  tab_np = lambda x: np.tanh(x @ w1) @ w2                                # float64 twins
  seq_np = lambda x: np.mean(np.tanh(x @ e1 + pos[None]), axis=1) @ e2
  return (tab, tab_np), (seq, seq_np)


def _loop_feature_curve(f, x, t, fmap, counts, value, insert):
  """Plain loop: per example sort the features (stable), set the removed ones, score."""
  x = np.asarray(x, np.float64)
  out = np.zeros((x.shape[0], len(counts)))
  for i in range(x.shape[0]):
    order = np.argsort(-fmap[i].reshape(-1), kind="stable")
    for j, k in enumerate(counts):
      xi = x[i].copy()
      top = set(order[:k].tolist())
      for feat in range(fmap[i].size):
        if (feat in top) != insert:
          xi[feat] = value                       # a column (tabular) or a token's embedding
      out[i, j] = f(xi[None])[0, t[i]]
  return out


@pytest.mark.parametrize("kind", ["tabular", "sequence", "sequence_token_map"])
def test_curves_on_tabular_and_sequence_inputs_match_plain_loop(kind):
  tab, seq = _tabular_and_sequence_models()
  f, f_np = tab if kind == "tabular" else seq
  shape = (3, 7) if kind == "tabular" else (3, 6, 4)
  x = jax.random.normal(jax.random.key(1), shape)
  att = jax.random.normal(jax.random.key(2), shape)
  if kind == "sequence_token_map":
    att = att[..., 0]                                            # per-token scores (B, L)
  t = np.array([0, 2, 1])
  a = np.asarray(att)
  # reduce="sum_abs" on an attribution like x; a token map (B, L) is used as it is
  fmap = {"tabular": np.abs(a), "sequence": np.abs(a).sum(-1), "sequence_token_map": a}[kind]
  n = fmap.shape[1]
  steps = [0, 1, 3, n]
  for insert, fn in ((False, metrics.deletion_curve), (True, metrics.insertion_curve)):
    ref = _loop_feature_curve(f_np, x, t, fmap, steps, 0.5, insert)
    got = jax.jit(lambda x, a: fn(f, x, t, a, steps=steps, value=0.5))(x, att)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    chunked = jax.jit(lambda x, a: fn(f, x, t, a, steps=steps, value=0.5, chunk=3))(x, att)
    np.testing.assert_allclose(np.asarray(chunked), ref, rtol=1e-5, atol=1e-5)
  signed = jax.jit(lambda x, a: metrics.deletion_curve(f, x, t, a, steps=steps, value=0.5,
                                                       reduce="sum"))(x, att)
  ref = _loop_feature_curve(f_np, x, t, a if a.ndim == 2 else a.sum(-1), steps, 0.5, False)
  np.testing.assert_allclose(np.asarray(signed), ref, rtol=1e-5, atol=1e-5)
  rnd = metrics.random_order_curve(f, x, t, key=jax.random.key(0), steps=steps, num_orders=2)
  assert rnd.shape == (3, len(steps))
  with pytest.raises(ValueError, match="saliency"):
    metrics.deletion_curve(f, x, t, jnp.ones((3, n + 1)))


@pytest.mark.parametrize("kind", ["tabular", "sequence"])
def test_shift_invariance_on_tabular_and_sequence_inputs(kind):
  tab, seq = _tabular_and_sequence_models()
  f, f_np = tab if kind == "tabular" else seq
  shape = (4, 7) if kind == "tabular" else (4, 6, 4)
  x = jax.random.normal(jax.random.key(3), shape)
  t = np.array([0, 1, 2, 0])
  shift = np.linspace(-0.3, 0.4, shape[-1]).astype(np.float32)
  explain = lambda z, tt: z * z                                  # a map known in closed form
  r = jax.jit(lambda x: metrics.shift_invariance(f, explain, x, t, shift))(x)
  xs = np.asarray(x, np.float64) + shift
  lx, ls = f_np(np.asarray(x, np.float64)), f_np(xs)
  np.testing.assert_array_equal(r["prediction_unchanged"], lx.argmax(1) == ls.argmax(1))
  np.testing.assert_allclose(r["score_change"], ls[np.arange(4), t] - lx[np.arange(4), t],
                             rtol=1e-4, atol=1e-5)
  m0, m1 = np.asarray(x, np.float64) ** 2, xs ** 2
  if kind == "sequence":
    m0, m1 = m0.sum(-1), m1.sum(-1)                              # sum_abs over the embedding
  np.testing.assert_allclose(r["l1"], np.abs(m1 - m0).sum(1) / np.abs(m0).sum(1), rtol=1e-4)
  np.testing.assert_allclose(r["l2"], np.linalg.norm(m1 - m0, axis=1)
                             / np.linalg.norm(m0, axis=1), rtol=1e-4)
  ref = [scipy.stats.spearmanr(u, v)[0] for u, v in zip(m0, m1)]
  np.testing.assert_allclose(r["spearman"], ref, rtol=1e-4, atol=1e-6)
  assert "ssim" not in r
  with pytest.raises(ValueError, match="shift"):
    metrics.shift_invariance(f, explain, x, t, jnp.ones(shape[-1] + 1))
