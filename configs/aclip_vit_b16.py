"""A-CLIP ViT-B/16: attentive masking with an EMA teacher and SSL losses, the paper's YFCC-15M recipe.

  python -m glip_jax.main --config=configs/aclip_vit_b16.py:data=/data/yfcc15m/*.array_record \\
      --workdir=/ckpt/aclip_b16

`:arg` keys: data (ArrayRecord glob; required), ablation ('none' = full A-CLIP, or 'random' = the
paper's "random 2×50%" row: same views and losses, FLIP-style random masking of each view),
epochs (25), batch (4096), epoch_size (examples per epoch, used for the 1-epoch warmup; default
15,000,000 ≈ YFCC-15M — give your dataset's size). Per view, 100 of 196 patches are kept: the top
25 of 49 2×2 blocks of the teacher's [CLS] attention. A-CLIP fields live in `config.aclip`
(glip_jax/aclip.py:default_config); override e.g. --config.aclip.weights.byol=0.
"""

import math

import ml_collections

from configs import common
from glip_jax import aclip

ABLATIONS = ("none", "random")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """A-CLIP (Yang et al., ICCV 2023) on YFCC-15M."""
  args = common.parse_arg(arg, data="", ablation="none", epochs="25", batch="4096",
                          epoch_size="15000000", **common.RECIPE_ARGS)
  if args["ablation"] not in ABLATIONS:
    raise ValueError(f"config argument ablation={args['ablation']!r}; allowed: {list(ABLATIONS)}.")
  c = common.base_config("B/16", 224)
  c.model.dtype = "bfloat16"
  c.batch_size = int(args["batch"])
  c.total_epochs = float(args["epochs"])
  c.method = "aclip"
  c.aclip = aclip.default_config()
  if args["ablation"] == "random":
    c.masking.update(kind="random", ratio=0.5)
  else:
    # Kept blocks come from aclip.keep_blocks_fraction; the ratio only records the dropped share.
    c.masking.update(kind="attentive", ratio=0.5)
  c.optim.update(lr=5e-4, end_lr=1e-5, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.5,
                 warmup_steps=math.ceil(int(args["epoch_size"]) / c.batch_size))  # 1 epoch
  c.data.source = "arrayrecord"
  c.data.paths = args["data"]
  c.data.crop_scale = (0.5, 1.0)
  c.data.flip = False  # A-CLIP views are never flipped (views.py ignores it anyway)
  c.data.worker_count = 8
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints_every_steps = 20_000
  c = common.apply_recipe_args(c, args)
  if args["runlocal"] not in ("", "0"):
    # The paper's SSL heads (4096-wide MLPs) would dwarf the shrunk towers.
    c.aclip.update(simclr_dims=(128, 128, 32), projector_dims=(128, 32), predictor_dims=(128, 32))
  return c
