"""Token selection: which image patches enter the transformer (SPEC §1–3, SPEC_SELECTION.md).

One kernel serves every strategy, in two parts: a per-kind score function gives every patch a
float32 keep score [B, N] (higher = keep), then `select_top_k` keeps the K highest per image,
shard-locally. K = max(1, floor(N·(1−ratio))) is static, so shapes stay static under `jit`;
everything runs on device inside the compiled step, from a key derived from (seed, step).

  none       K = N, no gather at all
  random     U(0,1)                                                        (FLIP)
  gaussian   U(0,1) + strength · 2-D Gaussian density of the patch centre  (GLIP)
  attentive  teacher attention scores given by the caller, no noise        (A-CLIP)
  cluster    −max cosine to A random anchors of standardised pixels         (Wei et al. 2024)
  pgs        edge-protected, OT-normalised cluster similarity               (CLIP-PGS, 2025)
  grid       one patch per window×window cell, random offset per image     (CLIPA)
  block      one random rectangle of K patches                             (CLIPA)

docs/masking.md compares them and lists where we differ from the reference code.
"""

from collections.abc import Callable

import jax

from glip_jax.masking import basic
from glip_jax.masking import clipa
from glip_jax.masking import similarity
from glip_jax.masking.basic import gaussian_prior
from glip_jax.masking.core import SelectionInputs, select_top_k
from glip_jax.masking.similarity import calibrate_threshold
from glip_jax.masking.spec import KINDS, MaskingSpec, from_config, num_kept

__all__ = ["KINDS", "PIXEL_KINDS", "MaskingSpec", "SCORES", "SelectionInputs",
           "calibrate_threshold", "from_config", "gaussian_prior", "keep_indices", "num_kept",
           "score", "select_top_k"]

ScoreFn = Callable[..., jax.Array]
# score(rng, spec, grid, inputs, sharding) -> float32 [B, N], higher = keep.
SCORES: dict[str, ScoreFn] = {
    "random": basic.random_score,
    "gaussian": basic.gaussian_score,
    "attentive": basic.attentive_score,
    "cluster": similarity.cluster_score,
    "pgs": similarity.pgs_score,
    "grid": clipa.grid_score,
    "block": clipa.block_score,
}
# Kinds whose score reads the pixels (SelectionInputs.images).
PIXEL_KINDS = frozenset({"cluster", "pgs"})


def score(rng: jax.Array, spec: MaskingSpec, grid: tuple[int, int], inputs: SelectionInputs,
          sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """The keep score float32 [B, N] of kind `spec.kind`, computed under stop_gradient."""
  out = SCORES[spec.kind](rng, spec, grid, inputs, sharding)
  return jax.lax.stop_gradient(out.astype(jax.numpy.float32))


def keep_indices(rng: jax.Array, spec: MaskingSpec, batch_size: int, grid: tuple[int, int],
                 scores: jax.Array | None = None,
                 sharding: jax.sharding.Sharding | None = None, *,
                 images: jax.Array | None = None, progress: jax.Array | float = 0.0,
                 image_params=None) -> jax.Array | None:
  """Indices of the kept patches, int32 [B, K] sorted ascending; None when nothing is dropped.

  `scores` [B, N] is the prior of kind 'attentive' (higher = keep); `images` (uint8 [B,H,W,3]),
  `progress` (step/total_steps) and `image_params` (the image tower's parameters) feed the
  cluster / pgs kinds. `sharding`, when given, is the batch sharding of the result: noise is then
  drawn shard-locally (threefry partitionable) and top-K runs per shard, so token selection needs
  no cross-device communication.
  """
  if not spec.active:
    return None
  inputs = SelectionInputs(batch_size, images=images, progress=progress,
                           image_params=image_params, scores=scores)
  k = num_kept(grid[0] * grid[1], spec.ratio)
  return select_top_k(score(rng, spec, grid, inputs, sharding), k, sharding)
