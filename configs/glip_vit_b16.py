"""GLIP ViT-B/16: Gaussian (centred) masking, the authors' CC12M recipe (open_clip defaults).

  python -m glip_jax.main --config=configs/glip_vit_b16.py:data=/data/cc12m/*.array_record,ratio=0.5 \\
      --workdir=/ckpt/glip_b16_r50

`:arg` keys: data (ArrayRecord glob; required), ratio (0.5, 0.75 or 0.918), epochs (30), batch
(1280). Masking parameters are the authors' (sigma=0.2 read as a variance, strength 1); override
e.g. --config.masking.sigma_is_variance=False. At ratio 0.918 the periphery is never seen: follow
with configs/unmasked_tuning.py (1 epoch, lr 1e-5, batch 640).
"""

import ml_collections

from configs import clip_vit_b16
from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """GLIP (Liang & Larson, 2024) on CC12M."""
  args = common.parse_arg(arg, data="", ratio="0.5", epochs="30", batch="1280",
                          **common.RECIPE_ARGS)
  c = clip_vit_b16.recipe(args["data"], float(args["epochs"]), int(args["batch"]))
  c.masking.update(kind="gaussian", ratio=float(args["ratio"]), sigma=0.2, sigma_is_variance=True,
                   strength=1.0, gumbel=False)
  return common.apply_recipe_args(c, args)
