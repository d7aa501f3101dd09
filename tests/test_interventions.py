"""Tests of jaxplain.interventions: every check compares with an independent computation (a
Python loop of edits + forward passes, a closed form, a float64 hand computation)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxplain
from jaxplain import interventions as iv
from jaxplain.interventions._select import tree_paths
from jaxplain.models import ResNetSmall, max_pool_2x2


class TinyCNN(nn.Module):
  """conv1 4 - relu - pool - conv2 6 - relu - pool - flatten - fc1 5 - relu - fc2 3 (8x8x1)."""

  @nn.compact
  def __call__(self, x):
    x = max_pool_2x2(nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv1")(x)))
    x = max_pool_2x2(nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv2")(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(5, name="fc1")(x))
    return nn.Dense(3, name="fc2")(x)


@pytest.fixture(scope="module")
def tiny():
  model = TinyCNN()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  v = jax.jit(model.init)(jax.random.key(0), x)
  # random, non-zero biases so that "filter" units really differ from kernel-only edits
  v = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)
  return model, v, x


def _loop(model, v, x, u, value=0.0):
  """Independent reference: for each unit, edit the leaves entry by entry in numpy, run."""
  apply = jax.jit(model.apply)
  outs = []
  for n in range(len(u)):
    vn = jax.tree_util.tree_map(np.array, v)
    for path, m in u.masks.items():
      node = vn
      *parents, leaf = path.split("/")
      for p in parents:
        node = node[p]
      arr = node[leaf].copy()
      arr[np.asarray(m[n])] = value
      node[leaf] = arr
    outs.append(apply(vn, x))
  return np.stack(outs)


# -- edits ----------------------------------------------------------------------------------


def test_edits_touch_exactly_the_selected_entries(tiny):
  _, v, _ = tiny
  where = {"params/conv2/kernel": np.zeros((3, 3, 4, 6), bool)}
  where["params/conv2/kernel"][1, 2, 3, 4] = True
  where["params/conv2/kernel"][..., 0, 5] = True
  flat0 = dict(zip(tree_paths(v), jax.tree_util.tree_leaves(v)))
  sel = iv.select(r"params/conv2/kernel", r"params/fc1/bias")
  edits = {
      "set": iv.set_value(v, sel, 0.7, where=where),
      "scale": iv.scale(v, sel, -2.0, where=where),
      "noise": iv.add_noise(v, sel, jax.random.key(3), std=1.0, where=where),
  }
  for name, new in edits.items():
    flat = dict(zip(tree_paths(new), jax.tree_util.tree_leaves(new)))
    assert flat.keys() == flat0.keys()
    for p in flat0:
      a, b = np.asarray(flat0[p]), np.asarray(flat[p])
      if p == "params/conv2/kernel":
        m = where[p]
        np.testing.assert_array_equal(a[~m], b[~m])
        assert np.all(a[m] != b[m]), name
        if name == "set":
          np.testing.assert_allclose(b[m], 0.7)
        if name == "scale":
          np.testing.assert_allclose(b[m], -2.0 * a[m], rtol=1e-6)
      elif p == "params/fc1/bias":  # selected, no mask: the whole leaf
        assert np.all(a != b), name
      else:
        np.testing.assert_array_equal(a, b)
  kept = iv.keep_only(v, r"params/fc\d/kernel", {"params/fc1/kernel": np.eye(24, 5, dtype=bool)})
  np.testing.assert_array_equal(kept["params"]["fc1"]["kernel"],
                                np.where(np.eye(24, 5, dtype=bool), v["params"]["fc1"]["kernel"], 0))
  np.testing.assert_array_equal(kept["params"]["fc2"]["kernel"], 0)
  np.testing.assert_array_equal(kept["params"]["fc1"]["bias"], v["params"]["fc1"]["bias"])


def test_units_masks_match_hand_indexing(tiny):
  _, v, _ = tiny
  u = iv.units(v, "conv2", "weight", [[1, 4]])
  m = np.zeros((3, 3, 4, 6), bool)
  m[:, :, 1, 4] = True
  np.testing.assert_array_equal(u.masks["params/conv2/kernel"][0], m)
  u = iv.units(v, "conv2", "filter", [2])
  np.testing.assert_array_equal(u.masks["params/conv2/bias"][0], np.arange(6) == 2)
  u = iv.units(v, "fc1", "input", [5], channels=6, outputs=[1, 3])
  rows = (np.arange(24) % 6) == 5
  np.testing.assert_array_equal(u.masks["params/fc1/kernel"][0],
                                rows[:, None] & np.isin(np.arange(5), [1, 3])[None, :])


# -- sweeps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layer,kind,kw,value", [
    ("conv2", "filter", {}, 0.0),
    ("conv2", "input", {"outputs": [0, 3, 5]}, 0.5),
    ("conv1", "weight", {"index": [[0, 0], [0, 3]]}, 0.0),
    ("fc1", "input", {"channels": 6}, 0.0),
    ("fc2", "weight", {}, -0.3),
])
def test_sweep_and_prefix_reuse_equal_a_loop(tiny, layer, kind, kw, value):
  model, v, x = tiny
  u = iv.units(v, layer, kind, **kw)
  ref = _loop(model, v, x, u, value)
  full = jax.jit(lambda v, x: iv.sweep(model.apply, v, x, u, value=value))(v, x)
  np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-5)
  fast = jax.jit(lambda v, x: iv.sweep_layer(model, v, x, u, value=value, chunk=3))(v, x)
  np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)


def test_sweep_chunked_and_compiled_once(tiny):
  model, v, x = tiny
  traces = []

  def apply_fn(p, x):
    traces.append(1)
    return model.apply(p, x)

  u = iv.units(v, "conv2", "filter")
  ref = _loop(model, v, x, u)
  f = jax.jit(lambda v, x, masks: iv.sweep(apply_fn, v, x, masks, chunk=2))
  np.testing.assert_allclose(f(v, x, u.masks), ref, rtol=1e-5, atol=1e-5)
  other = iv.units(v, "conv2", "filter", [5, 4, 3, 2, 1, 0])  # new masks, same shapes
  np.testing.assert_allclose(f(v, x, other.masks), ref[::-1], rtol=1e-5, atol=1e-5)
  assert len(traces) == 1
  # the intervention axis placed across the devices (one CPU device here): same result
  g = jax.jit(lambda v, x, masks: iv.sweep(model.apply, v, x, masks))
  np.testing.assert_allclose(g(v, x, iv.shard_masks(u)), ref, rtol=1e-5, atol=1e-5)


def test_prefix_reuse_channelwise_and_resnet(tiny):
  model, v, x = tiny
  u = iv.units(v, "conv2", "filter")
  ref = _loop(model, v, x, u)
  got = jax.jit(lambda v, x: iv.sweep_layer(model, v, x, u, channelwise_until="fc1"))(v, x)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  # kernel-only zeroing is not a channel ablation: refuse instead of a wrong answer
  with pytest.raises(ValueError, match="bias"):
    iv.sweep_layer(model, v, x, iv.units(v, "conv2", "filter", bias=False),
                   channelwise_until="fc1")
  # a model with batch norm and skip connections, variables with batch_stats
  r = ResNetSmall(num_classes=3)
  xr = jax.random.normal(jax.random.key(4), (2, 8, 8, 1))
  vr = jax.jit(r.init)(jax.random.key(5), xr)
  for layer, kind in [("stage2_block1/conv1", "input"), ("stage1_block1/conv2", "filter")]:
    ur = iv.units(vr, layer, kind)
    got = jax.jit(lambda v, x: iv.sweep_layer(r, v, x, ur))(vr, xr)
    np.testing.assert_allclose(got, _loop(r, vr, xr, ur),
                               rtol=1e-4, atol=1e-5)


def test_first_order_is_exact_for_last_layer_weights(tiny):
  model, v, x = tiny
  u = iv.units(v, "fc2", "weight")
  t = jnp.array([0, 2])
  exact = iv.effects(jnp.asarray(_loop(model, v, x, u)), model.apply(v, x), t)
  est = iv.first_order(model.apply, v, x, t, u)
  np.testing.assert_allclose(est, exact, rtol=1e-4, atol=1e-5)
  rep = iv.agreement(est, exact)
  assert rep["sign_agreement"] == 1.0 and rep["spearman"] > 0.999
  # for a hidden conv filter it is only an estimate
  uc = iv.units(v, "conv1", "filter")
  exact_c = iv.effects(jnp.asarray(_loop(model, v, x, uc)), model.apply(v, x), t)
  assert not np.allclose(iv.first_order(model.apply, v, x, t, uc), exact_c, atol=1e-4)


# -- the causal-mechanism algorithm -----------------------------------------------------------


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="fc2")(nn.relu(nn.Dense(4, name="fc1")(x)))


class TinyConvFlat(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(3, (1, 1), name="conv")(x))
    return nn.Dense(2, name="fc")(h.reshape(h.shape[0], -1))


def test_walk_finds_the_paths_built_in_by_construction():
  # x = (1, 1, 1); fc1 makes every hidden unit 1: h0 = relu(2 x0 - x2) and h_k = x_k.
  w1 = np.array([[2, 1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, 1]], np.float32)
  # logit 0 = 4 h0 + 0.1 h1 - 3 h3: removing w(0,0) lowers it (I+), w(3,0) raises it (I-),
  # w(1,0) is a small change below the threshold |mean e|.
  w2 = np.array([[4, 1], [0.1, 1], [0, 1], [-3, 1]], np.float32)
  v = {"params": {"fc1": {"kernel": w1, "bias": np.zeros(4, np.float32)},
                  "fc2": {"kernel": w2, "bias": np.zeros(2, np.float32)}}}
  x = np.ones((1, 3), np.float32)
  r = iv.walk(TinyMLP(), v, x, 0, ["fc1", "fc2"])
  # fc1 toward K = {h0}: dropping w1(0,0) kills h0 (logit -4), dropping w1(2,0) doubles it (+4)
  assert [(g[0], g[1]) for g in r.g_plus(0)] == [("fc2", 0), ("fc1", 0)]
  assert [(g[0], g[1]) for g in r.g_minus(0)] == [("fc2", 3), ("fc1", 2)]
  np.testing.assert_allclose(r.per_layer["fc2"].effect[0], [-4, -0.1, 0, 3], atol=1e-6)
  np.testing.assert_allclose(r.per_layer["fc1"].effect[0], [-4, 0, 4], atol=1e-6)
  # KL against a float64 hand computation: p = softmax(4 - 3 + 0.1, 3) etc.
  with jax.enable_x64(True):
    base = np.array([1.1, 4.0])
    for n, e in enumerate([-4.0, -0.1, 0.0, 3.0]):
      q = base + np.array([e, 0.0])
      p0, q0 = np.exp(base - base.max()), np.exp(q - q.max())
      p0, q0 = p0 / p0.sum(), q0 / q0.sum()
      kl = float(np.sum(p0 * np.log(p0 / q0)))
      np.testing.assert_allclose(r.per_layer["fc2"].cs[0, n], kl, rtol=1e-5, atol=1e-7)
  # correction keeps exactly the G+ weights among the analysed ones (column 0 of fc2, and
  # w1(:, 0) of fc1); everything else is untouched
  c = iv.correct(v, r, 0)["params"]
  np.testing.assert_array_equal(c["fc2"]["kernel"][:, 0], [4, 0, 0, 0])
  np.testing.assert_array_equal(c["fc2"]["kernel"][:, 1], w2[:, 1])
  np.testing.assert_array_equal(c["fc1"]["kernel"][:, 0], [2, 0, 0])
  np.testing.assert_array_equal(c["fc1"]["kernel"][:, 1:], w1[:, 1:])
  c2 = iv.correct(v, r, 0, layers=["fc2"])["params"]
  np.testing.assert_array_equal(c2["fc2"]["kernel"], c["fc2"]["kernel"])
  np.testing.assert_array_equal(c2["fc1"]["kernel"], w1)


def test_walk_through_a_flatten_groups_by_channel_and_is_vectorised():
  kc = np.ones((1, 1, 1, 3), np.float32)
  # fc input index = pixel * 3 + channel; class 0 reads +1 from channel 0, -1 from channel 2;
  # class 1 the opposite.
  col = np.tile(np.array([1.0, 0.0, -1.0], np.float32), 4)
  v = {"params": {"conv": {"kernel": kc, "bias": np.zeros(3, np.float32)},
                  "fc": {"kernel": np.stack([col, -col], 1), "bias": np.zeros(2, np.float32)}}}
  x = np.ones((2, 2, 2, 1), np.float32)
  r = iv.walk(TinyConvFlat(), v, x, np.array([0, 1]), ["conv", "fc"])
  assert r.per_layer["fc"].channels == 3
  np.testing.assert_array_equal(r.per_layer["fc"].positive, [[1, 0, 0], [0, 0, 1]])
  np.testing.assert_array_equal(r.per_layer["fc"].negative, [[0, 0, 1], [1, 0, 0]])
  np.testing.assert_allclose(r.per_layer["fc"].effect, [[-4, 0, 4], [4, 0, -4]], atol=1e-6)
  # the next layer intervenes toward each example's own K
  np.testing.assert_array_equal(r.per_layer["conv"].outputs, [[1, 0, 0], [0, 0, 1]])
  np.testing.assert_array_equal(r.frequency()["fc"], [0.5, 0, 0.5])
  np.testing.assert_array_equal(r.subset([1]).per_layer["fc"].positive, [[0, 0, 1]])
  m = iv.mediator_map(TinyConvFlat(), v, x, r, "conv")
  np.testing.assert_allclose(m, np.ones((2, 2, 2)), atol=1e-6)


def test_walk_runs_on_a_resnet():
  r = ResNetSmall(num_classes=3)
  x = jax.random.normal(jax.random.key(6), (2, 8, 8, 1))
  v = jax.jit(r.init)(jax.random.key(7), x)
  layers = ["stage2_block1/conv1", "stage2_block1/conv2", "stage3_block1/conv1",
            "stage3_block1/conv2", "head"]
  m = jaxplain.wrap(r, v)
  res = jax.jit(lambda z: iv.walk(m, z, 1, layers))(x)   # walk is pure: the caller jits it
  assert res.per_layer["head"].effect.shape == (2, 32)
  assert res.per_layer["stage2_block1/conv1"].effect.shape == (2, 8)
  # K of each layer is the I+ of the layer after it
  for a, b in zip(layers[:-1], layers[1:]):
    np.testing.assert_array_equal(res.per_layer[a].outputs, res.per_layer[b].positive)


# -- bad input ------------------------------------------------------------------------------


def test_bad_input_errors(tiny):
  model, v, x = tiny
  with pytest.raises(ValueError, match="matched no parameter.*available paths.*params/conv1"):
    iv.set_value(v, iv.select(r"params/conv9/kernel"), 0.0)
  with pytest.raises(ValueError, match="out of range"):
    iv.units(v, "conv2", "filter", [6])
  with pytest.raises(ValueError, match="out of range"):
    iv.units(v, "fc1", "input", [0], outputs=[7])
  with pytest.raises(ValueError, match="available layers"):
    iv.units(v, "conv7", "filter")
  with pytest.raises(ValueError, match="forward"):
    iv.walk(model, v, x, 0, ["fc2", "fc1"])
  with pytest.raises(ValueError, match="cannot walk"):
    iv.walk(model, v, x, 0, ["conv1", "fc2"])
  with pytest.raises(ValueError, match="logits"):
    iv.walk(model, v, x, 0, ["conv2", "fc1"])
  with pytest.raises(ValueError, match="out of range"):
    iv.walk(model, v, x, 3, ["fc1", "fc2"])
