"""Tests for glip_jax.logging: TF-free TensorBoard writer, metrics.jsonl, MFU."""
import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import runs
import tb_events
from glip_jax import flops
from glip_jax import logging as glog


def _scalars(events):
  return {(v.tag, e.step): v.simple_value
          for e in events for v in e.summary.value if v.HasField("simple_value")}


# Writing TensorBoard events in a fresh interpreter where `import tensorflow` is blocked and
# recorded (runs.NO_TENSORFLOW): it must neither need TF nor try it.
_WRITE_WITHOUT_TF = runs.NO_TENSORFLOW + textwrap.dedent("""
    import json
    from glip_jax import logging as glog
    writer = glog.create_writer(sys.argv[1], just_logging=False)
    writer.write_hparams({"lr": 0.1})
    writer.write_scalars(3, {"loss": 1.5})
    writer.write_texts(3, {"note": "hi"})
    writer.close()
    print(json.dumps(dict(attempts=attempts, tf_loaded="tensorflow" in sys.modules)))
""")


# Slow: a fresh interpreter importing jax and clu takes ~6 s on two loaded cores; .ci/run runs it.
@pytest.mark.slow
def test_writer_works_with_tensorflow_blocked(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _WRITE_WITHOUT_TF, str(tmp_path)],
                        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == dict(attempts=[], tf_loaded=False)
  assert _scalars(tb_events.read_events(str(tmp_path))) == {("loss", 3): 1.5}
  assert glog.read_metrics_jsonl(str(tmp_path / "metrics.jsonl"))[0]["loss"] == 1.5


def test_clu_writer_interfaces():
  assert issubclass(glog.SummaryWriter, glog.metric_writers.MetricWriter)
  assert glog.metric_writers.SummaryWriter is glog.SummaryWriter
  assert hasattr(glog.periodic_actions, "ReportProgress")


def test_tensorboard_event_file_and_jsonl(tmp_path):
  workdir = str(tmp_path)
  writer = glog.create_writer(workdir, just_logging=False)
  writer.write_hparams({"optim": {"lr": 1e-3}, "name": "demo"})
  writer.write_scalars(1, {"loss": 2.5})
  writer.write_scalars(1, {"lr": np.float32(0.5)})  # Same step: merged.
  writer.write_scalars(2, {"loss": 2.0, "step_count": 2})
  writer.write_texts(2, {"note": "hello"})
  writer.flush()
  writer.close()

  events = tb_events.read_events(workdir)
  plugins = {v.metadata.plugin_data.plugin_name
             for e in events for v in e.summary.value}
  assert {"hparams", "text"} <= plugins
  scalars = _scalars(events)
  assert scalars == {("loss", 1): 2.5, ("lr", 1): 0.5, ("loss", 2): 2.0,
                     ("step_count", 2): 2.0}

  path = os.path.join(workdir, glog.METRICS_FILENAME)
  with open(path) as f:
    lines = [json.loads(line) for line in f]
  assert lines == [{"step": 1, "loss": 2.5, "lr": 0.5},
                   {"step": 2, "loss": 2.0, "step_count": 2}]
  assert glog.read_metrics_jsonl(path) == lines


def test_read_merges_lines_of_same_step(tmp_path):
  path = str(tmp_path / "m.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 2, "a": 1}\n{"step": 1, "a": 0}\n{"step": 2, "b": 3}\n'
            '{"step": 3, "a"')  # Torn last line from a kill mid-write.
  assert glog.read_metrics_jsonl(path) == [{"step": 1, "a": 0},
                                           {"step": 2, "a": 1, "b": 3}]


def test_resume_truncates_and_purges(tmp_path):
  workdir = str(tmp_path)
  path = os.path.join(workdir, glog.METRICS_FILENAME)
  writer = glog.create_writer(workdir, just_logging=False)
  for step in range(1, 6):
    writer.write_scalars(step, {"loss": 10.0 - step})
  writer.close()

  # Killed after step 5, last checkpoint at step 3: steps 4, 5 are redone.
  writer = glog.create_writer(workdir, just_logging=False, resume_step=3)
  assert [r["step"] for r in glog.read_metrics_jsonl(path)] == [1, 2, 3]
  for step in (4, 5):
    writer.write_scalars(step, {"loss": 20.0 - step})
  writer.close()

  with open(path) as f:
    lines = [json.loads(line) for line in f]
  assert [(r["step"], r["loss"]) for r in lines] == [
      (1, 9.0), (2, 8.0), (3, 7.0), (4, 16.0), (5, 15.0)]
  events = tb_events.read_events(workdir)
  assert _scalars(events)[("loss", 5)] in (5.0, 15.0)  # Both runs' files kept.
  assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 2
  # TensorBoard drops events with step >= 4 of the earlier run on this marker.
  starts = [e.step for e in events
            if e.HasField("session_log")
            and e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [4]


def test_just_logging_writes_no_files(tmp_path):
  workdir = str(tmp_path / "work")
  writer = glog.create_writer(workdir, just_logging=True)
  writer.write_scalars(1, {"loss": 1.0})
  writer.flush()
  writer.close()
  assert not os.path.exists(workdir)


def test_report_progress_ticks(tmp_path):
  writer = glog.create_writer(str(tmp_path), just_logging=False)
  report = glog.periodic_actions.ReportProgress(
      num_train_steps=6, writer=writer, every_steps=2, every_secs=None)
  triggered = [report(step, t=float(step) * 0.5) for step in range(1, 7)]
  with report.timed("eval", wait_jax_async_dispatch=False):
    pass
  writer.close()
  assert triggered == [False, True, False, True, False, True]
  records = glog.read_metrics_jsonl(str(tmp_path / glog.METRICS_FILENAME))
  assert [r["step"] for r in records] == [2, 4, 6]
  assert records[0]["steps_per_sec"] == pytest.approx(2.0)
  assert "uptime" in records[0]  # Second write_scalars call, merged.


def test_peak_flops_lookup():
  assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops_per_device("NVIDIA H200") == 989e12
  assert flops.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.peak_flops_per_device("NVIDIA L4") == 121e12
  assert flops.peak_flops_per_device("NVIDIA L40S") == 362e12
  assert flops.peak_flops_per_device("TPU v4") == 275e12
  assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
  assert flops.peak_flops_per_device("TPU v5") == 459e12
  assert flops.peak_flops_per_device("TPU v6 lite") == 918e12
  assert flops.peak_flops_per_device("cpu") is None


def test_throughput_metrics():
  m = flops.throughput_metrics(examples=1024, seconds=2.0, flops_per_example=1e12,
                              num_devices=8, device_kind="TPU v4")
  assert m["examples_per_s"] == 512
  assert m["examples_per_s_per_device"] == 64
  assert m["tflops_per_s_per_device"] == pytest.approx(64.0)
  assert m["mfu"] == pytest.approx(64e12 / 275e12)
  m = flops.throughput_metrics(1024, 2.0, 1e12, 8, "cpu")
  assert "mfu" not in m and "tflops_per_s_per_device" in m
