"""Metric writers: CLU's writer interface without TensorFlow, plus a JSONL file.

Why this module exists: `clu.metric_writers` (and `clu.periodic_actions`, which
imports it) imports `clu/metric_writers/summary_writer.py`, which imports
TensorFlow; we do not install TensorFlow. Before importing them we register a
module under that name whose `SummaryWriter` writes TensorBoard event files with
tensorboardX. It is the only clu module that needs TF (the rest of
`clu.metric_writers`, `clu.periodic_actions`, `clu.profiler` and `clu.platform`
need only jax/absl/etils). Everything in glip_jax that wants clu writers or
periodic actions imports them from here:

  from glip_jax.logging import metric_writers, periodic_actions

`create_writer` builds the per-job writer: TensorBoard events + `metrics.jsonl` +
absl logging on process 0, absl logging only on other processes.

Resume: a run killed after its last checkpoint has written metrics for steps
that the resumed run will compute again. `create_writer(..., resume_step=s)`
removes lines with step > s from `metrics.jsonl` (so the file ends up equal to
that of an uninterrupted run) and starts the event file with a TensorBoard
"purge" marker at s + 1, so TensorBoard drops the stale events of the old run.

Object storage (a gs:// or s3:// workdir; glip_jax/storage.py): objects cannot be appended to, so
`metrics.jsonl` there is kept in memory and rewritten whole at every flush (one object upload:
readers and a crash see the previous or the new file, never half of one), and tensorboardX writes
its event file into a local staging folder that is uploaded to the workdir at every flush and on
close. A kill -9 loses what was written since the last flush, as on local disk.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Mapping
from typing import Any

from absl import logging
import numpy as np
import tensorboardX
from tensorboardX import summary as tbx_summary

from glip_jax import storage


class SummaryWriter:
  """TF-free clu `MetricWriter` writing TensorBoard event files via tensorboardX.

  Registered below as a virtual subclass of `clu.metric_writers.MetricWriter`
  (it cannot inherit from it: importing the interface imports
  `clu.metric_writers`, which needs this class first). Every method of that
  interface is abstract, so nothing is lost.
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    # tensorboardX's own gs:// / s3:// writers need google-cloud-storage / boto3 and rewrite the
    # object per record; on object storage we write locally and upload at each flush instead.
    self._remote = os.fspath(logdir) if storage.is_remote(logdir) else None
    local = tempfile.mkdtemp(prefix="glip_jax_tb_") if self._remote else logdir
    # tensorboardX names event files by whole seconds and opens them with
    # "wb": a second writer in the same second would clobber the first. The
    # zero-padded nanoseconds keep names unique and in time order.
    # flush_secs bounds how stale the event file can be after a kill -9.
    self._writer = tensorboardX.SummaryWriter(
        logdir=local, purge_step=purge_step, flush_secs=30,
        filename_suffix=f".{time.time_ns() % 10**9:09d}")
    self._local = local

  def _sync(self):
    """Uploads the staged event file(s) to the object-store logdir (whole objects)."""
    if self._remote is None:
      return
    for name in sorted(os.listdir(self._local)):
      storage.upload(os.path.join(self._local, name), storage.path(self._remote) / name)

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None):
    del step, values, metadata
    logging.log_first_n(logging.WARNING,
                        "SummaryWriter (tensorboardX) ignores raw summaries.", 1)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    # clu images are [H, W, C] or [N, H, W, C], uint8 or float in [0, 1].
    for key, value in images.items():
      value = np.asarray(value)
      if value.ndim == 3:
        value = value[None]
      self._writer.add_images(key, value, global_step=step, dataformats="NHWC")

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    del step, videos
    logging.log_first_n(logging.WARNING,
                        "SummaryWriter (tensorboardX) ignores videos.", 1)

  def write_audios(self, step: int, audios: Mapping[str, Any], *,
                   sample_rate: int):
    del step, audios, sample_rate
    logging.log_first_n(logging.WARNING,
                        "SummaryWriter (tensorboardX) ignores audios.", 1)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._writer.add_text(key, value, global_step=step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None):
    for key, value in arrays.items():
      buckets = (num_buckets or {}).get(key)
      self._writer.add_histogram(key, np.asarray(value), global_step=step,
                                 bins=buckets or "tensorflow")

  def write_hparams(self, hparams: Mapping[str, Any]):
    # tensorboardX's add_hparams writes into a new timestamped sub-run; write
    # the hparams summaries into this run's event file instead.
    flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in _flatten(hparams).items()}
    for s in tbx_summary.hparams(flat, {}):
      self._writer.file_writer.add_summary(s)

  def flush(self):
    self._writer.flush()
    self._sync()

  def close(self):
    self._writer.close()
    self._sync()
    if self._remote is not None:
      shutil.rmtree(self._local, ignore_errors=True)


def _register_tf_free_summary_writer():
  """Makes `import clu.metric_writers` resolve `summary_writer` to ours."""
  name = "clu.metric_writers.summary_writer"
  if name in sys.modules:  # Already imported (TF installed, or ours): keep it.
    return
  module = types.ModuleType(name, "TF-free stand-in registered by glip_jax.logging.")
  module.SummaryWriter = SummaryWriter
  sys.modules[name] = module


_register_tf_free_summary_writer()

# pylint: disable=g-import-not-at-top,wrong-import-position
from clu import metric_writers  # noqa: E402
from clu import periodic_actions  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

metric_writers.MetricWriter.register(SummaryWriter)

METRICS_FILENAME = "metrics.jsonl"


class JsonlWriter:
  """clu `MetricWriter` appending one JSON object per step to a file.

  Scalars written for the same step by consecutive calls (e.g. train metrics,
  then ReportProgress's `steps_per_sec`, then `uptime`) are merged into one
  line: the line for step s is written when scalars for another step arrive,
  or on `flush()`/`close()`. A step can still get two lines (scalars for s
  written after a flush, or after a later step); `read_metrics_jsonl` merges
  them, later values winning. Non-scalar data is not written here (TensorBoard
  and the log have it). Non-finite values are written as NaN/Infinity, which
  Python's json reads back.
  """

  def __init__(self, path: str):
    self._path = path
    self._remote = storage.is_remote(path)
    if self._remote:
      # No append on object stores: the whole text is kept and rewritten at each flush.
      target = storage.path(path)
      self._text = [target.read_text()] if target.exists() else []
      self._file = None
    else:
      # Append: a resumed job continues the file (see `truncate_after`).
      self._file = open(path, "a", encoding="utf-8")
    self._step: int | None = None
    self._pending: dict[str, float] = {}

  def _write_pending(self):
    if self._pending:
      line = json.dumps({"step": self._step, **self._pending}) + "\n"
      if self._remote:
        self._text.append(line)
      else:
        self._file.write(line)
    self._pending = {}

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if step != self._step:
      self._write_pending()
      self._step = int(step)
    self._pending.update({k: _to_json_number(v) for k, v in scalars.items()})

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    self._write_pending()
    if self._remote:
      storage.write_text_atomic(self._path, "".join(self._text))
    else:
      self._file.flush()

  def close(self):
    self.flush()
    if self._file is not None:
      self._file.close()


metric_writers.MetricWriter.register(JsonlWriter)


def _to_json_number(value: Any) -> float | int:
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(f"Scalar expected, got shape {value.shape}.")
  value = value.item()
  return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _parse_lines(path: str) -> list[dict[str, Any]]:
  """Parsed lines; a torn last line (killed mid-write) is dropped."""
  records = []
  with storage.path(path).open("r") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("Skipping unparsable line in %s: %r", path, line[:80])
  return records


def truncate_after(path: str, step: int) -> None:
  """Drops lines of a metrics.jsonl with step > `step` (call on resume)."""
  if not storage.path(path).exists():
    return
  kept = [r for r in _parse_lines(path) if r.get("step", -1) <= step]
  # Write-then-rename (an object store: one whole-object write) so a kill cannot lose the file.
  storage.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads metrics.jsonl as one dict per step, in step order, lines merged."""
  by_step: dict[int, dict[str, Any]] = {}
  for record in _parse_lines(path):
    by_step.setdefault(record["step"], {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def create_writer(workdir: str, *, just_logging: bool,
                  resume_step: int | None = None) -> metric_writers.MultiWriter:
  """TensorBoard + metrics.jsonl writer on process 0 (no files if `just_logging`).

  Every metric also goes to the absl log at --verbosity>=1; at the default verbosity the console
  shows the trainer's progress line instead (glip_jax/progress.py), not every scalar.
  """
  verbose = logging.get_verbosity() >= logging.DEBUG
  log_writers = [metric_writers.LoggingWriter()] if verbose else []
  if just_logging:  # Processes > 0: all processes see the same metrics.
    return metric_writers.MultiWriter(log_writers)
  storage.check_access(workdir)
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  jsonl_path = os.fspath(storage.path(workdir) / METRICS_FILENAME)
  purge_step = None
  if resume_step is not None:
    truncate_after(jsonl_path, resume_step)
    purge_step = resume_step + 1
  return metric_writers.MultiWriter([
      SummaryWriter(workdir, purge_step=purge_step),
      JsonlWriter(jsonl_path),
      *log_writers,
  ])
