"""Train the zoo models on the embedded digits and report their test accuracy.

    python -m experiments.train_models [--full | --smoke] [--out outputs] [--seed 0]

Data: scikit-learn's 1,797 real 8x8 digits, fixed stratified 1,257/270/270 split
(:mod:`jaxplain.data`), upscaled bilinearly (28x28 for LeNet, 32x32 for the others), one
channel. Models are trained by :func:`experiments.common.get_trained` (Adam, batch 32,
fixed epochs, seed-controlled), whose checkpoints under ``out_dir/checkpoints/`` the later
experiments reuse. Default: LeNet and the seed-003 CNN (reduced widths 16-16-32-32-64-64,
MLP 128-64) on digits, plus LeNet on decoy digits (the label coded by the position of a
white border patch in train/validation, random in test), which measures how strongly a
plain model takes the shortcut (the premise of the PPI experiment). ``full`` adds the small
VGG and ResNet; ``smoke`` trains one epoch of the two LeNets.
"""

from __future__ import annotations

import json
import pathlib

from experiments import common
from jaxplain import data as jdata
from jaxplain import train as jtrain


def _plot_curves(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
  for r in rows:
    h = r["history"]
    label = f"{r['name']} ({r['dataset']})"
    axes[0].plot([e["epoch"] for e in h], [e["loss"] for e in h], marker=".", label=label)
    axes[1].plot([e["epoch"] for e in h], [e.get("val_accuracy") for e in h], marker=".",
                 label=label)
  axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log")
  axes[1].set(xlabel="epoch", ylabel="validation accuracy")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(out_dir: pathlib.Path, *, full: bool = False, smoke: bool = False,
        seed: int = 0) -> dict:
  """Train (or restore) the models and report their accuracies (see the module docstring)."""
  out_dir = pathlib.Path(out_dir)
  jobs = [("lenet", "digits"), ("cnn003", "digits"), ("lenet", "decoy_digits")]
  if smoke:  # seconds: the CNN003 code path is exercised by seed003_shift's smoke run
    jobs = [("lenet", "digits"), ("lenet", "decoy_digits")]
  if full:
    jobs += [("vgg", "digits"), ("resnet_small", "digits")]
  rows = []
  for name, dataset in jobs:
    epochs = 1 if smoke else (2 * common.MODELS[name].epochs if full else None)
    model, variables, data = common.get_trained(name, dataset=dataset, seed=seed,
                                                out_dir=out_dir, epochs=epochs,
                                                progress=not smoke)
    s = common.trained_summary(name, dataset=dataset, seed=seed, out_dir=out_dir,
                               epochs=epochs)
    row = {"name": name, "dataset": dataset, "epochs": s["epochs"], "steps": s["steps"],
           "test_accuracy": s["test_accuracy"], "val_accuracy": s["val_accuracy"],
           "train_seconds": s["train_seconds"], "history": s["history"]}
    if dataset == "decoy_digits":  # OOD = test split (random patch); also clean digits
      spec = common.MODELS[name]
      clean = jdata.load("digits", "test", image_size=spec.image_size, channels=spec.channels)
      row["clean_test_accuracy"] = jtrain.evaluate(model, variables, clean)["accuracy"]
      row["decoy_id_accuracy"] = jtrain.evaluate(model, variables,
                                                 data["validation"])["accuracy"]
    rows.append(row)

  fig_dir = out_dir / "train_models"
  fig_dir.mkdir(parents=True, exist_ok=True)
  _plot_curves(rows, fig_dir / "curves.png")

  def fmt_t(t):
    return "restored" if t is None else f"{t:.0f} s"

  table = ["| model | data | epochs | steps | val acc | test acc | train time |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    table.append(f"| {r['name']} | {r['dataset']} | {r['epochs']} | {r['steps']} | "
                 f"{r['val_accuracy']:.3f} | {r['test_accuracy']:.3f} | "
                 f"{fmt_t(r['train_seconds'])} |")
  decoy = [r for r in rows if r["dataset"] == "decoy_digits"]
  findings = []
  for r in rows:
    if r["dataset"] == "digits" and r["name"] == "lenet":
      findings.append(f"LeNet reaches {100 * r['test_accuracy']:.1f} % test accuracy on the "
                      f"270 held-out digits (target >= 97 %).")
  for r in decoy:
    findings.append(
        f"Decoy digits ({r['name']}): {100 * r['decoy_id_accuracy']:.1f} % when the patch "
        f"encodes the label (validation), {100 * r['test_accuracy']:.1f} % when the patch is "
        f"random (test, OOD), {100 * r['clean_test_accuracy']:.1f} % on clean test digits: "
        f"the plain model {'relies on' if r['test_accuracy'] < 0.8 else 'mostly ignores'} "
        f"the shortcut.")
  summary = "\n".join([
      "## Trained models (embedded digits)",
      "",
      "scikit-learn digits (1,797 real 8x8 images; fixed stratified split 1,257 / 270 / 270), "
      "bilinearly upscaled to 28x28 (LeNet) or 32x32 (others), one channel; Adam, batch 32, "
      f"seed {seed}. Train time is wall time on this machine (\"restored\": checkpoint reused).",
      "",
      *table,
      "",
      *[f"- {f}" for f in findings],
      "",
      "![training curves](train_models/curves.png)",
  ])
  metrics = {f"{r['name']}_{r['dataset']}": {k: v for k, v in r.items() if k != "history"}
             for r in rows}
  return {"metrics": metrics, "figures": ["train_models/curves.png"], "summary": summary}


if __name__ == "__main__":
  from experiments.common import cli
  result = cli(run, __doc__)
  print(json.dumps(result["metrics"], indent=1))
