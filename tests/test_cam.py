"""Grad-CAM: against a hand computation with the model split by hand at the layer; linen =
NNX = (features, head) functions; per-example targets; nested layer names; errors."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxplain


class Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv")(x))


class TinyCam(nn.Module):
  """conv1 - relu - block/conv - relu - 2x2 avg pool - fc."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), padding="SAME", name="conv1")(x))
    x = Block(name="block")(x)
    x = jaxplain.models.avg_pool_2x2(x)
    return nn.Dense(5, name="fc")(x.reshape(x.shape[0], -1))


X_SHAPE = (3, 6, 6, 2)


def conv(x, p):
  return jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"][None, None, None]


def split_by_hand(p):
  """The same network cut after conv1: features(x) = conv1(x) (pre-ReLU), head(A) = rest."""
  def features(x):
    return conv(x, p["conv1"])

  def head(a):
    y = jax.nn.relu(conv(jax.nn.relu(a), p["block"]["conv"]))
    y = y.reshape(y.shape[0], 3, 2, 3, 2, 4).mean(axis=(2, 4))
    return y.reshape(y.shape[0], -1) @ p["fc"]["kernel"] + p["fc"]["bias"][None]
  return features, head


class TinyCamNNX(nnx.Module):

  def __init__(self, p):
    r = nnx.Rngs(0)
    self.conv1 = nnx.Conv(2, 3, (3, 3), padding="SAME", rngs=r)
    self.blocks = nnx.List([nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=r)])
    self.fc = nnx.Linear(36, 5, rngs=r)
    for mod, q in ((self.conv1, p["conv1"]), (self.blocks[0], p["block"]["conv"]),
                   (self.fc, p["fc"])):
      mod.kernel[...] = q["kernel"]
      mod.bias[...] = q["bias"]

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.blocks[0](x))
    return self.fc(jaxplain.models.avg_pool_2x2(x).reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def tiny():
  model = TinyCam()
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros(X_SHAPE))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=X_SHAPE), jnp.float32)
  return model, variables, x


def test_grad_cam_matches_hand_split_computation(tiny):
  model, variables, x = tiny
  p = variables["params"]
  features, head = split_by_hand(p)
  np.testing.assert_allclose(head(features(x)), model.apply(variables, x), rtol=1e-5, atol=1e-6)
  t = np.array([0, 4, 2])
  a = np.asarray(features(x))
  # d y[b, t_b] / d A, one example at a time
  g = np.stack([np.asarray(jax.grad(lambda ab: head(ab[None])[0, t[b]])(jnp.asarray(a[b])))
                for b in range(3)])
  alpha = g.mean(axis=(1, 2))
  raw = np.einsum("bhwc,bc->bhw", a, alpha)
  cam = jax.jit(lambda z: jaxplain.grad_cam(model, variables, z, jnp.asarray(t), layer="conv1",
                                            relu=False, upsample=None))(x)
  np.testing.assert_allclose(cam, raw, rtol=1e-4, atol=1e-6)
  assert raw.min() < 0  # so the ReLU flag is exercised
  cam_relu = jaxplain.grad_cam(model, variables, x, jnp.asarray(t), layer="conv1",
                               upsample=None)
  np.testing.assert_allclose(cam_relu, np.maximum(raw, 0), rtol=1e-4, atol=1e-6)
  # upsampling to the input size: nearest with an integer factor repeats each cell
  cam_up = jaxplain.grad_cam(model, variables, x, jnp.asarray(t), layer="block/conv",
                             upsample="nearest")
  cam_small = jaxplain.grad_cam(model, variables, x, jnp.asarray(t), layer="block/conv",
                                upsample=None)
  assert cam_up.shape == (3, 6, 6) and cam_small.shape == (3, 6, 6)
  np.testing.assert_allclose(cam_up, cam_small, rtol=1e-6)
  bil = jaxplain.grad_cam(model, variables, x, jnp.asarray(t), layer="conv1")
  np.testing.assert_allclose(bil, np.maximum(raw, 0), rtol=1e-4, atol=1e-6)  # same size


def test_nearest_and_bilinear_upsampling_of_a_coarser_layer():
  class Strided(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(3, (3, 3), strides=2, padding="SAME", name="down")(x))
      return nn.Dense(2, name="fc")(x.reshape(x.shape[0], -1))
  model = Strided()
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 8, 8, 1)), jnp.float32)
  v = jax.jit(model.init)(jax.random.key(1), x)
  small = np.asarray(jaxplain.grad_cam(model, v, x, 1, layer="down", upsample=None))
  assert small.shape == (2, 4, 4)
  near = jaxplain.grad_cam(model, v, x, 1, layer="down", upsample="nearest")
  np.testing.assert_allclose(near, small.repeat(2, axis=1).repeat(2, axis=2), rtol=1e-6)
  bil = np.asarray(jaxplain.grad_cam(model, v, x, 1, layer="down"))
  # half-pixel-centred bilinear: output pixel 1 of 8 sits at input coordinate 0.25 of 4
  np.testing.assert_allclose(bil[:, 1, 0], 0.75 * small[:, 0, 0] + 0.25 * small[:, 1, 0],
                             rtol=1e-5, atol=1e-7)


def test_linen_nnx_and_plain_functions_agree(tiny):
  model, variables, x = tiny
  p = variables["params"]
  t = jnp.array([1, 1, 3])
  ref = jaxplain.grad_cam(model, variables, x, t, layer="block/conv", relu=False)
  nnx_model = TinyCamNNX(p)
  np.testing.assert_allclose(nnx_model(x), model.apply(variables, x), rtol=1e-5, atol=1e-6)
  got = jaxplain.grad_cam(nnx_model, None, x, t, layer="blocks/0", relu=False)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)

  def features(z):
    return conv(jax.nn.relu(conv(z, p["conv1"])), p["block"]["conv"])

  def head(a):
    y = jaxplain.models.avg_pool_2x2(jax.nn.relu(a))
    return y.reshape(y.shape[0], -1) @ p["fc"]["kernel"] + p["fc"]["bias"][None]
  plain = jaxplain.grad_cam((features, head), None, x, t, relu=False)
  np.testing.assert_allclose(plain, ref, rtol=1e-4, atol=1e-6)


def test_per_example_targets(tiny):
  model, variables, x = tiny
  t = jnp.array([4, 0, 2])
  cam = jaxplain.grad_cam(model, variables, x, t, layer="conv1", relu=False)
  for b in range(3):
    one = jaxplain.grad_cam(model, variables, x[b:b + 1], int(t[b]), layer="conv1",
                            relu=False)
    np.testing.assert_allclose(cam[b:b + 1], one, rtol=1e-4, atol=1e-6)


def test_bad_input_errors_name_the_argument(tiny):
  model, variables, x = tiny
  with pytest.raises(ValueError, match=r"layer: unknown layer name 'conv9'; available layers: "
                                       r"'conv1', 'block', 'block/conv', 'fc'"):
    jaxplain.grad_cam(model, variables, x, 0, layer="conv9")
  with pytest.raises(ValueError, match=r"layer: unknown layer name 'conv'; available layers: "
                                       r"'conv1', 'blocks/0', 'fc'"):
    jaxplain.grad_cam(TinyCamNNX(variables["params"]), x, 0, layer="conv")
  with pytest.raises(ValueError, match=r"target: class index out of range \[0, 5\)"):
    jaxplain.grad_cam(model, variables, x, 5, layer="conv1")
  with pytest.raises(ValueError, match=r"x: expected a batch \(B, ...\)"):
    jaxplain.grad_cam(model, variables, x[0, 0, 0], 0, layer="conv1")
  # one image (H, W, C): the model's own shape error used to surface (flax's param shape)
  for method in (jaxplain.grad_cam, jaxplain.guided_grad_cam):
    with pytest.raises(ValueError, match=r"got one example of shape .* \(use x\[None\]"):
      method(jaxplain.wrap(model, variables), x[0], 0, layer="conv1")
  with pytest.raises(ValueError, match="x: contains 1 non-finite"):
    jaxplain.grad_cam(model, variables, x.at[0, 0, 0, 0].set(jnp.nan), 0, layer="conv1")
  with pytest.raises(ValueError, match="upsample: expected one of"):
    jaxplain.grad_cam(model, variables, x, 0, layer="conv1", upsample="cubic")
  with pytest.raises(TypeError, match="obj: expected a flax.linen Module"):
    jaxplain.grad_cam(lambda z: z, x, 0, layer="conv1")
  with pytest.raises(ValueError, match="variables: a flax.linen module needs its variables"):
    jaxplain.grad_cam(model, x, 0, layer="conv1")


def test_dense_features_give_a_map_over_features(tiny):
  """(B, C) features: ReLU(d y_t / d A * A), checked against the hand split at fc's input."""
  model, variables, x = tiny
  p = variables["params"]
  t = jnp.array([0, 1, 2])

  class Flat(nn.Module):
    @nn.compact
    def __call__(self, z):
      z = nn.relu(nn.Conv(3, (3, 3), padding="SAME", name="conv1")(z))
      z = Block(name="block")(z)
      z = jaxplain.models.avg_pool_2x2(z).reshape(z.shape[0], -1)
      z = nn.Dense(8, name="hidden")(z)
      return nn.Dense(5, name="fc")(jnp.tanh(z))
  flat = Flat()
  v = flat.init(jax.random.key(3), x)
  q = v["params"]
  a = np.asarray(flat.apply(v, x, capture_intermediates=True)[1]["intermediates"]["hidden"]
                 ["__call__"][0])
  head = lambda h: jnp.tanh(h) @ q["fc"]["kernel"] + q["fc"]["bias"][None]  # noqa: E731
  g = np.stack([np.asarray(jax.grad(lambda h: head(h[None])[0, t[b]])(jnp.asarray(a[b])))
                for b in range(3)])
  got = jaxplain.grad_cam(jaxplain.wrap(flat, v), x, t, layer="hidden")
  np.testing.assert_allclose(got, np.maximum(g * a, 0), rtol=1e-5, atol=1e-7)
  del p


def test_guided_grad_cam_is_guided_backprop_times_the_upsampled_map():
  """Against an independent formulation: guided backprop as jax.grad with the ReLU backward
  replaced by a custom_vjp, times Grad-CAM computed by hand and upsampled with
  jax.image.resize; for a channels-last linen CNN."""
  import flax.linen as nn

  @jax.custom_vjp
  def grelu(z):
    return jax.nn.relu(z)
  grelu.defvjp(lambda z: (jax.nn.relu(z), z),
               lambda z, g: (jnp.where((z > 0) & (g > 0), g, 0.0),))

  class Net(nn.Module):
    act: Callable = jax.nn.relu

    @nn.compact
    def __call__(self, x):
      h = self.act(nn.Conv(4, (3, 3), name="c1")(x))
      h = nn.max_pool(h, (2, 2), (2, 2))
      h = self.act(nn.Conv(5, (3, 3), name="c2")(h))
      return nn.Dense(3, name="head")(h.mean((1, 2)))

  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
  t = jnp.array([2, 0])
  v = Net().init(jax.random.key(0), x)
  got = jaxplain.guided_grad_cam(jaxplain.wrap(Net(), v), x, t, layer="c2")
  pick = lambda out: jnp.take_along_axis(out, t[:, None], 1).sum()
  gbp = jax.grad(lambda z: pick(Net(act=grelu).apply(v, z)))(x)
  p = v["params"]
  a = Net().apply(v, x, capture_intermediates=True, mutable=["intermediates"])[1]
  A = a["intermediates"]["c2"]["__call__"][0]
  head = lambda h: jax.nn.relu(h).mean((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"][None]
  dA = jax.grad(lambda h: pick(head(h)))(A)
  cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", A, dA.mean((1, 2))))
  cam = jax.image.resize(cam, (2, 8, 8), "bilinear")
  np.testing.assert_allclose(got, gbp * cam[..., None], rtol=1e-4, atol=1e-6)
