"""Transforms: decode, RandomResizedCrop statistics and box reporting, flip, centre crop; the
A-CLIP online augmentation rates (views.online_augment)."""

import io
import types

import numpy as np
import pytest
from PIL import Image

from glip_jax.data import throughput
from glip_jax.data import transforms


def _jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def _gradient(h: int, w: int) -> np.ndarray:
  """x in the red channel, y in the green channel: crops reveal where they came from."""
  x = np.broadcast_to(np.linspace(0, 255, w), (h, w))
  y = np.broadcast_to(np.linspace(0, 255, h)[:, None], (h, w))
  return np.stack([x, y, np.full((h, w), 128)], -1).astype(np.uint8)


def test_decode_bytes_grey_and_rgba():
  assert transforms.decode(_jpeg(_gradient(10, 20))).size == (20, 10)
  grey = io.BytesIO()
  Image.new("L", (5, 4)).save(grey, format="PNG")
  assert transforms.decode(grey.getvalue()).mode == "RGB"
  rgba = np.zeros((3, 3, 4), np.uint8)
  assert transforms.decode(Image.fromarray(rgba)).mode == "RGB"


def test_random_resized_crop_is_deterministic_per_generator():
  image = _jpeg(_gradient(120, 160))
  a, box_a = transforms.random_resized_crop(image, np.random.default_rng(3), 32, flip=True)
  b, box_b = transforms.random_resized_crop(image, np.random.default_rng(3), 32, flip=True)
  np.testing.assert_array_equal(a, b)
  assert box_a == box_b
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8


def test_crop_boxes_respect_scale_and_ratio():
  rng = np.random.default_rng(0)
  areas, ratios = [], []
  for _ in range(300):
    top, left, bottom, right = transforms.sample_crop_box(200, 300, rng, (0.5, 1.0))
    assert 0 <= top < bottom <= 200 and 0 <= left < right <= 300
    areas.append((bottom - top) * (right - left) / (200 * 300))
    ratios.append((right - left) / (bottom - top))
  assert min(areas) >= 0.49 and max(areas) <= 1.0
  assert min(ratios) >= 0.74 and max(ratios) <= 1.34
  # Large crops often do not fit a 2:3 frame and are resampled, as in torchvision; still the mean
  # is well above the lower bound.
  assert np.mean(areas) > 0.58


def test_reported_box_matches_the_pixels():
  image = _gradient(100, 100)
  crop, box = transforms.random_resized_crop(image, np.random.default_rng(1), 50, scale=(0.3, 0.4))
  assert 0.28 <= (box.bottom - box.top) * (box.right - box.left) <= 0.42
  # Red encodes x, green y: the crop's mean colour sits at the centre of the reported box.
  np.testing.assert_allclose(crop[..., 0].mean() / 255, (box.left + box.right) / 2, atol=0.03)
  np.testing.assert_allclose(crop[..., 1].mean() / 255, (box.top + box.bottom) / 2, atol=0.03)
  assert box.as_array().dtype == np.float32


def test_flip_mirrors_and_is_reported():
  image = _gradient(64, 64)
  flipped_seen = unflipped_seen = False
  for seed in range(20):
    crop, box = transforms.random_resized_crop(
        image, np.random.default_rng(seed), 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True
    )
    left_brighter = crop[:, 0, 0].mean() > crop[:, -1, 0].mean()
    assert left_brighter == box.flipped
    flipped_seen |= box.flipped
    unflipped_seen |= not box.flipped
  assert flipped_seen and unflipped_seen


def test_center_crop_takes_the_middle_square():
  image = _gradient(100, 200)
  out = transforms.center_crop(image, 40)
  assert out.shape == (40, 40, 3)
  np.testing.assert_allclose(out[..., 0].mean(), 127.5, atol=3)  # centred in x
  assert out[0, 0, 0] > 60 and out[0, -1, 0] < 195  # the sides were cut off


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (100, 80)])
def test_resize_shorter_side(size):
  out = transforms.resize_shorter_side(Image.new("RGB", size), 100)
  assert min(out.size) == min(100, *size)  # Downscales only.
  assert out.size[0] / out.size[1] == pytest.approx(size[0] / size[1], rel=0.02)


def _reference_random_resized_crop(image, rng, size, scale, ratio, flip):
  """The decode path before draft mode (full decode, then one antialiased resize): the reference."""
  pil = Image.open(io.BytesIO(image)).convert("RGB")
  width, height = pil.size
  top, left, bottom, right = transforms.sample_crop_box(height, width, rng, scale, ratio)
  out = pil.resize((size, size), Image.BILINEAR, box=(left, top, right, bottom))
  flipped = bool(flip and rng.random() < 0.5)
  if flipped:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  box = transforms.CropBox(top / height, left / width, bottom / height, right / width, flipped)
  return np.asarray(out, dtype=np.uint8), box


@pytest.fixture(scope="module")
def web_images():
  """Photo-like JPEGs (q90) at web sizes, and the same shrunk to shorter side 256."""
  full = throughput.web_like_jpegs(12, min_side=400, max_side=1024, seed=0)
  return full, throughput.shrink_jpegs(full, 256)


def _both_paths(images, size=224, repeats=4):
  ref, fast, ref_boxes, fast_boxes = [], [], [], []
  for i, image in enumerate(images * repeats):
    args = (size, transforms.DEFAULT_SCALE, transforms.DEFAULT_RATIO, True)
    a, box_a = _reference_random_resized_crop(image, np.random.default_rng(i), *args)
    b, box_b = transforms.random_resized_crop(image, np.random.default_rng(i), *args)
    ref.append(a), fast.append(b), ref_boxes.append(box_a), fast_boxes.append(box_b)
  return np.stack(ref).astype(np.float64), np.stack(fast).astype(np.float64), ref_boxes, fast_boxes


def test_draft_decode_matches_the_reference_on_full_size_jpegs(web_images):
  ref, fast, ref_boxes, fast_boxes = _both_paths(web_images[0])
  # The same random draws give the same boxes (sampled on the header's size, before decoding).
  assert ref_boxes == fast_boxes
  scales = [transforms.draft_scale(
      (b.bottom - b.top) * h, (b.right - b.left) * w, 224, 224)
      for b, (w, h) in zip(fast_boxes, [Image.open(io.BytesIO(x)).size for x in web_images[0]] * 4)]
  assert max(scales) >= 2  # The draft path was exercised.
  # Pixel statistics: per-channel mean within 0.2 grey levels and std within 0.5%, and every
  # crop close to its reference (measured: worst PSNR 46.6 dB; DCT-domain scaling filters a
  # little differently from PIL's antialiasing, keeping slightly more detail: +3% gradient).
  np.testing.assert_allclose(fast.mean(axis=(0, 1, 2)), ref.mean(axis=(0, 1, 2)), atol=0.2)
  np.testing.assert_allclose(fast.std(axis=(0, 1, 2)), ref.std(axis=(0, 1, 2)), rtol=0.005)
  mse = ((fast - ref) ** 2).mean(axis=(1, 2, 3))
  assert 10 * np.log10(255**2 / mse.max()) > 40  # The worst crop's PSNR, in dB.
  grad = lambda x: np.abs(np.diff(x, axis=2)).mean()  # noqa: E731
  assert grad(fast) == pytest.approx(grad(ref), rel=0.06)


def test_crops_of_images_stored_at_256_are_unchanged(web_images):
  ref, fast, ref_boxes, fast_boxes = _both_paths(web_images[1], repeats=2)
  assert ref_boxes == fast_boxes
  np.testing.assert_array_equal(fast, ref)  # No 2x reduction fits: the same full decode.


def test_undecodable_bytes_raise_a_clear_error():
  good = _jpeg(_gradient(64, 64))
  for bad in (b"not an image", good[: len(good) // 2]):
    with pytest.raises(transforms.UndecodableImageError, match="cannot decode"):
      transforms.random_resized_crop(bad, np.random.default_rng(0), 32)
  with pytest.raises(transforms.UndecodableImageError):
    transforms.decode(good[:100])


def test_online_augmentation_rates_within_binomial_bounds(monkeypatch):
  """Each of the four A-CLIP online augmentations fires at its own rate (SPEC §4)."""
  from PIL import ImageFilter, ImageOps  # pylint: disable=g-import-not-at-top
  from glip_jax.data import views  # pylint: disable=g-import-not-at-top

  # Spies that count and then call the real operations (the output is what it would be).
  fired = {"jitter": 0, "blur": 0, "solarize": 0}
  radii = []
  real_jitter = views.color_jitter

  def jitter(pil, rng):
    fired["jitter"] += 1
    return real_jitter(pil, rng)

  def blur(radius):
    fired["blur"] += 1
    radii.append(radius)
    return ImageFilter.GaussianBlur(radius=radius)

  def solarize(pil, threshold):
    fired["solarize"] += 1
    assert threshold == 128
    return ImageOps.solarize(pil, threshold)

  monkeypatch.setattr(views, "color_jitter", jitter)
  monkeypatch.setattr(views, "ImageFilter", types.SimpleNamespace(GaussianBlur=blur))
  monkeypatch.setattr(views, "ImageOps", types.SimpleNamespace(solarize=solarize))
  n = 4000
  rng = np.random.default_rng(0)
  pil = Image.fromarray(_gradient(8, 8))
  gray = 0
  for _ in range(n):
    out = np.asarray(views.online_augment(pil, rng)).astype(int)
    # Only the grayscale step makes the channels equal (the jitter's saturation stays >= 0.8).
    gray += bool(np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2]))
  rates = {**fired, "gray": gray}
  expected = {"jitter": views.JITTER_PROB, "gray": views.GRAYSCALE_PROB,
              "blur": views.BLUR_PROB, "solarize": views.SOLARIZE_PROB}
  assert expected == {"jitter": 0.8, "gray": 0.2, "blur": 0.1, "solarize": 0.2}  # SPEC §4
  for name, p in expected.items():
    # 5 binomial standard deviations: at n=4000 that is ±0.024 for p=0.1 and ±0.032 for p=0.2,
    # so blur at 0.2 or solarize at 0.1 or 0.3 (or any rate off by ≥ 0.04) is far outside.
    bound = 5 * np.sqrt(p * (1 - p) / n)
    assert abs(rates[name] / n - p) < bound, (name, rates[name] / n, p, bound)
  # Blur radii: uniform on [0.1, 2.0] (mean 1.05, sd 1.9/sqrt(12)), the mean within 5 sd.
  radii = np.asarray(radii)
  assert np.all((0.1 <= radii) & (radii <= 2.0))
  assert abs(radii.mean() - 1.05) < 5 * (1.9 / np.sqrt(12)) / np.sqrt(len(radii))
