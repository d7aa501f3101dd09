"""``load(name, split)``: one dict interface for the embedded and the public data sets."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib

import numpy as np

from jaxplain.data import _builders

EMBEDDED = ("digits", "decoy_digits")
PUBLIC = {  # name -> (tfds name, native channels, native size or None if variable)
    "mnist": ("mnist", 1, 28),
    "cifar10": ("cifar10", 3, 32),
    "rock_paper_scissors": ("rock_paper_scissors", 3, 300),
    "caltech_birds2011": ("caltech_birds2011", 3, None),
}
NAMES = EMBEDDED + tuple(PUBLIC)


def default_data_dir() -> pathlib.Path:
  """Where tfds data live: ``$JAXPLAIN_DATA_DIR``, else ``$TFDS_DATA_DIR``, else
  ``~/tensorflow_datasets``.

  >>> isinstance(default_data_dir(), pathlib.Path)
  True
  """
  d = os.environ.get("JAXPLAIN_DATA_DIR") or os.environ.get("TFDS_DATA_DIR")
  return pathlib.Path(d).expanduser() if d else pathlib.Path("~/tensorflow_datasets").expanduser()


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of (N, H, W, C) float images to (N, size, size, C), clipped to [0, 1]."""
  import jax
  import jax.numpy as jnp

  if images.shape[1] == size and images.shape[2] == size:
    return images
  n, _, _, c = images.shape
  out = np.empty((n, size, size, c), np.float32)
  resize = jax.jit(lambda x: jax.image.resize(x, (x.shape[0], size, size, c), "bilinear"))
  for i in range(0, n, 512):  # chunks bound memory for the big public sets
    out[i:i + 512] = np.asarray(resize(jnp.asarray(images[i:i + 512])))
  return np.clip(out, 0.0, 1.0)


def _resize_one(img: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of one (H, W, C) float image with PIL (no recompilation per shape)."""
  from PIL import Image

  chans = [np.asarray(Image.fromarray(img[..., c]).resize((size, size), Image.BILINEAR))
           for c in range(img.shape[-1])]
  return np.clip(np.stack(chans, axis=-1), 0.0, 1.0).astype(np.float32)


def _set_channels(images: np.ndarray, channels: int) -> np.ndarray:
  c = images.shape[-1]
  if channels == c:
    return images
  if c == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  if c == 3 and channels == 1:  # ITU-R 601 luma
    return (images @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
  raise ValueError(f"channels: cannot convert {c} to {channels} channels")


def decoy_patch_side(size: int) -> int:
  """Side in pixels of the decoy patch at image size ``size``: ``max(2, round(3 size / 14))``.

  >>> decoy_patch_side(28), decoy_patch_side(32), decoy_patch_side(8)
  (6, 7, 2)
  """
  return max(2, int(round(3 * size / 14)))


def decoy_box(position: int, size: int) -> tuple[int, int, int]:
  """``(row0, col0, side)`` of the decoy patch at ``position`` (0..4 along the top edge, 5..9
  along the bottom edge, left to right) in a ``size x size`` image.

  >>> decoy_box(0, 28), decoy_box(9, 28)
  ((0, 0, 6), (22, 22, 6))
  """
  if not 0 <= int(position) <= 9:
    raise ValueError(f"position must be in 0..9, got {position}")
  s = decoy_patch_side(size)
  r0 = 0 if position < 5 else size - s
  c0 = int(round((position % 5) * (size - s) / 4))
  return r0, c0, s


def _decoy_masks(positions: np.ndarray, size: int) -> np.ndarray:
  masks = np.zeros((len(positions), size, size), bool)
  for i, p in enumerate(positions):
    r0, c0, s = decoy_box(int(p), size)
    masks[i, r0:r0 + s, c0:c0 + s] = True
  return masks


def _quiet_prepare(builder) -> None:
  """``download_and_prepare`` with nothing on stdout.

  tfds prints "Downloading and preparing dataset ..." and "Dataset ... downloaded and
  prepared ..." with ``print`` the first time; those lines go to the ``jaxplain.data``
  logger (INFO) instead, its progress bars are switched off and absl's warnings are quieted.
  """
  import io
  import logging

  from tensorflow_datasets.core.utils import tqdm_utils

  was_active, tqdm_utils._active = tqdm_utils._active, False  # pylint: disable=protected-access
  captured = io.StringIO()
  try:
    with contextlib.redirect_stdout(captured):
      builder.download_and_prepare()
  finally:
    tqdm_utils._active = was_active  # pylint: disable=protected-access
    for line in captured.getvalue().splitlines():
      if line.strip():
        logging.getLogger("jaxplain.data").info("tfds: %s", line.strip())


@contextlib.contextmanager
def _quiet_absl():
  """absl (tfds' logger) at ERROR level inside the block, e.g. "Variant folder ... has no
  dataset_info.json" while a builder looks at a half-prepared directory."""
  import logging

  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


@functools.lru_cache(maxsize=8)
def _embedded_raw(name: str, split: str, data_dir: str) -> dict:
  cls = _builders.JaxplainDecoyDigits if name == "decoy_digits" else _builders.JaxplainDigits
  with _quiet_absl():
    builder = cls(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      import fcntl

      # Several processes (pytest -n, parallel experiments) may prepare at once: serialise.
      pathlib.Path(data_dir).mkdir(parents=True, exist_ok=True)
      with open(pathlib.Path(data_dir) / f".{cls.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = cls(data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
          _quiet_prepare(builder)
        fcntl.flock(lock, fcntl.LOCK_UN)
    src = builder.as_data_source(split=split)
  ex = src.__getitems__(list(range(len(src))))
  order = np.argsort([e["index"] for e in ex])
  out = {k: np.stack([ex[i][k] for i in order]) for k in ex[0]}
  for v in out.values():
    v.setflags(write=False)
  return out


def _load_embedded(name, split, image_size, channels, data_dir):
  if split not in _builders.SPLIT_SIZES:
    raise ValueError(f"split: {name} has splits {tuple(_builders.SPLIT_SIZES)}, got {split!r}")
  raw = _embedded_raw(name, split, str(data_dir))
  images = (raw["image"].astype(np.float32) / 16.0)[..., None]
  size = 8 if image_size is None else image_size
  images = _resize(images, size)
  out = {"label": raw["label"].astype(np.int32)}
  if name == "decoy_digits":
    mask = _decoy_masks(raw["decoy_position"], size)
    images = np.where(mask[..., None], np.float32(1.0), images)
    out["decoy_mask"] = mask
    out["decoy_position"] = raw["decoy_position"].astype(np.int32)
  out["image"] = _set_channels(images.astype(np.float32), channels)
  return {"image": out.pop("image"), **out}


def _not_available(name: str, tfds_name: str, split: str, data_dir, err: Exception):
  manual = ""
  if name == "caltech_birds2011":
    manual = (" caltech_birds2011 may need a manual download: put CUB_200_2011.tgz and "
              "segmentations.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/) in "
              f"{pathlib.Path(data_dir) / 'downloads' / 'manual'} and pass download=True "
              "(or manual_dir=...).")
  return FileNotFoundError(
      f"data set {name!r} (tfds {tfds_name!r}, split {split!r}) is not prepared under "
      f"data_dir={str(data_dir)!r} and cannot be downloaded here (no network). On a machine "
      f"with network access run `tfds build {tfds_name} --file_format=array_record "
      f"--data_dir=DIR` (array_record is needed: it is read without TensorFlow) and copy "
      f"DIR/{tfds_name} into {data_dir}, or call load(..., data_dir=DIR, download=True) "
      f"there.{manual} Original error: {type(err).__name__}: {err}")


def _load_public(name, split, image_size, channels, data_dir, download, manual_dir):
  import tensorflow_datasets as tfds

  tfds_name, _, native = PUBLIC[name]
  if native is None and image_size is None:
    raise ValueError(f"image_size: {name} has images of varying size; pass image_size=...")
  try:
    if download:
      builder = tfds.builder(tfds_name, data_dir=str(data_dir))
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    src = tfds.data_source(tfds_name, split=split, data_dir=str(data_dir), download=False)
  except Exception as err:  # tfds raises AssertionError / FileNotFoundError / DatasetNotFound
    raise _not_available(name, tfds_name, split, data_dir, err) from err
  n = len(src)
  images, labels = [], []
  for i in range(0, n, 1024):
    keys = list(range(i, min(n, i + 1024)))
    try:
      ex = src.__getitems__(keys)  # batched random access (array_record)
    except TypeError:  # tfds.testing.mock_data's source has a broken __getitems__
      ex = [src[k] for k in keys]
    for e in ex:
      img = np.asarray(e["image"], np.float32) / 255.0
      if img.ndim == 2:
        img = img[..., None]
      if img.shape[-1] == 4:
        img = img[..., :3]
      if image_size is not None and img.shape[:2] != (image_size, image_size):
        img = _resize_one(img, image_size)
      images.append(img)
      labels.append(int(e["label"]))
  images = np.stack(images) if images else np.zeros((0, 1, 1, channels), np.float32)
  return {"image": _set_channels(images, channels).astype(np.float32),
          "label": np.asarray(labels, np.int32)}


def load(name: str, split: str, *, image_size: int | None = None, channels: int = 1,
         data_dir: str | os.PathLike | None = None, download: bool = False,
         manual_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
  """Load a whole split as numpy arrays.

  The embedded sets ("digits", "decoy_digits") are built once by their tfds builders
  (array_record under ``data_dir``) and cached; the public ones ("mnist", "cifar10",
  "rock_paper_scissors", "caltech_birds2011") are read with ``tfds.data_source`` from an
  array_record copy under ``data_dir``; a clear FileNotFoundError says what to download and
  where when they are missing (no network here).

  Args:
    name: one of :data:`NAMES`.
    split: "train", "validation" or "test" for the digits sets; any tfds split string
      (e.g. "train[:10%]") for the public ones.
    image_size: resize (bilinear) to ``image_size x image_size``; ``None`` keeps the native
      size (8 for digits). E.g. 28 for LeNet, 32 for the CNN003/VGG/ResNet.
    channels: 1 (grey; RGB is converted by luma) or 3 (grey is repeated).
    data_dir: tfds data directory (default :func:`default_data_dir`).
    download: public sets only: try ``download_and_prepare`` (needs network or manual files).
    manual_dir: public sets only: where manually downloaded archives are.

  Returns:
    dict with "image" float32 (N, H, W, C) in [0, 1] and "label" int32 (N,); decoy_digits
    adds "decoy_mask" bool (N, H, W) (the patch pixels) and "decoy_position" int32
    (N,) (0..9, see :func:`decoy_box`).

  >>> d = load("digits", "test", image_size=28)
  >>> d["image"].shape, d["image"].dtype, d["label"].shape
  ((270, 28, 28, 1), dtype('float32'), (270,))
  """
  if name not in NAMES:
    raise ValueError(f"name must be one of {NAMES}, got {name!r}")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
    raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
  data_dir = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
  if name in EMBEDDED:
    return _load_embedded(name, split, image_size, channels, data_dir)
  return _load_public(name, split, image_size, channels, data_dir, download, manual_dir)
