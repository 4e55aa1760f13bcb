"""Causal text transformer in the OpenAI/open_clip CLIP layout.

token_embedding + positional_embedding → transformer (causal mask) → ln_final → pool at the EOT
position → text_projection (no bias).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glip_jax.models import layers


class TextTransformer(nn.Module):
  """CLIP text tower; tokens [B, L] int32 → {'embedding': [B, E], 'pooled': [B, D]}."""

  width: int
  depth: int
  num_heads: int
  output_dim: int
  vocab_size: int = 49408
  context_length: int = 77
  causal: bool = True
  # CLIP's EOT id (49407) is the largest id, so argmax(tokens) finds it; set an explicit id for
  # tokenizers (e.g. SentencePiece) where that is not true.
  eot_token_id: int | None = None
  quick_gelu: bool = False
  remat: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = "einsum"  # layers.ATTENTION_IMPLS
  remat_policy: str = "none"  # layers.REMAT_POLICIES: what each block keeps for the backward pass

  @nn.compact
  def __call__(self, tokens: jax.Array) -> dict[str, jax.Array]:
    if tokens.shape[-1] > self.context_length:
      raise ValueError(f"text length {tokens.shape[-1]} exceeds model.text.context_length="
                       f"{self.context_length}.")
    length = tokens.shape[-1]
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.02), (layers.VOCAB, layers.EMBED)),
                     name="token_embedding")
    pos = self.param("positional_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), (None, layers.EMBED)), (self.context_length, self.width))
    x = embed(tokens) + pos[:length].astype(self.dtype)
    mask = nn.make_causal_mask(tokens, dtype=jnp.bool_) if self.causal else None
    x = layers.Transformer(self.depth, self.num_heads, 4 * self.width, self.quick_gelu,
                           self.remat, self.dtype, self.attention_impl,
                           remat_policy=self.remat_policy,
                           name="transformer")(x, mask)
    x = layers.LayerNorm(self.dtype, name="ln_final")(x)
    if self.eot_token_id is None:
      eot_pos = jnp.argmax(tokens, axis=-1)
    else:
      eot_pos = jnp.argmax(tokens == self.eot_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, eot_pos[:, None, None], axis=1)[:, 0]
    proj = self.param("text_projection", nn.with_logical_partitioning(
        nn.initializers.normal(self.width ** -0.5), (layers.EMBED, None)),
                      (self.width, self.output_dim))
    return {"pooled": pooled.astype(jnp.float32),
            "embedding": (pooled @ proj.astype(self.dtype)).astype(jnp.float32)}
