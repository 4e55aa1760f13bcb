"""gs:// and s3:// workdirs and data, end to end, against local emulators (no network).

A session fixture starts a GCS emulator (and s3rver for S3, when installed) on 127.0.0.1 and
points every client at them by environment (tests/storage_emulators.py). The default suite trains
once on a gs:// workdir and resumes it; the slow set kills a gs:// run with SIGKILL and checks the
resumed run bit for bit against a local one, runs the eval watcher on the bucket, converts the
synthetic set into the bucket (ArrayRecord and Parquet) and trains from it, and does the S3 part.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

import storage_emulators
import tb_events
from glip_jax import checkpointing
from glip_jax import errors
from glip_jax import logging as logging_lib
from glip_jax import storage
from glip_jax import train
from glip_jax.data import sources
from runs import REPO, command, tiny_config

GS = f"gs://{storage_emulators.GCS_BUCKET}"
S3 = f"s3://{storage_emulators.S3_BUCKET}"


@pytest.fixture(scope="session")
def emulators():
  emu = storage_emulators.Emulators()
  saved = {k: os.environ.get(k) for k in emu.env}
  os.environ.update(emu.env)
  yield emu
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  emu.stop()


@pytest.fixture
def needs_s3(emulators):
  if not emulators.s3:
    pytest.skip("s3rver not installed (.ci/run installs it: npm install s3rver)")


def _unique(name: str) -> str:
  return f"{name}-{time.time_ns()}"


def _losses(workdir: str) -> dict[int, float]:
  path = os.fspath(storage.path(workdir) / logging_lib.METRICS_FILENAME)
  return {r["step"]: r["loss"] for r in logging_lib.read_metrics_jsonl(path) if "loss" in r}


def _event_losses(workdir: str, tmp_path) -> dict[int, float]:
  """Losses of the TensorBoard event files, copied out of the bucket (later events win)."""
  local = tmp_path / "events"
  local.mkdir(exist_ok=True)
  for p in storage.path(workdir).iterdir():
    if p.name.startswith("events.out.tfevents"):
      (local / p.name).write_bytes(p.read_bytes())
  return tb_events.read_event_scalars(str(local)).get("loss", {})


def _small(config, steps: int, every: int):
  config.total_steps, config.checkpoint_every_steps = steps, every
  return config


# ---------------------------------------------------------------------------- default suite


def test_gs_workdir_trains_checkpoints_logs_and_resumes(emulators, tmp_path):
  """Train 3 steps on gs://, leave stale lines as a killed run would, resume (restore only).

  One training run (the default suite's budget): the resume restores the finished run's state
  and data iterator from the bucket and drops the stale lines without compiling a step; the slow
  kill -9 test resumes mid-run and compares bit for bit.
  """
  workdir = f"{GS}/{_unique('run')}"
  summary = train.train_and_evaluate(_small(tiny_config(), 3, 2), workdir)
  assert summary["steps"] == 3
  assert checkpointing.all_steps(checkpointing.checkpoint_dir(workdir)) == [2, 3]
  # Orbax's GCS commit marker: the watcher and the resume trust only such step directories.
  assert (checkpointing.checkpoint_dir(workdir) / "3" / "commit_success.txt").exists()
  first = _losses(workdir)
  assert sorted(first) == [1, 2, 3]
  jsonl = storage.path(workdir) / logging_lib.METRICS_FILENAME
  lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
  assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]  # one line per step
  # Event files were uploaded at each flush, with the same losses.
  events = _event_losses(workdir, tmp_path)
  assert sorted(events) == [1, 2, 3]
  np.testing.assert_allclose([events[s] for s in (1, 2, 3)], [first[s] for s in (1, 2, 3)],
                             rtol=1e-6)
  # Lines a run killed after its last checkpoint would have written: the resume drops them.
  jsonl.write_text(jsonl.read_text() + '{"step": 4, "loss": 99.0}\n{"step": 5, "loss": 99.0}\n')
  summary = train.train_and_evaluate(_small(tiny_config(), 3, 2), workdir)
  assert summary["steps"] == 3
  assert _losses(workdir) == first
  # Nothing was written to a local path named like the URL.
  assert not os.path.exists(workdir) and not os.path.exists("gs:")


def test_metrics_rewrite_keeps_the_old_object_until_the_new_one_is_whole(emulators):
  path = f"{GS}/{_unique('jsonl')}/metrics.jsonl"
  storage.path(path).parent.mkdir(parents=True, exist_ok=True)
  writer = logging_lib.JsonlWriter(path)
  writer.write_scalars(1, {"loss": 1.0})
  writer.flush()
  writer.write_scalars(2, {"loss": 2.0})  # pending until the next flush: not yet in the object
  assert [r["step"] for r in logging_lib.read_metrics_jsonl(path)] == [1]
  writer.close()
  assert [r["step"] for r in logging_lib.read_metrics_jsonl(path)] == [1, 2]
  logging_lib.truncate_after(path, 1)
  assert storage.path(path).read_text() == '{"step": 1, "loss": 1.0}\n'
  # A second writer (a resumed job) continues the object rather than replacing it.
  writer = logging_lib.JsonlWriter(path)
  writer.write_scalars(2, {"loss": 3.0})
  writer.close()
  assert [(r["step"], r["loss"]) for r in logging_lib.read_metrics_jsonl(path)] == [(1, 1.0),
                                                                                   (2, 3.0)]


def test_listing_sees_what_another_process_wrote(emulators):
  """gcsfs caches listings forever by default; the watcher and resume must see new steps."""
  base = storage.path(f"{GS}/{_unique('listing')}")
  (base / "1").write_text("x")
  assert [p.name for p in base.iterdir()] == ["1"]
  subprocess.run([sys.executable, "-c", "from glip_jax import storage; "
                  f"storage.path('{os.fspath(base)}/2').write_text('y')"],
                 check=True, cwd=REPO, timeout=120)
  assert sorted(p.name for p in base.iterdir()) == ["1", "2"]


def test_emulator_keeps_serving_after_many_clients_hang_up(emulators):
  """Clients that reset mid-download (a killed trainer) make the emulator print a traceback
  each; 100 of them (~200 KB) must not block it (its output once went to an unread pipe: CI hung)."""
  import socket  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  import urllib.parse  # pylint: disable=g-import-not-at-top
  name = f"{_unique('big')}/blob"
  storage.path(f"{GS}/{name}").write_bytes(b"x" * (4 << 20))
  url = urllib.parse.urlparse(os.environ["STORAGE_EMULATOR_HOST"])
  request = (f"GET /download/storage/v1/b/{storage_emulators.GCS_BUCKET}/o/"
             f"{urllib.parse.quote(name, safe='')}?alt=media HTTP/1.0\r\n\r\n").encode()
  for _ in range(100):
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
      s.sendall(request)
      s.recv(1)  # the response has started
      s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
  result = subprocess.run([sys.executable, "-c", "from glip_jax import storage; "
                           f"print(len(storage.path('{GS}/{name}').read_bytes()))"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.stdout.strip() == str(4 << 20), result.stderr[-2000:]


def test_gs_globs_and_parquet_source(emulators, tmp_path):
  """Shard globs on gs:// (wildcards in any component) and Parquet rows read in place."""
  base = f"{GS}/{_unique('data')}"
  out = subprocess.run(
      [sys.executable, "tools/make_arrayrecord.py", "--input_format=synthetic",
       "--num_examples=10", "--synthetic_image_size=16", "--records_per_shard=4",
       "--output_format=parquet", "--parquet_row_group_size=3", f"--output_dir={base}/pq",
       "--prefix=train"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  shards = storage.glob(f"{base}/*/train-*.parquet")
  assert shards == [f"{base}/pq/train-0000{i}.parquet" for i in range(3)]
  summary = json.loads((storage.path(base) / "pq" / "train-summary.json").read_text())
  assert summary["written"] == 10 and summary["pattern"] == f"{base}/pq/train-*.parquet"
  source = sources.ParquetSource(f"{base}/pq/train-*.parquet")
  assert len(source) == 10
  # Row i of the parquet set is example i of the synthetic set, wherever its row group lies.
  from glip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  reference = synthetic.SyntheticScenes(synthetic.SceneConfig(image_size=16), split="train",
                                        size=10)
  for i in (9, 0, 4, 5):
    assert source[i]["captions"] == reference[i]["captions"]
    assert source[i]["label"] == reference[i]["label"]
  with pytest.raises(FileNotFoundError, match="matches no file"):
    sources.expand_paths(f"{base}/nothing-*.parquet")


def test_arrayrecord_from_a_bucket_names_the_fix(emulators):
  path = f"{GS}/{_unique('ar')}/train-00000.array_record"
  storage.path(path).parent.mkdir(parents=True, exist_ok=True)
  storage.path(path).write_bytes(b"x")
  with pytest.raises(ValueError, match="gcsfuse / mountpoint-s3.*parquet"):
    sources.ArrayRecordSource(path)


def test_missing_credentials_fail_at_start_naming_path_and_what_was_tried(monkeypatch, tmp_path):
  storage._checked.clear()  # pylint: disable=protected-access
  for key in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
  monkeypatch.setenv("NO_GCE_CHECK", "true")  # never probe a metadata server from a test
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
  with pytest.raises(errors.ConfigError) as e:
    train.train_and_evaluate(tiny_config(), "gs://no-creds/run")
  message = str(e.value)
  assert message.startswith("gs://no-creds/run: no Google Cloud credentials found; tried ")
  for tried in ("GOOGLE_APPLICATION_CREDENTIALS (unset)",
                f"{tmp_path}/gcloud/application_default_credentials.json",
                "metadata server", "STORAGE_EMULATOR_HOST (unset)"):
    assert tried in message
  with pytest.raises(errors.ConfigError, match=(
      r"s3://no-creds/x: no AWS credentials found; tried AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
      r"\(unset\); the shared credentials file .*/\.aws/credentials \(absent\); the EC2")):
    storage.check_access("s3://no-creds/x")
  storage._checked.clear()  # pylint: disable=protected-access


# ---------------------------------------------------------------------------- slow set


def _final_params(workdir: str):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from glip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  model = clip_lib.build_model(config.model)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), *clip_lib.dummy_inputs(config.model)))["params"])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          shapes)
  return jax.device_get(checkpointing.restore_params_from(workdir, abstract))


@pytest.mark.slow
def test_gs_kill_9_then_resume_is_bit_exact_as_on_local_disk(emulators, tmp_path):
  """SIGKILL while the save of step 15 is in flight on GCS; the resume is bit-exact.

  The kill is a deterministic exit point (checkpointing.exit_point), not a race against a
  poller: polling the bucket for progress let a loaded machine finish the run before the kill.
  """
  steps = ["--config.total_steps=20", "--config.checkpoint_every_steps=5"]
  local = str(tmp_path / "local")
  train.train_and_evaluate(_small(tiny_config(), 20, 5), local)
  workdir = f"{GS}/{_unique('killed')}"
  log_path = str(tmp_path / "log")
  args, env = command(workdir, *steps)
  # Orbax waits for the save of step 10 before it starts the one of step 15: 10 is committed,
  # 15 is not, and the metrics of steps 11-15 are already in the bucket.
  env[checkpointing.TEST_EXIT_ENV] = "save:15:dispatched"
  with open(log_path, "w") as log:
    proc = subprocess.run(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          timeout=400, check=False)
  assert proc.returncode == -signal.SIGKILL, open(log_path).read()[-3000:]
  assert checkpointing.all_steps(checkpointing.checkpoint_dir(workdir))[-1] == 10
  assert max(_losses(workdir)) == 15  # logged past the last checkpoint: the resume drops them
  train.train_and_evaluate(_small(tiny_config(), 20, 5), workdir)
  a, b = _losses(local), _losses(workdir)
  assert sorted(b) == list(range(1, 21))
  assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bit for bit
  import jax  # pylint: disable=g-import-not-at-top
  for x, y in zip(jax.tree.leaves(_final_params(local)), jax.tree.leaves(_final_params(workdir))):
    np.testing.assert_array_equal(x, y)


def _convert(base: str, output_format: str, num_examples: int = 64) -> None:
  out = subprocess.run(
      [sys.executable, "tools/make_arrayrecord.py", "--input_format=synthetic",
       f"--num_examples={num_examples}", "--synthetic_image_size=32", "--records_per_shard=32",
       f"--output_format={output_format}", f"--output_dir={base}", "--prefix=train"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]


def _parquet_config(base: str, steps: int, every: int):
  config = _small(tiny_config(), steps, every)
  config.data.source = "parquet"
  config.data.paths = f"{base}/train-*.parquet"
  return config


@pytest.mark.slow
def test_convert_to_gs_train_from_it_and_watch_the_bucket(emulators):
  """Synthetic set → Parquet shards in the bucket → training from them on a gs:// workdir →
  the eval watcher on that workdir, which skips a step directory Orbax has not committed."""
  from glip_jax.evaluation import watcher  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  base = f"{GS}/{_unique('cc')}"
  _convert(base, "parquet")
  workdir = f"{base}/run"
  summary = train.train_and_evaluate(_parquet_config(base, 4, 2), workdir)
  assert summary["steps"] == 4 and sorted(_losses(workdir)) == [1, 2, 3, 4]
  assert checkpointing.all_steps(checkpointing.checkpoint_dir(workdir)) == [2, 4]
  # A save in flight on GCS: the step directory is listed but has no commit_success.txt yet.
  partial = checkpointing.checkpoint_dir(workdir) / "3"
  (partial / "state").mkdir(parents=True, exist_ok=True)
  (partial / "state" / "x").write_text("partial")
  eval_config = _parquet_config(base, 4, 2)
  eval_config.evals = demo.get_config().evals
  eval_config.evals = {"shape": eval_config.evals.shape}
  eval_config.evals["shape"].update(batch_size=16, every_steps=2)
  eval_config.evals["shape"].dataset.synthetic.eval_size = 32
  results = watcher.run_watcher(eval_config, workdir, poll_seconds=0.1, timeout_seconds=300)
  assert sorted(results) == [2, 4]
  record = watcher.eval_dir(workdir) / watcher.RECORD_FILENAME
  assert json.loads(record.read_text()) == {"steps": [2, 4]}
  rows = logging_lib.read_metrics_jsonl(os.fspath(watcher.eval_dir(workdir) / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [2, 4]
  # A restarted watcher evaluates nothing twice.
  assert watcher.run_watcher(eval_config, workdir, poll_seconds=0.1, timeout_seconds=5) == {}
  # The ArrayRecord output lands in the bucket too (read back through a FUSE mount).
  _convert(f"{base}/ar", "arrayrecord", num_examples=8)
  assert storage.glob(f"{base}/ar/train-*.array_record") == [f"{base}/ar/train-00000.array_record"]


@pytest.mark.slow
def test_s3_data_metrics_events_and_eval_record(needs_s3, tmp_path):
  """s3:// through pyarrow's S3 client: converter output, training data, metrics, TB events.

  Checkpoints stay local here: tensorstore's s3 driver cannot be pointed at an emulator
  (tests/storage_emulators.py says why), so Orbax on s3:// is not emulator-tested.
  """
  from glip_jax.evaluation import watcher  # pylint: disable=g-import-not-at-top
  base = f"{S3}/{_unique('cc')}"
  _convert(base, "parquet")
  summary = train.train_and_evaluate(_parquet_config(base, 4, 4), str(tmp_path / "run"))
  assert summary["steps"] == 4 and sorted(_losses(str(tmp_path / "run"))) == [1, 2, 3, 4]
  logdir = f"{base}/logs"
  writer = logging_lib.create_writer(logdir, just_logging=False)
  for step in (1, 2):
    writer.write_scalars(step, {"loss": float(step)})
    writer.flush()
  writer.close()
  assert _losses(logdir) == {1: 1.0, 2: 2.0}
  assert _event_losses(logdir, tmp_path) == {1: 1.0, 2: 2.0}
  logging_lib.truncate_after(os.fspath(storage.path(logdir) / "metrics.jsonl"), 1)
  assert _losses(logdir) == {1: 1.0}
  watcher._write_record(logdir, {2, 4})  # pylint: disable=protected-access
  assert watcher.read_record(logdir) == {2, 4}


@pytest.mark.slow
def test_s3_workdir_checkpoints_are_documented_as_not_emulated(needs_s3):
  """The tensorstore limit the docs describe: an s3:// kvstore opened from a URL ignores
  AWS_ENDPOINT_URL and asks AWS for the bucket's region, so it cannot reach the emulator."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  spec = ts.KvStore.Spec(f"{S3}/x/").to_json()
  assert spec["driver"] == "s3" and "endpoint" not in spec
  kv = ts.KvStore.open({**spec, "endpoint": os.environ["AWS_ENDPOINT_URL"],
                        "aws_region": "us-east-1"}).result()
  kv.write("a", b"1").result()  # with the spec's endpoint it works
  assert epath.Path(f"{S3}/x/a").read_bytes() == b"1"
