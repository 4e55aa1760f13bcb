"""A-CLIP (Yang et al., ICCV 2023; SPEC §4) as a method package.

  spec.py      the `config.aclip` section, its validation, the static ACLIPSpec (the bottom)
  heads.py     SimCLR MLP, BYOL projector and predictor
  geometry.py  teacher scores → online-view grids → blocks → patch indices
  step.py      state with the EMA teacher, the compiled train step
  method.py    the `Method` entry the trainer uses (config.method = 'aclip')

The SSL losses live with the other losses (glip_jax/losses.py), the cost model with the other FLOP
models (glip_jax/flops.py), the multi-view preprocessing with the data (glip_jax/data/views.py).
"""

from glip_jax.aclip.geometry import (attentive_keep_indices, block_scores, blocks_to_patches,
                                     map_scores_to_view, teacher_scores)
from glip_jax.aclip.heads import ACLIPHeads, MLPHead, build_heads
from glip_jax.aclip.spec import (HEADS_KEY, ACLIPSpec, LossWeights, block_grid, default_config,
                                 num_kept_blocks, num_kept_patches, spec_from_config)
from glip_jax.aclip.step import (ACLIPState, compile_train_step, create_train_state, ema_update,
                                 momentum_at, teacher_source, train_step)
