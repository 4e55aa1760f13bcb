"""The trainer end to end: main CLI, exact resume after kill -9 and SIGTERM, metrics, validation.

Runs use configs/demo.py shrunk by command-line overrides (the CLI contract), in-process for the
reference run and as subprocesses for the runs that get killed.
"""

import os
import signal
import subprocess
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

import tb_events
from glip_jax import checkpointing
from glip_jax import logging as logging_lib
from glip_jax import sharding as sharding_lib
from glip_jax import train
from glip_jax.models import clip as clip_lib
from glip_jax.models import posemb
from configs import unmasked_tuning
from runs import REPO, TOTAL_STEPS, command, read_losses as losses, tiny_config


def final_params(workdir):
  config = tiny_config()
  model = clip_lib.build_model(config.model)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), *clip_lib.dummy_inputs(config.model)))["params"])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
  return jax.device_get(checkpointing.restore_params_from(workdir, abstract))


def start(workdir, log_path, arg=""):
  """Starts a training subprocess; its log goes to a file (a pipe could fill up and block it)."""
  args, env = command(workdir, arg=arg)
  with open(log_path, "w") as log:
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_for_progress(workdir, step, proc, log_path, timeout=300):
  """Waits until `step` is logged after a complete checkpoint exists."""
  deadline = time.time() + timeout
  path = os.path.join(workdir, logging_lib.METRICS_FILENAME)
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early:\n{open(log_path).read()[-3000:]}")
    complete = checkpointing.all_steps(checkpointing.checkpoint_dir(workdir))
    if complete and os.path.exists(path) and max(losses(workdir) or [0]) >= step:
      return
    time.sleep(0.05)
  raise AssertionError("timed out waiting for training progress")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run: per-step losses and final parameters."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  summary = train.train_and_evaluate(tiny_config(), workdir)
  assert summary["steps"] == TOTAL_STEPS
  return workdir


def test_end_to_end_metrics_and_checkpoints(straight):
  records = logging_lib.read_metrics_jsonl(os.path.join(straight, "metrics.jsonl"))
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == list(range(1, TOTAL_STEPS + 1))
  last = records[-1]
  for key in ("loss", "lr", "logit_scale", "i2t_accuracy", "t2i_accuracy", "grad_norm",
              "examples_per_s", "examples_per_s_per_device", "step_time_s", "data_wait_s",
              "tflops_per_s_per_device", "kept_tokens"):
    assert key in last, key
  assert "mfu" not in last  # CPU: no known peak, so no made-up MFU
  assert last["kept_tokens"] == 8  # 16 patches at 50%
  assert records[-1]["loss"] < records[0]["loss"]
  assert checkpointing.all_steps(checkpointing.checkpoint_dir(straight)) == [20, 30, 40]
  config = checkpointing.load_config(straight)
  assert config["masking"]["kind"] == "gaussian" and config["total_steps"] == TOTAL_STEPS


def test_tensorboard_event_file_has_the_losses(straight):
  scalars = tb_events.read_event_scalars(straight)
  assert sorted(scalars["loss"]) == list(range(1, TOTAL_STEPS + 1))
  np.testing.assert_allclose(scalars["loss"][TOTAL_STEPS], losses(straight)[TOTAL_STEPS], rtol=1e-6)


def _compare_with_straight(workdir, straight, total_steps=TOTAL_STEPS):
  ours, reference = losses(workdir), losses(straight)
  assert sorted(ours) == list(range(1, total_steps + 1))
  assert ours == reference  # bit-exact per-step losses, including those after the resume point
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), final_params(straight))


def test_unmasked_tuning_starts_from_the_parameters_of_another_run(straight, tmp_path):
  tuning = unmasked_tuning.get_config(f"init={straight},base=demo,steps=3,batch=16,lr=1e-4")
  config = tiny_config(config=tuning)
  config.total_steps, config.checkpoint_every_steps = 3, 1
  assert config.masking.kind == "none" and config.init_from.path == straight
  workdir = str(tmp_path / "tuned")
  train.train_and_evaluate(config, workdir)
  assert read_metrics_last(workdir)["kept_tokens"] == 16  # all patches
  # Step 1 runs at lr 0 (warmup), so its checkpoint holds exactly the masked run's parameters;
  # the step count and optimizer state start fresh.
  jax.tree.map(np.testing.assert_array_equal, final_params(os.path.join(workdir, "checkpoints/1")),
               final_params(straight))
  assert not np.array_equal(final_params(workdir)["logit_scale"], final_params(straight)["logit_scale"])


@pytest.mark.slow  # minute-scale on CI's 2 cores: keeps `make test` under 10 minutes
def test_tuning_at_full_resolution_resamples_the_position_embeddings(tmp_path):
  """CLIPA's resolution reduction: train at 16 px (a 2×2 grid), tune at 32 px (4×4)."""
  low = tiny_config()
  low.model.image_size, low.total_steps, low.checkpoint_every_steps = 16, 2, 0
  low_dir = str(tmp_path / "low")
  train.train_and_evaluate(low, low_dir)
  tuning = unmasked_tuning.get_config(f"init={low_dir},base=demo,steps=1,batch=16,lr=1e-4,"
                                      f"image_size=32")
  config = tiny_config(config=tuning)
  config.total_steps, config.checkpoint_every_steps = 1, 0
  config.model.image_size = 32
  workdir = str(tmp_path / "full")
  train.train_and_evaluate(config, workdir)
  assert read_metrics_last(workdir)["kept_tokens"] == 16  # the 4×4 grid of 32 px
  low_model = clip_lib.build_model(low.model)
  mesh = sharding_lib.create_mesh({"data": 1}, devices=jax.devices()[:1])
  saved = checkpointing.restore_params_from(
      low_dir, sharding_lib.abstract_params(low_model, low.model, mesh))
  tuned = final_params(workdir)  # step 1 ran at lr 0: exactly what was loaded
  expected = posemb.resize_image_posemb(np.asarray(saved["image"]["positional_embedding"]),
                                        (2, 2), (4, 4))
  np.testing.assert_allclose(tuned["image"]["positional_embedding"], expected, rtol=1e-6)
  np.testing.assert_array_equal(tuned["image"]["positional_embedding"][0],
                                np.asarray(saved["image"]["positional_embedding"])[0])  # [CLS]
  np.testing.assert_array_equal(tuned["text"]["token_embedding"]["embedding"],
                                np.asarray(saved["text"]["token_embedding"]["embedding"]))


def read_metrics_last(workdir):
  return logging_lib.read_metrics_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]


def run_killed_at(workdir, log_path, point, arg="", extra=()):
  """Runs training in a subprocess that SIGKILLs itself at `point` (checkpointing.exit_point)."""
  args, env = command(workdir, *extra, arg=arg)
  env[checkpointing.TEST_EXIT_ENV] = point
  with open(log_path, "w") as log:
    proc = subprocess.run(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          timeout=300, check=False)
  assert proc.returncode == -signal.SIGKILL, open(log_path).read()[-3000:]


@pytest.mark.slow  # minute-scale on CI's 2 cores: keeps `make test` under 10 minutes
def test_kill_9_then_resume_is_exact(straight, tmp_path):
  workdir, log_path = str(tmp_path / "killed"), str(tmp_path / "log")
  # Killed inside the async save of step 20, after logging step 20: the save of step 10 has
  # finished (Orbax waits for it before starting the next), the one of step 20 has not.
  run_killed_at(workdir, log_path, "save:20:dispatched")
  assert checkpointing.all_steps(checkpointing.checkpoint_dir(workdir)) == [10]
  # The killed run logged steps past its last checkpoint; the resumed run replaces them.
  assert max(losses(workdir)) == 20
  train.train_and_evaluate(tiny_config(), workdir)
  _compare_with_straight(workdir, straight)


@pytest.mark.slow  # ~30 s: keeps `make test` under 10 minutes; .ci/run runs it
def test_sigterm_saves_exits_cleanly_and_resumes_exactly(straight, tmp_path):
  workdir, log_path = str(tmp_path / "preempted"), str(tmp_path / "log")
  proc = start(workdir, log_path)
  wait_for_progress(workdir, 12, proc, log_path)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  log = open(log_path).read()
  assert proc.returncode == 0, log[-3000:]
  preempted = int(log.split("Preempted at step ")[1].split(":")[0])
  assert checkpointing.all_steps(checkpointing.checkpoint_dir(workdir))[-1] == preempted
  assert f"preempted at step        {preempted}" in log  # the summary table
  train.train_and_evaluate(tiny_config(), workdir)
  _compare_with_straight(workdir, straight)


@pytest.mark.slow  # ~1 min: keeps `make test` under 10 minutes; .ci/run runs it
def test_aclip_trains_end_to_end_and_resumes_exactly(tmp_path):
  """A-CLIP (configs/demo.py:aclip, shrunk): the same CLI, checkpoints and exact resume."""
  straight_dir = str(tmp_path / "straight")
  summary = train.train_and_evaluate(tiny_config("aclip"), straight_dir)
  assert summary["steps"] == TOTAL_STEPS
  last = logging_lib.read_metrics_jsonl(os.path.join(straight_dir, "metrics.jsonl"))[-1]
  for key in ("loss_clip", "loss_simclr", "loss_byol", "ema_momentum"):
    assert key in last, key
  assert last["kept_tokens"] == 8  # 2 of the 4 2×2 blocks of a 4×4 grid

  workdir, log_path = str(tmp_path / "killed"), str(tmp_path / "log")
  proc = start(workdir, log_path, arg="aclip")
  wait_for_progress(workdir, 15, proc, log_path)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  train.train_and_evaluate(tiny_config("aclip"), workdir)
  _compare_with_straight(workdir, straight_dir)


def test_attentive_masking_needs_the_aclip_section(tmp_path):
  config = tiny_config()
  config.masking.kind = "attentive"
  with pytest.raises(ValueError, match=r"masking.kind='attentive' needs the A-CLIP step"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("field,value,message", [
    ("masking.kind", "blocky", r"masking.kind='blocky'.*allowed"),
    ("masking.ratio", 1.5, r"masking.ratio=1.5"),
    ("batch_size", 12, r"batch_size=12 is not divisible by the data-parallel size 8"),
    ("model.image_size", 30, r"model.image_size=\(30, 30\) is not divisible by the patch size 8"),
    ("data.source", "hdf5", r"config.data.source='hdf5' is invalid"),
    ("loss.kind", "cosine", r"loss.kind='cosine'"),
    ("log_every_steps", 0, r"log_every_steps=0 is invalid"),
])
def test_bad_config_fails_before_compute(field, value, message, tmp_path):
  config = tiny_config()
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # failed before writing anything


def test_eval_batch_size_is_checked_before_compute(tmp_path):
  config = tiny_config()
  config.evals = {"shape": {"kind": "zeroshot", "batch_size": 12}}
  with pytest.raises(ValueError, match=r"evals.shape.batch_size=12 is not divisible by the "
                                       r"data-parallel size 8"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_mesh_must_match_devices(tmp_path):
  config = tiny_config()
  config.mesh.data = 3
  with pytest.raises(ValueError, match=r"mesh=.*multiplies to 3 devices but 8 are available"):
    train.train_and_evaluate(config, str(tmp_path))


def test_durations_in_examples_and_epochs():
  config = tiny_config()
  config.total_examples = 100
  assert train.resolve_total_steps(config) == 7  # ceil(100 / 16)
  config.total_examples = None
  config.total_epochs = 0.5
  config.data.synthetic.train_size = 320
  assert train.resolve_total_steps(config) == 10
  config.total_examples = 64
  with pytest.raises(ValueError, match="give at most one"):
    train.resolve_total_steps(config)


def test_cli_rejects_bad_override(tmp_path):
  args, env = command(str(tmp_path), "--config.masking.kind=blocky")
  result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "masking.kind='blocky'" in result.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny_config()
  config.total_steps = 30
  config.checkpoint_every_steps = 2
  # Step 1 runs at lr 0 (warmup), so checkpoint 2 is good; step 2's update at lr 1e11 diverges.
  config.optim.update(lr=1e12, warmup_steps=10, grad_clip_norm=0.0)
  with pytest.raises(train.NonFiniteError, match=r"Non-finite training values at step (\d+)") as err:
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = int(err.value.args[0].split("step ")[1].split(":")[0])
  saved = checkpointing.all_steps(checkpointing.checkpoint_dir(str(tmp_path)))
  assert saved and all(step < bad_step for step in saved)
  assert "last good checkpoint is intact" in str(err.value)
