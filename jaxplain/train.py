"""A jitted, data-parallel training driver for Flax linen, Flax NNX and Equinox models, with
orbax checkpoints.

Frameworks: a Flax linen module (or ``jaxplain.wrap(module, variables)``); a Flax NNX module
(bare or wrapped: its ``nnx.Param`` values are trained, the other variables such as
``BatchStat`` are the ``model_state``, rng streams are reseeded from the step key; train mode
``module.train()``, evaluation ``module.eval()``); a stateless Equinox module (its floating
point arrays are trained, per example under ``jax.vmap``, always in inference mode, so dropout
is off). For NNX / Equinox the ``variables`` are nested dicts of the arrays and
``FitResult.model`` is the trained module. Keras models and plain functions are not trained
here.

One ``step(state, batch, key)`` compiled once with ``donate_argnums`` (big_vision style):
the state is ``{"params", "model_state", "opt_state", "step"}`` (``model_state`` is ``{}`` or
``{"batch_stats": ...}``), randomness is ``jax.random.fold_in(key, step)`` and the metrics
come back as a dict. Data parallelism: a 1-D ``Mesh`` over the local devices, batches split
along their leading axis with ``NamedSharding(mesh, P("data"))`` and the state replicated,
so the same code runs on 1 CPU, 4 forced host devices or 8 GPUs (XLA inserts the gradient
all-reduce; batch-norm statistics are over the global batch) and equals the single-device
run up to float reduction order.

Checkpoints (orbax, synchronous): every ``save_every`` steps and at the end, the state, the
early-stopping best variables, the data position (epoch, batch), the history and a config
that must match on resume; the last ``keep`` are kept. Orbax writes a step to a temporary
directory and renames it only when complete, so an interrupted save never replaces a good
checkpoint; a SHA-256 of every array, stored beside it, turns a corrupt file into a clear
:class:`CheckpointError` instead of silently wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxplain.data import _batching

__all__ = [
    "FitResult", "CheckpointError", "classification_loss", "make_train_step",
    "make_eval_step", "evaluate", "fit", "load_checkpoint", "init_state", "weighted_mean",
]

LossFn = Callable[..., tuple[jax.Array, tuple[dict, dict]]]


class FitResult(NamedTuple):
  """What :func:`fit` returns.

  Attributes:
    variables: the trained ``{"params": ..., ["batch_stats": ...]}`` (the best validation
      epoch's when early stopping is on).
    history: one dict per finished epoch: "epoch", "step", "loss", "accuracy" (training means
      over the epoch's steps), "val_loss"/"val_accuracy" with validation data, and
      "step_loss" (the loss of every step of the epoch, for exact comparisons).
    step: number of optimizer steps taken in total.
    model: the trained model in its own framework (a Flax NNX or Equinox module holding
      ``variables``); ``None`` for linen (a linen module holds no weights).
  """
  variables: dict
  history: list
  step: int
  model: Any = None


def _trainee(model):
  from jaxplain.model import train_parts  # pylint: disable=import-outside-toplevel
  return train_parts(model, "model")


class CheckpointError(RuntimeError):
  """A checkpoint is corrupt, unreadable, or does not match the run trying to resume it."""


# -- losses and steps ---------------------------------------------------------------------------


def _weights(batch: dict, n: int) -> jax.Array:
  m = batch.get("mask")
  return jnp.ones((n,), jnp.float32) if m is None else m.astype(jnp.float32)


def weighted_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """The batch mean every loss of the trainer uses: ``sum(w v) / max(sum(w), 1)``.

  Args:
    values: (B,) per-example values.
    weights: optional (B,) weights, e.g. the driver's padding ``batch["mask"]`` (bool or
      float); None means the plain mean.

  Returns:
    A scalar; 0 for an all-padding batch.

  >>> import jax.numpy as jnp
  >>> weighted_mean(jnp.array([1.0, 3.0, 5.0]), jnp.array([True, True, False]))
  Array(2., dtype=float32)
  """
  values = jnp.asarray(values)
  if weights is None:
    return jnp.mean(values)
  w = jnp.asarray(weights).astype(values.dtype)
  if w.shape != values.shape[:1]:
    raise ValueError(f"weights: expected shape {values.shape[:1]} to match the batch, got "
                     f"{w.shape}")
  return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def classification_loss(model) -> LossFn:
  """Softmax cross-entropy loss_fn for :func:`fit` / :func:`make_train_step`.

  ``loss_fn(params, model_state, batch, key, step) -> (loss, (metrics, new_model_state))``:
  mean cross-entropy of ``model.apply`` logits against ``batch["label"]`` (weighted by
  ``batch["mask"]`` when present); ``metrics = {"loss", "accuracy"}``. Batch-norm models
  (non-empty ``model_state``) run with ``train=True`` and return updated statistics;
  ``key`` feeds the ``"dropout"`` rng stream.

  >>> import jax, jax.numpy as jnp
  >>> from jaxplain.models import LeNet
  >>> m = LeNet(); p = m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  >>> b = {"image": jnp.zeros((2, 28, 28, 1)), "label": jnp.array([0, 1])}
  >>> loss, (metrics, _) = classification_loss(m)(p, {}, b, jax.random.key(1), 0)
  >>> sorted(metrics)
  ['accuracy', 'loss']
  """
  model, _ = _trainee(model)

  def loss_fn(params, model_state, batch, key, step):
    del step
    variables = {"params": params, **model_state}
    if model_state:
      logits, new_state = model.apply(variables, batch["image"], train=True,
                                      mutable=list(model_state), rngs={"dropout": key})
      new_state = dict(new_state)
    else:
      logits, new_state = model.apply(variables, batch["image"], rngs={"dropout": key}), {}
    labels = batch["label"]
    w = batch.get("mask")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = weighted_mean(ce, w)
    acc = weighted_mean((jnp.argmax(logits, -1) == labels).astype(ce.dtype), w)
    return loss, ({"loss": loss, "accuracy": acc}, new_state)

  return loss_fn


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    mesh: Mesh | None = None, donate: bool = True):
  """A jitted ``step(state, batch, key) -> (new_state, metrics)``.

  Args:
    loss_fn: ``loss_fn(params, model_state, batch, key, step) -> (loss, (metrics,
      new_model_state))`` (see :func:`classification_loss`).
    optimizer: an optax GradientTransformation.
    mesh: a 1-D ``("data",)`` mesh: batch split on it, state replicated (default: all local
      devices, :func:`jaxplain.data.data_mesh`).
    donate: donate the state buffers (``donate_argnums=0``); the input state is invalid
      after the call.

  Returns:
    The jitted step. The per-step key is ``jax.random.fold_in(key, state["step"])``;
    ``metrics`` always holds "loss".

  >>> import jax, optax
  >>> from jaxplain.models import LeNet
  >>> m = LeNet(); st = init_state(m, optax.sgd(0.1), jnp.zeros((1, 28, 28, 1)))
  >>> step = make_train_step(classification_loss(m), optax.sgd(0.1))
  >>> b = {"image": jnp.zeros((2, 28, 28, 1)), "label": jnp.array([0, 1])}
  >>> st, metrics = step(st, b, jax.random.key(0))
  >>> int(st["step"]), sorted(metrics)
  (1, ['accuracy', 'loss'])
  """
  mesh = _batching.data_mesh() if mesh is None else mesh
  rep, data = _replicated(mesh), NamedSharding(mesh, P("data"))

  def step_fn(state, batch, key):
    step = state["step"]
    k = jax.random.fold_in(key, step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (metrics, new_ms)), grads = grad_fn(state["params"], state["model_state"], batch,
                                               k, step)
    # optax's own internals (e.g. Adam's bias correction ``decay ** count`` with an int32
    # count) need standard promotion; the user's loss above runs under the caller's setting.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **metrics}
    new_state = {"params": params, "model_state": new_ms, "opt_state": opt_state,
                 "step": step + 1}
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,) if donate else ())


def make_eval_step(model, *, mesh: Mesh | None = None):
  """A jitted ``eval_step(variables, batch) -> {"loss_sum", "correct", "count"}`` (sums
  over the unmasked examples, so padded batches aggregate exactly).

  >>> import jax, jax.numpy as jnp
  >>> from jaxplain.models import LeNet
  >>> m = LeNet(); v = m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> out = make_eval_step(m)(v, {"image": jnp.zeros((2, 28, 28, 1)), "label": jnp.array([0, 1])})
  >>> float(out["count"])
  2.0
  """
  model, _ = _trainee(model)
  mesh = _batching.data_mesh() if mesh is None else mesh
  rep, data = _replicated(mesh), NamedSharding(mesh, P("data"))

  def eval_fn(variables, batch):
    logits = model.apply(variables, batch["image"])
    labels = batch["label"]
    w = _weights(batch, labels.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"loss_sum": jnp.sum(ce * w),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels).astype(w.dtype) * w),
            "count": jnp.sum(w)}

  return jax.jit(eval_fn, in_shardings=(rep, data), out_shardings=rep)


def _eval_batch_size(n: int, batch_size: int, n_dev: int) -> int:
  b = min(batch_size, n)
  return max(n_dev, -(-b // n_dev) * n_dev)  # a multiple of the device count


def evaluate(model, variables: dict, data: dict, *, batch_size: int = 256,
             devices: Sequence[jax.Device] | None = None, _eval_step=None) -> dict:
  """Accuracy and mean cross-entropy of ``model`` on a whole data dict (no example dropped:
  the last batch is padded and masked).

  Args:
    model: a Flax linen, Flax NNX or Equinox model returning logits (B, K) (as for
      :func:`fit`).
    variables: its variables ``{"params": ..., ["batch_stats": ...]}``.
    data: dict with "image" (N, H, W, C) and "label" (N,).
    batch_size: evaluation batch size (rounded to a multiple of the device count).
    devices: devices to shard over (default all local devices).

  Returns:
    ``{"accuracy": float, "loss": float}``.

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from jaxplain.models import LeNet
  >>> m = LeNet(); v = m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> d = {"image": np.zeros((5, 28, 28, 1), np.float32), "label": np.zeros(5, np.int32)}
  >>> sorted(evaluate(m, v, d))
  ['accuracy', 'loss']
  """
  model, _ = _trainee(model)
  for k in ("image", "label"):
    if k not in data:
      raise KeyError(f"evaluate: data must have key {k!r}, got keys {sorted(data)}")
  mesh = _batching.data_mesh(devices)
  eval_step = _eval_step or make_eval_step(model, mesh=mesh)
  variables = jax.device_put(variables, _replicated(mesh))
  bs = _eval_batch_size(len(data["label"]), batch_size, mesh.devices.size)
  sub = {"image": data["image"], "label": data["label"]}
  totals = []
  for batch in _batching.device_batches(sub, bs, mesh=mesh, remainder="pad"):
    totals.append(eval_step(variables, batch))
  totals = jax.device_get(totals)
  count = sum(float(t["count"]) for t in totals)
  return {"accuracy": sum(float(t["correct"]) for t in totals) / count,
          "loss": sum(float(t["loss_sum"]) for t in totals) / count}


# -- checkpoints --------------------------------------------------------------------------------


def _path_str(path) -> str:
  parts = []
  for k in path:  # container-independent: a NamedTuple field, dict key or index -> its name
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _checksum(tree) -> str:
  """SHA-256 over (path, dtype, shape, bytes) of every leaf, in sorted path order."""
  leaves = sorted((_path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree))
  h = hashlib.sha256()
  for path, leaf in leaves:
    a = np.asarray(jax.device_get(leaf))
    h.update(path.encode() + str(a.dtype).encode() + str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _manager(checkpoint_dir, keep: int):
  import orbax.checkpoint as ocp

  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=False)
  return ocp.CheckpointManager(pathlib.Path(checkpoint_dir).absolute(), options=opts)


def _save(mngr, step: int, tree, meta: dict) -> None:
  import orbax.checkpoint as ocp

  if step in mngr.all_steps():
    return  # already saved (e.g. resumed at this step): never rewrite a good checkpoint
  meta = {**meta, "checksum": _checksum(tree)}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                          meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


def _hint(mngr, step: int) -> str:
  where = f"{mngr.directory}/{step}"
  others = [s for s in mngr.all_steps() if s != step]
  return (f" Other checkpoints in {mngr.directory}: steps {others} (load one with "
          f"jaxplain.train.load_checkpoint(dir, step=...)), or delete {where} to resume from "
          f"the previous one." if others else f" Delete {where} to start over.")


def _read_meta(mngr, step: int, hint: str | None = None) -> dict:
  import orbax.checkpoint as ocp

  try:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as err:
    raise CheckpointError(f"checkpoint {mngr.directory}/{step}: cannot read its metadata "
                          f"({type(err).__name__}: {err}).{hint or _hint(mngr, step)}") from err


def _restore(mngr, step: int, target=None) -> tuple[Any, dict]:
  import orbax.checkpoint as ocp

  where = f"{mngr.directory}/{step}"
  hint = _hint(mngr, step)
  meta = _read_meta(mngr, step, hint)
  if target is not None:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding",
                                                                               None)), target)
    args = ocp.args.StandardRestore(abstract)
  else:
    args = ocp.args.StandardRestore()
  try:
    tree = mngr.restore(step, args=ocp.args.Composite(state=args)).state
  except Exception as err:
    raise CheckpointError(f"checkpoint {where} is corrupt or does not match this model/"
                          f"optimizer ({type(err).__name__}: {str(err)[:500]}).{hint}") from err
  if target is not None:
    want = jax.tree.map(lambda x: (tuple(np.shape(x)), str(x.dtype)), target)
    got = jax.tree.map(lambda x: (tuple(np.shape(x)), str(x.dtype)), tree)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
      raise CheckpointError(f"checkpoint {where} does not match this model/optimizer: shapes "
                            f"differ.{hint}")
  if meta.get("checksum") != _checksum(tree):
    raise CheckpointError(f"checkpoint {where} is corrupt: the SHA-256 of its arrays does not "
                          f"match the one recorded when it was saved.{hint}")
  return tree, meta


def load_checkpoint(checkpoint_dir, *, step: int | None = None, target=None
                    ) -> tuple[Any, dict]:
  """Load a checkpoint written by :func:`fit`, verifying its checksum.

  Args:
    checkpoint_dir: the ``checkpoint_dir`` given to :func:`fit`.
    step: which step (default: the latest).
    target: optional pytree like the saved one (restores NamedTuple optimizer states and
      shardings); without it optimizer states come back as plain containers.

  Returns:
    ``(tree, meta)``: ``tree = {"state": {...}, ["best": variables]}``; ``meta`` holds
    "config", "step", "epoch", "batch", "history", "finished".

  Raises:
    CheckpointError: corrupt, unreadable or mismatched checkpoint (the message names the
      other steps available).
    FileNotFoundError: no checkpoint in ``checkpoint_dir``.

  >>> load_checkpoint("/nonexistent/dir")  # doctest: +IGNORE_EXCEPTION_DETAIL
  Traceback (most recent call last):
  FileNotFoundError: no checkpoint in /nonexistent/dir
  """
  if not pathlib.Path(checkpoint_dir).is_dir():
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
  mngr = _manager(checkpoint_dir, keep=1_000_000)
  try:
    steps = mngr.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir}; "
                              f"steps: {steps}")
    return _restore(mngr, step, target)
  finally:
    mngr.close()


# -- fit ----------------------------------------------------------------------------------------


def init_state(model, optimizer: optax.GradientTransformation, sample: jax.Array, *,
               key: jax.Array | None = None, variables: dict | None = None,
               mesh: Mesh | None = None) -> dict:
  """The training state ``{"params", "model_state", "opt_state", "step"}`` of a model.

  The state is a copy placed replicated on ``mesh``, the placement the step of
  :func:`make_train_step` returns, so its second call reuses the first call's compilation
  (a state on a single-device placement compiled the step twice) and donating the state never
  invalidates ``variables``. For another mesh, call it again with that ``mesh`` (on jax 0.10.2
  ``jax.device_put`` of a replicated state onto a sub-mesh aliases its buffers even with
  ``may_alias=False``, and the step donates them).

  Args:
    model: a Flax linen module, or an NNX / Equinox module (whose weights are the init).
    optimizer: optax GradientTransformation.
    sample: an input batch (1, H, W, C) to initialise shapes.
    key: init key (default ``jax.random.key(0)``).
    variables: start from these variables instead of a fresh init.
    mesh: the ``("data",)`` mesh of the step (default: all local devices, as
      :func:`make_train_step`).

  >>> import optax, jax.numpy as jnp
  >>> from jaxplain.models import LeNet
  >>> sorted(init_state(LeNet(), optax.sgd(0.1), jnp.zeros((1, 28, 28, 1))))
  ['model_state', 'opt_state', 'params', 'step']
  """
  model, wrapped = _trainee(model)
  variables = wrapped if variables is None else variables
  if variables is None:
    key = jax.random.key(0) if key is None else key
    variables = jax.jit(model.init)(key, jnp.asarray(sample))  # jitted: no op-by-op init
  variables = dict(variables)
  if "params" not in variables:
    raise ValueError(f"variables must contain 'params', got keys {sorted(variables)}")
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  state = {"params": params, "model_state": model_state, "opt_state": optimizer.init(params),
           "step": jnp.zeros((), jnp.int32)}
  mesh = _batching.data_mesh() if mesh is None else mesh
  return jax.device_put(state, _replicated(mesh), may_alias=False)


def _variables(state: dict) -> dict:
  return {"params": state["params"], **state["model_state"]}


def _fingerprint(data: dict) -> str:
  h = hashlib.sha256()
  for k in sorted(data):
    a = np.asarray(data[k])
    h.update(k.encode() + str(a.shape).encode() + str(a.dtype).encode())
    h.update(np.ascontiguousarray(a[:: max(1, len(a) // 64)]).tobytes())
  return h.hexdigest()[:16]


def fit(model, train: dict, validation: dict | None = None, *, epochs: int,
        batch_size: int = 64, optimizer: optax.GradientTransformation | None = None,
        seed: int = 0, loss_fn: LossFn | None = None, checkpoint_dir=None,
        save_every: int | None = None, keep: int = 3, early_stop_patience: int | None = None,
        progress: bool = True, devices: Sequence[jax.Device] | None = None,
        remainder: str = "drop", init_variables: dict | None = None,
        monitor: str = "val_accuracy", config: dict | None = None,
        callback: Callable[[int, dict], None] | None = None,
        eval_batch_size: int = 256) -> FitResult:
  """Train ``model`` on a data dict: shuffled fixed-size batches, jitted data-parallel steps.

  Args:
    model: a Flax linen module returning logits, or ``jaxplain.wrap(module, variables)``
      (then training starts from those variables); a Flax NNX module or a stateless Equinox
      module (bare or wrapped; training starts from its weights, ``seed`` only orders the
      batches and feeds dropout). Keras models and plain functions are not trained here.
    train: dict with "image" (N, H, W, C), "label" (N,) and any extra per-example arrays
      (they reach ``loss_fn`` in the batch).
    validation: optional dict ("image", "label") evaluated after every epoch.
    epochs: number of passes over ``train``.
    batch_size: global batch size (a multiple of the device count).
    optimizer: optax optimizer (default ``optax.adam(1e-3)``).
    seed: init key ``fold_in(key(seed), 0)``, step keys ``fold_in(fold_in(key(seed), 1),
      step)`` and the batch order (:func:`jaxplain.data.epoch_permutation`).
    loss_fn: ``loss_fn(params, model_state, batch, key, step) -> (loss, (metrics,
      new_model_state))``; default :func:`classification_loss`.
    checkpoint_dir: save/resume here (orbax). An existing checkpoint is resumed exactly if
      its config (model, batch size, seed, data fingerprint, ``config``) matches, else
      :class:`CheckpointError`. ``epochs`` may differ (to train longer).
    save_every: also save every this many steps (always at the end).
    keep: checkpoints kept.
    early_stop_patience: stop when ``monitor`` has not improved for this many epochs and
      return the best epoch's variables (needs ``validation``).
    progress: a tqdm bar with loss and accuracy when stderr is a terminal; otherwise (a log
      file, CI) one line per epoch on stderr.
    devices: devices of the data mesh (default all local devices).
    remainder: the last partial batch: "drop" (reshuffled each epoch) or "pad" (masked).
    init_variables: start from these variables (fine-tuning) instead of a fresh init.
    monitor: "val_accuracy" (higher is better) or "val_loss" (lower is better).
    config: extra JSON-able settings saved with (and checked against) the checkpoint.
    callback: called as ``callback(step, metrics)`` after every step (metrics on device).
    eval_batch_size: validation batch size.

  Returns:
    :class:`FitResult` ``(variables, history, step, model)``.

  >>> import numpy as np
  >>> from jaxplain.models import LeNet
  >>> d = {"image": np.zeros((8, 28, 28, 1), np.float32), "label": np.arange(8) % 2}
  >>> r = fit(LeNet(), d, epochs=1, batch_size=4, progress=False)
  >>> r.step, len(r.history)
  (2, 1)
  """
  # linen: the module (variables from wrap(module, variables)); NNX / Equinox: a trainee
  # with linen's init / apply whose variables are the module's own arrays
  model, wrapped_variables = _trainee(model)
  if init_variables is None:
    init_variables = wrapped_variables
  for k in ("image", "label"):
    if k not in train:
      raise KeyError(f"fit: train must have key {k!r}, got keys {sorted(train)}")
  if early_stop_patience is not None and validation is None:
    raise ValueError("fit: early_stop_patience needs validation data")
  if monitor not in ("val_accuracy", "val_loss"):
    raise ValueError(f"monitor must be 'val_accuracy' or 'val_loss', got {monitor!r}")
  if remainder not in ("drop", "pad"):
    raise ValueError(f"remainder must be 'drop' or 'pad', got {remainder!r}")
  mesh = _batching.data_mesh(devices)
  n_dev = mesh.devices.size
  if batch_size % n_dev:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the {n_dev} devices")
  n = len(train["label"])
  spe = _batching.num_batches(n, batch_size, remainder)
  if spe == 0:
    raise ValueError(f"fit: {n} training examples < batch_size={batch_size} with "
                     f"remainder='drop'")
  total = epochs * spe
  optimizer = optax.adam(1e-3) if optimizer is None else optimizer
  loss_fn = classification_loss(model) if loss_fn is None else loss_fn
  root = jax.random.key(seed)
  rep = _replicated(mesh)
  state = init_state(model, optimizer, np.asarray(train["image"][:1]),
                     key=jax.random.fold_in(root, 0), variables=init_variables)
  # may_alias=False: the step donates the state, which must not delete the caller's arrays
  # (e.g. init_variables already on the device).
  state = jax.device_put(state, rep, may_alias=False)
  step_key = jax.device_put(jax.random.fold_in(root, 1), rep)
  early = early_stop_patience is not None
  # a copy: the donated state would otherwise delete the best variables' buffers
  best = jax.tree.map(jnp.copy, _variables(state)) if early else None
  run_config = {"model": repr(model), "batch_size": batch_size, "seed": seed,
                "remainder": remainder, "train": _fingerprint(train),
                "early_stop_patience": early_stop_patience, "monitor": monitor,
                "user": config or {}}
  run_config = json.loads(json.dumps(run_config))

  mngr = None
  if checkpoint_dir is not None:
    mngr = _manager(checkpoint_dir, keep)
  try:
    return _fit_loop(
        model=model, train=train, validation=validation, epochs=epochs,
        batch_size=batch_size, optimizer=optimizer, seed=seed, loss_fn=loss_fn,
        save_every=save_every, early_stop_patience=early_stop_patience, progress=progress,
        remainder=remainder, monitor=monitor, callback=callback,
        eval_batch_size=eval_batch_size, mesh=mesh, spe=spe, total=total, state=state,
        step_key=step_key, best=best, run_config=run_config, mngr=mngr)
  finally:
    if mngr is not None:
      mngr.close()


def _fit_loop(*, model, train, validation, epochs, batch_size, optimizer, seed, loss_fn,
              save_every, early_stop_patience, progress, remainder, monitor, callback,
              eval_batch_size, mesh, spe, total, state, step_key, best, run_config,
              mngr) -> FitResult:
  """The body of :func:`fit` (resume, loop, saves); ``mngr`` is closed by the caller."""
  from tqdm.auto import tqdm

  from jaxplain import _progress

  lines = progress and not _progress.is_terminal()  # a log: one line per epoch, no bar
  early = early_stop_patience is not None
  history: list[dict] = []
  epoch_metrics: dict[str, list[float]] = {}
  es = {"best_value": None, "best_epoch": -1, "bad_epochs": 0, "stopped": False}
  start_epoch, start_batch = 0, 0
  if mngr is not None:
    if mngr.latest_step() is not None:
      saved = _read_meta(mngr, mngr.latest_step()).get("config")
      if saved != run_config:
        diff = {k: (saved.get(k), v) for k, v in run_config.items()
                if not isinstance(saved, dict) or saved.get(k) != v}
        raise CheckpointError(
            f"checkpoint {mngr.directory}/{mngr.latest_step()} was written by a different "
            f"run; differing settings (saved, this run): {diff}. Use another checkpoint_dir "
            f"or delete this one.")
      target = {"state": state, **({"best": best} if early else {})}
      tree, meta = _restore(mngr, mngr.latest_step(), target)
      state = tree["state"]
      best = tree.get("best")
      history, epoch_metrics, es = meta["history"], meta["epoch_metrics"], meta["early_stop"]
      start_epoch, start_batch = meta["epoch"], meta["batch"]

  step_fn = make_train_step(loss_fn, optimizer, mesh=mesh)
  eval_step = make_eval_step(model, mesh=mesh) if validation is not None else None

  def save(epoch, batch):
    if mngr is None:
      return
    tree = {"state": state, **({"best": best} if early else {})}
    meta = {"config": run_config, "step": int(state["step"]), "epoch": epoch, "batch": batch,
            "history": history, "epoch_metrics": epoch_metrics, "early_stop": es,
            "finished": bool(es["stopped"] or epoch >= epochs)}
    _save(mngr, int(state["step"]), tree, meta)

  step = int(state["step"])
  bar = tqdm(total=total, initial=min(step, total), disable=not progress or lines, desc="fit",
             leave=False)
  started = time.perf_counter()
  pending: list[dict] = []  # device metrics not yet fetched

  def flush():
    for m in jax.device_get(pending):
      for k, v in m.items():
        epoch_metrics.setdefault(k, []).append(float(v))
    pending.clear()

  try:
    for epoch in range(start_epoch, epochs):
      if es["stopped"]:
        break
      first = start_batch if epoch == start_epoch else 0
      it = _batching.batches(train, batch_size, seed=seed, epoch=epoch, remainder=remainder,
                             start=first)
      for b, batch in enumerate(it, start=first):
        state, metrics = step_fn(state, _batching.shard_batch(batch, mesh), step_key)
        step += 1
        pending.append(metrics)
        if callback is not None:
          callback(step, metrics)
        bar.update(1)
        if step % 10 == 0 or b + 1 == spe:
          flush()
          bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_metrics['loss'][-1]:.4f}",
                          acc=f"{epoch_metrics.get('accuracy', [math.nan])[-1]:.3f}")
        if save_every and step % save_every == 0 and b + 1 < spe:
          flush()
          save(epoch, b + 1)
      flush()
      rec = {"epoch": epoch + 1, "step": step}
      rec.update({k: float(np.mean(v)) for k, v in epoch_metrics.items()})
      rec["step_loss"] = list(epoch_metrics.get("loss", []))
      if validation is not None:
        ev = evaluate(model, _variables(state), validation, batch_size=eval_batch_size,
                      devices=list(mesh.devices.flat), _eval_step=eval_step)
        rec["val_loss"], rec["val_accuracy"] = ev["loss"], ev["accuracy"]
        bar.set_postfix(epoch=epoch + 1, loss=f"{rec['loss']:.4f}",
                        val_acc=f"{ev['accuracy']:.3f}")
        if early:
          value = rec[monitor]
          better = (es["best_value"] is None or
                    (value > es["best_value"] if monitor == "val_accuracy"
                     else value < es["best_value"]))
          if better:
            es.update(best_value=value, best_epoch=epoch + 1, bad_epochs=0)
            best = jax.tree.map(jnp.copy, _variables(state))
          else:
            es["bad_epochs"] += 1
            if es["bad_epochs"] >= early_stop_patience:
              es["stopped"] = True
      history.append(rec)
      if lines:
        shown = [f"{k} {rec[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy")
                 if k in rec]
        _progress.line(f"fit: epoch {epoch + 1}/{epochs}, step {step}: {', '.join(shown)} "
                       f"({time.perf_counter() - started:.1f} s)")
      epoch_metrics = {}
      if save_every and step % save_every == 0 and epoch + 1 < epochs and not es["stopped"]:
        save(epoch + 1, 0)
    save(len(history) if es["stopped"] else max(epochs, start_epoch), 0)
  finally:
    bar.close()
  variables = best if early and best is not None else _variables(state)
  from jaxplain.model import trained_model  # pylint: disable=import-outside-toplevel
  variables = jax.device_get(variables)
  return FitResult(variables, history, step, trained_model(model, variables))
