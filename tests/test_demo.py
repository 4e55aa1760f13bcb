"""The demo config, trained as `make demo` trains it, learns the synthetic task (slow: minutes)."""

import os
import subprocess
import sys

import pytest

from glip_jax import logging as logging_lib
from glip_jax.data import synthetic
from runs import REPO


@pytest.mark.slow
def test_demo_reaches_three_times_chance_on_zero_shot_shape(tmp_path):
  """Trains the demo, or (GLIP_DEMO_WORKDIR and GLIP_DEMO_OUTPUT set) checks the run `make demo`
  just made: .ci/run runs the README's `make demo` as written and points this test at it, so CI
  trains the 4-minute demo once."""
  workdir = os.environ.get("GLIP_DEMO_WORKDIR")
  if workdir:
    with open(os.environ["GLIP_DEMO_OUTPUT"]) as f:
      stdout = f.read()
  else:
    workdir = str(tmp_path / "demo")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one CPU device, as `make demo`
    result = subprocess.run(
        [sys.executable, "-m", "glip_jax.main", "--config=configs/demo.py", f"--workdir={workdir}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:]
    stdout = result.stdout
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "800"
  final = logging_lib.read_metrics_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
  chance = 1 / len(synthetic.SHAPES)
  assert final["eval/shape/zeroshot_top1"] >= 3 * chance, final
  assert final["eval/retrieval/i2t_recall_at_10"] > 10 / 512  # above chance on 512 test pairs
  # The summary `make demo` prints: the evaluation grouped, its top-1 beside the chance level.
  assert "shape  (zeroshot, unmasked, 8 classes, 512 images)" in stdout
  assert f"{final['eval/shape/zeroshot_top1']:.4f}   (chance 0.1250)" in stdout
