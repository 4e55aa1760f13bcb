"""Tests for glip_jax.checkpointing on the 8 fake CPU devices."""
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import flax.struct
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from glip_jax import checkpointing as ck


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4)
              .to_iter_dataset())


@pytest.fixture(scope="module")
def mesh8():
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))


@pytest.fixture(scope="module")
def mesh42():
  return jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)


@pytest.fixture(scope="module")
def state(mesh8):
  params = {
      "w": jax.device_put(jnp.arange(256.0).reshape(32, 8),
                          NamedSharding(mesh8, P("data"))),
      "b": jax.device_put(jnp.arange(8.0), NamedSharding(mesh8, P())),
  }
  return TrainState(step=jnp.array(7, jnp.int32), params=params,
                    opt_state=optax.adamw(1e-3).init(params))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, state):
  """A workdir with checkpoints/2 holding `state` and an iterator 2 batches in."""
  workdir = tmp_path_factory.mktemp("workdir")
  directory = workdir / "checkpoints"
  iterator = _iterator()
  next(iterator), next(iterator)
  manager = ck.create_manager(directory, keep=3)
  assert ck.save(manager, 2, state, iterator, {"model": {"width": 8}})
  manager.wait_until_finished()
  manager.close()
  expected_batches = [next(iterator) for _ in range(3)]
  return workdir, directory, expected_batches


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def test_round_trip_state_and_iterator(saved, state):
  _, directory, expected_batches = saved
  manager = ck.create_manager(directory, keep=3)
  assert ck.latest_step(manager) == 2
  iterator = _iterator()
  restored = ck.restore(manager, 2, ck.abstract_like(state), iterator)
  _assert_trees_equal(restored, state)
  assert restored.params["w"].sharding == state.params["w"].sharding
  for expected in expected_batches:
    np.testing.assert_array_equal(next(iterator), expected)
  assert ck.load_config(directory) == {"model": {"width": 8}}


def test_restore_onto_different_mesh(saved, state, mesh42):
  _, directory, _ = saved
  manager = ck.create_manager(directory, keep=3)
  shardings = jax.tree.map(lambda x: NamedSharding(mesh42, P()), state)
  shardings = shardings.replace(params={
      "w": NamedSharding(mesh42, P("a", "b")),
      "b": jax.sharding.SingleDeviceSharding(jax.devices()[3]),
  })
  restored = ck.restore(manager, 2, ck.abstract_like(state, shardings))
  _assert_trees_equal(restored, state)
  assert restored.params["w"].sharding == shardings.params["w"]
  assert restored.params["b"].sharding == shardings.params["b"]
  assert restored.step.sharding == NamedSharding(mesh42, P())


def test_params_only_restore(saved, state, mesh42):
  workdir, directory, _ = saved
  target = {
      "w": jax.ShapeDtypeStruct((32, 8), jnp.float32,
                                sharding=NamedSharding(mesh42, P(None, "b"))),
      "b": jax.ShapeDtypeStruct((8,), jnp.float32,
                                sharding=NamedSharding(mesh42, P())),
  }
  # From the workdir, the checkpoint directory and the step directory.
  for path, step in ((workdir, None), (directory, 2), (directory / "2", None)):
    params = ck.restore_params_from(path, target, step)
    _assert_trees_equal(params, state.params)
    assert params["w"].sharding == target["w"].sharding
  opt_state = ck.restore_subtrees(workdir, {"opt_state": ck.abstract_like(
      state.opt_state)})["opt_state"]
  _assert_trees_equal(opt_state, state.opt_state)
  with pytest.raises(FileNotFoundError):
    ck.restore_params_from(directory, target, step=5)


def test_retention_keep_last_and_every(tmp_path):
  manager = ck.create_manager(tmp_path, keep=2, keep_every=4)
  tree = {"x": jnp.zeros(2)}
  # The trainer decides when to save (checkpoint_every_steps, the end, preemption); every call saves.
  saved_steps = [s for s in range(2, 15, 2) if ck.save(manager, s, tree, None, {})]
  manager.wait_until_finished()
  assert saved_steps == [2, 4, 6, 8, 10, 12, 14]
  assert ck.all_steps(tmp_path) == [4, 8, 12, 14]
  assert manager.all_steps() == [4, 8, 12, 14]
  assert ck.save(manager, 15, tree, None, {})  # off the every-N grid (a final/preemption save)
  manager.wait_until_finished()
  assert ck.all_steps(tmp_path) == [4, 8, 12, 14, 15]
  manager.close()


def test_incomplete_checkpoint_ignored(saved, tmp_path):
  _, directory, _ = saved
  # What a save killed before its commit leaves behind.
  partial = directory / "9.orbax-checkpoint-tmp"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_text("x")
  assert ck.all_steps(directory) == [2]
  assert not ck.is_complete(partial)
  assert ck.is_complete(directory / "2")
  manager = ck.create_manager(directory, keep=3)
  assert ck.latest_step(manager) == 2
  assert ck.all_steps(tmp_path / "missing") == []


_KILLED_SAVER = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from glip_jax import checkpointing as ck
    manager = ck.create_manager(sys.argv[1], keep=3)
    ck.save(manager, 1, {"x": jnp.zeros(4)}, None, {})
    ck.raise_if_save_failed(manager, 1, wait=True)
    # $GLIP_JAX_TEST_EXIT_AT=save:2:<moment> SIGKILLs this process inside the save of step 2.
    ck.save(manager, 2, {"x": jnp.ones(4)}, None, {})
    ck.raise_if_save_failed(manager, 2, wait=True)
    print("not killed")
""")


def _start_killed_saver(directory, moment):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             **{ck.TEST_EXIT_ENV: f"save:2:{moment}"})
  return subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, str(directory)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_killed(proc, directory, expected_latest):
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == -signal.SIGKILL, out[-2000:]
  assert ck.all_steps(directory) == list(range(1, expected_latest + 1))
  return sorted(p for p in os.listdir(directory) if p.startswith("2."))  # uncommitted leftovers


def _restore_after_kill(directory, expected_latest):
  manager = ck.create_manager(directory, keep=3)
  step, restored = ck.restore_latest(manager, {"x": jax.ShapeDtypeStruct(
      (4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))})
  assert step == expected_latest
  np.testing.assert_array_equal(restored["x"], np.full(4, float(expected_latest == 2)))
  if expected_latest == 1:  # the resumed run saves step 2 again: the leftovers do not block it
    ck.save(manager, 2, {"x": jnp.full(4, 5.0)}, None, {})
    ck.raise_if_save_failed(manager, 2, wait=True)
    assert ck.all_steps(directory) == [1, 2]
  manager.close()


def test_kill_mid_save_leaves_previous_latest(tmp_path):
  # Killed with every file of step 2 written but before the commit (the rename): step 1 stays latest.
  leftovers = _wait_killed(_start_killed_saver(tmp_path, "written"), tmp_path, 1)
  assert len(leftovers) == 1 and ".orbax-checkpoint-tmp" in leftovers[0]
  assert os.path.exists(tmp_path / leftovers[0] / "state" / "manifest.ocdbt")  # written in full
  _restore_after_kill(tmp_path, 1)


@pytest.mark.slow  # three more subprocesses (~20 s); .ci/run runs it
def test_kill_at_every_moment_of_an_async_save(tmp_path):
  moments = {"before": 1, "dispatched": 1, "committed": 2}
  procs = {m: _start_killed_saver(tmp_path / m, m) for m in moments}  # concurrently
  for moment, expected in moments.items():
    _wait_killed(procs[moment], tmp_path / moment, expected)
    _restore_after_kill(tmp_path / moment, expected)


def test_sigterm_sets_flag(tmp_path):
  before = signal.getsignal(signal.SIGTERM)
  flag = ck.install_sigterm_handler()
  try:
    manager = ck.create_manager(tmp_path, keep=1)
    assert not ck.should_stop(flag, manager, 1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested
    assert ck.should_stop(flag, manager, 2)
  finally:
    flag.uninstall()
  assert signal.getsignal(signal.SIGTERM) == before


def test_checkpoint_flag_refuses_a_save_that_never_finished(tmp_path):
  """--checkpoint=<the temporary directory a killed save left> is an error, not an evaluation of
  half-written parameters; a complete step directory copied under another name still works."""
  partial = tmp_path / "2.orbax-checkpoint-tmp-1733"
  (partial / "state").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="a checkpoint save that never finished"):
    ck.resolve_step_dir(partial)
  copied = tmp_path / "best"
  (copied / "state").mkdir(parents=True)
  assert ck.resolve_step_dir(copied) == (copied, None)
