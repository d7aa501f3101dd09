"""The model interface (jaxplain.wrap): one small CNN written in Flax linen, Flax NNX, Equinox
and Keras 3 with the same weights (layouts transposed) gives the same logits, Grad-CAM maps,
units / sweep_layer results, first-order estimates and walk results, each checked against a
hand computation with the model split by hand at that layer (plain jax.lax, no library code)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import equinox as eqx  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import jaxplain  # noqa: E402
from jaxplain import interventions as iv  # noqa: E402
from jaxplain import rules  # noqa: E402

B, H, W, C0, C1, C2, K = 3, 6, 6, 2, 3, 4, 5
T = np.array([0, 3, 1])


def pool(x):  # 2x2 average pool, NHWC
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


# -- the hand model: plain lax ----------------------------------------------------------------


def conv(x, k, b):
  return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + b[None, None,
                                                                                      None]


def hand_features(p, x):
  """x -> conv2's output (pre-ReLU), (B, 6, 6, 4)."""
  a = jax.nn.relu(conv(x, p["conv1"]["kernel"], p["conv1"]["bias"]))
  return conv(a, p["conv2"]["kernel"], p["conv2"]["bias"])


def hand_fc_input(p, a2):
  return pool(jax.nn.relu(a2)).reshape(a2.shape[0], -1)      # NHWC flatten, (B, 36)


def hand_head(p, a2):
  return hand_fc_input(p, a2) @ p["fc"]["kernel"] + p["fc"]["bias"][None]


def hand_logits(p, x):
  return hand_head(p, hand_features(p, x))


# -- the four models -------------------------------------------------------------------------


class Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jax.nn.relu(nn.Conv(C1, (3, 3), padding="SAME", name="conv1")(x))
    x = jax.nn.relu(nn.Conv(C2, (3, 3), padding="SAME", name="conv2")(x))
    return nn.Dense(K, name="fc")(pool(x).reshape(x.shape[0], -1))


class NNX(nnx.Module):
  def __init__(self, p):
    r = nnx.Rngs(0)
    self.conv1 = nnx.Conv(C0, C1, (3, 3), padding="SAME", rngs=r)
    self.conv2 = nnx.Conv(C1, C2, (3, 3), padding="SAME", rngs=r)
    self.fc = nnx.Linear(36, K, rngs=r)
    for mod, name in ((self.conv1, "conv1"), (self.conv2, "conv2"), (self.fc, "fc")):
      mod.kernel[...] = p[name]["kernel"]
      mod.bias[...] = p[name]["bias"]

  def __call__(self, x):
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    return self.fc(pool(x).reshape(x.shape[0], -1))


class Eqx(eqx.Module):
  """Per example, channels first (C, H, W), CHW flatten: the Equinox conventions."""
  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  fc: eqx.nn.Linear

  def __init__(self, p):
    k = jax.random.split(jax.random.key(0), 3)
    c1 = eqx.nn.Conv2d(C0, C1, 3, padding=1, key=k[0])
    c2 = eqx.nn.Conv2d(C1, C2, 3, padding=1, key=k[1])
    fc = eqx.nn.Linear(36, K, key=k[2])
    cw = lambda q: jnp.transpose(q["kernel"], (3, 2, 0, 1))  # noqa: E731  HWIO -> OIHW
    self.conv1 = eqx.tree_at(lambda c: (c.weight, c.bias), c1,
                             (cw(p["conv1"]), p["conv1"]["bias"][:, None, None]))
    self.conv2 = eqx.tree_at(lambda c: (c.weight, c.bias), c2,
                             (cw(p["conv2"]), p["conv2"]["bias"][:, None, None]))
    # linen row (h * 3 + w) * 4 + c  ->  equinox column c * 9 + h * 3 + w
    wfc = p["fc"]["kernel"].reshape(3, 3, C2, K).transpose(2, 0, 1, 3).reshape(36, K).T
    self.fc = eqx.tree_at(lambda f: (f.weight, f.bias), fc, (wfc, p["fc"]["bias"]))

  def __call__(self, x):
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    x = x.reshape(C2, 3, 2, 3, 2).mean(axis=(2, 4))
    return self.fc(x.reshape(-1))


def make_keras(p):
  m = keras.Sequential([
      keras.Input((H, W, C0)),
      keras.layers.Conv2D(C1, 3, padding="same", name="conv1"),
      keras.layers.ReLU(name="relu1"),
      keras.layers.Conv2D(C2, 3, padding="same", name="conv2"),
      keras.layers.ReLU(name="relu2"),
      keras.layers.AveragePooling2D(2, name="pool"),
      keras.layers.Flatten(name="flat"),
      keras.layers.Dense(K, name="fc"),
  ])
  for name in ("conv1", "conv2", "fc"):
    m.get_layer(name).set_weights([np.asarray(p[name]["kernel"]), np.asarray(p[name]["bias"])])
  return m


@pytest.fixture(scope="module")
def four():
  x = jax.random.uniform(jax.random.key(1), (B, H, W, C0))
  v = Linen().init(jax.random.key(0), x)
  v = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)
  p = v["params"]
  models = {
      "linen": (jaxplain.wrap(Linen(), v), x),
      "nnx": (jaxplain.wrap(NNX(p)), x),
      "equinox": (jaxplain.wrap(Eqx(p)), jnp.transpose(x, (0, 3, 1, 2))),
      "keras": (jaxplain.wrap(make_keras(p)), x),
  }
  return p, x, models


def test_same_logits_and_layer_names_in_execution_order(four):
  p, x, models = four
  ref = np.asarray(hand_logits(p, x))
  for name, (m, xm) in models.items():
    np.testing.assert_allclose(m(xm), ref, rtol=1e-5, atol=1e-5, err_msg=name)
    names = m.layer_names(xm)
    assert [n for n in names if n in ("conv1", "conv2", "fc")] == ["conv1", "conv2", "fc"], name
  assert models["keras"][0].layer_names(x) == ("conv1", "relu1", "conv2", "relu2", "pool",
                                                "flat", "fc")
  with pytest.raises(ValueError, match=r"layer: unknown layer name 'conv9'; available layers: "
                                       r"'conv1', 'conv2', 'fc'"):
    jaxplain.grad_cam(models["equinox"][0], models["equinox"][1], 0, layer="conv9")


def test_model_repr_counts_parameters_and_prints_none(four):
  # the dataclass repr printed every weight; JAX formats it whenever it traces the model
  p, _, models = four
  n = sum(int(np.asarray(a).size) for a in jax.tree_util.tree_leaves(p))
  for name, (m, _) in models.items():
    r = repr(m)
    assert r.startswith(f"Model(framework={name!r}, params=<{n:,} values in "), (name, r)
    assert len(r) < 120 and "Array(" not in r, (name, r)


def test_grad_cam_equals_the_hand_split_in_every_framework(four):
  p, x, models = four
  a = np.asarray(hand_features(p, x))
  g = np.stack([np.asarray(jax.grad(lambda ab: hand_head(p, ab[None])[0, T[b]])(jnp.asarray(a[b])))
                for b in range(B)])
  ref = np.einsum("bhwc,bc->bhw", a, g.mean(axis=(1, 2)))
  assert ref.min() < 0 < ref.max()
  for name, (m, xm) in models.items():
    got = jax.jit(lambda z: jaxplain.grad_cam(m, z, jnp.asarray(T), layer="conv2", relu=False,
                                              upsample=None))(xm)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6, err_msg=name)
    assert jaxplain.grad_cam(m, xm, jnp.asarray(T), layer="conv2").shape == (B, H, W)


def _hand_edit(p, layer, fn):
  q = jax.tree_util.tree_map(np.array, p)
  fn(q[layer])
  return q


def test_units_and_sweep_layer_match_hand_edits(four):
  p, x, models = four
  # filters of conv2 (with bias), by hand
  ref_f = []
  for k in range(C2):
    def zero(q, k=k):
      q["kernel"][..., k] = 0
      q["bias"][k] = 0
    ref_f.append(hand_logits(_hand_edit(p, "conv2", zero), x))
  ref_f = np.stack(ref_f)
  # conv slices 1 -> 2 and 0 -> 3 (weights of conv2)
  ref_w = []
  for i, k in ((1, 2), (0, 3)):
    def zero(q, i=i, k=k):
      q["kernel"][:, :, i, k] = 0
    ref_w.append(hand_logits(_hand_edit(p, "conv2", zero), x))
  ref_w = np.stack(ref_w)
  # fc inputs grouped by conv channel (NHWC flatten in the hand model), toward outputs {0, 3}
  ref_g = []
  for c in range(C2):
    def zero(q, c=c):
      q["kernel"][c::C2, 0] = 0
      q["kernel"][c::C2, 3] = 0
    ref_g.append(hand_logits(_hand_edit(p, "fc", zero), x))
  ref_g = np.stack(ref_g)
  # single fc weights (input row, output): NHWC rows in the hand model; Equinox numbers its
  # fc inputs in CHW order, so the same weight has another row index there
  rows_hwc = [(5, 2), (30, 4)]
  ref_d = []
  for r, k in rows_hwc:
    def zero(q, r=r, k=k):
      q["kernel"][r, k] = 0
    ref_d.append(hand_logits(_hand_edit(p, "fc", zero), x))
  ref_d = np.stack(ref_d)
  chw = lambda r: (r % C2) * 9 + r // C2  # noqa: E731
  for name, (m, xm) in models.items():
    idx = [[chw(r) if name == "equinox" else r, k] for r, k in rows_hwc]
    ud = iv.units(m, "fc", "weight", idx)
    np.testing.assert_allclose(iv.sweep_layer(m, xm, ud), ref_d, rtol=1e-4, atol=1e-5,
                               err_msg=name)
    np.testing.assert_allclose(iv.sweep(m, xm, ud), ref_d, rtol=1e-4, atol=1e-5, err_msg=name)
    uf = iv.units(m, "conv2", "filter")
    uw = iv.units(m, "conv2", "weight", [[1, 2], [0, 3]])
    ug = iv.units(m, "fc", "input", channels=C2, outputs=[0, 3])
    assert uf.kernel_shape == (3, 3, C1, C2) and len(uw) == 2 and len(ug) == C2
    for u, ref in ((uf, ref_f), (uw, ref_w), (ug, ref_g)):
      fast = jax.jit(lambda z, u=u: iv.sweep_layer(m, z, u))(xm)
      np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-5, err_msg=f"{name} {u.kind}")
      slow = iv.sweep(m, xm, u)   # the native-layout masks through the general path
      np.testing.assert_allclose(slow, ref, rtol=1e-4, atol=1e-5, err_msg=f"{name} {u.kind}")


def test_keras_fused_activation_is_handled_by_sweep_layer_and_walk():
  """Keras Dense(activation="relu"): the intervention acts before the activation."""
  km = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu", name="h"),
                         keras.layers.Dense(3, name="out")])
  m = jaxplain.wrap(km)
  x = jax.random.normal(jax.random.key(8), (3, 4))
  wh, bh = (np.asarray(a) for a in km.get_layer("h").get_weights())
  wo, bo = (np.asarray(a) for a in km.get_layer("out").get_weights())
  ref = []
  for i in range(4):   # all weights leaving input i of "h", by hand in numpy
    w = wh.copy()
    w[i, :] = 0
    ref.append(np.maximum(np.asarray(x) @ w + bh, 0) @ wo + bo)
  u = iv.units(m, "h", "input")
  np.testing.assert_allclose(iv.sweep_layer(m, x, u), np.stack(ref), rtol=1e-5, atol=1e-6)
  r = iv.walk(m, x, 2, ["h", "out"])
  assert r.per_layer["h"].effect.shape == (3, 4)


def test_first_order_matches_the_closed_form(four):
  """fc is linear in its weights: e = -sum_{rows of channel c} h_r W[r, t] exactly."""
  p, x, models = four
  h = np.asarray(hand_fc_input(p, hand_features(p, x)), np.float64)     # (B, 36) NHWC
  wk = np.asarray(p["fc"]["kernel"], np.float64)
  ref = np.stack([-(h[:, c::C2] * wk[c::C2, :][:, T].T).sum(-1) for c in range(C2)])
  for name, (m, xm) in models.items():
    u = iv.units(m, "fc", "input", channels=C2)
    est = iv.first_order(m, xm, jnp.asarray(T), u)
    np.testing.assert_allclose(est, ref, rtol=1e-4, atol=1e-5, err_msg=name)


def _hand_walk(p, x):
  """Algorithm 1 over [conv2, fc] by hand: exact effects by editing and re-running."""
  y = np.asarray(hand_logits(p, x))
  y_t = y[np.arange(B), T]

  def split(e):   # SPEC section 4 reading of eq. 1
    mu, sd = e.mean(0), e.std(0)
    return (e < -np.abs(mu)) & (sd > 0), (e > np.abs(mu)) & (sd > 0)

  e_fc = []
  for c in range(C2):
    q = _hand_edit(p, "fc", lambda d, c=c: d["kernel"].__setitem__((slice(c, None, C2),), 0))
    e_fc.append(np.asarray(hand_logits(q, x))[np.arange(B), T] - y_t)   # K = {t}: rows only
  e_fc = np.stack(e_fc)     # (C2, B); only column t matters for logit t
  pos_fc, _ = split(e_fc)
  e_c2 = np.zeros((C1, B))
  for b in range(B):
    for i in range(C1):
      def zero(q, i=i, b=b):
        q["kernel"][:, :, i, pos_fc[:, b]] = 0
      e_c2[i, b] = np.asarray(hand_logits(_hand_edit(p, "conv2", zero), x[b:b + 1]))[0, T[b]] - y_t[b]
  pos_c2, _ = split(e_c2)
  return e_fc.T, pos_fc.T, e_c2.T, pos_c2.T


def test_walk_matches_a_hand_walk_in_every_framework(four):
  p, x, models = four
  e_fc, pos_fc, e_c2, pos_c2 = _hand_walk(p, x)
  assert pos_fc.any() and pos_c2.any()
  for name, (m, xm) in models.items():
    r = jax.jit(lambda z: iv.walk(m, z, jnp.asarray(T), ["conv2", "fc"]))(xm)
    np.testing.assert_allclose(r.per_layer["fc"].effect, e_fc, rtol=1e-4, atol=1e-5,
                               err_msg=name)
    np.testing.assert_array_equal(r.per_layer["fc"].positive, pos_fc, err_msg=name)
    np.testing.assert_allclose(r.per_layer["conv2"].effect, e_c2, rtol=1e-4, atol=1e-5,
                               err_msg=name)
    np.testing.assert_array_equal(r.per_layer["conv2"].positive, pos_c2, err_msg=name)
    assert r.per_layer["fc"].channels == C2
    # correct() edits the native layout: the corrected model equals the hand correction
    fixed = m.with_params(iv.correct(m, r, 0))
    keep = np.asarray(pos_fc[0])
    q = jax.tree_util.tree_map(np.array, p)
    for c in np.flatnonzero(~keep):
      q["fc"]["kernel"][c::C2, T[0]] = 0
    for i in np.flatnonzero(~pos_c2[0]):
      q["conv2"]["kernel"][:, :, i, keep] = 0
    np.testing.assert_allclose(fixed(xm), hand_logits(q, x), rtol=1e-4, atol=1e-5,
                               err_msg=name)


def test_mediator_map_is_the_mean_over_causal_channels(four):
  p, x, models = four
  _, pos_fc, _, _ = _hand_walk(p, x)
  act = np.maximum(np.asarray(hand_features(p, x)), 0)
  ref = np.stack([act[b][..., pos_fc[b]].mean(-1) if pos_fc[b].any() else act[b, ..., 0] * 0
                  for b in range(B)])
  for name, (m, xm) in models.items():
    r = iv.walk(m, xm, jnp.asarray(T), ["conv2", "fc"])
    got = iv.mediator_map(m, xm, r, "conv2")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_layer_called_twice_is_an_error_everywhere():
  """The one policy: a hooked layer must be applied once in a forward pass."""
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      d = nn.Dense(3, name="shared")
      return nn.Dense(2, name="out")(d(jax.nn.relu(d(x))))
  x = jnp.ones((2, 3))
  m = jaxplain.wrap(Twice(), Twice().init(jax.random.key(0), x))
  match = "layer: 'shared' is called more than once in one forward pass"
  with pytest.raises(ValueError, match=match):
    jaxplain.grad_cam(m, x, 0, layer="shared")
  with pytest.raises(ValueError, match=match):
    iv.sweep_layer(m, x, iv.units(m, "shared", "filter"))
  with pytest.raises(ValueError, match=match):
    iv.walk(m, x, 0, ["shared", "out"])
  assert iv.sweep(m, x, iv.units(m, "shared", "filter")).shape == (3, 2, 2)  # no hook: fine


def test_per_layer_walk_step_is_jittable_and_vmappable_and_compiles_once(four):
  p, x, models = four
  m, _ = models["linen"]
  traces = []

  def step(xb, kb):
    traces.append(1)
    return iv.walk_step(m, xb[None], 0, "fc", kb[None], channels=C2).effect[0]

  fn = jax.jit(jax.vmap(step))
  k = jax.nn.one_hot(jnp.zeros(B, jnp.int32), K, dtype=bool)
  e1 = fn(x, k)
  e2 = fn(x[::-1], k)
  assert len(traces) == 1
  whole = iv.walk_step(m, x, 0, "fc", k, channels=C2).effect
  np.testing.assert_allclose(e1, whole, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(e2, whole[::-1], rtol=1e-5, atol=1e-6)


def test_wrap_errors_name_the_argument():
  with pytest.raises(ValueError, match=r"variables: a flax.linen module needs its variables"):
    jaxplain.wrap(Linen())
  with pytest.raises(TypeError, match=r"obj: expected a flax.linen Module"):
    jaxplain.wrap(3)
  with pytest.raises(ValueError, match=r"output: the model returns a tuple of 2 values; pass "
                                       r"wrap\(..., output=0\)"):
    jaxplain.wrap((lambda p, z: (z, z), {}))(jnp.ones((1, 2)))
  f = jaxplain.wrap((lambda p, z: (z @ p, z), jnp.ones((2, 3))), output=0)
  assert f(jnp.ones((4, 2))).shape == (4, 3)


def test_keras_inception_v3_ig_and_grad_cam_by_layer_name():
  """Seed 000's network: keras.applications.InceptionV3 at its smallest input (75 x 75).
  With network access a user passes weights="imagenet"; here weights=None (no download).
  Grad-CAM on "mixed10" vs the hand split (mixed10 -> global average pool -> dense); at
  75 x 75 mixed10 is 1 x 1, so "mixed5" (7 x 7) gives the spatial map."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from jaxplain import plot  # pylint: disable=import-outside-toplevel
  km = keras.applications.InceptionV3(weights=None, input_shape=(75, 75, 3),
                                      classifier_activation=None)
  m = jaxplain.wrap(km)
  x = jax.random.uniform(jax.random.key(0), (1, 75, 75, 3))
  assert m.layer_names(x)[-3:] == ("mixed10", "avg_pool", "predictions")

  @jax.jit
  def run(z):
    logits, caps = m.capture(z, ["mixed10"])
    cam = jaxplain.grad_cam(m, z, 7, layer="mixed10", relu=False, upsample=None)
    ig = jaxplain.integrated_gradients(m, z, 7, steps=2)
    cam5 = jaxplain.grad_cam(m, z, 7, layer="mixed5")   # 7 x 7 maps, upsampled
    return logits, caps["mixed10"][1], cam, ig, cam5
  logits, a, cam, ig, cam5 = run(x)
  wd, bd = km.get_layer("predictions").get_weights()
  head = lambda f: f.mean(axis=(1, 2)) @ wd + bd[None]  # noqa: E731
  np.testing.assert_allclose(head(a), logits, rtol=1e-4, atol=1e-4)
  g = jax.grad(lambda f: head(f)[0, 7])(a)
  ref = np.einsum("bhwc,bc->bhw", np.asarray(a), np.asarray(g).mean(axis=(1, 2)))
  assert ref.shape == (1, 1, 1)   # mixed10 is 1 x 1 at the smallest input
  assert cam5.shape == (1, 75, 75) and np.isfinite(np.asarray(cam5)).all()
  np.testing.assert_allclose(cam, ref, rtol=1e-3, atol=1e-6 * np.abs(ref).max())
  assert ig.shape == x.shape and np.isfinite(np.asarray(ig)).all()
  fig = plot.three_panel(np.asarray(x[0]), np.asarray(ig[0]), title="InceptionV3 IG")
  assert len(fig.axes) == 3


# -- beyond images: tokens and integer inputs -------------------------------------------------


class ViTBlock(nn.Module):
  @nn.compact
  def __call__(self, t):
    h = nn.LayerNorm(name="ln1")(t)
    t = t + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h, h)
    h = nn.LayerNorm(name="ln2")(t)
    return t + nn.Dense(8, name="mlp2")(jax.nn.gelu(nn.Dense(16, name="mlp1")(h)))


class TinyViT(nn.Module):
  """8x8x1 images, 4x4 patches -> 4 tokens of width 8, two blocks, mean-pool head."""

  @nn.compact
  def __call__(self, x):
    b = x.shape[0]
    p = x.reshape(b, 2, 4, 2, 4, 1).transpose(0, 1, 3, 2, 4, 5).reshape(b, 4, 16)
    t = nn.Dense(8, name="embed")(p)
    t = ViTBlock(name="block0")(t)
    t = ViTBlock(name="block1")(t)
    return nn.Dense(3, name="head")(t.mean(axis=1))


def test_grad_cam_on_a_vit_last_block_is_a_map_over_tokens():
  vit = TinyViT()
  x = jax.random.uniform(jax.random.key(4), (2, 8, 8, 1))
  v = vit.init(jax.random.key(5), x)
  p = v["params"]
  # the hand split: tokens after block1 (linen submodules applied one by one), then the head
  patches = x.reshape(2, 2, 4, 2, 4, 1).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 16)
  t = patches @ p["embed"]["kernel"] + p["embed"]["bias"][None, None]
  for blk in ("block0", "block1"):
    t = ViTBlock().apply({"params": p[blk]}, t)
  head = lambda a: a.mean(axis=1) @ p["head"]["kernel"] + p["head"]["bias"][None]  # noqa: E731
  np.testing.assert_allclose(head(t), vit.apply(v, x), rtol=1e-5, atol=1e-6)
  tgt = np.array([2, 0])
  g = np.stack([np.asarray(jax.grad(lambda a: head(a[None])[0, tgt[b]])(t[b])) for b in range(2)])
  ref = np.einsum("blc,bc->bl", np.asarray(t), g.mean(axis=1))
  got = jaxplain.grad_cam(jaxplain.wrap(vit, v), x, jnp.asarray(tgt), layer="block1", relu=False)
  assert got.shape == (2, 4)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


class TextNet(nn.Module):
  """Token ids (B, L) -> embedding -> dense "proj" per token -> ReLU -> mean -> "out"."""

  @nn.compact
  def __call__(self, ids):
    e = nn.Embed(11, 6, name="embed")(ids)
    h = jax.nn.relu(nn.Dense(5, name="proj")(e))
    return nn.Dense(3, name="out")(h.mean(axis=1))


def test_sweeps_walk_and_first_order_on_integer_token_inputs():
  net = TextNet()
  ids = jnp.array([[1, 4, 4, 9, 0], [3, 3, 7, 2, 10]], jnp.int32)
  v = net.init(jax.random.key(6), ids)
  v = jax.tree_util.tree_map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(7), a.shape), v)
  m = jaxplain.wrap(net, v)
  apply = jax.jit(net.apply)
  # a Python loop: zero output unit k of "proj" (its kernel column and bias) and re-run
  ref = []
  for k in range(5):
    q = jax.tree_util.tree_map(np.array, v)
    q["params"]["proj"]["kernel"][:, k] = 0
    q["params"]["proj"]["bias"][k] = 0
    ref.append(apply(q, ids))
  ref = np.stack(ref)
  u = iv.units(m, "proj", "filter")
  np.testing.assert_allclose(iv.sweep_layer(m, ids, u), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(iv.sweep(m, ids, u), ref, rtol=1e-5, atol=1e-6)
  # first order on the last layer's weights is exact: e = -w_ik * mean_l relu(proj)_i
  pn = jax.tree_util.tree_map(np.asarray, v["params"])
  h = np.maximum(pn["embed"]["embedding"][np.asarray(ids)] @ pn["proj"]["kernel"]
                 + pn["proj"]["bias"], 0).mean(axis=1)           # (B, 5)
  uo = iv.units(m, "out", "weight", [[0, 1], [4, 1], [2, 1]])
  est = iv.first_order(m, ids, 1, uo)
  w = np.asarray(v["params"]["out"]["kernel"])
  np.testing.assert_allclose(est, np.stack([-w[i, 1] * h[:, i] for i in (0, 4, 2)]),
                             rtol=1e-5, atol=1e-6)
  # the walk and Grad-CAM / mediator maps over tokens run on token ids
  r = jax.jit(lambda z: iv.walk(m, z, 1, ["proj", "out"]))(ids)
  assert r.per_layer["proj"].effect.shape == (2, 6) and r.per_layer["out"].effect.shape == (2, 5)
  assert iv.mediator_map(m, ids, r, "proj").shape == (2, 5)
  assert jaxplain.grad_cam(m, ids, 1, layer="proj").shape == (2, 5)


def test_fit_and_ppi_take_a_wrapped_linen_model():
  import optax  # pylint: disable=import-outside-toplevel
  from jaxplain import ppi, train  # pylint: disable=import-outside-toplevel

  class Small(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = jax.nn.relu(nn.Conv(2, (3, 3), padding="SAME", name="conv")(x))
      return nn.Dense(2, name="fc")(x.reshape(x.shape[0], -1))
  mod = Small()
  x = jax.random.uniform(jax.random.key(9), (4, 4, 4, 1))
  v = mod.init(jax.random.key(10), x)
  data = {"image": np.asarray(x), "label": np.array([0, 1, 0, 1])}
  # lr 0: fit must return the wrapped variables themselves (not a fresh init)
  r = train.fit(jaxplain.wrap(mod, v), data, epochs=1, batch_size=4, progress=False,
                optimizer=optax.sgd(0.0))
  for a, b in zip(jax.tree_util.tree_leaves(r.variables), jax.tree_util.tree_leaves(v)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(TypeError, match="training supports Flax linen, Flax NNX and Equinox"):
    train.fit(jaxplain.wrap(keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                                              keras.layers.Dense(2)])), data, epochs=1)
  batch = {"image": x, "label": jnp.array([0, 1, 0, 1])}
  a = ppi.make_ppi_loss(jaxplain.wrap(mod, v), saliency="grad_cam")(
      v["params"], {}, batch, jax.random.key(0), 10**6)
  b = ppi.make_ppi_loss(mod, saliency="grad_cam")(v["params"], {}, batch, jax.random.key(0),
                                                   10**6)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)


def test_ppi_grad_cam_saliency_on_an_nnx_model_equals_the_hand_split(four):
  """PPI's "grad_cam" saliency on the NNX CNN: loss and parameter gradients (through the
  saliency, second order) equal PPI's objective on the hand model split at conv2."""
  from jaxplain import ppi  # pylint: disable=import-outside-toplevel
  p, x, _ = four
  y = jnp.asarray(T)
  cfg = ppi.PPIConfig()
  loss_fn = ppi.make_ppi_loss(NNX(p), cfg, saliency="grad_cam")  # default layer: conv2
  params = jax.tree_util.tree_map(jnp.asarray, p)
  key = jax.random.key(3)

  def ours(q):
    return loss_fn(q, {}, {"image": x, "label": y}, key, 10**6)[0]

  def hand(q):
    a = hand_features(q, x)
    g = jax.vmap(jax.grad(lambda ab, t: hand_head(q, ab[None])[0, t]))(a, y)
    cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", a, g.mean(axis=(1, 2))))  # 6 x 6: no resize
    f = lambda z: hand_logits(q, z)  # noqa: E731
    return ppi.ppi_objective(f, x, y, cam, cfg, key=key, logits=f(x), joint=True)[0]

  (l_ours, g_ours), (l_hand, g_hand) = (jax.jit(jax.value_and_grad(fn))(params)
                                         for fn in (ours, hand))
  np.testing.assert_allclose(l_ours, l_hand, rtol=1e-5)
  for name in ("conv1", "conv2", "fc"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_allclose(g_ours[name][leaf], g_hand[name][leaf], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name}/{leaf}")


def test_layer_names_without_x_is_execution_order_or_asks_for_x():
  class Rev(nnx.Module):   # attributes declared (and sorted) against the call order
    def __init__(self):
      r = nnx.Rngs(0)
      self.zfirst = nnx.Linear(2, 3, rngs=r)
      self.alast = nnx.Linear(3, 1, rngs=r)

    def __call__(self, x):
      return self.alast(jax.nn.relu(self.zfirst(x)))

  class RevEqx(eqx.Module):
    second: eqx.nn.Linear
    first: eqx.nn.Linear

    def __init__(self):
      self.second = eqx.nn.Linear(3, 1, key=jax.random.key(0))
      self.first = eqx.nn.Linear(2, 3, key=jax.random.key(1))

    def __call__(self, x):
      return self.second(self.first(x))

  class LinRev(nn.Module):
    @nn.compact
    def __call__(self, z):
      return nn.Dense(1, name="alast")(nn.Dense(3, name="zfirst")(z))

  x = jnp.ones((2, 2))
  for m, order in ((jaxplain.wrap(Rev()), ("zfirst", "alast")),
                   (jaxplain.wrap(RevEqx()), ("first", "second")),
                   (jaxplain.wrap(LinRev(), LinRev().init(jax.random.key(0), x)),
                    ("zfirst", "alast"))):
    assert m.layer_names(x) == order
    with pytest.raises(ValueError, match=r"x: a (linen|nnx|equinox) model knows its layers "
                                         r"only in .* order, not in execution order; pass an "
                                         r"input batch: model.layer_names\(x\)"):
      m.layer_names()
  # Keras lists its layers in graph order: no input needed
  inp = keras.Input((2,))
  km = keras.Model(inp, keras.layers.Dense(1, name="alast")(keras.layers.Dense(3, name="zfirst")(
      inp)))
  assert jaxplain.wrap(km).layer_names() == jaxplain.wrap(km).layer_names(x) == ("zfirst",
                                                                                 "alast")


def test_a_layer_called_twice_is_an_error_in_nnx_equinox_and_keras():
  """The same policy as linen's (above) in the other adapters."""
  class TwiceNNX(nnx.Module):
    def __init__(self):
      self.shared = nnx.Linear(3, 3, rngs=nnx.Rngs(0))

    def __call__(self, z):
      return self.shared(jax.nn.relu(self.shared(z)))

  class TwiceEqx(eqx.Module):
    shared: eqx.nn.Linear

    def __init__(self):
      self.shared = eqx.nn.Linear(3, 3, key=jax.random.key(0))

    def __call__(self, z):
      return self.shared(jax.nn.relu(self.shared(z)))

  inp = keras.Input((3,))
  d = keras.layers.Dense(3, name="shared")
  km = keras.Model(inp, d(keras.layers.ReLU()(d(inp))))
  x = jnp.ones((2, 3))
  match = "layer: 'shared' is called more than once in one forward pass"
  for obj in (TwiceNNX(), TwiceEqx(), km):
    m = jaxplain.wrap(obj)
    with pytest.raises(ValueError, match=match):
      jaxplain.grad_cam(m, x, 0, layer="shared")
    with pytest.raises(ValueError, match=match):
      m.capture(x, "shared")


def test_ppi_grad_cam_default_layer_is_the_last_convolution_in_execution_order():
  """conv9 runs before conv10: the default is conv10 (sorted names would give conv9)."""
  from jaxplain import ppi  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, z):
      z = jax.nn.relu(nn.Conv(2, (3, 3), padding="SAME", name="conv9")(z))
      z = jax.nn.relu(nn.Conv(2, (3, 3), padding="SAME", name="conv10")(z))
      return nn.Dense(3, name="fc")(z.reshape(z.shape[0], -1))

  x = jax.random.uniform(jax.random.key(11), (2, 4, 4, 1))
  params = Net().init(jax.random.key(12), x)["params"]
  batch = {"image": x, "label": jnp.array([0, 2])}

  def loss(layer):
    fn = ppi.make_ppi_loss(Net(), ppi.PPIConfig(grad_cam_layer=layer), saliency="grad_cam")
    return float(jax.jit(lambda q: fn(q, {}, batch, jax.random.key(0), 10**6)[0])(params))
  assert loss(None) == loss("conv10")
  # and the choice matters: conv9's Grad-CAM map is another map
  m = jaxplain.wrap(Net(), {"params": params})
  y = batch["label"]
  assert not np.allclose(jaxplain.grad_cam(m, x, y, layer="conv9"),
                         jaxplain.grad_cam(m, x, y, layer="conv10"))


def test_nnx_layers_carry_their_attribute_paths_as_name_stacks(four):
  """LRP composites choose NNX layers by name as they do linen's: the same patterns on the
  same weights give the same maps in both frameworks (NNX layers used to carry no names,
  so any name pattern raised 'match no layer')."""
  p, x, models = four
  named = rules.Composite(names=((r".*/conv2", rules.ZPlus()), (r".*/fc", rules.Epsilon(0.3))))
  maps = {f: np.asarray(rules.lrp(models[f][0], x, T, composite=named))
          for f in ("linen", "nnx")}
  np.testing.assert_allclose(maps["nnx"], maps["linen"], rtol=1e-5, atol=1e-6)
  default = np.asarray(rules.lrp(models["linen"][0], x, T))
  assert np.abs(maps["nnx"] - default).max() > 1e-3 * np.abs(default).max()  # names chose
  jaxpr = jax.make_jaxpr(models["nnx"][0])(x)
  stacks = {str(e.source_info.name_stack) for e in jaxpr.eqns}
  assert {"NNX/conv1", "NNX/conv2", "NNX/fc"} <= stacks, stacks


class _ScanNNX(nnx.Module):
  """Blocks made by nnx.vmap and run by nnx.scan (the usual NNX layer stack)."""

  def __init__(self, rngs):
    self.inp = nnx.Linear(4, 6, rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(r):
      return nnx.Linear(6, 6, rngs=r)
    self.blocks = blocks(rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, blk):
      return jnp.tanh(blk(h))
    return self.out(body(self.inp(x), self.blocks))


def test_nnx_model_with_lifted_scan_runs_under_every_transform_and_hooks_outside_it():
  """An NNX model whose __call__ uses nnx.scan raised 'different trace level' under jit /
  make_jaxpr in every method, and capture raised on a proxy object: now compared with the
  same network written with jnp on the extracted parameters, and its gradient with jax.grad."""
  net = _ScanNNX(nnx.Rngs(0))
  st = nnx.state(net, nnx.Param)
  P = {jax.tree_util.keystr(path): np.asarray(leaf)
       for path, leaf in jax.tree_util.tree_leaves_with_path(st)}
  get = lambda *keys: next(v for k, v in P.items() if all(f"'{q}'" in k for q in keys))

  def hand(x):
    h = x @ get("inp", "kernel") + get("inp", "bias")[None]
    hidden = h
    for i in range(3):
      h = jnp.tanh(h @ get("blocks", "kernel")[i] + get("blocks", "bias")[i][None])
    return h @ get("out", "kernel") + get("out", "bias")[None], hidden, h

  x = jax.random.normal(jax.random.key(3), (5, 4))
  m = jaxplain.wrap(net)
  want, hidden, last = hand(x)
  np.testing.assert_allclose(jax.jit(m)(x), want, rtol=1e-5, atol=1e-6)
  t = jnp.array([0, 2, 1, 1, 0])
  g = jaxplain.gradient(m, x, t)
  g_hand = jax.grad(lambda z: jnp.take_along_axis(hand(z)[0], t[:, None], 1).sum())(x)
  np.testing.assert_allclose(g, g_hand, rtol=1e-5, atol=1e-6)
  logits, caps = m.capture(x, ["inp", "out"])
  np.testing.assert_allclose(caps["inp"][1], hidden, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(caps["out"][0], last, rtol=1e-5, atol=1e-6)
  assert m.layer_names(x) == ("inp", "blocks", "out")  # the copies nnx.scan runs count too
  with pytest.raises(ValueError, match=r"'blocks' runs inside a transform that maps it over "
                                       r"an axis \(nnx\.scan.*'blocks\[0\]'"):
    m.capture(x, "blocks")
  # one call of the stack by its index: capture, replace and Grad-CAM (here a map over the
  # features of block 2's output) equal the network written with jnp
  def hand_from(x, i=None, value=None):
    h = x @ get("inp", "kernel") + get("inp", "bias")[None]
    ins, outs = [], []
    for j in range(3):
      ins.append(h)
      z = h @ get("blocks", "kernel")[j] + get("blocks", "bias")[j][None]
      z = value if j == i else z
      outs.append(z)
      h = jnp.tanh(z)
    return h @ get("out", "kernel") + get("out", "bias")[None], ins, outs

  _, ins, outs = hand_from(x)
  _, caps = jax.jit(lambda z: m.capture(z, ["blocks[1]", "out"]))(x)
  np.testing.assert_allclose(caps["blocks[1]"][0], ins[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(caps["blocks[1]"][1], outs[1], rtol=1e-5, atol=1e-6)
  v = jax.random.normal(jax.random.key(4), (5, 6))
  np.testing.assert_allclose(m.replace(x, "blocks[0]", v), hand_from(x, 0, v)[0], rtol=1e-5,
                             atol=1e-6)
  a2 = outs[2]
  head = lambda z: hand_from(x, 2, z)[0]
  g = jax.grad(lambda z: jnp.take_along_axis(head(z), t[:, None], 1).sum())(a2)
  np.testing.assert_allclose(jaxplain.grad_cam(m, x, t, layer="blocks[2]"),
                             jax.nn.relu(g * a2), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match=r"index 3 of 'blocks' is out of range: .* 3 layers"):
    m.capture(x, "blocks[3]")
  with pytest.raises(ValueError, match=r"'inp' holds no stacked parameters"):
    m.capture(x, "inp[0]")
  with pytest.raises(ValueError, match=r"one hook per layer stack and run; got 'blocks\[0\]' "
                                       r"and 'blocks\[2\]'"):
    m.capture(x, ["blocks[0]", "blocks[2]"])
  # the stacked kernels: units raise (they used to report kernel_shape (3, 6)); a mask over the
  # stacked leaf through sweep equals the hand-edited network
  with pytest.raises(ValueError, match=r"'blocks' holds a stack of kernels \(3, 6, 6\).*"
                                       r"sweep\(m, x, \{'blocks/kernel/value': mask \(N, 3"):
    jaxplain.units(m, "blocks", "filter")
  # the copies nnx.scan makes of the blocks keep their attribute path as a name stack, so a
  # composite chooses them: the same as on the network written with jnp under those names
  def named_hand(x):
    with jax.named_scope("_ScanNNX"):
      with jax.named_scope("inp"):
        h = x @ get("inp", "kernel") + get("inp", "bias")[None]
      for i in range(3):
        with jax.named_scope("blocks"):
          h = h @ get("blocks", "kernel")[i] + get("blocks", "bias")[i][None]
        h = jnp.tanh(h)
      with jax.named_scope("out"):
        return h @ get("out", "kernel") + get("out", "bias")[None]
  comp = rules.Composite(names=((r"_ScanNNX/blocks", rules.Epsilon(0.5)),))
  want = rules.lrp(named_hand, x, t, composite=comp)
  np.testing.assert_allclose(rules.lrp(m, x, t, composite=comp), want, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(want - rules.lrp(named_hand, x, t)).max()) > 1e-3 * float(
      jnp.abs(want).max())
  mask = np.zeros((2, 3, 6, 6), bool)
  mask[0, 1] = True            # every weight of the second block
  mask[1, :, :, 2] = True      # output unit 2 of every block
  out = jaxplain.sweep(m, x, {"blocks/kernel/value": mask})
  for n in range(2):
    P0 = dict(P)
    key = next(k for k in P if "'blocks'" in k and "'kernel'" in k)
    P[key] = np.where(mask[n], 0.0, P0[key])
    np.testing.assert_allclose(out[n], hand(x)[0], rtol=1e-5, atol=1e-6, err_msg=str(n))
    P.update(P0)


class _RematBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(4, (3, 3))(x))


class _RematLinen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.remat(_RematBlock)(name="b1")(x)
    x = nn.remat(_RematBlock)(name="b2")(x)
    return nn.Dense(3, name="head")(x.mean((1, 2)))


class _RematNNXBlock(nnx.Module):
  def __init__(self, cin, rngs):
    self.conv = nnx.Conv(cin, 4, (3, 3), rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.conv(x))


class _RematNNX(nnx.Module):
  def __init__(self, rngs):
    self.b1, self.b2 = _RematNNXBlock(2, rngs), _RematNNXBlock(4, rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    run = nnx.remat(lambda blk, h: blk(h))
    return self.head(run(self.b2, run(self.b1, x)).mean((1, 2)))


def _hand_cnn(k1, c1, k2, c2, kh, ch):
  """The two-block CNN above written with jnp, as functions: logits of the b2 output, b1
  output of x, b2 output of the b1 output."""
  conv = lambda z, k, c: jax.lax.conv_general_dilated(
      z, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + c[None, None, None]
  a1 = lambda x: jax.nn.relu(conv(x, k1, c1))
  b2 = lambda h: jax.nn.relu(conv(h, k2, c2))
  head = lambda a: a.mean((1, 2)) @ kh + ch[None]
  return head, a1, b2


def test_layers_inside_remat_are_hooked_in_linen_and_nnx():
  """Grad-CAM, capture and at_layer on a layer inside nn.remat / nnx.remat raised JAX's
  UnexpectedTracerError (linen: the hook's value leaked out of jax.checkpoint) or 'not called'
  (NNX: the copy nnx.remat makes was not hooked). Now each equals the network written with
  jnp on the same weights, Grad-CAM computed by hand (Selvaraju et al. eqs. 1-2)."""
  x = jax.random.normal(jax.random.key(1), (3, 6, 6, 2))
  t = jnp.array([0, 2, 1])
  lin = _RematLinen()
  v = lin.init(jax.random.key(0), x)
  p = v["params"]
  nx = _RematNNX(nnx.Rngs(0))
  q = nnx.state(nx, nnx.Param)
  cases = {
      "linen": (jaxplain.wrap(lin, v), "b1/Conv_0", "b2",
                _hand_cnn(p["b1"]["Conv_0"]["kernel"], p["b1"]["Conv_0"]["bias"],
                          p["b2"]["Conv_0"]["kernel"], p["b2"]["Conv_0"]["bias"],
                          p["head"]["kernel"], p["head"]["bias"])),
      "nnx": (jaxplain.wrap(nx), "b1/conv", "b2",
              _hand_cnn(q["b1"]["conv"]["kernel"][...], q["b1"]["conv"]["bias"][...],
                        q["b2"]["conv"]["kernel"][...], q["b2"]["conv"]["bias"][...],
                        q["head"]["kernel"][...], q["head"]["bias"][...])),
  }
  for name, (m, conv1, block2, (head, a1, b2)) in cases.items():
    a2 = lambda z: b2(a1(z))
    names = {e.primitive.name for e in jax.make_jaxpr(m)(x).eqns}
    assert names & {"remat2", "checkpoint"}, (name, names)
    np.testing.assert_allclose(m(x), head(a2(x)), rtol=1e-5, atol=1e-6, err_msg=name)
    _, caps = jax.jit(lambda z: m.capture(z, [conv1, block2]))(x)
    np.testing.assert_allclose(jax.nn.relu(caps[conv1][1]), a1(x), rtol=1e-5, atol=1e-6,
                               err_msg=name)
    np.testing.assert_allclose(caps[block2][1], a2(x), rtol=1e-5, atol=1e-6, err_msg=name)
    A = a2(x)
    dA = jax.grad(lambda a: jnp.take_along_axis(head(a), t[:, None], 1).sum())(A)
    cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", A, dA.mean((1, 2))))
    got = jax.jit(lambda z: jaxplain.grad_cam(m, z, t, layer=block2, upsample=None))(x)
    np.testing.assert_allclose(got, cam, rtol=1e-4, atol=1e-6, err_msg=name)
    f_h, h = jaxplain.at_layer(m, x, "b1")
    np.testing.assert_allclose(h, a1(x), rtol=1e-5, atol=1e-6, err_msg=name)
    h2 = h * 0.5
    np.testing.assert_allclose(f_h(h2), head(b2(h2)), rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_layer_inside_linen_scan_cannot_be_hooked_and_the_error_says_why():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return jnp.tanh(nn.Dense(6, name="fc")(h)), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(6, name="inp")(x)
      h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(name="blocks")(h, None)
      return nn.Dense(3, name="out")(h)

  x = jax.random.normal(jax.random.key(3), (5, 4))
  net = Net()
  v = net.init(jax.random.key(0), x)
  m = jaxplain.wrap(net, v)
  np.testing.assert_allclose(m.capture(x, "out")[0], net.apply(v, x), rtol=1e-6)
  with pytest.raises(ValueError, match=r"'blocks/fc' is called more than once.*nn\.scan"):
    m.capture(x, "blocks/fc")
  # units on the stacked kernel (3, 6, 6) used to report a 'conv' layer whose unit i was
  # unit i of every block; now it raises as NNX does, and the sweep it names edits one block
  with pytest.raises(ValueError, match=r"'blocks/fc' holds a stack of kernels \(3, 6, 6\) "
                                       r"with biases \(3, 6\).*sweep\(m, x, "
                                       r"\{'params/blocks/fc/kernel': mask \(N, 3, 6, 6\)"):
    jaxplain.units(m, "blocks/fc", "filter")
  mask = np.zeros((1, 3, 6, 6), bool)
  mask[0, 1] = True                                    # every weight of the second block
  p = v["params"]
  k = np.asarray(p["blocks"]["fc"]["kernel"])
  h = np.asarray(x @ p["inp"]["kernel"] + p["inp"]["bias"][None])
  for i in range(3):
    h = np.tanh(h @ (0 * k[i] if i == 1 else k[i]) + np.asarray(p["blocks"]["fc"]["bias"][i]))
  want = h @ np.asarray(p["out"]["kernel"]) + np.asarray(p["out"]["bias"])
  np.testing.assert_allclose(jaxplain.sweep(m, x, {"params/blocks/fc/kernel": mask})[0], want,
                             rtol=1e-4, atol=1e-5)


def test_keras_channels_first_layers_are_read_channels_last():
  """A Keras CNN with data_format="channels_first" gave Grad-CAM maps of the wrong shape
  ((B, C, H) read off (B, C, H, W)) and raw (B, C, H, W) captures; now both equal those of the
  same weights in a channels-last Keras model (Keras keeps one kernel layout for both)."""
  def build(fmt, shape):
    return keras.Sequential([
        keras.Input(shape),
        keras.layers.Conv2D(4, 3, padding="same", data_format=fmt, name="conv"),
        keras.layers.ReLU(name="relu"),
        keras.layers.AveragePooling2D(2, data_format=fmt, name="pool"),
        keras.layers.GlobalAveragePooling2D(data_format=fmt, name="gap"),
        keras.layers.Dense(3, name="fc")])
  last, first = build("channels_last", (6, 6, 2)), build("channels_first", (2, 6, 6))
  first.set_weights(last.get_weights())
  x = jax.random.normal(jax.random.key(5), (3, 6, 6, 2))
  ml, mf = jaxplain.wrap(last), jaxplain.wrap(first)
  xf = jnp.transpose(x, (0, 3, 1, 2))
  np.testing.assert_allclose(mf(xf), ml(x), rtol=1e-5, atol=1e-6)
  assert mf.channels_first and not ml.channels_first
  t = jnp.array([0, 2, 1])
  for layer in ("conv", "relu", "pool"):
    np.testing.assert_allclose(jaxplain.grad_cam(mf, xf, t, layer=layer),
                               jaxplain.grad_cam(ml, x, t, layer=layer), rtol=1e-4, atol=1e-6,
                               err_msg=layer)
  _, cf = mf.capture(xf, ["conv", "gap"])
  _, cl = ml.capture(x, ["conv", "gap"])
  for k in ("conv", "gap"):
    for a, b in zip(cf[k], cl[k]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=k)
  # a replaced output is written back in the layer's own layout
  np.testing.assert_allclose(mf.replace(xf, "relu", cl["conv"][1]),
                             ml.replace(x, "relu", cl["conv"][1]), rtol=1e-5, atol=1e-6)


class _TokNet(nn.Module):
  masked: bool = False

  def setup(self):
    self.embed = nn.Embed(20, 6)
    self.rnn = nn.RNN(nn.GRUCell(6))
    self.head = nn.Dense(3)

  def rest(self, h, ids=None):
    z = self.rnn(h)
    if ids is not None:   # a padding mask read from the token ids
      z = z * (ids != 0)[..., None].astype(z.dtype)
    return self.head(z.mean(axis=1))

  def __call__(self, ids):
    return self.rest(self.embed(ids), ids if self.masked else None)


def test_at_layer_explains_an_embedding_like_the_hand_split_model():
  """IG, SmoothGrad (whose rows interleave examples differently) and LRP of the model as a
  function of its embedding equal those of the same network split by hand; a model that reads
  the token ids again after the layer (a padding mask) is refused."""
  ids = jnp.array([[3, 7, 1, 0], [5, 5, 19, 2], [0, 11, 4, 8]])
  net = _TokNet()
  v = net.init(jax.random.key(0), ids)
  f_h, h = jaxplain.at_layer(jaxplain.wrap(net, v), ids, "embed")
  h_hand = net.apply(v, ids, method=lambda mod, i: mod.embed(i))
  rest = lambda z: net.apply(v, z, method=_TokNet.rest)  # noqa: E731
  np.testing.assert_allclose(h, h_hand, rtol=1e-6)
  np.testing.assert_allclose(f_h(h), net.apply(v, ids), rtol=1e-5, atol=1e-6)
  t = jnp.array([0, 2, 1])
  for name, method in (
      ("ig", lambda f, z: jaxplain.integrated_gradients(f, z, t, steps=8)),
      ("smoothgrad", lambda f, z: jaxplain.smoothgrad(f, z, t, key=jax.random.key(1),
                                                     num_samples=4, chunk=2)),
      ("lrp", lambda f, z: jaxplain.lrp(f, z, t))):
    np.testing.assert_allclose(jax.jit(lambda z, method=method: method(f_h, z))(h),
                               method(rest, h_hand), rtol=2e-4, atol=1e-6, err_msg=name)
  masked = _TokNet(masked=True)
  with pytest.raises(ValueError, match=r"reads x again after 'embed'.*with_input=True"):
    jaxplain.at_layer(jaxplain.wrap(masked, masked.init(jax.random.key(0), ids)), ids, "embed")


def test_per_example_pairs_each_example_with_its_padding_mask():
  """A model that reads its token ids again after the embedding (a padding mask): with
  ``at_layer(..., with_input=True)`` and ``per_example`` every method equals a Python loop
  over the examples, each explaining the hand-split model with its own ids."""
  ids = jnp.array([[3, 7, 1, 0], [5, 5, 19, 2], [0, 11, 4, 8]])
  net = _TokNet(masked=True)
  v = net.init(jax.random.key(0), ids)
  f_hx, h = jaxplain.at_layer(jaxplain.wrap(net, v), ids, "embed", with_input=True)
  np.testing.assert_allclose(f_hx(h, ids), net.apply(v, ids), rtol=1e-5, atol=1e-6)
  t = jnp.array([0, 2, 1])
  key = jax.random.key(1)
  base = 0.1 * jax.random.normal(jax.random.key(2), h.shape)
  methods = {
      "gradient": (jaxplain.gradient, {}),
      "integrated_gradients": (jaxplain.integrated_gradients, {"steps": 4, "baseline": base}),
      "smoothgrad": (jaxplain.smoothgrad, {"num_samples": 3, "key": key}),
      "lrp": (jaxplain.lrp, {}),
      "feature_ablation": (jaxplain.feature_ablation, {"feature_mask": jnp.arange(4)}),
  }
  for name, (method, kw) in methods.items():
    got = jaxplain.per_example(method, f_hx, h, t, side=ids, **kw)
    for b in (0, 2):   # padding at the end / at the start
      rest_b = lambda z, b=b: net.apply(v, z, jnp.broadcast_to(ids[b], (z.shape[0], 4)),
                                        method=_TokNet.rest)
      kb = dict(kw)
      if "key" in kb:
        kb["key"] = jax.random.fold_in(key, b)
      if "baseline" in kb:
        kb["baseline"] = base[b:b + 1]
      want = method(rest_b, h[b:b + 1], t[b:b + 1], **kb)[0]
      np.testing.assert_allclose(got[b], want, rtol=2e-4, atol=1e-6, err_msg=f"{name} {b}")
  # with one row per example the plain batched call pairs rows and ids already
  np.testing.assert_allclose(jaxplain.per_example(jaxplain.gradient, f_hx, h, t, side=ids),
                             jaxplain.gradient(lambda z: f_hx(z, ids), h, t), rtol=1e-5,
                             atol=1e-7)
  # the mask matters: explaining without it gives other maps
  assert not np.allclose(jaxplain.per_example(jaxplain.gradient, f_hx, h, t, side=ids),
                         jaxplain.per_example(jaxplain.gradient, f_hx, h, t,
                                              side=jnp.ones_like(ids)), atol=1e-4)
  all_t = jaxplain.per_example(jaxplain.gradient, f_hx, h, "all", side=ids)
  assert all_t.shape == (3, 3) + h.shape[1:]
  np.testing.assert_allclose(all_t[:, 1], jaxplain.per_example(jaxplain.gradient, f_hx, h, 1,
                                                               side=ids), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match=r"side: every array needs x's batch axis first"):
    jaxplain.per_example(jaxplain.gradient, f_hx, h, t, side=ids[:2])
  with pytest.raises(ValueError, match=r"target: class index out of range \[0, 3\)"):
    jaxplain.per_example(jaxplain.gradient, f_hx, h, jnp.array([0, 3, 1]), side=ids)


def test_at_layer_in_every_framework(four):
  p, x, models = four
  ref = np.asarray(hand_logits(p, x))
  a2 = np.asarray(hand_features(p, x))   # conv2's output, before its ReLU
  for name, (m, xm) in models.items():
    f_h, h = jaxplain.at_layer(m, xm, "conv2")
    np.testing.assert_allclose(h, a2, rtol=1e-5, atol=1e-6, err_msg=name)
    both = jnp.concatenate([h, 2 * h])    # any number of rows
    np.testing.assert_allclose(f_h(both)[:B], ref, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(f_h(both)[B:], hand_head(p, 2 * a2), rtol=1e-5, atol=1e-5,
                               err_msg=name)


def test_function_level_methods_take_a_bare_nnx_module_in_training_mode():
  """A fresh NNX module (training mode: batch norm updates its statistics) given as f raised
  NNX's 'Cannot mutate BatchStat from a different trace level' in every method; it is now
  used as wrap() uses it (an eval-mode copy): the same maps as a lambda over an eval-mode
  clone, and the user's module is left in training mode, unchanged."""
  from jaxplain import evaluation as E

  class BN(nnx.Module):
    def __init__(self, r):
      self.conv = nnx.Conv(2, 3, (3, 3), rngs=r)
      self.bn = nnx.BatchNorm(3, rngs=r)
      self.out = nnx.Linear(3 * 6 * 6, 4, rngs=r)

    def __call__(self, x):
      h = nnx.relu(self.bn(self.conv(x)))
      return self.out(h.reshape(h.shape[0], -1))

  net = BN(nnx.Rngs(0))
  ev = nnx.clone(net)
  ev.eval()
  plain = lambda z: ev(z)  # noqa: E731  (not a Module: used as given)
  x = jax.random.normal(jax.random.key(2), (3, 6, 6, 2))
  t = jnp.array([0, 3, 1])
  calls = {
      "gradient": lambda f: jaxplain.gradient(f, x, t),
      "smoothgrad": lambda f: jaxplain.smoothgrad(f, x, t, key=jax.random.key(0),
                                                  num_samples=4),
      "ig": lambda f: jaxplain.integrated_gradients(f, x, t, steps=8),
      "lrp": lambda f: jaxplain.lrp(f, x, t, composite="epsilon_plus"),
      "occlusion": lambda f: jaxplain.occlusion(f, x, t, patch=3, stride=3),
      "pixel_flipping": lambda f: E.pixel_flipping(f, x, t, x, steps=3),
  }
  for name, call in calls.items():
    np.testing.assert_allclose(call(net), call(plain), rtol=1e-5, atol=1e-6, err_msg=name)
  grad = lambda z, tt: jaxplain.gradient(plain, z, tt)  # noqa: E731
  ms = {"sparseness": lambda c: E.sparseness(c["attributions"])}
  res = [E.evaluate({"g": grad}, ms, (x, t), f=fm, key=jax.random.key(0), batch_size=3,
                    target="predicted", progress=False)["scores"]["g"]["sparseness"]
         for fm in (net, plain)]
  np.testing.assert_allclose(res[0], res[1], rtol=1e-6)
  assert net.bn.use_running_average is False
  np.testing.assert_allclose(net.bn.mean[...], 0.0)   # the statistics were not updated


def test_a_linen_module_in_training_mode_gets_the_inference_flag_in_the_error():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = False):
      x = nn.Dropout(0.5, deterministic=deterministic)(nn.Dense(8)(x))
      return nn.Dense(3)(nn.BatchNorm(use_running_average=deterministic)(x))

  x = jnp.ones((4, 5))
  v = M().init(jax.random.key(0), x, deterministic=True)
  with pytest.raises(ValueError, match=r"training mode.*apply_kwargs=\{'deterministic': True\}"):
    jaxplain.gradient(jaxplain.wrap(M(), v), x, 0)
  m = jaxplain.wrap(M(), v, apply_kwargs={"deterministic": True})
  np.testing.assert_allclose(m(x), M().apply(v, x, deterministic=True), rtol=1e-6)


def test_to_layer_explains_hidden_units_and_channels():
  """to_layer(model, layer) as the function explained: a unit's gradient, IG and LRP equal
  those of the network up to that layer written with jnp (IG completeness and LRP
  conservation of the unit's activation on a bias-free net); per='channel' sums the units."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(3, (3, 3), use_bias=False, name="c1")(x))
      h = nn.Conv(4, (3, 3), use_bias=False, name="c2")(h)
      return nn.Dense(2, name="head")(nn.relu(h).mean((1, 2)))

  x = jax.random.normal(jax.random.key(2), (2, 5, 5, 2))
  v = Net().init(jax.random.key(0), x)
  p = v["params"]
  conv = lambda z, k: jax.lax.conv_general_dilated(
      z, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  hand = lambda z: conv(jax.nn.relu(conv(z, p["c1"]["kernel"])), p["c2"]["kernel"])
  m = jaxplain.wrap(Net(), v)
  f = jaxplain.to_layer(m, "c2")
  np.testing.assert_allclose(f(x), hand(x).reshape(2, -1), rtol=1e-5, atol=1e-6)
  unit = int(np.ravel_multi_index((2, 3, 1), (5, 5, 4)))
  g_hand = jax.grad(lambda z: hand(z)[:, 2, 3, 1].sum())(x)
  np.testing.assert_allclose(jax.jit(lambda z: jaxplain.gradient(f, z, unit))(x), g_hand,
                             rtol=1e-5, atol=1e-7)
  ig = jaxplain.integrated_gradients(f, x, unit, steps=64)
  np.testing.assert_allclose(np.asarray(ig).sum((1, 2, 3)), hand(x)[:, 2, 3, 1],
                             rtol=2e-3, atol=1e-4)          # completeness (f(0) = 0)
  hand_units = lambda z: hand(z).reshape(z.shape[0], -1)
  np.testing.assert_allclose(jaxplain.lrp(f, x, unit, epsilon=1e-6),
                             jaxplain.lrp(hand_units, x, unit, epsilon=1e-6), rtol=1e-4,
                             atol=1e-6)
  r = jaxplain.lrp(f, x, unit, epsilon=1e-9)
  np.testing.assert_allclose(np.asarray(r).sum((1, 2, 3)), hand(x)[:, 2, 3, 1], rtol=1e-4,
                             atol=1e-6)
  fc = jaxplain.to_layer(m, "c2", per="channel")
  g_ch = jax.grad(lambda z: hand(z)[..., 3].sum())(x)
  np.testing.assert_allclose(jaxplain.gradient(fc, x, 3), g_ch, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="per: expected 'unit' or 'channel'"):
    jaxplain.to_layer(m, "c2", per="filter")


def test_a_keras_softmax_head_warns_and_the_recipe_in_the_warning_removes_it():
  import warnings  # pylint: disable=import-outside-toplevel
  km = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"),
                         keras.layers.Dense(3, activation="softmax")])
  x = jax.random.uniform(jax.random.key(0), (4, 6))
  probs = jaxplain.wrap(km)(x)
  with pytest.warns(jaxplain.ProbabilitiesWarning, match=r"model.layers\[-1\].activation"):
    jaxplain.gradient(jaxplain.wrap(km), x, 0)
  km.layers[-1].activation = keras.activations.linear
  m = jaxplain.wrap(km)
  np.testing.assert_allclose(jax.nn.softmax(m(x), axis=-1), probs, rtol=1e-5, atol=1e-7)
  with warnings.catch_warnings():
    warnings.simplefilter("error", jaxplain.ProbabilitiesWarning)
    jaxplain.gradient(m, x, 0)
