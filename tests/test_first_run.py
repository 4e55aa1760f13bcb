"""A new user's first hour: relative paths everywhere, one-line errors, run length, save failures.

The end-to-end test runs the CLI as a subprocess from a temporary current directory with relative
`--workdir`, `--checkpoint` and `init=` paths, exactly as the README writes them.
"""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import tb_events
from glip_jax import checkpointing
from glip_jax import errors
from glip_jax import logging as logging_lib
from glip_jax import main as main_lib
from glip_jax import paths
from glip_jax import train
from configs import demo
from runs import OVERRIDES, REPO, read_losses, tiny_config

CONFIG = os.path.join(REPO, "configs", "demo.py")
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
# The demo's evaluators on 64 test images, for the watcher and --checkpoint runs.
SMALL_EVALS = [f"--config.evals.{name}.{field}=64" for name in ("shape", "retrieval", "shape_masked")
               for field in ("batch_size", "dataset.synthetic.eval_size")]


def cli(cwd, *args, config=CONFIG, timeout=400):
  """Runs `python -m glip_jax.main` in `cwd` on the tiny demo config; returns CompletedProcess."""
  overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items() if k != "total_steps"]
  argv = [sys.executable, "-m", "glip_jax.main", f"--config={config}", *overrides, *args]
  return subprocess.run(argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True, timeout=timeout)


def test_resolve_leaves_urls_and_expands_home(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", "/home/someone")
  assert paths.resolve("runs/demo") == str(tmp_path / "runs" / "demo")
  assert paths.resolve("~/data") == "/home/someone/data"
  assert paths.resolve("gs://bucket/run") == "gs://bucket/run"
  assert paths.resolve("s3://b/x/*.array_record") == "s3://b/x/*.array_record"
  assert paths.resolve("") == ""
  assert paths.resolve_globs("a/*.ar,/abs/b") == f"{tmp_path}/a/*.ar,/abs/b"


def test_config_paths_are_resolved_once_and_names_kept(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  config = demo.get_config()
  config.init_from.path = "runs/demo"
  config.data.paths = "shards/train-*.array_record"
  config.evals.shape.templates = "my_templates.txt"
  paths.resolve_config_paths(config, ("", "synthetic", "clip_imagenet_80"))
  assert config.init_from.path == str(tmp_path / "runs/demo")
  assert config.data.paths == str(tmp_path / "shards/train-*.array_record")
  assert config.evals.shape.templates == str(tmp_path / "my_templates.txt")
  assert config.evals.shape.classnames == "synthetic:shape"  # a built-in name, not a path
  assert "templates" not in config.evals.shape_masked  # unset fields stay unset


@pytest.mark.slow  # ~1 min of five CLI runs; .ci/run runs it (and `make demo` as written)
def test_relative_paths_train_resume_watch_evaluate_and_tune(tmp_path):
  """Every README command with relative paths: two saves, a resume, watcher, --checkpoint, tuning."""
  run = cli(tmp_path, "--workdir=runs/a", "--mode=train", "--config.total_steps=20",
            "--config.checkpoint_every_steps=10")
  assert run.returncode == 0, run.stderr[-3000:]
  workdir = tmp_path / "runs" / "a"
  assert checkpointing.all_steps(workdir / "checkpoints") == [10, 20]
  assert "Run summary: " + str(workdir) in run.stdout

  resumed = cli(tmp_path, "--workdir=runs/a", "--mode=train", "--config.total_steps=30",
                "--config.checkpoint_every_steps=10")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from" in resumed.stderr
  assert sorted(read_losses(str(workdir))) == list(range(1, 31))

  watched = cli(tmp_path, "--workdir=runs/a", "--mode=eval", "--config.total_steps=30",
                *SMALL_EVALS)
  assert watched.returncode == 0, watched.stderr[-3000:]
  record = json.loads((workdir / "eval" / "evaluated.json").read_text())
  assert record["steps"] == [10, 20, 30]
  assert "zeroshot_top1" in watched.stdout  # the watcher ends with the summary table

  one = cli(tmp_path, "--workdir=runs/a", "--mode=eval", "--checkpoint=runs/a", *SMALL_EVALS)
  assert one.returncode == 0, one.stderr[-3000:]
  assert "(step 30)" in one.stdout and "chance" in one.stdout

  tuning = os.path.join(REPO, "configs", "unmasked_tuning.py")
  tuned = cli(tmp_path, "--workdir=runs/tuned", "--mode=train",
              config=f"{tuning}:init=runs/a,base=demo,steps=5,batch=16,lr=1e-4")
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  assert sorted(read_losses(str(tmp_path / "runs" / "tuned"))) == list(range(1, 6))
  saved = checkpointing.load_config(tmp_path / "runs" / "tuned")
  assert saved["init_from"]["path"] == str(workdir)  # resolved once, recorded absolute


ERROR_CASES = {
    "unknown_field": (["--workdir=w", "--config.maskin.ratio=0.5"],
                      r"^error: --config\.maskin\.ratio: unknown config field maskin; "
                      r"did you mean masking\?$"),
    "missing_config": (["--workdir=w"], r"^error: --config=.*nope\.py: the config file could not "
                       r"be loaded: .*No such file or directory.*$"),
    "bad_type": (["--workdir=w", "--config.optim.lr=abc"],
                 r"^error: flag --config\.optim\.lr=abc: could not convert string to float.*$"),
    "bad_value": (["--workdir=w", "--config.masking.ratio=1.5"],
                  r"^error: masking\.ratio=1\.5 is outside the allowed range \[0, 1\).*$"),
    "missing_shard": (["--workdir=w", "--config.data.source=arrayrecord",
                       "--config.data.paths=shards/train-*.array_record"],
                      r"^error: data\.paths entry '.*/shards/train-\*\.array_record' matches no "
                      r"file.*$"),
    "missing_workdir": ([], r"^error: --workdir is required.*$"),
    "unknown_mode": (["--workdir=w", "--mode=evaluate"],
                     r"^error: --mode='evaluate' is not a mode; allowed: \['train', 'eval', "
                     r"'train_and_eval'\]; did you mean eval\?$"),
    "two_lengths": (["--workdir=w", "--config.total_steps=5", "--config.total_epochs=1"],
                    r"^error: --config\.total_steps and --config\.total_epochs both set the run "
                    r"length; give one\.$"),
}


def test_usage_errors_are_one_line_with_exit_status_2(tmp_path):
  """Each common mistake: exit 2, stderr exactly one 'error: …' line, nothing written."""
  procs = {}
  for name, (args, _) in ERROR_CASES.items():
    config = CONFIG.replace("demo.py", "nope.py") if name == "missing_config" else CONFIG
    argv = [sys.executable, "-m", "glip_jax.main", f"--config={config}", *args]
    procs[name] = subprocess.Popen(argv, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, (name, stderr[-2000:])
    assert len(lines) == 1, (name, stderr[-2000:])
    assert re.match(ERROR_CASES[name][1], lines[0]), (name, lines[0])
  assert not os.path.exists(tmp_path / "w")


def test_verbosity_adds_the_traceback(tmp_path):
  argv = [sys.executable, "-m", "glip_jax.main", f"--config={CONFIG}", "--workdir=w",
          "--config.masking.ratio=1.5", "--verbosity=1"]
  result = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "Traceback (most recent call last)" in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: masking.ratio=1.5")


def test_command_line_run_length_wins_over_the_recipes():
  config = demo.get_config()
  config.total_epochs = 0.01  # as a recipe that trains for epochs would
  config.total_steps = 20  # what the flag --config.total_steps=20 sets
  main_lib.apply_duration_precedence(config, main_lib.explicit_duration_fields(
      ["prog", "--config.total_steps=20"]))
  assert train.resolve_total_steps(config) == 20
  assert train.duration_source(config) == "total_steps=20"
  config.total_epochs = 0.01
  main_lib.apply_duration_precedence(config, [])  # nothing explicit: the recipe's epochs rule
  assert train.duration_source(config) == "total_epochs=0.01"
  with pytest.raises(errors.ConfigError, match="total_steps and --config.total_examples"):
    main_lib.apply_duration_precedence(config, ["total_steps", "total_examples"])


@pytest.mark.slow  # minute-scale on CI's 2 cores: keeps `make test` under 10 minutes
def test_restart_without_checkpoint_drops_the_earlier_attempts_metrics(tmp_path):
  """A run that died before its first save: its metrics lines must not zig-zag with the new run's."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  with open(workdir / logging_lib.METRICS_FILENAME, "w") as f:
    for step in range(1, 51):
      f.write(json.dumps({"step": step, "loss": 99.0}) + "\n")
  config = tiny_config()
  config.total_steps = 3
  config.checkpoint_every_steps = 0
  train.train_and_evaluate(config, str(workdir))
  losses = read_losses(str(workdir))
  assert sorted(losses) == [1, 2, 3]
  assert all(v != 99.0 for v in losses.values())
  # The new event file starts with a purge marker at step 1, so TensorBoard drops the old curve.
  newest = sorted(glob.glob(str(workdir / "events.out.tfevents.*")))[-1]
  events = tb_events.read_events(os.path.dirname(newest))
  assert any(e.session_log.status == e.session_log.START and e.step == 1 for e in events)


@pytest.mark.slow  # ~20 s on CI's 2 cores: keeps `make test` under 10 minutes
def test_a_failed_save_stops_the_run_at_once_and_says_what_is_intact(tmp_path, monkeypatch):
  """The checkpoint directory becomes unwritable after the first save: the run stops right after
  the next save fails (one step later, not at the save after), naming the intact checkpoint."""
  workdir = tmp_path / "run"
  ckpt_dir = workdir / "checkpoints"
  real_save = checkpointing.save
  calls = []

  def save_then_lock(manager, step, *args, **kwargs):
    calls.append(step)
    result = real_save(manager, step, *args, **kwargs)
    if len(calls) == 1:
      manager.wait_until_finished()
      # Immutable even for root: every later write into the directory fails with EPERM.
      subprocess.run(["chattr", "+i", str(ckpt_dir)], check=True)
    return result

  monkeypatch.setattr(checkpointing, "save", save_then_lock)
  config = tiny_config()
  config.total_steps = 30
  config.checkpoint_every_steps = 10
  try:
    with pytest.raises(checkpointing.CheckpointSaveError) as info:
      train.train_and_evaluate(config, str(workdir))
  finally:
    subprocess.run(["chattr", "-i", str(ckpt_dir)], check=False)
  message = str(info.value)
  assert message.startswith(f"The checkpoint directory {ckpt_dir} is not writable")
  assert "saving the checkpoint of step 20 failed" in message
  assert "the last complete checkpoint, step 10, is intact" in message
  assert calls == [10, 20]  # stopped before step 30's save
  assert max(read_losses(str(workdir))) <= 21  # at most one step past the failed save


@pytest.mark.slow  # ~20 s on CI's 2 cores: keeps `make test` under 10 minutes
def test_documented_conversion_command_and_glob_match(tmp_path):
  """docs/data.md's synthetic conversion command, run as written, writes what its glob matches."""
  text = open(os.path.join(REPO, "docs", "data.md")).read()
  command = re.search(r"^(python tools/make_arrayrecord\.py --input_format=synthetic[^\n]*\\\n"
                      r"[^\n]*)$", text, re.M).group(1).replace("\\\n", " ")
  pattern = re.search(r"--config\.data\.paths='[^']*/([^'/]+)'", text).group(1)
  argv = shlex.split(command)
  argv = [a.replace("/tmp/synth_ar", "synth_ar").replace("=10000", "=32") for a in argv]
  argv[0] = sys.executable
  argv[1] = os.path.join(REPO, argv[1])
  result = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  shards = glob.glob(str(tmp_path / "synth_ar" / pattern))
  assert shards, (pattern, os.listdir(tmp_path / "synth_ar"))
  assert all(s.endswith(".array_record") for s in shards)

  # The recipes' `runlocal` smoke test on those shards, with the glob relative to the cwd.
  from configs import glip_vit_b16  # pylint: disable=g-import-not-at-top
  os.chdir(tmp_path)
  try:
    config = glip_vit_b16.get_config(f"data=synth_ar/{pattern},runlocal=1")
    config.total_steps = 2
    summary = train.train_and_evaluate(config, "smoke")
  finally:
    os.chdir(REPO)
  assert summary["steps"] == 2 and summary["loss"] > 0
  assert checkpointing.all_steps(tmp_path / "smoke" / "checkpoints") == [2]


def test_a_save_failing_in_the_background_is_reported_by_the_next_check(tmp_path, monkeypatch):
  """Orbax's own commit fails in its thread (here: the relative path it refuses, the bug a new
  user hit); raise_if_save_failed turns that into a CheckpointSaveError naming the step."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  manager = checkpointing.create_manager("relative/checkpoints", keep=None)
  checkpointing.save(manager, 7, {"w": jnp.ones(3)}, None, {"a": 1})
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r"^Saving the checkpoint of step 7 failed: .*absolute.*Training "
                           r"stopped; no complete checkpoint exists"):
    checkpointing.raise_if_save_failed(manager, 7, wait=True)
  assert checkpointing.raise_if_save_failed(manager, None) is None


@pytest.mark.slow  # ~20 s on CI's 2 cores: keeps `make test` under 10 minutes
def test_readme_inference_example_runs_and_ranks_like_the_embeddings(tmp_path):
  """The README's Python example, run as written against a freshly trained checkpoint."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "demo"
  config = tiny_config()
  config.total_steps = 2
  config.checkpoint_every_steps = 0
  train.train_and_evaluate(config, str(workdir))
  readme = open(os.path.join(REPO, "README.md")).read()
  block = re.search(r"<!-- example: inference[^\n]*-->\n```python\n(.*?)```", readme, re.S).group(1)
  namespace = {}
  exec(block.replace('"runs/demo"', repr(str(workdir))), namespace)  # pylint: disable=exec-used
  probs, captions = namespace["probs"], namespace["captions"]
  assert sorted(probs) == sorted(captions)
  assert abs(sum(probs.values()) - 1) < 1e-5
  assert list(probs.values()) == sorted(probs.values(), reverse=True)
  # The ranking is the one the normalised embeddings give.
  scores = (namespace["image_emb"] @ namespace["text_emb"].T)[0]
  assert next(iter(probs)) == captions[int(np.argmax(scores))]
  np.testing.assert_allclose(np.linalg.norm(namespace["text_emb"], axis=1), 1.0, rtol=1e-5)
