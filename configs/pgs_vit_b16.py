"""CLIP-PGS ViT-B/16 (Pei et al., CVPR 2025) on CC12M, the authors' clip-train.sh recipe.

  python -m glip_jax.main --config=configs/pgs_vit_b16.py:data=/data/cc12m/*.array_record \\
      --workdir=/ckpt/pgs_b16_r30

`:arg` keys: data (ArrayRecord glob; required), ratio (0.3: "PGS_0.3", or 0.5: "PGS_0.5" — the
min_mask_ratio that fixes K), epochs (32), batch (4096 = 8 GPUs × 512), as_coded (0; 1 = the
reference code's edge map from standardised patches, edges seeding masks, its OTN and the 0.5
threshold). Anchors are 5% of the patches (10 of 196); the embedding cosine is mixed in with
weight progress (the code's epoch/32); Sinkhorn OTN with 50 iterations at temperature 0.1.
See docs/masking.md for where we differ from the reference code and why.
"""

import ml_collections

from configs import clip_vit_b16
from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """CLIP-PGS on CC12M: lr 1e-3, warmup 10k, wd 0.2, AdamW(0.9, 0.98, 1e-6)."""
  args = common.parse_arg(arg, data="", ratio="0.3", epochs="32", batch="4096", as_coded="0",
                          **common.RECIPE_ARGS)
  if args["ratio"] not in ("0.3", "0.5"):
    raise ValueError(f"configs/pgs_vit_b16.py: ratio={args['ratio']!r}; the paper's are "
                     "'0.3' and '0.5'.")
  c = clip_vit_b16.recipe(args["data"], float(args["epochs"]), int(args["batch"]))
  c.masking.update(kind="pgs", ratio=float(args["ratio"]))
  c.masking.anchor_ratio = 0.05
  c.masking.embed_mix = 1.0
  c.masking.edge_weight = 1.0
  c.masking.otn = True
  c.masking.sinkhorn_iters = 50
  c.masking.temperature = 0.1
  c.masking.as_coded = bool(int(args["as_coded"]))
  # open_clip's defaults as the authors ran them: no gradient clipping (grad checkpointing is
  # a memory option here: --config.model.remat=True).
  c.optim.update(lr=1e-3, warmup_steps=10_000, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                 grad_clip_norm=0.0)
  return common.apply_recipe_args(c, args)
