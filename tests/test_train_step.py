"""Optimizer, schedule and the train step's learning behaviour."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glip_jax import masking
from glip_jax import sharding as sharding_lib
from glip_jax import train_step as train_step_lib
from glip_jax.models import clip as clip_lib
from configs import common


def test_weight_decay_mask():
  config = clip_lib.model_config("mu/8", 32)
  model = clip_lib.build_model(config)
  import flax.linen as nn
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *clip_lib.dummy_inputs(config))))["params"]
  mask = train_step_lib.weight_decay_mask(params)
  assert mask["image"]["conv1"]["kernel"]
  assert mask["image"]["proj"] and mask["text"]["text_projection"]
  assert mask["text"]["token_embedding"]["embedding"]
  assert mask["image"]["transformer"]["resblocks_0"]["attn"]["in_proj"]["kernel"]
  assert not mask["image"]["transformer"]["resblocks_0"]["attn"]["in_proj"]["bias"]  # 3-D bias
  assert not mask["image"]["ln_pre"]["norm"]["scale"]
  assert not mask["image"]["positional_embedding"]
  assert not mask["text"]["positional_embedding"]
  assert not mask["image"]["class_embedding"]
  assert not mask["logit_scale"]


def test_schedule():
  config = common.base_config()
  config.optim.update(lr=1.0, warmup_steps=10, end_lr=0.1)
  schedule = train_step_lib.make_schedule(config.optim, 110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.55, abs=1e-3)  # half-way down the cosine
  assert float(schedule(110)) == pytest.approx(0.1)


def test_step_rng_depends_only_on_seed_and_step():
  a = jax.random.key_data(train_step_lib.step_rng(0, jnp.int32(5)))
  b = jax.random.key_data(train_step_lib.step_rng(0, jnp.int32(5)))
  c = jax.random.key_data(train_step_lib.step_rng(0, jnp.int32(6)))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_learns_a_fixed_set_and_clamps_temperature():
  """100 steps on 64 fixed random pairs drive the contrastive loss close to zero."""
  config = common.base_config("mu/8", 32)
  config.model.text.context_length = 8
  config.masking.kind, config.masking.ratio = "random", 0.5
  config.optim.update(lr=2e-3, warmup_steps=10, weight_decay=0.0)
  mesh = sharding_lib.create_mesh({"data": -1})
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, 100)
  state, shardings = train_step_lib.create_train_state(model, tx, config.model, mesh, 0)
  spec = train_step_lib.StepSpec(masking.MaskingSpec(**config.masking), clip_lib.grid(config.model))
  step = train_step_lib.compile_train_step(model, tx, schedule, spec, mesh, shardings)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
           "text": rng.integers(1, 5000, (64, 8)).astype(np.int32)}
  losses = []
  for _ in range(100):
    state, metrics = step(state, batch)
    # Reading the loss keeps one step in flight: XLA:CPU's collectives can deadlock when many
    # 8-device steps are queued on 2 cores.
    losses.append(float(metrics["loss"]))
  assert losses[0] > 0.7 * math.log(64)  # starts near chance
  assert float(metrics["loss"]) < 0.05
  assert float(metrics["i2t_accuracy"]) == 1.0 and float(metrics["t2i_accuracy"]) == 1.0
  assert float(metrics["kept_tokens"]) == 8
  assert int(state.step) == 100
  # The temperature is clamped at ln(100) after the update, whatever the gradient does.
  state = state.replace(params={**state.params, "logit_scale": jnp.float32(9.0)})
  state, metrics = step(state, batch)
  assert float(state.params["logit_scale"]) == pytest.approx(math.log(100.0))


def _tiny_config(**loss):
  config = common.base_config("mu/8", 32)
  config.model.text.context_length = 8
  config.masking.kind, config.masking.ratio = "random", 0.5
  config.optim.update(lr=1e-3, warmup_steps=1)
  config.loss.update(loss)
  return config


def _one_step(config, mesh_sizes, accum_steps=1):
  """Metrics and parameters after one step from the same init on a 32-example batch."""
  devices = jax.devices()[:1] if mesh_sizes == {"data": 1} else jax.devices()
  mesh = sharding_lib.create_mesh(mesh_sizes, devices)
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, 10)
  state, shardings = train_step_lib.create_train_state(model, tx, config.model, mesh, 0)
  spec = train_step_lib.StepSpec(masking.MaskingSpec(**config.masking), clip_lib.grid(config.model),
                                 loss=config.loss.kind, loss_impl=config.loss.impl,
                                 accum_steps=accum_steps)
  step = train_step_lib.compile_train_step(model, tx, schedule, spec, mesh, shardings)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
           "text": rng.integers(1, 500, (32, 8)).astype(np.int32)}
  state, metrics = step(state, batch)
  return jax.device_get(metrics), jax.device_get(state.params)


def _assert_same_step(a, b):
  metrics_a, params_a = a
  metrics_b, params_b = b
  assert metrics_a.keys() == metrics_b.keys()
  for name in metrics_a:
    np.testing.assert_allclose(metrics_a[name], metrics_b[name], rtol=2e-5, err_msg=name)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               params_a, params_b)


@pytest.fixture(scope="module")
def dense_step():
  return _one_step(_tiny_config(impl="dense"), {"data": 1})


@pytest.mark.parametrize("mesh_sizes", [
    pytest.param({"data": 1}, marks=pytest.mark.slow),  # the 1-device ring: also in test_losses
    pytest.param({"data": 4, "fsdp": 2}, marks=pytest.mark.slow),  # 4×2: also in test_losses
    {"data": 8}])
def test_ring_loss_step_equals_dense(dense_step, mesh_sizes):
  """With masking on: same loss, accuracies, gradient norm and updated parameters."""
  _assert_same_step(_one_step(_tiny_config(impl="ring"), mesh_sizes), dense_step)


@pytest.mark.parametrize("loss", [dict(impl="dense"),
                                  pytest.param(dict(impl="ring"), marks=pytest.mark.slow)])
def test_accumulated_step_equals_full_batch(dense_step, loss):
  """4 micro-batches with cached features: the same masks, metrics and update as one batch."""
  _assert_same_step(_one_step(_tiny_config(**loss), {"data": 8}, accum_steps=4), dense_step)


def test_bad_accum_steps():
  with pytest.raises(ValueError, match=r"optim.accum_steps=0 is invalid"):
    train_step_lib.check_accum_steps(0)
  with pytest.raises(ValueError, match=r"batch_size=48 is not divisible by optim.accum_steps × "
                                       r"the data-parallel size = 4 × 8"):
    train_step_lib.check_accum_steps(4, 48, 8)
