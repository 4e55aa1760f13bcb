"""Tests for the checkpoint watcher (the --mode=eval job) on a tiny model and synthetic data."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np

import ml_collections
import optax
import pytest

from configs import common
from glip_jax import checkpointing
from glip_jax import logging as logging_lib
from glip_jax import sharding
from glip_jax import train_step
from glip_jax.evaluation import builder
from glip_jax.evaluation import watcher
from glip_jax.models import clip

FINAL_STEP = 4
METRIC = "eval/shape/zeroshot_top1"


def _config(total_steps: int = FINAL_STEP) -> ml_collections.ConfigDict:
  c = common.base_config("mu/8", 32)
  c.model.text.context_length = 16
  c.total_steps = total_steps
  c.evals = ml_collections.ConfigDict(dict(shape=dict(
      kind="zeroshot", batch_size=32, classnames="synthetic:shape", templates="synthetic",
      dataset=dict(source="synthetic",
                   synthetic=dict(image_size=32, split="test", label="shape", eval_size=32)))))
  return c


# Saves a state at step 2 and is SIGKILLed by checkpointing.exit_point with every file written
# but the temporary directory not yet renamed: the leftover a trainer killed mid-save leaves.
_KILLED_SAVER = textwrap.dedent("""
    import pickle, sys
    from glip_jax import checkpointing as ck
    with open(sys.argv[2], "rb") as f:
      tree = pickle.load(f)
    manager = ck.create_manager(sys.argv[1], keep=3)
    ck.save(manager, 2, tree, None, {})
    ck.raise_if_save_failed(manager, 2, wait=True)
    print("not killed")
""")
PARTIAL_KEY = 99  # the noise key of the killed save's parameters (no step has it)


def _perturbed(params, key: int):
  """`params` plus leaf-wise Gaussian noise from `key`: each step's checkpoint differs."""
  # On the host and put back with the same shardings: nothing to compile (jitting the noise over
  # sharded leaves takes far longer than this whole module otherwise).
  rng = np.random.default_rng(key)
  noisy = jax.tree.map(
      lambda x: x + 0.5 * (x.std() + 0.02) * rng.standard_normal(x.shape).astype(x.dtype),
      jax.device_get(params))
  return jax.device_put(noisy, jax.tree.map(lambda x: x.sharding, params))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(state, {key: params}, {key: metrics computed directly from those params}, partial dir).

  Keys are the steps 1..FINAL_STEP and PARTIAL_KEY; the partial save of PARTIAL_KEY's params is
  written by a subprocess killed mid-save (started first, so it runs while this one compiles).
  """
  config = _config()
  mesh = sharding.create_mesh(config.mesh)
  model = clip.build_model(config.model)
  state, _ = train_step.create_train_state(model, optax.sgd(0.1), config.model, mesh, seed=0)
  params = {k: _perturbed(state.params, k) for k in (*range(1, FINAL_STEP + 1), PARTIAL_KEY)}
  killed = tmp_path_factory.mktemp("killed")
  with open(killed / "tree.pkl", "wb") as f:
    pickle.dump(jax.device_get(state.replace(step=2, params=params[PARTIAL_KEY])), f)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             **{checkpointing.TEST_EXIT_ENV: "save:2:written"})
  proc = subprocess.Popen(
      [sys.executable, "-c", _KILLED_SAVER, os.fspath(killed / "ckpt"),
       os.fspath(killed / "tree.pkl")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  evaluators = builder.build_evaluators(config, model, mesh)
  direct = {k: builder.run_evaluators(evaluators, p) for k, p in params.items()}
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == -signal.SIGKILL, out[-2000:]
  [partial] = os.listdir(killed / "ckpt")
  assert ".orbax-checkpoint-tmp" in partial and partial.startswith("2.")
  # Written in full, so a watcher that listed it would read it without error.
  assert os.path.exists(killed / "ckpt" / partial / "state" / "manifest.ocdbt")
  return state, params, direct, killed / "ckpt" / partial


@pytest.fixture(scope="module")
def watched(tmp_path_factory, setup):
  """A workdir watched while checkpoints appear: 1 before, 2 and 3 after one poll, 4 later.

  Each step's checkpoint holds its own parameters. Step 3 is deleted (as keep-N would) between
  listing and restoring; the partial save of step 2 left by a killed save (other parameters) lies
  around from the start.
  """
  state, params, _, killed_partial = setup
  workdir = tmp_path_factory.mktemp("run")
  config = _config()
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  manager = checkpointing.create_manager(ckpt_dir, keep=10)

  def save(*steps):
    for step in steps:
      checkpointing.save(manager, step, state.replace(step=step, params=params[step]), None,
                         config)
    manager.wait_until_finished()

  save(1)
  # After the manager's first save: its start-up cleanup of temporary directories is done.
  shutil.copytree(killed_partial, ckpt_dir / killed_partial.name)
  plan = [lambda: save(2, 3), lambda: save(FINAL_STEP)]
  sleeps = []

  def fake_sleep(seconds):
    sleeps.append(seconds)
    plan.pop(0)()

  restore = checkpointing.restore_params_from

  def restore_after_deleting_3(path, *args, **kwargs):
    if os.path.basename(os.fspath(path)) == "3":
      shutil.rmtree(path)
    return restore(path, *args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(watcher, "_sleep", fake_sleep)
    mp.setattr(checkpointing, "restore_params_from", restore_after_deleting_3)
    results = watcher.run_watcher(config, workdir, poll_seconds=0.01)
  manager.close()
  return workdir, results, sleeps


def _metric_lines(workdir):
  return logging_lib.read_metrics_jsonl(os.fspath(watcher.eval_dir(workdir) / "metrics.jsonl"))


def test_each_step_is_scored_on_its_own_parameters(setup, watched):
  _, _, direct, _ = setup
  _, results, _ = watched
  # The checkpoints differ in what they score, so restoring another step's (or the killed
  # save's) parameters would show.
  scores = [tuple(sorted(direct[k].items())) for k in (1, 2, FINAL_STEP, PARTIAL_KEY)]
  assert len(set(scores)) == len(scores), scores
  for step in (1, 2, FINAL_STEP):
    assert results[step] == pytest.approx(direct[step], abs=1e-6), step


def test_evaluates_each_complete_checkpoint_once_and_exits_after_final(watched):
  workdir, results, sleeps = watched
  # 3 was deleted before it could be read; the killed save of 2 was never read as a checkpoint.
  assert sorted(results) == [1, 2, FINAL_STEP]
  assert len(sleeps) == 2  # exited right after the final step, without another poll
  for metrics in results.values():
    assert set(metrics) == {f"eval/shape/zeroshot_{k}"
                            for k in ("top1", "top5", "mean_per_class_recall")}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
  lines = _metric_lines(workdir)
  assert [line["step"] for line in lines] == [1, 2, FINAL_STEP]
  assert lines[-1][METRIC] == pytest.approx(results[FINAL_STEP][METRIC])
  assert not (watcher.eval_dir(workdir) / watcher.DAMAGED_FILENAME).exists()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(watcher.eval_dir(workdir)))
  record = json.loads((watcher.eval_dir(workdir) / "evaluated.json").read_text())
  assert record == {"steps": [1, 2, FINAL_STEP]}


def test_restart_evaluates_nothing_again(watched):
  workdir, _, _ = watched
  before = (watcher.eval_dir(workdir) / "metrics.jsonl").read_text()
  assert watcher.run_watcher(_config(), workdir, poll_seconds=0.01) == {}
  assert (watcher.eval_dir(workdir) / "metrics.jsonl").read_text() == before


def test_timeout_zero_is_one_pass_without_waiting(watched, monkeypatch):
  workdir, _, _ = watched

  def no_sleep(seconds):
    raise AssertionError(f"slept {seconds}s with timeout_seconds=0")

  monkeypatch.setattr(watcher, "_sleep", no_sleep)
  # Final step 99 never comes and every existing checkpoint is done: a zero timeout lists once
  # and returns (the deadline is already reached after the first pass), never sleeping.
  assert watcher.run_watcher(_config(total_steps=99), workdir, poll_seconds=0.01,
                             timeout_seconds=0) == {}


def test_timeout_polls_until_the_deadline(watched, monkeypatch):
  workdir, _, _ = watched
  # A clock that only the watcher's sleeps advance: the polls and the last, shortened wait are
  # exact, however long a pass takes in real time.
  now = [0.0]
  sleeps = []

  def fake_sleep(seconds):
    sleeps.append(seconds)
    now[0] += seconds

  monkeypatch.setattr(watcher, "_sleep", fake_sleep)
  monkeypatch.setattr(watcher, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
  assert watcher.run_watcher(_config(total_steps=99), workdir, poll_seconds=0.4,
                             timeout_seconds=1.0) == {}
  assert sleeps == pytest.approx([0.4, 0.4, 0.2])


def test_single_checkpoint_prints_table(watched, capsys):
  workdir, results, _ = watched
  out = watcher.run_watcher(_config(), workdir, checkpoint=os.fspath(workdir))
  assert out == pytest.approx(results[FINAL_STEP])
  printed = capsys.readouterr().out
  assert f"(step {FINAL_STEP})" in printed
  # The run summary's evaluation table: grouped by evaluator, each accuracy beside its chance.
  lines = [line.strip() for line in printed.splitlines()]
  shape = next(i for i, line in enumerate(lines) if line.startswith("shape  (zeroshot"))
  top1 = lines[shape + 1].split()
  assert top1[0] == "zeroshot_top1"
  assert float(top1[1]) == pytest.approx(results[FINAL_STEP]["eval/shape/zeroshot_top1"], abs=1e-4)
  assert "(chance" in lines[shape + 1]


def test_single_checkpoint_step_dir_and_missing(watched, tmp_path):
  workdir, results, _ = watched
  step_dir = checkpointing.checkpoint_dir(workdir) / "1"
  assert watcher.run_watcher(_config(), workdir, checkpoint=os.fspath(step_dir)) == (
      pytest.approx(results[1]))
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    watcher.run_watcher(_config(), workdir, checkpoint=os.fspath(tmp_path))


def test_model_mismatch_names_the_differing_fields(watched):
  workdir, _, _ = watched
  config = _config()
  config.model.embed_dim = 32
  with pytest.raises(ValueError, match=r"different model .*model\.embed_dim: 64 != 32"):
    watcher.run_watcher(config, workdir, checkpoint=os.fspath(workdir))
