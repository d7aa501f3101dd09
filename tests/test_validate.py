"""The one input contract (jaxplain._validate, jaxplain._maps) across the public functions:
target range, NaN / inf, unbatched input, tuple-returning models, bad regexes, and one
vocabulary for channel reductions and normalisations. Each case is what a new user hit."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxplain
from jaxplain import interventions as iv
from jaxplain import metrics, plot, ppi

K = 3


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (3, 3), name="conv")(x))
    return nn.Dense(K, name="fc")(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def cnn():
  model = SmallCNN()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
  x = jax.random.uniform(jax.random.key(1), (2, 6, 6, 3))
  return model, variables, functools.partial(model.apply, variables), x


@pytest.fixture(scope="module")
def linear():
  w = jax.random.normal(jax.random.key(2), (4 * 4 * 1, K))
  f = lambda x: x.reshape(x.shape[0], -1) @ w
  x = jax.random.uniform(jax.random.key(3), (3, 4, 4, 1))
  return f, w, x


# -- 2.3 target range -------------------------------------------------------------------------

def test_concrete_target_out_of_range_raises_naming_target(linear, cnn):
  f, _, x = linear
  s = jnp.ones_like(x)
  for bad in (K, -1):
    with pytest.raises(ValueError, match=r"target: class index out of range \[0, 3\)"):
      metrics.deletion_curve(f, x, bad, s, steps=2)
    with pytest.raises(ValueError, match=r"target: class index out of range \[0, 3\)"):
      metrics.insertion_curve(f, x, bad, s, steps=2)
    with pytest.raises(ValueError, match=r"target: class index out of range \[0, 3\)"):
      metrics.shift_invariance(f, lambda z, t: z, x, bad, 0.5)
  model, variables, _, xc = cnn
  u = iv.units(variables, "fc", "weight", [[0, 0]])
  with pytest.raises(ValueError, match=r"target: class index out of range \[0, 3\)"):
    iv.first_order(model.apply, variables, xc, K, u)


def test_traced_bad_target_gives_nan_in_maps_gaps_and_curves_alike(linear):
  # under jit the value of the target is unknown: every method gives NaN for that example
  # (before: zero maps, while the gap and the curves wrapped -1 to the last class)
  f, w, x = linear
  t = jnp.array([1, K, -1])
  g = jax.jit(lambda x, t: jaxplain.gradient(f, x, t))(x, t)
  np.testing.assert_allclose(g[0].reshape(-1), w[:, 1], rtol=1e-6)
  ig, gap = jax.jit(lambda x, t: jaxplain.integrated_gradients(f, x, t, steps=4,
                                                               return_gap=True))(x, t)
  s = jax.jit(lambda x, t: jaxplain.wbp(f, x, t))(x, t)
  curve = jax.jit(lambda x, t: metrics.deletion_curve(f, x, t, x, steps=3))(x, t)
  occ = jax.jit(lambda x, t: jaxplain.occlusion(f, x, t, patch=2))(x, t)
  for name, a in {"gradient": g, "ig": ig, "gap": gap, "wbp": s, "curve": curve,
                  "occlusion": occ}.items():
    a = np.asarray(a).reshape(3, -1)
    assert np.all(np.isfinite(a[0])), name
    assert np.all(np.isnan(a[1:])), name
  np.testing.assert_allclose(gap[0], 0.0, atol=1e-5)  # linear f: IG is exact


# -- 2.4 NaN / inf ----------------------------------------------------------------------------

def test_nan_arguments_are_rejected_by_name(linear, cnn):
  f, _, x = linear
  with pytest.raises(ValueError, match="reference: contains 1 non-finite"):
    jaxplain.deeplift(f, x, 0, reference=jnp.zeros(x.shape[1:]).at[0, 0, 0].set(jnp.nan))
  bad = jnp.ones_like(x).at[0, 1, 1, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="saliency: contains 1 non-finite"):
    metrics.deletion_curve(f, x, 0, bad, steps=2)
  model, variables, _, xc = cnn
  u = iv.units(variables, "fc", "weight", [[0, 0], [1, 1]])
  with pytest.raises(ValueError, match="x: contains 1 non-finite"):
    iv.sweep(model.apply, variables, xc.at[0, 0, 0, 0].set(jnp.inf), u)
  with pytest.raises(ValueError, match="value: contains 1 non-finite"):
    iv.sweep(model.apply, variables, xc, u, value=jnp.nan)
  with pytest.raises(ValueError, match="value: contains 1 non-finite"):
    iv.set_value(variables, "params/fc/kernel", jnp.nan)


# -- 2.5 one example instead of a batch -------------------------------------------------------

def test_one_example_is_named_as_such(cnn):
  _, _, f, x = cnn
  one = x[0]  # (6, 6, 3): occlusion used to read it as a batch of 6 images of 6 x 3
  msg = r"x: expected a batch \(B, \.\.\.\); got one example of shape \(6, 6, 3\)"
  key = jax.random.key(0)
  for method in (jaxplain.gradient, jaxplain.integrated_gradients, jaxplain.wbp,
                 jaxplain.lrp, jaxplain.occlusion, jaxplain.feature_ablation,
                 lambda f, x, t: jaxplain.kernel_shap(f, x, t, key=key, n_samples=8),
                 lambda f, x, t: jaxplain.lime(f, x, t, key=key, n_samples=8),
                 lambda f, x, t: jaxplain.rise(f, x, t, key=key, n_masks=8),
                 lambda f, x, t: jaxplain.shapley_value_sampling(f, x, t, key=key,
                                                                  n_samples=1)):
    with pytest.raises(ValueError, match=msg):  # perturbation methods read it as 6 rows
      method(f, one, 0)
  # a batch of one still works, and agrees with the batch
  np.testing.assert_allclose(jaxplain.gradient(f, one[None], 0)[0],
                             jaxplain.gradient(f, x, 0)[0], rtol=1e-5, atol=1e-7)


# -- 2.6 a model that returns a tuple ---------------------------------------------------------

def test_tuple_output_is_rejected_with_how_to_select_the_logits(cnn):
  _, _, f, x = cnn
  f_tuple = lambda z: (f(z), [])  # the shape of Keras' stateless_call output
  msg = r"returned a tuple of 2 items.*lambda x: f\(x\)\[0\]"
  for method in (jaxplain.gradient, jaxplain.gradient_x_input, jaxplain.integrated_gradients,
                 jaxplain.wbp, jaxplain.deeplift, jaxplain.occlusion):
    with pytest.raises(TypeError, match=msg):
      method(f_tuple, x, 0)
  with pytest.raises(TypeError, match=msg):
    metrics.deletion_curve(f_tuple, x, 0, x, steps=2)
  with pytest.raises(TypeError, match=msg):
    metrics.shift_invariance(f_tuple, lambda z, t: z, x, 0, 0.5)


# -- 2.8 regex ----------------------------------------------------------------------------------

def test_invalid_regex_names_the_argument():
  with pytest.raises(ValueError, match=r"patterns: 'conv\[' \(position 1\) is not a valid "
                                       r"regular expression"):
    iv.select("fc/.*", "conv[")
  with pytest.raises(ValueError, match="patterns: "):
    iv.set_value({"fc": {"kernel": jnp.ones(2)}}, "fc/(kernel", 0.0)


# -- 2.9 one vocabulary -------------------------------------------------------------------------

def test_channel_reductions_mean_the_same_in_metrics_and_plot():
  a = np.array([1.0, -2.0]).reshape(1, 1, 1, 2)
  by_hand = {"sum_abs": 3.0, "sum": -1.0, "abs_of_sum": 1.0, "max_abs": 2.0}
  assert set(by_hand) == set(metrics._REDUCTIONS) == set(plot.GRAYSCALE_MODES)
  for name, want in by_hand.items():
    assert float(metrics.pixel_saliency(jnp.asarray(a, jnp.float32), reduce=name)[0, 0, 0]) \
        == want
    assert float(plot.to_grayscale(a, reduce=name)[0, 0, 0]) == want
  assert float(plot.to_grayscale(a)[0, 0, 0]) == float(metrics.pixel_saliency(a)[0, 0, 0]) == 3
  # the old ambiguous name fails everywhere, naming both new ones
  for call in (lambda: metrics.pixel_saliency(a, reduce="abs_sum"),
               lambda: plot.to_grayscale(a, reduce="abs_sum"),
               lambda: metrics.rank_correlation(a, a, reduce="abs_sum")):
    with pytest.raises(ValueError, match=r"reduce: 'abs_sum' is retired.*'sum_abs'.*'abs_of_sum'"):
      call()
  with pytest.raises(TypeError, match=r"mode: renamed to reduce="):
    plot.to_grayscale(a, mode="sum")
  with pytest.raises(TypeError, match=r"use jaxplain.pixel_saliency\(saliency, reduce=\"sum\"\)"):
    ppi.pixel_saliency(a, a)


def test_normalisations_mean_the_same_in_plot_and_ppi():
  m = np.array([[-1.0, 1.0], [2.0, 3.0]])
  by_hand = {"minmax": (m + 1) / 4, "relu_max": np.maximum(m, 0) / 3, "abs_max": np.abs(m) / 3,
             "signed_max": m / 3}
  for name, want in by_hand.items():
    np.testing.assert_allclose(plot.normalize(m, method=name, percentile=100), want, rtol=1e-12)
    if name != "signed_max":  # ppi keeps the [0, 1] ones (masks threshold them)
      got = ppi.normalize_saliency(jnp.asarray(m[None], jnp.float32), name, eps=0.0)[0]
      np.testing.assert_allclose(got, want, rtol=1e-6)
  with pytest.raises(ValueError, match=r"method: 'maxabs' is retired: use 'signed_max'"):
    plot.normalize(m, method="maxabs")
  with pytest.raises(ValueError, match=r"method: 'maxabs' is retired"):
    ppi.normalize_saliency(jnp.ones((1, 2)), "maxabs")
  with pytest.raises(ValueError, match=r"method: expected one of \('relu_max', 'abs_max', "
                                       r"'minmax'\) \(maps in \[0, 1\]\)"):
    ppi.normalize_saliency(jnp.ones((1, 2)), "signed_max")


def test_a_model_with_a_fixed_batch_size_is_named_as_such():
  # f works on x's 4 rows but fixes the batch; every method that calls it on other row
  # counts (IG's path points, SmoothGrad's noise, perturbations, metrics) says so up front
  # instead of failing inside f with a shape error of its own
  from jaxplain import evaluation
  w = jnp.ones((12, 3))
  f = lambda x: jax.nn.relu(x).reshape(4, -1) @ w
  x = jnp.ones((4, 2, 2, 3))
  key = jax.random.PRNGKey(0)
  np.testing.assert_allclose(f(x), jnp.full((4, 3), 12.0))  # fine at x itself
  calls = {
      "ig exact": lambda: jaxplain.integrated_gradients(f, x, 0, method="exact"),
      "ig tol": lambda: jaxplain.integrated_gradients(f, x, 0, tol=0.01),
      "ig": lambda: jaxplain.integrated_gradients(f, x, 0, steps=8),
      "smoothgrad": lambda: jaxplain.smoothgrad(f, x, 0, key=key),
      "feature_ablation": lambda: jaxplain.feature_ablation(f, x, 0),
      "kernel_shap": lambda: jaxplain.kernel_shap(f, x, 0, key=key),
      "pixel_flipping": lambda: evaluation.pixel_flipping(f, x, 0, x),
  }
  for name, call in calls.items():
    with pytest.raises(ValueError, match=r"fails on 8 rows .*reshape\(x.shape\[0\], -1\)"):
      call()
  # a model returning the wrong rows (no error inside f) is named the same way
  g = lambda x: jnp.ones((4, 3)) * x.sum()
  with pytest.raises(ValueError, match=r"4 rows but returns \(4, 3\) for 8 rows.*reshape"):
    jaxplain.integrated_gradients(g, x, 0)


def test_outputs_that_are_not_logits_get_the_reshaping_that_fits():
  x = jnp.ones((3, 4))
  with pytest.raises(ValueError, match=r"got shape \(3,\): one value per example .*"
                                       r"f\(x\)\[:, None\]` with target=0"):
    jaxplain.gradient(lambda z: z.sum(1), x, 0)
  with pytest.raises(ValueError, match=r"got shape \(3, 4, 2\): a value per position "
                                       r"\(B, 4, K\) .*f\(x\)\[:, i\]"):
    jaxplain.integrated_gradients(lambda z: jnp.stack([z, 2 * z], -1), x, 0)
  # the fix the first message gives works, and equals the closed form
  g = jaxplain.gradient(lambda z: (z ** 2).sum(1)[:, None], x * 3, 0)
  np.testing.assert_allclose(g, 6 * x)


def test_a_model_ending_in_a_softmax_is_warned_about_and_logits_are_not(cnn):
  import warnings  # pylint: disable=import-outside-toplevel
  _, _, f, x = cnn
  probs = lambda z: jax.nn.softmax(f(z), axis=-1)
  fixed = jnp.asarray(np.asarray(probs(x)))           # the same values, not a softmax op
  hand = lambda z: jnp.broadcast_to(fixed[:1], (z.shape[0], K)) + 0.0 * z.sum()
  calls = {"gradient": lambda g: jaxplain.gradient(g, x, 0),
           "integrated_gradients": lambda g: jaxplain.integrated_gradients(g, x, 0, steps=4),
           "lrp": lambda g: jaxplain.lrp(g, x, 0),
           "deeplift": lambda g: jaxplain.deeplift(g, x, 0),
           "occlusion": lambda g: jaxplain.occlusion(g, x, 0, patch=3),
           "feature_ablation": lambda g: jaxplain.feature_ablation(g, x, 0),
           "kernel_shap": lambda g: jaxplain.kernel_shap(g, x, 0, key=jax.random.key(0),
                                                         n_samples=8),
           "infidelity": lambda g: jaxplain.evaluation.infidelity(
               g, x, 0, x, key=jax.random.key(0), n_samples=2),
           "rise": lambda g: jaxplain.rise(g, x, 0, key=jax.random.key(0), n_masks=4),
           "lime": lambda g: jaxplain.lime(g, x, 0, key=jax.random.key(0), n_samples=4),
           "shapley_value_sampling": lambda g: jaxplain.shapley_value_sampling(
               g, x, 0, key=jax.random.key(0), n_samples=1)}
  for name, call in calls.items():
    for g in (probs, hand):
      with pytest.warns(jaxplain.ProbabilitiesWarning, match=r"looks like probabilities .*"
                                                             r"classifier_activation=None"):
        call(g)
    if name not in ("gradient", "lrp", "feature_ablation"):   # one per kind of check site
      continue
    for g in (f, lambda z: jax.nn.log_softmax(f(z), axis=-1),    # logits, log-probabilities,
              lambda z: jax.nn.sigmoid(f(z))):                    # independent sigmoids
      with warnings.catch_warnings():
        warnings.simplefilter("error", jaxplain.ProbabilitiesWarning)
        call(g)
  with warnings.catch_warnings():             # under jit the values are unknown: no warning
    warnings.simplefilter("error", jaxplain.ProbabilitiesWarning)
    jax.jit(lambda z: jaxplain.gradient(probs, z, 0))(x)
