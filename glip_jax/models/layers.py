"""Transformer building blocks shared by the image and text towers (OpenAI/open_clip CLIP layout).

Parameter names follow open_clip's `ResidualAttentionBlock` (ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj)
so that importing OpenAI/open_clip weights is a name mapping. Every parameter carries logical axis
names (`nn.with_logical_partitioning`) that `glip_jax.sharding` maps onto the device mesh.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical axis names used by parameters; `glip_jax.sharding.LOGICAL_RULES` maps them to mesh axes.
EMBED, MLP, HEADS, HEAD_DIM, VOCAB = "embed", "mlp", "heads", "head_dim", "vocab"
# 'einsum': our own softmax(QKᵀ)V with float32 logits. 'dot_product': jax.nn.dot_product_attention,
# which XLA lowers as it likes on CPU/TPU and which runs cuDNN's flash attention on GPUs when the
# shapes and dtype allow (implementation=None picks it).
ATTENTION_IMPLS = ("einsum", "dot_product")
# What a rematerialised block keeps for the backward pass (`model.remat_policy`), per block:
#   'none'          no rematerialisation: every residual the backward pass reads stays alive
#                   (with float32 attention probabilities [B, heads, T, T] per layer: they
#                   dominate the unmasked step's memory at ViT-B/16 scale);
#   'full'          only the block's input (jax.checkpoint's default; what model.remat=True did);
#   'dots_no_batch' the outputs of the weight matmuls (qkv, out_proj, c_fc, c_proj); the
#                   attention logits/probabilities, GELU and layer norms are recomputed, so what is
#                   saved per layer is O(tokens × width), proportional to the kept tokens.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_attention_impl(impl: str) -> None:
  """Raises ValueError unless `impl` is an attention implementation."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl={impl!r} is not an attention implementation; "
                     f"allowed: {list(ATTENTION_IMPLS)}.")


def check_remat_policy(policy: str) -> None:
  """Raises ValueError unless `policy` is a rematerialisation policy name."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy={policy!r} is not a rematerialisation policy; "
                     f"allowed: {list(REMAT_POLICIES)}.")


def resolve_remat(remat: bool, policy: str) -> str:
  """The policy a tower runs: `policy`, or 'full' for the older `model.remat=True` alone."""
  check_remat_policy(policy)
  return "full" if policy == "none" and remat else policy


def dense_init(axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
  """Xavier-uniform kernel initialiser annotated with logical axes."""
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def zeros_init(axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
  """Zeros initialiser annotated with logical axes (biases)."""
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (as open_clip's LayerNorm does for fp16/bf16 inputs)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.LayerNorm(
        epsilon=1e-5,
        dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (EMBED,)),
        bias_init=zeros_init((EMBED,)),
        name="norm",
    )(x.astype(jnp.float32))
    return y.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention that can also return the first query's attention row.

  A-CLIP's teacher needs the [CLS] (first token) attention to every token. Only that row is
  returned — [B, heads, T], not [B, heads, T, T] — so a teacher forward keeps no more memory alive
  than a plain one, and returning it is opt-in.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, return_weights: bool = False):
    check_attention_impl(self.attention_impl)
    width = x.shape[-1]
    head_dim = width // self.num_heads
    qkv = nn.DenseGeneral(
        (3, self.num_heads, head_dim),
        dtype=self.dtype,
        kernel_init=dense_init((EMBED, None, HEADS, HEAD_DIM)),
        bias_init=zeros_init((None, HEADS, HEAD_DIM)),
        name="in_proj",
    )(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.attention_impl == "dot_product":
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
      # The fused kernel returns no weights: A-CLIP's [CLS] row is one extra [B, heads, 1, T] row.
      weights = _attention_weights(q[:, :1], k, None if mask is None else mask[:, :, :1])
    else:
      # Probabilities in the compute dtype: the softmax runs in float32, but what the PV matmul
      # reads and what its backward keeps is [B, heads, T, T] in bf16 at half the bytes.
      # (A-CLIP's teacher reads float32 weights: they stay float32 when returned.)
      weights = _attention_weights(q, k, mask,
                                   out_dtype=jnp.float32 if return_weights else self.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
    out = nn.DenseGeneral(
        width,
        axis=(-2, -1),
        dtype=self.dtype,
        kernel_init=dense_init((HEADS, HEAD_DIM, EMBED)),
        bias_init=zeros_init((EMBED,)),
        name="out_proj",
    )(out)
    return (out, weights[:, :, 0]) if return_weights else out


def _attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None,
                       out_dtype: Dtype = jnp.float32) -> jax.Array:
  """softmax(q·kᵀ/√d) computed in float32, [B, heads, Q, K] in `out_dtype`; masked keys get 0."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  if jnp.dtype(out_dtype) == jnp.float32:
    return jax.nn.softmax(logits, axis=-1)
  return softmax_lowp(logits, jnp.dtype(out_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_lowp(logits: jax.Array, dtype: Any) -> jax.Array:
  """softmax over the last axis in float32 (max, exp and sum), returned — and saved — in `dtype`.

  Autodiff of a float32 softmax followed by a cast keeps the float32 probabilities for the
  backward pass; this keeps the `dtype` ones, and the backward pass
  dx = p·(g − Σ g·p) runs in float32 from them.
  """
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_lowp_fwd(logits, dtype):
  probs = softmax_lowp(logits, dtype)
  return probs, (probs, jnp.zeros((), logits.dtype))


def _softmax_lowp_bwd(dtype, residuals, g):
  del dtype
  probs, like = residuals
  p, g = probs.astype(jnp.float32), g.astype(jnp.float32)
  grad = p * (g - jnp.sum(g * p, axis=-1, keepdims=True))
  return (grad.astype(like.dtype),)


softmax_lowp.defvjp(_softmax_lowp_fwd, _softmax_lowp_bwd)


class MlpBlock(nn.Module):
  """Transformer MLP: c_fc → GELU (or OpenAI's QuickGELU) → c_proj."""

  mlp_dim: int
  quick_gelu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init((EMBED, MLP)),
                 bias_init=zeros_init((MLP,)), name="c_fc")(x)
    h = h * jax.nn.sigmoid(1.702 * h) if self.quick_gelu else nn.gelu(h, approximate=False)
    return nn.Dense(width, dtype=self.dtype, kernel_init=dense_init((MLP, EMBED)),
                    bias_init=zeros_init((EMBED,)), name="c_proj")(h)


class ResidualBlock(nn.Module):
  """Pre-LN residual block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

  num_heads: int
  mlp_dim: int
  quick_gelu: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, return_weights: bool = False):
    attn = Attention(self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl,
                     name="attn")
    y = attn(LayerNorm(self.dtype, name="ln_1")(x), mask, return_weights)
    y, weights = y if return_weights else (y, None)
    x = x + y
    x = x + MlpBlock(self.mlp_dim, self.quick_gelu, self.dtype, name="mlp")(
        LayerNorm(self.dtype, name="ln_2")(x))
    return (x, weights) if return_weights else x


class Transformer(nn.Module):
  """A stack of residual blocks, optionally rematerialised per block to save activation memory."""

  depth: int
  num_heads: int
  mlp_dim: int
  quick_gelu: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"
  remat_policy: str = "none"  # REMAT_POLICIES; 'none' with remat=True means 'full'

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, return_weights: bool = False):
    block_cls = ResidualBlock
    policy = resolve_remat(self.remat, self.remat_policy)
    if policy != "none":
      # Per block: the backward pass of block i recomputes what the policy did not save while
      # only block i's recomputed intermediates are alive.
      block_cls = nn.remat(ResidualBlock, static_argnums=(3,), policy=REMAT_POLICIES[policy])
    all_weights = []
    for i in range(self.depth):
      out = block_cls(self.num_heads, self.mlp_dim, self.quick_gelu, self.dtype,
                      self.attention_impl, name=f"resblocks_{i}")(x, mask, return_weights)
      if return_weights:
        x, weights = out
        all_weights.append(weights)
      else:
        x = out
    if return_weights:
      return x, jnp.stack(all_weights, axis=1)  # [B, depth, heads, T]: the first token's row
    return x
