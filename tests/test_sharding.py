"""Mesh construction, parameter shardings, and the train step's invariance to the mesh."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from glip_jax import masking
from glip_jax import sharding as sharding_lib
from glip_jax import train_step as train_step_lib
from glip_jax.models import clip as clip_lib
from configs import common


@pytest.mark.parametrize("sizes,expected", [
    ({"data": -1}, (8, 1, 1)),
    ({"data": 4, "fsdp": 2}, (4, 2, 1)),
    ({"data": -1, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
    ({"fsdp": 8}, (1, 8, 1)),
])
def test_mesh_shape(sizes, expected):
  assert sharding_lib.mesh_shape(sizes, 8) == expected


@pytest.mark.parametrize("sizes,message", [
    ({"data": 3}, r"multiplies to 3 devices but 8 are available"),
    ({"data": -1, "fsdp": -1}, r"at most one axis may be -1"),
    ({"data": -1, "fsdp": 3}, r"do not divide the 8 available devices"),
    ({"model": 8}, r"unknown axes \['model'\]; allowed: \['data', 'fsdp', 'tensor'\]"),
])
def test_bad_mesh(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding_lib.mesh_shape(sizes, 8)


def test_batch_size_must_divide_data_parallel_size():
  mesh = sharding_lib.create_mesh({"data": 4, "fsdp": 2})
  with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the data-parallel size 8"):
    sharding_lib.check_batch_size(12, mesh)
  sharding_lib.check_batch_size(16, mesh)


def tiny_config():
  config = common.base_config("mu/8", 32)
  config.model.text.context_length = 8
  config.batch_size = 16
  config.masking.kind, config.masking.ratio = "gaussian", 0.5
  config.optim.warmup_steps = 1
  config.optim.lr = 1e-3
  return config


def run_steps(config, mesh_sizes, devices, steps=3):
  mesh = sharding_lib.create_mesh(mesh_sizes, devices)
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, 10)
  state, shardings = train_step_lib.create_train_state(model, tx, config.model, mesh, config.seed)
  spec = train_step_lib.StepSpec(masking.MaskingSpec(**config.masking), clip_lib.grid(config.model),
                                 seed=config.seed)
  step = train_step_lib.compile_train_step(model, tx, schedule, spec, mesh, shardings)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
           "text": rng.integers(1, 500, (16, 8)).astype(np.int32)}
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single_device_run():
  return run_steps(tiny_config(), {"data": 1}, jax.devices()[:1])


@pytest.mark.parametrize("mesh_sizes", [{"data": 4, "fsdp": 2}, {"fsdp": 8}])
def test_train_step_is_mesh_invariant(single_device_run, mesh_sizes):
  ref_losses, ref_params, _ = single_device_run
  losses, params, state = run_steps(tiny_config(), mesh_sizes, jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params)
  # FSDP really shards the weights: the qkv kernel's width axis is split over 'fsdp'.
  qkv = state.params["image"]["transformer"]["resblocks_0"]["attn"]["in_proj"]["kernel"]
  assert qkv.sharding.spec == P("fsdp", None, None, None)
  assert state.opt_state[1][0].mu["image"]["conv1"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
