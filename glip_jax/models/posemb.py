"""Resizing learned position embeddings to a new patch grid or text length.

Image: the [CLS] row (the first `num_prefix` rows) is kept as it is and the 2-D grid of patch
embeddings is resampled bicubically, as open_clip's `resize_pos_embed` and big_vision's
`resample_posemb` do for high-resolution fine-tuning. `jax.image.resize` antialiases when it
shrinks the grid, so a smaller grid averages its neighbours instead of aliasing them.

Text: the causal text tower reads position i only for the i-th token, so truncating keeps every
caption that still fits bit-identical; extending appends copies of the last trained position
(untrained rows would otherwise be noise; fine-tuning then moves them apart).
"""

import jax
import jax.numpy as jnp
import numpy as np


def resize_image_posemb(posemb: np.ndarray, old_grid: tuple[int, int], new_grid: tuple[int, int],
                        num_prefix: int = 1) -> np.ndarray:
  """[num_prefix + old rows*cols, D] → [num_prefix + new rows*cols, D]; prefix rows kept."""
  posemb = np.asarray(posemb)
  rows, cols = old_grid
  if posemb.ndim != 2 or posemb.shape[0] != num_prefix + rows * cols:
    raise ValueError(f"position embedding of shape {posemb.shape} does not hold {num_prefix} "
                     f"prefix row(s) plus a {rows}x{cols} grid.")
  if tuple(old_grid) == tuple(new_grid):
    return posemb
  width = posemb.shape[1]
  grid = posemb[num_prefix:].reshape(rows, cols, width)
  resized = jax.image.resize(jnp.asarray(grid, jnp.float32), (*new_grid, width), method="bicubic",
                             antialias=True)
  resized = np.asarray(resized, posemb.dtype).reshape(-1, width)
  return np.concatenate([posemb[:num_prefix], resized])


def resize_text_posemb(posemb: np.ndarray, length: int) -> np.ndarray:
  """[L, D] → [length, D]: the first `length` rows, or all rows plus copies of the last one."""
  posemb = np.asarray(posemb)
  if length < 1:
    raise ValueError(f"text context length={length}; must be >= 1.")
  if length <= posemb.shape[0]:
    return posemb[:length]
  extra = np.repeat(posemb[-1:], length - posemb.shape[0], axis=0)
  return np.concatenate([posemb, extra])


def square_grid(num_patches: int) -> tuple[int, int]:
  """The square grid of `num_patches` patches; ValueError if it is not a perfect square."""
  side = int(round(num_patches ** 0.5))
  if side * side != num_patches:
    raise ValueError(f"{num_patches} patch position embeddings do not form a square grid; give "
                     "the image size explicitly.")
  return side, side
