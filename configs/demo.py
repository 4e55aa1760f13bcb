"""Demo: a tiny CLIP with Gaussian (GLIP) masking at 50% on the built-in synthetic scenes.

Trains on a 2-core CPU in a few minutes, then evaluates zero-shot shape classification (unmasked
and at the training ratio) and image-text retrieval on the held-out test split. (Colour is not
evaluated: it is read off the pixels and solved by the first evaluation, so it told nothing.)

  make demo
  python -m glip_jax.main --config=configs/demo.py --workdir=runs/demo

The argument picks the masking: `configs/demo.py:gaussian` (default, GLIP), `:random` (FLIP),
`:none` (plain CLIP), `:aclip` (A-CLIP: attentive masking from an EMA teacher, two views, SimCLR and
BYOL losses; heads shrunk to demo size), `:cluster` (cluster masking), `:pgs` (CLIP-PGS), `:grid`
and `:block` (CLIPA); see docs/masking.md.
"""

import ml_collections

from configs import common
from glip_jax import aclip

KINDS = ("gaussian", "random", "none", "aclip", "cluster", "pgs", "grid", "block")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The demo config; `arg` picks the masking kind."""
  kind = arg or "gaussian"
  if kind not in KINDS:
    raise ValueError(f"configs/demo.py:{arg}: the argument must be one of {KINDS}.")
  # 32-px images in 4-px patches (an 8×8 grid) and 3-layer, 96-wide towers: small enough for
  # ~0.25 s/step on 2 CPU cores, large enough to tell the eight shapes apart.
  c = common.base_config("pico/4", image_size=32)
  c.model.update(embed_dim=96)
  c.model.text.update(width=96, heads=3, depth=3,
                      context_length=16)  # synthetic captions are short; 77 would triple the cost
  c.batch_size = 128
  c.total_steps = 800
  c.masking.kind = kind
  c.masking.ratio = 0.0 if kind == "none" else 0.5
  if kind == "grid":
    c.masking.update(ratio=0.75, window=2)  # one patch per 2×2 cell, as CLIPA
  elif kind == "cluster":
    # 2 anchors on the 8×8 grid (int(64·0.97) = 62 kept as non-anchors), pixel similarity only.
    c.masking.update(anchor_ratio=0.03, threshold=None, embed_mix=0.0)
  elif kind == "pgs":
    # PGS_0.5: 4 anchors away from edges, embedding cosine ramped in over the run.
    c.masking.update(anchor_ratio=0.05, embed_mix=1.0, edge_weight=1.0, otn=True)
  c.optim.update(lr=2e-3, warmup_steps=50, weight_decay=0.05)
  if kind == "aclip":
    c.method = "aclip"
    c.masking.kind = "attentive"  # per view, the top half of the teacher's 2×2 blocks
    c.aclip = aclip.default_config()
    c.aclip.update(simclr_dims=(256, 256, 64), projector_dims=(256, 64), predictor_dims=(256, 64),
                   ema_momentum=(0.99, 1.0))  # a short run needs a faster-moving teacher
    c.data.flip = False  # A-CLIP's views are not flipped

  c.data.synthetic.update(image_size=32, center_bias=0.7, max_distractors=1)
  c.data.crop_scale = (0.8, 1.0)  # keep most of the main object in the crop
  c.data.read_threads = 2
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200

  def test_split(label: str) -> dict:
    # The held-out split, rendered like the training data; `label` is what zero-shot predicts.
    return dict(source="synthetic", synthetic=dict(
        split="test", label=label, eval_size=512, image_size=32, center_bias=0.7,
        max_distractors=1))

  c.evals = ml_collections.ConfigDict(dict(
      shape=dict(kind="zeroshot", dataset=test_split("shape"), classnames="synthetic:shape",
                 every_steps=200, batch_size=256),
      retrieval=dict(kind="retrieval", dataset=test_split("shape"), every_steps=200,
                     batch_size=256),
  ))
  if kind in ("gaussian", "random", "cluster", "pgs", "grid", "block"):
    # The same task with the training masking: the "masked inference" column of the FLIP/GLIP
    # tables (evaluation is unmasked by default).
    c.evals.shape_masked = dict(kind="zeroshot", dataset=test_split("shape"),
                                classnames="synthetic:shape", masking="train", every_steps=200,
                                batch_size=256)
  return c
