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


# Statistical checks below use fixed seeds (so they are deterministic); their bounds are set so
# that a correct sampler would fail with probability < 1e-4 per test on a fresh seed (normal
# approximation of a binomial count, Bonferroni over all cells checked), and each test checks that
# a plausible wrong sampler lies far outside them.
Z_BONFERRONI = 5.0  # two-sided normal tail 5.7e-7 per cell; < 1e-4 for up to ~170 cells


def binomial_bound(p, draws, z=Z_BONFERRONI):
  """Half-width of the z-sigma interval of an empirical frequency of Binomial(draws, p)."""
  return z * np.sqrt(np.asarray(p) * (1 - np.asarray(p)) / draws)


def inclusion_frequencies(keep, n):
  """Per-patch [N] and pairwise [N, N] empirical inclusion frequencies of keep indices [B, K]."""
  keep = np.asarray(keep)
  member = np.zeros((keep.shape[0], n))
  np.put_along_axis(member, keep, 1.0, axis=1)
  return member.mean(0), member.T @ member / keep.shape[0]


def exact_inclusion(weights, k):
  """Exact per-patch and pairwise inclusion probabilities of sampling k of N without replacement,
  each draw ∝ weights among the rest (Plackett–Luce; what Gumbel-top-k samples), by enumeration."""
  import itertools
  weights = np.asarray(weights, np.float64)
  n = len(weights)
  single, pair = np.zeros(n), np.zeros((n, n))
  for order in itertools.permutations(range(n), k):
    p, left = 1.0, weights.sum()
    for i in order:
      p *= weights[i] / left
      left -= weights[i]
    idx = np.asarray(order)
    single[idx] += p
    pair[np.ix_(idx, idx)] += p
  return single, pair


def check_uniform_subsets(spec, grid, draws, seed):
  """Every patch kept with probability K/N and every pair with K(K-1)/(N(N-1)) (closed form)."""
  n = grid[0] * grid[1]
  k = masking.num_kept(n, spec.ratio)
  single, pair = inclusion_frequencies(
      masking.keep_indices(jax.random.key(seed), spec, draws, grid), n)
  p1, p2 = k / n, k * (k - 1) / (n * (n - 1))
  assert np.abs(single - p1).max() < binomial_bound(p1, draws), np.abs(single - p1).max()
  off = ~np.eye(n, dtype=bool)
  assert np.abs(pair[off] - p2).max() < binomial_bound(p2, draws), np.abs(pair[off] - p2).max()
  return single, pair


@pytest.mark.parametrize("spec", [masking.MaskingSpec("random", 0.75),
                                  masking.MaskingSpec("gaussian", 0.75, strength=0.0),
                                  masking.MaskingSpec("gaussian", 0.75, strength=0.0, gumbel=True)],
                         ids=["random", "gaussian_strength0", "gumbel_strength0"])
def test_uniform_subsets_pairwise(spec):
  """Uniform masking keeps a uniformly random K-subset: right per-patch *and* pairwise rates.

  Per-patch rates alone would pass a random contiguous block or a random grid offset, whose
  marginals are uniform too; their pairs are not (adjacent pairs too often, far pairs never).
  """
  grid, draws = (4, 4), 20000
  check_uniform_subsets(spec, grid, draws, seed=3)
  # Power: a random contiguous run of K = 4 raster positions has uniform-ish marginals, but its
  # pair (0, 15) never occurs, 0.05 below the closed form; the bound is ~0.008.
  assert 4 * 3 / (16 * 15) > 5 * binomial_bound(4 * 3 / (16 * 15), draws)


# Gumbel-top-K with score strength·log prior + Gumbel samples K patches without replacement,
# each draw ∝ prior**strength. On a 2×3 grid the prior takes two values (centre column vs
# the four corners), so strength changes the inclusion probabilities visibly.
@pytest.mark.parametrize("ratio,strength", [(0.5, 1.0), (0.5, 2.0), (0.6, 0.5), (0.6, 1.0)])
def test_gumbel_inclusion_probabilities_are_exact(ratio, strength):
  grid, sigma, draws = (2, 3), 0.3, 40000
  n = 6
  k = masking.num_kept(n, ratio)
  assert k in (2, 3)
  spec = masking.MaskingSpec("gaussian", ratio, sigma=sigma, strength=strength, gumbel=True)
  single, pair = inclusion_frequencies(
      masking.keep_indices(jax.random.key(11), spec, draws, grid), n)
  prior = masking.gaussian_prior(grid, sigma).astype(np.float64)
  want_single, want_pair = exact_inclusion(prior ** strength, k)
  assert want_single.sum() == pytest.approx(k)
  np.testing.assert_array_less(np.abs(single - want_single), binomial_bound(want_single, draws))
  off = ~np.eye(n, dtype=bool)
  np.testing.assert_array_less(np.abs(pair - want_pair)[off],
                               binomial_bound(want_pair, draws)[off])
  # Power: the plausible wrong samplers are far outside the bound (strength ignored, the prior
  # used without the log, or independent per-patch draws treated as with replacement).
  bound = binomial_bound(want_single, draws).max()
  for wrong in (prior ** 1.0 if strength != 1 else prior ** 2.0, np.exp(strength * prior)):
    assert np.abs(exact_inclusion(wrong, k)[0] - want_single).max() > 2 * bound
  with_replacement = 1 - (1 - prior ** strength / (prior ** strength).sum()) ** k
  assert np.abs(with_replacement - want_single).max() > 2 * bound


def test_gumbel_samples_proportional_to_prior():
  # With K = 1 Gumbel-top-K is exactly one categorical draw ∝ prior.
  grid = (4, 4)
  spec = masking.MaskingSpec("gaussian", 15 / 16, sigma=0.3, gumbel=True)
  freq = keep_frequency(spec, grid, batch=20000).reshape(-1)
  prior = masking.gaussian_prior(grid, 0.3)
  np.testing.assert_allclose(freq, prior / prior.sum(), atol=0.012)


def test_non_gumbel_gaussian_matches_an_independent_numpy_sampler():
  """GLIP's rule (top-K of U(0,1) + strength·prior) against the same rule drawn with numpy."""
  grid, draws, n = (4, 4), 20000, 16
  for strength in (1.0, 3.0):
    spec = masking.MaskingSpec("gaussian", 0.75, sigma=0.3, strength=strength)
    single, _ = inclusion_frequencies(
        masking.keep_indices(jax.random.key(5), spec, draws, grid), n)
    score = (np.random.default_rng(5).uniform(size=(draws, n))
             + strength * masking.gaussian_prior(grid, 0.3))
    reference, _ = inclusion_frequencies(np.argsort(-score, axis=1)[:, :4], n)
    # Two independent estimates: the difference has twice the variance of one.
    bound = np.sqrt(2) * binomial_bound(reference.clip(1e-3, 1 - 1e-3), draws)
    np.testing.assert_array_less(np.abs(single - reference), bound + 1e-9)
    if strength == 3.0:
      # The prior's height matters: strength 3 is far from strength 1's rates.
      assert np.abs(single - previous).max() > 5 * bound.max()
    previous = single


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
    return keep, jnp.take_along_axis(tokens, keep[:, :, None], axis=1)

  tokens = jax.ShapeDtypeStruct((64, 196, 32), jnp.float32, sharding=batch_sharding)
  compiled = jax.jit(select_and_gather, out_shardings=batch_sharding).lower(
      tokens, jax.ShapeDtypeStruct((), jnp.int32)).compile()
  hlo = compiled.as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in hlo, f"{collective} found in the masking HLO"
  # On distinct token values (image b, patch i, channel c ↦ a unique number) the sharded
  # selection keeps the same indices as the unsharded kernel (threefry is partitionable: shard-
  # local noise is the global noise), and the gather takes exactly those tokens per image.
  values = np.arange(64 * 196 * 32, dtype=np.float32).reshape(64, 196, 32)
  keep, out = compiled(jax.device_put(values, batch_sharding), jnp.int32(5))
  assert out.shape == (64, 98, 32)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)
  unsharded = masking.keep_indices(jax.random.fold_in(jax.random.key(0), 5), spec, 64, (14, 14))
  np.testing.assert_array_equal(np.asarray(keep), np.asarray(unsharded))
  np.testing.assert_array_equal(np.asarray(out),
                                np.take_along_axis(values, np.asarray(unsharded)[:, :, None], 1))
  # Each of the 8 shards drew its own noise: no two shards' first rows (images 0, 8, ...) agree.
  assert len({tuple(row) for row in np.asarray(keep)[::8]}) == 8
