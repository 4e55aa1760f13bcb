"""Unmasked tuning: continue a masked run with all patches, a small lr and a short schedule.

  python -m glip_jax.main --config=configs/unmasked_tuning.py:init=/ckpt/glip_b16_r50,data=/data/cc12m/*.array_record \\
      --workdir=/ckpt/glip_b16_r50_tuned

`:arg` keys: init (workdir or checkpoint of the masked run; required), data (ArrayRecord glob),
epochs (1) or steps, batch (640), lr (1e-5), base (the recipe module of the masked run:
glip_vit_b16), image_size (tune at this size when the masked run trained at a lower one, CLIPA's
resolution reduction: its learned position embeddings are resampled bicubically). Parameters come from `init`; the optimizer state and step count start fresh.
For the demo: `configs/unmasked_tuning.py:init=runs/demo,base=demo,steps=100,batch=128,lr=1e-4`.
"""

import importlib

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The masked run's config with masking off, lr 1e-5 and one epoch (GLIP/FLIP tuning)."""
  args = common.parse_arg(arg, init="", data="", epochs="1", steps="", batch="640",
                          lr="1e-5", base="glip_vit_b16", image_size="")
  base = importlib.import_module(f"configs.{args['base']}")
  c = base.get_config(f"data={args['data']}" if args["data"] else "")
  c.init_from.path = args["init"]
  c.masking.kind, c.masking.ratio = "none", 0.0
  if args["image_size"]:
    # CLIPA's resolution lever: the masked run trained at a lower --config.model.image_size; the
    # tuning runs at full size, its position embeddings resampled on load.
    c.model.image_size = int(args["image_size"])
  c.batch_size = int(args["batch"])
  if args["steps"]:
    c.total_steps = int(args["steps"])
  else:
    c.total_epochs = float(args["epochs"])
  c.optim.update(lr=float(args["lr"]), warmup_steps=min(c.optim.warmup_steps, 500), end_lr=0.0)
  return c
