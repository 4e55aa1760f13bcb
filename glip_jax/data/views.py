"""A-CLIP multi-view preprocessing (SPEC §4): two online crops and one zoom-out crop per example.

Per record:
  * two "online" views: RandomResizedCrop (data_cfg.crop_scale, default area 0.5–1), colour jitter
    (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p=0.8, grayscale p=0.2, Gaussian
    blur (σ ∈ [0.1, 2] px) p=0.1, solarize p=0.2 — and no flip, because the teacher's attention
    map is mapped into the views purely by their boxes;
  * one "zoom-out" (teacher) view: the union box of the two online boxes, each side moved a uniform
    random distance toward the image border, with no colour augmentation.

Every box travels with the batch in normalised source-image coordinates [top, left, bottom, right]
so that the train step can map the teacher's score map into each online view in-graph
(glip_jax.aclip.map_scores_to_view). The teacher box always contains both online boxes.

Batch: {'image', 'image2', 'teacher_image': uint8 [b,H,W,3], 'box1', 'box2', 'teacher_box':
float32 [b,4], 'text': int32 [b,L], 'label': int32 [b]}. Colour augmentation runs on the already
resized crops (H×W), so it costs the same whatever the source resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from glip_jax.data import records
from glip_jax.data import transforms
from glip_jax.data.tokenizer import Tokenizer

# torchvision ColorJitter(0.4, 0.4, 0.2, 0.1), applied with this probability (SPEC §4).
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.1
BLUR_SIGMA = (0.1, 2.0)  # as SLIP/A-CLIP's GaussianBlur([.1, 2.])
SOLARIZE_PROB = 0.2
SOLARIZE_THRESHOLD = 128

# What the A-CLIP train step reads from a batch (glip_jax.aclip.train_step).
BATCH_KEYS = ("image", "image2", "teacher_image", "box1", "box2", "teacher_box", "text")


def zoom_out_box(
    box1: Sequence[int], box2: Sequence[int], height: int, width: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
  """Union of two pixel boxes (top, left, bottom, right), each side moved randomly to the border.

  Each side is drawn uniformly between the union's side and the image border (inclusive), so the
  result always contains both boxes. (The authors' code draws a height/width instead of a bottom
  and right, which can cut into the union; we keep the containment the method relies on.)
  """
  top, left = min(box1[0], box2[0]), min(box1[1], box2[1])
  bottom, right = max(box1[2], box2[2]), max(box1[3], box2[3])
  return (
      int(rng.integers(0, top + 1)),
      int(rng.integers(0, left + 1)),
      int(rng.integers(bottom, height + 1)),
      int(rng.integers(right, width + 1)),
  )


def _adjust_hue(pil: Image.Image, shift: float) -> Image.Image:
  """Rotates the hue by `shift` turns (−0.5..0.5), as torchvision's PIL adjust_hue (uint8 HSV)."""
  h, s, v = pil.convert("HSV").split()
  hue = (np.asarray(h, np.int16) + int(round(shift * 255))) % 256
  return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB")


def color_jitter(pil: Image.Image, rng: np.random.Generator) -> Image.Image:
  """ColorJitter(0.4, 0.4, 0.2, 0.1): the four adjustments in a random order, as torchvision."""
  b, c, s, h = (JITTER[k] for k in ("brightness", "contrast", "saturation", "hue"))
  factors = (
      rng.uniform(1 - b, 1 + b),
      rng.uniform(1 - c, 1 + c),
      rng.uniform(1 - s, 1 + s),
      rng.uniform(-h, h),
  )
  for op in rng.permutation(4):
    if op == 0:
      pil = ImageEnhance.Brightness(pil).enhance(factors[0])
    elif op == 1:
      pil = ImageEnhance.Contrast(pil).enhance(factors[1])
    elif op == 2:
      pil = ImageEnhance.Color(pil).enhance(factors[2])
    else:
      pil = _adjust_hue(pil, factors[3])
  return pil


def online_augment(pil: Image.Image, rng: np.random.Generator) -> Image.Image:
  """Colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur (p=0.1), solarize (p=0.2); no flip."""
  # Draw every coin up front so that the random stream does not depend on which branches fire.
  apply_jitter, apply_gray, apply_blur, apply_solarize = rng.random(4) < (
      JITTER_PROB,
      GRAYSCALE_PROB,
      BLUR_PROB,
      SOLARIZE_PROB,
  )
  sigma = rng.uniform(*BLUR_SIGMA)
  if apply_jitter:
    pil = color_jitter(pil, rng)
  if apply_gray:
    pil = pil.convert("L").convert("RGB")
  if apply_blur:
    pil = pil.filter(ImageFilter.GaussianBlur(radius=sigma))
  if apply_solarize:
    pil = ImageOps.solarize(pil, SOLARIZE_THRESHOLD)
  return pil


def _resized_crop(pil: Image.Image, box: Sequence[int], size: tuple[int, int]) -> Image.Image:
  top, left, bottom, right = box
  return pil.resize((size[1], size[0]), Image.BILINEAR, box=(left, top, right, bottom))


def _normalised(box: Sequence[int], height: int, width: int) -> np.ndarray:
  top, left, bottom, right = box
  return np.array([top / height, left / width, bottom / height, right / width], np.float32)


class ACLIPPreprocess(grain.transforms.RandomMap):
  """Record → two augmented online crops, one zoom-out crop, their boxes and a random caption."""

  def __init__(
      self,
      image_size: int | tuple[int, int],
      tokenizer: Tokenizer,
      scale: Sequence[float] = transforms.DEFAULT_SCALE,
      ratio: Sequence[float] = transforms.DEFAULT_RATIO,
  ):
    self.size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    self.tokenizer = tokenizer
    self.scale, self.ratio = tuple(scale), tuple(ratio)

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    pil = transforms.decode(records.image_of(record))
    width, height = pil.size
    box1 = transforms.sample_crop_box(height, width, rng, self.scale, self.ratio)
    box2 = transforms.sample_crop_box(height, width, rng, self.scale, self.ratio)
    teacher_box = zoom_out_box(box1, box2, height, width, rng)
    view1 = online_augment(_resized_crop(pil, box1, self.size), rng)
    view2 = online_augment(_resized_crop(pil, box2, self.size), rng)
    teacher = _resized_crop(pil, teacher_box, self.size)
    caption = records.random_caption(record, rng)
    return {
        "image": np.asarray(view1, np.uint8),
        "image2": np.asarray(view2, np.uint8),
        "teacher_image": np.asarray(teacher, np.uint8),
        "box1": _normalised(box1, height, width),
        "box2": _normalised(box2, height, width),
        "teacher_box": _normalised(teacher_box, height, width),
        "text": self.tokenizer([caption])[0],
        "label": np.int32(record["label"]),
    }
