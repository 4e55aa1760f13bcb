"""Multi-process launch: two processes on 127.0.0.1 train exactly like one process."""

import glob
import json
import os
import socket
import subprocess

import numpy as np
import pytest

from glip_jax import logging as logging_lib
from glip_jax import main
from runs import REPO, command, read_losses, run_command

STEPS = 4


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# In-loop evaluation at the final step (every evaluator is due there), shrunk to one batch of 64:
# in the two-process run its embeddings span both processes and are gathered (base.to_host).
EVALS = ["--mode=train_and_eval", *(f"--config.evals.{name}.{field}=64"
                                   for name in ("shape", "retrieval", "shape_masked")
                                   for field in ("batch_size", "dataset.synthetic.eval_size"))]


def _metric_lines(workdir: str) -> list[dict]:
  """metrics.jsonl line by line (read_metrics_jsonl would merge a step written twice)."""
  with open(os.path.join(workdir, logging_lib.METRICS_FILENAME)) as f:
    return [json.loads(line) for line in f]


# ~1-3 min (the evaluation adds ~10%): keeps `make test` under 10 minutes; .ci/run runs it
@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  overrides = [f"--config.total_steps={STEPS}", "--config.checkpoint_every_steps=0", *EVALS]
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
  # Only process 0 writes metrics: one line per logged step and one for the evaluation (a second
  # writer would repeat every step), one event file, one run summary on stdout.
  lines = _metric_lines(multi)
  train_steps = [line["step"] for line in lines if "loss" in line]
  assert train_steps == list(range(1, STEPS + 1))
  evals = [line for line in lines if any(k.startswith("eval/") for k in line)]
  assert [line["step"] for line in evals] == [STEPS]
  assert len(lines) == len(_metric_lines(single))
  assert len(glob.glob(os.path.join(multi, "events.out.tfevents*"))) == 1
  logs = [(tmp_path / f"log{i}").read_text() for i in range(2)]
  assert [log.count("Evaluation at step") for log in logs] == [1, 1]  # both evaluate ...
  assert ["zeroshot_top1" in log for log in logs] == [True, False]  # ... process 0 reports
  # The evaluation gathered across processes scores as the one-process one (same parameters up
  # to reduction order; every metric is a fraction of 64, so a lost or doubled shard shows).
  single_evals = {k: v for line in _metric_lines(single) for k, v in line.items()
                  if k.startswith("eval/")}
  multi_evals = {k: v for k, v in evals[0].items() if k.startswith("eval/")}
  assert sorted(multi_evals) == sorted(single_evals) and len(multi_evals) == 12
  assert multi_evals == pytest.approx(single_evals, abs=1e-6)
  # Both write their share of the checkpoint.
  assert os.path.exists(os.path.join(multi, "checkpoints", str(STEPS)))


def test_cluster_detection():
  assert not main.cluster_detected({})
  assert not main.cluster_detected({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
  assert main.cluster_detected({"SLURM_NTASKS": "4"})
  assert main.cluster_detected({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
