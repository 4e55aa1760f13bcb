"""Prior-plus-noise kinds: random (FLIP), gaussian (GLIP), attentive (A-CLIP)."""

import jax
import jax.numpy as jnp
import numpy as np

from glip_jax.masking.core import SelectionInputs, constrain
from glip_jax.masking.spec import MaskingSpec


def gaussian_prior(grid: tuple[int, int], sigma: float,
                   sigma_is_variance: bool = True) -> np.ndarray:
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


def random_score(rng: jax.Array, spec: MaskingSpec, grid: tuple[int, int],
                 inputs: SelectionInputs, sharding=None) -> jax.Array:
  """FLIP: U(0,1) per patch."""
  del spec
  return constrain(jax.random.uniform(rng, (inputs.batch_size, grid[0] * grid[1])), sharding)


def gaussian_score(rng: jax.Array, spec: MaskingSpec, grid: tuple[int, int],
                   inputs: SelectionInputs, sharding=None) -> jax.Array:
  """GLIP: U(0,1) + strength·prior, or Gumbel + strength·log prior (exact sampling ∝ prior)."""
  n = grid[0] * grid[1]
  prior = gaussian_prior(grid, spec.sigma, spec.sigma_is_variance)
  if spec.gumbel:
    noise = constrain(jax.random.gumbel(rng, (inputs.batch_size, n)), sharding)
    return spec.strength * jnp.log(jnp.asarray(prior)) + noise
  noise = constrain(jax.random.uniform(rng, (inputs.batch_size, n)), sharding)
  return noise + spec.strength * jnp.asarray(prior)


def attentive_score(rng: jax.Array, spec: MaskingSpec, grid: tuple[int, int],
                    inputs: SelectionInputs, sharding=None) -> jax.Array:
  """A-CLIP: the teacher's attention scores as given, no noise."""
  del rng, grid, sharding
  if inputs.scores is None:
    raise ValueError(f"masking.kind={spec.kind!r} needs teacher scores; none were given.")
  return inputs.scores.astype(jnp.float32)
