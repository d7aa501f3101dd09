"""The rule engine through loops: lax.scan (Flax nn.RNN) is interpreted through its body at
every step, so GRU / LSTM maps equal those of the same model unrolled by hand in Python; a
while loop (dynamic trip count) raises a clear error."""

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
