r"""Draws what a masking config keeps: the keep-probability map and masked example images.

  python tools/visualize_masks.py --config=configs/demo.py --out=masks.png
  python tools/visualize_masks.py --config=configs/glip_vit_b16.py:data=x --config.masking.ratio=0.75 \
      --out=glip75.png

The first panel is the probability that each patch is kept (estimated from `--draws` draws of the
same in-graph kernel the train step uses); the others are training-data examples with the dropped
patches greyed out. Attentive masking depends on a trained teacher and is not drawn here.
"""

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags
from PIL import Image

from glip_jax import masking
from glip_jax.data import config as data_config_lib
from glip_jax.data import records
from glip_jax.data import sources
from glip_jax.data import transforms
from glip_jax.models import clip as clip_lib
from glip_jax.models import vit


def define_flags() -> None:
  """The command-line flags (defined only when run as a script, so tests can import the module)."""
  config_flags.DEFINE_config_file("config", "configs/demo.py", "Config whose masking to draw.")
  flags.DEFINE_string("out", "masks.png", "PNG file to write.")
  flags.DEFINE_integer("samples", 7, "Masked example images to draw.")
  flags.DEFINE_integer("draws", 2000, "Draws used to estimate the keep probabilities.")
  flags.DEFINE_integer("scale", 4, "Pixels per image pixel for small images.")


def keep_probability(spec: masking.MaskingSpec, grid: tuple[int, int], draws: int) -> np.ndarray:
  """Fraction of `draws` images in which each patch is kept, [rows, cols]."""
  if not spec.active:
    return np.ones(grid)
  keep = np.asarray(masking.keep_indices(jax.random.key(0), spec, draws, grid))
  counts = np.bincount(keep.reshape(-1), minlength=grid[0] * grid[1])
  return (counts / draws).reshape(grid)


def heatmap(probability: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Keep probability as an RGB image (dark blue = never kept, yellow = always kept)."""
  p = probability[..., None]
  colours = (1 - p) * np.array([20, 30, 90]) + p * np.array([250, 220, 40])
  image = Image.fromarray(colours.astype(np.uint8)).resize(size[::-1], Image.NEAREST)
  return np.asarray(image)


def masked_image(image: np.ndarray, keep: np.ndarray | None, patch_size: int) -> np.ndarray:
  """`image` with every patch not in `keep` greyed out."""
  if keep is None:
    return image
  rows, cols = image.shape[0] // patch_size, image.shape[1] // patch_size
  kept = np.zeros(rows * cols, bool)
  kept[keep] = True
  mask = np.repeat(np.repeat(kept.reshape(rows, cols), patch_size, 0), patch_size, 1)
  return np.where(mask[..., None], image, (0.2 * image + 0.8 * 160).astype(np.uint8))


def draw(config, samples: int, draws: int, scale: int) -> np.ndarray:
  """The whole figure as one uint8 RGB array."""
  spec = masking.from_config(config.masking)
  if spec.kind == "attentive":
    raise app.UsageError("masking.kind='attentive' depends on a trained teacher; draw 'random' or "
                         "'gaussian' masks, or look at the A-CLIP tests for the selection rule.")
  grid = clip_lib.grid(config.model)
  patch = vit.parse_variant(config.model.image.variant).patch_size
  size = clip_lib.image_size_hw(config.model.image_size)
  source_config, _ = data_config_lib.mixture_components(config.data)[0]
  source = sources.source_from_config(source_config)
  keep = masking.keep_indices(jax.random.key(1), spec, samples, grid)
  panels = [heatmap(keep_probability(spec, grid, draws), size)]
  for i in range(samples):
    record = source[i]
    image = transforms.center_crop(records.image_of(record), size[0])
    panels.append(masked_image(image, None if keep is None else np.asarray(keep[i]), patch))
  gap = np.full((size[0], max(2, size[1] // 16), 3), 255, np.uint8)
  row = np.concatenate([x for panel in panels for x in (panel, gap)][:-1], axis=1)
  if size[0] < 128:
    row = np.repeat(np.repeat(row, scale, 0), scale, 1)
  return row


def main(argv):
  del argv
  jax.config.update("jax_threefry_partitionable", True)
  f = flags.FLAGS
  figure = draw(f.config, f.samples, f.draws, f.scale)
  Image.fromarray(figure).save(f.out)
  print(f"Wrote {f.out} ({figure.shape[1]}×{figure.shape[0]}).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
