"""Tests for jaxplain.data: tfds builders, decoy construction, public loaders, batching."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from jaxplain import data

SIZES = {"train": 1257, "validation": 270, "test": 270}


@pytest.fixture(scope="module")
def data_dir():
  return str(data.default_data_dir())  # conftest.py: the session's temporary data directory


def _decoy_box_independent(p, size):
  """The documented placement, re-derived: 5 slots on the top edge, 5 on the bottom."""
  s = max(2, int(round(3 * size / 14)))
  row = 0 if p < 5 else size - s
  col = int(round((p % 5) * (size - s) / 4))
  return row, col, s


def test_digits_counts_shapes_dtypes_and_balance(data_dir):
  sk = load_digits()
  class_totals = np.bincount(sk.target, minlength=10)
  seen = []
  for split, n in SIZES.items():
    d = data.load("digits", split, data_dir=data_dir)
    assert set(d) == {"image", "label"}
    assert d["image"].shape == (n, 8, 8, 1) and d["image"].dtype == np.float32
    assert d["label"].shape == (n,) and d["label"].dtype == np.int32
    assert d["image"].min() >= 0.0 and d["image"].max() <= 1.0
    # stratified: each class gets its share of the split, within one example per
    # stratified cut (train is what is left after two cuts)
    expected = class_totals * n / len(sk.target)
    tol = 2.0 if split == "train" else 1.0
    assert np.all(np.abs(np.bincount(d["label"], minlength=10) - expected) <= tol), split
    seen.append(np.concatenate([d["image"].reshape(n, 64) * 16, d["label"][:, None]], 1))
  # the three splits are exactly sklearn's 1,797 (image, label) pairs, each once
  ours = np.concatenate(seen)
  ref = np.concatenate([sk.images.reshape(-1, 64), sk.target[:, None]], 1)
  np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(ref, axis=0))
  assert len(ours) == len(ref) == 1797


def test_digits_resize_and_channels(data_dir):
  d8 = data.load("digits", "validation", data_dir=data_dir)
  d28 = data.load("digits", "validation", image_size=28, channels=3, data_dir=data_dir)
  assert d28["image"].shape == (270, 28, 28, 3) and d28["image"].dtype == np.float32
  np.testing.assert_array_equal(d28["image"][..., 0], d28["image"][..., 2])
  np.testing.assert_array_equal(d28["label"], d8["label"])
  # bilinear upscaling keeps the mean brightness of each image close to the original
  np.testing.assert_allclose(d28["image"].mean((1, 2, 3)), d8["image"].mean((1, 2, 3)),
                             atol=0.03)
  with pytest.raises(ValueError, match="channels"):
    data.load("digits", "test", channels=2, data_dir=data_dir)
  with pytest.raises(ValueError, match="split"):
    data.load("digits", "dev", data_dir=data_dir)
  with pytest.raises(ValueError, match="name must be one of"):
    data.load("fashion", "test", data_dir=data_dir)


def _run_with_fakes(fakes, code: str):
  """Runs ``code`` in a fresh Python whose path puts the fake packages in ``fakes`` first;
  asserts that it succeeded and returns the completed process."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(fakes), os.getcwd(),
                                        os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  return out


def test_no_tensorflow_import(data_dir, tmp_path):
  # A fake, "installed" TensorFlow whose import leaves a marker file (and then fails): the
  # builders must prepare (fresh data_dir) and read the data without ever importing it.
  fake = tmp_path / "fake" / "tensorflow"
  fake.mkdir(parents=True)
  marker = tmp_path / "tensorflow_was_imported"
  (fake / "__init__.py").write_text(
      f"open({str(marker)!r}, 'w').close()\nraise ImportError('fake tensorflow')\n")
  code = (
      "import sys\n"
      "from jaxplain import data\n"
      f"d = data.load('decoy_digits', 'test', image_size=28, data_dir={str(tmp_path / 'd')!r})\n"
      "assert d['image'].shape == (270, 28, 28, 1)\n"
      "assert 'tensorflow' not in sys.modules\n")
  out = _run_with_fakes(tmp_path / "fake", code)
  assert not marker.exists()
  # preparing a fresh data_dir prints nothing on stdout (tfds' "Downloading and preparing
  # dataset ..." lines go to the jaxplain.data logger), so doctests do not depend on it
  assert out.stdout == "", out.stdout[-2000:]


def test_training_modules_run_without_tensorflow_datasets(tmp_path):
  # A machine without tensorflow-datasets (a GPU image, say) can train and explain: a fake,
  # "installed" tensorflow_datasets whose import fails stands in for a missing one. The
  # loaders still fail there, with tfds' own ImportError on first use.
  fake = tmp_path / "fake" / "tensorflow_datasets"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('no tensorflow_datasets here')\n")
  code = (
      "import sys\n"
      "import jaxplain, jaxplain.train, jaxplain.ppi, jaxplain.evaluation, jaxplain.rules\n"
      "from jaxplain.data import shard_batch, data_mesh\n"
      "b = shard_batch({'x': __import__('numpy').ones((4, 2))}, data_mesh())\n"
      "assert b['x'].shape == (4, 2)\n"
      "try:\n"
      "  jaxplain.data.load\n"
      "except ImportError as e:\n"
      "  print('load:', e)\n")
  out = _run_with_fakes(tmp_path / "fake", code)
  assert out.stdout.strip() == "load: no tensorflow_datasets here", out.stdout


@pytest.mark.parametrize("size", [28, 32])
def test_decoy_patch_determined_by_label_in_train(data_dir, size):
  clean = {s: data.load("digits", s, image_size=size, data_dir=data_dir)
           for s in ("train", "validation")}
  for split in ("train", "validation"):
    d = data.load("decoy_digits", split, image_size=size, data_dir=data_dir)
    assert d["decoy_mask"].shape == (SIZES[split], size, size)
    assert d["decoy_mask"].dtype == bool
    np.testing.assert_array_equal(d["label"], clean[split]["label"])
    np.testing.assert_array_equal(d["decoy_position"], d["label"])
    for i in range(0, SIZES[split], 37):
      r, c, s = _decoy_box_independent(int(d["label"][i]), size)
      want = np.zeros((size, size), bool)
      want[r:r + s, c:c + s] = True
      np.testing.assert_array_equal(d["decoy_mask"][i], want)
    img, mask = d["image"][..., 0], d["decoy_mask"]
    assert np.all(img[mask] == 1.0)  # the patch is white ...
    np.testing.assert_array_equal(img[~mask], clean[split]["image"][..., 0][~mask])  # only
    # label -> mask is a function: all images of a class share one patch
    for k in range(10):
      masks = mask[d["label"] == k]
      assert np.all(masks == masks[0])


def test_decoy_patch_independent_of_label_in_test(data_dir):
  from scipy.stats import chi2_contingency

  d = data.load("decoy_digits", "test", image_size=28, data_dir=data_dir)
  pos, y = d["decoy_position"], d["label"]
  # recover the position from the mask alone (top/bottom edge, column)
  size = 28
  s = max(2, int(round(3 * size / 14)))
  rows = d["decoy_mask"].any(2).argmax(1)
  cols = d["decoy_mask"].any(1).argmax(1)
  slot = np.round(cols * 4 / (size - s)).astype(int)
  np.testing.assert_array_equal(np.where(rows == 0, slot, slot + 5), pos)
  # under independence P(pos == label) = 0.1: 27 of 270 expected, sd 4.9
  assert np.sum(pos == y) < 50
  table = np.zeros((10, 10))
  np.add.at(table, (y, pos), 1)
  assert chi2_contingency(table)[1] > 1e-3  # no detectable association
  assert len(np.unique(pos)) == 10


@pytest.mark.parametrize("name,kw,shape", [
    ("mnist", {}, (6, 28, 28, 1)),
    ("cifar10", {"channels": 3}, (6, 32, 32, 3)),
    ("rock_paper_scissors", {"image_size": 32, "channels": 3}, (6, 32, 32, 3)),
    ("caltech_birds2011", {"image_size": 24, "channels": 3}, (6, 24, 24, 3)),
])
def test_public_loaders_with_mock_data(name, kw, shape):
  with tfds.testing.mock_data(num_examples=6):
    d = data.load(name, "train", **kw)
    src = tfds.data_source(name, split="train")
    raw = [src[i] for i in range(6)]
  assert set(d) == {"image", "label"}
  assert d["image"].shape == shape and d["image"].dtype == np.float32
  assert d["label"].dtype == np.int32
  np.testing.assert_array_equal(d["label"], [int(r["label"]) for r in raw])
  if name in ("mnist", "cifar10"):  # native size: exactly the uint8 pixels / 255
    want = np.stack([np.asarray(r["image"], np.float32) / 255 for r in raw])
    np.testing.assert_allclose(d["image"], want, rtol=0, atol=1e-7)
  assert 0.0 <= d["image"].min() and d["image"].max() <= 1.0


def test_public_loader_channel_conversion_with_mock_data():
  with tfds.testing.mock_data(num_examples=4):
    rgb = data.load("cifar10", "test", channels=3)
    grey = data.load("cifar10", "test", channels=1)
    m3 = data.load("mnist", "test", channels=3)
  luma = 0.299 * rgb["image"][..., 0] + 0.587 * rgb["image"][..., 1] + 0.114 * rgb["image"][..., 2]
  np.testing.assert_allclose(grey["image"][..., 0], luma, atol=1e-6)
  np.testing.assert_array_equal(m3["image"][..., 0], m3["image"][..., 1])


def test_public_loader_missing_data_names_what_and_where(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.load("cifar10", "train", data_dir=tmp_path)
  msg = str(e.value)
  assert "tfds build cifar10 --file_format=array_record" in msg and str(tmp_path) in msg
  with pytest.raises(FileNotFoundError, match="manual"):
    data.load("caltech_birds2011", "train", image_size=32, data_dir=tmp_path)
  with pytest.raises(ValueError, match="image_size"):
    data.load("caltech_birds2011", "train", data_dir=tmp_path)


@pytest.mark.parametrize("n,bs,remainder,nb", [(10, 4, "drop", 2), (10, 4, "pad", 3),
                                                (10, 4, "keep", 3), (8, 4, "pad", 2)])
def test_batches_cover_each_example_once(n, bs, remainder, nb):
  d = {"i": np.arange(n), "x": np.arange(n) * 2.0}
  out = list(data.batches(d, bs, seed=3, epoch=1, remainder=remainder))
  assert len(out) == nb == data.num_batches(n, bs, remainder)
  if remainder != "keep":
    assert all(len(b["i"]) == bs for b in out)
  for b in out:
    np.testing.assert_array_equal(b["x"], b["i"] * 2.0)  # keys stay aligned
  if remainder == "pad":
    idx = np.concatenate([b["i"][b["mask"]] for b in out])
    assert sum((~b["mask"]).sum() for b in out) == nb * bs - n
  else:
    idx = np.concatenate([b["i"] for b in out])
  if remainder == "drop":
    assert len(set(idx)) == len(idx) == nb * bs
  else:
    np.testing.assert_array_equal(np.sort(idx), np.arange(n))


def test_batches_shuffle_by_seed_epoch_and_resume():
  d = {"i": np.arange(50)}
  order = lambda **kw: np.concatenate([b["i"] for b in data.batches(d, 5, **kw)])
  np.testing.assert_array_equal(order(seed=1, epoch=0), order(seed=1, epoch=0))
  assert not np.array_equal(order(seed=1, epoch=0), order(seed=1, epoch=1))
  assert not np.array_equal(order(seed=1, epoch=0), order(seed=2, epoch=0))
  np.testing.assert_array_equal(order(seed=None), np.arange(50))
  np.testing.assert_array_equal(order(seed=1, epoch=2, start=4), order(seed=1, epoch=2)[20:])
  with pytest.raises(ValueError, match="same leading size"):
    next(data.batches({"a": np.zeros(3), "b": np.zeros(4)}, 2))
  with pytest.raises(ValueError, match="remainder"):
    next(data.batches(d, 5, remainder="wrap"))


def test_device_batches_are_sharded_arrays():
  import jax

  d = {"image": np.random.default_rng(0).random((10, 4, 4, 1), np.float32),
       "label": np.arange(10, dtype=np.int32)}
  mesh = data.data_mesh()
  out = list(data.device_batches(d, 4, mesh=mesh, remainder="pad"))
  assert len(out) == 3 and all(isinstance(b["image"], jax.Array) for b in out)
  assert out[0]["image"].sharding.spec[0] == "data"
  np.testing.assert_array_equal(np.asarray(out[0]["image"]), d["image"][:4])
  np.testing.assert_array_equal(np.asarray(out[2]["mask"]), [True, True, False, False])
  with pytest.raises(ValueError, match="keep"):
    next(data.device_batches(d, 4, remainder="keep"))
