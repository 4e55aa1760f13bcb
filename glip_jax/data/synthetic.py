"""Procedural captioned scenes: example i is a pure function of (seed, split, i).

Each scene has one main object (shape × colour × size) near the image centre on a muted, textured
background, plus 0–3 small distractor objects that the captions do not mention. Nothing is stored:
any index renders on demand in well under a millisecond at 32–64 px, so the dataset is
random-access and infinitely large for practical purposes.

Rendering is vectorised numpy over each object's bounding box (no per-pixel Python, no PIL drawing).
Colours are saturated and backgrounds desaturated so that a tiny CLIP can learn colour and shape
words within a few hundred steps at 32 px.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "heart")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES = ("small", "medium", "large")
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "gradient", "noisy")

# Saturated, well separated in hue (white is the one achromatic class; backgrounds never reach it).
_RGB = np.array(
    [
        (230, 25, 25),
        (255, 135, 0),
        (245, 230, 20),
        (30, 190, 40),
        (0, 215, 230),
        (25, 60, 235),
        (150, 30, 210),
        (250, 250, 250),
    ],
    dtype=np.uint8,
)
# Half-extent of the main object as a fraction of the image side.
_SIZE_RADIUS = (0.15, 0.23, 0.33)
_DISTRACTOR_RADIUS = (0.06, 0.1)

CAPTION_TEMPLATES = (
    "a photo of a {size} {colour} {shape}",
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape}",
    "a picture of a {colour} {shape}",
    "there is a {colour} {shape} in the image",
    "a {shape} that is {colour}",
    "a {size} {shape}, {colour}, on a {background} background",
    "{colour} {shape}",
    # Shape-only captions: without them the shape word never appears apart from a colour word,
    # and colour (the easier cue) dominates what the text tower learns about a caption.
    "a photo of a {shape}",
    "a {shape} on a {background} background",
)

# Prompts for zero-shot classification of each label; "{}" is the class name.
ZERO_SHOT_TEMPLATES = {
    "shape": ("a photo of a {}", "a {} on a background", "there is a {} in the image"),
    "colour": ("a photo of a {} object", "a {} shape", "something {}"),
    "size": ("a photo of a {} object", "a {} shape"),
}
CLASS_NAMES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}

# Splits live in disjoint index ranges; a split's example i is global index offset + i.
_SPLIT_OFFSETS = {"train": 0, "validation": 1 << 40, "test": 2 << 40}
SPLITS = tuple(_SPLIT_OFFSETS)


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """Knobs of the synthetic dataset (mirrored by `data.synthetic` in the data config)."""

  image_size: int = 64
  center_bias: float = 0.5  # 0: main object anywhere in the frame; 1: exactly centred.
  max_distractors: int = 3
  num_captions: int = 3  # distinct templates per example (training picks one at random).
  seed: int = 0


def split_range(split: str, size: int) -> range:
  """Global index range of `split` with `size` examples; ranges of different splits never overlap."""
  if split not in _SPLIT_OFFSETS:
    raise ValueError(f"synthetic split={split!r}; allowed: {SPLITS}")
  if not 0 < size <= 1 << 40:
    raise ValueError(f"synthetic split size={size}; must be in [1, 2**40]")
  start = _SPLIT_OFFSETS[split]
  return range(start, start + size)


@functools.lru_cache(maxsize=16)
def _pixel_centres(size: int) -> np.ndarray:
  """Pixel-centre coordinates in [0, 1) along one axis; cached per image size."""
  return (np.arange(size, dtype=np.float32) + 0.5) / size


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Boolean mask of a unit shape; u (columns, [1,w]) and v (rows, [h,1]) in object radii."""
  name = SHAPES[shape]
  if name == "circle":
    return u * u + v * v <= 1.0
  if name == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.82
  if name == "triangle":  # Apex up; base at v = 0.8.
    return (v <= 0.8) & (np.abs(u) <= (v + 1.0) * 0.55)
  if name == "diamond":
    return np.abs(u) + np.abs(v) <= 1.0
  if name == "cross":
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
  if name == "star":  # Five points, one pointing up.
    r = np.sqrt(u * u + v * v)
    phase = (np.arctan2(u, -v) * (5 / (2 * np.pi))) % 1.0
    return r <= 0.42 + 0.58 * np.abs(2.0 * phase - 1.0) ** 1.5
  if name == "ring":
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.3)
  if name == "heart":
    x, y = u * 1.15, -v * 1.15 + 0.25
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
  raise AssertionError(name)


def _draw(image: np.ndarray, shape: int, rgb: np.ndarray, cx: float, cy: float, r: float) -> None:
  """Paints one object in place, computing its mask only over its bounding box."""
  size = image.shape[0]
  coords = _pixel_centres(size)
  x0, x1 = max(0, int((cx - r) * size)), min(size, int(np.ceil((cx + r) * size)) + 1)
  y0, y1 = max(0, int((cy - r) * size)), min(size, int(np.ceil((cy + r) * size)) + 1)
  u = ((coords[x0:x1] - cx) / r)[None, :]
  v = ((coords[y0:y1] - cy) / r)[:, None]
  image[y0:y1, x0:x1][_shape_mask(shape, u, v)] = rgb


def _background(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """A desaturated two-tone texture, so saturated objects always stand out."""
  base = rng.uniform(55, 150) + rng.uniform(-18, 18, size=3)
  other = base + rng.choice([-1.0, 1.0]) * rng.uniform(30, 50)
  c1, c2 = (np.clip(c, 0, 200).astype(np.float32) for c in (base, other))
  coords = _pixel_centres(size)
  x, y = coords[None, :], coords[:, None]
  name = BACKGROUNDS[kind]
  if name == "plain":
    t = np.zeros((size, size), np.float32)
  elif name == "striped":
    angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * np.pi
    period = rng.uniform(0.08, 0.2)
    t = (((x * np.cos(angle) + y * np.sin(angle)) / period) % 2.0 < 1.0).astype(np.float32)
  elif name == "checkered":
    period = rng.uniform(0.08, 0.2)
    t = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
  elif name == "dotted":
    period = rng.uniform(0.1, 0.2)
    dx, dy = (x % period) / period - 0.5, (y % period) / period - 0.5
    t = (dx * dx + dy * dy < 0.09).astype(np.float32)
  elif name == "gradient":
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle) + 0.5, 0, 1)
  else:  # noisy: blocky value noise, upsampled by repetition.
    cells = max(2, size // 4)
    t = rng.uniform(0, 1, size=(cells, cells)).astype(np.float32)
    t = np.repeat(np.repeat(t, -(-size // cells), 0), -(-size // cells), 1)[:size, :size]
  image = c1 + t[..., None] * (c2 - c1)
  return image.astype(np.uint8)


def render(index: int, config: SceneConfig = SceneConfig()) -> dict[str, Any]:
  """Renders global example `index`: {'image' uint8 [S,S,3], 'captions', 'shape', 'colour', 'size', 'background'}."""
  rng = np.random.default_rng([config.seed, index])
  shape, colour, size_id, bg = (
      int(rng.integers(len(SHAPES))),
      int(rng.integers(len(COLOURS))),
      int(rng.integers(len(SIZES))),
      int(rng.integers(len(BACKGROUNDS))),
  )
  s = config.image_size
  image = _background(bg, s, rng)

  for _ in range(int(rng.integers(config.max_distractors + 1))):
    r = rng.uniform(*_DISTRACTOR_RADIUS)
    cx, cy = rng.uniform(r, 1 - r, size=2)
    _draw(image, int(rng.integers(len(SHAPES))), _RGB[rng.integers(len(COLOURS))], cx, cy, r)

  # The main object is drawn last so distractors never hide it; it always stays inside the frame.
  r = _SIZE_RADIUS[size_id] * rng.uniform(0.9, 1.1)
  half_range = (0.5 - r) * (1.0 - config.center_bias)
  cx, cy = 0.5 + rng.uniform(-half_range, half_range, size=2)
  _draw(image, shape, _RGB[colour], cx, cy, r)

  words = dict(
      shape=SHAPES[shape], colour=COLOURS[colour], size=SIZES[size_id], background=BACKGROUNDS[bg]
  )
  templates = rng.choice(len(CAPTION_TEMPLATES), size=config.num_captions, replace=False)
  captions = [CAPTION_TEMPLATES[t].format(**words) for t in templates]
  return dict(
      image=image, captions=captions, shape=shape, colour=colour, size=size_id, background=bg
  )


class SyntheticScenes:
  """Random-access source of one split of the synthetic dataset, yielding common record dicts."""

  label_names = ("shape", "colour", "size")

  def __init__(
      self,
      config: SceneConfig = SceneConfig(),
      split: str = "train",
      size: int = 1_000_000,
      label: str = "shape",
  ):
    if label not in CLASS_NAMES:
      raise ValueError(f"synthetic label={label!r}; allowed: {tuple(CLASS_NAMES)}")
    self.config = config
    self.split = split
    self.label = label
    self._range = split_range(split, size)

  def __len__(self) -> int:
    return len(self._range)

  def __getitem__(self, index: int) -> dict[str, Any]:
    global_index = self._range[index]
    scene = render(global_index, self.config)
    return {
        "image": scene["image"],
        "captions": scene["captions"],
        "label": scene[self.label],
        "labels": {name: scene[name] for name in self.label_names},
        "key": f"synthetic/{self.split}/{index}",
    }

  def __repr__(self) -> str:
    return f"SyntheticScenes({self.config}, split={self.split!r}, size={len(self)})"
