"""CLIPA's structured token reductions (Li, Wang & Xie, NeurIPS 2023): grid and block.

Both are written as keep scores for the common top-K, so K = num_kept(N, ratio) stays static:
  grid   one patch per window×window cell, at one random offset per image. Exactly CLIPA's grid
         when ratio = 1 − 1/window² and the window divides the grid; otherwise the on-grid patches
         are kept first and the rest of K is filled (or trimmed) at random.
  block  one random rectangle of area K (random shape among those that fit, with height/width in
         [1/max_aspect, max_aspect]); when no h×w = K fits, the smallest h×⌈K/h⌉ rectangles are
         used and their last row is cut short, in raster order.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from glip_jax.masking.core import SelectionInputs, constrain
from glip_jax.masking.spec import MaskingSpec, num_kept


def _rows_cols(grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
  return jnp.asarray(rows), jnp.asarray(cols)


def grid_score(rng: jax.Array, spec: MaskingSpec, grid: tuple[int, int],
               inputs: SelectionInputs, sharding=None) -> jax.Array:
  """1 + U for the patches at the image's window offset, U for the others (U ~ U(0,1))."""
  n = grid[0] * grid[1]
  k_offset, k_fill = jax.random.split(rng)
  s = spec.window
  offset = constrain(jax.random.randint(k_offset, (inputs.batch_size, 2), 0, s), sharding)
  rows, cols = _rows_cols(grid)
  on_grid = (rows % s == offset[:, :1]) & (cols % s == offset[:, 1:])
  fill = constrain(jax.random.uniform(k_fill, (inputs.batch_size, n)), sharding)
  return on_grid.astype(jnp.float32) + fill


def block_shapes(grid: tuple[int, int], k: int, max_aspect: float) -> np.ndarray:
  """The (h, w) rectangles block masking draws from, int32 [S, 2] (static, per grid and K)."""
  rows, cols = grid

  def aspect_ok(h, w):
    return 1.0 / max_aspect <= h / w <= max_aspect

  exact = [(h, k // h) for h in range(1, rows + 1) if k % h == 0 and k // h <= cols]
  # Near-rectangles: h rows of w = ⌈K/h⌉, only the last row short (by fewer than w patches).
  near = [(h, math.ceil(k / h)) for h in range(1, rows + 1)
          if math.ceil(k / h) <= cols and h * math.ceil(k / h) - k < math.ceil(k / h)]
  for shapes in ([s for s in exact if aspect_ok(*s)], [s for s in near if aspect_ok(*s)],
                 exact, near):
    if shapes:
      return np.asarray(shapes, np.int32)
  raise ValueError(f"no rectangle of {k} patches fits the grid {grid}.")  # unreachable: h = rows


def block_score(rng: jax.Array, spec: MaskingSpec, grid: tuple[int, int],
                inputs: SelectionInputs, sharding=None) -> jax.Array:
  """In the image's rectangle: 2 − raster rank/N (so top-K takes it in raster order); else 0."""
  n = grid[0] * grid[1]
  shapes = jnp.asarray(block_shapes(grid, num_kept(n, spec.ratio), spec.max_aspect))
  u = constrain(jax.random.uniform(rng, (inputs.batch_size, 3)), sharding)
  shape = shapes[jnp.minimum((u[:, 0] * len(shapes)).astype(jnp.int32), len(shapes) - 1)]
  h, w = shape[:, :1], shape[:, 1:]
  top = jnp.floor(u[:, 1:2] * (grid[0] - h + 1)).astype(jnp.int32)
  left = jnp.floor(u[:, 2:3] * (grid[1] - w + 1)).astype(jnp.int32)
  rows, cols = _rows_cols(grid)
  r, c = rows - top, cols - left
  inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
  return jnp.where(inside, 2.0 - (r * w + c) / n, 0.0)
