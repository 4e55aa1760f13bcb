"""A-CLIP: teacher scores, view remapping, block selection, EMA, SSL losses, the compiled step."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import common
from glip_jax import aclip
from glip_jax import flops
from glip_jax import losses
from glip_jax import masking
from glip_jax import sharding as sharding_lib
from glip_jax import train_step as train_step_lib
from glip_jax.models import clip as clip_lib
from reference_vit import reference_vit

TINY_HEADS = dict(simclr_dims=(64, 64, 32), projector_dims=(64, 32), predictor_dims=(64, 32))


def tiny_config(kind="attentive"):
  config = common.base_config("mu/8", 32)  # a 4×4 grid: 2×2 blocks of 2×2 patches
  config.model.text.context_length = 8
  config.masking.kind, config.masking.ratio = kind, 0.5
  config.optim.update(lr=2e-3, warmup_steps=5, weight_decay=0.0)
  config.method = "aclip"
  config.aclip = aclip.default_config()
  config.aclip.update(TINY_HEADS)
  return config


@pytest.fixture(scope="module")
def tiny_model():
  config = tiny_config()
  model = clip_lib.build_model(config.model)
  params = nn.unbox(model.init(jax.random.key(0), *clip_lib.dummy_inputs(config.model)))["params"]
  return config, model, params


# ----------------------------------------------------------------------------------------------
# Teacher scores.

def test_teacher_scores_equal_cls_attention_averaged_over_layers_and_heads(tiny_model):
  _, model, params = tiny_model
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  out = model.apply({"params": params}, images, None, True, method="image_features")
  scores = aclip.teacher_scores(out["attention"])
  _, rows = reference_vit(params["image"], images)
  assert rows.shape[1] == 2  # both layers of 'mu' enter the average
  np.testing.assert_allclose(scores, rows[..., 1:].mean(axis=(1, 2)), rtol=1e-4, atol=1e-6)
  # Rows of a softmax: the [CLS]→patch part is what is left after the [CLS]→[CLS] weight.
  np.testing.assert_allclose(scores.sum(-1), 1.0 - rows[..., 0].mean(axis=(1, 2)), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Mapping the score map into the online views.

def _random_boxes(rng, n):
  top, left = rng.uniform(0, 0.4, (2, n))
  bottom, right = top + rng.uniform(0.3, 0.6, n), left + rng.uniform(0.3, 0.6, n)
  return np.stack([top, left, bottom, right], axis=1).astype(np.float32)


def test_mapping_with_equal_boxes_is_the_identity():
  rng = np.random.default_rng(0)
  scores = rng.random((5, 14 * 14)).astype(np.float32)
  boxes = _random_boxes(rng, 5)
  mapped = aclip.map_scores_to_view(scores, boxes, boxes, (14, 14))
  np.testing.assert_allclose(mapped, scores, atol=1e-5)
  # Also on a non-square grid.
  scores = rng.random((5, 4 * 6)).astype(np.float32)
  np.testing.assert_allclose(aclip.map_scores_to_view(scores, boxes, boxes, (4, 6)), scores, atol=1e-5)


def _reference_map(scores, teacher_box, view_box, grid):
  """Per-example, per-patch loop: place the patch centre in the teacher view and sample bilinearly."""
  rows, cols = grid
  out = np.zeros_like(scores)
  for b in range(scores.shape[0]):
    smap = scores[b].reshape(rows, cols)
    t0, l0, t1, l1 = teacher_box[b]
    v0, w0, v1, w1 = view_box[b]
    for i in range(rows):
      for j in range(cols):
        y = v0 + (i + 0.5) / rows * (v1 - v0)
        x = w0 + (j + 0.5) / cols * (w1 - w0)
        ty = min(max((y - t0) / (t1 - t0) * rows - 0.5, 0), rows - 1)
        tx = min(max((x - l0) / (l1 - l0) * cols - 0.5, 0), cols - 1)
        y0, x0 = int(math.floor(ty)), int(math.floor(tx))
        y1, x1 = min(y0 + 1, rows - 1), min(x0 + 1, cols - 1)
        fy, fx = ty - y0, tx - x0
        out[b, i * cols + j] = ((1 - fy) * (1 - fx) * smap[y0, x0] + (1 - fy) * fx * smap[y0, x1]
                                + fy * (1 - fx) * smap[y1, x0] + fy * fx * smap[y1, x1])
  return out


def test_mapping_matches_a_per_example_loop():
  rng = np.random.default_rng(1)
  views = _random_boxes(rng, 4)
  teachers = np.concatenate([views[:, :2] * rng.uniform(0, 1, (4, 2)),
                             views[:, 2:] + (1 - views[:, 2:]) * rng.uniform(0, 1, (4, 2))], axis=1)
  scores = rng.random((4, 7 * 5)).astype(np.float32)
  mapped = aclip.map_scores_to_view(scores, teachers, views, (7, 5))
  np.testing.assert_allclose(mapped, _reference_map(scores, teachers, views, (7, 5)), atol=1e-5)


def test_mapping_a_quadrant_view_zooms_into_the_teacher_map():
  # Teacher = whole image with a hot top-left quadrant; a view of exactly that quadrant is all hot.
  scores = np.zeros((1, 8, 8), np.float32)
  scores[0, :4, :4] = 1.0
  mapped = aclip.map_scores_to_view(scores.reshape(1, 64), np.float32([[0, 0, 1, 1]]),
                                    np.float32([[0, 0, 0.5, 0.5]]), (8, 8))
  mapped = np.asarray(mapped).reshape(8, 8)
  assert mapped[:6, :6].min() == pytest.approx(1.0)  # well inside the quadrant
  assert mapped[-1, -1] < 1.0  # the last row/column samples across the quadrant's border


# ----------------------------------------------------------------------------------------------
# Block selection.

def test_kept_counts():
  spec = aclip.ACLIPSpec(total_steps=1)
  assert aclip.num_kept_blocks(49, 0.5) == 25
  assert aclip.num_kept_patches((14, 14), spec) == 100
  assert aclip.num_kept_patches((4, 4), spec) == 8
  assert aclip.num_kept_patches((14, 14), aclip.ACLIPSpec(1, keep_blocks_fraction=0.25)) == 4 * 13
  assert aclip.num_kept_patches((14, 14), aclip.ACLIPSpec(1, block_size=1)) == 98
  assert aclip.num_kept_patches((14, 14), aclip.ACLIPSpec(1, keep_blocks_fraction=1.0)) == 196
  with pytest.raises(ValueError, match="aclip.block_size=4 does not divide the patch grid"):
    aclip.num_kept_patches((14, 14), aclip.ACLIPSpec(1, block_size=4))


def _patches_of_blocks(blocks, grid=(14, 14), size=2):
  cols = grid[1] // size
  out = set()
  for blk in blocks:
    r, c = divmod(int(blk), cols)
    out |= {(r * size + di) * grid[1] + c * size + dj for di in range(size) for dj in range(size)}
  return sorted(out)


def test_top_blocks_are_kept_exactly():
  spec = aclip.ACLIPSpec(total_steps=1)
  rng = np.random.default_rng(0)
  # Distinct block values plus within-block noise smaller than the gaps between blocks.
  block_values = rng.permutation(49).astype(np.float32)
  scores = np.repeat(np.repeat(block_values.reshape(7, 7), 2, 0), 2, 1).reshape(1, 196)
  scores = scores + 0.1 * rng.random((1, 196)).astype(np.float32)
  keep = np.asarray(aclip.attentive_keep_indices(scores, (14, 14), spec))
  assert keep.shape == (1, 100)
  assert keep[0].tolist() == _patches_of_blocks(np.argsort(-block_values)[:25])


def test_a_hot_block_is_kept_and_ties_are_deterministic():
  spec = aclip.ACLIPSpec(total_steps=1)
  scores = np.zeros((2, 14, 14), np.float32)
  scores[0, 6:8, 10:12] = 1.0  # block (3, 5) = 26
  scores[1, 13, 0] = 1.0  # one hot patch lifts its whole block (6, 0) = 42
  keep = np.asarray(aclip.attentive_keep_indices(scores.reshape(2, 196), (14, 14), spec))
  # The other 24 blocks tie at zero: the lowest block indices win, every time.
  assert keep[0].tolist() == _patches_of_blocks([26] + [b for b in range(25) if b != 26][:24])
  assert keep[1].tolist() == _patches_of_blocks([42] + list(range(24)))


def test_selection_is_shard_local_and_equal_to_unsharded():
  """Remapping + block top-K on a batch sharded over 8 devices: same result, no collectives."""
  mesh = sharding_lib.create_mesh({"data": -1})
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  spec = aclip.ACLIPSpec(total_steps=1)
  rng = np.random.default_rng(2)
  scores = rng.random((16, 196)).astype(np.float32)
  views = _random_boxes(rng, 16)
  teachers = np.float32([[0, 0, 1, 1]] * 16)

  def select(s, t, v):
    return aclip.attentive_keep_indices(aclip.map_scores_to_view(s, t, v, (14, 14)), (14, 14),
                                        spec, sharding=batch_sharding)

  fn = jax.jit(select, in_shardings=batch_sharding, out_shardings=batch_sharding)
  args = [jax.device_put(x, batch_sharding) for x in (scores, teachers, views)]
  sharded = np.asarray(fn(*args))
  unsharded = np.asarray(aclip.attentive_keep_indices(
      aclip.map_scores_to_view(scores, teachers, views, (14, 14)), (14, 14), spec))
  np.testing.assert_array_equal(sharded, unsharded)
  hlo = fn.lower(*args).compile().as_text()
  for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert op not in hlo, op


# ----------------------------------------------------------------------------------------------
# EMA.

def test_ema_momentum_schedule_endpoints():
  spec = aclip.ACLIPSpec(total_steps=100)
  assert float(aclip.momentum_at(0, spec)) == pytest.approx(0.996)
  assert float(aclip.momentum_at(50, spec)) == pytest.approx(0.998)
  assert float(aclip.momentum_at(100, spec)) == pytest.approx(1.0)
  assert float(aclip.momentum_at(150, spec)) == pytest.approx(1.0)
  values = [float(aclip.momentum_at(s, spec)) for s in range(101)]
  assert all(a <= b for a, b in zip(values, values[1:]))


def test_ema_update_by_hand():
  ema = {"a": jnp.float32([1.0, 2.0]), "b": {"c": jnp.float32(4.0)}}
  params = {"a": jnp.float32([3.0, 0.0]), "b": {"c": jnp.float32(-4.0)}}
  out = aclip.ema_update(ema, params, jnp.float32(0.75))
  np.testing.assert_allclose(out["a"], [0.75 * 1 + 0.25 * 3, 0.75 * 2])
  np.testing.assert_allclose(out["b"]["c"], 0.75 * 4 - 0.25 * 4)


# ----------------------------------------------------------------------------------------------
# Losses.

def _reference_nt_xent(z1, z2, tau):
  """SimCLR's formulation: 2B anchors, positive = the partner view, all 2B − 2 others negative."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z1)
  sim = z @ z.T / tau
  total = 0.0
  for i in range(2 * n):
    partner = (i + n) % (2 * n)
    others = [j for j in range(2 * n) if j != i]
    total += -(sim[i, partner] - np.log(np.sum(np.exp(sim[i, others]))))
  return total / (2 * n)


def test_nt_xent_matches_numpy():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 6, 5)).astype(np.float32)
  loss, accuracy = losses.nt_xent(z1, z2, 0.1)
  assert float(loss) == pytest.approx(_reference_nt_xent(z1, z2, 0.1), rel=1e-4)
  # Identical views are perfectly matched: high accuracy and a lower loss than random pairs.
  same, same_accuracy = losses.nt_xent(z1, z1, 0.1)
  assert float(same_accuracy) == 1.0 and float(same) < float(loss)


def test_byol_loss_matches_numpy_and_stops_target_gradients():
  rng = np.random.default_rng(0)
  p, z = rng.normal(size=(2, 6, 5)).astype(np.float32)
  cos = np.sum(p * z, 1) / np.linalg.norm(p, axis=1) / np.linalg.norm(z, axis=1)
  assert float(losses.byol_loss(p, z)) == pytest.approx(np.mean(2 - 2 * cos), rel=1e-5)
  assert float(losses.byol_loss(p, 3.0 * p)) == pytest.approx(0.0, abs=1e-6)
  grad_z = jax.grad(lambda z_: losses.byol_loss(p, z_))(z)
  assert not np.any(np.asarray(grad_z))


# ----------------------------------------------------------------------------------------------
# Config.

def test_spec_from_config_validates():
  config = aclip.default_config()
  spec = aclip.spec_from_config(config, 1000)
  assert spec.weights == aclip.LossWeights(0.5, 1.0, 2.0)
  assert spec.ema_momentum == (0.996, 1.0) and spec.total_steps == 1000
  config.typo = 1
  with pytest.raises(ValueError, match=r"aclip has unknown fields \['typo'\]"):
    aclip.spec_from_config(config, 10)
  config = aclip.default_config()
  config.predictor_dims = (64, 128)
  with pytest.raises(ValueError, match=r"aclip.predictor_dims\[-1\]=128 must equal"):
    aclip.spec_from_config(config, 10)
  config = aclip.default_config()
  config.ema_momentum = (1.0, 0.99)
  with pytest.raises(ValueError, match="aclip.ema_momentum"):
    aclip.spec_from_config(config, 10)


def test_flops_b16():
  model = clip_lib.model_config("B/16", 224)
  spec = aclip.spec_from_config(aclip.default_config(), 1)
  total = flops.aclip_train_flops_per_example(model, spec)
  teacher = flops.image_forward_flops(model, 0.0)
  student = flops.image_forward_flops(model, 1 - 100 / 196)
  text = flops.text_forward_flops(model)
  # Heads (fwd): SimCLR 768·4096 + 4096² + 4096·256, projector 768·4096 + 4096·256, predictor
  # 256·4096 + 4096·256, teacher projector once more.
  heads = 2 * (768 * 4096 + 4096 ** 2 + 4096 * 256 + 768 * 4096 + 4096 * 256 + 2 * 256 * 4096)
  teacher_proj = 2 * (768 * 4096 + 4096 * 256)
  assert total == pytest.approx(teacher + teacher_proj + 3 * (2 * student + text + 2 * heads))
  assert 150e9 < total < 170e9  # vs 123 GFLOPs for unmasked CLIP (SPEC §7)
  # The random ablation keeps 98 of 196.
  random = flops.aclip_train_flops_per_example(model, spec, masking.MaskingSpec("random", 0.5))
  assert random == pytest.approx(total - 3 * 2 * (student - flops.image_forward_flops(model, 0.5)))
  assert random < total
  assert flops.aclip_train_flops_per_example(
      model, spec, masking.MaskingSpec("attentive", 0.5)) == pytest.approx(total)
  assert flops.aclip_train_flops_per_example(model, aclip.default_config()) == pytest.approx(total)


# ----------------------------------------------------------------------------------------------
# The compiled step on 8 devices.

def _views_batch(batch_size=16):
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
           for k in ("image", "image2", "teacher_image")}
  batch["text"] = rng.integers(1, 5000, (batch_size, 8)).astype(np.int32)
  batch["box1"] = _random_boxes(rng, batch_size)
  batch["box2"] = _random_boxes(rng, batch_size)
  union = np.concatenate([np.minimum(batch["box1"][:, :2], batch["box2"][:, :2]),
                          np.maximum(batch["box1"][:, 2:], batch["box2"][:, 2:])], axis=1)
  batch["teacher_box"] = np.concatenate([union[:, :2] * 0.5, np.minimum(union[:, 2:] + 0.1, 1)], 1)
  return batch


def _setup(kind, total_steps):
  config = tiny_config(kind)
  mesh = sharding_lib.create_mesh({"data": -1})
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, total_steps)
  spec_a = aclip.spec_from_config(config.aclip, total_steps)
  spec = train_step_lib.StepSpec(masking.from_config(config.masking), clip_lib.grid(config.model))
  return config, mesh, model, tx, schedule, spec, spec_a


def _compiled(kind, total_steps):
  config, mesh, model, tx, schedule, spec, spec_a = _setup(kind, total_steps)
  state, shardings = aclip.create_train_state(model, tx, config.model, mesh, 0, spec_a)
  step = aclip.compile_train_step(model, tx, schedule, spec, mesh, shardings, spec_a)
  return model, state, step, spec_a


def test_aclip_step_learns_and_updates_the_teacher():
  model, state, step, spec_a = _compiled("attentive", total_steps=20)
  assert set(state.params) == {"image", "text", "logit_scale", aclip.HEADS_KEY}
  assert set(state.params[aclip.HEADS_KEY]) == {"simclr", "projector", "predictor"}
  # The teacher starts as the student; the plain CLIP init with the same seed gives the same towers.
  np.testing.assert_array_equal(state.ema_params["image"]["proj"], state.params["image"]["proj"])
  # Move the teacher away from the student so that the EMA update is visible, then check one step
  # against the hand computation m·ema + (1 − m)·params with m = 0.996 at step 0.
  ema = jax.tree.map(lambda x: x * 0.5 + 0.1, state.ema_params)
  state = state.replace(ema_params=ema)
  params_before = jax.tree.map(np.asarray, aclip.teacher_source(state.params))
  ema_before = jax.tree.map(np.asarray, ema)
  batch = _views_batch()
  state, metrics = step(state, batch)
  expected = jax.tree.map(lambda e, p: 0.996 * e + 0.004 * p, ema_before, params_before)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.tree.map(np.asarray, state.ema_params), expected)
  assert set(metrics) >= {"loss", "loss_clip", "loss_simclr", "loss_byol", "i2t_accuracy",
                          "t2i_accuracy", "kept_tokens", "ema_momentum", "lr", "grad_norm"}
  assert float(metrics["kept_tokens"]) == 8  # 2 of the 4 blocks of 2×2 patches
  assert float(metrics["ema_momentum"]) == pytest.approx(0.996)
  w = spec_a.weights
  assert float(metrics["loss"]) == pytest.approx(
      2 * w.clip * float(metrics["loss_clip"]) + w.simclr * float(metrics["loss_simclr"])
      + w.byol * float(metrics["loss_byol"]), rel=1e-5)
  losses = [float(metrics["loss"])]
  for _ in range(19):
    state, metrics = step(state, batch)
    # Reading a scalar keeps one step in flight (XLA:CPU collectives can deadlock on 2 cores).
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0]
  assert float(metrics["loss_clip"]) < 0.5 * math.log(16)
  assert float(metrics["ema_momentum"]) == pytest.approx(aclip.momentum_at(19, spec_a))
  assert int(state.step) == 20
  # Evaluation code uses state.params as CLIP params unchanged: the heads are simply ignored.
  emb = model.apply({"params": state.params}, batch["image"][:2], method="encode_image")
  assert emb.shape == (2, 64)


def test_random_ablation_step_traces():
  """The 'random 2×50%' ablation: same views and losses, the standard random kernel per view."""
  _, _, model, tx, schedule, spec, spec_a = _setup("random", total_steps=10)

  def init():
    images, tokens = clip_lib.dummy_inputs(tiny_config().model)
    params = dict(nn.unbox(model.init(jax.random.key(0), images, tokens))["params"])
    params[aclip.HEADS_KEY] = nn.unbox(aclip.build_heads(model, spec_a).init(
        jax.random.key(1), jnp.zeros((1, 64))))["params"]
    return aclip.ACLIPState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params), ema_params=aclip.teacher_source(params))

  state = jax.eval_shape(init)  # abstract: tracing only, nothing is compiled
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _views_batch())
  step = functools.partial(aclip.train_step, model=model, tx=tx, schedule=schedule, spec=spec,
                           aclip_spec=spec_a)
  assert "top_k" in str(jax.make_jaxpr(step)(state, batch))
  new_state, metrics = jax.eval_shape(step, state, batch)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert {"loss_clip", "loss_simclr", "loss_byol", "ema_momentum"} <= set(metrics)


@pytest.mark.slow
def test_random_ablation_step_runs():
  _, state, step, _ = _compiled("random", total_steps=10)
  state, metrics = step(state, _views_batch())
  assert float(metrics["kept_tokens"]) == masking.num_kept(16, 0.5)
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("ablation,kind", [("none", "attentive"), ("random", "random")])
def test_recipe_config(ablation, kind):
  from configs import aclip_vit_b16
  config = aclip_vit_b16.get_config(f"data=/data/yfcc/*.arrayrecord,ablation={ablation}")
  spec = aclip.spec_from_config(config.aclip, 100)
  assert masking.from_config(config.masking).kind == kind
  assert aclip.num_kept_patches(clip_lib.grid(config.model), spec) == 100
  assert config.optim.lr == 5e-4 and config.optim.end_lr == 1e-5 and config.optim.weight_decay == 0.5
  assert (config.optim.b1, config.optim.b2) == (0.9, 0.98)
  assert config.batch_size == 4096 and config.total_epochs == 25
  assert config.optim.warmup_steps == math.ceil(15_000_000 / 4096)  # one epoch
  with pytest.raises(ValueError, match="ablation='grid'"):
    aclip_vit_b16.get_config("data=/x,ablation=grid")
