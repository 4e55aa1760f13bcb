"""CLIP ViT-B/16 baseline (no masking) on image-text ArrayRecord shards, open_clip recipe.

  python -m glip_jax.main --config=configs/clip_vit_b16.py:data=/data/cc12m/train-*.array_record \\
      --workdir=/ckpt/clip_b16

`:arg` is a comma-separated list of key=value: data (ArrayRecord glob; required), epochs (30),
batch (1280), and the keys every B/16 recipe shares (configs/common.py:apply_recipe_args):
imagenet=TFDS_DIR and coco=DIR / flickr=DIR switch on the standard evaluations; runlocal=1 shrinks
the run to a one-minute CPU smoke test of your data. The defaults assume an accelerator (bfloat16,
worker_count=8, warmup_steps=10000). Everything else: --config.<field>=<value>.
"""

import ml_collections

from configs import common


def recipe(data: str, epochs: float, batch: int) -> ml_collections.ConfigDict:
  """The unmasked CC12M recipe the FLIP and GLIP recipes start from."""
  c = common.base_config("B/16", 224)
  c.model.dtype = "bfloat16"
  c.batch_size = batch
  c.total_epochs = epochs
  c.optim.update(lr=1e-3, end_lr=0.0, warmup_steps=10_000, b1=0.9, b2=0.98, eps=1e-6,
                 weight_decay=0.2, grad_clip_norm=1.0)
  c.data.source = "arrayrecord"
  c.data.paths = data
  c.data.crop_scale = (0.5, 1.0)
  c.data.worker_count = 8
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints_every_steps = 20_000
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """GLIP's CC12M baseline recipe (open_clip defaults), unmasked."""
  args = common.parse_arg(arg, data="", epochs="30", batch="1280", ratio="0.0", kind="none",
                          **common.RECIPE_ARGS)
  c = recipe(args["data"], float(args["epochs"]), int(args["batch"]))
  c.masking.kind = args["kind"]
  c.masking.ratio = float(args["ratio"])
  return common.apply_recipe_args(c, args)
