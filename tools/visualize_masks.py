r"""Draws what a masking config keeps: the keep-probability map and masked example images.

  python tools/visualize_masks.py --config=configs/demo.py --out=masks.png
  python tools/visualize_masks.py --config=configs/glip_vit_b16.py:data=x --config.masking.ratio=0.75 \
      --out=glip75.png

The first panel is the probability that each patch is kept (estimated from `--draws` draws of the
same in-graph kernel the train step uses; printed on each patch for grids up to 16×16, with a
colour bar); the others are training images with the dropped patches solid dark with a grid.
Kinds that select from the image itself get the example images. Attentive masking depends on a
trained teacher and is not drawn here (notebooks/quickstart.ipynb draws it from given scores).
The logic is `glip_jax.visualize` (needs the `plot` extra: pip install 'glip_jax[plot]').
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from glip_jax import masking
from glip_jax import visualize
from glip_jax.models import vit


def define_flags() -> None:
  """The command-line flags (defined only when run as a script, so tests can import the module)."""
  config_flags.DEFINE_config_file("config", "configs/demo.py", "Config whose masking to draw.")
  flags.DEFINE_string("out", "masks.png", "PNG file to write.")
  flags.DEFINE_integer("samples", 6, "Masked example images to draw.")
  flags.DEFINE_integer("draws", 2000, "Draws used to estimate the keep probabilities.")
  flags.DEFINE_integer("scale", 4, "Pixels per image pixel in the masked examples.")


def draw(config, samples: int, draws: int, scale: int):
  """The figure and keep-probability map for `config.masking` (see the module docstring)."""
  spec = masking.from_config(config.masking)
  if spec.kind == "attentive":
    raise app.UsageError("masking.kind='attentive' depends on a trained teacher's attention; draw "
                         "another kind, or pass scores to glip_jax.visualize.masks_figure.")
  patch = vit.parse_variant(config.model.image.variant).patch_size
  images = visualize.example_images(config, samples)
  fig, (probability,) = visualize.masks_figure([spec], images, patch, draws=draws, scale=scale)
  return fig, probability


def main(argv):
  del argv
  jax.config.update("jax_threefry_partitionable", True)
  f = flags.FLAGS
  fig, _ = draw(f.config, f.samples, f.draws, f.scale)
  fig.savefig(f.out, dpi=120)
  width, height = (fig.get_size_inches() * 120).astype(int)
  print(f"Wrote {f.out} ({width}×{height}).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
