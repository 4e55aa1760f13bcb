"""A-CLIP views: box geometry (teacher ⊇ both online boxes), no flip, augmentation, determinism."""

import grain
import numpy as np
import pytest
from PIL import Image

from glip_jax.data import config as config_lib
from glip_jax.data import pipeline
from glip_jax.data import views
from glip_jax.data.tokenizer import Tokenizer

SIZE = 16


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer(context_length=8)


def _gradient_image(height=48, width=64):
  """Asymmetric in both axes and channels, so a flip or a misplaced crop would show."""
  y, x = np.mgrid[:height, :width]
  return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + 2 * y) % 256], -1).astype(
      np.uint8
  )


def _record(image):
  return {"image": image, "captions": ["a caption"], "label": 3, "key": "k"}


def _crop(image, box, size=SIZE):
  """The reference view: the normalised box of the source, resized like the pipeline."""
  h, w = image.shape[:2]
  top, left, bottom, right = (float(v) for v in box)
  pil = Image.fromarray(image)
  pixel_box = (round(left * w), round(top * h), round(right * w), round(bottom * h))
  return np.asarray(pil.resize((size, size), Image.BILINEAR, box=pixel_box))


def test_zoom_out_box_contains_both_boxes():
  rng = np.random.default_rng(0)
  for _ in range(500):
    h, w = rng.integers(20, 300, 2)
    boxes = []
    for _ in range(2):
      top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
      boxes.append((top, left, rng.integers(top + 1, h + 1), rng.integers(left + 1, w + 1)))
    t, l, b, r = views.zoom_out_box(boxes[0], boxes[1], h, w, rng)
    assert 0 <= t <= min(boxes[0][0], boxes[1][0])
    assert 0 <= l <= min(boxes[0][1], boxes[1][1])
    assert max(boxes[0][2], boxes[1][2]) <= b <= h
    assert max(boxes[0][3], boxes[1][3]) <= r <= w


def test_zoom_out_box_is_enlarged_randomly_up_to_the_borders():
  rng = np.random.default_rng(0)
  draws = np.array(
      [views.zoom_out_box((10, 10, 20, 20), (12, 8, 22, 18), 40, 40, rng) for _ in range(2000)]
  )
  assert set(draws[:, 0]) == set(range(11)) and set(draws[:, 1]) == set(range(9))
  assert set(draws[:, 2]) == set(range(22, 41)) and set(draws[:, 3]) == set(range(20, 41))


def test_views_boxes_and_no_flip(tokenizer, monkeypatch):
  image = _gradient_image()
  preprocess = views.ACLIPPreprocess(SIZE, tokenizer)
  out = preprocess.random_map(_record(image), np.random.default_rng(0))
  assert set(out) == {
      "image",
      "image2",
      "teacher_image",
      "box1",
      "box2",
      "teacher_box",
      "text",
      "label",
  }
  for key in ("image", "image2", "teacher_image"):
    assert out[key].shape == (SIZE, SIZE, 3) and out[key].dtype == np.uint8
  for key in ("box1", "box2", "teacher_box"):
    assert out[key].shape == (4,) and out[key].dtype == np.float32
  # The teacher view has no colour augmentation: it is exactly the crop of its box.
  np.testing.assert_array_equal(out["teacher_image"], _crop(image, out["teacher_box"]))
  # Without colour augmentation the online views are exactly their boxes' crops: never mirrored.
  monkeypatch.setattr(views, "online_augment", lambda pil, rng: pil)
  for seed in range(20):
    out = preprocess.random_map(_record(image), np.random.default_rng(seed))
    np.testing.assert_array_equal(out["image"], _crop(image, out["box1"]))
    np.testing.assert_array_equal(out["image2"], _crop(image, out["box2"]))
    box1, box2, teacher = out["box1"], out["box2"], out["teacher_box"]
    assert np.all(teacher[:2] <= np.minimum(box1[:2], box2[:2]))
    assert np.all(teacher[2:] >= np.maximum(box1[2:], box2[2:]))
    assert np.all((0 <= teacher) & (teacher <= 1))
    for box in (box1, box2):  # RandomResizedCrop area 0.5–1 (pixel rounding aside)
      area = (box[2] - box[0]) * (box[3] - box[1])
      assert 0.45 <= area <= 1.0


def test_online_augmentation_probabilities():
  rng = np.random.default_rng(0)
  pil = Image.fromarray(_gradient_image(24, 24))
  gray, changed = 0, 0
  for _ in range(400):
    out = np.asarray(views.online_augment(pil, rng)).astype(int)
    gray += bool(np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2]))
    changed += not np.array_equal(out, np.asarray(pil))
  assert 0.15 < gray / 400 < 0.25  # grayscale p = 0.2
  # Unchanged only when no transform fires: 0.2 · 0.8 · 0.9 · 0.8 ≈ 0.115.
  assert 0.07 < 1 - changed / 400 < 0.17


def test_color_jitter_keeps_shape_and_changes_colours():
  pil = Image.fromarray(_gradient_image(24, 24))
  out = views.color_jitter(pil, np.random.default_rng(1))
  assert out.size == pil.size and out.mode == "RGB"
  assert not np.array_equal(np.asarray(out), np.asarray(pil))


def _iterator(tokenizer, seed=0):
  cfg = config_lib.default_data_config()
  cfg.synthetic.update(dict(image_size=32, train_size=1000))
  return pipeline.make_train_iterator(
      cfg,
      global_batch_size=4,
      image_size=SIZE,
      seed=seed,
      tokenizer=tokenizer,
      shard_options=grain.sharding.ShardOptions(0, 1, drop_remainder=True),
      preprocess=views.ACLIPPreprocess(SIZE, tokenizer, cfg.crop_scale, cfg.crop_ratio),
  )


def test_iterator_batches_are_deterministic_per_seed(tokenizer):
  first = [next(it) for it in [_iterator(tokenizer)] for _ in range(2)]
  again = [next(it) for it in [_iterator(tokenizer)] for _ in range(2)]
  other = next(_iterator(tokenizer, seed=1))
  batch = first[0]
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["teacher_image"].dtype == np.uint8
  assert batch["box1"].shape == (4, 4) and batch["teacher_box"].dtype == np.float32
  assert batch["text"].shape == (4, 8)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(first[0]["box1"], other["box1"])
  # The two online views of one example are different crops.
  assert not np.array_equal(batch["box1"], batch["box2"])


def test_iterator_state_resumes_exactly(tokenizer):
  it = _iterator(tokenizer)
  next(it)
  state = it.get_state()
  expected = next(it)
  resumed = _iterator(tokenizer)
  resumed.set_state(state)
  got = next(resumed)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])
