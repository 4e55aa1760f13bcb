"""tools/device_check.sh: its CPU fallback runs the real cases at demo size and prints the table."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = {**os.environ, "PYTHON": sys.executable}
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a plain host
  result = subprocess.run([os.path.join(ROOT, "tools", "device_check.sh"), "--cpu-smoke", *args],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _rows(out):
  lines = out.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("case "))
  return {line.split()[0]: line.split() for line in lines[start + 1:]}


@pytest.mark.slow  # minutes on CI's 2 cores (every case compiles): .ci/run runs it
def test_cpu_smoke_all_cases():
  rows = _rows(_run())
  assert set(rows) == {"clip_r0", "clip_r0.5", "clip_r0.75", "dpa_r0", "dpa_r0.75", "aclip",
                       "pipeline"}
  case, batch, examples_per_s, tflops, mfu, loss = rows["clip_r0.75"]
  assert int(batch) == 2 and float(examples_per_s) > 0 and float(tflops) > 0
  assert mfu == "n/a"  # no peak FLOP/s for a CPU
  assert 0 < float(loss) < 10
  assert float(rows["pipeline"][4]) > 0  # examples/s ("pipeline (N cores)" spans 3 columns)
