"""Explanations differentiated w.r.t. the model's parameters (attribution priors, PPI) equal
central finite differences of the same explanation in float64.

Biases are random, not zero: with zero biases an occluded or reference input puts ReLU
pre-activations exactly at 0, where JAX's derivative (0) and a central difference (half the
slope) legitimately differ.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxplain
from jaxplain import perturbation as P


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), name="conv", param_dtype=jnp.float64)(x))
    return nn.Dense(3, name="head", param_dtype=jnp.float64)(x.mean((1, 2)))


_KEY = jax.random.key(2)
_SEG = P.grid_segments((6, 6), 3)
METHODS = {
    "gradient": lambda f, x, t: jaxplain.gradient(f, x, t),
    "integrated_gradients": lambda f, x, t: jaxplain.integrated_gradients(f, x, t, steps=6),
    "smoothgrad": lambda f, x, t: jaxplain.smoothgrad(f, x, t, key=_KEY, num_samples=3),
    "wbp": lambda f, x, t: jaxplain.wbp(f, x, t),
    "lrp epsilon_plus": lambda f, x, t: jaxplain.lrp(f, x, t, composite="epsilon_plus"),
    "deeplift": lambda f, x, t: jaxplain.deeplift(f, x, t),
    "guided_backprop": lambda f, x, t: jaxplain.guided_backprop(f, x, t),
    "occlusion": lambda f, x, t: jaxplain.occlusion(f, x, t, patch=3),
    "kernel_shap": lambda f, x, t: jaxplain.kernel_shap(f, x, t, key=_KEY, n_samples=12,
                                                        feature_mask=_SEG),
    "gradient_shap": lambda f, x, t: jaxplain.gradient_shap(f, x, t, background=x, key=_KEY,
                                                            num_samples=3),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_parameter_gradient_of_an_explanation_equals_finite_differences(name):
  with jax.enable_x64(True):
    net = _CNN()
    x = jax.random.uniform(jax.random.key(0), (2, 6, 6, 1), jnp.float64)
    t = jnp.array([0, 2])
    p = net.init(jax.random.key(1), x)
    p = jax.tree_util.tree_map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(9), a.shape, a.dtype), p)
    d = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.key(5), a.shape, a.dtype),
                               p)
    method = METHODS[name]
    loss = lambda q: jnp.sum(method(lambda z: net.apply(q, z), x, t) ** 2)
    g = jax.grad(loss)(p)
    analytic = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree_util.tree_leaves(g),
                                                         jax.tree_util.tree_leaves(d)))
    eps = 1e-6
    shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * eps * b, p, d)
    fd = (float(loss(shift(1.0))) - float(loss(shift(-1.0)))) / (2 * eps)
    assert abs(analytic) > 1e-6, name                       # the check has something to check
    np.testing.assert_allclose(analytic, fd, rtol=1e-5, err_msg=name)
