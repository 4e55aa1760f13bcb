"""FLIP ViT-B/16: random masking (50% by default), FLIP's optimizer recipe.

  python -m glip_jax.main --config=configs/flip_vit_b16.py:data=/data/laion/*.array_record,ratio=0.5 \\
      --workdir=/ckpt/flip_b16_r50

`:arg` keys: data (ArrayRecord glob; required), ratio (0.5 or 0.75), epochs (6.4), batch (32768).
FLIP's base lr is 4e-6 per 256 samples, scaled linearly with the batch. Follow with
configs/unmasked_tuning.py for FLIP's short unmasked tuning stage.
"""

import ml_collections

from configs import clip_vit_b16
from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """FLIP (Li et al., CVPR 2023) with open_clip-layout towers."""
  args = common.parse_arg(arg, data="", ratio="0.5", epochs="6.4", batch="32768",
                          **common.RECIPE_ARGS)
  c = clip_vit_b16.recipe(args["data"], float(args["epochs"]), int(args["batch"]))
  c.masking.kind = "random"
  c.masking.ratio = float(args["ratio"])
  c.optim.update(lr=4e-6 * c.batch_size / 256, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.2,
                 warmup_steps=1_600)
  return common.apply_recipe_args(c, args)
