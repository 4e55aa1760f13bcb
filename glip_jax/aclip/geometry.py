"""Attentive masking's geometry: teacher scores → each online view's grid → blocks → patches.

Everything here is a pure, batched jnp function of the scores and the crop boxes, so it runs inside
the compiled step; selection itself is the shared kernel's `masking.select_top_k` on the block
grid, with the block count as K.
"""

import jax
import jax.numpy as jnp

from glip_jax import masking
from glip_jax.aclip.spec import ACLIPSpec, block_grid, num_kept_blocks

def teacher_scores(attention: jax.Array) -> jax.Array:
  """[CLS]→token attention rows [B, depth, heads, 1+N] → patch scores averaged over layers and heads, [B, N]."""
  return attention[:, :, :, 1:].astype(jnp.float32).mean(axis=(1, 2))


def _interpolation_matrix(coords: jax.Array, size: int) -> jax.Array:
  """Linear interpolation weights [B, n_out, size] sampling a length-`size` axis at `coords`.

  `coords` are in grid-index units (cell i's centre is i); outside [0, size−1] the edge value is
  used, as bilinear resizing does at borders.
  """
  coords = jnp.clip(coords, 0.0, size - 1.0)
  lower = jnp.floor(coords)
  frac = coords - lower
  lower = lower.astype(jnp.int32)
  upper = jnp.minimum(lower + 1, size - 1)
  return ((1.0 - frac)[..., None] * jax.nn.one_hot(lower, size)
          + frac[..., None] * jax.nn.one_hot(upper, size))


def map_scores_to_view(scores: jax.Array, teacher_box: jax.Array, view_box: jax.Array,
                       grid: tuple[int, int]) -> jax.Array:
  """Resamples teacher scores [B, N] (teacher-view grid) onto an online view's grid, [B, N].

  Boxes are normalised image coordinates [top, left, bottom, right]. Each online patch centre is
  placed in the image through `view_box`, expressed in the teacher view through `teacher_box`, and
  the teacher map is sampled there bilinearly. Sampling is separable (rows depend only on the
  patch row), so it is two small batched matmuls — no per-example loop, no gather. The teacher box
  contains the view box, so the view spans at most the teacher's grid and point sampling does not
  alias.
  """
  rows, cols = grid
  teacher_box = teacher_box.astype(jnp.float32)
  view_box = view_box.astype(jnp.float32)

  def axis_coords(lo, hi, n):
    centres = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n  # in the online view, 0..1
    image = view_box[:, lo, None] + centres[None] * (view_box[:, hi, None] - view_box[:, lo, None])
    extent = teacher_box[:, hi, None] - teacher_box[:, lo, None]
    return (image - teacher_box[:, lo, None]) / extent * n - 0.5  # teacher grid-index units

  weights_y = _interpolation_matrix(axis_coords(0, 2, rows), rows)  # [B, rows_out, rows_in]
  weights_x = _interpolation_matrix(axis_coords(1, 3, cols), cols)  # [B, cols_out, cols_in]
  score_map = scores.astype(jnp.float32).reshape(-1, rows, cols)
  mapped = jnp.einsum("bij,bjk,blk->bil", weights_y, score_map, weights_x)
  return mapped.reshape(scores.shape[0], rows * cols)


def block_scores(scores: jax.Array, grid: tuple[int, int], block_size: int) -> jax.Array:
  """Mean score of each block_size×block_size block, [B, N] → [B, blocks] (row-major blocks)."""
  rows, cols = block_grid(grid, block_size)
  blocks = scores.reshape(-1, rows, block_size, cols, block_size).mean(axis=(2, 4))
  return blocks.reshape(-1, rows * cols)


def blocks_to_patches(block_indices: jax.Array, grid: tuple[int, int],
                      block_size: int) -> jax.Array:
  """Block indices [B, Kb] → the indices of their patches [B, Kb·block_size²], sorted."""
  _, block_cols = block_grid(grid, block_size)
  block_row, block_col = block_indices // block_cols, block_indices % block_cols
  offsets = jnp.arange(block_size)
  patch_row = block_row[:, :, None, None] * block_size + offsets[None, None, :, None]
  patch_col = block_col[:, :, None, None] * block_size + offsets[None, None, None, :]
  patches = (patch_row * grid[1] + patch_col).reshape(block_indices.shape[0], -1)
  return jnp.sort(patches, axis=-1).astype(jnp.int32)


def attentive_keep_indices(scores: jax.Array, grid: tuple[int, int], spec: ACLIPSpec,
                           sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """Patches of the top-scoring blocks, int32 [B, num_kept_patches] sorted; deterministic.

  Selection is the shared kernel's shard-local top-K (`masking.select_top_k`) on the block grid,
  with K the number of kept blocks; then each block expands to its patches.
  Ties go to the lower block index (lax.top_k), so the result is a function of the scores alone.
  """
  blocks = block_grid(grid, spec.block_size)
  num_blocks = blocks[0] * blocks[1]
  kept = num_kept_blocks(num_blocks, spec.keep_blocks_fraction)
  pooled = block_scores(scores, grid, spec.block_size)
  if kept == num_blocks:
    block_indices = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32), pooled.shape)
  else:
    block_indices = masking.select_top_k(pooled, kept, sharding)
  return blocks_to_patches(block_indices, grid, spec.block_size)
