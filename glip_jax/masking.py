"""Token selection: which image patches enter the transformer (SPEC §1–3).

One kernel serves every strategy: score = noise + strength · prior, keep the K highest scores per
image. Only the prior differs between kinds:

  none       K = N, no gather at all
  random     prior 0, noise U(0,1)                                (FLIP)
  gaussian   prior = unnormalised 2-D Gaussian density of the patch centre, noise U(0,1)   (GLIP)
  attentive  prior = teacher attention scores given by the caller, no noise                (A-CLIP)

K = max(1, floor(N·(1−ratio))) is static, so shapes stay static under `jit`. Everything runs on
device inside the compiled step, from a key derived from (seed, step).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

KINDS = ("none", "random", "gaussian", "attentive")


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """Static description of a token-selection strategy (hashable, so it can close over jit)."""

  kind: str = "none"
  ratio: float = 0.0  # the *dropped* fraction of patches, as in FLIP and GLIP
  sigma: float = 0.2  # GLIP width; a variance by default (the authors' code), see sigma_is_variance
  sigma_is_variance: bool = True
  strength: float = 1.0  # multiplies the prior; decouples the prior's height from its width
  gumbel: bool = False  # exact sampling without replacement ∝ prior**strength (Gumbel-top-K)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"masking.kind={self.kind!r} is not a masking kind; allowed: {list(KINDS)}.")
    if not 0.0 <= self.ratio < 1.0:
      raise ValueError(f"masking.ratio={self.ratio!r} is outside the allowed range [0, 1) "
                       f"(it is the dropped fraction of patches).")
    if self.kind == "gaussian" and self.sigma <= 0:
      raise ValueError(f"masking.sigma={self.sigma!r} must be > 0 for kind 'gaussian'.")
    if self.strength < 0:
      raise ValueError(f"masking.strength={self.strength!r} must be >= 0.")

  @property
  def active(self) -> bool:
    """Whether any patch is dropped (kind 'none' or ratio 0 keep the full sequence)."""
    return self.kind != "none" and self.ratio > 0


def from_config(config: ml_collections.ConfigDict) -> MaskingSpec:
  """Builds (and validates) a MaskingSpec from the `masking` section of a config."""
  fields = {f.name for f in dataclasses.fields(MaskingSpec)}
  unknown = set(config.keys()) - fields
  if unknown:
    raise ValueError(f"masking has unknown fields {sorted(unknown)}; allowed: {sorted(fields)}.")
  return MaskingSpec(**config.to_dict())


def num_kept(num_patches: int, ratio: float) -> int:
  """K = max(1, floor(N·(1−ratio))), robust to float round-off (e.g. 20·(1−0.9))."""
  return max(1, int(math.floor(num_patches * (1.0 - ratio) + 1e-6)))


def gaussian_prior(grid: tuple[int, int], sigma: float, sigma_is_variance: bool = True) -> np.ndarray:
  """Unnormalised 2-D normal density at the patch centres, flattened row-major to [rows*cols].

  Centres lie on linspace(-1, 1, G) along each axis (corners at ±1), also for non-square grids.
  As in the GLIP authors' code, `sigma` is the covariance s of N(0, s·I) unless
  `sigma_is_variance=False`, in which case it is the per-axis standard deviation. The density is
  the raw value (peak 1/(2π s)), not normalised over the grid: its height sets how sharp the centre
  bias is relative to the U(0,1) noise.
  """
  rows, cols = grid
  variance = sigma if sigma_is_variance else sigma ** 2
  y = np.linspace(-1.0, 1.0, rows)[:, None]
  x = np.linspace(-1.0, 1.0, cols)[None, :]
  density = np.exp(-(x ** 2 + y ** 2) / (2 * variance)) / (2 * np.pi * variance)
  return density.reshape(-1).astype(np.float32)


def keep_indices(rng: jax.Array, spec: MaskingSpec, batch_size: int, grid: tuple[int, int],
                 scores: jax.Array | None = None,
                 sharding: jax.sharding.Sharding | None = None) -> jax.Array | None:
  """Indices of the kept patches, int32 [B, K] sorted ascending; None when nothing is dropped.

  `scores` [B, N] is the prior of kind 'attentive' (higher = keep). `sharding`, when given, is the
  batch sharding of the result: the noise is then drawn shard-locally (threefry partitionable),
  so token selection needs no cross-device communication.
  """
  if not spec.active:
    return None
  n = grid[0] * grid[1]
  k = num_kept(n, spec.ratio)

  def constrain(x):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

  if spec.kind == "attentive":
    if scores is None:
      raise ValueError("masking.kind='attentive' needs teacher scores; none were given.")
    score = scores.astype(jnp.float32)
  elif spec.kind == "gaussian" and spec.gumbel:
    log_prior = jnp.log(jnp.asarray(gaussian_prior(grid, spec.sigma, spec.sigma_is_variance)))
    score = spec.strength * log_prior + constrain(jax.random.gumbel(rng, (batch_size, n)))
  else:
    score = constrain(jax.random.uniform(rng, (batch_size, n)))
    if spec.kind == "gaussian":
      prior = gaussian_prior(grid, spec.sigma, spec.sigma_is_variance)
      score = score + spec.strength * jnp.asarray(prior)
  return select_top_k(constrain(score), k, sharding)


def select_top_k(score: jax.Array, k: int,
                 sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """Indices of the `k` highest scores per row, int32 [B, k] sorted ascending; shard-local.

  The second half of every selection kind (the first computes `score`); A-CLIP calls it directly
  on its block grid with the kept block count.
  """
  select = functools.partial(_top_k_sorted, k=k)
  if isinstance(sharding, jax.sharding.NamedSharding):
    # XLA's TopK is not partitioned along the batch: the SPMD partitioner would all-gather the
    # scores. Selection is per image, so run it shard-locally.
    select = jax.shard_map(select, mesh=sharding.mesh, in_specs=sharding.spec,
                           out_specs=sharding.spec)
  return select(score)


def _top_k_sorted(score: jax.Array, k: int) -> jax.Array:
  _, indices = jax.lax.top_k(score, k)
  # Ascending order keeps the gather's memory access monotone; the order itself is irrelevant to
  # the transformer because position embeddings travel with the tokens.
  return jnp.sort(indices, axis=-1).astype(jnp.int32)
