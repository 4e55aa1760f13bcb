"""Analytic model FLOPs (SPEC §7), for throughput, MFU and the masking speedup claim.

Per transformer block and token, forward ≈ 2·(4·D² + 2·D·M + 2·n·D) FLOPs, with n tokens,
width D and MLP width M (= 2·(12·D² + 2·n·D) for M = 4·D). A training step is 3× the forward
(forward + backward w.r.t. activations and weights). Patch embedding always runs on all N patches.
ViT-B/16 at 224 px: 35.1 GFLOPs forward; the 77-token 512-wide text tower ≈ 6.0.
"""

from collections.abc import Sequence

import ml_collections

from glip_jax.aclip import spec as aclip
from glip_jax import masking
from glip_jax.models import clip as clip_lib
from glip_jax.models import vit


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Forward FLOPs of `depth` pre-LN blocks on `tokens` tokens."""
  per_token = 2 * (4 * width * width + 2 * width * mlp_dim + 2 * tokens * width)
  return float(depth * tokens * per_token)


def image_forward_flops(model: ml_collections.ConfigDict, ratio: float = 0.0,
                        kept: int | None = None) -> float:
  """Image-tower forward FLOPs per example with `kept` patches (or a dropped fraction `ratio`)."""
  spec = vit.parse_variant(model.image.variant)
  n = clip_lib.num_patches(model)
  if kept is None:
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


def accumulation_factor(accum_steps: int) -> float:
  """FLOPs of a cached-feature accumulated step relative to the plain one: 4/3 for k > 1.

  `optim.accum_steps = k > 1` runs one extra gradient-free forward of every example (the cached
  embeddings) before the k forward+backward passes: 1 + 3 = 4 forwards' worth instead of 3.
  """
  return 1.0 if accum_steps == 1 else 4.0 / 3.0


# ----------------------------------------------------------------------------------------------
# A-CLIP (SPEC §4): a teacher forward, two masked student views and the SSL heads.

def _mlp_flops(in_dim: int, dims: Sequence[int]) -> float:
  widths = (in_dim, *dims)
  return float(sum(2 * a * b for a, b in zip(widths[:-1], widths[1:])))


def aclip_train_flops_per_example(model_config: ml_collections.ConfigDict,
                                  aclip_config: "aclip.ACLIPSpec",
                                  masking_spec: masking.MaskingSpec | None = None) -> float:
  """Training FLOPs per example: teacher forward on the full zoom-out view, two masked student
  views (fwd+bwd), text (fwd+bwd) and the heads. Patches kept per view follow `masking_spec`:
  None or kind 'attentive' → attentive blocks; otherwise the standard kernel's K (random ablation).
  The EMA update (~3 FLOPs per tracked parameter per step) is negligible per example and omitted.
  """
  spec = vit.parse_variant(model_config.image.variant)
  grid = clip_lib.grid(model_config)
  n = grid[0] * grid[1]
  if masking_spec is None or masking_spec.kind == "attentive":
    kept = aclip.num_kept_patches(grid, aclip_config)
  elif masking_spec.active:
    kept = masking.num_kept(n, masking_spec.ratio)
  else:
    kept = n
  teacher = image_forward_flops(model_config)
  student = image_forward_flops(model_config, kept=kept)
  width, proj_out = spec.width, aclip_config.projector_dims[-1]
  heads = (_mlp_flops(width, aclip_config.simclr_dims) + _mlp_flops(width, aclip_config.projector_dims)
           + _mlp_flops(proj_out, aclip_config.predictor_dims))
  teacher_projector = _mlp_flops(width, aclip_config.projector_dims)
  return (teacher + teacher_projector
          + 3.0 * (2 * student + text_forward_flops(model_config) + 2 * heads))


# ----------------------------------------------------------------------------------------------
# Throughput and MFU: measured FLOP/s against the device's peak.

# Peak dense bf16 FLOP/s per device (vendor datasheets, without sparsity),
# matched against `jax.Device.device_kind` (lower-cased) by substring, first
# match wins: more specific patterns come first.
_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
    ("tpu v2", 45e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("gh200", 989e12),
    ("h200", 989e12),
    ("h100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h800", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one device of this kind; None if unknown (CPU)."""
  kind = device_kind.lower()
  for pattern, flops in _PEAK_BF16_FLOPS:
    if pattern in kind:
      return flops
  return None


def throughput_metrics(examples: int, seconds: float,
                       flops_per_example: float | None, num_devices: int,
                       device_kind: str, accum_steps: int = 1) -> dict[str, float]:
  """examples/s (total, per device), TFLOP/s per device and MFU (if known).

  `flops_per_example` is the plain step's (forward + backward); with `accum_steps` > 1 the device
  also runs the cached-feature forward, so TFLOP/s and MFU count 4/3 of it (accumulation_factor).
  """
  per_s = examples / seconds
  out = {
      "examples_per_s": per_s,
      "examples_per_s_per_device": per_s / num_devices,
  }
  if flops_per_example is not None:
    flops_per_example *= accumulation_factor(accum_steps)
    flops_per_device = per_s * flops_per_example / num_devices
    out["tflops_per_s_per_device"] = flops_per_device / 1e12
    peak = peak_flops_per_device(device_kind)
    if peak is not None:
      out["mfu"] = flops_per_device / peak
  return out
