"""Host-side image transforms: decode, RandomResizedCrop + flip (train), resize + centre crop (eval).

Outputs stay uint8; normalisation happens on device, in the model. Crops are done by one PIL
`resize(box=...)` call (crop and resample in a single pass, antialiased), which is both faster and
more accurate than cropping then resizing. Training crops of JPEGs are decoded in draft mode
(DCT-domain downscale to the smallest power-of-two scale that still covers the crop at the output
resolution), which makes the resize of full-size web images cheap; see docs/data.md ("Decode
path"). All randomness comes from a numpy Generator passed in (Grain's `random_map` gives each
record its own), so a record's augmentation is deterministic.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image

from glip_jax.data import records

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


class UndecodableImageError(records.BadRecordError):
  """Encoded image bytes that PIL cannot decode (corrupt, truncated, not an image, absurd size)."""

  reason = "undecodable_image"


# Larger stored images are refused before decoding: a header claiming e.g. 100k × 100k pixels is a
# corrupt file or a decompression bomb, and would take gigabytes to decode (PIL's own limit).
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def _open(image: bytes | np.ndarray | Image.Image) -> Image.Image:
  """A PIL image; for bytes only the header is read (decoding waits for `load`)."""
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, np.ndarray):
    return Image.fromarray(image)
  try:
    with warnings.catch_warnings():  # a too large image is refused below, not warned about
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      pil = Image.open(io.BytesIO(image))
  except Exception as e:  # PIL raises many types for bad data; all mean "undecodable".
    raise UndecodableImageError(f"cannot decode image ({len(image)} bytes): {e}") from None
  width, height = pil.size
  if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
    raise UndecodableImageError(f"{pil.format} image of {width}×{height} pixels: allowed are "
                                f"1..{MAX_IMAGE_PIXELS:,} pixels")
  return pil


def _load_rgb(pil: Image.Image) -> Image.Image:
  try:
    pil.load()
    return pil if pil.mode == "RGB" else pil.convert("RGB")
  except Exception as e:  # Truncated data fails here, after a header that parsed.
    raise UndecodableImageError(f"cannot decode {pil.format or ''} image {pil.size}: {e}") from None


def decode(image: bytes | np.ndarray | Image.Image) -> Image.Image:
  """Encoded bytes, a uint8 array or a PIL image → an RGB PIL image."""
  return _load_rgb(_open(image))


def draft_scale(crop_h: float, crop_w: float, out_h: int, out_w: int) -> int:
  """The largest JPEG DCT-domain reduction (1, 2, 4, 8) that keeps the crop >= the output size."""
  factor = min(crop_h / out_h, crop_w / out_w)
  return next((s for s in (8, 4, 2) if s <= factor), 1)


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
    draft: bool = True,
) -> tuple[np.ndarray, CropBox]:
  """Training view: random crop resized to `size` (+ optional flip) → (uint8 [H,W,3], box).

  The box is sampled on the stored size (read from the header); a JPEG is then decoded in draft
  mode, i.e. downscaled in the DCT domain by the largest power of two that keeps the crop at least
  as large as the output, and the one antialiased resize works on that smaller image
  (`draft=False`: always decode in full, the previous path, kept for benchmarks).
  """
  pil = _open(image)
  out_h, out_w = (size, size) if isinstance(size, int) else size
  width, height = pil.size
  top, left, bottom, right = sample_crop_box(height, width, rng, scale, ratio)
  reduction = 1.0
  if draft and pil.format == "JPEG" and not isinstance(image, Image.Image):
    s = draft_scale(bottom - top, right - left, out_h, out_w)
    if s > 1:
      # draft() picks the largest reduction with size >= the requested one: ask for W//s × H//s.
      drafted = pil.draft("RGB", (width // s, height // s))
      if drafted is not None:  # None: a JPEG layout draft cannot reduce (then decode in full).
        reduction = width / drafted[1][2]
  pil = _load_rgb(pil)
  box = tuple(v / reduction for v in (left, top, right, bottom))
  out = pil.resize((out_w, out_h), Image.BILINEAR, box=box)
  flipped = bool(flip and rng.random() < 0.5)
  if flipped:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  box = CropBox(top / height, left / width, bottom / height, right / width, flipped)
  return np.asarray(out, dtype=np.uint8), box


def center_crop(image: bytes | np.ndarray | Image.Image, size: int | tuple[int, int]) -> np.ndarray:
  """Evaluation view: the largest central box of the output's aspect, resized to `size` (H, W).

  For a square `size` this is "resize the shorter side, take the middle square"; for (H, W) the
  box has aspect W/H, so a non-square model sees an undistorted centre of the image.
  """
  out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
  pil = decode(image)
  width, height = pil.size
  scale = min(width / out_w, height / out_h)  # source pixels per output pixel
  box_w, box_h = out_w * scale, out_h * scale
  left, top = (width - box_w) / 2, (height - box_h) / 2
  out = pil.resize((out_w, out_h), Image.BICUBIC, box=(left, top, left + box_w, top + box_h))
  return np.asarray(out, dtype=np.uint8)


def resize_shorter_side(pil: Image.Image, size: int) -> Image.Image:
  """Downscales so the shorter side is `size` (never upscales); used to shrink stored images."""
  width, height = pil.size
  if min(width, height) <= size:
    return pil
  factor = size / min(width, height)
  new = (max(size, round(width * factor)), max(size, round(height * factor)))
  return pil.resize(new, Image.BICUBIC, reducing_gap=3.0)
