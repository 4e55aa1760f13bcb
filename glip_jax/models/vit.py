"""Vision Transformer image tower in the OpenAI/open_clip CLIP layout, with token dropping.

Layout: conv1 (patch embedding, no bias) → + positional_embedding → drop patches (keep_indices)
→ prepend class_embedding → ln_pre → transformer → ln_post on the pooled token → proj (no bias).

The position embedding is added to every patch *before* dropping, so a kept token keeps its 2-D
position and nothing has to be re-indexed (SPEC §1).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glip_jax.models import layers

# name → (width, depth, mlp_dim, heads). Standard sizes as in big_vision / open_clip, plus tiny
# sizes ("mu", "pico", "nano") used by tests and the CPU demo.
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 2, 256, 2),
    "pico": (96, 3, 384, 3),
    "nano": (128, 4, 512, 4),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
}

# OpenAI / CLIP normalisation constants; images enter the model as uint8 and are normalised here.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """Architecture of a ViT tower, decoded from a variant name such as 'B/16'."""

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int


def parse_variant(variant: str) -> ViTSpec:
  """Decodes 'B/16' into a ViTSpec; raises ValueError naming the allowed sizes."""
  size, _, patch = variant.partition("/")
  if size not in VIT_SIZES or not patch.isdigit():
    raise ValueError(
        f"model.image.variant={variant!r} is not a ViT variant; expected '<size>/<patch>' with size "
        f"in {sorted(VIT_SIZES)} and an integer patch size, e.g. 'B/16'.")
  width, depth, mlp_dim, heads = VIT_SIZES[size]
  return ViTSpec(width, depth, mlp_dim, heads, int(patch))


def grid_shape(image_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
  """Patch grid (rows, cols) of an image; raises ValueError if the size is not divisible."""
  h, w = image_size
  if h % patch_size or w % patch_size:
    raise ValueError(
        f"model.image_size={image_size} is not divisible by the patch size {patch_size}; "
        f"use a multiple of {patch_size} on each side.")
  return h // patch_size, w // patch_size


def sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [rows*cols, width] (MAE/FLIP style)."""
  rows, cols = grid
  y, x = np.mgrid[:rows, :cols]
  if width % 4:
    raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {width}.")
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def normalize_images(images: jax.Array, dtype: Any) -> jax.Array:
  """uint8 [B,H,W,3] → CLIP-normalised float images in `dtype`."""
  mean = jnp.asarray(CLIP_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(CLIP_STD, jnp.float32) * 255.0
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


class VisionTransformer(nn.Module):
  """CLIP image tower. `keep_indices` [B, K] selects which patch tokens enter the transformer."""

  spec: ViTSpec
  image_size: tuple[int, int]
  output_dim: int
  pool: str = "cls"  # "cls" | "avg"
  pos_embedding: str = "learned"  # "learned" | "sincos"
  quick_gelu: bool = False
  remat: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = "einsum"  # layers.ATTENTION_IMPLS
  remat_policy: str = "none"  # layers.REMAT_POLICIES: what each block keeps for the backward pass

  @property
  def grid(self) -> tuple[int, int]:
    return grid_shape(self.image_size, self.spec.patch_size)

  @nn.compact
  def __call__(self, images: jax.Array, keep_indices: jax.Array | None = None,
               return_attention: bool = False) -> dict[str, jax.Array]:
    """Returns {'embedding': [B,E] (unnormalised), 'pooled': [B,D]} (+ 'attention')."""
    spec = self.spec
    x = normalize_images(images, self.dtype)
    x = nn.Conv(spec.width, (spec.patch_size,) * 2, strides=(spec.patch_size,) * 2,
                padding="VALID", use_bias=False, dtype=self.dtype,
                kernel_init=layers.dense_init((None, None, None, layers.EMBED)), name="conv1")(x)
    b = x.shape[0]
    x = x.reshape(b, -1, spec.width)
    num_patches = x.shape[1]

    scale = spec.width ** -0.5
    if self.pos_embedding == "learned":
      pos = self.param("positional_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(scale), (None, layers.EMBED)), (num_patches + 1, spec.width))
    else:
      pos = jnp.concatenate([jnp.zeros((1, spec.width)), jnp.asarray(sincos_2d(self.grid, spec.width))])
    cls = self.param("class_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(scale), (layers.EMBED,)), (spec.width,))

    x = x + pos[1:].astype(self.dtype)
    if keep_indices is not None:
      # A per-example gather along the token axis; batch stays the leading (sharded) axis, so no
      # cross-device communication is needed.
      x = jnp.take_along_axis(x, keep_indices[:, :, None], axis=1)
    cls_token = jnp.broadcast_to((cls + pos[0]).astype(self.dtype), (b, 1, spec.width))
    x = jnp.concatenate([cls_token, x], axis=1)
    x = layers.LayerNorm(self.dtype, name="ln_pre")(x)
    transformer = layers.Transformer(spec.depth, spec.num_heads, spec.mlp_dim, self.quick_gelu,
                                     self.remat, self.dtype, self.attention_impl,
                                     remat_policy=self.remat_policy,
                                     name="transformer")
    out: dict[str, jax.Array] = {}
    if return_attention:
      x, weights = transformer(x, return_weights=True)
      out["attention"] = weights  # [CLS]→token attention, [B, depth, heads, 1+K]
    else:
      x = transformer(x)

    pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(axis=1)
    pooled = layers.LayerNorm(self.dtype, name="ln_post")(pooled)
    proj = self.param("proj", nn.with_logical_partitioning(
        nn.initializers.normal(scale), (layers.EMBED, None)), (spec.width, self.output_dim))
    out["pooled"] = pooled.astype(jnp.float32)
    out["embedding"] = (pooled @ proj.astype(self.dtype)).astype(jnp.float32)
    return out
