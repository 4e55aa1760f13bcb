"""Pictures of token selection: keep-probability maps and masked images, for any masking kind.

The probabilities come from draws of the same in-graph kernel the train step uses
(`glip_jax.masking.keep_indices`), so what is drawn is what training sees. Kinds whose selection
depends on the image get the images (when the kernel's signature takes `images`); kind
'attentive' gets the caller's `scores` (the A-CLIP teacher's attention in training).

  fig, maps = masks_figure([MaskingSpec("random", 0.5), MaskingSpec("gaussian", 0.5)], images, 4)

matplotlib (the `plot` extra) is needed only by `masks_figure`; the array functions use numpy.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from glip_jax import masking

# Dropped patches: solid near-black with a lighter 1-px grid on each patch's top and left edge,
# so they cannot be mistaken for image content; `example_images` skips images that have dark
# regions of this colour.
DROPPED_RGB = (18, 18, 24)
GRID_RGB = (120, 120, 130)
# Largest grid side whose probabilities are printed on the map (beyond that the text is unreadable).
MAX_ANNOTATED_SIDE = 16
_DRAW_CHUNK = 512  # rows per kernel call when images or scores are tiled over draws


def _kernel_takes_images() -> bool:
  return "images" in inspect.signature(masking.keep_indices).parameters


def select(rng: jax.Array, spec: masking.MaskingSpec, batch_size: int, grid: tuple[int, int], *,
           images: np.ndarray | None = None,
           scores: np.ndarray | None = None) -> np.ndarray | None:
  """`masking.keep_indices` as numpy [B, K] (None: none dropped), given images if it takes them."""
  kwargs: dict[str, Any] = {}
  if scores is not None:
    kwargs["scores"] = jnp.asarray(scores)
  if images is not None and _kernel_takes_images():
    kwargs["images"] = jnp.asarray(images)
  keep = masking.keep_indices(rng, spec, batch_size, grid, **kwargs)
  return None if keep is None else np.asarray(keep)


def keep_frequency(spec: masking.MaskingSpec, grid: tuple[int, int], draws: int, *,
                   images: np.ndarray | None = None, scores: np.ndarray | None = None,
                   seed: int = 0) -> np.ndarray:
  """Fraction of `draws` selections in which each patch is kept, [rows, cols].

  With `images` [B,H,W,3] or `scores` [B,N], the draws cycle through those B examples (the map is
  then the keep probability over them); without, every draw is an independent selection.
  """
  n = grid[0] * grid[1]
  if not spec.active:
    return np.ones(grid)
  per_example = images if images is not None else scores
  counts = np.zeros(n, np.int64)
  rng = jax.random.key(seed)
  if per_example is None:
    keep = select(rng, spec, draws, grid)
    counts += np.bincount(keep.reshape(-1), minlength=n)
    total = draws
  else:
    b = len(per_example)
    reps_per_call = max(1, _DRAW_CHUNK // b)
    calls = math.ceil(math.ceil(draws / b) / reps_per_call)
    for i in range(calls):
      def tile(x):
        return None if x is None else np.concatenate([np.asarray(x)] * reps_per_call)
      keep = select(jax.random.fold_in(rng, i), spec, b * reps_per_call, grid,
                    images=tile(images), scores=tile(scores))
      counts += np.bincount(keep.reshape(-1), minlength=n)
    total = calls * reps_per_call * b
  return (counts / total).reshape(grid)


def masked_image(image: np.ndarray, keep: np.ndarray | None, patch_size: int,
                 scale: int = 1) -> np.ndarray:
  """`image` enlarged `scale`× with every patch not in `keep` solid dark with a grid line."""
  image = np.repeat(np.repeat(np.asarray(image, np.uint8), scale, 0), scale, 1)
  if keep is None:
    return image
  p = patch_size * scale
  rows, cols = image.shape[0] // p, image.shape[1] // p
  kept = np.zeros(rows * cols, bool)
  kept[np.asarray(keep)] = True
  dropped = ~np.repeat(np.repeat(kept.reshape(rows, cols), p, 0), p, 1)
  edge = np.zeros((rows * p, cols * p), bool)
  edge[::p, :] = edge[:, ::p] = True
  out = image.copy()
  out[dropped] = DROPPED_RGB
  out[dropped & edge] = GRID_RGB
  return out


def looks_dropped(image: np.ndarray, tolerance: float = 60.0, max_fraction: float = 0.01) -> bool:
  """Whether more than `max_fraction` of the pixels are within `tolerance` of the dropped colour."""
  distance = np.linalg.norm(np.asarray(image, np.float32) - np.asarray(DROPPED_RGB), axis=-1)
  return float(np.mean(distance < tolerance)) > max_fraction


def example_images(config: ml_collections.ConfigDict, count: int,
                   max_tries: int = 1000) -> np.ndarray:
  """`count` centre-cropped training images [count,H,W,3] unlike the dropped-patch colour."""
  # Imported here: the data stack is not needed by the array functions above.
  from glip_jax.data import config as data_config_lib  # pylint: disable=g-import-not-at-top
  from glip_jax.data import records  # pylint: disable=g-import-not-at-top
  from glip_jax.data import sources  # pylint: disable=g-import-not-at-top
  from glip_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from glip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top

  size = clip_lib.image_size_hw(config.model.image_size)
  source_config, _ = data_config_lib.mixture_components(config.data)[0]
  source = sources.source_from_config(source_config)
  images = []
  for i in range(min(max_tries, len(source))):
    image = transforms.center_crop(records.image_of(source[i]), size[0])
    if not looks_dropped(image):
      images.append(image)
    if len(images) == count:
      return np.stack(images)
  raise ValueError(f"only {len(images)} of the first {max_tries} training images have no regions "
                   f"of the dropped-patch colour {DROPPED_RGB}; asked for count={count}.")


def probability_label(p: float) -> str:
  """A probability in two decimals without the leading zero ('.37'); '1' and '0' when rounded to."""
  text = f"{p:.2f}"
  return {"1.00": "1", "0.00": "0"}.get(text, text.lstrip("0"))


def title(spec: masking.MaskingSpec, grid: tuple[int, int]) -> str:
  """'gaussian, ratio 0.5: K = 32 of 64 patches kept' (plus the non-default knobs)."""
  n = grid[0] * grid[1]
  k = masking.num_kept(n, spec.ratio) if spec.active else n
  defaults = masking.MaskingSpec(spec.kind)
  extra = [f"{f.name}={getattr(spec, f.name)}" for f in dataclasses.fields(spec)
           if f.name not in ("kind", "ratio")
           and getattr(spec, f.name) != getattr(defaults, f.name)]
  return (f"{spec.kind}, ratio {spec.ratio:g}: K = {k} of {n} patches kept"
          + (f" ({', '.join(extra)})" if extra else ""))


def masks_figure(specs: Sequence[masking.MaskingSpec], images: np.ndarray, patch_size: int, *,
                 scores: Sequence[np.ndarray | None] | None = None, draws: int = 1000,
                 seed: int = 0, scale: int = 4) -> tuple[Any, list[np.ndarray]]:
  """One row per spec: the annotated keep-probability map, then `images` masked by one draw each.

  `scores[i]` [len(images), N] is spec i's prior when it is 'attentive'. Returns the matplotlib
  figure and each row's probability map [rows, cols].
  """
  plt = pyplot()
  images = np.asarray(images)
  grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
  scores = list(scores) if scores is not None else [None] * len(specs)
  if len(scores) != len(specs):
    raise ValueError(f"scores has {len(scores)} entries for {len(specs)} specs; give one per spec "
                     "(None where the kind needs none).")
  columns = 1 + len(images)
  fig, axes = plt.subplots(len(specs), columns, squeeze=False,
                           figsize=(2.8 + 1.7 * len(images), 2.3 * len(specs)),
                           gridspec_kw=dict(width_ratios=[1.35] + [1] * len(images)))
  maps = []
  for row, (spec, score) in enumerate(zip(specs, scores)):
    probability = keep_frequency(spec, grid, draws, images=images if score is None else None,
                                 scores=score, seed=seed)
    maps.append(probability)
    ax = axes[row, 0]
    shown = ax.imshow(probability, vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="P(kept)")
    if max(grid) <= MAX_ANNOTATED_SIDE:
      for (r, c), p in np.ndenumerate(probability):
        ax.text(c, r, probability_label(p), ha="center", va="center",
                fontsize=max(4, 40 // max(grid)), color="black" if p > 0.6 else "white")
    ax.set_title(title(spec, grid), fontsize=8, loc="left")
    ax.set_xticks([])
    ax.set_yticks([])
    keep = select(jax.random.key(seed + 1), spec, len(images), grid, images=images, scores=score)
    for i, image in enumerate(images):
      ax = axes[row, 1 + i]
      ax.imshow(masked_image(image, None if keep is None else keep[i], patch_size, scale))
      ax.set_xticks([])
      ax.set_yticks([])
  fig.tight_layout()
  return fig, maps


def pyplot() -> Any:
  """matplotlib.pyplot, or an ImportError saying which extra to install."""
  try:
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Drawing figures needs matplotlib: pip install 'glip_jax[plot]'.") from e
  return plt
