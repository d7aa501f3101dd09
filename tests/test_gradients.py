"""Gradient saliency: finite differences in float64, linen = NNX = plain function, per-example
targets, SmoothGrad against a loop, bad input."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxplain

# A tiny CNN, written three times: Flax linen, Flax NNX and a plain function of a weight dict.


class TinyLinen(nn.Module):
  act: str = "relu"

  @nn.compact
  def __call__(self, x):
    a = getattr(jnp, self.act) if self.act == "tanh" else nn.relu
    x = a(nn.Conv(3, (3, 3), padding="SAME", name="conv1")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(4, name="fc")(x)


class TinyNNX(nnx.Module):

  def __init__(self, p):
    self.conv1 = nnx.Conv(2, 3, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
    self.fc = nnx.Linear(4 * 4 * 3, 4, rngs=nnx.Rngs(0))
    self.conv1.kernel[...] = p["conv1"]["kernel"]
    self.conv1.bias[...] = p["conv1"]["bias"]
    self.fc.kernel[...] = p["fc"]["kernel"]
    self.fc.bias[...] = p["fc"]["bias"]

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    return self.fc(x.reshape(x.shape[0], -1))


def plain_fn(p, x):
  y = jax.lax.conv_general_dilated(x, p["conv1"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = jax.nn.relu(y + p["conv1"]["bias"].reshape(1, 1, 1, -1))
  return y.reshape(y.shape[0], -1) @ p["fc"]["kernel"] + p["fc"]["bias"][None]


def nnx_fn(model):
  graphdef, state = nnx.split(model)
  return lambda x: nnx.merge(graphdef, state)(x)


X_SHAPE = (3, 4, 4, 2)


@pytest.fixture(scope="module")
def tiny():
  model = TinyLinen()
  params = model.init(jax.random.key(0), jnp.zeros(X_SHAPE))
  x = jax.random.normal(jax.random.key(1), X_SHAPE)
  return model, params, x


def test_gradient_matches_central_differences_float64():
  with jax.enable_x64(True):
    model = TinyLinen(act="tanh")
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 2), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.key(0), x.astype(jnp.float32)))
    f = jax.jit(functools.partial(model.apply, params))
    target = jnp.array([1, 3])
    xn = np.asarray(x)
    for output in ("logit", "log_softmax", "softmax", "cross_entropy"):
      def out(xx):
        y = np.asarray(f(jnp.asarray(xx)))
        logp = y - np.log(np.sum(np.exp(y), axis=1, keepdims=True))
        v = {"logit": y, "log_softmax": logp, "softmax": np.exp(logp),
             "cross_entropy": -logp}[output]
        return v[np.arange(2), np.asarray(target)]
      eps = 1e-6
      fd = np.zeros_like(xn)
      for idx in np.ndindex(*xn.shape[1:]):
        e = np.zeros_like(xn)
        e[(slice(None),) + idx] = eps
        fd[(slice(None),) + idx] = (out(xn + e) - out(xn - e)) / (2 * eps)
      g = jaxplain.gradient(f, x, target, output=output)
      assert g.dtype == jnp.float64
      np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9, err_msg=output)
      np.testing.assert_allclose(jaxplain.gradient_x_input(f, x, target, output=output),
                                 fd * xn, rtol=1e-6, atol=1e-9)


def test_linen_nnx_and_plain_function_agree(tiny):
  model, params, x = tiny
  p = params["params"]
  fs = {"linen": functools.partial(model.apply, params),
        "nnx": nnx_fn(TinyNNX(p)),
        "plain": functools.partial(plain_fn, p)}
  t = jnp.array([0, 3, 1])
  key = jax.random.key(5)
  res = {name: (jaxplain.gradient(f, x, t),
                jaxplain.gradient_x_input(f, x, t, output="log_softmax"),
                jaxplain.smoothgrad(f, x, t, key=key, num_samples=4))
         for name, f in fs.items()}
  np.testing.assert_allclose(fs["nnx"](x), fs["linen"](x), rtol=1e-5, atol=1e-6)
  for name in ("nnx", "plain"):
    for a, b in zip(res[name], res["linen"]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_per_example_targets_match_single_examples(tiny):
  model, params, x = tiny
  f = functools.partial(model.apply, params)
  t = jnp.array([2, 0, 3])
  g = jaxplain.gradient(f, x, t)
  for b in range(3):
    ref = jax.grad(lambda xb: f(xb[None])[0, int(t[b])])(x[b])
    np.testing.assert_allclose(g[b], ref, rtol=1e-5, atol=1e-7)
  # an int target is broadcast to every example
  np.testing.assert_allclose(jaxplain.gradient(f, x, 2)[0], g[0], rtol=1e-6)


def test_jit_and_vmap(tiny):
  model, params, x = tiny
  f = functools.partial(model.apply, params)
  g = jax.jit(jaxplain.gradient, static_argnums=0)(f, x, jnp.array([0, 1, 2]))
  # jit and eager differ in float32 rounding only (jaxlib 0.11: 1.4e-6 relative on 1 of 96)
  np.testing.assert_allclose(g, jaxplain.gradient(f, x, jnp.array([0, 1, 2])), rtol=1e-5,
                             atol=1e-7)
  xs = jnp.stack([x, 2 * x])  # vmap over a leading axis of batches
  gv = jax.vmap(lambda xx: jaxplain.gradient(f, xx, 1))(xs)
  np.testing.assert_allclose(gv[1], jaxplain.gradient(f, 2 * x, 1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form", ["mean", "squared", "vargrad"])
def test_smoothgrad_matches_loop_and_is_deterministic(tiny, form):
  model, params, x = tiny
  f = jax.jit(functools.partial(model.apply, params))
  t = jnp.array([1, 2, 0])
  key = jax.random.key(3)
  n, level = 6, 0.2
  out = jaxplain.smoothgrad(f, x, t, key=key, num_samples=n, noise_level=level, form=form,
                            chunk=4, multiply_by_input=(form == "mean"))
  # the documented noise: N(0, (level * (max_b - min_b))^2), drawn as one (N, B, ...) normal
  xn = np.asarray(x)
  span = xn.max(axis=(1, 2, 3)) - xn.min(axis=(1, 2, 3))
  noise = np.asarray(jax.random.normal(key, (n,) + x.shape)) * (level * span)[:, None, None, None]
  gs = []
  for k in range(n):
    xk = jnp.asarray(xn + noise[k])
    gk = np.stack([np.asarray(jax.grad(lambda xb: f(xb[None])[0, int(t[b])])(xk[b]))
                   for b in range(3)])
    gs.append(gk * np.asarray(xk) if form == "mean" else gk)
  gs = np.stack(gs)
  ref = {"mean": gs.mean(0), "squared": (gs ** 2).mean(0), "vargrad": gs.var(0)}[form]
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=1e-6)
  again = jaxplain.smoothgrad(f, x, t, key=key, num_samples=n, noise_level=level, form=form,
                              chunk=None, multiply_by_input=(form == "mean"))
  np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-7)
  other = jaxplain.smoothgrad(f, x, t, key=jax.random.key(4), num_samples=n,
                              noise_level=level, form=form,
                              multiply_by_input=(form == "mean"))
  assert not np.allclose(other, out)


def test_smoothgrad_without_noise_is_the_gradient(tiny):
  model, params, x = tiny
  f = functools.partial(model.apply, params)
  g = jaxplain.gradient(f, x, 1)
  kw = dict(key=jax.random.key(0), num_samples=3, noise_level=0.0)
  np.testing.assert_allclose(jaxplain.smoothgrad(f, x, 1, **kw), g, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jaxplain.smoothgrad(f, x, 1, form="squared", **kw), g ** 2,
                             rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(jaxplain.smoothgrad(f, x, 1, form="vargrad", **kw), 0.0,
                             atol=1e-9)


def test_bad_input_errors_name_the_argument(tiny):
  model, params, x = tiny
  f = functools.partial(model.apply, params)
  with pytest.raises(ValueError, match="x: expected a batched array"):
    jaxplain.gradient(f, jnp.ones(5), 0)
  with pytest.raises(ValueError, match="x: contains 1 non-finite"):
    jaxplain.gradient(f, x.at[0, 0, 0, 0].set(jnp.nan), 0)
  with pytest.raises(ValueError, match="x: contains 1 non-finite"):
    jaxplain.smoothgrad(f, x.at[1, 0, 0, 0].set(jnp.inf), 0, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"target: class index out of range \[0, 4\)"):
    jaxplain.gradient(f, x, 4)
  with pytest.raises(ValueError, match=r"target: class index out of range"):
    jaxplain.gradient_x_input(f, x, jnp.array([0, -1, 2]))
  with pytest.raises(ValueError, match=r"target: expected an int or shape \(3,\)"):
    jaxplain.gradient(f, x, jnp.array([0, 1]))
  with pytest.raises(ValueError, match="output: expected one of"):
    jaxplain.gradient(f, x, 0, output="probits")
  with pytest.raises(ValueError, match="form: expected one of"):
    jaxplain.smoothgrad(f, x, 0, key=jax.random.key(0), form="max")
  with pytest.raises(ValueError, match="key: smoothgrad needs"):
    jaxplain.smoothgrad(f, x, 0, key=None)
  with pytest.raises(ValueError, match=r"f\(x\): the model must return logits"):
    jaxplain.gradient(lambda z: z.sum(axis=(1, 2, 3)), x, 0)


def test_all_targets_equal_a_loop_over_classes_and_chunks_do_not_matter(tiny):
  model, params, x = tiny
  f = jax.jit(functools.partial(model.apply, params))
  key = jax.random.key(2)
  for output in ("logit", "log_softmax"):
    all_g = jaxplain.gradient(f, x, "all", output=output)
    all_gx = jaxplain.gradient_x_input(f, x, "all", output=output, target_chunk=3)
    assert all_g.shape == (3, 4) + x.shape[1:]
    out = (lambda z: jax.nn.log_softmax(f(z))) if output == "log_softmax" else f
    # independent reference: the per-example Jacobian of every class, one example at a time
    jac = jax.jit(jax.jacrev(lambda xb: out(xb[None])[0]))
    ref = np.stack([np.asarray(jac(x[b])) for b in range(3)])
    np.testing.assert_allclose(all_g, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(all_gx, ref * np.asarray(x)[:, None], rtol=1e-5, atol=1e-6)
  all_sg = jaxplain.smoothgrad(f, x, "all", key=key, num_samples=3, target_chunk=2,
                               form="vargrad")
  for k in (0, 3):
    np.testing.assert_allclose(all_sg[:, k], jaxplain.smoothgrad(
        f, x, k, key=key, num_samples=3, form="vargrad"), rtol=1e-4, atol=1e-6)
  # a (B, T) array: a per-example list of targets; target_chunk does not change it
  t = jnp.array([[3, 0], [1, 1], [2, 3]])
  all_g = jaxplain.gradient(f, x, "all")
  g = jax.jit(lambda z: jaxplain.gradient(f, z, t, target_chunk=1))(x)
  for b in range(3):
    for j in range(2):
      np.testing.assert_allclose(g[b, j], all_g[b, int(t[b, j])], rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match=r"target: a per-example list of targets must have "
                                       r"shape \(3, T\)"):
    jaxplain.gradient(f, x, jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(ValueError, match=r"target: class index out of range \[0, 4\)"):
    jaxplain.gradient(f, x, jnp.array([[0, 4], [1, 1], [2, 3]]))
  with pytest.raises(ValueError, match="target: expected an int, a"):
    jaxplain.gradient(f, x, "every")
  with pytest.raises(ValueError, match="target_chunk: expected None or an int >= 1"):
    jaxplain.gradient(f, x, "all", target_chunk=0)


def test_all_targets_share_one_forward_pass(tiny):
  # the forward pass is traced once whatever T: count the calls of f while tracing
  # (a fresh f per check: on CPU the gradient traces f with jax.make_jaxpr, whose trace cache
  # would serve a second call with the same f without calling it)
  model, params, x = tiny
  calls = []

  def new_f():
    def f(z):
      calls.append(z.shape)
      return model.apply(params, z)
    return f

  jax.make_jaxpr(lambda z: jaxplain.gradient(new_f(), z, "all", target_chunk=2))(x)
  assert calls == [x.shape], calls  # one forward pass for the K targets
  calls.clear()
  jax.make_jaxpr(lambda z: jaxplain.gradient(new_f(), z, jnp.array([[0, 1]] * 3)))(x)
  assert calls == [x.shape], calls
