"""The rule engine through loops: lax.scan (Flax nn.RNN) is interpreted through its body at
every step, so GRU / LSTM maps equal those of the same model unrolled by hand in Python; a
while loop whose trip count is known at trace time runs as that scan, one whose trip count
depends on traced values raises a clear error; cond / switch take the branch selected at x."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxplain import rules


class _Classifier(nn.Module):
  cell: type

  @nn.compact
  def __call__(self, x):
    h = nn.RNN(self.cell(3, name="cell"))(x)
    return nn.Dense(2, name="head")(h[:, -1])


def _unrolled(cell, params):
  def f(x):
    c = cell(3)
    carry = c.initialize_carry(jax.random.key(0), x[:, 0].shape)
    for i in range(x.shape[1]):                          # the loop written out in Python
      carry, h = c.apply({"params": params["cell"]}, carry, x[:, i])
    return nn.Dense(2).apply({"params": params["head"]}, h)
  return f


@pytest.mark.parametrize("cell", [nn.GRUCell, nn.LSTMCell], ids=["gru", "lstm"])
def test_scan_maps_equal_the_model_unrolled_by_hand(cell):
  x = jax.random.normal(jax.random.key(0), (2, 4, 2))
  v = _Classifier(cell).init(jax.random.key(1), x)
  f = lambda x: _Classifier(cell).apply(v, x)
  g = _unrolled(cell, v["params"])
  np.testing.assert_allclose(f(x), g(x), rtol=1e-5, atol=1e-6)
  t = jnp.array([1, 0])
  # DeepLIFT (its zero reference runs on one row, through the scan body too): GRU only
  methods = {"wbp": rules.wbp, "lrp": rules.lrp}
  if cell is nn.GRUCell:
    methods["deeplift"] = rules.deeplift
  both = lambda h: jax.jit(lambda x: [m(h, x, t) for m in methods.values()])(x)
  for name, a, b in zip(methods, both(f), both(g)):
    assert float(jnp.abs(b).max()) > 1e-3
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=name)


def test_while_loop_raises_naming_the_loop():
  w = jnp.ones((2, 2))

  def f(x):
    return jax.lax.while_loop(lambda c: jnp.sum(c) < 10.0, lambda c: c @ w + 1.0, x)

  with pytest.raises(rules.UnsupportedPrimitiveError, match="'while'.*trip count"):
    rules.wbp(f, jnp.ones((2, 2)), 0)


def _step_and_readout():
  w = jax.random.normal(jax.random.key(8), (5, 5)) * 0.6
  v = jax.random.normal(jax.random.key(9), (5, 3))
  step = lambda i, h: jax.nn.relu(h @ w) + 0.5 * h + 0.1 * jnp.asarray(i, h.dtype)
  return step, v


def _written_out(step, v, n):
  def g(x):
    for i in range(n):
      x = step(i, x)
    return x @ v
  return g


def test_while_loops_with_a_static_trip_count_equal_the_loop_written_out():
  step, v = _step_and_readout()
  counter = lambda i0, n: lambda x: jax.lax.while_loop(
      lambda c: c[0] < n(), lambda c: (c[0] + 1, step(c[0], c[1])), (i0(), x))[1] @ v
  loops = {
      # fori_loop with array bounds lowers to a while loop, not a scan
      "fori_array_bounds": lambda x: jax.lax.fori_loop(0, jnp.int32(6), step, x) @ v,
      "counter_literal": counter(lambda: 0, lambda: 6),
      # counter start and bound computed in the traced function (folded at trace time)
      "counter_computed": counter(lambda: jnp.zeros((), jnp.int32) + 1, lambda: jnp.asarray(7)),
  }
  x = jax.random.normal(jax.random.key(10), (3, 5))
  for name, f in loops.items():
    g = _written_out(lambda i, h, s=1 if name == "counter_computed" else 0: step(i + s, h), v, 6)
    assert jax.make_jaxpr(f)(x).eqns[-2].primitive.name == "while", name
    np.testing.assert_allclose(f(x), g(x), rtol=1e-5, atol=1e-6)
    for m in (rules.wbp, rules.lrp, rules.deeplift):
      b = m(g, x, 2)
      assert float(jnp.abs(b).max()) > 1e-3
      for a in (m(f, x, 2), jax.jit(lambda x: m(f, x, 2))(x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{name} {m.__name__}")


def test_while_loop_that_never_runs_and_one_bounded_by_a_traced_argument():
  step, v = _step_and_readout()
  f = lambda x, n: jax.lax.while_loop(
      lambda c: c[0] < n, lambda c: (c[0] + 1, step(c[0], c[1])), (0, x))[1] @ v
  x = jax.random.normal(jax.random.key(11), (3, 5))
  # zero iterations: the map is that of the readout alone (w * x for a linear map)
  np.testing.assert_allclose(rules.wbp(lambda x: f(x, 0), x, 1), x * v[None, :, 1], rtol=1e-6)
  # the bound is a jit argument: its value is not known when the rule engine traces
  with pytest.raises(rules.UnsupportedPrimitiveError, match="'while'.*traced values"):
    jax.jit(lambda x, n: rules.lrp(lambda z: f(z, n), x, 1))(x, 3)


def test_while_loop_that_does_not_terminate_raises(monkeypatch):
  from jaxplain import _jaxpr
  monkeypatch.setattr(_jaxpr, "_MAX_TRIPS", 500)
  step, v = _step_and_readout()
  f = lambda x: jax.lax.while_loop(
      lambda c: c[0] >= 0, lambda c: (c[0] + 1, step(0, c[1])), (0, x))[1] @ v
  with pytest.raises(rules.UnsupportedPrimitiveError, match="over 500 iterations"):
    rules.wbp(f, jnp.ones((3, 5)), 0)


class _BiClassifier(nn.Module):
  """A bidirectional GRU: the backward direction is a reverse scan."""

  @nn.compact
  def __call__(self, x):
    h = nn.Bidirectional(nn.RNN(nn.GRUCell(3, name="fwd")), nn.RNN(nn.GRUCell(3, name="bwd")))(x)
    return nn.Dense(2, name="head")(h[:, 0])


def _bi_unrolled(params):
  def f(x):
    c, b, length = nn.GRUCell(3), x.shape[0], x.shape[1]
    hf, carry = [], jnp.zeros((b, 3))
    for i in range(length):                              # forward direction
      carry, h = c.apply({"params": params["fwd"]}, carry, x[:, i])
      hf.append(h)
    hb, carry = [None] * length, jnp.zeros((b, 3))
    for i in reversed(range(length)):                    # backward direction
      carry, h = c.apply({"params": params["bwd"]}, carry, x[:, i])
      hb[i] = h
    return nn.Dense(2).apply({"params": params["head"]},
                             jnp.concatenate([hf[0], hb[0]], axis=-1))
  return f


def test_long_and_reverse_scans_equal_the_loop_unrolled_by_hand():
  # 9 steps: the first iterations are interpreted one by one, the rest as one lax.scan of
  # the interpreted body, forward and reverse (nn.Bidirectional)
  x = jax.random.normal(jax.random.key(2), (2, 9, 2))
  v = _BiClassifier().init(jax.random.key(3), x)
  f = lambda x: _BiClassifier().apply(v, x)
  g = _bi_unrolled(v["params"])
  np.testing.assert_allclose(f(x), g(x), rtol=1e-5, atol=1e-6)
  t = jnp.array([0, 1])
  for m in (rules.wbp, rules.lrp, rules.deeplift):
    a, b = m(f, x, t), m(g, x, t)
    assert float(jnp.abs(b).max()) > 1e-3
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=m.__name__)


def test_trace_size_does_not_grow_with_the_sequence_length():
  def size(length):
    x = jnp.ones((2, length, 2))
    v = _Classifier(nn.GRUCell).init(jax.random.key(1), x)
    f = lambda x: _Classifier(nn.GRUCell).apply(v, x)
    return len(jax.make_jaxpr(lambda x: rules.lrp(f, x, 0))(x).jaxpr.eqns)

  assert size(64) == size(8)


def test_a_carry_whose_status_never_settles_is_interpreted_step_by_step():
  # the carries swap every step, so which one depends on x alternates: no fixed point, and
  # every iteration is interpreted on its own (as the loop written out by hand)
  w = jnp.array([[0.5, -1.0], [2.0, 0.3]])

  def body(c, xi):
    a, b = c
    return (jnp.tanh(b @ w), jax.nn.relu(a + xi)), a

  def scanned(x):
    (a, b), ys = jax.lax.scan(body, (jnp.ones((x.shape[0], 2)), jnp.zeros((x.shape[0], 2))),
                              jnp.swapaxes(x, 0, 1))
    return a + b + ys.sum(0)

  def by_hand(x):
    c, ys = (jnp.ones((x.shape[0], 2)), jnp.zeros((x.shape[0], 2))), []
    for i in range(x.shape[1]):
      c, y = body(c, x[:, i])
      ys.append(y)
    return c[0] + c[1] + jnp.stack(ys).sum(0)

  x = jax.random.normal(jax.random.key(4), (3, 7, 2))
  np.testing.assert_allclose(scanned(x), by_hand(x), rtol=1e-6)
  for m in (rules.wbp, rules.lrp):
    a, b = m(scanned, x, 1), m(by_hand, x, 1)
    assert float(jnp.abs(b).max()) > 1e-3
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=m.__name__)


def test_maps_through_a_scan_are_differentiable_in_the_parameters():
  x = jax.random.normal(jax.random.key(5), (2, 6, 2))
  v = _Classifier(nn.GRUCell).init(jax.random.key(1), x)
  loss = lambda model: lambda p: jnp.sum(rules.lrp(lambda x: model(p, x), x, 0) ** 2)
  scan_model = lambda p, x: _Classifier(nn.GRUCell).apply({"params": p}, x)
  hand_model = lambda p, x: _unrolled(nn.GRUCell, p)(x)
  ga = jax.grad(loss(scan_model))(v["params"])
  gb = jax.grad(loss(hand_model))(v["params"])
  for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return h + nn.Dense(8)(jax.nn.relu(nn.Dense(16)(nn.LayerNorm()(h)))), None


class _ScannedLayers(nn.Module):
  """Residual blocks stacked with nn.scan (the parameters are the scanned inputs)."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x)
    blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=5)
    h, _ = blocks(name="blocks")(h, None)
    return nn.Dense(3)(h)


def test_layers_stacked_with_nn_scan_equal_the_stack_written_out():
  x = jax.random.normal(jax.random.key(6), (4, 6))
  v = _ScannedLayers().init(jax.random.key(7), x)
  f = lambda x: _ScannedLayers().apply(v, x)
  p = v["params"]

  def g(x):
    h = nn.Dense(8).apply({"params": p["Dense_0"]}, x)
    for i in range(5):                                   # block i with the i-th parameters
      pi = jax.tree_util.tree_map(lambda a: a[i], p["blocks"])
      h, _ = _Block().apply({"params": pi}, h, None)
    return nn.Dense(3).apply({"params": p["Dense_1"]}, h)

  np.testing.assert_allclose(f(x), g(x), rtol=1e-6, atol=1e-6)
  for m in (rules.wbp, rules.lrp, rules.deeplift):
    a, b = m(f, x, 1), m(g, x, 1)
    assert float(jnp.abs(b).max()) > 1e-3
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=m.__name__)


def test_fori_loop_with_static_bounds_equals_the_loop_written_out():
  # a fori_loop with Python-int bounds lowers to a scan with no scanned inputs
  w = jax.random.normal(jax.random.key(8), (5, 5)) * 0.6
  v = jax.random.normal(jax.random.key(9), (5, 3))
  step = lambda i, h: jax.nn.relu(h @ w) + 0.5 * h + 0.1 * i
  f = lambda x: jax.lax.fori_loop(0, 6, step, x) @ v

  def g(x):
    for i in range(6):
      x = step(i, x)
    return x @ v

  x = jax.random.normal(jax.random.key(10), (3, 5))
  np.testing.assert_allclose(f(x), g(x), rtol=1e-5, atol=1e-6)
  for m in (rules.wbp, rules.lrp, rules.deeplift):
    a, b = m(f, x, 2), m(g, x, 2)
    assert float(jnp.abs(b).max()) > 1e-3
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=m.__name__)


def test_cond_and_switch_take_the_branch_selected_at_x():
  w = jax.random.normal(jax.random.key(12), (4, 4))
  v = jax.random.normal(jax.random.key(13), (4, 3))
  a = lambda h: jax.nn.relu(h @ w)
  b = lambda h: jnp.tanh(h @ w) + 0.3 * h
  flag = jnp.asarray(1)
  x = jax.random.normal(jax.random.key(14), (2, 4))
  sign = lambda x: jnp.sum(x) > 0                     # decided by x: both branches are traced
  cases = [
      (lambda x: jax.lax.cond(True, a, b, x) @ v, a, x),
      (lambda x: jax.lax.switch(flag, [a, b, lambda h: h], x) @ v, b, x),
      (lambda x: jax.lax.cond(sign(x), a, b, x) @ v, a, jnp.abs(x)),
      (lambda x: jax.lax.cond(sign(x), a, b, x) @ v, b, -jnp.abs(x)),
  ]
  for k, (f, branch, xk) in enumerate(cases):
    g = lambda x, branch=branch: branch(x) @ v      # the branch written out
    assert "cond" in {e.primitive.name for e in jax.make_jaxpr(f)(xk).eqns}
    for m in (rules.wbp, rules.lrp, rules.deeplift):
      want = m(g, xk, 1)
      assert float(jnp.abs(want).max()) > 1e-3
      for got in (m(f, xk, 1), jax.jit(lambda z: m(f, z, 1))(xk)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{k} {m.__name__}")
  # the two branches really give different maps (so picking the wrong one would fail)
  assert float(jnp.abs(rules.wbp(lambda x: a(x) @ v, x, 1)
                       - rules.wbp(lambda x: b(x) @ v, x, 1)).max()) > 1e-2
