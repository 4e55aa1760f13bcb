"""tools/visualize_masks.py: the keep-probability map and the greyed-out patches."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import visualize_masks  # noqa: E402  (a script in tools/)

from configs import demo  # noqa: E402
from glip_jax import masking  # noqa: E402


def test_keep_probability_matches_the_kept_fraction():
  p = visualize_masks.keep_probability(masking.MaskingSpec("gaussian", 0.75), (8, 8), 500)
  assert p.shape == (8, 8)
  assert p.sum() == pytest.approx(16)  # K = 16 of 64 patches kept in every draw
  assert p[3:5, 3:5].mean() > p[0, 0]  # centred
  assert (visualize_masks.keep_probability(masking.MaskingSpec("none"), (2, 3), 10) == 1).all()


def test_masked_image_greys_exactly_the_dropped_patches():
  image = np.full((8, 8, 3), 10, np.uint8)
  out = visualize_masks.masked_image(image, np.array([0, 3]), patch_size=4)
  kept = np.zeros((8, 8), bool)
  kept[:4, :4] = kept[4:, 4:] = True  # patches 0 and 3 of the 2×2 grid
  assert (out[kept] == 10).all() and (out[~kept] != 10).all()


def test_draw_the_demo_config():
  figure = visualize_masks.draw(demo.get_config(), samples=2, draws=50, scale=2)
  assert figure.dtype == np.uint8 and figure.shape[0] == 64  # 32 px at scale 2
  with pytest.raises(Exception, match="attentive"):
    visualize_masks.draw(demo.get_config("aclip"), samples=1, draws=10, scale=1)
