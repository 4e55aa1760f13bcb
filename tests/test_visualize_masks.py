"""glip_jax.visualize and tools/visualize_masks.py: keep-probability maps and masked images."""

import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import visualize_masks  # noqa: E402  (a script in tools/)

from configs import demo  # noqa: E402
from glip_jax import masking  # noqa: E402
from glip_jax import visualize  # noqa: E402


def test_keep_frequency_is_the_kernels_empirical_frequency():
  spec = masking.MaskingSpec("gaussian", 0.75)
  p = visualize.keep_frequency(spec, (8, 8), 500, seed=3)
  keep = np.asarray(masking.keep_indices(jax.random.key(3), spec, 500, (8, 8)))
  expected = np.bincount(keep.reshape(-1), minlength=64).reshape(8, 8) / 500
  np.testing.assert_array_equal(p, expected)
  assert p.sum() == pytest.approx(16)  # K = 16 of 64 patches kept in every draw
  # The authors' rule, simulated in numpy: keep the K highest U(0,1) + prior.
  score = np.random.default_rng(0).uniform(size=(4000, 64)) + masking.gaussian_prior((8, 8), 0.2)
  top = np.argsort(-score, axis=1)[:, :16]
  reference = np.bincount(top.reshape(-1), minlength=64).reshape(8, 8) / 4000
  np.testing.assert_allclose(p, reference, atol=0.08)  # 500 draws: standard error <= 0.023
  assert p[3:5, 3:5].min() > 0.7 and p[0, 0] < 0.1  # centred
  assert (visualize.keep_frequency(masking.MaskingSpec("none"), (2, 3), 10) == 1).all()


def test_random_keep_frequency_is_uniform():
  p = visualize.keep_frequency(masking.MaskingSpec("random", 0.5), (4, 4), 4000)
  # Each patch is kept with probability 1/2; 4000 draws give a standard error of 0.008.
  np.testing.assert_allclose(p, 0.5, atol=0.04)


def test_attentive_scores_cycle_over_the_examples():
  scores = np.array([np.arange(16.0), -np.arange(16.0)])  # image 0 keeps 12..15, image 1 keeps 0..3
  p = visualize.keep_frequency(masking.MaskingSpec("attentive", 0.75), (4, 4), 10, scores=scores)
  expected = np.zeros(16)
  expected[:4] = expected[12:] = 0.5
  np.testing.assert_array_equal(p.reshape(-1), expected)


def test_images_reach_a_kernel_that_takes_them(monkeypatch):
  # No kind in this checkout selects from the images yet; a kernel with that signature (keeping the
  # brightest patches) stands in for one, to check that `select` hands the images over.
  def keep_brightest(rng, spec, batch_size, grid, scores=None, sharding=None, images=None):
    del rng, scores, sharding
    patches = images.reshape(batch_size, grid[0], 2, grid[1], 2, 3).mean(axis=(2, 4, 5))
    k = masking.num_kept(grid[0] * grid[1], spec.ratio)
    return jax.numpy.sort(jax.lax.top_k(patches.reshape(batch_size, -1), k)[1], axis=-1)

  monkeypatch.setattr(masking, "keep_indices", keep_brightest)
  images = np.zeros((1, 4, 4, 3), np.uint8)
  images[0, 2:, :2] = 200  # patch 2 of the 2×2 grid is the bright one
  p = visualize.keep_frequency(masking.MaskingSpec("random", 0.75), (2, 2), 5, images=images)
  np.testing.assert_array_equal(p, [[0, 0], [1, 0]])


def test_masked_image_darkens_exactly_the_dropped_patches_with_a_grid():
  image = np.full((8, 8, 3), 200, np.uint8)
  out = visualize.masked_image(image, np.array([0, 3]), patch_size=4, scale=2)
  assert out.shape == (16, 16, 3)
  kept = np.zeros((16, 16), bool)
  kept[:8, :8] = kept[8:, 8:] = True  # patches 0 and 3 of the 2×2 grid
  assert (out[kept] == 200).all()
  assert (out[8, 0] == visualize.GRID_RGB).all() and (out[8:, 0] == visualize.GRID_RGB).all()
  assert (out[9:, 1:8] == visualize.DROPPED_RGB).all()  # inside a dropped patch: solid dark
  assert (visualize.masked_image(image, None, 4) == image).all()


def test_example_images_do_not_look_like_dropped_patches():
  images = visualize.example_images(demo.get_config(), 12)
  assert images.shape == (12, 32, 32, 3)
  assert not any(visualize.looks_dropped(image) for image in images)
  dark = np.full((32, 32, 3), 30, np.uint8)  # a background the dropped colour would vanish into
  assert visualize.looks_dropped(dark)


def test_figure_titles_numbers_and_colour_bar(tmp_path):
  fig, probability = visualize_masks.draw(demo.get_config(), samples=2, draws=200, scale=2)
  heatmap = fig.axes[0]
  assert heatmap.get_title(loc="left") == "gaussian, ratio 0.5: K = 32 of 64 patches kept"
  numbers = np.array([float(t.get_text()) for t in heatmap.texts]).reshape(8, 8)
  np.testing.assert_allclose(numbers, probability, atol=0.005)  # printed with two decimals
  assert any(ax.get_ylabel() == "P(kept)" for ax in fig.axes)  # the colour bar
  path = tmp_path / "masks.png"
  fig.savefig(path, dpi=50)
  with Image.open(path) as png:
    assert png.format == "PNG"
    assert png.size == tuple((fig.get_size_inches() * 50).round().astype(int))
  with pytest.raises(Exception, match="attentive"):
    visualize_masks.draw(demo.get_config("aclip"), samples=1, draws=10, scale=1)


def test_probability_labels_round_before_trimming():
  labels = [visualize.probability_label(p) for p in (0.0, 0.004, 0.37, 0.994, 0.996, 1.0)]
  assert labels == ["0", "0", ".37", ".99", "1", "1"]


def test_scores_must_match_the_specs():
  with pytest.raises(ValueError, match="scores has 1 entries for 2 specs"):
    visualize.masks_figure([masking.MaskingSpec("random", 0.5)] * 2,
                           np.zeros((1, 8, 8, 3), np.uint8), 4, scores=[None])
