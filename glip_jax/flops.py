"""Analytic model FLOPs (SPEC §7), for throughput, MFU and the masking speedup claim.

Per transformer block and token, forward ≈ 2·(4·D² + 2·D·M + 2·n·D) FLOPs, with n tokens,
width D and MLP width M (= 2·(12·D² + 2·n·D) for M = 4·D). A training step is 3× the forward
(forward + backward w.r.t. activations and weights). Patch embedding always runs on all N patches.
ViT-B/16 at 224 px: 35.1 GFLOPs forward; the 77-token 512-wide text tower ≈ 6.0.
"""

import ml_collections

from glip_jax import masking
from glip_jax.models import clip as clip_lib
from glip_jax.models import vit


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Forward FLOPs of `depth` pre-LN blocks on `tokens` tokens."""
  per_token = 2 * (4 * width * width + 2 * width * mlp_dim + 2 * tokens * width)
  return float(depth * tokens * per_token)


def image_forward_flops(model: ml_collections.ConfigDict, ratio: float = 0.0) -> float:
  """Image-tower forward FLOPs per example when a fraction `ratio` of patches is dropped."""
  spec = vit.parse_variant(model.image.variant)
  n = clip_lib.num_patches(model)
  kept = masking.num_kept(n, ratio) if ratio > 0 else n
  patch_embed = 2 * n * (spec.patch_size ** 2 * 3) * spec.width
  projection = 2 * spec.width * model.embed_dim
  return transformer_forward_flops(kept + 1, spec.width, spec.depth, spec.mlp_dim) + patch_embed + projection


def text_forward_flops(model: ml_collections.ConfigDict) -> float:
  """Text-tower forward FLOPs per example (full context length)."""
  t = model.text
  return (transformer_forward_flops(t.context_length, t.width, t.depth, 4 * t.width)
          + 2 * t.width * model.embed_dim)


def train_flops_per_example(model: ml_collections.ConfigDict, ratio: float = 0.0) -> float:
  """Training FLOPs per example (both towers, forward + backward ≈ 3× forward)."""
  return 3.0 * (image_forward_flops(model, ratio) + text_forward_flops(model))
