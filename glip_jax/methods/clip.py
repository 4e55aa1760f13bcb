"""CLIP and its masked variants (FLIP, GLIP, …): one contrastive loss over (image, text) pairs.

Which patches the image tower sees is the masking kind's business (glip_jax/masking.py); the
method itself has no config section of its own.
"""

from typing import Any

import ml_collections

from glip_jax import flops
from glip_jax import masking
from glip_jax import train_step as train_step_lib
from glip_jax.methods.base import Method

# Kinds whose scores need something only another method computes (A-CLIP's teacher attention).
_FOREIGN_KINDS = {"attentive": "aclip"}


def validate(config: ml_collections.ConfigDict, total_steps: int) -> None:
  """The masking kind must be one this method computes itself; there is no section to check."""
  del total_steps
  kind = config.masking.kind
  if kind in _FOREIGN_KINDS:
    raise ValueError(f"masking.kind={kind!r} needs the A-CLIP step: config.method="
                     f"{_FOREIGN_KINDS[kind]!r} with its config.aclip section (its scores come from "
                     f"that method's teacher); start from configs/aclip_vit_b16.py or "
                     f"configs/demo.py:aclip.")


def create_train_state(model, tx, model_config, mesh, seed, spec: Any):
  """The plain TrainState (parameters + optimizer state)."""
  del spec
  return train_step_lib.create_train_state(model, tx, model_config, mesh, seed)


def compile_train_step(model, tx, schedule, step_spec, mesh, state_shardings, spec: Any):
  """The jitted, sharded contrastive train step."""
  del spec
  return train_step_lib.compile_train_step(model, tx, schedule, step_spec, mesh, state_shardings)


def flops_per_example(model_config: ml_collections.ConfigDict, spec: Any,
                      masking_spec: masking.MaskingSpec) -> float:
  """Both towers, forward + backward, with the masking's kept patches."""
  del spec
  return flops.train_flops_per_example(model_config,
                                       masking_spec.ratio if masking_spec.active else 0.0)


METHOD = Method(
    name="clip",
    validate=validate,
    batch_keys=("image", "text"),
    make_preprocess=lambda spec, data, image_size, tokenizer: None,
    create_train_state=create_train_state,
    compile_train_step=compile_train_step,
    flops_per_example=flops_per_example,
)
