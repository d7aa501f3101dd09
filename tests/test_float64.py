"""Everything runs in float64 (jax_enable_x64) and returns float64 close to the float32 run.

Under x64 JAX's default integer is int64: ranks from argsort, a sum of booleans, argmax and
randint met int32 targets and counts (strict promotion raised; a float32 SSIM window met a
float64 map in a convolution, which raised under any promotion), and rank correlations and
histograms came back in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxplain
from jaxplain import evaluation as E
from jaxplain import metrics
from jaxplain import perturbation as P


class _CNN(nn.Module):
  dtype: type = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), name="conv", param_dtype=self.dtype)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.Dense(3, name="head", param_dtype=self.dtype)(x.reshape(x.shape[0], -1))


_SEG = P.grid_segments((8, 8), 4)


def _explain(net):
  """The gradient of ``net`` with parameters ``q``: the randomisation checks' explainer."""
  return lambda q, z, tt: jaxplain.gradient(lambda zz: net.apply({"params": q}, zz), z, tt)
_MASK = np.zeros((2, 8, 8), bool)
_MASK[:, :4, :4] = True

CALLS = {  # (f, net, params, x, t, key, a) -> result
    "deletion_curve": lambda f, n, p, x, t, k, a: metrics.deletion_curve(f, x, t, a, steps=3),
    "random_order_curve": lambda f, n, p, x, t, k, a: metrics.random_order_curve(
        f, x, t, key=k, num_orders=2, steps=3),
    "shift_invariance": lambda f, n, p, x, t, k, a: metrics.shift_invariance(
        f, lambda z, tt: jaxplain.gradient(f, z, tt), x, t, 0.1)["ssim"],
    "cascading_randomization": lambda f, n, p, x, t, k, a: metrics.cascading_randomization(
        _explain(n), p["params"], x, t, random_params=_random(p), layers=["head", "conv"])["ssim"],
    "ssim": lambda f, n, p, x, t, k, a: jaxplain.ssim(a[..., 0], a[..., 0] ** 2),
    "rank_correlation": lambda f, n, p, x, t, k, a: jaxplain.rank_correlation(a, a ** 2),
    "road": lambda f, n, p, x, t, k, a: E.road(f, x, t, a, key=k, percentages=(10, 50)),
    "irof": lambda f, n, p, x, t, k, a: E.irof(f, x, t, a, segments=_SEG)["irof"],
    "relevance_rank_accuracy": lambda f, n, p, x, t, k, a: E.relevance_rank_accuracy(a, _MASK),
    "auc": lambda f, n, p, x, t, k, a: E.auc(a, _MASK),
    "random_logit": lambda f, n, p, x, t, k, a: E.random_logit(
        lambda z, tt: jaxplain.gradient(f, z, tt), x, t, key=k, num_classes=3),
    "emprt": lambda f, n, p, x, t, k, a: E.emprt(
        _explain(n), p["params"], x, t, random_params=_random(p))["emprt"],
    "kernel_shap": lambda f, n, p, x, t, k, a: jaxplain.kernel_shap(
        f, x, t, key=k, n_samples=8, feature_mask=_SEG),
    "integrated_gradients tol": lambda f, n, p, x, t, k, a: jaxplain.integrated_gradients(
        f, x, t, tol=0.01),
    "lrp epsilon_gamma_box": lambda f, n, p, x, t, k, a: jaxplain.lrp(
        f, x, t, composite="epsilon_gamma_box", low=0.0, high=1.0),
}


def _random(p):
  """Re-initialised parameters, the same values in both precisions (a key's draws differ)."""
  r = _CNN().init(jax.random.key(7), jnp.zeros((1, 8, 8, 1), jnp.float32))["params"]
  return jax.tree_util.tree_map(lambda v, q: v.astype(q.dtype), r, p["params"])


def _run(name, dtype):
  net = _CNN(dtype)
  x32 = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), jnp.float32)
  p = _CNN().init(jax.random.key(1), x32)       # the same values in both precisions
  p = jax.tree_util.tree_map(
      lambda v: (v + 0.1 * jax.random.normal(jax.random.key(9), v.shape, v.dtype)).astype(dtype),
      p)
  x = x32.astype(dtype)
  f = lambda z: net.apply(p, z)
  t = jnp.array([0, 2])
  a = jaxplain.gradient(f, x, t)
  return CALLS[name](f, net, p, x, t, jax.random.key(2), a)


@pytest.mark.parametrize("name", list(CALLS))
def test_runs_in_float64_and_agrees_with_float32(name):
  with jax.enable_x64(True):
    out64 = _run(name, jnp.float64)
    assert out64.dtype == jnp.float64, (name, out64.dtype)
    out32 = _run(name, jnp.float32)
  np.testing.assert_allclose(np.asarray(out64), np.asarray(out32), rtol=2e-3, atol=2e-4,
                             err_msg=name)
