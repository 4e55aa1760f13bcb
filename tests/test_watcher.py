"""Tests for the checkpoint watcher (the --mode=eval job) on a tiny model and synthetic data."""
import json
import os
import shutil

import ml_collections
import optax
import pytest

from configs import common
from glip_jax import checkpointing
from glip_jax import logging as logging_lib
from glip_jax import sharding
from glip_jax import train_step
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


@pytest.fixture(scope="module")
def state():
  config = _config()
  mesh = sharding.create_mesh(config.mesh)
  model = clip.build_model(config.model)
  state, _ = train_step.create_train_state(model, optax.sgd(0.1), config.model, mesh, seed=0)
  return state


@pytest.fixture(scope="module")
def watched(tmp_path_factory, state):
  """A workdir watched while checkpoints appear: 1 before, 2 and 3 after one poll, 4 later.

  Step 3 is deleted (as keep-N would) between listing and restoring; a partial save of step 2
  lies around from the start.
  """
  workdir = tmp_path_factory.mktemp("run")
  config = _config()
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  manager = checkpointing.create_manager(ckpt_dir, keep=10)

  def save(*steps):
    for step in steps:
      checkpointing.save(manager, step, state.replace(step=step), None, config)
    manager.wait_until_finished()

  save(1)
  partial = ckpt_dir / "2.orbax-checkpoint-tmp-123"
  partial.mkdir()
  (partial / "junk").write_text("not a checkpoint")
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


def test_evaluates_each_complete_checkpoint_once_and_exits_after_final(watched):
  workdir, results, sleeps = watched
  # 3 was deleted before it could be read; the partial 2 was never read as a checkpoint.
  assert sorted(results) == [1, 2, FINAL_STEP]
  assert len(sleeps) == 2  # exited right after the final step, without another poll
  for metrics in results.values():
    assert set(metrics) == {f"eval/shape/zeroshot_{k}"
                            for k in ("top1", "top5", "mean_per_class_recall")}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
  lines = _metric_lines(workdir)
  assert [line["step"] for line in lines] == [1, 2, FINAL_STEP]
  assert lines[-1][METRIC] == pytest.approx(results[FINAL_STEP][METRIC])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(watcher.eval_dir(workdir)))
  record = json.loads((watcher.eval_dir(workdir) / "evaluated.json").read_text())
  assert record == {"steps": [1, 2, FINAL_STEP]}


def test_restart_evaluates_nothing_again(watched):
  workdir, _, _ = watched
  before = (watcher.eval_dir(workdir) / "metrics.jsonl").read_text()
  assert watcher.run_watcher(_config(), workdir, poll_seconds=0.01) == {}
  assert (watcher.eval_dir(workdir) / "metrics.jsonl").read_text() == before


def test_timeout_without_final_checkpoint(watched, monkeypatch):
  workdir, _, _ = watched
  monkeypatch.setattr(watcher, "_sleep", lambda s: None)
  # Final step 99 never comes: every existing checkpoint is done, so it polls until the timeout.
  assert watcher.run_watcher(_config(total_steps=99), workdir, poll_seconds=0.01,
                             timeout_seconds=0.05) == {}


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
