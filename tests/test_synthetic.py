"""Synthetic scenes: determinism, disjoint splits, labels consistent with captions, speed."""


import numpy as np
import pytest

from glip_jax.data import synthetic


def test_render_is_deterministic_in_seed_and_index():
  config = synthetic.SceneConfig(image_size=32)
  a, b = synthetic.render(7, config), synthetic.render(7, config)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["captions"] == b["captions"]
  other_seed = synthetic.render(7, synthetic.SceneConfig(image_size=32, seed=1))
  assert not np.array_equal(a["image"], other_seed["image"])
  assert not np.array_equal(a["image"], synthetic.render(8, config)["image"])


def test_image_format_and_size():
  scene = synthetic.render(0, synthetic.SceneConfig(image_size=48))
  assert scene["image"].dtype == np.uint8 and scene["image"].shape == (48, 48, 3)


def test_splits_are_disjoint_and_render_differently():
  ranges = {s: synthetic.split_range(s, 1000) for s in synthetic.SPLITS}
  for s in synthetic.SPLITS:
    for t in synthetic.SPLITS:
      if s < t:
        assert not set(ranges[s]) & set(ranges[t])
  train = synthetic.SyntheticScenes(synthetic.SceneConfig(image_size=32), "train", 10)
  val = synthetic.SyntheticScenes(synthetic.SceneConfig(image_size=32), "validation", 10)
  assert not np.array_equal(train[0]["image"], val[0]["image"])
  assert train[3]["key"] == "synthetic/train/3"
  with pytest.raises(ValueError, match="split"):
    synthetic.split_range("dev", 10)


def test_captions_describe_the_labels():
  source = synthetic.SyntheticScenes(synthetic.SceneConfig(image_size=32, num_captions=3), size=50)
  for i in range(50):
    record = source[i]
    labels = record["labels"]
    assert record["label"] == labels["shape"]
    assert len(set(record["captions"])) == 3
    colour = synthetic.COLOURS[labels["colour"]]
    for caption in record["captions"]:
      assert synthetic.SHAPES[labels["shape"]] in caption
    # Only the two shape-only templates leave the colour out.
    shape_only = [c for c in record["captions"] if colour not in c]
    assert len(shape_only) <= 2
    assert all(c.startswith("a photo of a ") or " on a " in c for c in shape_only)


def test_vocabularies_cover_the_issue():
  assert len(synthetic.SHAPES) >= 8 and len(synthetic.COLOURS) >= 8 and len(synthetic.SIZES) >= 2
  assert set(synthetic.CLASS_NAMES) == {"shape", "colour", "size"}
  # Every label value occurs.
  seen = {synthetic.render(i)["shape"] for i in range(200)}
  assert seen == set(range(len(synthetic.SHAPES)))


def _main_object_offset(center_bias: float) -> float:
  """Mean distance of the main object's pixels from the image centre (colour-matched)."""
  distances = []
  config = synthetic.SceneConfig(image_size=64, center_bias=center_bias, max_distractors=0)
  for i in range(60):
    scene = synthetic.render(i, config)
    mask = np.all(scene["image"] == synthetic._RGB[scene["colour"]], axis=-1)
    ys, xs = np.nonzero(mask)
    distances.append(np.hypot(ys.mean() - 31.5, xs.mean() - 31.5))
  return float(np.mean(distances))


def test_center_bias_controls_spread():
  assert _main_object_offset(1.0) < 1.5
  assert _main_object_offset(0.0) > _main_object_offset(0.5) + 2


def test_main_object_is_visible_and_colour_distinct_from_background():
  config = synthetic.SceneConfig(image_size=32, max_distractors=0)
  for i in range(40):
    scene = synthetic.render(i, config)
    mask = np.all(scene["image"] == synthetic._RGB[scene["colour"]], axis=-1)
    assert mask.sum() >= 6, i
