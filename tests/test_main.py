"""Multi-process launch: two processes on 127.0.0.1 train exactly like one process."""

import os
import socket
import subprocess

import numpy as np
import pytest

from glip_jax import main
from runs import REPO, command, read_losses, run_command

STEPS = 4


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # ~1 min: keeps `make test` under 10 minutes; .ci/run runs it
def test_two_processes_match_one_process(tmp_path):
  overrides = [f"--config.total_steps={STEPS}", "--config.checkpoint_every_steps=0"]
  single = str(tmp_path / "single")
  result = run_command(single, *overrides, devices=8)
  assert result.returncode == 0, result.stdout[-3000:]

  multi = str(tmp_path / "multi")
  port = free_port()
  procs = []
  for process_id in range(2):
    args, env = command(multi, *overrides, f"--coordinator_address=127.0.0.1:{port}",
                             "--num_processes=2", f"--process_id={process_id}", devices=4)
    log = open(tmp_path / f"log{process_id}", "w")
    procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
  for process_id, proc in enumerate(procs):
    assert proc.wait(timeout=400) == 0, (tmp_path / f"log{process_id}").read_text()[-3000:]

  single_losses, multi_losses = read_losses(single), read_losses(multi)
  assert sorted(multi_losses) == list(range(1, STEPS + 1))
  # Same global batches, masks and parameters; only the reduction order may differ.
  np.testing.assert_allclose([multi_losses[s] for s in sorted(multi_losses)],
                             [single_losses[s] for s in sorted(single_losses)], rtol=1e-5)
  # Only process 0 writes metrics; both write their share of the checkpoint.
  assert os.path.exists(os.path.join(multi, "checkpoints", str(STEPS)))


def test_cluster_detection():
  assert not main.cluster_detected({})
  assert not main.cluster_detected({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
  assert main.cluster_detected({"SLURM_NTASKS": "4"})
  assert main.cluster_detected({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
