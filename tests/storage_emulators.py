"""Local object-store emulators for the tests: a GCS one (pip: gcp-storage-emulator) and an S3 one.

Both listen on 127.0.0.1 at a free port, in memory (GCS) or in a temporary folder (S3); `env()`
is what points the clients at them — the same variables a user sets for a real emulator:

  gcsfs (epath gs://)          STORAGE_EMULATOR_HOST
  tensorstore (Orbax arrays)   TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING (no ADC)
  pyarrow S3 (epath s3://)     AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY

One fix to the GCS emulator (applied in its process, not to the installed package): its media
downloads lack the `x-goog-generation` header, from which tensorstore's gcs driver takes an
object's generation. Without it every read reports generation 0 and Orbax's OCDBT manifest
update (a write conditional on that generation) fails with "Malformed StorageGeneration".
The emulator also ignores ifGenerationMatch preconditions: fine for one writer per object.

S3: moto (the usual pip emulator) needs botocore, which caps python-dateutil below the locked 4.0,
so the S3 emulator is s3rver (npm; `.ci/run` installs it into .cache/s3rver). Its absence skips
the S3 tests. tensorstore cannot be pointed at it at all: its s3 driver takes an endpoint only
from the kvstore spec's `endpoint` member — not from AWS_ENDPOINT_URL nor a context resource — and
Orbax builds that spec from the s3:// path, so checkpoints on s3:// are not emulator-tested.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GCS_BUCKET = "glip-test"
S3_BUCKET = "glip-test"
S3RVER_CANDIDATES = (os.path.join(REPO, ".cache", "s3rver", "node_modules", ".bin", "s3rver"),
                     os.path.expanduser("~/.cache/glip_jax/s3rver/node_modules/.bin/s3rver"))

_GCS_SERVER = r"""
import sys
from gcp_storage_emulator.handlers import objects

_download = objects.download

def download(request, response, storage, *args, **kwargs):
    # tensorstore reads an object's generation from this header (see tests/storage_emulators.py).
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
    except Exception:
        pass
    return _download(request, response, storage, *args, **kwargs)

objects.download = download
from gcp_storage_emulator.__main__ import main
main(["start", "--host", "127.0.0.1", "--port", sys.argv[1], "--in-memory", "--quiet",
      "--default-bucket", sys.argv[2]])
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(log_path: str) -> str:
  """The end of what an emulator wrote to its log file."""
  with open(log_path, errors="replace") as f:
    return f.read()[-3000:]


def _wait(port: int, process: subprocess.Popen, name: str, log_path: str,
          timeout: float = 30) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"{name} exited with {process.returncode}: {_tail(log_path)}")
    try:
      with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return
    except OSError:
      time.sleep(0.1)
  process.kill()
  raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout}s")


def s3rver_path() -> str | None:
  """The s3rver executable (.ci/run installs it), or None."""
  for candidate in (os.environ.get("GLIP_S3RVER", ""), *S3RVER_CANDIDATES):
    if candidate and os.path.exists(candidate) and shutil.which("node"):
      return candidate
  return None


class Emulators:
  """Starts the emulators; `env` holds the client variables; `stop()` ends them."""

  def __init__(self, s3: bool = True):
    self._processes: list[tuple[str, subprocess.Popen, str]] = []  # (name, process, log path)
    self._dirs: list[str] = []
    self.env: dict[str, str] = {
        # No metadata-server probes (it is not on this machine) and no zonal-bucket lookups.
        "NO_GCE_CHECK": "true", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    port = free_port()
    self._start([sys.executable, "-c", _GCS_SERVER, str(port), GCS_BUCKET], port, "GCS emulator")
    url = f"http://127.0.0.1:{port}"
    self.env.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                    GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", GOOGLE_CLOUD_PROJECT="test")
    self.s3 = False
    binary = s3rver_path() if s3 else None
    if binary:
      port = free_port()
      data = tempfile.mkdtemp(prefix="glip_s3rver_")
      self._dirs.append(data)
      self._start([binary, "--address", "127.0.0.1", "--port", str(port), "--directory", data,
                   "--silent", "--configure-bucket", S3_BUCKET], port, "s3rver")
      self.env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="S3RVER",
                      AWS_SECRET_ACCESS_KEY="S3RVER", AWS_REGION="us-east-1",
                      # s3rver does not understand aws-chunked uploads with trailing checksums.
                      AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
                      AWS_RESPONSE_CHECKSUM_VALIDATION="when_required")
      self.s3 = True

  def _start(self, argv: list[str], port: int, name: str) -> None:
    # The emulator's output goes to a file, never to an unread pipe. Even with --quiet the GCS
    # emulator prints a ~2 KB traceback for every client that hangs up mid-response (a killed
    # trainer, a cancelled read-ahead); once a pipe's 64 KiB are full its single server thread
    # blocks on the next one and every request waits forever: CI hung for an hour in the test
    # after the kill -9 one.
    # GLIP_EMULATOR_LOG_DIR keeps the logs after the tests (to see why an emulator died).
    log_dir = os.environ.get("GLIP_EMULATOR_LOG_DIR")
    if log_dir:
      os.makedirs(log_dir, exist_ok=True)
    else:
      log_dir = tempfile.mkdtemp(prefix="glip_emulator_log_")
      self._dirs.append(log_dir)
    log_path = os.path.join(log_dir, name.replace(" ", "_") + ".log")
    with open(log_path, "w") as log:
      process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, **self.env})
    self._processes.append((name, process, log_path))
    _wait(port, process, name, log_path)

  def stop(self) -> None:
    for name, process, log_path in self._processes:
      if process.poll() is not None:  # it died during the tests: say how, for the CI log
        print(f"{name} had exited with {process.returncode}:\n{_tail(log_path)}", file=sys.stderr)
      process.terminate()
    for _, process, _ in self._processes:
      try:
        process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        process.kill()
    for folder in self._dirs:
      shutil.rmtree(folder, ignore_errors=True)
