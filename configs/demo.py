"""Demo: a tiny CLIP with Gaussian (GLIP) masking at 50%, on the built-in synthetic dataset.

Runs on a 2-core CPU in a few minutes:

  make demo
  python -m glip_jax.main --config=configs/demo.py --workdir=runs/demo

Variants: `configs/demo.py:random` (FLIP masking), `configs/demo.py:none` (plain CLIP).
"""

import ml_collections

from configs import common


def get_config(arg: str = "gaussian") -> ml_collections.ConfigDict:
  """The demo config; `arg` picks the masking kind."""
  c = common.base_config("nano/8", image_size=32)
  c.model.text.context_length = 16  # synthetic captions are short; 77 would triple text compute
  c.batch_size = 128
  c.total_steps = 600
  c.masking.kind = arg
  c.masking.ratio = 0.0 if arg == "none" else 0.5
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.05
  return c
