"""Models with several inputs (x a tuple or dict of batches), as Captum's tuple inputs."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import jaxplain

_R = np.random.default_rng(3)
_W = {"k": jnp.asarray(_R.normal(size=(3, 3, 2, 3)) * 0.5, jnp.float32),
      "t": jnp.asarray(_R.normal(size=(5, 3)) * 0.5, jnp.float32),
      "h": jnp.asarray(_R.normal(size=(3, 4)), jnp.float32)}


def two_inputs(xs):
  """An image (B, 4, 4, 2) through a conv and a table (B, 5) through a dense layer, summed,
  then a ReLU and a head (bias-free: LRP-epsilon conserves relevance)."""
  img, tab = xs
  a = jax.nn.relu(jax.lax.conv_general_dilated(
      img, _W["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).mean((1, 2))
  return jax.nn.relu(a + tab @ _W["t"]) @ _W["h"]


def one_input(z):
  """The same model written by hand on the two inputs concatenated, (B, 32 + 5)."""
  return two_inputs((z[:, :32].reshape(-1, 4, 4, 2), z[:, 32:]))


def _inputs(b=3):
  r = np.random.default_rng(4)
  return (jnp.asarray(r.normal(size=(b, 4, 4, 2)), jnp.float32),
          jnp.asarray(r.normal(size=(b, 5)), jnp.float32))


def _split(z):
  return z[..., :32].reshape(z.shape[:-1] + (4, 4, 2)), z[..., 32:]


def _close(got, want, **kw):
  assert isinstance(got, tuple) and len(got) == 2
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, **kw)


def test_gradient_and_ig_equal_jax_grad_of_the_tuple():
  x = _inputs()
  t = jnp.array([0, 3, 1])
  logit = lambda xs: jnp.take_along_axis(two_inputs(xs), t[:, None], 1).sum()
  want = jax.grad(logit)(x)                       # JAX differentiates the tuple itself
  _close(jaxplain.gradient(two_inputs, x, t), want, rtol=1e-5, atol=1e-7)
  _close(jaxplain.gradient_x_input(two_inputs, x, t),
         tuple(g * a for g, a in zip(want, x)), rtol=1e-5, atol=1e-7)
  # IG: Gauss-Legendre by a Python loop over the nodes, on the tuple, baseline a tuple
  base = (jnp.full_like(x[0], 0.1), jnp.zeros_like(x[1]))
  a, w = scipy.special.roots_legendre(16)
  a, w = (a + 1) / 2, w / 2
  acc = [np.zeros(v.shape) for v in x]
  for ai, wi in zip(a, w):
    g = jax.grad(logit)(tuple(b0 + float(ai) * (v - b0) for v, b0 in zip(x, base)))
    for s, gi in zip(acc, g):
      s += wi * np.asarray(gi, np.float64)
  want_ig = tuple(s * np.asarray(v - b0) for s, v, b0 in zip(acc, x, base))
  ig, gap = jaxplain.integrated_gradients(two_inputs, x, t, steps=16, baseline=base,
                                          return_gap=True)
  _close(ig, want_ig, rtol=1e-4, atol=1e-6)
  assert gap.shape == (3,)
  # exact IG (ReLU network): completeness across both inputs, checked by completeness_gap
  ex = jaxplain.integrated_gradients(two_inputs, x, t, method="exact", baseline=base)
  np.testing.assert_allclose(jaxplain.completeness_gap(two_inputs, x, t, ex, baseline=base),
                             0.0, atol=1e-4)
  delta = np.asarray(jnp.take_along_axis(two_inputs(x) - two_inputs(base), t[:, None], 1))[:, 0]
  total = sum(np.asarray(v).reshape(3, -1).sum(1) for v in ex)
  np.testing.assert_allclose(total, delta, rtol=1e-4, atol=1e-5)


def test_rule_methods_and_smoothgrad_equal_the_model_on_one_concatenated_input():
  x = _inputs()
  z = jnp.concatenate([x[0].reshape(3, -1), x[1]], axis=1)
  t = jnp.array([2, 0, 1])
  key = jax.random.key(7)
  for name, call in {
      "wbp": lambda f, v: jaxplain.wbp(f, v, t),
      "lrp": lambda f, v: jaxplain.lrp(f, v, t, epsilon=0.01),
      "lrp epsilon_plus": lambda f, v: jaxplain.lrp(f, v, t, composite="epsilon_plus"),
      "deeplift": lambda f, v: jaxplain.deeplift(f, v, t),
      "guided_backprop": lambda f, v: jaxplain.guided_backprop(f, v, t),
      "deconvnet": lambda f, v: jaxplain.deconvnet(f, v, t),
      "smoothgrad": lambda f, v: jaxplain.smoothgrad(f, v, t, key=key, num_samples=4),
  }.items():
    _close(call(two_inputs, x), _split(call(one_input, z)), rtol=1e-5, atol=1e-7)
  # LRP-epsilon on the bias-free model conserves the target logit across both inputs
  r = jaxplain.lrp(two_inputs, x, t, epsilon=1e-9)
  total = sum(np.asarray(v, np.float64).reshape(3, -1).sum(1) for v in r)
  np.testing.assert_allclose(total, np.asarray(two_inputs(x))[np.arange(3), t], rtol=1e-4)
  # DeepLIFT with a reference tuple: summation to delta
  ref = (jnp.full_like(x[0], -0.2), jnp.full_like(x[1], 0.3))
  d = jaxplain.deeplift(two_inputs, x, t, reference=ref)
  total = sum(np.asarray(v, np.float64).reshape(3, -1).sum(1) for v in d)
  delta = np.asarray(two_inputs(x) - two_inputs(ref))[np.arange(3), t]
  np.testing.assert_allclose(total, delta, rtol=1e-4, atol=1e-5)


def test_every_target_dicts_and_jit():
  img, tab = _inputs(2)
  f = lambda d: two_inputs((d["image"], d["table"]))
  x = {"image": img, "table": tab}
  every = jax.jit(lambda v: jaxplain.gradient(f, v, "all"))(x)
  assert every["image"].shape == (2, 4, 4, 4, 2) and every["table"].shape == (2, 4, 5)
  for k in range(4):
    one = jaxplain.gradient(f, x, k)
    for name in x:
      np.testing.assert_allclose(every[name][:, k], one[name], rtol=1e-6, atol=1e-8)


def test_several_inputs_errors():
  x = _inputs()
  with pytest.raises(ValueError, match=r"baseline: 'blur' is not defined for several inputs"):
    jaxplain.integrated_gradients(two_inputs, x, 0, baseline="blur")
  with pytest.raises(ValueError, match=r"baseline: expected the structure of x"):
    jaxplain.integrated_gradients(two_inputs, x, 0, baseline=(jnp.zeros((3, 4, 4, 2)),))
  with pytest.raises(ValueError, match=r"baseline: input 1 has shape \(3, 6\)"):
    jaxplain.integrated_gradients(two_inputs, x, 0, baseline=(0.0, jnp.zeros((3, 6))))
  with pytest.raises(ValueError, match="different batch sizes"):
    jaxplain.gradient(two_inputs, (x[0], x[1][:2]), 0)
  with pytest.raises(TypeError, match="share one floating dtype"):
    jaxplain.gradient(two_inputs, (x[0], x[1].astype(jnp.int32)), 0)
  with pytest.raises(ValueError, match="class index out of range"):
    jaxplain.gradient(two_inputs, x, 9)


def test_perturbation_methods_with_one_feature_mask_per_input():
  # image features: the left and right halves (ids 0, 1, shared by the channels); table
  # features: ids 2..5 over its 5 columns (two columns share id 5): F = 6
  x = _inputs(2)
  img_ids = np.repeat(np.array([[0, 0, 1, 1]]), 4, axis=0)           # (H, W)
  tab_ids = np.array([2, 3, 4, 5, 5])
  masks = (jnp.asarray(img_ids), jnp.asarray(tab_ids))
  t = jnp.array([1, 3])
  base = (jnp.full_like(x[0], 0.5), 0.0)

  def value(on):  # f at x with the features outside `on` set to the baseline, per example
    keep_i = np.isin(img_ids, on)[None, :, :, None]
    keep_t = np.isin(tab_ids, on)[None]
    xs = (jnp.where(keep_i, x[0], base[0]), jnp.where(keep_t, x[1], 0.0))
    return np.asarray(two_inputs(xs), np.float64)[np.arange(2), t]

  every = list(range(6))
  ablation = {i: value(every) - value([j for j in every if j != i]) for i in every}
  phi = {i: 0.0 for i in every}     # exact Shapley values by enumerating the coalitions
  for r in range(6):
    for s in itertools.combinations(every, r):
      for i in every:
        if i not in s:
          wgt = math.factorial(r) * math.factorial(5 - r) / math.factorial(6)
          phi[i] = phi[i] + wgt * (value(list(s) + [i]) - value(list(s)))

  def per_feature(att):
    img, tab = (np.asarray(a) for a in att)
    return {0: img[:, 0, 0, 0], 1: img[:, 0, 3, 1], 2: tab[:, 0], 3: tab[:, 1], 4: tab[:, 2],
            5: tab[:, 4]}

  fa = jaxplain.feature_ablation(two_inputs, x, t, feature_mask=masks, baseline=base)
  assert fa[0].shape == x[0].shape and fa[1].shape == x[1].shape
  for i, v in per_feature(fa).items():
    np.testing.assert_allclose(v, ablation[i], rtol=1e-4, atol=1e-5, err_msg=str(i))
  ks = jaxplain.kernel_shap(two_inputs, x, t, feature_mask=masks, baseline=base,
                            n_samples=None)
  for i, v in per_feature(ks).items():
    np.testing.assert_allclose(v, phi[i], rtol=1e-3, atol=1e-4, err_msg=str(i))
  with pytest.raises(ValueError, match=r"feature_mask, input 1: .*leading part"):
    jaxplain.feature_ablation(two_inputs, x, t, feature_mask=(masks[0], jnp.zeros(3, int)))


def test_a_wrapped_linen_model_with_two_inputs_gradient_and_grad_cam():
  import flax.linen as nn

  class Two(nn.Module):
    @nn.compact
    def __call__(self, xs):
      img, tab = xs
      a = nn.relu(nn.Conv(3, (3, 3), name="conv")(img)).mean((1, 2))
      return nn.Dense(4, name="head")(nn.relu(a + nn.Dense(3, name="tab")(tab)))

  x = _inputs(3)
  v = Two().init(jax.random.key(0), x)
  m = jaxplain.wrap(Two(), v)
  t = jnp.array([1, 0, 3])
  p = v["params"]
  conv = lambda z: jax.lax.conv_general_dilated(
      z, p["conv"]["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"][None, None, None]
  head = lambda a, tab: jax.nn.relu(jax.nn.relu(a).mean((1, 2)) + tab @ p["tab"]["kernel"]
                                    + p["tab"]["bias"][None]) @ p["head"]["kernel"] + \
      p["head"]["bias"][None]
  pick = lambda out: jnp.take_along_axis(out, t[:, None], 1).sum()
  np.testing.assert_allclose(m(x), head(conv(x[0]), x[1]), rtol=1e-5, atol=1e-6)
  _close(jaxplain.gradient(m, x, t), jax.grad(lambda xs: pick(head(conv(xs[0]), xs[1])))(x),
         rtol=1e-5, atol=1e-7)
  A = conv(x[0])
  dA = jax.grad(lambda a: pick(head(a, x[1])))(A)
  cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", A, dA.mean((1, 2))))
  np.testing.assert_allclose(jaxplain.grad_cam(m, x, t, layer="conv"), cam, rtol=1e-4,
                             atol=1e-6)


def test_a_nested_list_is_still_one_batch():
  # a list is read as one array (as jnp.asarray does), not as several inputs
  f = lambda x: jnp.stack([x.sum(1), (x ** 2).sum(1)], axis=1)
  g = jaxplain.gradient(f, [[1.0, 2.0], [3.0, 4.0]], 1)
  np.testing.assert_allclose(g, [[2.0, 4.0], [6.0, 8.0]])
