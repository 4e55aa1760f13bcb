"""Object storage (gs://, s3://) next to local disk, through one path type: `etils.epath.Path`.

Orbax already reads and writes checkpoints through epath (and tensorstore for the arrays), so
every other file of a run — metrics.jsonl, TensorBoard events, the watcher's record, data shards,
class-name and template files, converter outputs — goes through it too. Without TensorFlow epath
sends gs:// and s3:// to fsspec: gcsfs for gs://, and for s3:// the `s3fs` package when it is
installed, else the S3 client built into pyarrow (registered below: s3fs needs botocore, whose
`python-dateutil<3` cap conflicts with the locked python-dateutil 4).

Endpoints and credentials come from the standard environment, never from code:
  gs://  Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, the gcloud ADC file,
         the GCE/TPU metadata server); STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL
         (tensorstore, i.e. the checkpoint arrays) point both at an emulator.
  s3://  AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY(/AWS_SESSION_TOKEN), AWS_PROFILE and
         ~/.aws/credentials, or the instance role; AWS_ENDPOINT_URL(_S3) for S3-compatible stores.
`check_access` turns a missing credential into one start-up error naming the path and what was
tried, instead of a 401 in a background thread minutes later.

Object stores cannot append or rename: `write_text_atomic` writes a whole object (a single PUT,
which readers see entirely or not at all) and, locally, writes a temporary file and renames it.
"""

from __future__ import annotations

import glob as glob_lib
import logging
import os
import re
from typing import Any

from etils import epath

from glip_jax import errors
from glip_jax import paths

_GLOB_CHARS = re.compile(r"[*?\[]")

# gcsfs logs every file it opens at INFO ("AdaptiveReadaheadCache enabled ..."), which absl would
# print once per metrics flush and checkpoint file.
logging.getLogger("gcsfs").setLevel(logging.WARNING)


def _no_listing_cache() -> None:
  """gcsfs caches directory listings forever by default: a watcher (or a resume check) would
  never see a checkpoint another process wrote after its first listing. Listings are re-read."""
  from fsspec import config  # pylint: disable=g-import-not-at-top
  for protocol in ("gs", "gcs"):
    config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_listing_cache()


def is_remote(path: str | os.PathLike[str]) -> bool:
  """Whether `path` is on an object store (gs://, s3://) rather than a local filesystem."""
  return os.fspath(path).startswith(("gs://", "s3://"))


def path(value: str | os.PathLike[str]) -> epath.Path:
  """The epath.Path of a local path or gs:// / s3:// URL (`~` expanded locally)."""
  value = os.fspath(value)
  return epath.Path(value if paths.is_url(value) else os.path.expanduser(value))


def glob(pattern: str) -> list[str]:
  """Sorted matches of a local or object-store glob (wildcards allowed in any component)."""
  pattern = os.fspath(pattern)
  if not is_remote(pattern):
    return sorted(glob_lib.glob(os.path.expanduser(pattern)))
  check_access(pattern)
  if not _GLOB_CHARS.search(pattern):
    return [pattern] if epath.Path(pattern).exists() else []
  parts = pattern.split("/")
  first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
  base = epath.Path("/".join(parts[:first]))
  return sorted(os.fspath(p) for p in base.glob("/".join(parts[first:])))


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
  """Replaces a file's contents so that a crash leaves either the old or the new text, whole."""
  target = path(target)
  if is_remote(target):
    # One object upload: committed only when it completes, so a kill mid-write keeps the old one.
    target.write_text(text)
    return
  tmp = f"{os.fspath(target)}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)


def upload(local: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
  """Copies a local file to `target` (one whole-object write on object stores)."""
  with open(local, "rb") as src:
    data = src.read()
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)  # a no-op on object stores
  target.write_bytes(data)


# ---------------------------------------------------------------------------- credentials

_checked: set[tuple[str, str]] = set()


def _bucket(url: str) -> tuple[str, str]:
  scheme, rest = url.split("://", 1)
  return scheme, rest.split("/", 1)[0]


def _gcs_tried() -> list[str] | None:
  """None when Google credentials (or an emulator) are found, else what was looked at."""
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return None
  tried = []
  env = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
  if env:
    if os.path.isfile(env):
      return None
    tried.append(f"GOOGLE_APPLICATION_CREDENTIALS={env} (no such file)")
  else:
    tried.append("GOOGLE_APPLICATION_CREDENTIALS (unset)")
  config_dir = os.environ.get("CLOUDSDK_CONFIG") or os.path.expanduser("~/.config/gcloud")
  adc = os.path.join(config_dir, "application_default_credentials.json")
  if os.path.isfile(adc):
    return None
  tried.append(f"the gcloud ADC file {adc} (absent; `gcloud auth application-default login`)")
  try:
    import google.auth  # pylint: disable=g-import-not-at-top
    google.auth.default()
    return None
  except Exception as e:  # pylint: disable=broad-except  # DefaultCredentialsError, ImportError
    tried.append(f"the GCE/TPU metadata server ({type(e).__name__})")
  tried.append("STORAGE_EMULATOR_HOST (unset)")
  return tried


def _s3_tried() -> list[str] | None:
  """None when AWS credentials are found, else what was looked at."""
  if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
    return None
  tried = ["AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (unset)"]
  if os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") or os.environ.get(
      "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or os.environ.get(
          "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
    return None  # EKS / ECS roles: resolved by the SDKs themselves.
  shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser(
      "~/.aws/credentials")
  if os.path.isfile(shared):
    return None
  tried.append(f"the shared credentials file {shared} (absent)")
  if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
    # An EC2 instance role cannot be seen without asking the metadata service; the S3 client
    # will. Only when it is disabled is there certainly no credential.
    return None
  tried.append("the EC2 instance metadata service (AWS_EC2_METADATA_DISABLED=true)")
  return tried


def check_access(url: str | os.PathLike[str]) -> None:
  """ConfigError naming `url` and what was tried when no credential for its store is found."""
  url = os.fspath(url)
  if not is_remote(url):
    return
  key = _bucket(url)
  if key in _checked:
    return
  if key[0] == "gs":
    import importlib.util  # pylint: disable=g-import-not-at-top
    if importlib.util.find_spec("gcsfs") is None:
      raise errors.ConfigError(f"{url}: gs:// paths need gcsfs (etils.epath's GCS backend without "
                               "TensorFlow): pip install 'glip_jax[cloud]'.")
  tried = _gcs_tried() if key[0] == "gs" else _s3_tried()
  if tried is not None:
    raise errors.ConfigError(
        f"{url}: no {'Google Cloud' if key[0] == 'gs' else 'AWS'} credentials found; tried "
        + "; ".join(tried) + ". See docs/launching.md (object storage).")
  _checked.add(key)


# ---------------------------------------------------------------------------- s3:// without s3fs


def _register_pyarrow_s3() -> None:
  """fsspec's 's3' protocol served by pyarrow's S3 client when s3fs is not installed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("s3fs") is not None:
    return
  import fsspec  # pylint: disable=g-import-not-at-top
  from fsspec.implementations import arrow  # pylint: disable=g-import-not-at-top

  class PyArrowS3FileSystem(arrow.ArrowFSWrapper):
    """s3:// through pyarrow.fs.S3FileSystem; endpoint from AWS_ENDPOINT_URL(_S3)."""

    protocol = ("s3", "s3a")
    root_marker = ""

    def __init__(self, **kwargs: Any):
      from pyarrow import fs as pafs  # pylint: disable=g-import-not-at-top
      endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
      region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
      options = {"endpoint_override": endpoint} if endpoint else {}
      if region:
        options["region"] = region
      super().__init__(pafs.S3FileSystem(**options), **kwargs)

    @classmethod
    def _strip_protocol(cls, value):
      value = value[0] if isinstance(value, list) else value
      for prefix in ("s3://", "s3a://"):
        if value.startswith(prefix):
          value = value[len(prefix):]
      return value.rstrip("/")

  fsspec.register_implementation("s3", PyArrowS3FileSystem, clobber=True)
  fsspec.register_implementation("s3a", PyArrowS3FileSystem, clobber=True)


_register_pyarrow_s3()
