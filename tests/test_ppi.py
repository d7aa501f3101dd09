"""Tests for jaxplain.ppi (Proactive Pseudo-Intervention, seed 004 section 3.1).

References are independent: numpy loops for the loss terms and the box, the closed-form
limit of the sigmoid, central finite differences in float64 for the second-order gradients,
a separate single-device run for the sharded step, and a seeded measurement on decoy digits.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxplain import ppi, train
from jaxplain.models import max_pool_2x2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gxi(f, x, t):
  """Inline gradient x input saliency (one reverse pass)."""
  return jax.grad(lambda z: jnp.sum(f(z)[jnp.arange(z.shape[0]), t]))(x) * x


class Linear(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes, name="fc")(x.reshape(x.shape[0], -1))


class TanhMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(5, name="fc1")(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, name="fc2")(h)


class TinyCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
    x = max_pool_2x2(x)
    return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


# -- numpy reference ------------------------------------------------------------------------

def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_partner(y, pairing, weights=None):
  """j(i) by a loop: i - 1, or the nearest preceding (cyclic) example of the same label."""
  bsz = len(y)
  out = []
  for i in range(bsz):
    j = (i - 1) % bsz
    if pairing == "same_label":
      for d in range(1, bsz):
        k = (i - d) % bsz
        if y[k] == y[i] and (weights is None or weights[k] > 0):
          j = k
          break
    out.append(j)
  return out


def _np_reference(w, b, x, y, cfg, weights=None):
  """Every PPI term (eqs. 1-5) for the linear model logits = flat(x) @ w + b, by loops."""
  bsz, h, wd, c = x.shape
  logits_fn = lambda z: z.reshape(bsz, -1) @ w + b
  # gradient x input of the logit y_i is w[:, y_i] * x_i, summed over channels per pixel
  s = np.zeros((bsz, h, wd))
  for i in range(bsz):
    g = w[:, y[i]].reshape(h, wd, c)
    s[i] = (g * x[i]).sum(-1)
  s_norm = np.zeros_like(s)
  for i in range(bsz):
    pos = np.maximum(s[i], 0.0)
    s_norm[i] = pos / (pos.max() + cfg.eps)
  if cfg.mask == "soft":
    m = 1.0 / (1.0 + np.exp(-cfg.omega * (s_norm - cfg.sigma)))
  else:
    m = np.zeros_like(s)
    for i in range(bsz):
      rr, cc = np.nonzero(s_norm[i] > cfg.sigma)
      if rr.size:
        m[i, rr.min():rr.max() + 1, cc.min():cc.max() + 1] = 1.0
  x_neg = np.stack([x[i] * (1.0 - m[i][..., None]) for i in range(bsz)])
  partner = _np_partner(y, cfg.pairing, weights)
  x_adv = np.stack([x[i] * (1.0 - m[partner[i]][..., None]) for i in range(bsz)])
  p, p_neg, p_adv = (_np_softmax(logits_fn(z)) for z in (x, x_neg, x_adv))
  idx = np.arange(bsz)
  wt = np.ones(bsz) if weights is None else np.asarray(weights, np.float64)
  mean = lambda v: (v * wt).sum() / wt.sum()
  l_cls = mean(-np.log(p[idx, y]))
  if cfg.contrast_loss == "one_vs_others":
    l_con = mean(-np.log(1.0 - p_neg[idx, y]))
  else:
    l_con = mean(np.log(p_neg[idx, y]))
  if cfg.reg_target == "l1":
    l_reg = mean(np.array([np.abs(s[i]).sum() for i in range(bsz)]))
  else:
    l_reg = mean(np.array([np.abs(s_norm[i]).sum() / s_norm[i].size for i in range(bsz)]))
  l_ad = mean(-np.log(p_adv[idx, y]))
  return {
      "loss_cls": l_cls, "loss_con": l_con, "loss_reg": l_reg, "loss_ad": l_ad,
      "loss": l_cls + cfg.w1 * l_con + cfg.w2 * l_reg + cfg.w3 * l_ad,
      "accuracy": mean(p.argmax(-1) == y), "accuracy_con": mean(p_neg.argmax(-1) == y),
      "accuracy_ad": mean(p_adv.argmax(-1) == y), "mask_fraction": mean(m.mean((1, 2))),
  }


@pytest.mark.parametrize("cfg", [
    ppi.PPIConfig(sigma=0.4, omega=8.0, reg_target="normalized"),
    ppi.PPIConfig(sigma=0.3, omega=20.0, w1=2.0, w2=0.5, w3=3.0, contrast_loss="neg_ce",
                  reg_target="normalized"),
    ppi.PPIConfig(sigma=0.5, mask="box", reg_target="normalized"),
    ppi.PPIConfig(sigma=0.4, omega=8.0, pairing="same_label", reg_target="l1"),
])
def test_loss_terms_match_hand_computation(cfg):
  model = Linear()
  x = jax.random.uniform(jax.random.key(0), (4, 3, 3, 2))
  y = jnp.array([0, 1, 2, 1])
  variables = model.init(jax.random.key(1), x)
  loss_fn = ppi.make_ppi_loss(model, cfg, saliency=gxi)
  loss, (metrics, state) = jax.jit(loss_fn)(variables["params"], {}, {"image": x, "label": y},
                                            jax.random.key(2), 0)
  w = np.asarray(variables["params"]["fc"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["fc"]["bias"], np.float64)
  x64, y_np = np.asarray(x, np.float64), np.asarray(y)
  ref = _np_reference(w, b, x64, y_np, cfg)
  assert state == {}
  np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5)
  for k, v in ref.items():
    np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
  # a padded batch (the driver's bool "mask"): weighted batch means
  pad = jnp.array([True, True, False, True])
  _, (metrics_w, _) = loss_fn(variables["params"], {}, {"image": x, "label": y, "mask": pad},
                              jax.random.key(2), 0)
  ref_w = _np_reference(w, b, x64, y_np, cfg, np.asarray(pad))
  for k, v in ref_w.items():
    np.testing.assert_allclose(float(metrics_w[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
  # the terms are non-trivial here (a test that could not tell them apart would be useless)
  assert ref["loss_con"] != 0 and ref["loss_reg"] > 0 and 0 < ref["mask_fraction"] < 1

  # the same loss inside the shared trainer: one SGD step of train.make_train_step; its
  # metrics are the hand values and its update is -lr times the gradient of the hand loss
  # (central differences of the float64 reference along random directions)
  lr = 0.5
  opt = optax.sgd(lr)
  step = train.make_train_step(loss_fn, opt, donate=False)
  st = train.init_state(model, opt, x[:1], variables=variables)
  new, m_step = step(st, {"image": x, "label": y}, jax.random.key(2))
  assert int(new["step"]) == 1
  for k, v in ref.items():
    np.testing.assert_allclose(float(m_step[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
  dw = (np.asarray(new["params"]["fc"]["kernel"], np.float64) - w) / -lr
  db = (np.asarray(new["params"]["fc"]["bias"], np.float64) - b) / -lr
  rng = np.random.default_rng(0)
  h = 1e-6
  for _ in range(2):
    vw, vb = rng.normal(size=w.shape), rng.normal(size=b.shape)
    fd = (_np_reference(w + h * vw, b + h * vb, x64, y_np, cfg)["loss"]
          - _np_reference(w - h * vw, b - h * vb, x64, y_np, cfg)["loss"]) / (2 * h)
    np.testing.assert_allclose(np.sum(dw * vw) + np.sum(db * vb), fd, rtol=2e-3, atol=1e-4)


def test_same_label_pairing_pairs_labels_and_never_self():
  rng = np.random.default_rng(0)
  pair = jax.jit(lambda y, w: ppi.partner_indices(y, "same_label", weights=w))
  for trial in range(40):
    bsz = (2, 5, 11)[trial % 3]
    y = rng.integers(0, 4, bsz).astype(np.int32)
    wts = (rng.uniform(size=bsz) > 0.2) if trial % 2 else np.ones(bsz, bool)
    j = np.asarray(pair(jnp.asarray(y), jnp.asarray(wts)))
    assert j.shape == (bsz,) and j.dtype == np.int32
    for i in range(bsz):
      assert j[i] != i, (y, j)
      candidates = [k for k in range(bsz) if k != i and y[k] == y[i]
                    and wts[k]]
      if candidates:           # the batch allows a same-label partner: it is one
        assert j[i] in candidates and y[j[i]] == y[i], (y, wts, j)
      else:                    # none: the roll-by-one fallback
        assert j[i] == (i - 1) % bsz
  # the other pairings also never pair an example with itself
  for pairing in ("roll", "random_shift"):
    for seed in range(5):
      j = np.asarray(ppi.partner_indices(jnp.arange(7) % 3, pairing,
                                         key=jax.random.key(seed)))
      assert np.all(j != np.arange(7)) and sorted(j) == list(range(7))


def test_one_vs_others_is_stable_for_confident_logits():
  logits = jnp.array([[50.0, 0.0, -3.0], [0.0, 2.0, 1.0]])
  got = ppi.one_vs_others_loss(logits, jnp.array([0, 0]))
  # -log(1 - p_y) = log(1 + p_y / (1 - p_y)) = log(1 + exp(z_y - log sum_{k != y} exp z_k))
  ref = []
  for row in np.asarray(logits, np.float64):
    others = math.log(sum(math.exp(v) for v in row[1:]))
    ref.append(math.log1p(math.exp(row[0] - others)))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)
  g = jax.grad(lambda z: ppi.one_vs_others_loss(z, jnp.array([0, 0])).sum())(logits)
  assert np.all(np.isfinite(np.asarray(g)))


def test_soft_mask_tends_to_hard_threshold():
  s = jax.random.uniform(jax.random.key(3), (2, 16, 16))
  sigma, delta = 0.4, 0.02
  far = np.abs(np.asarray(s) - sigma) > delta
  hard = np.asarray(ppi.threshold_mask(s, sigma))
  assert 0 < hard.mean() < 1
  errs = []
  for omega in (5.0, 50.0, 500.0, 5000.0):
    soft = np.asarray(ppi.soft_mask(s, sigma, omega))
    err = np.abs(soft - hard)[far].max()
    bound = 1.0 / (1.0 + np.exp(omega * delta))   # sigmoid(-omega delta)
    assert err <= bound + 1e-6, (omega, err, bound)
    errs.append(err)
  assert errs[0] > 0.3 and errs[-1] < 1e-6
  assert all(a > b for a, b in zip(errs, errs[1:]))


def test_box_covers_exactly_the_thresholded_pixels():
  rng = np.random.default_rng(0)
  s = rng.uniform(0, 1, (6, 9, 7)) * (rng.uniform(0, 1, (6, 9, 7)) < 0.08)
  s[0] = 0.0                       # nothing above the threshold: empty box
  s[1] = 0.0
  s[1, 4, 2] = 0.9                 # a single pixel: a 1x1 box
  sigma = 0.5
  box = np.asarray(ppi.box_mask(jnp.asarray(s), sigma))
  for i in range(s.shape[0]):
    ref = np.zeros(s.shape[1:])
    on = [(r, c) for r in range(s.shape[1]) for c in range(s.shape[2]) if s[i, r, c] > sigma]
    if on:
      r0, r1 = min(p[0] for p in on), max(p[0] for p in on)
      c0, c1 = min(p[1] for p in on), max(p[1] for p in on)
      for r in range(r0, r1 + 1):
        for c in range(c0, c1 + 1):
          ref[r, c] = 1.0
    np.testing.assert_array_equal(box[i], ref, err_msg=f"example {i}")
  assert box[0].sum() == 0 and box[1].sum() == 1 and box[1, 4, 2] == 1
  assert np.all(box[s > sigma] == 1)              # covers every thresholded pixel


def _fd_check(cfg):
  """Directional derivatives of the PPI loss vs central differences, float64."""
  model = TanhMLP()
  x = jax.random.uniform(jax.random.key(4), (4, 3, 3, 1), dtype=jnp.float64)
  y = jnp.array([0, 1, 2, 0])
  params = model.init(jax.random.key(5), x[..., :1].astype(jnp.float32))["params"]
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  batch = {"image": x, "label": y}
  params0 = params

  if cfg.stop_saliency_gradient:
    # independent reference: the saliency is computed at the frozen parameters params0
    def frozen(f, z, t):
      del f
      return gxi(lambda u: model.apply({"params": params0}, u), z, t)
    ref_fn = ppi.make_ppi_loss(model, ppi.PPIConfig(**{**cfg.__dict__,
                                                       "stop_saliency_gradient": False}),
                               saliency=frozen)
  else:
    ref_fn = ppi.make_ppi_loss(model, cfg, saliency=gxi)
  loss_fn = ppi.make_ppi_loss(model, cfg, saliency=gxi)
  key = jax.random.key(0)
  f_loss = lambda p, fn: fn(p, {}, batch, key, 0)[0]
  g = jax.grad(f_loss)(params, loss_fn)
  flat_g, unravel = jax.flatten_util.ravel_pytree(g)
  flat_p, _ = jax.flatten_util.ravel_pytree(params)
  h = 1e-6
  for d in range(3):
    v = jax.random.normal(jax.random.key(10 + d), flat_p.shape, dtype=jnp.float64)
    lp = f_loss(unravel(flat_p + h * v), ref_fn)
    lm = f_loss(unravel(flat_p - h * v), ref_fn)
    fd = (lp - lm) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(flat_g, v)), float(fd), rtol=1e-6, atol=1e-9)
  return flat_g


def test_second_order_gradients_match_finite_differences():
  with jax.enable_x64(True):
    cfg = ppi.PPIConfig(sigma=0.4, omega=4.0)
    g_full = _fd_check(cfg)
    g_stop = _fd_check(ppi.PPIConfig(sigma=0.4, omega=4.0, stop_saliency_gradient=True))
    # the terms through the saliency map are not negligible: the two gradients differ
    assert float(jnp.linalg.norm(g_full - g_stop)) > 1e-3 * float(jnp.linalg.norm(g_full))


def test_warmup_is_plain_classification_and_then_ppi():
  model = TinyCNN()
  x = jax.random.uniform(jax.random.key(6), (4, 6, 6, 1))
  y = jnp.array([0, 1, 2, 1])
  variables = model.init(jax.random.key(7), x)
  opt = optax.sgd(0.1)
  step = train.make_train_step(ppi.make_ppi_loss(model, ppi.PPIConfig(warmup_steps=2),
                                                 saliency=gxi), opt, donate=False)
  batch = {"image": x, "label": y}
  st0 = train.init_state(model, opt, x[:1], variables=variables)
  st1, m0 = step(st0, batch, jax.random.key(0))
  # independent plain cross-entropy SGD step
  ce = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y).mean()
  ref = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"],
                     jax.grad(ce)(variables["params"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               st1["params"], ref)
  assert float(m0["ppi_on"]) == 0.0 and float(m0["loss"]) == float(m0["loss_cls"])
  _, m2 = step({**st0, "step": jnp.asarray(2, jnp.int32)}, batch, jax.random.key(0))
  assert float(m2["ppi_on"]) == 1.0 and float(m2["loss"]) > float(m2["loss_cls"])


def test_removed_train_step_names_the_replacement():
  with pytest.raises(TypeError, match="train.make_train_step"):
    ppi.make_ppi_train_step(TinyCNN(), optax.sgd(0.1))


class TinyBN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
    return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


def test_batch_norm_state_updated_from_the_clean_batch_only():
  model = TinyBN()
  x = jax.random.uniform(jax.random.key(8), (4, 4, 4, 1))
  y = jnp.array([0, 1, 2, 1])
  variables = model.init(jax.random.key(9), x)
  opt = optax.sgd(0.0)
  step = train.make_train_step(ppi.make_ppi_loss(model, ppi.PPIConfig(), saliency=gxi), opt,
                               donate=False)
  st = train.init_state(model, opt, x[:1], variables=variables)
  new, metrics = step(st, {"image": x, "label": y}, jax.random.key(0))
  # reference: one training-mode forward on the clean batch
  _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               new["model_state"]["batch_stats"], upd["batch_stats"])
  assert not np.allclose(new["model_state"]["batch_stats"]["bn1"]["mean"],
                         variables["batch_stats"]["bn1"]["mean"])
  assert all(np.isfinite(float(v)) for v in metrics.values())


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="contrast_loss"):
    ppi.PPIConfig(contrast_loss="hinge")
  with pytest.raises(ValueError, match="omega"):
    ppi.PPIConfig(omega=0.0)
  with pytest.raises(ValueError, match="saliency"):
    ppi.make_ppi_loss(Linear(), saliency="smoothgrad")
  f = lambda z: z.reshape(z.shape[0], -1)[:, :3]
  with pytest.raises(ValueError, match=">= 2 examples"):
    ppi.ppi_objective(f, jnp.ones((1, 2, 2, 1)), 0, jnp.ones((1, 2, 2)))
  with pytest.raises(ValueError, match="saliency"):
    ppi.ppi_objective(f, jnp.ones((2, 2, 2, 1)), 0, jnp.ones((2, 3, 3)))


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    import flax.linen as nn
    from jaxplain import data, ppi, train
    from jaxplain.models import max_pool_2x2
    assert jax.device_count() == 4, jax.devices()

    class TinyCNN(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = max_pool_2x2(x)
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))

    def gxi(f, x, t):
      return jax.grad(lambda z: jnp.sum(f(z)[jnp.arange(z.shape[0]), t]))(x) * x

    model = TinyCNN()
    x = jax.random.uniform(jax.random.key(0), (8, 6, 6, 1))
    y = jnp.arange(8) % 3
    opt = optax.adam(1e-2)
    loss_fn = ppi.make_ppi_loss(model, ppi.PPIConfig(sigma=0.3, omega=10.0,
                                                     pairing="same_label"), saliency=gxi)

    def run(devices):
      mesh = data.data_mesh(devices)
      step = train.make_train_step(loss_fn, opt, mesh=mesh)
      st = train.init_state(model, opt, x[:1], key=jax.random.key(1), mesh=mesh)
      batch = data.shard_batch({"image": np.asarray(x), "label": np.asarray(y)}, mesh)
      for i in range(3):
        st, m = step(st, batch, jax.random.key(5))
      return st, m

    single = run(jax.devices()[:1])
    sharded = run(jax.devices())
    assert len(sharded[0]["params"]["fc"]["kernel"].sharding.device_set) == 4
    assert int(sharded[0]["step"]) == 3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                 jax.device_get(single), jax.device_get(sharded))
    assert float(single[1]["loss_ad"]) > 0 and float(single[1]["loss_con"]) > 0
    print("SHARDED_OK", float(single[1]["loss"]))
""")


def test_sharded_step_equals_single_device_step():
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip(),
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                       text=True, timeout=300, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARDED_OK" in out.stdout


def test_resumed_ppi_run_equals_uninterrupted(tmp_path):
  rng = np.random.default_rng(0)
  d = {"image": rng.uniform(size=(48, 6, 6, 1)).astype(np.float32),
       "label": (np.arange(48) % 3).astype(np.int32)}
  cfg = ppi.PPIConfig(sigma=0.3, omega=10.0, pairing="random_shift", warmup_steps=3)
  loss_fn = ppi.make_ppi_loss(TinyCNN(), cfg, saliency=gxi)
  kw = dict(epochs=2, batch_size=8, optimizer=optax.adam(1e-2), seed=4, progress=False,
            loss_fn=loss_fn, save_every=4)
  full = train.fit(TinyCNN(), d, checkpoint_dir=tmp_path / "a", **kw)

  def interrupt(step, metrics):
    if step == 7:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    train.fit(TinyCNN(), d, checkpoint_dir=tmp_path / "b", callback=interrupt, **kw)
  _, meta = train.load_checkpoint(tmp_path / "b")
  assert meta["step"] == 4
  resumed = train.fit(TinyCNN(), d, checkpoint_dir=tmp_path / "b", **kw)
  assert resumed.step == full.step == 12
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               resumed.variables, full.variables)
  assert resumed.history == full.history
  # the run did PPI (after the warm-up) and each step drew its own random partner shift
  assert full.history[-1]["ppi_on"] == 1.0 and full.history[-1]["loss_ad"] > 0


def test_short_ppi_run_on_decoy_digits():
  """Seeded measurement on decoy digits (LeNet, 256 training images, batch 32).

  Shared plain warm-up (3 epochs), then 5 epochs plain (baseline) or PPI (default config,
  gradient x input saliency = WBP on this ReLU network). Measured on 96 validation images:
  - the baseline puts > 2x the patch's area share of its saliency mass on the decoy patch
    (the decoy is used, so the measurement has something to detect);
  - PPI makes the saliency map causal for the model: removing the top 5 % pixels (by |s|)
    drops p(true class) by at least 0.15 more than for the baseline (deletion, SPEC 6;
    measured with this seed: 0.17 -> 0.71).
  The decoy share of the saliency mass is printed, not asserted: here it falls a little
  (0.23 -> 0.21), but over seeds in experiments/ppi_decoy.py PPI does not lower it (ratio
  ~1.0 for WBP) and lowers the OOD accuracy, so a "PPI lowers the decoy mass" threshold would
  be a cherry-picked seed, not a property.
  """
  from jaxplain.data import load
  from jaxplain.models import LeNet

  tr = load("decoy_digits", "train", image_size=28)
  va = load("decoy_digits", "validation", image_size=28)
  xtr, ytr = tr["image"][:256], tr["label"][:256]
  xv, yv, mv = va["image"][:96], va["label"][:96], va["decoy_mask"][:96]
  model = LeNet()
  opt = optax.adam(3e-3)
  # the setting this measurement was made with (sigma 0.5, pixel-mean L_reg, roll pairing)
  cfg = ppi.PPIConfig(sigma=0.5, reg_target="normalized", pairing="roll")
  plain = train.make_train_step(train.classification_loss(model), opt, donate=False)
  ppi_step = train.make_train_step(ppi.make_ppi_loss(model, cfg, saliency=gxi), opt,
                                   donate=False)
  st = train.init_state(model, opt, xtr[:1], key=jax.random.key(0))
  rng = np.random.default_rng(0)

  def epochs(step, st, n):
    for _ in range(n):
      perm = rng.permutation(256)
      for i in range(8):
        idx = perm[32 * i:32 * (i + 1)]
        st, _ = step(st, {"image": xtr[idx], "label": ytr[idx]}, jax.random.key(0))
    return st

  warm = epochs(plain, st, 3)                                    # plain warm-up
  state = rng.bit_generator.state
  base = {"params": epochs(plain, warm, 5)["params"]}              # plain
  rng.bit_generator.state = state
  ppi_v = {"params": epochs(ppi_step, warm, 5)["params"]}            # PPI

  def measure(v):
    f = lambda z: model.apply(v, z)
    s = np.abs(np.asarray(gxi(f, jnp.asarray(xv), jnp.asarray(yv)))[..., 0])
    share = ((s * mv).sum((1, 2)) / s.sum((1, 2))).mean()
    k = int(0.05 * 28 * 28)
    x_del = np.array(xv)
    for i in range(len(yv)):                                     # remove the top-k pixels
      top = np.argsort(-s[i].ravel(), kind="stable")[:k]
      x_del[i].reshape(-1)[top] = 0.0
    p0 = np.asarray(jax.nn.softmax(f(jnp.asarray(xv))))[np.arange(len(yv)), yv]
    p1 = np.asarray(jax.nn.softmax(f(jnp.asarray(x_del))))[np.arange(len(yv)), yv]
    return share, (p0 - p1).mean()

  share_b, drop_b = measure(base)
  share_p, drop_p = measure(ppi_v)
  area = mv.mean()
  print(f"decoy share: baseline {share_b:.3f}, PPI {share_p:.3f} (area {area:.3f}); "
        f"deletion drop at 5 %: baseline {drop_b:.3f}, PPI {drop_p:.3f}")
  assert share_b > 2 * area
  assert drop_p > drop_b + 0.15


@pytest.mark.parametrize("saliency", ["wbp", "grad_cam"])
def test_ppi_loss_of_a_channels_first_equinox_model_masks_pixels_not_columns(saliency):
  # An Equinox CNN takes (B, C, H, W). Reference, written by hand: the model's NHWC view
  # (inputs moved to channels-last, the model moving them back) through ppi_objective. Before,
  # PPI treated W as the channel axis: it summed the map over W and masked whole columns.
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  import jaxplain  # pylint: disable=import-outside-toplevel

  class Net(eqx.Module):
    c1: eqx.nn.Conv2d
    c2: eqx.nn.Conv2d
    fc: eqx.nn.Linear

    def __init__(self, key):
      k1, k2, k3 = jax.random.split(key, 3)
      self.c1 = eqx.nn.Conv2d(2, 4, 3, padding=1, key=k1)
      self.c2 = eqx.nn.Conv2d(4, 4, 3, padding=1, key=k2)
      self.fc = eqx.nn.Linear(4 * 6 * 5, 3, key=k3)

    def __call__(self, x):                                     # (C, H, W)
      return self.fc(jax.nn.relu(self.c2(jax.nn.relu(self.c1(x)))).reshape(-1))

  net = Net(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (4, 2, 6, 5))    # C = 2, H = 6, W = 5
  y = jnp.array([0, 1, 2, 1])
  config = ppi.PPIConfig()
  state = train.init_state(net, optax.sgd(0.1), x[:1])
  loss_fn = ppi.make_ppi_loss(net, config, saliency=saliency)
  loss, (metrics, _) = loss_fn(state["params"], state["model_state"],
                               {"image": x, "label": y}, jax.random.key(2), 0)

  f = lambda z: jax.vmap(net)(jnp.transpose(z, (0, 3, 1, 2)))  # NHWC view, by hand
  xv = jnp.transpose(x, (0, 2, 3, 1))
  if saliency == "wbp":
    s = jaxplain.wbp(f, xv, y)
  else:
    s = jaxplain.grad_cam(jaxplain.wrap(net), x, y, layer="c2")  # (B, H, W)
  assert s.shape[:3] == (4, 6, 5)
  ref, ref_metrics = ppi.ppi_objective(f, xv, y, s, config, logits=f(xv))
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["mask_fraction"]),
                             float(ref_metrics["mask_fraction"]), rtol=1e-5)
