"""Shared experiment helpers: trained models on the embedded digits, reused from checkpoints.

``get_trained(name)`` trains (or restores) one of the zoo models on digits or decoy digits
with a fast, fixed recipe and returns ``(model, variables, data)``. Checkpoints live in
``out_dir/checkpoints/<name>-<dataset>-seed<seed>-ep<epochs>/`` (orbax, written by
:func:`jaxplain.train.fit`); a finished one is restored instead of retraining, and a file
lock makes concurrent callers (parallel experiments) train a model only once.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import pathlib
import shutil
import time
from typing import Callable

import numpy as np
import optax

from jaxplain import data as jdata
from jaxplain import models
from jaxplain import train as jtrain


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How a named model is built and trained on the 10-class digits."""
  make: Callable[[], object]
  image_size: int
  channels: int
  epochs: int
  learning_rate: float
  batch_size: int = 32


MODELS: dict[str, ModelSpec] = {
    # LeNet-5 (seed 001) on 28x28x1 upscaled digits.
    "lenet": ModelSpec(lambda: models.LeNet(num_classes=10), 28, 1, epochs=8,
                       learning_rate=3e-3),
    # The seed-003 CNN with reduced widths for 32x32x1 digits (seed: 32..256, 1024/512).
    "cnn003": ModelSpec(lambda: models.CNN003(num_classes=10, widths=(16, 16, 32, 32, 64, 64),
                                              hidden=(128, 64)), 32, 1, epochs=8,
                        learning_rate=2e-3),
    "vgg": ModelSpec(lambda: models.SmallVGG(num_classes=10, widths=(16, 32, 64), hidden=128),
                     32, 1, epochs=6, learning_rate=2e-3),
    "resnet_small": ModelSpec(lambda: models.ResNetSmall(num_classes=10), 32, 1, epochs=6,
                              learning_rate=3e-3),
}
DATASETS = ("digits", "decoy_digits")


def load_data(dataset: str, image_size: int, channels: int = 1) -> dict[str, dict]:
  """``{"train", "validation", "test"}`` dicts of :func:`jaxplain.data.load`."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
  return {s: jdata.load(dataset, s, image_size=image_size, channels=channels)
          for s in ("train", "validation", "test")}


def checkpoint_dir(name: str, *, dataset: str = "digits", seed: int = 0,
                   out_dir="outputs", epochs: int | None = None) -> pathlib.Path:
  """Where :func:`get_trained` keeps the checkpoint of one model/dataset/seed/epochs."""
  spec = MODELS[name]
  epochs = spec.epochs if epochs is None else epochs
  return pathlib.Path(out_dir) / "checkpoints" / f"{name}-{dataset}-seed{seed}-ep{epochs}"


def get_trained(name: str, *, dataset: str = "digits", seed: int = 0, out_dir="outputs",
                epochs: int | None = None, force: bool = False, progress: bool = True):
  """A trained model on the embedded digits, restored from its checkpoint when present.

  Args:
    name: "lenet" (28x28x1), "cnn003" (32x32x1, reduced widths), "vgg" (SmallVGG, 32x32x1)
      or "resnet_small" (32x32x1).
    dataset: "digits" or "decoy_digits" (decoy arrays stay in the returned data dicts).
    seed: init / shuffle / dropout seed.
    out_dir: checkpoints go to ``out_dir/checkpoints/``.
    epochs: override the recipe's epochs (a different checkpoint).
    force: retrain even if a checkpoint exists.
    progress: tqdm bar while training.

  Returns:
    ``(model, variables, data)`` with ``data = {"train", "validation", "test"}`` dicts at the
    model's input size.

  Example (training takes seconds; here only the checkpoint location):

  >>> checkpoint_dir("lenet", out_dir="outputs").as_posix()
  'outputs/checkpoints/lenet-digits-seed0-ep8'
  """
  if name not in MODELS:
    raise ValueError(f"name must be one of {tuple(MODELS)}, got {name!r}")
  spec = MODELS[name]
  epochs = spec.epochs if epochs is None else epochs
  data = load_data(dataset, spec.image_size, spec.channels)
  model = spec.make()
  ckpt = checkpoint_dir(name, dataset=dataset, seed=seed, out_dir=out_dir, epochs=epochs)
  ckpt.parent.mkdir(parents=True, exist_ok=True)
  with open(ckpt.parent / f".{ckpt.name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # parallel callers wait and then reuse the checkpoint
    summary = summary_path(name, dataset=dataset, seed=seed, out_dir=out_dir, epochs=epochs)
    if force:
      shutil.rmtree(ckpt, ignore_errors=True)
      summary.unlink(missing_ok=True)
    trained_now = not ckpt.exists()
    t0 = time.perf_counter()
    result = jtrain.fit(model, data["train"], data["validation"], epochs=epochs,
                        batch_size=spec.batch_size, seed=seed,
                        optimizer=optax.adam(spec.learning_rate), checkpoint_dir=ckpt,
                        keep=1, progress=progress,
                        config={"name": name, "dataset": dataset, "epochs": epochs})
    seconds = time.perf_counter() - t0
    if trained_now or not summary.exists():
      test = jtrain.evaluate(model, result.variables, data["test"])
      summary.write_text(json.dumps({
          "name": name, "dataset": dataset, "seed": seed, "epochs": epochs,
          "steps": result.step, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
          "val_accuracy": result.history[-1].get("val_accuracy") if result.history else None,
          "train_seconds": seconds if trained_now else None,
          "history": [{k: v for k, v in h.items() if k != "step_loss"}
                      for h in result.history],
      }, indent=1))
    fcntl.flock(lock, fcntl.LOCK_UN)
  return model, result.variables, data


def summary_path(name: str, *, dataset: str = "digits", seed: int = 0, out_dir="outputs",
                 epochs: int | None = None) -> pathlib.Path:
  """The JSON written next to a :func:`get_trained` checkpoint: test accuracy, training time
  (when trained in that call), per-epoch history."""
  ckpt = checkpoint_dir(name, dataset=dataset, seed=seed, out_dir=out_dir, epochs=epochs)
  return ckpt.parent / f"{ckpt.name}.json"


def trained_summary(name: str, **kwargs) -> dict:
  """The summary JSON of a trained model (see :func:`summary_path`; same keyword arguments)."""
  return json.loads(summary_path(name, **kwargs).read_text())


def pick_round_robin(data: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` images of a split taken round-robin over the classes (deterministic):
  ``(images, labels)``.

  >>> d = {"image": np.arange(6.0), "label": np.array([0, 0, 0, 1, 1, 2])}
  >>> pick_round_robin(d, 4)[1].tolist()
  [0, 1, 2, 0]
  """
  labels = data["label"]
  per_class = [list(np.flatnonzero(labels == c)) for c in range(int(labels.max()) + 1)]
  idx = []
  while len(idx) < min(n, len(labels)):
    for lst in per_class:
      if lst and len(idx) < n:
        idx.append(lst.pop(0))
  idx = np.array(idx)
  return data["image"][idx], labels[idx]


def md_table(header: list[str], rows: list[list]) -> str:
  """A markdown table; floats with three decimals.

  >>> print(md_table(["a", "b"], [[1, 0.5]]))
  | a | b |
  |---|---|
  | 1 | 0.500 |
  """
  def fmt(v):
    return f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
  return "\n".join(out)


def cli(run: Callable, doc: str | None) -> dict:
  """The command line shared by the experiment scripts: ``[--full | --smoke] [--out DIR]
  [--seed N]``; runs ``run`` and prints its summary. Returns the result."""
  ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
  g = ap.add_mutually_exclusive_group()
  g.add_argument("--full", action="store_true", help="paper-size settings")
  g.add_argument("--smoke", action="store_true", help="tiny settings (seconds)")
  ap.add_argument("--out", default="outputs", help="output folder (default: outputs)")
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args()
  result = run(pathlib.Path(a.out), full=a.full, smoke=a.smoke, seed=a.seed)
  print(result["summary"])
  return result
