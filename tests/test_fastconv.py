"""The CPU rewrite of small-channel convolutions: same values and derivatives as XLA's own
convolution (computed in float64 without the rewrite), in any layout, to second order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxplain
from jaxplain import _fastconv

RNG = np.random.default_rng(3)


def _net(params, x, dn, strides, padding):
  w1, w2, w3 = params
  h = jax.lax.conv_general_dilated(x, w1, strides, padding, dimension_numbers=dn)
  h = jnp.tanh(h)
  h = jax.lax.conv_general_dilated(h, w2, (1, 1), "SAME", dimension_numbers=dn)
  h = jax.nn.softplus(h)
  return h.reshape(h.shape[0], -1) @ w3


def _case(dn, cin, strides, padding, dtype=np.float32):
  nhwc = dn[0] == "NHWC"
  x = RNG.normal(size=(3, 9, 9, cin) if nhwc else (3, cin, 9, 9))
  w1 = RNG.normal(size=(3, 3, cin, 4) if dn[1] == "HWIO" else (4, cin, 3, 3)) * 0.5
  w2 = RNG.normal(size=(3, 3, 4, 5) if dn[1] == "HWIO" else (5, 4, 3, 3)) * 0.3
  out = jax.eval_shape(
      lambda x: jax.lax.conv_general_dilated(x, jnp.asarray(w1), strides, padding,
                                             dimension_numbers=dn), jnp.asarray(x)).shape
  feat = int(np.prod(out[1:])) // 4 * 5
  w3 = RNG.normal(size=(feat, 6)) * 0.1
  return [np.asarray(a, dtype) for a in (x, w1, w2, w3)]


CASES = [(("NHWC", "HWIO", "NHWC"), 1, (1, 1), "SAME"),
         (("NHWC", "HWIO", "NHWC"), 3, (2, 2), ((1, 0), (2, 1))),
         (("NCHW", "OIHW", "NCHW"), 1, (2, 1), "VALID"),
         (("NCHW", "OIHW", "NCHW"), 2, (1, 1), "SAME")]


@pytest.mark.parametrize("dn,cin,strides,padding", CASES)
def test_values_and_input_gradients_equal_xla_convolutions_in_float64(dn, cin, strides, padding):
  x, w1, w2, w3 = _case(dn, cin, strides, padding)
  f32 = lambda x: _net((jnp.asarray(w1), jnp.asarray(w2), jnp.asarray(w3)), x, dn, strides,
                       padding)
  fast = _fastconv.with_fast_convs(f32)
  t = jnp.asarray([0, 3, 5])
  with jax.enable_x64(True):
    p64 = [jnp.asarray(a, jnp.float64) for a in (w1, w2, w3)]
    f64 = lambda x: _net(p64, x, dn, strides, padding)
    y64 = np.asarray(f64(jnp.asarray(x, jnp.float64)))
    g64 = np.asarray(jax.grad(lambda z: jnp.sum(f64(z)[jnp.arange(3), t]))(
        jnp.asarray(x, jnp.float64)))
  np.testing.assert_allclose(np.asarray(jax.jit(fast)(jnp.asarray(x))), y64, rtol=2e-5,
                             atol=2e-5)
  g = jaxplain.gradient(f32, jnp.asarray(x), t)
  np.testing.assert_allclose(np.asarray(g), g64, rtol=1e-4, atol=1e-5)


def test_forward_mode_and_second_order_derivatives_through_the_rewrite():
  dn = ("NHWC", "HWIO", "NHWC")
  x, w1, w2, w3 = _case(dn, 1, (1, 1), "SAME", np.float64)
  with jax.enable_x64(True):
    p = [jnp.asarray(a) for a in (w1, w2, w3)]
    f = lambda x: _net(p, x, dn, (1, 1), "SAME")
    fast = _fastconv.with_fast_convs(f)
    assert fast is not f, "the rewrite is off on this backend"
    xj, v = jnp.asarray(x), jnp.asarray(RNG.normal(size=x.shape))
    # forward mode (jvp) and forward-over-reverse / reverse-over-reverse (Hessian-vector)
    _, jv = jax.jvp(fast, (xj,), (v,))
    _, jv0 = jax.jvp(f, (xj,), (v,))
    np.testing.assert_allclose(np.asarray(jv), np.asarray(jv0), rtol=1e-10, atol=1e-12)
    s = lambda g: (lambda z: jnp.sum(jnp.sin(g(z))))
    hv = jax.jvp(jax.grad(s(fast)), (xj,), (v,))[1]
    hv0 = jax.jvp(jax.grad(s(f)), (xj,), (v,))[1]
    np.testing.assert_allclose(np.asarray(hv), np.asarray(hv0), rtol=1e-9, atol=1e-11)
    gg = jax.grad(lambda z: jnp.sum(jax.grad(s(fast))(z) ** 2))(xj)
    gg0 = jax.grad(lambda z: jnp.sum(jax.grad(s(f))(z) ** 2))(xj)
    np.testing.assert_allclose(np.asarray(gg), np.asarray(gg0), rtol=1e-9, atol=1e-11)


def test_parameter_gradients_and_the_opt_out(monkeypatch):
  dn = ("NHWC", "HWIO", "NHWC")
  x, w1, w2, w3 = _case(dn, 1, (1, 1), "SAME", np.float64)
  with jax.enable_x64(True):
    loss = lambda ws, g: jnp.sum(g(ws)(jnp.asarray(x)) ** 2)
    make = lambda ws: (lambda z: _net(ws, z, dn, (1, 1), "SAME"))
    p = [jnp.asarray(a) for a in (w1, w2, w3)]
    got = jax.grad(lambda ws: loss(ws, lambda w: _fastconv.with_fast_convs(make(w))))(p)
    ref = jax.grad(lambda ws: loss(ws, make))(p)
    for a, b in zip(got, ref):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
  monkeypatch.setenv(_fastconv.OPT_OUT, "0")
  f = make(p)
  assert _fastconv.with_fast_convs(f) is f


def test_models_without_small_channel_convolutions_are_left_alone():
  w = jnp.asarray(RNG.normal(size=(3, 3, 16, 4)), jnp.float32)
  conv = lambda x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  closed = jax.make_jaxpr(conv)(jnp.ones((1, 5, 5, 16)))
  assert not _fastconv._has_wanted(closed.jaxpr)          # 16 input channels: XLA's own
  closed = jax.make_jaxpr(jax.jit(lambda x: conv(jnp.tile(x, (1, 1, 1, 16)))))(
      jnp.ones((1, 5, 5, 1)))
  assert not _fastconv._has_wanted(closed.jaxpr)
  small = lambda x: jax.lax.conv_general_dilated(x, w[:, :, :2], (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  closed = jax.make_jaxpr(jax.jit(small))(jnp.ones((1, 5, 5, 2)))
  assert _fastconv._has_wanted(closed.jaxpr)              # found inside the jit call
