"""A-CLIP's configuration: the `config.aclip` section, its validation and the static spec.

The bottom of the A-CLIP package: everything else (heads, view geometry, the step, the cost model)
takes an `ACLIPSpec`, built once from the config by `spec_from_config`.
"""

import dataclasses
import math

import ml_collections

HEADS_KEY = "aclip_heads"  # where the SSL heads' parameters live inside state.params


def default_config() -> ml_collections.ConfigDict:
  """The `config.aclip` section with the paper's values (SPEC §4)."""
  return ml_collections.ConfigDict(dict(
      ema_momentum=(0.996, 1.0),  # cosine schedule of the teacher's EMA momentum, start → end
      block_size=2,  # attentive masking selects square blocks of block_size² patches
      keep_blocks_fraction=0.5,  # kept blocks = ceil(blocks · fraction): 25 of 49 on 14×14
      simclr_temperature=0.1,
      weights=dict(clip=0.5, simclr=1.0, byol=2.0),  # clip: per online view
      # Layer widths after the input (the input is the image tower's width D):
      simclr_dims=(4096, 4096, 256),  # SimCLR MLP D→4096→4096→256
      projector_dims=(4096, 256),  # BYOL projector D→4096→256 (also EMA'd for the teacher)
      predictor_dims=(4096, 256),  # BYOL predictor 256→4096→256
  ))


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the A-CLIP loss terms; `clip` applies to each online view."""

  clip: float = 0.5
  simclr: float = 1.0
  byol: float = 2.0


@dataclasses.dataclass(frozen=True)
class ACLIPSpec:
  """Static A-CLIP settings (hashable); built from `config.aclip` by `spec_from_config`."""

  total_steps: int
  ema_momentum: tuple[float, float] = (0.996, 1.0)
  block_size: int = 2
  keep_blocks_fraction: float = 0.5
  simclr_temperature: float = 0.1
  weights: LossWeights = LossWeights()
  simclr_dims: tuple[int, ...] = (4096, 4096, 256)
  projector_dims: tuple[int, ...] = (4096, 256)
  predictor_dims: tuple[int, ...] = (4096, 256)

  def __post_init__(self):
    m0, m1 = self.ema_momentum
    if not 0.0 <= m0 <= m1 <= 1.0:
      raise ValueError(f"aclip.ema_momentum={self.ema_momentum!r}; need 0 <= start <= end <= 1.")
    if self.block_size < 1:
      raise ValueError(f"aclip.block_size={self.block_size!r} must be an int >= 1.")
    if not 0.0 < self.keep_blocks_fraction <= 1.0:
      raise ValueError(f"aclip.keep_blocks_fraction={self.keep_blocks_fraction!r} must be in (0, 1].")
    if self.simclr_temperature <= 0:
      raise ValueError(f"aclip.simclr_temperature={self.simclr_temperature!r} must be > 0.")
    for name in ("clip", "simclr", "byol"):
      if getattr(self.weights, name) < 0:
        raise ValueError(f"aclip.weights.{name}={getattr(self.weights, name)!r} must be >= 0.")
    for name in ("simclr_dims", "projector_dims", "predictor_dims"):
      dims = getattr(self, name)
      if not dims or any(int(d) < 1 for d in dims):
        raise ValueError(f"aclip.{name}={dims!r} must be a non-empty list of positive widths.")
    if self.predictor_dims[-1] != self.projector_dims[-1]:
      raise ValueError(f"aclip.predictor_dims[-1]={self.predictor_dims[-1]} must equal "
                       f"aclip.projector_dims[-1]={self.projector_dims[-1]}: the predictor "
                       f"regresses the teacher projector's output.")


def spec_from_config(config: ml_collections.ConfigDict, total_steps: int) -> ACLIPSpec:
  """Validates `config.aclip` and returns the static spec the step closes over."""
  allowed = set(default_config().keys())
  unknown = set(config.keys()) - allowed
  if unknown:
    raise ValueError(f"aclip has unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}.")
  weights = config.weights.to_dict() if hasattr(config.weights, "to_dict") else dict(config.weights)
  unknown = set(weights) - {"clip", "simclr", "byol"}
  if unknown:
    raise ValueError(f"aclip.weights has unknown fields {sorted(unknown)}; "
                     f"allowed: ['byol', 'clip', 'simclr'].")
  return ACLIPSpec(
      total_steps=int(total_steps),
      ema_momentum=tuple(float(m) for m in config.ema_momentum),
      block_size=int(config.block_size),
      keep_blocks_fraction=float(config.keep_blocks_fraction),
      simclr_temperature=float(config.simclr_temperature),
      weights=LossWeights(**{k: float(v) for k, v in weights.items()}),
      simclr_dims=tuple(int(d) for d in config.simclr_dims),
      projector_dims=tuple(int(d) for d in config.projector_dims),
      predictor_dims=tuple(int(d) for d in config.predictor_dims),
  )


def block_grid(grid: tuple[int, int], block_size: int) -> tuple[int, int]:
  """Grid of blocks (rows, cols); raises ValueError unless the patch grid divides evenly."""
  rows, cols = grid
  if rows % block_size or cols % block_size:
    raise ValueError(f"aclip.block_size={block_size} does not divide the patch grid {grid}; "
                     f"use a block size that divides both {rows} and {cols}.")
  return rows // block_size, cols // block_size


def num_kept_blocks(num_blocks: int, fraction: float) -> int:
  """ceil(num_blocks · fraction), at least 1 (25 of 49; the authors keep int(49·0.5)+1 = 25)."""
  return max(1, math.ceil(num_blocks * fraction - 1e-9))


def num_kept_patches(grid: tuple[int, int], spec: ACLIPSpec) -> int:
  """Patches per online view under attentive masking (100 of 196 for a 14×14 grid)."""
  rows, cols = block_grid(grid, spec.block_size)
  return num_kept_blocks(rows * cols, spec.keep_blocks_fraction) * spec.block_size ** 2
