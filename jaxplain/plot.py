"""Heat maps and figures for attributions (matplotlib, Agg canvas; host-side numpy).

The seed-000 pipeline: grayscale = sum over channels of |attribution|; normalise to [0, 1]
(seed 000 uses min-max; PAIR's saliency library clips at the 99th percentile); colour with
matplotlib's ``'hot'`` map; blend with the image at alpha 0.5; show original / saliency /
overlay side by side. Signed maps (IG, gradient x input) use a diverging map centred on 0.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never ``pyplot``, so
nothing here touches the global backend or keeps figures alive.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import matplotlib.image
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxplain import _maps
from jaxplain.metrics import area_under_curve

GRAYSCALE_MODES = _maps.REDUCTIONS  # the channel reductions shared with metrics and ppi
NORMALIZE_METHODS = _maps.NORMALIZATIONS


def _renamed_mode(mode: Any) -> None:
  if mode is not None:
    raise TypeError(f"mode: renamed to reduce= (one vocabulary with jaxplain.metrics and ppi: "
                    f"{_maps.REDUCTIONS}); call with reduce={mode!r} (note: 'abs_sum' is "
                    f"now 'abs_of_sum')")


def to_grayscale(attr: Any, *, reduce: str = "sum_abs", mode: Any = None) -> np.ndarray:
  """Reduce the channel axis (last) of an attribution: (..., H, W, C) -> (..., H, W).

  Args:
    attr: attributions with channels last (one map (H, W, C) or a batch (B, H, W, C)).
    reduce: ``"sum_abs"``: sum_c |a_c| (seed 000, SPEC section 1; default); ``"sum"``:
      sum_c a_c (signed, for a diverging map); ``"abs_of_sum"``: |sum_c a_c|; ``"max_abs"``:
      max_c |a_c| (the vocabulary of :func:`jaxplain.pixel_saliency`).
    mode: the old name of ``reduce``; passing it raises a TypeError naming ``reduce``.

  Returns:
    Maps without the channel axis, float numpy.

  >>> to_grayscale(np.array([[[1., -2.]]]))
  array([[3.]])
  """
  _renamed_mode(mode)
  _maps.check_reduce(reduce)
  a = np.asarray(attr, dtype=np.float64)
  if a.ndim < 3:
    raise ValueError(f"attr: expected channels last, (H, W, C) or (B, H, W, C); got shape "
                     f"{a.shape} (pass maps without channels straight to normalize)")
  return _maps.reduce_channels(a, reduce, xp=np)


def normalize(maps: Any, *, method: str = "percentile", percentile: float = 99.0) -> np.ndarray:
  """Normalise each map (over its last two axes, H and W) for display.

  Args:
    maps: (H, W) or (..., H, W).
    method: one of the normalisations shared with :func:`jaxplain.normalize_saliency`:
      ``"minmax"``: (m - min) / (max - min) (seed 000); ``"percentile"``: (m - min) /
      (p - min) clipped to [0, 1], p the ``percentile``-th percentile (PAIR's
      ``VisualizeImageGrayscale``, 99th); ``"signed_max"``: m / max|m| in [-1, 1], for signed
      maps (with ``percentile`` < 100, divides by that percentile of |m| and clips; the old
      name ``"maxabs"`` raises); ``"relu_max"``: max(m, 0) / max; ``"abs_max"``: |m| / max|m|.
    percentile: the clip percentile for ``"percentile"`` and ``"signed_max"``.

  Returns:
    Float numpy maps in [0, 1] (``"signed_max"``: [-1, 1]); a constant map gives zeros.

  >>> normalize(np.array([[1., 2.], [3., 5.]]), method="minmax")
  array([[0.  , 0.25],
         [0.5 , 1.  ]])
  """
  m = np.asarray(maps, dtype=np.float64)
  if m.ndim < 2:
    raise ValueError(f"maps: expected (H, W) or (..., H, W), got shape {m.shape}")
  return np.asarray(_maps.normalize_maps(m, method, axes=(-2, -1), percentile=percentile,
                                         xp=np), np.float64)


def _image_rgb(image: Any) -> np.ndarray:
  """(H, W), (H, W, 1) or (H, W, 3) -> (H, W, 3) in [0, 1] (min-max if outside [0, 1])."""
  img = np.asarray(image, dtype=np.float64)
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  if img.ndim != 3 or img.shape[-1] != 3:
    hint = ("; channels first (an Equinox image)? pass np.moveaxis(image, 0, -1) and the "
            "attribution likewise" if img.ndim == 3 and img.shape[0] in (1, 3) else "")
    raise ValueError(f"image: expected (H, W), (H, W, 1) or (H, W, 3), got shape "
                     f"{img.shape}{hint}")
  if img.min() < 0 or img.max() > 1:
    span = img.max() - img.min()
    img = (img - img.min()) / span if span > 0 else np.zeros_like(img)
  return img


def colorize(saliency: Any, *, cmap: str = "hot", signed: bool = False) -> np.ndarray:
  """Colour a normalised map: (H, W) in [0, 1] (or [-1, 1] when ``signed``) -> RGB (H, W, 3).

  >>> colorize(np.zeros((2, 2))).shape
  (2, 2, 3)
  """
  s = np.asarray(saliency, dtype=np.float64)
  if s.ndim != 2:
    hint = (" (an attribution with channels: reduce and scale it first, "
            "normalize(to_grayscale(a)), or use three_panel)" if s.ndim == 3 else "")
    raise ValueError(f"saliency: expected one map (H, W), got shape {s.shape}{hint}")
  if signed:
    s = (s + 1.0) / 2.0
  return colormaps[cmap](np.clip(s, 0.0, 1.0))[..., :3]


def overlay(image: Any, saliency: Any, *, cmap: str = "hot", alpha: float = 0.5,
            signed: bool = False) -> np.ndarray:
  """Blend a colour-mapped saliency map over an image (seed 000: alpha 0.5, 'hot').

  Args:
    image: (H, W), (H, W, 1) or (H, W, 3); values outside [0, 1] are min-max scaled.
    saliency: a normalised map (H, W) in [0, 1] (``signed``: [-1, 1]).
    cmap: a matplotlib colour map name.
    alpha: weight of the saliency colour: ``(1 - alpha) * image + alpha * colour``.
    signed: the map is signed (use a diverging ``cmap`` such as ``"RdBu_r"``).

  Returns:
    RGB (H, W, 3) float in [0, 1].

  >>> overlay(np.zeros((2, 2)), np.ones((2, 2)))[0, 0]
  array([0.5, 0.5, 0.5])
  """
  if not 0 <= alpha <= 1:
    raise ValueError(f"alpha: expected in [0, 1], got {alpha}")
  img = _image_rgb(image)
  col = colorize(saliency, cmap=cmap, signed=signed)
  if col.shape != img.shape:
    raise ValueError(f"saliency: shape {np.shape(saliency)} does not match image "
                     f"{img.shape[:2]}")
  return (1.0 - alpha) * img + alpha * col


def diverging(attr: Any, *, cmap: str = "RdBu_r", percentile: float = 99.0) -> np.ndarray:
  """A signed attribution as RGB: channels summed (signed), scaled by the ``percentile`` of
  |.| to [-1, 1], red positive, blue negative, white 0.

  Args:
    attr: (H, W, C) or (H, W).
    cmap: a diverging colour map.
    percentile: the clip percentile of |attribution|.

  Returns:
    RGB (H, W, 3).

  >>> rgb = diverging(np.array([[1., -1.]]))
  >>> bool(rgb[0, 0, 0] > rgb[0, 0, 2]), bool(rgb[0, 1, 2] > rgb[0, 1, 0])  # red +, blue -
  (True, True)
  """
  a = np.asarray(attr, dtype=np.float64)
  g = to_grayscale(a, reduce="sum") if a.ndim == 3 else a
  return colorize(normalize(g, method="signed_max", percentile=percentile), cmap=cmap,
                  signed=True)


def _new_figure(figsize: tuple[float, float]) -> Figure:
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig


def _show(ax, img, title=None, **kw):
  ax.imshow(img, **kw)
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=9)


def three_panel(image: Any, attribution: Any, *, title: str | None = None,
                normalization: str = "minmax", cmap: str = "hot", alpha: float = 0.5,
                reduce: str = "sum_abs", mode: Any = None) -> Figure:
  """The seed-000 figure: original, saliency, saliency superimposed.

  Args:
    image: (H, W, C) or (H, W).
    attribution: (H, W, C) raw attribution (reduced with :func:`to_grayscale`) or an
      (H, W) map (Grad-CAM).
    title: name shown over the original.
    normalization: ``"minmax"`` (seed 000) or ``"percentile"`` (99th, PAIR).
    cmap, alpha: colour map and blend weight of the overlay.
    reduce: the channel reduction of :func:`to_grayscale`.
    mode: the old name of ``reduce``; passing it raises a TypeError naming ``reduce``.

  Returns:
    A matplotlib ``Figure`` (save it with :func:`save_png`).

  >>> fig = three_panel(np.zeros((4, 4, 3)), np.ones((4, 4, 3)))
  >>> [ax.get_title() for ax in fig.axes]
  ['original', 'saliency map', 'saliency map superimposed']
  """
  a = np.asarray(attribution)
  _renamed_mode(mode)
  gray = to_grayscale(a, reduce=reduce) if a.ndim == 3 else a
  sal = normalize(gray, method=normalization)
  fig = _new_figure((9, 3.2))
  axes = fig.subplots(1, 3)
  _show(axes[0], _image_rgb(image), f"{title}, original" if title else "original")
  _show(axes[1], sal, "saliency map", cmap=cmap, vmin=0, vmax=1)
  _show(axes[2], overlay(image, sal, cmap=cmap, alpha=alpha), "saliency map superimposed")
  fig.tight_layout()
  return fig


BANDS = ("sem", "iqr", None)


def _mean_and_band(values: np.ndarray, band: str | None, name: str):
  """(N, S) or (S,) -> mean (S,), band (lo, hi) or None, over the examples."""
  v = np.asarray(values, dtype=np.float64)
  if v.ndim == 1:
    v = v[None]
  if v.ndim != 2 or v.shape[1] == 0:
    raise ValueError(f"{name}: expected (S,) or (examples, S) values, got shape {v.shape}")
  if not np.all(np.isfinite(v)):
    raise ValueError(f"{name}: contains {int(np.sum(~np.isfinite(v)))} non-finite value(s)")
  mean = v.mean(axis=0)
  if band is None or v.shape[0] < 2:
    return mean, None
  if band == "sem":
    half = v.std(axis=0, ddof=1) / np.sqrt(v.shape[0])
    return mean, (mean - half, mean + half)
  return mean, tuple(np.percentile(v, [25.0, 75.0], axis=0))


def _axes(ax: Any, figsize: tuple[float, float]):
  if ax is not None:
    return ax.figure, ax
  fig = _new_figure(figsize)
  return fig, fig.subplots()


def curves(curves: Mapping[str, Any], *, fractions: Any = None, band: str | None = "sem",
           references: Sequence[str] = ("random",), xlabel: str = "fraction of features removed",
           ylabel: str = "score", title: str | None = None, ax: Any = None) -> Figure:
  """Perturbation curves, one line per method: the mean over examples with a band, the
  area under the mean curve in the legend (Quantus's ``plot_pixel_flipping_experiment``).

  For the outputs of :func:`jaxplain.deletion_curve` / ``insertion_curve`` /
  ``random_order_curve`` and ``jaxplain.evaluation.pixel_flipping`` / ``road`` (its curves
  over the percentages).

  Args:
    curves: ``{method: (examples, S) or (S,) scores}``.
    fractions: ``(S,)`` x positions (:func:`jaxplain.step_fractions`); default ``S`` even
      steps over [0, 1].
    band: ``"sem"`` (mean +- one standard error), ``"iqr"`` (25th - 75th percentile) or
      ``None``.
    references: names drawn as dashed grey lines (a random order, a baseline).
    xlabel, ylabel, title: axis labels and title.
    ax: a matplotlib ``Axes`` to draw into (its figure is returned); default a new figure.

  Returns:
    The ``Figure``. Legend labels read ``"name (AUC 0.123)"``, the area of
    :func:`jaxplain.area_under_curve` (normalised by the span of ``fractions``).

  >>> fig = curves({"ig": [[1.0, 0.5, 0.0]], "random": [[1.0, 0.8, 0.6]]})
  >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  ['ig (AUC 0.500)', 'random (AUC 0.800)']
  """
  if band not in BANDS:
    raise ValueError(f"band: expected one of {BANDS}, got {band!r}")
  if not curves:
    raise ValueError("curves: expected at least one {method: scores} entry")
  fig, ax = _axes(ax, (4.8, 3.4))
  for i, (name, values) in enumerate(curves.items()):
    mean, lohi = _mean_and_band(values, band, f"curves[{name!r}]")
    fr = (np.linspace(0.0, 1.0, mean.shape[0]) if fractions is None
          else np.asarray(fractions, np.float64))
    if fr.shape != mean.shape:
      raise ValueError(f"fractions: expected shape {mean.shape} to match curves[{name!r}], "
                       f"got {fr.shape}")
    area = float(area_under_curve(mean, fr))
    ref = name in references
    color = "0.4" if ref else f"C{i % 10}"
    ax.plot(fr, mean, "--" if ref else "-", color=color, lw=1.3,
            label=f"{name} (AUC {area:.3f})")
    if lohi is not None:
      ax.fill_between(fr, lohi[0], lohi[1], color=color, alpha=0.15, lw=0)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def randomisation(results: Mapping[str, Any], labels: Sequence[str], *, key: str = "spearman",
                  band: str | None = "sem", title: str | None = None, ax: Any = None) -> Figure:
  """Similarity to the trained model's map along a parameter randomisation, one line per
  method (Quantus's ``plot_model_parameter_randomisation_experiment``; Adebayo et al.'s
  figure): a method that passes falls from 1 once the top layers are random.

  Args:
    results: ``{method: r}`` with ``r`` the dict of :func:`jaxplain.cascading_randomization`
      / ``jaxplain.evaluation.independent_randomization`` (``r[key]``, ``(L + 1, B)``), or
      the ``(L + 1, B)`` similarities themselves.
    labels: the ``L + 1`` stage names, ``["original", *jaxplain.cascade_layers(...)]``.
    key: the similarity to draw from a result dict (``"spearman"``, ``"ssim"``,
      ``"spearman_signed"``; ``"similarity"`` for the independent check).
    band: as in :func:`curves`, over the examples.
    title: the axes' title.
    ax: a matplotlib ``Axes`` to draw into; default a new figure.

  Returns:
    The ``Figure``.

  >>> fig = randomisation({"grad": [[1.0, 1.0], [0.2, 0.4]]}, ["original", "fc"])
  >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
  ['original', 'fc']
  """
  if band not in BANDS:
    raise ValueError(f"band: expected one of {BANDS}, got {band!r}")
  if not results:
    raise ValueError("results: expected at least one {method: result} entry")
  labels = [str(l) for l in labels]
  fig, ax = _axes(ax, (max(4.8, 0.55 * len(labels) + 1.5), 3.4))
  for i, (name, r) in enumerate(results.items()):
    if isinstance(r, Mapping):
      if key not in r:
        raise ValueError(f"key: {key!r} is not in results[{name!r}]; it has {sorted(r)}")
      r = r[key]
    v = np.asarray(r, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] != len(labels):
      raise ValueError(f"results[{name!r}]: expected (stages, examples) = ({len(labels)}, B) "
                       f"to match labels, got shape {v.shape}")
    mean, lohi = _mean_and_band(v.T, band, f"results[{name!r}]")
    xs = np.arange(len(labels))
    ax.plot(xs, mean, "o-", color=f"C{i % 10}", ms=3, lw=1.3, label=name)
    if lohi is not None:
      ax.fill_between(xs, lohi[0], lohi[1], color=f"C{i % 10}", alpha=0.15, lw=0)
  ax.axhline(0.0, color="0.6", lw=0.6)
  ax.set_xticks(np.arange(len(labels)))
  ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
  ax.set_ylabel(f"{key} with the trained map")
  if title:
    ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def method_grid(images: Any, maps: Mapping[str, Any], *, signed: Sequence[str] = (),
                normalization: str = "percentile", cmap: str = "hot",
                overlay_alpha: float | None = None, col_titles: Sequence[str] | None = None,
                cell: float = 1.6) -> Figure:
  """A grid of methods (rows) x examples (columns), the inputs in the first row.

  Args:
    images: (N, H, W, C) or (N, H, W).
    maps: method name -> attributions (N, H, W, C) (reduced with :func:`to_grayscale`) or
      maps (N, H, W).
    signed: method names drawn with the diverging map (signed channel sum, ``signed_max``).
    normalization: for unsigned maps, ``"minmax"`` or ``"percentile"`` (99th).
    cmap: colour map of unsigned maps.
    overlay_alpha: blend unsigned maps over the image with this alpha (``None``: plain map).
    col_titles: titles of the columns (e.g. labels).
    cell: inches per cell.

  Returns:
    A matplotlib ``Figure``.

  >>> fig = method_grid(np.zeros((2, 4, 4)), {"gradient": np.ones((2, 4, 4))})
  >>> len(fig.axes)
  4
  """
  imgs = np.asarray(images)
  n = imgs.shape[0]
  rows = len(maps) + 1
  fig = _new_figure((cell * n + 0.8, cell * rows))
  axes = np.asarray(fig.subplots(rows, n, squeeze=False))
  for j in range(n):
    _show(axes[0, j], _image_rgb(imgs[j]), col_titles[j] if col_titles else None)
  axes[0, 0].set_ylabel("input", fontsize=9)
  for i, (name, m) in enumerate(maps.items(), start=1):
    m = np.asarray(m)
    if m.shape[0] != n:
      raise ValueError(f"maps[{name!r}]: expected {n} maps (one per image), got {m.shape}")
    for j in range(n):
      if name in signed:
        _show(axes[i, j], diverging(m[j]))
        continue
      gray = to_grayscale(m[j]) if m.ndim == 4 else m[j]
      sal = normalize(gray, method=normalization)
      if overlay_alpha is None:
        _show(axes[i, j], sal, cmap=cmap, vmin=0, vmax=1)
      else:
        _show(axes[i, j], overlay(imgs[j], sal, cmap=cmap, alpha=overlay_alpha))
    axes[i, 0].set_ylabel(name, fontsize=9)
  fig.tight_layout()
  return fig


def tokens(words: Sequence[Sequence[str]], scores: Any, *, signed: bool = True,
           percentile: float = 99.0, row_titles: Sequence[str] | None = None,
           line_chars: int = 72, cmap: str | None = None) -> Figure:
  """Token attributions as coloured text, one block per example (Captum's
  ``visualize_text``): each token on a background coloured by its score.

  Args:
    words: B sequences of token strings (ragged: example b shows ``len(words[b])`` tokens,
      from the start of its row of ``scores``).
    scores: (B, L) per-token scores, or (B, L, E) attributions of token embeddings, reduced
      over E by the signed sum (``signed``) or the sum of ``|.|``.
    signed: red positive, blue negative, white 0, each example scaled by the ``percentile``
      of its ``|score|``; otherwise ``|score|`` in ``'Reds'`` (or ``cmap``) from 0 to that
      percentile.
    percentile: the clip percentile of each example's ``|score|``.
    row_titles: a title per example (e.g. "label 3, predicted 3").
    line_chars: characters per line before a block wraps.
    cmap: the colour map (default ``'RdBu_r'`` signed, ``'Reds'`` unsigned).

  Returns:
    A matplotlib ``Figure``.

  >>> fig = tokens([["a", "good", "film"]], np.array([[0.1, 2.0, -0.5]]))
  >>> [t.get_text() for t in fig.axes[0].texts]
  ['a', 'good', 'film']
  """
  s = np.asarray(scores, dtype=np.float64)
  if s.ndim == 3:
    s = s.sum(-1) if signed else np.abs(s).sum(-1)
  if s.ndim != 2:
    raise ValueError(f"scores: expected (B, L) or (B, L, E), got shape {np.shape(scores)}")
  if len(words) != s.shape[0]:
    raise ValueError(f"words: expected {s.shape[0]} token sequences (one per row of scores), "
                     f"got {len(words)}")
  for b, w in enumerate(words):
    if len(w) > s.shape[1]:
      raise ValueError(f"words[{b}]: {len(w)} tokens, more than the {s.shape[1]} scores per "
                       "example")
  if not np.all(np.isfinite(s)):
    raise ValueError("scores: contains non-finite values")
  if row_titles is not None and len(row_titles) != len(words):
    raise ValueError(f"row_titles: expected {len(words)}, got {len(row_titles)}")
  cm = colormaps[cmap or ("RdBu_r" if signed else "Reds")]
  placed, lines = [], 0   # (example, line, start, token, colour value)
  for b, w in enumerate(words):
    row = s[b, :len(w)]
    scale = np.percentile(np.abs(row), percentile) if len(w) else 0.0
    scale = scale if scale > 0 else 1.0
    val = (np.clip(row / scale, -1, 1) + 1) / 2 if signed else np.clip(np.abs(row) / scale, 0, 1)
    lines += 1 if row_titles is not None else 0
    x = 0
    for tok, v in zip(w, val):
      if x > 0 and x + len(tok) > line_chars:
        lines, x = lines + 1, 0
      placed.append((b, lines, x, tok, v))
      x += len(tok) + 1
    lines += 2  # the block's last line and a gap
  width = max([x + len(tok) for _, _, x, tok, _ in placed] + [16])
  fig = _new_figure((max(width * 0.1, 1.6), max(lines * 0.28, 0.6)))
  ax = fig.add_axes((0.01, 0.01, 0.98, 0.98))
  ax.set_xlim(-0.5, width + 0.5)
  ax.set_ylim(lines - 0.5, -1.0)
  ax.axis("off")
  done = set()
  for b, line, x, tok, v in placed:
    if row_titles is not None and b not in done:
      ax.text(0, line - 1, row_titles[b], fontsize=8, fontweight="bold", va="center")
      done.add(b)
    r, g, bl, _ = cm(v)
    dark = 0.299 * r + 0.587 * g + 0.114 * bl < 0.5   # white text on a dark background
    ax.text(x, line, tok, family="monospace", fontsize=9, va="center",
            color="white" if dark else "black",
            bbox={"facecolor": cm(v), "edgecolor": "none", "pad": 1.5})
  return fig


def save_png(fig_or_image: Any, path: str | os.PathLike, *, dpi: int = 100) -> str:
  """Write a ``Figure`` or an RGB/grayscale array ((H, W[, 3]) in [0, 1]) as a PNG.

  Parent folders are created. Returns the path as a string.

  >>> import tempfile, pathlib
  >>> p = save_png(np.zeros((2, 2, 3)), pathlib.Path(tempfile.mkdtemp()) / "a.png")
  >>> open(p, "rb").read(4) == b"\\x89PNG"
  True
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  if isinstance(fig_or_image, Figure):
    if fig_or_image.canvas is None or not isinstance(fig_or_image.canvas, FigureCanvasAgg):
      FigureCanvasAgg(fig_or_image)
    fig_or_image.savefig(path, format="png", dpi=dpi)
    return path
  img = np.asarray(fig_or_image, dtype=np.float64)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  if img.ndim != 3 or img.shape[-1] not in (3, 4):
    raise ValueError(f"fig_or_image: expected a Figure or an (H, W[, 3]) array, got shape "
                     f"{img.shape}")
  matplotlib.image.imsave(path, np.clip(img, 0, 1), format="png", dpi=dpi)
  return path
