"""Input checks shared by the primitives (private).

Checks on values (finite, range) run only when the value is concrete: inside ``jax.jit`` or
``jax.vmap`` the arrays are tracers and only shapes can be checked. Every message names the
argument and what was expected.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

T = TypeVar("T")


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds real values (not a tracer under jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_batched(x: Any, name: str = "x", *, min_rank: int = 2) -> jax.Array:
  """Check that ``x`` is a floating array of rank >= ``min_rank`` with a leading batch axis,
  and finite where concrete. Returns ``jnp.asarray(x)``."""
  x = jnp.asarray(x)
  if x.ndim < min_rank:
    raise ValueError(
        f"{name}: expected a batched array of rank >= {min_rank} with the batch axis first, "
        f"e.g. (B, H, W, C); got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
  check_finite(x, name)
  return x


def one_example_error(x: Any, name: str = "x") -> ValueError:
  """The error for an input that is one example, not a batch."""
  return ValueError(f"{name}: expected a batch (B, ...); got one example of shape "
                    f"{tuple(jnp.shape(x))} (use {name}[None] for a batch of one)")


def _accepts_one_example(f: Callable, x: Any) -> bool:
  """True when ``f`` runs on ``x[None]`` (shapes only, nothing is computed) and returns a
  batch of one: then ``x`` was one example, not a batch."""
  try:
    out = jax.eval_shape(f, jax.ShapeDtypeStruct((1,) + tuple(jnp.shape(x)), jnp.result_type(x)))
  except Exception:  # pylint: disable=broad-except
    return False
  out = out[0] if isinstance(out, (tuple, list)) and out else out
  return getattr(out, "ndim", 0) == 2 and out.shape[0] == 1


def call_model(call: Callable[[], T], f: Callable, x: Any, name: str = "x") -> T:
  """``call()`` (something that runs ``f`` on ``x``), turning a failure caused by ``x`` being
  one example instead of a batch into :func:`one_example_error`. Free when it succeeds."""
  try:
    return call()
  except Exception as err:  # pylint: disable=broad-except
    if not isinstance(err, (ValueError, TypeError)) or "expected a batch" not in str(err):
      if _accepts_one_example(f, x):
        raise one_example_error(x, name) from err
    raise


def check_chunk(value: Any, name: str = "chunk") -> None:
  """``value`` must be ``None`` or an int >= 1 (a chunk size); raises ``ValueError``."""
  if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
    raise ValueError(f"{name}: expected None or an int >= 1, got {value!r}")


def check_finite(x: Any, name: str) -> None:
  """Raise ``ValueError`` if a concrete ``x`` holds NaN or inf."""
  if is_concrete(x):
    arr = np.asarray(x)
    if not np.all(np.isfinite(arr)):
      bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
      raise ValueError(f"{name}: contains {bad} non-finite value(s) (NaN or inf)")


def accumulation_dtype(dtype: Any) -> Any:
  """The dtype sums and solves run in: a float ``dtype`` promoted to at least float32
  (bfloat16 / float16 -> float32; written out because ``jnp.promote_types`` refuses
  bfloat16 with float32 under ``jax_numpy_dtype_promotion="strict"``).

  >>> import jax.numpy as jnp
  >>> accumulation_dtype(jnp.bfloat16), accumulation_dtype(jnp.float64)
  (dtype('float32'), dtype('float64'))
  """
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


def as_float(a: Any) -> jax.Array:
  """``a`` as a floating array in :func:`accumulation_dtype` (integer / bool -> float32).
  Metrics accumulate over thousands of elements and ranks: in bfloat16 (8 significant bits)
  their scores would carry that rounding."""
  a = jnp.asarray(a)
  return a.astype(accumulation_dtype(a.dtype if jnp.issubdtype(a.dtype, jnp.floating)
                                     else jnp.float32))


def broadcast_to_x(value: Any, x: jax.Array, name: str) -> jax.Array:
  """``value`` (a scalar, one input (1, ...) or one per example (B, ...)) broadcast to
  ``x.shape`` in ``x``'s dtype; raises ``ValueError`` naming ``name`` if it does not
  broadcast or holds NaN / inf."""
  val = jnp.asarray(value, x.dtype)
  try:
    ok = jnp.broadcast_shapes(val.shape, x.shape) == x.shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"{name}: shape {val.shape} does not broadcast to x.shape {x.shape}; "
                     "pass a scalar, one input (1, ...) or one per example (B, ...)")
  check_finite(val, name)
  return jnp.broadcast_to(val, x.shape)


def check_target(target: Any, batch: int, num_classes: int | None = None,
                 name: str = "target") -> jax.Array:
  """Normalise ``target`` (an int or a (B,) int array) to a (B,) int32 array.

  Raises a clear error on a wrong shape, a non-integer dtype, or (when concrete and
  ``num_classes`` is known) an index outside ``[0, num_classes)``.
  """
  t = jnp.asarray(target)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise TypeError(f"{name}: expected an int or a (B,) integer array, got dtype {t.dtype}")
  if t.ndim == 0:
    t = jnp.broadcast_to(t, (batch,))
  elif t.shape != (batch,):
    raise ValueError(f"{name}: expected an int or shape ({batch},) to match the batch, "
                     f"got shape {t.shape}")
  if num_classes is not None and is_concrete(t):
    tn = np.asarray(t)
    if tn.size and (tn.min() < 0 or tn.max() >= num_classes):
      raise ValueError(f"{name}: class index out of range [0, {num_classes}): "
                       f"got values in [{tn.min()}, {tn.max()}]")
  return t.astype(jnp.int32)


def select_target(logits: jax.Array, target: jax.Array) -> jax.Array:
  """``logits[b, target[b]]`` for each example: (B, K), (B,) -> (B,); NaN where
  ``target[b]`` is outside ``[0, K)`` (possible only under jit, see :func:`select_valid`)."""
  t = target.astype(jnp.int32)
  k = logits.shape[1]
  picked = jnp.take_along_axis(logits, jnp.clip(t, 0, k - 1)[:, None], axis=1)[:, 0]
  return select_valid(picked, t, k)


def check_logits(out: Any, batch: int, name: str = "f(x)", *, f: Callable | None = None,
                 x: Any = None) -> jax.Array:
  """Check that a model output is (B, K) logits: one array, not a tuple (e.g. Keras
  ``stateless_call`` returns ``(outputs, non_trainable_variables)``), with the batch of
  ``x``. Given ``f`` and ``x``, a wrong shape caused by ``x`` being one example says so."""
  if isinstance(out, (tuple, list, dict)) or not hasattr(out, "ndim"):
    kind = (f"a {type(out).__name__} of {len(out)} items"
            if isinstance(out, (tuple, list, dict)) else f"a {type(out).__name__}")
    raise TypeError(
        f"{name}: the model must return one logits array of shape (B, K); it returned {kind}. "
        f"Pass a function that selects the logits, e.g. `lambda x: f(x)[0]` (Keras "
        f"`stateless_call` returns (outputs, non_trainable_variables))")
  if out.ndim != 2 or out.shape[0] != batch:
    lead_ok = out.ndim >= 1 and out.shape[0] == batch  # a batch, but not (B, K) logits
    if not lead_ok and f is not None and x is not None and _accepts_one_example(f, x):
      raise one_example_error(x)
    if out.ndim == 2 and out.shape[0] != batch:
      hint = FIXED_BATCH_HINT
    elif out.ndim == 1 and lead_ok:
      hint = (": one value per example (a regression or a score) goes as (B, 1), e.g. "
              "`lambda x: f(x)[:, None]` with target=0")
    elif out.ndim > 2 and lead_ok:
      hint = (f": a value per position (B, {', '.join(map(str, out.shape[1:-1]))}, K) goes "
              "one position at a time, e.g. `lambda x: f(x)[:, i]`, or summed over the "
              "positions you explain")
    else:
      hint = ""
    raise ValueError(f"{name}: the model must return logits of shape (B, K) = ({batch}, K); "
                     f"got shape {out.shape}{hint}")
  warn_if_probabilities(out, name)
  return out


PROBABILITIES_WARNING = (
    "{name} looks like probabilities (every row non-negative and summing to 1): the model ends "
    "in a softmax. output='logit' then explains a probability, and output='softmax' / "
    "'log_softmax' / 'cross_entropy' apply a second softmax on top of it. To explain the "
    "logits, explain the model without its last activation (Keras: "
    "classifier_activation=None, or model.layers[-1].activation = keras.activations.linear "
    "before wrap; Flax: return the Dense output), or silence this with "
    "warnings.filterwarnings('ignore', "
    "category=jaxplain.ProbabilitiesWarning)")


class ProbabilitiesWarning(UserWarning):
  """A model's output rows are probabilities (it ends in a softmax), not logits."""


def model_outputs(f: Callable, x: Any) -> Any:
  """``f(x)``, warned about (:func:`warn_if_probabilities`) when they are probabilities."""
  out = f(x)
  warn_if_probabilities(out)
  return out


def probe_probabilities(f: Callable, x: Any) -> None:
  """For methods that never score ``x`` itself (RISE, LIME, Shapley sampling): one forward
  of ``x``, eagerly only (a 1 / n_samples share of their forwards), for the warning."""
  if is_concrete(x):
    model_outputs(f, x)


def warn_if_probabilities(out: jax.Array, name: str = "f(x)") -> None:
  """Warn when concrete (B, K >= 2) outputs are probabilities: each row >= 0 summing to 1.
  Logits essentially never are; under jit nothing is checked."""
  if (not isinstance(out, (jax.Array, np.ndarray)) or not is_concrete(out) or out.ndim != 2
      or out.shape[1] < 2 or out.shape[0] == 0 or not jnp.issubdtype(out.dtype, jnp.floating)):
    return
  o = np.asarray(out, np.float64)
  if np.all(o >= 0.0) and np.allclose(o.sum(axis=1), 1.0, rtol=0.0, atol=1e-3):
    warnings.warn(PROBABILITIES_WARNING.format(name=name), ProbabilitiesWarning, stacklevel=3)


FIXED_BATCH_HINT = (
    ". f must keep the batch axis for any number of rows (methods call it on more rows "
    "than x: path points, noisy copies, perturbations); does it fix the batch size, e.g. "
    "`.reshape(4, -1)`? Write `.reshape(x.shape[0], -1)`")


def accepts_nnx(fn: Callable) -> Callable:
  """Decorator of the methods that take a function ``f(x) -> logits`` first: a Flax NNX
  module given as ``f`` is used through ``jaxplain.wrap`` (a private copy in ``.eval()``
  mode, as the layer-level methods use it). Called directly, a module fresh from its
  constructor is in training mode, and its batch norm / dropout raise NNX's "Cannot mutate
  ... from a different trace level" under every transform; one that runs ``nnx.scan`` inside
  raises that too."""
  @functools.wraps(fn)
  def wrapper(f, *args, **kwargs):
    return fn(nnx_as_function(f), *args, **kwargs)
  return wrapper


def nnx_as_function(f: Any) -> Any:
  """``jaxplain.wrap(f)`` for a Flax NNX module (see :func:`accepts_nnx`), else ``f``."""
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(f, nnx.Module):
    from jaxplain.model import wrap  # pylint: disable=import-outside-toplevel
    return wrap(f)
  return f


def warn_if_channels_first(x: Any, name: str = "x") -> None:
  """Warn when a rank-4 ``x`` looks like (B, C, H, W) (1, 3 or 4 channels first, more than 4
  values on the last axis): the image metrics read the last axis as channels, so there a
  'pixel' would be a row of one channel, silently."""
  s = tuple(jnp.shape(x))
  if len(s) == 4 and s[1] in (1, 3, 4) and s[3] > 4:
    warnings.warn(
        f"{name}: shape {s} looks channels-first (B, C, H, W); jaxplain's image metrics read "
        "channels last (B, H, W, C), so each 'pixel' here would be a row of one channel. Pass "
        "jnp.moveaxis(x, 1, -1) (and the maps likewise) with "
        "f = lambda z: model(jnp.moveaxis(z, -1, 1))", UserWarning, stacklevel=4)


def check_model(f: Callable, x: Any, name: str = "f(x)", *, loops: bool = False) -> Any:
  """Shapes only (``jax.eval_shape``, nothing is computed): ``f(x)`` must be one (B, K)
  logits array for the batch ``x``; returns its ``ShapeDtypeStruct``. For methods that call
  ``f`` on other rows than ``x`` (IG's path points, SmoothGrad's noisy copies), so that a
  tuple output or one example instead of a batch is reported in terms of ``x``.

  ``loops=True``: trace a jaxpr instead (the same cost) and return ``(shape, has_loop)``,
  whether ``f`` runs a ``scan`` or ``while`` loop (RNNs, scanned layer stacks)."""
  b = jnp.shape(x)[0]
  # traced on twice x's rows, as those methods call it: a model that fixes the batch size
  # fails there, not at x (the factor 2 keeps a batch that sharding needs even)
  spec = jax.ShapeDtypeStruct((2 * b,) + tuple(jnp.shape(x)[1:]), x.dtype)
  trace = ((lambda: jax.make_jaxpr(f, return_shape=True)(spec)) if loops
           else (lambda: (None, jax.eval_shape(f, spec))))
  try:
    closed, out = call_model(trace, f, x)
    ok = hasattr(out, "ndim") and out.ndim == 2 and out.shape[0] == 2 * b
  except Exception as err:  # pylint: disable=broad-except
    closed, out, ok, failure = None, None, False, err
  else:
    failure = None
  if not ok:
    # the model at x itself: its own errors first; if it works there, it fixes the batch
    own = check_logits(call_model(lambda: jax.eval_shape(f, x), f, x), b, name, f=f, x=x)
    raise ValueError(f"{name}: f returns {tuple(own.shape)} for x's {b} rows but "
                     + (f"fails on {2 * b} rows ({type(failure).__name__}: "
                        f"{str(failure).splitlines()[0][:200]})" if failure is not None
                        else f"returns {getattr(out, 'shape', type(out).__name__)} for "
                             f"{2 * b} rows") + FIXED_BATCH_HINT) from failure
  out = jax.ShapeDtypeStruct((b,) + tuple(out.shape[1:]), out.dtype)
  return (out, _has_loop(closed.jaxpr)) if loops else out


def _has_loop(jaxpr: Any) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("scan", "while"):
      return True
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns") and _has_loop(sub):
          return True
  return False


def select_valid(values: jax.Array, target: jax.Array, num_classes: int) -> jax.Array:
  """NaN in the rows of ``values`` ((B, ...)) whose ``target`` lies outside
  ``[0, num_classes)``. Under ``jax.jit`` a traced target cannot be range-checked; this keeps
  every method consistent there: maps, completeness gaps, curves and scores of such an example
  are all NaN (a concrete target raises instead, see :func:`check_target`)."""
  ok = (target >= 0) & (target < num_classes)
  ok = ok.reshape(ok.shape + (1,) * (values.ndim - 1))
  return jnp.where(ok, values, jnp.asarray(jnp.nan, values.dtype))
