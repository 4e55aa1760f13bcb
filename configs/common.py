"""Shared defaults for every recipe: one place that documents each top-level field.

Recipes (`configs/*.py`) start from `base_config()` and change what their paper changes. Every field
here can be overridden on the command line, e.g. `--config.masking.ratio=0.75`.
"""

import ml_collections

from glip_jax.data import config as data_config_lib
from glip_jax.models import clip as clip_lib


def base_config(variant: str = "B/16", image_size: int = 224) -> ml_collections.ConfigDict:
  """All fields with their defaults; recipes override what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # root of all randomness: init, masking, augmentation, data order
  c.batch_size = 1024  # global batch, split over mesh data×fsdp and over processes

  # Duration: give exactly one of total_steps / total_epochs / total_examples (converted once).
  c.total_steps = 10_000
  c.total_epochs = ml_collections.FieldReference(None, field_type=float)
  c.total_examples = ml_collections.FieldReference(None, field_type=int)

  c.model = clip_lib.model_config(variant, image_size)

  # Token selection (SPEC §1–3): kind none | random | gaussian | attentive; ratio = dropped share.
  c.masking = ml_collections.ConfigDict(dict(
      kind="none", ratio=0.0, sigma=0.2, sigma_is_variance=True, strength=1.0, gumbel=False))

  c.loss = ml_collections.ConfigDict(dict(kind="softmax"))  # softmax (CLIP) | sigmoid (SigLIP)
  c.loss.impl = "dense"  # dense | ring (shard_map ring: O(B_local²) logits memory, same values)

  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-4,  # peak learning rate (absolute, for the global batch above)
      end_lr=0.0,  # value the cosine decays to at total_steps
      warmup_steps=1000,
      b1=0.9, b2=0.98, eps=1e-6,
      weight_decay=0.2,  # not applied to biases, norms, position embeddings, cls, temperature
      grad_clip_norm=1.0,  # global-norm clipping; 0 disables
  ))
  c.optim.accum_steps = 1  # micro-batches per step; >1 caches features so the loss sees all B

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: remaining devices

  # Training data (glip_jax/data/config.py documents every field); synthetic scenes by default.
  c.data = data_config_lib.default_data_config()
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="clip",  # 'clip' (BPE, 49408 tokens) | 'sentencepiece'
      model_path="",  # the .model file for 'sentencepiece'
  ))

  # In-loop evaluation: {name: evaluator config}; see docs/evaluation.md. Empty: none.
  c.evals = ml_collections.ConfigDict()

  c.log_every_steps = 50  # metrics.jsonl / TensorBoard interval (values of that step, not means)
  c.checkpoint_every_steps = 1000  # 0: only at the end (and on SIGTERM)
  c.keep_checkpoints = 3  # newest checkpoints kept; 0 keeps all
  c.keep_checkpoints_every_steps = 0  # additionally keep every multiple of this step; 0: none

  # Start from another run's parameters (unmasked tuning, fine-tuning); ignored when resuming.
  c.init_from = ml_collections.ConfigDict(dict(
      path="",  # a workdir, its checkpoints/ directory, or one step directory
      optimizer_state=False,  # also take the optimizer state
  ))
  return c
