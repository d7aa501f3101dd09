"""Fixed-size numpy batches shuffled by seed, and device placement sharded over a mesh."""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_REMAINDERS = ("drop", "pad", "keep")


def _check_data(data: dict) -> int:
  if not isinstance(data, dict) or not data:
    raise TypeError(f"data must be a non-empty dict of arrays, got {type(data).__name__}")
  sizes = {k: len(v) for k, v in data.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"data: all arrays must have the same leading size, got {sizes}")
  return next(iter(sizes.values()))


def num_batches(n: int, batch_size: int, remainder: str = "drop") -> int:
  """Number of batches :func:`batches` yields for ``n`` examples.

  >>> num_batches(10, 4, "drop"), num_batches(10, 4, "pad")
  (2, 3)
  """
  if remainder not in _REMAINDERS:
    raise ValueError(f"remainder must be one of {_REMAINDERS}, got {remainder!r}")
  return n // batch_size if remainder == "drop" else -(-n // batch_size)


def epoch_permutation(n: int, seed: int | None, epoch: int = 0) -> np.ndarray:
  """The example order of one epoch: ``arange(n)`` if ``seed`` is None, else a permutation
  drawn from ``numpy.random.default_rng([seed, epoch])`` (reproducible, per epoch).

  >>> epoch_permutation(5, None).tolist()
  [0, 1, 2, 3, 4]
  """
  if seed is None:
    return np.arange(n)
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def batches(data: dict, batch_size: int, *, seed: int | None = None, epoch: int = 0,
            remainder: str = "drop", start: int = 0) -> Iterator[dict]:
  """Yield fixed-size numpy batches of a dict of equally long arrays.

  Args:
    data: dict name -> array with a common leading size N (e.g. ``{"image": (N, H, W, C),
      "label": (N,)}``).
    batch_size: examples per batch; every yielded batch has exactly this size except with
      ``remainder="keep"``.
    seed: shuffle with :func:`epoch_permutation` (``None``: keep the order).
    epoch: epoch number mixed into the shuffle.
    remainder: what to do with the last ``N % batch_size`` examples: ``"drop"`` them,
      ``"pad"`` the last batch by repeating example 0 of it and add a bool ``"mask"`` (B,)
      that is False on the padding (every batch then has a ``"mask"``), or ``"keep"`` a
      smaller last batch.
    start: index of the first batch to yield (to resume mid-epoch).

  Yields:
    dict name -> array with leading size ``batch_size``.

  >>> data = {"x": np.arange(5), "y": np.arange(5) * 10}
  >>> [b["x"].tolist() for b in batches(data, 2, remainder="pad")]
  [[0, 1], [2, 3], [4, 4]]
  """
  n = _check_data(data)
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  nb = num_batches(n, batch_size, remainder)
  if nb == 0:
    raise ValueError(f"batches: {n} examples give no batch of batch_size={batch_size} with "
                     f"remainder='drop'; use a smaller batch_size or remainder='pad'")
  order = epoch_permutation(n, seed, epoch)
  for b in range(start, nb):
    idx = order[b * batch_size:(b + 1) * batch_size]
    valid = len(idx)
    if remainder == "pad" and valid < batch_size:
      idx = np.concatenate([idx, np.full(batch_size - valid, idx[0])])
    out = {k: np.asarray(v)[idx] for k, v in data.items()}
    if remainder == "pad":
      out["mask"] = np.arange(batch_size) < valid
    yield out


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all local devices).

  >>> data_mesh().axis_names
  ('data',)
  """
  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("data_mesh: devices must not be empty")
  return Mesh(np.array(devices), ("data",))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Place a numpy batch on ``mesh``, split along its leading (batch) axis.

  >>> b = shard_batch({"x": np.zeros((4, 2))}, data_mesh())
  >>> b["x"].shape
  (4, 2)
  """
  n_dev = mesh.devices.size
  sharding = NamedSharding(mesh, P("data"))
  out = {}
  for k, v in batch.items():
    if v.shape[0] % n_dev:
      raise ValueError(f"shard_batch: batch['{k}'] has leading size {v.shape[0]}, not "
                       f"divisible by the {n_dev} devices of the mesh; choose batch_size a "
                       f"multiple of {n_dev}")
    out[k] = jax.device_put(v, sharding)
  return out


def device_batches(data: dict, batch_size: int, *, mesh: Mesh | None = None, **kwargs
                   ) -> Iterator[dict]:
  """:func:`batches` placed on the devices, sharded over ``mesh`` (default: all local
  devices) along the batch axis. ``kwargs`` go to :func:`batches`; ``remainder="keep"`` is
  not allowed because the batch size must stay divisible by the device count.

  >>> data = {"image": np.zeros((8, 4, 4, 1), np.float32), "label": np.zeros(8, np.int32)}
  >>> [b["image"].shape for b in device_batches(data, 4)]
  [(4, 4, 4, 1), (4, 4, 4, 1)]
  """
  if kwargs.get("remainder") == "keep":
    raise ValueError("device_batches: remainder='keep' gives a ragged last batch; use 'drop' "
                     "or 'pad'")
  mesh = data_mesh() if mesh is None else mesh
  for b in batches(data, batch_size, **kwargs):
    yield shard_batch(b, mesh)
