"""The selection kernel's two halves shared by every kind: its inputs and the shard-local top-K."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SelectionInputs:
  """What a score function may read besides its key; kinds that need a field check it is set.

  images: uint8 [B,H,W,3], the step's input batch (cluster, pgs).
  progress: training progress step/total_steps in [0, 1], a traced scalar (embedding-mix ramp).
  image_params: the image tower's parameters, read for conv1's kernel and the position embedding
    (the embedding mix of cluster / pgs); never differentiated.
  scores: float [B,N] teacher attention, the prior of kind 'attentive'.
  """

  batch_size: int
  images: jax.Array | None = None
  progress: jax.Array | float = 0.0
  image_params: Any = None
  scores: jax.Array | None = None


def constrain(x: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """`x` laid out as `sharding` (batch-sharded); the identity without one."""
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def replicated(sharding: jax.sharding.Sharding | None) -> jax.sharding.Sharding | None:
  """The fully replicated sharding on the mesh of `sharding` (None without a NamedSharding)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return None


def select_top_k(score: jax.Array, k: int,
                 sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """Indices of the k highest scores of each row, int32 [B, k] sorted ascending.

  `score` is float [B, N], higher = keep. With a NamedSharding (the batch sharding of `score`),
  the selection runs shard-locally: no cross-device communication.
  """
  select = functools.partial(_top_k_sorted, k=k)
  if isinstance(sharding, jax.sharding.NamedSharding):
    # XLA's TopK is not partitioned along the batch: the SPMD partitioner would all-gather the
    # scores. Selection is per image, so run it shard-locally.
    select = jax.shard_map(select, mesh=sharding.mesh, in_specs=sharding.spec,
                           out_specs=sharding.spec)
  return select(constrain(score, sharding))


def _top_k_sorted(score: jax.Array, k: int) -> jax.Array:
  _, indices = jax.lax.top_k(score, k)
  # Ascending order keeps the gather's memory access monotone; the order itself is irrelevant to
  # the transformer because position embeddings travel with the tokens.
  return jnp.sort(indices, axis=-1).astype(jnp.int32)
