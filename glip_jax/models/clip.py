"""CLIP: image tower + text tower + learnable temperature (and optional SigLIP bias)."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from glip_jax.models import layers
from glip_jax.models import text as text_lib
from glip_jax.models import vit

# Image variant → (embed_dim, text width, text heads, text depth), following open_clip's model
# configs (ViT-B-16.json, ViT-L-14.json, …); tiny sizes are ours, for tests and the CPU demo.
CLIP_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 64, 2, 2),
    "pico": (96, 96, 3, 3),
    "nano": (128, 128, 4, 4),
    "Ti": (256, 256, 4, 12),
    "S": (384, 384, 6, 12),
    "M": (512, 512, 8, 12),
    "B": (512, 512, 8, 12),
    "L": (768, 768, 12, 12),
    "H": (1024, 1024, 16, 24),
    "g": (1024, 1024, 16, 24),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
POOLS = ("cls", "avg")
POS_EMBEDDINGS = ("learned", "sincos")


def model_config(variant: str = "B/16", image_size: int | tuple[int, int] = 224) -> ml_collections.ConfigDict:
  """Default model config for a CLIP variant such as 'B/16' (both towers, open_clip sizes)."""
  vit.parse_variant(variant)  # fails early, naming the allowed variants
  embed_dim, text_width, text_heads, text_depth = CLIP_PRESETS[variant.split("/")[0]]
  return ml_collections.ConfigDict(dict(
      image_size=image_size,  # int or (height, width); must be divisible by the patch size
      embed_dim=embed_dim,  # width of the joint embedding space
      image=dict(
          variant=variant,  # '<size>/<patch>', sizes in glip_jax.models.vit.VIT_SIZES
          pool="cls",  # 'cls' (CLIP) or 'avg' (FLIP's average pooling)
          pos_embedding="learned",  # 'learned' (CLIP) or 'sincos' (FLIP, fixed 2-D)
      ),
      text=dict(
          width=text_width, depth=text_depth, heads=text_heads,
          vocab_size=49408, context_length=77,
          causal=True,  # CLIP's causal mask; FLIP's BERT-style text is non-causal
          eot_token_id=None,  # None: pool at argmax(token id), CLIP's EOT is the largest id
      ),
      dtype="float32",  # compute dtype: 'float32' | 'bfloat16' | 'float16'; params stay float32
      remat=False,  # rematerialise each transformer block (saves activation memory)
      attention_impl="einsum",  # 'einsum' | 'dot_product' (jax.nn.dot_product_attention)
      quick_gelu=False,  # OpenAI's original checkpoints use QuickGELU
      logit_scale_init=math.log(1 / 0.07),
      logit_bias_init=None,  # a float adds SigLIP's learnable bias (e.g. -10.0)
  ))


def image_size_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
  """Normalises an image size given as int or (h, w) to a (h, w) tuple."""
  if isinstance(size, int):
    return (size, size)
  h, w = size
  return (int(h), int(w))


class CLIP(nn.Module):
  """Two towers and the contrastive temperature. Embeddings are returned L2-normalised."""

  image: vit.VisionTransformer
  text: text_lib.TextTransformer
  logit_scale_init: float = math.log(1 / 0.07)
  logit_bias_init: float | None = None

  def setup(self):
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())
    if self.logit_bias_init is not None:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), ())

  def encode_image(self, images: jax.Array, keep_indices: jax.Array | None = None,
                   normalize: bool = True) -> jax.Array:
    """uint8 images [B,H,W,3] (+ optional keep_indices [B,K]) → image embeddings [B,E]."""
    emb = self.image(images, keep_indices)["embedding"]
    return l2_normalize(emb) if normalize else emb

  def encode_text(self, tokens: jax.Array, normalize: bool = True) -> jax.Array:
    """int32 tokens [B,L] → text embeddings [B,E]."""
    emb = self.text(tokens)["embedding"]
    return l2_normalize(emb) if normalize else emb

  def image_features(self, images: jax.Array, keep_indices: jax.Array | None = None,
                     return_attention: bool = False) -> dict[str, jax.Array]:
    """The image tower's raw outputs: 'embedding', 'pooled' and optionally 'attention'."""
    return self.image(images, keep_indices, return_attention)

  def __call__(self, images: jax.Array, tokens: jax.Array,
               keep_indices: jax.Array | None = None) -> dict[str, jax.Array]:
    """Both towers: normalised embeddings plus the temperature (and bias) for the loss."""
    out = {
        "image_emb": self.encode_image(images, keep_indices),
        "text_emb": self.encode_text(tokens),
        "logit_scale": self.logit_scale,
    }
    if self.logit_bias_init is not None:
      out["logit_bias"] = self.logit_bias
    return out


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ||x|| along `axis` in float32 (the one normalisation every embedding goes through)."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-12)


def build_model(config: ml_collections.ConfigDict) -> CLIP:
  """Builds the CLIP module from a `model_config()`-shaped ConfigDict, validating every field."""
  if config.dtype not in DTYPES:
    raise ValueError(f"model.dtype={config.dtype!r} is not supported; allowed: {sorted(DTYPES)}.")
  if config.image.pool not in POOLS:
    raise ValueError(f"model.image.pool={config.image.pool!r}; allowed: {list(POOLS)}.")
  if config.image.pos_embedding not in POS_EMBEDDINGS:
    raise ValueError(f"model.image.pos_embedding={config.image.pos_embedding!r}; "
                     f"allowed: {list(POS_EMBEDDINGS)}.")
  dtype = DTYPES[config.dtype]
  # Model configs saved before the field existed use the einsum path they were trained with.
  attention_impl = config.get("attention_impl", "einsum")
  layers.check_attention_impl(attention_impl)
  remat_policy = config.get("remat_policy", "none")  # configs/common.py sets the default
  layers.check_remat_policy(remat_policy)
  spec = vit.parse_variant(config.image.variant)
  image_size = image_size_hw(config.image_size)
  vit.grid_shape(image_size, spec.patch_size)  # validates divisibility
  if config.text.width % config.text.heads:
    raise ValueError(f"model.text.width={config.text.width} is not divisible by "
                     f"model.text.heads={config.text.heads}.")
  image = vit.VisionTransformer(
      spec=spec, image_size=image_size, output_dim=config.embed_dim, pool=config.image.pool,
      pos_embedding=config.image.pos_embedding, quick_gelu=config.quick_gelu,
      remat=config.remat, dtype=dtype, attention_impl=attention_impl, remat_policy=remat_policy)
  text = text_lib.TextTransformer(
      width=config.text.width, depth=config.text.depth, num_heads=config.text.heads,
      output_dim=config.embed_dim, vocab_size=config.text.vocab_size,
      context_length=config.text.context_length, causal=config.text.causal,
      eot_token_id=config.text.eot_token_id, quick_gelu=config.quick_gelu,
      remat=config.remat, dtype=dtype, attention_impl=attention_impl, remat_policy=remat_policy)
  return CLIP(image=image, text=text, logit_scale_init=config.logit_scale_init,
              logit_bias_init=config.logit_bias_init)


def num_patches(config: ml_collections.ConfigDict) -> int:
  """Number of image patches N for a model config."""
  return math.prod(grid(config))


def grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """Patch grid (rows, cols) for a model config."""
  spec = vit.parse_variant(config.image.variant)
  return vit.grid_shape(image_size_hw(config.image_size), spec.patch_size)


def dummy_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
  """Zero images and tokens of the model's input shapes (for init and shape inference)."""
  h, w = image_size_hw(config.image_size)
  return (jnp.zeros((batch_size, h, w, 3), jnp.uint8),
          jnp.zeros((batch_size, config.text.context_length), jnp.int32))
