"""A-CLIP's SSL heads: the SimCLR MLP, the BYOL projector and predictor.

BatchNorm (the authors') needs cross-replica batch statistics and mutable state under
data-parallel jit; LayerNorm normalises each example on its own, so the heads stay pure functions
of the parameters and shard like everything else.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glip_jax.aclip.spec import ACLIPSpec
from glip_jax.models import clip as clip_lib
from glip_jax.models import layers


class MLPHead(nn.Module):
  """Dense → LayerNorm → ReLU for each hidden width, then a final Dense to dims[-1]."""

  dims: tuple[int, ...]
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    for i, width in enumerate(self.dims[:-1]):
      x = nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype,
                   kernel_init=layers.dense_init((layers.EMBED if i == 0 else None, layers.MLP)),
                   bias_init=layers.zeros_init((layers.MLP,)), name=f"dense_{i}")(x)
      x = nn.LayerNorm(
          epsilon=1e-5, dtype=jnp.float32,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (layers.MLP,)),
          bias_init=layers.zeros_init((layers.MLP,)), name=f"norm_{i}")(x.astype(jnp.float32))
      x = nn.relu(x).astype(self.dtype)
    last = len(self.dims) - 1
    x = nn.Dense(self.dims[-1], use_bias=self.use_bias, dtype=self.dtype,
                 kernel_init=layers.dense_init((layers.MLP if last else layers.EMBED, None)),
                 bias_init=layers.zeros_init((None,)), name=f"dense_{last}")(x)
    return x.astype(jnp.float32)


class ACLIPHeads(nn.Module):
  """SimCLR MLP, BYOL projector and BYOL predictor on the image tower's pooled features."""

  simclr_dims: tuple[int, ...]
  projector_dims: tuple[int, ...]
  predictor_dims: tuple[int, ...]
  dtype: Any = jnp.float32

  def setup(self):
    # As the authors: a biased SimCLR MLP, bias-free BYOL projector and predictor.
    self.simclr = MLPHead(self.simclr_dims, use_bias=True, dtype=self.dtype)
    self.projector = MLPHead(self.projector_dims, use_bias=False, dtype=self.dtype)
    self.predictor = MLPHead(self.predictor_dims, use_bias=False, dtype=self.dtype)

  def __call__(self, pooled: jax.Array) -> dict[str, jax.Array]:
    """Student heads: {'simclr': [n, S], 'byol': predictor(projector(pooled)) [n, P]}."""
    return {"simclr": self.simclr(pooled), "byol": self.predictor(self.projector(pooled))}

  def project(self, pooled: jax.Array) -> jax.Array:
    """The projector alone (the teacher side, run with EMA parameters)."""
    return self.projector(pooled)


def build_heads(model: clip_lib.CLIP, spec: ACLIPSpec) -> ACLIPHeads:
  """The SSL heads for a built CLIP model (input width and compute dtype from its image tower)."""
  return ACLIPHeads(spec.simclr_dims, spec.projector_dims, spec.predictor_dims,
                    dtype=model.image.dtype)
