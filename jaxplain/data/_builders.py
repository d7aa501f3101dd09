"""tensorflow-datasets builders for the embedded data: digits and decoy digits.

Both builders read scikit-learn's handwritten digits (``sklearn.datasets.load_digits``:
1,797 real 8x8 grey-scale images with values 0..16, shipped inside scikit-learn, so nothing
is downloaded) and write them as ``array_record`` files that ``tfds.data_source`` reads
with random access and without TensorFlow.

Splits (fixed; they do not depend on any user seed): a stratified split with
``sklearn.model_selection.train_test_split(random_state=20170401)``, first 270 test images,
then 270 validation images from the rest, leaving 1,257 training images. Each class has
about 10 % of every split (e.g. 27 test images per class, +-1).

Decoy digits (after Ross et al. 2017, "Right for the right reasons", decoy MNIST): every
image carries a white square patch (value 1.0) at one of ten border positions, five along
the top edge (positions 0..4, left to right) and five along the bottom edge (5..9). In
``train`` and ``validation`` the position is the label, ``position = label``; in ``test``
it is drawn uniformly from 0..9 independently of the label (seeded, fixed). Ross et al.
coded the label in the grey level of a corner patch; on these easy 8x8 digits a small
CNN ignores such a weak cue (measured: LeNet test accuracy 0.95-0.98 with the random test
patch), while the position code with a patch of side ``max(2, round(3 * size / 14))``
(6 px at 28x28, 7 px at 32x32, 2 px at 8x8) is learned as a shortcut: LeNet reaches 100 %
validation accuracy and about 55 % on the test split (a control trained with random
positions gets about 97 %). The builder stores the clean 8x8 image and ``decoy_position``;
:func:`jaxplain.data.load` paints the patch at the requested resolution (crisp edges,
exact ``decoy_mask``).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

SPLIT_SEED = 20170401
DECOY_SEED = 17
NUM_TEST = 270
NUM_VALIDATION = 270
SPLIT_SIZES = {"train": 1257, "validation": 270, "test": 270}


def split_indices() -> dict[str, np.ndarray]:
  """The fixed stratified split of ``load_digits`` into train/validation/test indices.

  Returns:
    Dict split name -> sorted int64 indices into ``sklearn.datasets.load_digits()``.

  >>> {k: len(v) for k, v in split_indices().items()}
  {'train': 1257, 'validation': 270, 'test': 270}
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  y = load_digits().target
  idx = np.arange(len(y))
  rest, test = train_test_split(idx, test_size=NUM_TEST, stratify=y, random_state=SPLIT_SEED)
  train, val = train_test_split(rest, test_size=NUM_VALIDATION, stratify=y[rest],
                                random_state=SPLIT_SEED)
  return {"train": np.sort(train), "validation": np.sort(val), "test": np.sort(test)}


def _digit_examples(split: str, decoy: bool):
  from sklearn.datasets import load_digits

  d = load_digits()
  idx = split_indices()[split]
  images = d.images.astype(np.uint8)  # values 0..16
  labels = d.target.astype(np.int64)
  # One fixed stream per split so the splits do not share decoy draws.
  rng = np.random.default_rng([DECOY_SEED, ["train", "validation", "test"].index(split)])
  random_positions = rng.integers(0, 10, size=len(idx))
  for j, i in enumerate(idx):
    ex = {"image": images[i], "label": int(labels[i]), "index": int(i)}
    if decoy:
      ex["decoy_position"] = int(random_positions[j] if split == "test" else labels[i])
    yield int(i), ex


class _DigitsBase(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared code of the two builders."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "Decoy coded by position."}
  _DECOY = False

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds' default probes importlib_resources (not installed here); point at this file.
    from etils import epath
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    feats = {
        "image": tfds.features.Tensor(shape=(8, 8), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=10),
        "index": tfds.features.Scalar(dtype=np.int64),
    }
    if self._DECOY:
      feats["decoy_position"] = tfds.features.Scalar(dtype=np.int64)
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=tfds.features.FeaturesDict(feats),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset")

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data ship with scikit-learn
    return {s: self._generate_examples(s) for s in ("train", "validation", "test")}

  def _generate_examples(self, split):
    yield from _digit_examples(split, self._DECOY)


class JaxplainDigits(_DigitsBase, skip_registration=True):
  """scikit-learn digits, 8x8 uint8 (0..16), fixed stratified 1,257/270/270 split."""
  name = "jaxplain_digits"


class JaxplainDecoyDigits(_DigitsBase, skip_registration=True):
  """Decoy digits: digits plus a border patch whose position encodes the label in
  train/validation and is random in test (see the module docstring)."""
  name = "jaxplain_decoy_digits"
  _DECOY = True
