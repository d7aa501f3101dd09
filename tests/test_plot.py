"""Plot helpers: grayscale, normalisations (PAIR's 99th percentile), overlay colours, figures
and PNG files read back."""

from __future__ import annotations

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from matplotlib import colormaps

from jaxplain import plot


def test_to_grayscale_modes():
  a = np.random.default_rng(0).normal(size=(2, 5, 4, 3))
  np.testing.assert_allclose(plot.to_grayscale(a), np.abs(a[..., 0]) + np.abs(a[..., 1])
                             + np.abs(a[..., 2]))
  np.testing.assert_allclose(plot.to_grayscale(a, reduce="abs_of_sum"), np.abs(a.sum(-1)))
  np.testing.assert_allclose(plot.to_grayscale(a, reduce="sum"), a.sum(-1))
  np.testing.assert_allclose(plot.to_grayscale(a, reduce="max_abs"), np.abs(a).max(-1))
  with pytest.raises(ValueError, match="reduce: expected one of"):
    plot.to_grayscale(a, reduce="max")
  with pytest.raises(ValueError, match=r"attr: expected channels last"):
    plot.to_grayscale(a[0, 0])


def test_normalize_minmax_percentile_maxabs():
  rng = np.random.default_rng(1)
  m = rng.exponential(size=(2, 10, 10))
  mm = plot.normalize(m, method="minmax")
  for b in range(2):
    np.testing.assert_allclose(mm[b], (m[b] - m[b].min()) / (m[b].max() - m[b].min()))
  # PAIR VisualizeImageGrayscale: (x - min) / (p99 - min), clipped
  pc = plot.normalize(m, method="percentile")
  for b in range(2):
    flat = np.sort(m[b].ravel())
    p99 = flat[98] + 0.01 * (flat[99] - flat[98])  # linear interpolation at rank 0.99 * 99
    np.testing.assert_allclose(pc[b], np.clip((m[b] - flat[0]) / (p99 - flat[0]), 0, 1))
    assert np.sum(pc[b] == 1.0) == 1  # only the max lies above the interpolated p99
  s = m - 1.0
  ma = plot.normalize(s, method="signed_max", percentile=100)
  np.testing.assert_allclose(ma, s / np.abs(s).max(axis=(1, 2), keepdims=True))
  np.testing.assert_array_equal(plot.normalize(np.ones((3, 3))), np.zeros((3, 3)))
  with pytest.raises(ValueError, match="method: expected one of"):
    plot.normalize(m, method="zscore")
  with pytest.raises(ValueError, match=r"percentile: expected in \(0, 100\]"):
    plot.normalize(m, percentile=0)


def test_overlay_blends_hot_colours_at_half_alpha():
  rng = np.random.default_rng(2)
  img = rng.uniform(size=(6, 5, 3))
  sal = rng.uniform(size=(6, 5))
  out = plot.overlay(img, sal)
  hot = colormaps["hot"]
  for i, j in ((0, 0), (3, 4), (5, 2)):
    np.testing.assert_allclose(out[i, j], 0.5 * img[i, j] + 0.5 * np.array(hot(sal[i, j])[:3]))
  gray = plot.overlay(img[..., 0], sal, alpha=0.25)  # (H, W) images are repeated to RGB
  np.testing.assert_allclose(gray[1, 1], 0.75 * img[1, 1, 0] + 0.25 * np.array(
      hot(sal[1, 1])[:3]))
  with pytest.raises(ValueError, match="alpha: expected in"):
    plot.overlay(img, sal, alpha=2)
  with pytest.raises(ValueError, match="saliency: shape"):
    plot.overlay(img, sal[:3])
  with pytest.raises(ValueError, match=r"reduce and scale it first, normalize\(to_grayscale"):
    plot.overlay(img, np.repeat(sal[..., None], 3, axis=-1))   # an attribution with channels


def test_diverging_is_centred_on_zero():
  a = np.zeros((3, 3, 2))
  a[0, 0] = [1.0, 1.0]
  a[2, 2] = [-2.0, 0.0]
  rgb = plot.diverging(a, percentile=100)
  cm = colormaps["RdBu_r"]
  np.testing.assert_allclose(rgb[1, 1], cm(0.5)[:3])   # zero -> the middle colour
  np.testing.assert_allclose(rgb[0, 0], cm(1.0)[:3])   # +2 = max |.| -> the red end
  np.testing.assert_allclose(rgb[2, 2], cm(0.0)[:3])   # -2 -> the blue end


def test_figures_and_png_files(tmp_path):
  rng = np.random.default_rng(3)
  img = rng.uniform(size=(8, 8, 3))
  fig = plot.three_panel(img, rng.normal(size=(8, 8, 3)), title="digit 3")
  assert [ax.get_title() for ax in fig.axes] == ["digit 3, original", "saliency map",
                                                 "saliency map superimposed"]
  p = plot.save_png(fig, tmp_path / "sub" / "three.png", dpi=50)
  back = matplotlib.image.imread(p)
  assert back.shape == (160, 450, 4)  # 9 x 3.2 inches at 50 dpi
  maps = {"gradient": rng.normal(size=(3, 8, 8, 3)), "ig": rng.normal(size=(3, 8, 8, 3)),
          "grad_cam": rng.uniform(size=(3, 8, 8))}
  grid = plot.method_grid(rng.uniform(size=(3, 8, 8, 3)), maps, signed=("ig",),
                          overlay_alpha=0.5, col_titles=["a", "b", "c"])
  assert len(grid.axes) == 12
  assert [grid.axes[k].get_ylabel() for k in (0, 3, 6, 9)] == ["input", "gradient", "ig",
                                                              "grad_cam"]
  plot.save_png(grid, tmp_path / "grid.png")
  arr = plot.overlay(img, plot.normalize(plot.to_grayscale(maps["gradient"][0])))
  q = plot.save_png(arr, tmp_path / "overlay.png")
  np.testing.assert_allclose(matplotlib.image.imread(q)[..., :3], arr, atol=1 / 255 + 1e-6)
  with pytest.raises(ValueError, match=r"maps\['ig'\]: expected 3 maps"):
    plot.method_grid(img[None].repeat(3, 0), {"ig": maps["ig"][:2]})


def test_a_channels_first_image_is_refused_with_the_moveaxis_hint():
  img = np.random.default_rng(0).uniform(size=(3, 8, 8))
  with pytest.raises(ValueError, match=r"got shape \(3, 8, 8\); channels first.*np\.moveaxis"):
    plot.overlay(img, np.ones((8, 8)))
  with pytest.raises(ValueError, match=r"got shape \(8, 8, 5\)$"):
    plot.overlay(np.ones((8, 8, 5)), np.ones((8, 8)))


def test_tokens_colours_scores_and_wraps(tmp_path):
  words = [["the", "plot", "was", "dull"], ["great", "acting"]]
  scores = np.array([[0.0, 1.0, 0.0, -1.0], [2.0, 0.5, 9.0, 9.0]])  # row 2: 2 of 4 shown
  fig = plot.tokens(words, scores, row_titles=["neg", "pos"])
  texts = fig.axes[0].texts
  tok = {t.get_text(): t for t in texts}
  assert [t.get_text() for t in texts] == ["neg", "the", "plot", "was", "dull", "pos",
                                          "great", "acting"]
  face = lambda w: np.asarray(tok[w].get_bbox_patch().get_facecolor())  # noqa: E731
  assert face("plot")[0] > face("plot")[2] + 0.2        # positive: red
  assert face("dull")[2] > face("dull")[0] + 0.2        # negative: blue
  assert np.all(face("the")[:3] > 0.9)                  # zero: near white
  assert tok["dull"].get_color() == "white" and tok["the"].get_color() == "black"
  # (B, L, E) embedding attributions, unsigned: |.| summed, darker red for larger
  emb = np.stack([scores, -scores], -1)
  f2 = plot.tokens(words, emb, signed=False)
  t2 = {t.get_text(): t for t in f2.axes[0].texts}
  g = lambda w: t2[w].get_bbox_patch().get_facecolor()[1]  # noqa: E731
  assert g("plot") < g("the") and g("great") < g("acting")
  long = [[f"w{i}" for i in range(40)]]
  f3 = plot.tokens(long, np.ones((1, 40)), line_chars=20)
  ys = sorted({t.get_position()[1] for t in f3.axes[0].texts})
  assert len(ys) >= 6                                   # 40 tokens of 3-4 chars in 20-char lines
  plot.save_png(fig, tmp_path / "t.png")
  with pytest.raises(ValueError, match="expected 2 token sequences"):
    plot.tokens(words[:1], scores)
  with pytest.raises(ValueError, match=r"words\[0\]: 5 tokens"):
    plot.tokens([words[0] + ["x"], words[1]], scores)


def test_curves_draw_the_mean_the_band_and_the_area_of_area_under_curve():
  import jaxplain  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  c = {"ig": rng.uniform(size=(5, 6)), "random": rng.uniform(size=(5, 6))}
  fr = np.array([0.0, 0.05, 0.1, 0.3, 0.6, 1.0])            # uneven steps
  fig = plot.curves(c, fractions=fr, band="sem", ylabel="p(class)")
  ax = fig.axes[0]
  for line, (name, v) in zip(ax.get_lines(), c.items()):
    np.testing.assert_allclose(line.get_xdata(), fr)
    np.testing.assert_allclose(line.get_ydata(), v.mean(0))
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  for label, (name, v) in zip(labels, c.items()):
    auc = float(jaxplain.area_under_curve(jnp.asarray(v.mean(0), jnp.float32), fr))
    assert label == f"{name} (AUC {auc:.3f})"
  assert ax.get_lines()[1].get_linestyle() == "--"        # the reference is dashed
  ys = ax.collections[0].get_paths()[0].vertices
  sem = c["ig"].std(0, ddof=1) / np.sqrt(5)
  for j, xj in enumerate(fr):                             # band = mean +- one standard error
    at = np.unique(np.round(ys[np.isclose(ys[:, 0], xj), 1], 9))
    np.testing.assert_allclose(sorted(at), [c["ig"].mean(0)[j] - sem[j],
                                            c["ig"].mean(0)[j] + sem[j]], rtol=1e-7)
  fig = plot.curves(c, band="iqr")                        # default fractions: even steps
  np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_xdata(), np.linspace(0, 1, 6))
  assert not plot.curves({"a": [1.0, 0.0]}, band=None).axes[0].collections
  with pytest.raises(ValueError, match=r"fractions: expected shape \(6,\)"):
    plot.curves(c, fractions=fr[:3])
  with pytest.raises(ValueError, match=r"curves\['ig'\]: contains 1 non-finite"):
    plot.curves({"ig": np.array([1.0, np.nan])})
  with pytest.raises(ValueError, match="band: expected one of"):
    plot.curves(c, band="std")


def test_randomisation_draws_the_mean_similarity_per_stage(tmp_path):
  rng = np.random.default_rng(4)
  sim = rng.uniform(-1, 1, size=(4, 7))                   # (L + 1, B)
  labels = ["original", "fc2", "fc1", "conv"]
  fig = plot.randomisation({"grad": {"spearman": sim, "ssim": sim[::-1]}, "lrp": sim * 0.5},
                           labels, key="spearman")
  ax = fig.axes[0]
  np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), sim.mean(1))
  np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), 0.5 * sim.mean(1))
  assert [t.get_text() for t in ax.get_xticklabels()] == labels
  fig2 = plot.randomisation({"grad": {"ssim": sim}}, labels, key="ssim")
  assert fig2.axes[0].get_ylabel() == "ssim with the trained map"
  assert plot.save_png(fig, tmp_path / "r.png").endswith("r.png")
  with pytest.raises(ValueError, match=r"results\['grad'\]: expected \(stages, examples\) = "
                                       r"\(3, B\)"):
    plot.randomisation({"grad": sim}, labels[:3])
  with pytest.raises(ValueError, match=r"key: 'ssim' is not in results\['grad'\]"):
    plot.randomisation({"grad": {"spearman": sim}}, labels, key="ssim")
