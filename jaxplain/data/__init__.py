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
from jaxplain.data._builders import JaxplainDecoyDigits as JaxplainDecoyDigits
from jaxplain.data._builders import JaxplainDigits as JaxplainDigits
from jaxplain.data._builders import SPLIT_SIZES as SPLIT_SIZES
from jaxplain.data._builders import split_indices as split_indices
from jaxplain.data._load import NAMES as NAMES
from jaxplain.data._load import decoy_box as decoy_box
from jaxplain.data._load import decoy_patch_side as decoy_patch_side
from jaxplain.data._load import default_data_dir as default_data_dir
from jaxplain.data._load import load as load

__all__ = [
    "load", "batches", "device_batches", "shard_batch", "data_mesh", "num_batches",
    "epoch_permutation", "JaxplainDigits", "JaxplainDecoyDigits", "SPLIT_SIZES",
    "split_indices", "NAMES", "decoy_box", "decoy_patch_side", "default_data_dir",
]
