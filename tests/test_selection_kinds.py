"""The selection kinds beyond FLIP/GLIP/A-CLIP: cluster, pgs, grid, block (SPEC_SELECTION.md).

Each kind: exactly K unique in-range indices, determinism per key, a statistic on constructed
images showing it does what it claims, no collective in the sharded HLO, and a short training run.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glip_jax import masking
from glip_jax import sharding as sharding_lib
from glip_jax import train
from glip_jax.masking import clipa
from glip_jax.masking import similarity
from runs import tiny_config

PATCH = 4


def random_images(batch, grid, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (batch, grid[0] * PATCH, grid[1] * PATCH, 3),
                                  dtype=np.uint8))


def image_params(grid, width=16, seed=0):
  rng = np.random.default_rng(seed)
  n = grid[0] * grid[1]
  return {"conv1": {"kernel": jnp.asarray(rng.normal(size=(PATCH, PATCH, 3, width)), jnp.float32)},
          "positional_embedding": jnp.asarray(rng.normal(size=(n + 1, width)), jnp.float32)}


@functools.partial(jax.jit, static_argnames=("spec", "grid", "sharding"))
def _keep(key, images, params, progress, spec, grid, sharding):
  return masking.keep_indices(jax.random.key(key), spec, images.shape[0], grid, images=images,
                              progress=progress, image_params=params, sharding=sharding)


def keep(spec, grid, images, key=0, progress=0.5, sharding=None):
  return _keep(key, images, image_params(grid), progress, spec, grid, sharding)


SPECS = {
    "cluster": masking.MaskingSpec("cluster", 0.5),
    "cluster_threshold": masking.MaskingSpec("cluster", 0.5, threshold=0.2),
    "cluster_embed": masking.MaskingSpec("cluster", 0.5, embed_mix=1.0),
    "cluster_as_coded": masking.MaskingSpec("cluster", 0.3, as_coded=True),
    "pgs": masking.MaskingSpec("pgs", 0.5),
    "pgs_no_otn": masking.MaskingSpec("pgs", 0.3, otn=False),
    "pgs_as_coded": masking.MaskingSpec("pgs", 0.5, as_coded=True),
    "grid": masking.MaskingSpec("grid", 0.75),
    "grid_3": masking.MaskingSpec("grid", 0.6, window=3),
    "block": masking.MaskingSpec("block", 0.5),
}


@pytest.mark.parametrize("name,grid", [(name, (7, 5)) for name in sorted(SPECS)] +
                         [(name, (4, 6)) for name in ("cluster", "pgs", "grid", "block")])
def test_exactly_k_unique_sorted_in_range(name, grid):
  spec = SPECS[name]
  n = grid[0] * grid[1]
  out = np.asarray(keep(spec, grid, random_images(6, grid)))
  assert out.shape == (6, masking.num_kept(n, spec.ratio)) and out.dtype == np.int32
  assert out.min() >= 0 and out.max() < n
  assert np.all(np.diff(out, axis=1) > 0)  # sorted ascending, hence unique


@pytest.mark.parametrize("name", ["cluster", "pgs_as_coded", "grid", "block"])
def test_deterministic_per_key(name):
  images = random_images(8, (8, 8))
  a, b = keep(SPECS[name], (8, 8), images, key=3), keep(SPECS[name], (8, 8), images, key=3)
  c = keep(SPECS[name], (8, 8), images, key=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def two_region_images(batch):
  """Columns 0–5 of the 8×8 grid flat red (region A, 48 patches), columns 6–7 flat blue (B, 16)."""
  img = np.zeros((batch, 32, 32, 3), np.uint8)
  img[:, :, :24, 0] = 255
  img[:, :, 24:, 2] = 255
  return jnp.asarray(img)


@pytest.mark.parametrize("threshold", [None, 0.9])
def test_cluster_drops_the_anchors_region(threshold):
  # One anchor (64 − int(64·0.99) = 1), uniform: in A for 3/4 of the images. 16 of 64 dropped.
  spec = masking.MaskingSpec("cluster", 0.25, anchor_ratio=0.01, threshold=threshold)
  assert spec.num_anchors(64) == 1
  out = np.asarray(keep(spec, (8, 8), two_region_images(128)))
  in_a = (np.arange(64) % 8) < 6
  dropped_all_of_b = []
  for row in out:
    dropped = np.setdiff1d(np.arange(64), row)
    assert len(dropped) == 16
    # All dropped patches lie in one region: the anchor's (for B: all of it).
    assert in_a[dropped].all() or np.array_equal(dropped, np.flatnonzero(~in_a))
    dropped_all_of_b.append(not in_a[dropped].any())
  # B is dropped exactly when the anchor falls in B: 1/4 of the images (binomial std 0.04).
  assert np.mean(dropped_all_of_b) == pytest.approx(0.25, abs=0.12)


def test_cluster_anchor_rows_pick_the_anchors_region():
  # The exact ranking, with the anchor placed in region A by hand.
  pix = similarity.unit(similarity.standardise(
      similarity.pixel_patches(two_region_images(1), PATCH)))
  sim = similarity.anchor_rows(pix, jnp.asarray([[9]]))  # patch (1, 1): region A
  score = np.asarray(-sim.max(axis=1))[0]
  in_a = (np.arange(64) % 8) < 6
  assert score[in_a].max() < score[~in_a].min()  # A's patches are the first to drop


def object_images(batch, seed=0):
  """A 13–15 px saturated square at a random place on a flat grey background, 32×32 px."""
  rng = np.random.default_rng(seed)
  img = np.full((batch, 32, 32, 3), 128, np.uint8)
  edge = np.zeros((batch, 8, 8), bool)
  for i in range(batch):
    size = rng.integers(13, 16)
    top, left = rng.integers(1, 32 - size, 2)
    img[i, top:top + size, left:left + size] = (230, 40, 40)
    # Patches the object's boundary crosses (the outline, not its interior or the background).
    mask = np.zeros((32, 32), bool)
    mask[top:top + size, left:left + size] = True
    inner = np.zeros((32, 32), bool)
    inner[top + 1:top + size - 1, left + 1:left + size - 1] = True
    outline = (mask & ~inner).reshape(8, 4, 8, 4).any(axis=(1, 3))
    edge[i] = outline
  return jnp.asarray(img), edge.reshape(batch, 64)


def kept_mask(out, n=64):
  m = np.zeros((out.shape[0], n), bool)
  np.put_along_axis(m, np.asarray(out), True, axis=1)
  return m


def test_pgs_keeps_edge_patches_more_often_than_background():
  images, edge = object_images(128)
  touched = np.asarray(similarity.edge_map(images, PATCH)) > 0
  background = ~touched  # patches without any edge response: flat grey
  kept = kept_mask(keep(masking.MaskingSpec("pgs", 0.5), (8, 8), images, progress=0.0))
  edge_rate, background_rate = kept[edge].mean(), kept[background].mean()
  assert edge_rate > 0.9 and background_rate < 0.5, (edge_rate, background_rate)
  # The reference code's edge map is rounding noise: edges are not protected there.
  coded = kept_mask(keep(masking.MaskingSpec("pgs", 0.5, as_coded=True), (8, 8), images))
  assert coded[edge].mean() < edge_rate - 0.2


def test_edge_map_is_the_pooled_sobel_of_the_grayscale_image():
  # A vertical step at x = 16 px: Sobel responds in columns 15 and 16 only, i.e. patch columns 3
  # and 4 of the 8×8 grid, with equal strength.
  img = np.zeros((1, 32, 32, 3), np.uint8)
  img[:, :, 16:] = 255
  edge = np.asarray(similarity.edge_map(jnp.asarray(img), PATCH)).reshape(8, 8)
  expected = np.zeros((8, 8))
  expected[:, 3:5] = 1.0
  np.testing.assert_allclose(edge, expected, atol=1e-5)


def test_sinkhorn_plan_is_doubly_stochastic_at_the_chosen_temperature():
  x = similarity.unit(jax.random.normal(jax.random.key(0), (4, 64, 48)))
  plan = similarity.sinkhorn(jnp.einsum("bid,bjd->bij", x, x), temperature=0.1, iters=50)
  assert np.all(np.asarray(plan) > 0)
  np.testing.assert_allclose(plan.sum(axis=1), 1.0, atol=1e-3)  # columns (exact after a step)
  np.testing.assert_allclose(plan.sum(axis=2), 1.0, atol=2e-2)  # rows


def test_calibrated_threshold_reaches_the_target_cluster_fraction():
  images = random_images(32, (8, 8), seed=1)
  spec = masking.MaskingSpec("cluster", 0.3, anchor_ratio=0.1)
  tau = masking.calibrate_threshold(images, spec, (8, 8), 0.4, jax.random.key(0))
  fraction = float(similarity.cluster_fraction(images, spec, (8, 8), tau, jax.random.key(0)))
  assert -1 < tau < 1 and fraction == pytest.approx(0.4, abs=0.02)


@pytest.mark.parametrize("grid,ratio,window", [((8, 8), 0.75, 2), ((6, 9), 8 / 9, 3),
                                               ((4, 6), 0.75, 2)])
def test_grid_keeps_exactly_one_patch_per_window(grid, ratio, window):
  spec = masking.MaskingSpec("grid", ratio, window=window)
  out = np.asarray(keep(spec, grid, random_images(96, grid)))
  rows, cols = np.divmod(out, grid[1])
  cells = (rows // window) * (grid[1] // window) + cols // window
  offsets = set()
  for r, c, cell in zip(rows, cols, cells):
    assert sorted(cell.tolist()) == list(range(out.shape[1]))  # one per cell, every cell
    assert len(set(zip((r % window).tolist(), (c % window).tolist()))) == 1  # one offset
    offsets.add((r[0] % window, c[0] % window))
  assert len(offsets) == window ** 2  # the offset is random per image


@pytest.mark.parametrize("grid,ratio", [((8, 8), 0.5), ((6, 10), 0.6), ((14, 14), 0.75)])
def test_block_keeps_one_rectangle(grid, ratio):
  spec = masking.MaskingSpec("block", ratio)
  k = masking.num_kept(grid[0] * grid[1], ratio)
  out = np.asarray(keep(spec, grid, random_images(32, grid)))
  shapes, corners = set(), set()
  for row in out:
    r, c = np.divmod(row, grid[1])
    h, w = r.max() - r.min() + 1, c.max() - c.min() + 1
    assert h * w == k  # K distinct patches inside a bounding box of area K: a full rectangle
    assert 1 / 4 <= h / w <= 4
    shapes.add((h, w))
    corners.add((r.min(), c.min()))
  assert shapes == {tuple(s) for s in clipa.block_shapes(grid, k, 4.0).tolist()}  # all drawn
  assert len(corners) > 4


def test_block_without_an_exact_rectangle_cuts_the_last_row():
  # K = 13 on 8×8: no h×w = 13 fits; h rows of ⌈13/h⌉ with only the last row short.
  assert clipa.block_shapes((8, 8), 13, 4.0).tolist() == [[2, 7], [3, 5], [4, 4], [5, 3], [7, 2]]
  out = np.asarray(keep(masking.MaskingSpec("block", 51 / 64), (8, 8), random_images(32, (8, 8))))
  for row in out:
    r, c = np.divmod(row, 8)
    counts = np.bincount(r - r.min())
    w = counts[0]
    assert np.all(counts[:-1] == w) and 0 < counts[-1] < w  # full rows, then one short row
    assert np.all(c >= c.min()) and np.all(c < c.min() + w)
    last = np.sort(c[r == r.max()])
    np.testing.assert_array_equal(last, c.min() + np.arange(len(last)))  # from the left


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="cluster", ratio=0.5, anchor_ratio=0.0), r"masking.anchor_ratio=0.0 .*\(0, 1\)"),
    (dict(kind="cluster", ratio=0.5, threshold=1.5), r"masking.threshold=1.5 .*\[-1, 1\]"),
    (dict(kind="pgs", ratio=0.5, embed_mix=2.0), r"masking.embed_mix=2.0 .*\[0, 1\]"),
    (dict(kind="pgs", ratio=0.5, temperature=0.0), r"masking.temperature=0.0 .*> 0"),
    (dict(kind="pgs", ratio=0.5, sinkhorn_iters=0), r"masking.sinkhorn_iters=0 .*>= 1"),
    (dict(kind="grid", ratio=0.75, window=1), r"masking.window=1 .*an int >= 2"),
    (dict(kind="block", ratio=0.5, max_aspect=0.5), r"masking.max_aspect=0.5 .*>= 1"),
])
def test_bad_fields_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    masking.MaskingSpec(**kwargs)


def test_kind_defaults_are_the_published_recipes():
  assert masking.MaskingSpec("cluster", 0.5).anchor_ratio == 0.03
  assert masking.MaskingSpec("pgs", 0.5).num_anchors(196) == 10
  assert masking.MaskingSpec("cluster", 0.5).num_anchors(196) == 6
  assert masking.MaskingSpec("pgs", 0.5).embed_mix == 1.0


def test_pixel_kinds_need_images():
  with pytest.raises(ValueError, match=r"masking.kind='cluster' .*no images"):
    masking.keep_indices(jax.random.key(0), masking.MaskingSpec("cluster", 0.5), 2, (8, 8))
  with pytest.raises(ValueError, match=r"masking.embed_mix=1.0 .*conv1"):
    masking.keep_indices(jax.random.key(0), masking.MaskingSpec("pgs", 0.5), 2, (8, 8),
                         images=random_images(2, (8, 8)))


@pytest.mark.parametrize("name", ["cluster_embed", "cluster_threshold", "pgs", "pgs_as_coded",
                                  "grid", "block"])
def test_sharded_selection_needs_no_collectives(name):
  mesh = sharding_lib.create_mesh({"data": 4, "fsdp": 2})
  batch = sharding_lib.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec, grid = SPECS[name], (8, 6)

  def select(images, params, step):
    rng = jax.random.fold_in(jax.random.key(0), step)
    return masking.keep_indices(rng, spec, images.shape[0], grid, sharding=batch, images=images,
                                progress=step / 100, image_params=params)

  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        image_params(grid))
  images = jax.ShapeDtypeStruct((64, 32, 24, 3), jnp.uint8, sharding=batch)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  compiled = jax.jit(select, out_shardings=batch).lower(images, params, step).compile()
  hlo = compiled.as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce",
                     "reduce-scatter"):
    assert collective not in hlo, f"{collective} found in the {name} selection HLO"
  out = compiled(jax.device_put(random_images(64, grid), batch), image_params(grid), jnp.int32(3))
  assert out.shape == (64, masking.num_kept(48, spec.ratio))


def test_sharded_selection_equals_unsharded():
  # The noise is drawn per shard (threefry partitionable) yet equals the unsharded draw.
  mesh = sharding_lib.create_mesh({"data": 8})
  batch = sharding_lib.batch_sharding(mesh)
  grid = (8, 8)
  imgs = random_images(16, grid)
  for name in ("cluster", "pgs", "grid", "block"):
    ref = keep(SPECS[name], grid, imgs, key=5)
    sharded = keep(SPECS[name], grid, jax.device_put(imgs, batch), key=5, sharding=batch)
    np.testing.assert_array_equal(sharded, ref, err_msg=name)


def test_pgs_train_step_reads_images_progress_and_params():
  # The compiled train step with the kind that needs everything: finite loss, K tokens kept.
  from glip_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
  from glip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config("pgs")
  mesh = sharding_lib.create_mesh({"data": 1}, jax.devices()[:1])  # sharding: see the HLO test
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, 10)
  state, shardings = train_step_lib.create_train_state(model, tx, config.model, mesh, 0)
  spec = train_step_lib.StepSpec(masking.from_config(config.masking), clip_lib.grid(config.model),
                                 total_steps=10)
  step = train_step_lib.compile_train_step(model, tx, schedule, spec, mesh, shardings)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
           "text": rng.integers(1, 500, (16, config.model.text.context_length)).astype(np.int32)}
  for _ in range(2):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["kept_tokens"]) == masking.num_kept(16, 0.5)


def run_demo_kinds(kinds, tmp_path):
  for kind in kinds:
    config = tiny_config(kind)
    config.total_steps = 3
    config.checkpoint_every_steps = 0
    metrics = train.train_and_evaluate(config, str(tmp_path / kind))
    assert np.isfinite(metrics["loss"]), (kind, metrics)
    assert metrics["kept_tokens"] == masking.num_kept(16, config.masking.ratio), kind


@pytest.mark.slow
def test_each_kind_trains_end_to_end_with_finite_losses(tmp_path):
  run_demo_kinds(["cluster", "pgs", "grid", "block"], tmp_path)


def test_masked_inference_regime_reads_the_images():
  from glip_jax.evaluation import base, builder  # pylint: disable=g-import-not-at-top
  mesh = sharding_lib.create_mesh({"data": 8})
  grid = (8, 8)
  # The training spec (embedding mix on); masked inference runs it without parameters.
  select = builder.make_masking(masking.MaskingSpec("pgs", 0.5), grid, mesh)
  images = np.asarray(random_images(16, grid))
  out = base.keep_indices_for_batch(select, 2, images)
  rng = jax.random.fold_in(jax.random.key(base.MASKING_SEED), 2)
  ref = masking.keep_indices(rng, masking.MaskingSpec("pgs", 0.5, embed_mix=0.0), 16, grid,
                             images=jnp.asarray(images))
  np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("recipe,arg,kind,ratio,batch,lr", [
    ("cluster_vit_b16", "", "cluster", 0.5, 2048, 5e-4),
    ("cluster_vit_b16", "as_coded=1", "cluster", 0.3, 2048, 5e-4),
    ("pgs_vit_b16", "ratio=0.5", "pgs", 0.5, 4096, 1e-3),
])
def test_recipes_carry_the_papers_hyper_parameters(recipe, arg, kind, ratio, batch, lr):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{recipe}").get_config(f"data=/d/*.arrayrecord,{arg}")
  spec = masking.from_config(config.masking)
  assert (spec.kind, spec.ratio, config.batch_size, config.optim.lr) == (kind, ratio, batch, lr)
  assert config.total_epochs == 32 and config.optim.weight_decay == 0.2
  assert spec.num_anchors(196) == (6 if kind == "cluster" else 10)
