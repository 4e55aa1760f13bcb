"""CLIP ViT-B/16 baseline (no masking) on image-text ArrayRecord shards, open_clip recipe.

  python -m glip_jax.main --config=configs/clip_vit_b16.py:data=/data/cc12m/train-*.arrayrecord \\
      --workdir=/ckpt/clip_b16

`:arg` is a comma-separated list of key=value: data (ArrayRecord glob; required), epochs (30),
batch (1280). Everything else can be overridden with --config.<field>=<value>.
"""

import ml_collections

from configs import common


def parse_arg(arg: str, **defaults) -> dict[str, str]:
  """'data=/x,epochs=30' → {'data': '/x', 'epochs': '30', ...} over `defaults`."""
  values = dict(defaults)
  for item in filter(None, arg.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(defaults)}.")
    values[key] = value
  return values


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """GLIP's CC12M baseline recipe (open_clip defaults), unmasked."""
  args = parse_arg(arg, data="", epochs="30", batch="1280", ratio="0.0", kind="none")
  c = common.base_config("B/16", 224)
  c.model.dtype = "bfloat16"
  c.batch_size = int(args["batch"])
  c.total_epochs = float(args["epochs"])
  c.masking.kind = args["kind"]
  c.masking.ratio = float(args["ratio"])
  c.optim.update(lr=1e-3, end_lr=0.0, warmup_steps=10_000, b1=0.9, b2=0.98, eps=1e-6,
                 weight_decay=0.2, grad_clip_norm=1.0)
  c.data.source = "arrayrecord"
  c.data.paths = args["data"]
  c.data.crop_scale = (0.5, 1.0)
  c.data.worker_count = 8
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints_every_steps = 20_000
  return c
