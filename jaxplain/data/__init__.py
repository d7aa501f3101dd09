"""Data: tfds builders for the embedded digits and decoy digits, public-set loaders, batching.

``load(name, split, ...)`` returns a dict of numpy arrays ("image" float32 (N, H, W, C) in
[0, 1], "label" int32 (N,), plus "decoy_mask" bool (N, H, W) for decoy digits). Batches are
fixed-size numpy dicts (:func:`batches`), placed sharded over the local devices by
:func:`device_batches`. See ``_builders`` for the split and the decoy construction.

>>> d = load("decoy_digits", "train", image_size=28)
>>> d["decoy_mask"].shape, int(d["decoy_mask"][0].sum())
((1257, 28, 28), 36)
"""

from __future__ import annotations

from jaxplain.data._batching import batches as batches
from jaxplain.data._batching import data_mesh as data_mesh
from jaxplain.data._batching import device_batches as device_batches
from jaxplain.data._batching import epoch_permutation as epoch_permutation
from jaxplain.data._batching import num_batches as num_batches
from jaxplain.data._batching import shard_batch as shard_batch
# The builders and loaders import tensorflow_datasets (seconds, and not needed to batch or
# shard arrays: jaxplain.train imports this package for _batching alone), so they are
# imported on first use.
_LAZY = {
    "JaxplainDigits": "_builders", "JaxplainDecoyDigits": "_builders",
    "SPLIT_SIZES": "_builders", "split_indices": "_builders",
    "NAMES": "_load", "decoy_box": "_load", "decoy_patch_side": "_load",
    "default_data_dir": "_load", "load": "_load",
}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=import-outside-toplevel
    value = getattr(importlib.import_module(f"jaxplain.data.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'jaxplain.data' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "load", "batches", "device_batches", "shard_batch", "data_mesh", "num_batches",
    "epoch_permutation", "JaxplainDigits", "JaxplainDecoyDigits", "SPLIT_SIZES",
    "split_indices", "NAMES", "decoy_box", "decoy_patch_side", "default_data_dir",
]
