"""noise_tunnel, gradient_shap (expected gradients) and deeplift_shap against loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxplain

_R = np.random.default_rng(8)
_W1 = jnp.asarray(_R.normal(size=(6, 8)), jnp.float32)
_W2 = jnp.asarray(_R.normal(size=(8, 3)), jnp.float32)


def mlp(x):
  return jnp.tanh(x @ _W1 - 0.1) @ _W2


def relu_mlp(x):
  return jax.nn.relu(x @ _W1 - 0.1) @ _W2


def _x(b=3):
  return jnp.asarray(np.random.default_rng(9).normal(size=(b, 6)), jnp.float32)


def _noise(key, n, x, level):
  # the documented draws: e_n ~ N(0, sigma^2), sigma = level * (max - min) per example
  span = x.max(1, keepdims=True) - x.min(1, keepdims=True)
  return jax.random.normal(key, (n,) + x.shape, x.dtype) * (level * span)[None]


def test_noise_tunnel_equals_a_loop_over_the_noisy_copies():
  x, t, key = _x(), jnp.array([0, 2, 1]), jax.random.key(3)
  e = _noise(key, 5, x, 0.2)
  for method, kw in ((jaxplain.integrated_gradients, {"steps": 8}),
                     (jaxplain.lrp, {"composite": "epsilon_plus"}),
                     (jaxplain.gradient_x_input, {})):
    loop = np.stack([np.asarray(method(mlp, x + e[n], t, **kw)) for n in range(5)])
    for form, want in (("mean", loop.mean(0)), ("squared", (loop ** 2).mean(0)),
                       ("vargrad", loop.var(0))):
      for chunk in (2, None):
        got = jaxplain.noise_tunnel(method, mlp, x, t, key=key, num_samples=5,
                                    noise_level=0.2, form=form, chunk=chunk, **kw)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6,
                                   err_msg=f"{method.__name__} {form} {chunk}")
  # with the gradient it is SmoothGrad (the same draws), also under jit
  sg = jaxplain.smoothgrad(mlp, x, t, key=key, num_samples=5, noise_level=0.2)
  nt = jax.jit(lambda z: jaxplain.noise_tunnel(jaxplain.gradient, mlp, z, t, key=key,
                                               num_samples=5, noise_level=0.2))(x)
  np.testing.assert_allclose(nt, sg, rtol=1e-5, atol=1e-7)
  # every target at once passes through
  every = jaxplain.noise_tunnel(jaxplain.gradient, mlp, x, "all", key=key, num_samples=3)
  assert every.shape == (3, 3, 6)
  with pytest.raises(TypeError, match="method: expected an attribution function"):
    jaxplain.noise_tunnel("ig", mlp, x, t, key=key)
  with pytest.raises(ValueError, match="form: expected one of"):
    jaxplain.noise_tunnel(jaxplain.gradient, mlp, x, t, key=key, form="max")


def test_gradient_shap_follows_its_draws_and_is_complete_in_expectation():
  x, t, key = _x(), jnp.array([1, 0, 2]), jax.random.key(4)
  bg = jnp.asarray(np.random.default_rng(10).normal(size=(7, 6)), jnp.float32)
  n = 6
  got = jaxplain.gradient_shap(mlp, x, t, background=bg, key=key, num_samples=n, chunk=4,
                               stdev=0.1)
  # the documented draws, one Python loop over samples and examples with jax.grad
  k_idx, k_alpha, k_noise = jax.random.split(key, 3)
  idx = np.asarray(jax.random.randint(k_idx, (n, 3), 0, 7))
  alpha = np.asarray(jax.random.uniform(k_alpha, (n, 3), jnp.float32))
  noise = np.asarray(jax.random.normal(k_noise, (n, 3, 6), jnp.float32)) * 0.1
  want = np.zeros((3, 6))
  for s in range(n):
    for b in range(3):
      xn = np.asarray(x[b]) + noise[s, b]
      base = np.asarray(bg[idx[s, b]])
      g = jax.grad(lambda z: mlp(z[None])[0, t[b]])(jnp.asarray(base + alpha[s, b] * (xn - base)))
      want[b] += np.asarray(g) * (xn - base) / n
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # completeness in expectation: sum ~ f(x)[t] - mean_b f(b)[t] within 4 standard errors
  big = 2048
  draws = jax.jit(lambda k: jaxplain.gradient_shap(mlp, x, t, background=bg, key=k,
                                                   num_samples=big, chunk=256))(key)
  gap = np.asarray(mlp(x))[np.arange(3), t] - np.asarray(mlp(bg)).mean(0)[np.asarray(t)]
  # the standard error from the per-draw sums (a separate small run)
  per_draw = np.stack([np.asarray(jaxplain.gradient_shap(
      mlp, x, t, background=bg, key=jax.random.fold_in(key, i), num_samples=1)).sum(1)
      for i in range(64)])
  se = per_draw.std(0) / np.sqrt(big)
  assert np.all(np.abs(np.asarray(draws).sum(1) - gap) < 4 * se + 1e-4), (draws.sum(1), gap, se)


def test_deeplift_shap_is_the_mean_over_references_and_sums_to_the_mean_delta():
  x, t = _x(), jnp.array([2, 2, 0])
  bg = jnp.asarray(np.random.default_rng(11).normal(size=(5, 6)), jnp.float32)
  loop = np.mean([np.asarray(jaxplain.deeplift(relu_mlp, x, t, reference=bg[j][None]))
                  for j in range(5)], axis=0)
  for chunk in (2, None):
    got = jax.jit(lambda z: jaxplain.deeplift_shap(relu_mlp, z, t, background=bg,
                                                   chunk=chunk))(x)
    np.testing.assert_allclose(got, loop, rtol=1e-5, atol=1e-6)
  delta = np.asarray(relu_mlp(x))[np.arange(3), t] - np.asarray(relu_mlp(bg)).mean(0)[np.asarray(t)]
  np.testing.assert_allclose(np.asarray(got).sum(1), delta, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=r"background: expected \(M, 6\)"):
    jaxplain.deeplift_shap(relu_mlp, x, t, background=bg[:, :4])


def test_gradient_shap_with_two_inputs_and_errors():
  a, c = _x(), _x()[:, :2]
  f = lambda xs: mlp(jnp.concatenate([xs[0][:, :4], xs[1]], 1))
  one = lambda z: mlp(jnp.concatenate([z[:, :4], z[:, 6:]], 1))
  bg = (jnp.zeros((4, 6)), jnp.ones((4, 2)))
  key = jax.random.key(5)
  got = jaxplain.gradient_shap(f, (a, c), 0, background=bg, key=key, num_samples=4)
  want = jaxplain.gradient_shap(one, jnp.concatenate([a, c], 1), 0,
                                background=jnp.concatenate(bg, 1), key=key, num_samples=4)
  np.testing.assert_allclose(got[0], want[:, :6], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[1], want[:, 6:], rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="target: gradient_shap takes one target"):
    jaxplain.gradient_shap(mlp, a, "all", background=a, key=key)
  with pytest.raises(ValueError, match="contains 1 non-finite"):
    jaxplain.gradient_shap(mlp, a, 0, background=a.at[0, 0].set(jnp.nan), key=key)


def test_noise_tunnel_takes_an_nnx_module_and_several_inputs():
  # noise_tunnel's first argument is the method: the model and x come second and third, and
  # a bare NNX module with batch norm raised "Cannot mutate BatchStat from a different
  # trace level"; a tuple x met `x + noise` unpacked
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1, self.bn, self.fc2 = nnx.Linear(6, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs), \
          nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.relu(self.bn(self.fc1(x))))

  net = Net(nnx.Rngs(0))
  x, t, key = _x(), jnp.array([0, 1, 2]), jax.random.key(6)
  e = _noise(key, 3, x, 0.15)
  m = jaxplain.wrap(net)                      # the eval-mode copy the methods use
  loop = np.mean([np.asarray(jaxplain.lrp(m, x + e[n], t)) for n in range(3)], axis=0)
  got = jaxplain.noise_tunnel(jaxplain.lrp, net, x, t, key=key, num_samples=3)
  np.testing.assert_allclose(got, loop, rtol=1e-5, atol=1e-6)
  a, c = x[:, :4], x[:, 4:]
  two = lambda xs: mlp(jnp.concatenate([xs[0], xs[1]], 1))
  got = jaxplain.noise_tunnel(jaxplain.integrated_gradients, two, (a, c), t, key=key,
                              num_samples=3, steps=8)
  want = jaxplain.noise_tunnel(jaxplain.integrated_gradients, mlp, x, t, key=key,
                               num_samples=3, steps=8)
  np.testing.assert_allclose(got[0], want[:, :4], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[1], want[:, 4:], rtol=1e-5, atol=1e-7)
  # a baseline given like x (a tuple) is packed with it (it used to reach IG unpacked)
  base = 0.3 * jax.random.normal(jax.random.key(8), x.shape)
  got = jaxplain.noise_tunnel(jaxplain.integrated_gradients, two, (a, c), t, key=key,
                              num_samples=3, steps=8, baseline=(base[:, :4], base[:, 4:]))
  want = jaxplain.noise_tunnel(jaxplain.integrated_gradients, mlp, x, t, key=key,
                               num_samples=3, steps=8, baseline=base)
  np.testing.assert_allclose(got[0], want[:, :4], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[1], want[:, 4:], rtol=1e-5, atol=1e-7)
