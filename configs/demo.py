"""Demo: a tiny CLIP with Gaussian (GLIP) masking at 50% on the built-in synthetic scenes.

Trains on a 2-core CPU in a few minutes, then evaluates zero-shot shape and colour classification
and image-text retrieval on the held-out test split:

  make demo
  python -m glip_jax.main --config=configs/demo.py --workdir=runs/demo

The argument picks the masking: `configs/demo.py:gaussian` (default, GLIP), `:random` (FLIP),
`:none` (plain CLIP).
"""

import ml_collections

from configs import common

KINDS = ("gaussian", "random", "none")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The demo config; `arg` picks the masking kind."""
  kind = arg or "gaussian"
  if kind not in KINDS:
    raise ValueError(f"configs/demo.py:{arg}: the argument must be one of {KINDS}.")
  c = common.base_config("nano/8", image_size=32)
  c.model.text.context_length = 16  # synthetic captions are short; 77 would triple text compute
  c.batch_size = 128
  c.total_steps = 600
  c.masking.kind = kind
  c.masking.ratio = 0.0 if kind == "none" else 0.5
  c.optim.update(lr=2e-3, warmup_steps=50, weight_decay=0.05)

  c.data.synthetic.image_size = 48  # rendered at 48 px, random-resized-cropped to 32
  c.data.read_threads = 2
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200

  test_split = dict(source="synthetic", synthetic=dict(split="test", image_size=48, eval_size=512))
  c.evals = ml_collections.ConfigDict(dict(
      shape=dict(kind="zeroshot", dataset=dict(test_split, synthetic=dict(
          test_split["synthetic"], label="shape")), classnames="synthetic:shape",
                 every_steps=200, batch_size=256),
      colour=dict(kind="zeroshot", dataset=dict(test_split, synthetic=dict(
          test_split["synthetic"], label="colour")), classnames="synthetic:colour",
                  every_steps=200, batch_size=256),
      retrieval=dict(kind="retrieval", dataset=test_split, every_steps=200, batch_size=256),
  ))
  return c
