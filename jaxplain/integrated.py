"""Integrated Gradients: quadrature rules, baselines, the batched attribution, completeness.

Sundararajan et al. 2017, eq. 1 (IG) and its Riemann approximation eq. 3:

  IG_i(x) = (x_i - x'_i) * integral_0^1 d out(x' + a (x - x'))[t] / dx_i da
          ~ (x_i - x'_i) * sum_k w_k g_i(x' + a_k (x - x')).

The nodes ``a_k`` and weights ``w_k`` come from :func:`quadrature_rule`; every rule's weights
sum to 1 (SPEC.md section 2). Completeness (their Proposition 1): sum_i IG_i = out(x)[t] -
out(x')[t] exactly for the integral; :func:`completeness_gap` reports the quadrature error
of an approximation (Captum's "convergence delta").

How the m steps are batched decides speed and memory. ``chunk`` steps of all B examples go
through ``f`` as one batch of ``chunk * B`` rows; the ``ceil(m / chunk)`` chunks are unrolled
in the traced program (``loop="unroll"``) or run by ``lax.scan`` (``loop="scan"``); the default
``loop="auto"`` unrolls unless ``f`` itself runs a loop (see below).
Each unrolled chunk's nodes carry an exactly-zero data dependency on the previous chunks'
sum, so XLA runs the chunks one after another and reuses one chunk's buffers (without it,
XLA:CPU's concurrency-oriented scheduler kept every chunk live: 1.5 GB at m = 32, 6.2 GB at
m = 128; an ``optimization_barrier`` did not survive its passes). Measured on a shared
2-core CPU (benchmarks/bench_attribution.md; SmallCNN 32x32x3, B = 64, chunk = 4): about the
floor (m x one jitted forward+backward) at m = 32 and 128, ahead of Captum, with XLA temp
memory about 0.22 GB whatever m (it grows with ``chunk``). The loop body of
``lax.scan``/``lax.map`` ran 2-3.5x slower there (inside the while loop XLA:CPU does not
route the backward convolutions to its fast YNNPACK kernels). A model that runs a loop itself
(an RNN, an NNX ``nnx.scan`` layer stack) is the opposite case, so ``"auto"`` scans there:
unrolled, every chunk carries a copy of the model's loop and the program grows with m
(measured on this CPU, jitted, m = 128: a linen GRU compiled in 1.7 s and ran in 76 ms
unrolled, 0.3 s and 45 ms scanned; a 3-block NNX encoder under ``nnx.scan`` 5.9 s / 16 ms vs
1.2 s / 12 ms, and 88 s to compile at m = 1024; called eagerly, 10.7 s vs 0.6 s for the
GRU). On a GPU prefer a large chunk or ``chunk=None`` (one vmap over all steps).

Two more modes (SPEC.md section 10): ``tol=`` refines every example by nested trapezoid levels
until its completeness gap is below ``tol * |out(x)[t] - out(x')[t]|`` (jaxplain/_adaptive_ig.py),
and ``method="exact"`` integrates piecewise-linear networks exactly between the breakpoints of
the path (jaxplain/_exact_ig.py; ExactLine, Sotoudeh & Thakur 2019).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from jaxplain import _pack
from jaxplain import _validate
from jaxplain._batching import unrolled
from jaxplain._exact_ig import NotPiecewiseLinearError as NotPiecewiseLinearError
from jaxplain.gradients import (_check_output, _check_target_chunk, _cotangent, _grad_rows,
                                _grad_rows_multi, _is_multi, _multi_targets, _num_classes,
                                _output_value)

Array = jax.Array
Fn = Callable[[Array], Array]

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
           "gausslegendre")
BASELINES = ("black", "white", "random", "blur")


def quadrature_rule(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Nodes ``a_k`` in [0, 1] and weights ``w_k`` (summing to 1) of an IG quadrature rule.

  - ``riemann_left``: a_k = k/m, k = 0..m-1; ``riemann_right``: a_k = k/m, k = 1..m;
    ``riemann_middle``: a_k = (k + 1/2)/m; all with weights 1/m (errors O(1/m), O(1/m),
    O(1/m^2) for smooth integrands).
  - ``riemann_trapezoid``: a_k = k/(m-1), k = 0..m-1, weights 1/(m-1) with both ends halved
    (O(1/m^2)); m >= 2. Captum's rule of that name uses weights 1/m, which sum to
    (m-1)/m; this one does not.
  - ``gausslegendre``: m-point Gauss-Legendre nodes and weights rescaled from [-1, 1] to
    [0, 1] (exact for polynomial integrands of degree <= 2m - 1).

  Args:
    method: one of ``METHODS``.
    steps: m, the number of nodes.

  Returns:
    ``(alphas, weights)``, two float64 numpy arrays of shape (m,).

  >>> a, w = quadrature_rule("riemann_trapezoid", 3)
  >>> a.tolist(), w.tolist()
  ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
  """
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
  if not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
  m = int(steps)
  if method == "riemann_left":
    return np.arange(m) / m, np.full(m, 1.0 / m)
  if method == "riemann_right":
    return np.arange(1, m + 1) / m, np.full(m, 1.0 / m)
  if method == "riemann_middle":
    return (np.arange(m) + 0.5) / m, np.full(m, 1.0 / m)
  if method == "riemann_trapezoid":
    if m < 2:
      raise ValueError(f"steps: riemann_trapezoid needs steps >= 2, got {m}")
    w = np.full(m, 1.0 / (m - 1))
    w[0] = w[-1] = 0.5 / (m - 1)
    return np.arange(m) / (m - 1), w
  nodes, weights = _gauss_legendre(m)
  return nodes.copy(), weights.copy()


@functools.lru_cache(maxsize=64)
def _gauss_legendre(m: int) -> tuple[np.ndarray, np.ndarray]:
  """m-point Gauss-Legendre rule on [0, 1], computed once per m. SciPy's ``roots_legendre``
  (Golub-Welsch, asymptotic expansions above 150 nodes) equals NumPy's ``leggauss`` to 3e-13
  at m = 4096 and takes 0.6 s there instead of 8.4 s (``leggauss`` takes the eigenvalues of
  a dense m x m matrix)."""
  nodes, weights = scipy.special.roots_legendre(m)
  return (nodes + 1.0) / 2.0, weights / 2.0


def _gaussian_blur(x: Array, sigma: float) -> Array:
  """Separable Gaussian blur of (B, H, W[, C]) over H and W (of (B, D) over D); the kernel is
  truncated at the border and renormalised, so a constant image stays constant."""
  axes = (1,) if x.ndim == 2 else (1, 2)
  for ax in axes:
    n = x.shape[ax]
    i = np.arange(n)
    k = np.exp(-((i[:, None] - i[None, :]) ** 2) / (2.0 * sigma ** 2))
    k = jnp.asarray(k / k.sum(axis=1, keepdims=True), x.dtype)
    x = jnp.moveaxis(jnp.tensordot(k, x, axes=([1], [ax])), 0, ax)
  return x


def make_baseline(x: Array, baseline: Any = "black", *, key: Array | None = None,
                  value_range: tuple[float, float] | None = None,
                  blur_sigma: float | None = None) -> Array:
  """The IG baseline x' for a batch, shaped like ``x``.

  Args:
    x: inputs, (B, ...).
    baseline: ``"black"`` (zeros), ``"white"`` (the input maximum), ``"random"`` (uniform
      between the input minimum and maximum, drawn from ``key``), ``"blur"`` (a Gaussian
      blur of ``x`` over H and W, Sturmfels et al. 2020: axes 1 and 2 of any x of rank >= 3,
      axis 1 of (B, D); so a (B, L, E) sequence would be blurred across its embedding too:
      pass an array baseline there) or an array that broadcasts to ``x.shape`` (a scalar,
      one image (1, ...) or one per example).
    key: a ``jax.random`` key, required for ``"random"``.
    value_range: ``(lo, hi)`` used for white (``hi``) and random (``U(lo, hi)``); default
      ``None`` takes each example's own minimum and maximum.
    blur_sigma: the blur's standard deviation in pixels; default ``min(H, W) / 8``.

  Returns:
    The baseline, shaped like ``x``.

  >>> import jax.numpy as jnp
  >>> make_baseline(jnp.array([[0., 2.], [1., 3.]]), "white")
  Array([[2., 2.],
         [3., 3.]], dtype=float32)
  """
  x = jnp.asarray(x)
  red = tuple(range(1, x.ndim))
  if isinstance(baseline, str):
    if baseline not in BASELINES:
      raise ValueError(f"baseline: expected one of {BASELINES} or an array, got {baseline!r}")
    if baseline == "black":
      return jnp.zeros_like(x)
    if value_range is not None:
      lo = jnp.full((x.shape[0],) + (1,) * (x.ndim - 1), value_range[0], x.dtype)
      hi = jnp.full_like(lo, value_range[1])
    else:
      lo = jnp.min(x, axis=red, keepdims=True)
      hi = jnp.max(x, axis=red, keepdims=True)
    if baseline == "white":
      return jnp.broadcast_to(hi, x.shape).astype(x.dtype)
    if baseline == "random":
      if key is None:
        raise ValueError("key: baseline='random' needs a jax.random key")
      u = jax.random.uniform(key, x.shape, x.dtype)
      return lo + (hi - lo) * u
    spatial = x.shape[1:2] if x.ndim == 2 else x.shape[1:3]
    sigma = min(spatial) / 8.0 if blur_sigma is None else float(blur_sigma)
    if sigma <= 0:
      raise ValueError(f"blur_sigma: expected > 0, got {blur_sigma}")
    return _gaussian_blur(x, sigma)
  return _validate.broadcast_to_x(baseline, x, "baseline")


@_validate.accepts_nnx
@_pack.several_inputs("baseline", strings=("black",))
def integrated_gradients(f: Fn, x: Array, target: Any, *, baseline: Any = "black",
                         steps: int = 32, method: str = "gausslegendre",
                         chunk: int | None = 4, loop: str = "auto",
                         key: Array | None = None, output: str = "logit",
                         value_range: tuple[float, float] | None = None,
                         blur_sigma: float | None = None,
                         return_gap: bool = False,
                         target_chunk: int | None = None,
                         tol: float | None = None, atol: float = 1e-6,
                         min_steps: int = 5, max_steps: int = 1025,
                         driver: str = "auto",
                         return_info: bool = False,
                         progress: bool = True) -> Array | tuple[Array, Any]:
  """Integrated Gradients for a batch (Sundararajan et al. 2017, eqs. 1 and 3).

  ``IG(x) = (x - x') * sum_k w_k grad out[t](x' + a_k (x - x'))`` with the nodes and weights
  of ``method`` (see :func:`quadrature_rule`; all weights sum to 1).

  Memory and speed: all ``steps`` of all B examples are vectorised; ``chunk`` steps (so
  ``chunk * B`` rows) go through ``f`` per call. ``loop="unroll"`` unrolls the
  ``ceil(steps / chunk)`` calls in the traced program, chained by an exactly-zero data
  dependency so they run in sequence and share one chunk's buffers: on XLA:CPU about the
  floor of m x one forward+backward (ahead of Captum) with temp memory bounded by one chunk
  (about 0.22 GB for SmallCNN, B = 64, chunk = 4, at m = 32 and m = 128); compile time grows
  with the number of chunks. ``loop="scan"`` runs the chunks in a ``lax.scan``: the same
  memory and constant compile time, but a CNN's loop body ran 2-3.5x slower on XLA:CPU.
  ``chunk=None`` runs all ``steps * B`` rows as one batch (best on a GPU; on CPU the largest
  memory). Results do not depend on ``chunk`` or ``loop`` beyond float rounding. See
  benchmarks/bench_attribution.md.

  Args:
    f: pure batched model, (B, ...) -> logits (B, K).
    x: inputs, (B, ...) floating; or a tuple or dict of such batches (a model
      with several inputs: the maps come back in that structure, each shaped like its
      input; ``baseline`` is then ``"black"``, a scalar or the same structure).
    target: an int or a (B,) int array; ``"all"`` (every class, T = K) or a (B, T) int
      array for one map per target, (B, T, ...): each path point's forward pass is shared
      by the T targets (their cotangents are vmapped through one linearisation).
    baseline: ``"black"``, ``"white"``, ``"random"``, ``"blur"`` or an array broadcasting
      to ``x`` (see :func:`make_baseline`).
    steps: m, the number of quadrature nodes.
    method: ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"``,
      ``"riemann_trapezoid"``, ``"gausslegendre"`` or ``"exact"``: for networks that are
      piecewise linear along the path (ReLU, leaky ReLU, abs, max-pool, affine layers,
      inference batch norm), the breakpoints of every example's path are found (ExactLine)
      and the integral is exact between them (``steps`` ignored; not under ``jit``; the
      cost grows with the number of breakpoints: about 2,800 per example on the trained
      LeNet, more than 13,000 after the first conv layer of the SmallCNN, see
      benchmarks/bench_ig_accuracy.md). ``info["breakpoints"]`` lists them.
    chunk: steps per call of ``f`` (int >= 1) or ``None`` for all at once. With
      ``method="exact"``, ``chunk * max(B, 64)`` segment gradients per call (``None``:
      4096).
    loop: ``"unroll"`` or ``"scan"``, how the chunks are sequenced; ``"auto"`` (default):
      ``"scan"`` when ``f`` runs a ``scan`` / ``while`` loop itself (RNNs, scanned layer
      stacks: unrolling copies that loop per chunk, compiles slowly and ran slower), else
      ``"unroll"``.
    key: a ``jax.random`` key (for ``baseline="random"``).
    output: what is attributed: ``"logit"`` (default), ``"log_softmax"``, ``"softmax"``
      or ``"cross_entropy"`` (as in :func:`jaxplain.gradient`).
    value_range: ``(lo, hi)`` for the white and random baselines (default: per example).
    blur_sigma: the blur baseline's sigma in pixels.
    return_gap: also return the completeness gap (B,) (one extra forward pass).
    target_chunk: with several targets, how many backward passes are vmapped at once
      (``None``: all T).
    tol: refine each example until its completeness gap is at most
      ``max(tol * |out(x)[t] - out(x')[t]|, atol)``, by nested trapezoid rules (level L:
      2^L + 1 nodes; each level adds the midpoints and reuses every gradient already
      evaluated). ``method`` and ``steps`` are then ignored. See ``driver``.
    atol: the absolute floor of the tolerance (for tiny ``out(x) - out(x')``).
    min_steps, max_steps: with ``tol``, the first level has the least 2^L + 1 >= min_steps
      nodes, the last at most ``max_steps``; examples that do not converge by then are
      reported in ``info["converged"]``.
    driver: with ``tol``, ``"auto"`` (default): ``"local"`` when called with concrete
      values (outside ``jit``), ``"while"`` when ``x`` or ``f``'s values are traced (under
      ``jit``, or ``jax.jvp`` over the model's parameters; bench_gpu's CPU smoke run, SmallCNN,
      4 images: local 0.19 s / 0.27 s at 1 % / 0.1 %, while 1.17 s / 38.6 s). Or
      ``"while"`` (a bounded ``lax.while_loop`` over levels; usable
      under ``jit`` and forward-mode ``jax.jvp``, not under ``jax.grad``: JAX cannot reverse a
      loop whose trip count depends on the data, so differentiate IG with a fixed ``steps``;
      every level computes the whole batch until all examples converged) or
      ``"host"`` (a Python loop over jitted levels that evaluates only the examples not yet
      converged; not under ``jit``). Measured on a 2-core CPU (benchmarks/
      bench_ig_accuracy.md): ``"host"`` 2.5-3.2x faster on a trained LeNet, about even on
      the SmallCNN (the while loop's body misses XLA:CPU's fast convolutions, and it runs
      every example until the slowest converges); see jaxplain/_adaptive_ig.py. Or
      ``"local"`` (not under ``jit``): each example bisects only the intervals of its path
      with the largest local completeness gaps, so nodes gather where the integrand jumps
      (ReLU / max-pool switches); the result is a trapezoid rule on that example's own
      non-uniform nodes, and ``max_steps`` bounds their number.
    return_info: also return ``info``, a dict of (B,) arrays: ``"steps"`` (nodes evaluated
      per example), ``"gap"`` (final completeness gap) and ``"converged"``.
    progress: with ``method="exact"`` and more than 8 examples, report the breakpoint search
      (groups of 8 examples): a tqdm bar on a terminal, one line per group in a log.

  Returns:
    Attributions shaped like ``x`` ((B, T, ...) for several targets) in the accumulation
    dtype, ``x.dtype`` promoted to at least float32: for bfloat16 inputs the nodes, weights
    and sum are float32 and so is the result. With ``return_gap``, ``(attributions, gap)`` where
    ``gap = sum_i IG_i - (out(x)[t] - out(x')[t])``, (B,) or (B, T).

  Raises:
    NotPiecewiseLinearError: ``method="exact"`` and ``f`` holds a primitive that is not
      piecewise linear along the path (the message names the first one).

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([(x ** 2).sum(1), x.sum(1)], axis=1)
  >>> integrated_gradients(f, jnp.array([[1., 2.]]), 0, steps=4)  # x^2 - 0^2
  Array([[1., 4.]], dtype=float32)
  """
  if method == "exact" or tol is not None:
    return _integrated_special(f, x, target, baseline=baseline, method=method, chunk=chunk,
                               key=key, output=output, value_range=value_range,
                               blur_sigma=blur_sigma, return_gap=return_gap, tol=tol,
                               atol=atol, min_steps=min_steps, max_steps=max_steps,
                               driver=driver, return_info=return_info, progress=progress)
  _check_output(output)
  if loop not in ("auto", "unroll", "scan"):
    raise ValueError(f"loop: expected 'auto', 'unroll' or 'scan', got {loop!r}")
  _validate.check_chunk(chunk)
  _check_target_chunk(target_chunk)
  alphas, weights = quadrature_rule(method, steps)
  x = _validate.check_batched(x, "x")
  out_shape, f_loops = _validate.check_model(f, x, loops=True)
  k = out_shape.shape[1]
  if loop == "auto":
    loop = "scan" if f_loops else "unroll"
  base = make_baseline(x, baseline, key=key, value_range=value_range, blur_sigma=blur_sigma)
  b = x.shape[0]
  multi = _is_multi(target)
  if multi:
    t = _multi_targets(target, b, _num_classes(f, x) if isinstance(target, str) else None)
    per = (t.shape[1],) + x.shape[1:]  # one example's (T, ...) block
  else:
    t = _validate.check_target(target, b, k, "target")
    per = x.shape[1:]
  # Nodes, weights and the running sum are kept in the accumulation dtype (float32 for
  # bfloat16 / float16 inputs); only the points handed to f are in x's dtype.
  acc = _validate.accumulation_dtype(x.dtype)
  diff = x.astype(acc) - base.astype(acc)
  base_acc = base.astype(acc)
  m = len(alphas)
  c = m if chunk is None else min(int(chunk), m)
  bshape = (1,) * x.ndim

  def chunk_sum(a: Array, w: Array) -> Array:
    # Rows ordered (example, step), so a batch sharded over devices stays sharded: the
    # (step, example) order made GSPMD all-gather every chunk's points (each device then did
    # all the rows). ``a`` is (B, n): each example's nodes.
    n = a.shape[-1]
    pts = base_acc[:, None] + a.reshape(a.shape + bshape[1:]) * diff[:, None]
    pts = pts.reshape((b * n,) + x.shape[1:]).astype(x.dtype)
    if multi:
      _, g = _grad_rows_multi(f, pts, jnp.repeat(t, n, axis=0), output, target_chunk)
    else:
      _, g = _grad_rows(f, pts, jnp.repeat(t, n), output)
    g = g.reshape((b, n) + per).astype(acc)
    return jnp.sum(g * w.reshape((1, n) + (1,) * len(per)), axis=1)

  a_all = jnp.asarray(alphas, acc)
  w_all = jnp.asarray(weights, acc)
  n_full = m // c
  total = jnp.zeros((b,) + per, acc)
  if loop == "scan" and n_full > 1:
    def body(acc_sum, aw):
      return acc_sum + chunk_sum(jnp.broadcast_to(aw[0], (b, c)), aw[1]), None
    total, _ = jax.lax.scan(body, total, (a_all[:n_full * c].reshape(n_full, c),
                                          w_all[:n_full * c].reshape(n_full, c)))
    start = n_full * c
  else:
    start = 0
  for s in range(start, m, c):
    a = jnp.broadcast_to(a_all[s:s + c], (b, min(c, m - s)))
    if s > 0:
      # Sequence the unrolled chunks: XLA:CPU schedules independent chunks as if concurrent
      # and keeps all their buffers live (temp memory ~ m; an optimization_barrier does not
      # survive its passes). A data dependency of this chunk's nodes on the previous chunks'
      # sum forces them to run one after another and reuse one chunk's buffers. The term is
      # exactly 0 (min(|v|, 0)), NaN only if the sum already is. It is taken per example,
      # (B,), so a batch sharded over devices needs no cross-device step between chunks.
      dep = jnp.minimum(jnp.abs(total.reshape(b, -1)[:, 0]), 0)
      a = a + jax.lax.stop_gradient(dep)[:, None]
    total = total + chunk_sum(a, w_all[s:s + c])
  attr = (diff[:, None] if multi else diff) * total
  if not (return_gap or return_info):
    return attr
  gap = _gap(f, x, base, t, attr, output)
  if return_info:
    return attr, {"steps": jnp.full(gap.shape, m, jnp.int32), "gap": gap,
                  "converged": jnp.ones(gap.shape, bool)}
  return attr, gap


def _integrated_special(f, x, target, *, baseline, method, chunk, key, output, value_range,
                        blur_sigma, return_gap, tol, atol, min_steps, max_steps, driver,
                        return_info, progress):
  """IG to a tolerance (``tol``) or exact IG (``method="exact"``)."""
  _check_output(output)
  _validate.check_chunk(chunk)
  x = _validate.check_batched(x, "x")
  if _is_multi(target):
    raise ValueError("target: tol= and method='exact' take one target per example (an int "
                     "or a (B,) array); call once per target column")
  k = _validate.check_model(f, x).shape[1]
  base = make_baseline(x, baseline, key=key, value_range=value_range, blur_sigma=blur_sigma)
  t = _validate.check_target(target, x.shape[0], k, "target")
  acc = _validate.accumulation_dtype(x.dtype)
  base_acc = base.astype(acc)
  diff = x.astype(acc) - base_acc
  if method == "exact":
    if tol is not None:
      raise ValueError("tol: method='exact' needs no tolerance; pass tol=None")
    from jaxplain import _exact_ig
    attr, info = _exact_ig.exact_ig(f, x, base, t, output, chunk, progress=progress)
  else:
    from jaxplain import _adaptive_ig
    if not float(tol) > 0:
      raise ValueError(f"tol: expected a float > 0, got {tol!r}")
    if driver not in ("auto",) + _adaptive_ig.DRIVERS:
      raise ValueError(f"driver: expected 'auto' or one of {_adaptive_ig.DRIVERS}, got "
                       f"{driver!r}")
    auto = driver == "auto"  # the fastest that can run here: local needs concrete values
    if auto:
      driver = ("local" if all(_validate.is_concrete(v) for v in (x, base_acc, t))
                else "while")
    l0, lmax = _adaptive_ig._levels(min_steps, max_steps)
    if driver == "local":
      try:
        attr, steps, gap, done = _adaptive_ig.adaptive_ig_local(
            f, base_acc, diff, t, output, chunk, x.dtype, float(tol), float(atol), l0,
            int(max_steps))
      except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
              jax.errors.TracerBoolConversionError):
        if not auto:  # f is traced although x is not (jax.jvp over its parameters)
          raise
        driver = "while"
    if driver != "local":
      run = (_adaptive_ig.adaptive_ig_while if driver == "while"
             else _adaptive_ig.adaptive_ig_host)
      attr, steps, gap, done = run(f, base_acc, diff, t, output, chunk, x.dtype, float(tol),
                                   float(atol), l0, lmax)
    info = {"steps": steps, "gap": gap, "converged": done}
    if not return_info and _validate.is_concrete(done) and not bool(np.all(done)):
      bad = ~np.asarray(done)
      warnings.warn(
          f"integrated_gradients: {int(bad.sum())} of {bad.size} examples did not reach "
          f"tol={tol} within max_steps={max_steps} (largest |gap| "
          f"{float(np.max(np.abs(np.asarray(gap)[bad]))):.3g}); return_info=True marks them. "
          "Raise max_steps, try driver='local', or look at the integrand near the baseline "
          "(a normalisation layer fed an all-zero input has a ~1/sqrt(eps) gradient there)",
          RuntimeWarning, stacklevel=3)
  if return_info:
    return attr, info
  if return_gap:
    return attr, info["gap"]
  return attr


def _gap(f: Fn, x: Array, base: Array, t: Array, attr: Array, output: str) -> Array:
  """sum_i attr_i - (out(x)[t] - out(x')[t]): (B,) for t (B,), (B, T) for t (B, T)."""
  b = x.shape[0]
  logits = f(jnp.concatenate([x, base], axis=0))
  _validate.check_logits(logits, 2 * b)
  acc = _validate.accumulation_dtype(attr.dtype)
  if t.ndim == 2:
    t2 = _multi_targets(jnp.concatenate([t, t]), 2 * b, logits.shape[-1])
    out = jax.vmap(lambda tc: _output_value(logits, tc, output), in_axes=1, out_axes=1)(t2)
    delta = (out[:b] - out[b:]).astype(acc)
    return jnp.sum(attr.reshape(b, t.shape[1], -1).astype(acc), axis=2) - delta
  t2 = _validate.check_target(jnp.concatenate([t, t]), 2 * b, logits.shape[-1], "target")
  out = _output_value(logits, t2, output)
  delta = (out[:b] - out[b:]).astype(acc)
  return jnp.sum(attr.reshape(b, -1).astype(acc), axis=1) - delta


def layer_conductance(model: Any, x: Array, target: Any, layer: str, *,
                      baseline: Any = "black", steps: int = 32,
                      method: str = "gausslegendre", chunk: int | None = 4,
                      output: str = "logit", key: Array | None = None,
                      value_range: tuple[float, float] | None = None,
                      blur_sigma: float | None = None) -> Array:
  """Conductance of every unit of a layer (Dhamdhere et al. 2019; Captum's
  ``LayerConductance``): how much of the input's Integrated Gradients flows through each
  hidden unit.

  ``cond_j = sum_k w_k * dF/dy_j(x_k) * dy_j(x_k)/dalpha`` with ``x_k = x' + a_k (x - x')``
  on IG's quadrature nodes, ``y`` the layer's output and ``F`` the target's output. Summed
  over the units it is IG's total at the same nodes (the chain rule: ``sum_j dF/dy_j
  dy_j/dalpha = dF/dalpha``), so it sums to ``F(x)[t] - F(x')[t]`` up to the quadrature
  error. Each node costs a JVP (forward) and a VJP (forward + backward) of the model.

  Args:
    model: anything :func:`jaxplain.wrap` takes (or a wrapped ``Model``).
    x: inputs (B, ...) floating.
    target: an int or a (B,) int array.
    layer: the layer's name (see ``Model.layer_names(x)``).
    baseline, steps, method, output, key, value_range, blur_sigma: as in
      :func:`integrated_gradients`.
    chunk: nodes per call (``chunk * B`` rows), unrolled; ``None``: all at once.

  Returns:
    (B, ...) the conductance of every unit of the layer's output (channels-last).

  >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxplain
  >>> net = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(3)])
  >>> x = jnp.ones((2, 5))
  >>> m = jaxplain.wrap(net, net.init(jax.random.key(0), x))
  >>> c = layer_conductance(m, x, 1, "layers_0", steps=16)
  >>> c.shape, bool(jnp.allclose(c.sum(1), m(x)[:, 1] - m(jnp.zeros_like(x))[:, 1],
  ...                            atol=1e-4))
  ((2, 4), True)
  """
  from jaxplain.model import Model, wrap  # pylint: disable=import-outside-toplevel
  _check_output(output)
  m = model if isinstance(model, Model) else wrap(model)
  _validate.check_chunk(chunk)
  alphas, weights = quadrature_rule(method, steps)
  x = _validate.check_batched(x, "x")
  k = _validate.check_model(m, x).shape[1]
  b = x.shape[0]
  t = _validate.check_target(target, b, k, "target")
  base = make_baseline(x, baseline, key=key, value_range=value_range, blur_sigma=blur_sigma)
  diff = x - base
  y_spec = jax.eval_shape(lambda z: m.capture(z, [layer])[1][layer][1], x)
  acc = _validate.accumulation_dtype(x.dtype)

  def rows(aw):  # the n nodes of a chunk as one batch of n * B rows -> (n, B, ...) terms
    a, w = aw
    n = a.shape[0]
    z = (base[None] + a.astype(x.dtype).reshape((n,) + (1,) * x.ndim) * diff[None])
    z = z.reshape((n * b,) + x.shape[1:])
    dz = jnp.broadcast_to(diff[None], (n,) + x.shape).reshape(z.shape)
    zero = jnp.zeros((n * b,) + y_spec.shape[1:], y_spec.dtype)
    _, y_dot = jax.jvp(lambda zz: m.perturb(zz, layer, zero)[1], (z,), (dz,))
    logits, vjp = jax.vjp(lambda d: m.perturb(z, layer, d)[0], zero)
    (dy,) = vjp(_cotangent(logits, jnp.tile(t, n), output))
    term = (dy * y_dot).astype(acc).reshape((n, b) + y_spec.shape[1:])
    return term * w.astype(acc).reshape((n,) + (1,) * (term.ndim - 1))

  terms = unrolled(rows, (jnp.asarray(alphas), jnp.asarray(weights)), chunk)
  return _validate.select_valid(terms.sum(0), t, k).astype(y_spec.dtype)


@_validate.accepts_nnx
@_pack.several_inputs("attributions", "baseline", strings=("black",), returns_map=False)
def completeness_gap(f: Fn, x: Array, target: Any, attributions: Array, *,
                     baseline: Any = "black", key: Array | None = None,
                     output: str = "logit",
                     value_range: tuple[float, float] | None = None,
                     blur_sigma: float | None = None) -> Array:
  """Completeness gap of attributions: ``sum_i attr_i - (out(x)[t] - out(x')[t])``, (B,).

  Zero for exact Integrated Gradients (Sundararajan et al. 2017, Proposition 1); for the
  quadrature it is the approximation error (Captum's "convergence delta"). Pass the same
  ``baseline`` (and ``key`` for ``"random"``) as to :func:`integrated_gradients`.

  Args:
    f: pure batched model, (B, ...) -> logits (B, K).
    x: inputs, (B, ...).
    target: an int or a (B,) int array; ``"all"`` or (B, T) for maps (B, T, ...).
    attributions: shaped like ``x`` (or (B, T, ...) for several targets).
    baseline, key, value_range, blur_sigma: as in :func:`make_baseline`.
    output: as in :func:`integrated_gradients`.

  Returns:
    The signed gap per example, (B,) (or (B, T)).

  >>> import jax.numpy as jnp
  >>> f = lambda x: jnp.stack([(x ** 2).sum(1), x.sum(1)], axis=1)
  >>> completeness_gap(f, jnp.array([[1., 2.]]), 0, jnp.array([[1., 4.]]))
  Array([0.], dtype=float32)
  """
  _check_output(output)
  x = _validate.check_batched(x, "x")
  attributions = jnp.asarray(attributions)
  if _is_multi(target):
    t = _multi_targets(target, x.shape[0], _num_classes(f, x) if isinstance(target, str)
                       else None)
    want = (x.shape[0], t.shape[1]) + x.shape[1:]
  else:
    t = _validate.check_target(target, x.shape[0], None, "target")
    want = x.shape
  if attributions.shape != want:
    raise ValueError(f"attributions: expected shape {want} (like x, with a target axis for "
                     f"several targets), got {attributions.shape}")
  base = make_baseline(x, baseline, key=key, value_range=value_range, blur_sigma=blur_sigma)
  return _gap(f, x, base, t, attributions, output)
