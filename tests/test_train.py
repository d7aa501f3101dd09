"""Tests for jaxplain.train: the jitted step, fit, evaluate, checkpoints, data parallelism."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxplain import data, train


class Tiny(nn.Module):
  """A tiny conv net (optionally with batch norm) so that compiles stay fast."""
  bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=not self.bn, name="conv")(x)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(10, name="fc")(x)


class TinyNoTrainArg(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10, name="fc")(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def digits():
  d = str(data.default_data_dir())  # conftest.py: the session's temporary data directory
  tr = data.load("digits", "train", data_dir=d)
  va = data.load("digits", "validation", data_dir=d)
  return {k: v[:96] for k, v in tr.items()}, {k: v[:40] for k, v in va.items()}


def _fit(model, tr, va=None, **kw):
  kw = {"epochs": 2, "batch_size": 16, "optimizer": optax.sgd(0.2), "seed": 3,
        "progress": False, **kw}
  return train.fit(model, tr, va, **kw)


def _losses(result):
  return [l for h in result.history for l in h["step_loss"]]


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_fit_matches_hand_written_optax_loop(digits):
  tr, _ = digits
  model, seed, bs, lr = Tiny(), 3, 16, 0.2
  res = _fit(model, tr, seed=seed, batch_size=bs, optimizer=optax.sgd(lr))
  # independent: a plain un-jitted loop over the documented batch order and init key
  params = model.init(jax.random.fold_in(jax.random.key(seed), 0), tr["image"][:1])["params"]

  def loss(p, x, y):
    logp = jax.nn.log_softmax(model.apply({"params": p}, x))
    return -jnp.mean(logp[jnp.arange(len(y)), y])

  grad_fn = jax.jit(jax.value_and_grad(loss))
  want = []
  for epoch in range(2):
    order = np.random.default_rng([seed, epoch]).permutation(len(tr["label"]))
    for b in range(len(order) // bs):
      idx = order[b * bs:(b + 1) * bs]
      x, y = tr["image"][idx], tr["label"][idx]

      l, g = grad_fn(params, x, y)
      params = jax.tree.map(lambda p, gg: p - lr * gg, params, g)
      want.append(float(l))
  assert res.step == len(want) == 12
  np.testing.assert_allclose(_losses(res), want, rtol=2e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               res.variables["params"], params)
  assert [h["epoch"] for h in res.history] == [1, 2]
  np.testing.assert_allclose(res.history[0]["loss"], np.mean(want[:6]), rtol=1e-6)


def test_seeded_run_reproduces_loss_curve_exactly(digits):
  tr, _ = digits
  a = _fit(Tiny(bn=True), tr, optimizer=optax.adam(1e-2))
  b = _fit(Tiny(bn=True), tr, optimizer=optax.adam(1e-2))
  c = _fit(Tiny(bn=True), tr, optimizer=optax.adam(1e-2), seed=4)
  assert _losses(a) == _losses(b)  # bit-for-bit
  _assert_trees_equal(a.variables, b.variables)
  assert _losses(a) != _losses(c)
  assert set(a.variables) == {"params", "batch_stats"}
  # batch statistics were updated by training (they start at mean 0, var 1)
  assert np.abs(np.asarray(a.variables["batch_stats"]["bn"]["mean"])).max() > 1e-3


def test_evaluate_matches_numpy_with_padding(digits):
  tr, va = digits
  model = Tiny()
  variables = model.init(jax.random.key(0), tr["image"][:1])
  out = train.evaluate(model, variables, va, batch_size=16)  # 40 = 16 + 16 + 8 (padded)
  logits = np.asarray(model.apply(variables, va["image"]), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - logits.max(1, keepdims=True)
  np.testing.assert_allclose(out["loss"], -logp[np.arange(40), va["label"]].mean(), rtol=1e-5)
  assert out["accuracy"] == np.mean(logits.argmax(1) == va["label"])


def test_loss_fn_sees_extra_keys_and_model_without_train_arg(digits):
  tr, _ = digits
  seen = []

  def loss_fn(params, model_state, batch, key, step):
    seen.append(sorted(batch))
    logits = TinyNoTrainArg().apply({"params": params}, batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, ({"extra": jnp.mean(batch["weight"])}, model_state)

  tr2 = {**tr, "weight": np.ones(len(tr["label"]), np.float32)}
  res = _fit(TinyNoTrainArg(), tr2, epochs=1, loss_fn=loss_fn)
  assert seen[0] == ["image", "label", "weight"]
  assert res.history[0]["extra"] == 1.0 and "loss" in res.history[0]


def test_step_on_init_state_compiles_once_and_keeps_variables(digits):
  # init_state places the state as the step returns it (replicated on the data mesh): a
  # single-device state made the step's second call compile again (measured: 3.4 s for a
  # PPI step); and the state is a copy, so donating it leaves the caller's variables intact
  tr, _ = digits
  model, opt, traces = Tiny(), optax.sgd(0.1), []
  variables = model.init(jax.random.key(0), jnp.asarray(tr["image"][:1]))
  plain = train.classification_loss(model)

  def loss_fn(*args):
    traces.append(1)
    return plain(*args)

  step = train.make_train_step(loss_fn, opt)
  st = train.init_state(model, opt, tr["image"][:1], variables=variables)
  batch = {"image": jnp.asarray(tr["image"][:8]), "label": jnp.asarray(tr["label"][:8])}
  for _ in range(3):
    st, _ = step(st, batch, jax.random.key(0))
  assert len(traces) == 1 and int(st["step"]) == 3
  leaf = jax.tree_util.tree_leaves(variables)[0]
  assert not leaf.is_deleted() and np.isfinite(np.asarray(leaf)).all()


def test_early_stop_returns_best_epoch(digits):
  tr, va = digits
  res = _fit(Tiny(), tr, va, epochs=30, optimizer=optax.sgd(2.0), early_stop_patience=2)
  val = [h["val_accuracy"] for h in res.history]
  best = int(np.argmax(val))  # first best epoch
  assert len(val) == best + 1 + 2 < 30  # stopped `patience` epochs after the best
  got = train.evaluate(Tiny(), res.variables, va)["accuracy"]
  assert got == pytest.approx(val[best])


def test_resume_after_interrupt_equals_uninterrupted(digits, tmp_path):
  tr, va = digits
  full = _fit(Tiny(bn=True), tr, va, epochs=3, optimizer=optax.adam(1e-2),
              checkpoint_dir=tmp_path / "a", save_every=4)

  def interrupt(step, metrics):
    if step == 10:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _fit(Tiny(bn=True), tr, va, epochs=3, optimizer=optax.adam(1e-2),
         checkpoint_dir=tmp_path / "b", save_every=4, callback=interrupt)
  _, meta = train.load_checkpoint(tmp_path / "b")
  assert meta["step"] == 8 and (meta["epoch"], meta["batch"]) == (1, 2)  # 6 steps/epoch
  resumed = _fit(Tiny(bn=True), tr, va, epochs=3, optimizer=optax.adam(1e-2),
                 checkpoint_dir=tmp_path / "b", save_every=4)
  assert resumed.step == full.step == 18
  _assert_trees_equal(resumed.variables, full.variables)
  assert _losses(resumed) == _losses(full)
  assert resumed.history == full.history
  # a finished run is restored, not retrained
  again = _fit(Tiny(bn=True), tr, va, epochs=3, optimizer=optax.adam(1e-2),
               checkpoint_dir=tmp_path / "b", save_every=4,
               callback=lambda s, m: pytest.fail("trained again"))
  _assert_trees_equal(again.variables, full.variables)
  # keep=3: only the last three checkpoints remain
  steps = sorted(int(p.name) for p in (tmp_path / "a").iterdir() if p.name.isdigit())
  assert steps == [12, 16, 18]


def test_corrupt_checkpoint_raises_and_previous_stays_loadable(digits, tmp_path):
  tr, _ = digits
  ckpt = tmp_path / "c"
  _fit(Tiny(), tr, epochs=2, checkpoint_dir=ckpt, save_every=4)  # steps 4, 8, 12
  latest = ckpt / "12"
  files = [p for p in latest.rglob("*") if p.is_file() and "state" in p.parts
           and p.parent.name == "d"]
  assert files
  for p in files:  # flip bytes in every array data file of the latest checkpoint
    raw = bytearray(p.read_bytes())
    for i in range(len(raw) // 2, len(raw)):
      raw[i] ^= 0xFF
    p.write_bytes(bytes(raw))
  with pytest.raises(train.CheckpointError, match=r"checkpoint .*12.*(corrupt|SHA-256)"):
    _fit(Tiny(), tr, epochs=3, checkpoint_dir=ckpt, save_every=4)
  with pytest.raises(train.CheckpointError, match="steps \\[4, 8\\]"):
    train.load_checkpoint(ckpt)
  tree, meta = train.load_checkpoint(ckpt, step=8)
  assert meta["step"] == 8 and int(tree["state"]["step"]) == 8
  # silent corruption (arrays readable but not the saved ones) is caught by the SHA-256
  meta_file = ckpt / "4" / "meta" / "metadata"
  saved = json.loads(meta_file.read_text())
  meta_file.write_text(json.dumps({**saved, "checksum": "0" * 64}))
  with pytest.raises(train.CheckpointError, match="SHA-256"):
    train.load_checkpoint(ckpt, step=4)
  # after deleting the corrupt step, training resumes from the good step 8 and ends exactly
  # where an uninterrupted run ends
  shutil.rmtree(latest)
  res = _fit(Tiny(), tr, epochs=2, checkpoint_dir=ckpt, save_every=4,
             callback=lambda s, m: s > 8 or pytest.fail(f"retrained step {s}"))
  clean = _fit(Tiny(), tr, epochs=2)
  _assert_trees_equal(res.variables, clean.variables)


def test_mismatched_checkpoint_raises(digits, tmp_path):
  tr, _ = digits
  _fit(Tiny(), tr, epochs=1, checkpoint_dir=tmp_path / "m")
  with pytest.raises(train.CheckpointError, match="different run"):
    _fit(Tiny(bn=True), tr, epochs=1, checkpoint_dir=tmp_path / "m")
  with pytest.raises(train.CheckpointError, match="different run"):
    _fit(Tiny(), tr, epochs=1, batch_size=32, checkpoint_dir=tmp_path / "m")


def test_failed_save_keeps_previous_checkpoint(digits, tmp_path, monkeypatch):
  tr, _ = digits
  ckpt = tmp_path / "f"
  real_save = train._save

  def failing_save(mngr, step, tree, meta):
    if step == 8:  # an unserialisable leaf makes orbax fail in the middle of writing
      tree = {**tree, "bad": object()}
    return real_save(mngr, step, tree, meta)

  monkeypatch.setattr(train, "_save", failing_save)
  with pytest.raises(Exception):
    _fit(Tiny(), tr, epochs=2, checkpoint_dir=ckpt, save_every=4)
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  assert steps == [4]
  tree, meta = train.load_checkpoint(ckpt)
  assert meta["step"] == 4


def test_bad_arguments(digits):
  tr, va = digits
  with pytest.raises(KeyError, match="label"):
    train.fit(Tiny(), {"image": tr["image"]}, epochs=1, progress=False)
  with pytest.raises(ValueError, match="validation"):
    train.fit(Tiny(), tr, epochs=1, early_stop_patience=1, progress=False)
  with pytest.raises(ValueError, match="batch_size"):
    train.fit(Tiny(), tr, epochs=1, batch_size=200, progress=False)


_SHARDED = textwrap.dedent("""
    import json, sys
    import flax.linen as nn, jax, numpy as np, optax
    from jaxplain import data, train

    class Tiny(nn.Module):
      @nn.compact
      def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.Dense(10, name="fc")(nn.relu(x).mean(axis=(1, 2)))

    devs = jax.local_devices()
    assert len(devs) == 4, devs
    tr = data.load("digits", "train", data_dir=sys.argv[1])
    tr = {k: v[:64] for k, v in tr.items()}
    # sgd: adam's g / sqrt(v) would amplify round-off in near-zero gradients to +-lr
    model, opt = Tiny(), optax.sgd(0.2)
    # one step, directly
    batch = next(data.batches(tr, 16, seed=0))
    out = {}
    for name, d in (("single", devs[:1]), ("sharded", devs)):
      mesh = data.data_mesh(d)
      step = train.make_train_step(train.classification_loss(model), opt, mesh=mesh)
      # a fresh state per mesh (same init key): jax.device_put of a 4-device state onto a
      # 1-device sub-mesh aliases its buffers even with may_alias=False, and the step
      # donates them (jax 0.10.2)
      st = train.init_state(model, opt, tr["image"][:1], key=jax.random.key(0), mesh=mesh)
      assert st["step"].sharding.device_set == set(d)
      b = data.shard_batch(batch, mesh)
      assert len(b["image"].sharding.device_set) == len(d)
      st, m = step(st, b, jax.random.key(1))
      res = train.fit(model, tr, epochs=2, batch_size=16, optimizer=opt, devices=d,
                      progress=False)
      out[name] = {"step_loss": float(m["loss"]),
                   "step_params": jax.tree.map(lambda x: np.asarray(x).tolist(),
                                               jax.device_get(st["params"])),
                   "losses": [l for h in res.history for l in h["step_loss"]],
                   "variables": jax.tree.map(lambda x: np.asarray(x).tolist(),
                                             res.variables)}
    print("RESULT" + json.dumps(out))
""")


def test_sharded_step_equals_single_device(tmp_path, digits):
  data_dir = str(tmp_path / "tfds")
  data.load("digits", "train", data_dir=data_dir)  # prepare once, outside the subprocess
  env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip(),
         "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).parents[1]),
                                        os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, "-c", _SHARDED, data_dir], capture_output=True,
                       text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.split("RESULT", 1)[1])
  s, p = res["single"], res["sharded"]
  np.testing.assert_allclose(p["step_loss"], s["step_loss"], rtol=1e-6)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                  atol=1e-6)
  jax.tree.map(close, p["step_params"], s["step_params"], is_leaf=lambda x: isinstance(x, list))
  np.testing.assert_allclose(p["losses"], s["losses"], rtol=1e-5)
  jax.tree.map(close, p["variables"], s["variables"], is_leaf=lambda x: isinstance(x, list))
  assert len(s["losses"]) == 8


def test_progress_in_a_log_is_one_line_per_epoch(digits, capsys):
  # under capsys stderr is not a terminal (as in CI or a redirected log): no tqdm frames,
  # one line per epoch with the epoch's mean loss
  tr, va = digits
  r = _fit(TinyNoTrainArg(), tr, va, epochs=3, progress=True)
  err = capsys.readouterr().err
  assert "\r" not in err
  lines = [l for l in err.splitlines() if l.startswith("fit: ")]
  assert len(lines) == 3 and len(err.strip().splitlines()) == 3, err
  for e, (l, h) in enumerate(zip(lines, r.history), 1):
    assert l.startswith(f"fit: epoch {e}/3, step {h['step']}: loss {h['loss']:.4f}"), l
    assert f"val_accuracy {h['val_accuracy']:.4f}" in l


# -- Flax NNX and Equinox models ----------------------------------------------------------------


def _nnx_net():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Net(nnx.Module):
    def __init__(self):
      r = nnx.Rngs(5)
      self.conv = nnx.Conv(1, 3, (3, 3), use_bias=False, rngs=r)
      self.bn = nnx.BatchNorm(3, rngs=r)
      self.fc = nnx.Linear(3, 4, rngs=r)

    def __call__(self, x):
      return self.fc(jax.nn.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))
  return Net()


def _small_data(n=16):
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(n, 6, 6, 1)).astype(np.float32),
          "label": rng.integers(0, 4, n).astype(np.int32)}


def test_fit_trains_an_nnx_model_like_a_hand_written_optax_loop():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  net, d = _nnx_net(), _small_data()
  before = jax.tree.map(np.array, nnx.state(net))
  seed, bs, epochs, opt = 2, 8, 2, optax.adam(0.05)
  res = train.fit(net, d, d, epochs=epochs, batch_size=bs, optimizer=opt, seed=seed,
                  progress=False)
  # the caller's module is untouched
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, nnx.state(net)), before)
  # independent: NNX's own split / merge in train mode, one un-jitted optax loop
  ref = nnx.merge(*nnx.split(net))
  ref.train()
  g, params, rest = nnx.split(ref, nnx.Param, ...)
  opt_state = opt.init(params)

  def loss(p, rest, x, y):
    m = nnx.merge(g, p, rest, copy=True)
    logits = m(x)
    ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])
    return ce, nnx.split(m, nnx.Param, ...)[2]

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  want = []
  for epoch in range(epochs):
    order = np.random.default_rng([seed, epoch]).permutation(len(d["label"]))
    for b in range(len(order) // bs):
      idx = order[b * bs:(b + 1) * bs]
      (l, rest), gr = grad_fn(params, rest, d["image"][idx], d["label"][idx])
      with jax.numpy_dtype_promotion("standard"):
        upd, opt_state = opt.update(gr, opt_state, params)
        params = optax.apply_updates(params, upd)
      want.append(float(l))
  assert res.step == len(want) == 4
  np.testing.assert_allclose(_losses(res), want, rtol=2e-5, atol=1e-6)
  trained = nnx.merge(g, params, rest)
  for name, leaf in (("conv", "kernel"), ("fc", "kernel"), ("fc", "bias"), ("bn", "scale")):
    hand = getattr(getattr(trained, name), leaf)[...]
    np.testing.assert_allclose(getattr(getattr(res.model, name), leaf)[...], hand, rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(res.variables["params"][name][leaf], hand, rtol=1e-4, atol=1e-6)
  # batch statistics came back in the variables and in the trained module
  np.testing.assert_allclose(res.variables["batch_stats"]["bn"]["mean"], trained.bn.mean[...],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(res.model.bn.var[...], trained.bn.var[...], rtol=1e-4, atol=1e-6)
  # validation runs in eval mode (running statistics): the hand model's .eval() logits
  trained.eval()
  logits = np.asarray(trained(d["image"]), np.float64)
  ce = -(logits - np.log(np.exp(logits).sum(1, keepdims=True)))[np.arange(16), d["label"]]
  np.testing.assert_allclose(res.history[-1]["val_loss"], ce.mean(), rtol=1e-4)
  # a wrapped NNX model starts from the wrapped weights (the same code path afterwards)
  import jaxplain  # pylint: disable=import-outside-toplevel
  st = train.init_state(jaxplain.wrap(net), opt, d["image"][:1])
  np.testing.assert_array_equal(st["params"]["fc"]["kernel"], net.fc.kernel[...])
  np.testing.assert_array_equal(st["model_state"]["batch_stats"]["bn"]["var"], net.bn.var[...])


def test_fit_trains_a_stateless_equinox_model_like_a_hand_written_loop():
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  k1, k2 = jax.random.split(jax.random.key(1))
  net = eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), eqx.nn.Linear(36, 5, key=k1),
                           eqx.nn.Lambda(jax.nn.relu), eqx.nn.Linear(5, 4, key=k2)])
  d, seed, bs, lr = _small_data(), 1, 8, 0.3
  res = train.fit(net, d, epochs=1, batch_size=bs, optimizer=optax.sgd(lr), seed=seed,
                  progress=False)
  params, static = eqx.partition(net, eqx.is_inexact_array)

  def loss(p, x, y):
    logits = jax.vmap(eqx.combine(p, static))(x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

  want, grad_fn = [], jax.jit(jax.value_and_grad(loss))
  order = np.random.default_rng([seed, 0]).permutation(16)
  for b in range(2):
    idx = order[b * bs:(b + 1) * bs]
    l, gr = grad_fn(params, d["image"][idx], d["label"][idx])
    params = jax.tree.map(lambda p, g: p - lr * g, params, gr)
    want.append(float(l))
  np.testing.assert_allclose(_losses(res), want, rtol=2e-5, atol=1e-6)
  trained = eqx.combine(params, static)
  np.testing.assert_allclose(res.model.layers[3].weight, trained.layers[3].weight, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(res.variables["params"]["layers"]["1"]["bias"],
                             trained.layers[1].bias, rtol=1e-4, atol=1e-6)


def test_fit_refuses_keras_and_stateful_equinox_with_the_fix():
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  bn = eqx.nn.Sequential([eqx.nn.Linear(2, 2, key=jax.random.key(0)),
                          eqx.nn.BatchNorm(2, "batch", mode="batch")])
  with pytest.raises(TypeError, match="stateless Equinox"):
    train.fit(bn, _small_data(), epochs=1, progress=False)
  with pytest.raises(TypeError, match="flax.nnx Module or an equinox Module"):
    train.fit(lambda x: x, _small_data(), epochs=1, progress=False)


def test_nnx_fit_with_dropout_resumes_exactly(tmp_path):
  """Dropout streams are reseeded from the step key: an interrupted and resumed NNX run
  equals the uninterrupted one bit for bit, and dropout is on in training only."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Drop(nnx.Module):
    def __init__(self):
      r = nnx.Rngs(0, dropout=1)
      self.fc1 = nnx.Linear(36, 8, rngs=r)
      self.drop = nnx.Dropout(0.5, rngs=r)
      self.fc2 = nnx.Linear(8, 4, rngs=r)

    def __call__(self, x):
      return self.fc2(self.drop(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))))

  d = _small_data(8)
  kw = {"epochs": 2, "batch_size": 4, "optimizer": optax.adam(0.01), "progress": False}
  full = train.fit(Drop(), d, checkpoint_dir=tmp_path / "a", **kw)

  class Stop(Exception):
    pass

  def interrupt(step, metrics):
    if step == 3:
      raise Stop
  with pytest.raises(Stop):
    train.fit(Drop(), d, checkpoint_dir=tmp_path / "b", save_every=2, callback=interrupt, **kw)
  resumed = train.fit(Drop(), d, checkpoint_dir=tmp_path / "b", save_every=2, **kw)
  assert _losses(resumed) == _losses(full)
  _assert_trees_equal(resumed.variables, full.variables)
  # training mode drops units: the step-0 loss differs from the init's eval-mode (no dropout)
  # loss on the same batch
  net = Drop()
  net.eval()
  order = np.random.default_rng([0, 0]).permutation(8)[:4]
  logits = np.asarray(net(d["image"][order]), np.float64)
  ce = -(logits - np.log(np.exp(logits).sum(1, keepdims=True)))[np.arange(4), d["label"][order]]
  assert abs(_losses(full)[0] - ce.mean()) > 1e-3
