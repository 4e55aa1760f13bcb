"""Device prefetch: the same global batches as without it, and checkpoints that count consumed
(not prefetched) batches, through Grain's Orbax checkpoint handler."""

import time

import grain
import jax
import numpy as np
import pytest
from etils import epath
from jax.sharding import AxisType

from glip_jax.data import config as config_lib
from glip_jax.data import pipeline
from glip_jax.data import prefetch
from glip_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 3)


def _host(worker_count=0):
  cfg = config_lib.default_data_config()
  cfg.synthetic.update(dict(image_size=16, train_size=100))
  cfg.worker_count = worker_count
  return pipeline.make_train_iterator(
      cfg,
      global_batch_size=8,
      image_size=16,
      seed=0,
      tokenizer=Tokenizer(context_length=8),
      shard_options=grain.sharding.ShardOptions(0, 1),
  )


def _assert_equal(got, want):
  assert set(got) == set(want)
  for key in want:
    assert isinstance(got[key], jax.Array) and len(got[key].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_same_batches_as_without_prefetch(mesh):
  plain = _host()
  expected = [next(plain) for _ in range(5)]
  it = prefetch.DevicePrefetch(_host(), mesh, size=3, keys=("image", "text"))
  try:
    for want in expected:
      _assert_equal(next(it), {k: want[k] for k in ("image", "text")})
  finally:
    it.close()


def test_state_counts_consumed_batches_and_resume_is_exact(mesh, tmp_path):
  plain = _host()
  for _ in range(3):
    next(plain)
  state_after_3 = plain.get_state()
  expected = [next(plain) for _ in range(3)]

  it = prefetch.DevicePrefetch(_host(), mesh, size=3)
  for _ in range(3):
    next(it)
  time.sleep(0.5)  # Let the producer run ahead: it holds batches 4-6 (and is computing 7).
  assert it._queue.qsize() > 0  # The situation this test is about: batches prefetched.
  assert it.get_state() == state_after_3
  directory = epath.Path(tmp_path) / "data"
  directory.mkdir()
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(directory, args=grain.checkpoint.CheckpointSave(it))
  it.close()

  restored = prefetch.DevicePrefetch(_host(), mesh, size=2)  # As after a restart.
  handler.restore(directory, args=grain.checkpoint.CheckpointRestore(restored))
  try:
    for want in expected:
      _assert_equal(next(restored), want)
    # set_state on a running iterator drops its prefetched batches and rewinds exactly.
    restored.set_state(state_after_3)
    _assert_equal(next(restored), expected[0])
  finally:
    restored.close()


def test_worker_processes_behind_prefetch(mesh):
  plain = _host()
  expected = [next(plain) for _ in range(2)]
  it = prefetch.DevicePrefetch(_host(worker_count=1), mesh, size=2)
  try:
    for want in expected:
      _assert_equal(next(it), want)
  finally:
    it.close()


def test_errors_reach_the_consumer(mesh):
  with pytest.raises(ValueError, match="size=0"):
    prefetch.DevicePrefetch(_host(), mesh, size=0)

  def broken(batch):
    raise RuntimeError("transfer failed")

  it = prefetch.DevicePrefetch(_host(), size=2, to_device=broken)
  with pytest.raises(RuntimeError, match="transfer failed"):
    next(it)
  it.close()
