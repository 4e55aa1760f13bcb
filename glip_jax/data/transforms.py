"""Host-side image transforms: decode, RandomResizedCrop + flip (train), resize + centre crop (eval).

Outputs stay uint8; normalisation happens on device, in the model. Crops are done by one PIL
`resize(box=...)` call (crop and resample in a single pass, antialiased), which is both faster and
more accurate than cropping then resizing. All randomness comes from a numpy Generator passed in
(Grain's `random_map` gives each record its own), so a record's augmentation is deterministic.
"""

from __future__ import annotations

import io
import math
from typing import NamedTuple

import numpy as np
from PIL import Image

DEFAULT_SCALE = (0.5, 1.0)  # FLIP / GLIP; torchvision's default would be (0.08, 1).
DEFAULT_RATIO = (3 / 4, 4 / 3)


class CropBox(NamedTuple):
  """A crop in normalised source-image coordinates (0..1), plus whether it was mirrored."""

  top: float
  left: float
  bottom: float
  right: float
  flipped: bool = False

  def as_array(self) -> np.ndarray:
    """float32 [top, left, bottom, right] (what A-CLIP's view geometry consumes)."""
    return np.array([self.top, self.left, self.bottom, self.right], np.float32)


def decode(image: bytes | np.ndarray | Image.Image) -> Image.Image:
  """Encoded bytes, a uint8 array or a PIL image → an RGB PIL image."""
  if isinstance(image, Image.Image):
    pil = image
  elif isinstance(image, np.ndarray):
    pil = Image.fromarray(image)
  else:
    pil = Image.open(io.BytesIO(image))
  return pil if pil.mode == "RGB" else pil.convert("RGB")


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> tuple[float, float, float, float]:
  """torchvision's RandomResizedCrop box sampler; returns pixel (top, left, bottom, right)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, top + h, left + w
  # Fallback (as torchvision): the largest centred crop with the aspect clamped into `ratio`.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return top, left, top + h, left + w


def random_resized_crop(
    image: bytes | np.ndarray | Image.Image,
    rng: np.random.Generator,
    size: int | tuple[int, int],
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    flip: bool = False,
) -> tuple[np.ndarray, CropBox]:
  """Training view: random crop resized to `size` (+ optional horizontal flip) → (uint8 [H,W,3], box)."""
  pil = decode(image)
  out_h, out_w = (size, size) if isinstance(size, int) else size
  width, height = pil.size
  top, left, bottom, right = sample_crop_box(height, width, rng, scale, ratio)
  out = pil.resize((out_w, out_h), Image.BILINEAR, box=(left, top, right, bottom))
  flipped = bool(flip and rng.random() < 0.5)
  if flipped:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  box = CropBox(top / height, left / width, bottom / height, right / width, flipped)
  return np.asarray(out, dtype=np.uint8), box


def center_crop(image: bytes | np.ndarray | Image.Image, size: int) -> np.ndarray:
  """Evaluation view: resize the shorter side to `size`, then take the central size×size square."""
  pil = decode(image)
  width, height = pil.size
  side = min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  out = pil.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
  return np.asarray(out, dtype=np.uint8)


def resize_shorter_side(pil: Image.Image, size: int) -> Image.Image:
  """Downscales so the shorter side is `size` (never upscales); used to shrink stored images."""
  width, height = pil.size
  if min(width, height) <= size:
    return pil
  factor = size / min(width, height)
  new = (max(size, round(width * factor)), max(size, round(height * factor)))
  return pil.resize(new, Image.BICUBIC, reducing_gap=3.0)
