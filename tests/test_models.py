"""Models: shapes, and the fast max pool against flax's reduce_window pool (value and grad)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxplain import models


@pytest.mark.parametrize("model,shape", [
    (models.LeNet(), (2, 28, 28, 1)),
    (models.CNN003(num_classes=10, widths=(4, 4, 8, 8, 8, 8), hidden=(16, 8)), (2, 16, 16, 1)),
    (models.SmallCNN(), (2, 32, 32, 3)),
    (models.SmallVGG(widths=(4, 8), hidden=16), (2, 16, 16, 3)),
    (models.ResNetSmall(), (2, 16, 16, 3)),
])
def test_model_shapes(model, shape):
  # jitted: one compile each instead of op-by-op dispatch (the slowest tests of the suite)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape))
  out = jax.jit(model.apply)(variables, jnp.ones(shape))
  assert out.shape == (shape[0], model.num_classes)
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_matches_flax(ties):
  x = jax.random.normal(jax.random.key(1), (3, 6, 8, 5))
  if ties:  # the Integrated-Gradients black baseline: every window ties
    x = jnp.round(x) * 0.0 + jnp.where(x > 0, 1.0, 0.0)
  ref = lambda x: nn.max_pool(x, (2, 2), (2, 2))
  w = jax.random.normal(jax.random.key(2), (3, 3, 4, 5))
  np.testing.assert_array_equal(models.max_pool_2x2(x), ref(x))
  g = jax.grad(lambda x: jnp.sum(models.max_pool_2x2(x) * w))(x)
  g_ref = jax.grad(lambda x: jnp.sum(ref(x) * w))(x)
  np.testing.assert_array_equal(g, g_ref)


def test_max_pool_forward_mode_second_order_and_rank3_match_flax():
  # the derivative is a custom_jvp (one-hot routing): forward mode, reverse over reverse
  # (PPI differentiates a saliency map) and an unbatched (H, W, C) input agree with flax
  x = jax.random.normal(jax.random.key(3), (2, 6, 4, 3))
  ref = lambda x: nn.max_pool(x, (2, 2), (2, 2))
  tx = jax.random.normal(jax.random.key(4), x.shape)
  _, t = jax.jvp(models.max_pool_2x2, (x,), (tx,))
  _, t_ref = jax.jvp(ref, (x,), (tx,))
  np.testing.assert_array_equal(t, t_ref)
  w = jax.random.normal(jax.random.key(5), (2, 3, 2, 3))
  inner = lambda pool: lambda x: jnp.sum(jnp.tanh(pool(x * x)) * w)
  outer = lambda pool: jax.grad(lambda x: jnp.sum(jax.grad(inner(pool))(x) ** 2))
  np.testing.assert_allclose(outer(models.max_pool_2x2)(x), outer(ref)(x), rtol=1e-6,
                             atol=1e-6)
  assert float(jnp.abs(outer(ref)(x)).max()) > 1e-3
  np.testing.assert_array_equal(models.max_pool_2x2(x[0]), ref(x[:1])[0])
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(models.max_pool_2x2(v) * w[0]))(x[0]),
                                jax.grad(lambda v: jnp.sum(ref(v[None])[0] * w[0]))(x[0]))


def test_max_pool_propagates_nan_like_flax():
  # a NaN anywhere in a window (first corner or later) gives NaN there, as reduce_window
  x = jnp.arange(32.0).reshape(1, 4, 8, 1)
  x = x.at[0, 0, 0, 0].set(jnp.nan).at[0, 1, 3, 0].set(jnp.nan).at[0, 3, 7, 0].set(jnp.nan)
  ref = nn.max_pool(x, (2, 2), (2, 2))
  np.testing.assert_array_equal(np.isnan(models.max_pool_2x2(x)), np.isnan(ref))
  assert int(np.isnan(ref).sum()) == 3
  np.testing.assert_array_equal(models.max_pool_2x2(x), ref)  # NaNs compare equal here


def test_avg_pool_matches_flax():
  x = jax.random.normal(jax.random.key(1), (2, 4, 6, 3))
  with jax.numpy_dtype_promotion("standard"):  # flax divides by an int32 window size
    ref = nn.avg_pool(x, (2, 2), (2, 2))
  np.testing.assert_allclose(models.avg_pool_2x2(x), ref, rtol=1e-6)


def test_max_pool_rejects_odd():
  with pytest.raises(ValueError, match="even"):
    models.max_pool_2x2(jnp.zeros((1, 5, 4, 1)))
