"""A-CLIP as a `Method`: its config section, views, state with the EMA teacher, step and cost."""

from typing import Any

import ml_collections
import numpy as np

from glip_jax import flops
from glip_jax.aclip import spec as spec_lib
from glip_jax.aclip import step as step_lib
from glip_jax.data import views
from glip_jax.methods.base import Method

# The kinds the A-CLIP step can select with: its teacher's attention, or the paper's random 2×50%
# ablation (and none/gaussian for studies), each applied per online view.
MASKING_KINDS = ("attentive", "random", "gaussian", "none")


def validate(config: ml_collections.ConfigDict, total_steps: int) -> spec_lib.ACLIPSpec:
  """Checks `config.aclip` (required) and the masking kind; returns the static spec."""
  try:
    section = config.aclip
  except AttributeError:
    raise ValueError("config.method='aclip' needs the config.aclip section (teacher, views, "
                     "losses); start from configs/aclip_vit_b16.py or configs/demo.py:aclip.") from None
  if config.masking.kind not in MASKING_KINDS:
    raise ValueError(f"masking.kind={config.masking.kind!r} with config.method='aclip'; allowed: "
                     f"{list(MASKING_KINDS)}.")
  if config.optim.accum_steps > 1:
    raise ValueError(f"optim.accum_steps={config.optim.accum_steps} is not supported with "
                     "config.method='aclip': its step computes the teacher's attentive masks and "
                     "the SimCLR/BYOL losses over the whole batch in one pass; use accum_steps=1.")
  if config.loss.impl != "dense":
    raise ValueError(f"loss.impl={config.loss.impl!r} is not supported with config.method="
                     "'aclip': its step uses the dense loss; use loss.impl='dense'.")
  return spec_lib.spec_from_config(section, total_steps)


def make_preprocess(spec: spec_lib.ACLIPSpec, data: ml_collections.ConfigDict, image_size: int,
                    tokenizer: Any) -> views.ACLIPPreprocess:
  """Two online views and a zoom-out teacher view per example, with their crop boxes."""
  del spec
  return views.ACLIPPreprocess(image_size, tokenizer, data.crop_scale, data.crop_ratio)


def example_batch(spec: spec_lib.ACLIPSpec, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """All three views equal to `image`, every box the whole image."""
  del spec
  full = np.tile(np.array([0, 0, 1, 1], np.float32), (batch["image"].shape[0], 1))
  return {**batch, "image2": batch["image"], "teacher_image": batch["image"], "box1": full,
          "box2": full, "teacher_box": full}


METHOD = Method(
    name="aclip",
    validate=validate,
    batch_keys=views.BATCH_KEYS,
    make_preprocess=make_preprocess,
    create_train_state=step_lib.create_train_state,
    compile_train_step=step_lib.compile_train_step,
    flops_per_example=lambda model_config, spec, masking_spec: (
        flops.aclip_train_flops_per_example(model_config, spec, masking_spec)),
    example_batch=example_batch,
    # The teacher is the EMA of the student: after an import it starts from the imported weights.
    on_params_replaced=lambda state: state.replace(
        ema_params=step_lib.teacher_source(state.params)),
)
