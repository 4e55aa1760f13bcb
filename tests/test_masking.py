"""Token selection: exactness, sampler statistics, GLIP parity and sharding behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from glip_jax import masking
from glip_jax import sharding as sharding_lib


def keep_frequency(spec, grid, batch=4000, seed=0):
  keep = masking.keep_indices(jax.random.key(seed), spec, batch, grid)
  counts = np.zeros(grid[0] * grid[1])
  np.add.at(counts, np.asarray(keep).reshape(-1), 1)
  return (counts / batch).reshape(grid)


@pytest.mark.parametrize("kind", ["random", "gaussian"])
@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.5), ((14, 14), 0.918), ((4, 6), 0.75),
                                        ((2, 2), 0.99)])
def test_exactly_k_unique_in_range(kind, grid, ratio):
  n = grid[0] * grid[1]
  spec = masking.MaskingSpec(kind, ratio)
  keep = np.asarray(masking.keep_indices(jax.random.key(1), spec, 32, grid))
  assert keep.shape == (32, masking.num_kept(n, ratio))
  assert keep.dtype == np.int32
  assert keep.min() >= 0 and keep.max() < n
  for row in keep:
    assert len(set(row.tolist())) == len(row)
    assert np.all(np.diff(row) > 0)  # sorted ascending


def test_num_kept():
  assert masking.num_kept(196, 0.5) == 98
  assert masking.num_kept(196, 0.75) == 49
  assert masking.num_kept(196, 0.918) == 16
  assert masking.num_kept(20, 0.9) == 2  # 20·(1−0.9) is 1.9999999999999996 in floats
  assert masking.num_kept(4, 0.99) == 1  # never zero tokens


def test_none_and_zero_ratio_keep_everything():
  assert masking.keep_indices(jax.random.key(0), masking.MaskingSpec("none"), 4, (2, 2)) is None
  assert masking.keep_indices(jax.random.key(0), masking.MaskingSpec("random", 0.0), 4, (2, 2)) is None


def test_random_is_uniform():
  freq = keep_frequency(masking.MaskingSpec("random", 0.75), (14, 14), batch=4000)
  p = 49 / 196
  # Each position: Binomial(4000, p)/4000, std ≈ 0.0068; 5 std over 196 positions is generous.
  assert np.abs(freq - p).max() < 5 * np.sqrt(p * (1 - p) / 4000)


def test_gaussian_prior_values():
  prior = masking.gaussian_prior((3, 5), 0.2).reshape(3, 5)
  assert prior[1, 2] == pytest.approx(1 / (2 * np.pi * 0.2), rel=1e-6)  # raw density peak
  # Corner (x=±1, y=±1): exp(-(1+1)/(2·0.2)) / (2π·0.2).
  assert prior[0, 0] == pytest.approx(np.exp(-5.0) / (2 * np.pi * 0.2), rel=1e-5)
  std_reading = masking.gaussian_prior((3, 5), 0.2, sigma_is_variance=False).reshape(3, 5)
  assert std_reading[1, 2] == pytest.approx(1 / (2 * np.pi * 0.04), rel=1e-6)
  # Non-square grid: x spans [-1, 1] in 5 steps, so the middle of the top row is at (0, -1).
  assert prior[0, 2] == pytest.approx(np.exp(-1 / 0.4) / (2 * np.pi * 0.2), rel=1e-5)


# SPEC §3: keep probabilities of the authors' rule at s = 0.2 on 14×14.
@pytest.mark.parametrize("ratio,centre,edge_middle,corner", [
    (0.5, 1.00, 0.36, 0.30),
    (0.75, 0.82, 0.10, 0.05),
])
def test_gaussian_reproduces_glip_keep_probabilities(ratio, centre, edge_middle, corner):
  freq = keep_frequency(masking.MaskingSpec("gaussian", ratio), (14, 14), batch=4000)
  assert freq[6:8, 6:8].mean() == pytest.approx(centre, abs=0.03)
  edge = np.mean([freq[0, 6:8].mean(), freq[13, 6:8].mean(), freq[6:8, 0].mean(), freq[6:8, 13].mean()])
  assert edge == pytest.approx(edge_middle, abs=0.03)
  corners = np.mean([freq[0, 0], freq[0, 13], freq[13, 0], freq[13, 13]])
  assert corners == pytest.approx(corner, abs=0.03)


def test_gaussian_at_918_never_sees_the_periphery():
  freq = keep_frequency(masking.MaskingSpec("gaussian", 0.918), (14, 14), batch=4000)
  assert freq[6:8, 6:8].mean() == pytest.approx(0.56, abs=0.04)
  outer_two_rings = np.ones((14, 14), bool)
  outer_two_rings[2:12, 2:12] = False
  assert freq[outer_two_rings].max() < 0.01


def test_strength_zero_is_random():
  key = jax.random.key(3)
  random = masking.keep_indices(key, masking.MaskingSpec("random", 0.5), 64, (14, 14))
  flat = masking.keep_indices(key, masking.MaskingSpec("gaussian", 0.5, strength=0.0), 64, (14, 14))
  np.testing.assert_array_equal(random, flat)


def test_gumbel_samples_proportional_to_prior():
  # With K = 1 Gumbel-top-K is exactly one categorical draw ∝ prior.
  grid = (4, 4)
  spec = masking.MaskingSpec("gaussian", 15 / 16, sigma=0.3, gumbel=True)
  freq = keep_frequency(spec, grid, batch=20000).reshape(-1)
  prior = masking.gaussian_prior(grid, 0.3)
  np.testing.assert_allclose(freq, prior / prior.sum(), atol=0.012)


def test_determinism_and_per_image_independence():
  spec = masking.MaskingSpec("gaussian", 0.75)
  a = np.asarray(masking.keep_indices(jax.random.key(7), spec, 16, (14, 14)))
  b = np.asarray(masking.keep_indices(jax.random.key(7), spec, 16, (14, 14)))
  c = np.asarray(masking.keep_indices(jax.random.key(8), spec, 16, (14, 14)))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len({tuple(row) for row in a}) == 16  # every image gets its own subset


def test_attentive_keeps_highest_scores():
  scores = jnp.asarray(np.random.default_rng(0).permutation(16)[None].astype(np.float32))
  keep = masking.keep_indices(None, masking.MaskingSpec("attentive", 0.75), 1, (4, 4), scores=scores)
  np.testing.assert_array_equal(np.asarray(keep)[0], np.sort(np.argsort(-np.asarray(scores[0]))[:4]))
  with pytest.raises(ValueError, match="attentive"):
    masking.keep_indices(None, masking.MaskingSpec("attentive", 0.5), 1, (4, 4))


@pytest.mark.parametrize("field,kwargs,message", [
    ("kind", dict(kind="blocky"), r"masking.kind='blocky'.*allowed: \['none', 'random'"),
    ("ratio", dict(kind="random", ratio=1.0), r"masking.ratio=1.0 .*\[0, 1\)"),
    ("ratio", dict(kind="random", ratio=-0.1), r"masking.ratio=-0.1"),
    ("sigma", dict(kind="gaussian", ratio=0.5, sigma=0.0), r"masking.sigma=0.0"),
])
def test_bad_config_errors(field, kwargs, message):
  with pytest.raises(ValueError, match=message):
    masking.MaskingSpec(**kwargs)


def test_sharded_selection_and_gather_need_no_collectives():
  mesh = sharding_lib.create_mesh({"data": 4, "fsdp": 2})
  batch_sharding = sharding_lib.batch_sharding(mesh)
  spec = masking.MaskingSpec("gaussian", 0.5)

  def select_and_gather(tokens, step):
    rng = jax.random.fold_in(jax.random.key(0), step)
    keep = masking.keep_indices(rng, spec, tokens.shape[0], (14, 14), sharding=batch_sharding)
    return jnp.take_along_axis(tokens, keep[:, :, None], axis=1)

  tokens = jax.ShapeDtypeStruct((64, 196, 32), jnp.float32, sharding=batch_sharding)
  compiled = jax.jit(select_and_gather, out_shardings=batch_sharding).lower(
      tokens, jax.ShapeDtypeStruct((), jnp.int32)).compile()
  hlo = compiled.as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in hlo, f"{collective} found in the masking HLO"
  # The same function does run and gives per-image indices.
  out = jax.jit(select_and_gather, out_shardings=batch_sharding)(
      jax.device_put(jnp.ones((64, 196, 32)), batch_sharding), 0)
  assert out.shape == (64, 98, 32)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)
