"""The ArrayRecord example format: one msgpack map per record (never pickle).

Record fields (msgpack map with string keys):
  image     bytes            encoded image (JPEG, PNG or anything PIL decodes), required
  captions  list[str]        one or more captions (retrieval sets keep all of them), required
  key       str              a stable identifier, e.g. the source file stem, required
  label     int              optional class id; absent or -1 means "no label"
  metadata  map[str, any]    optional; msgpack-native values only (str, int, float, bool, lists)

Files are written with `ArrayRecordWriter(path, "group_size:1")` so every record is individually
addressable (random access is what lets Grain shuffle globally).
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

FORMAT_VERSION = 1

# Why the input pipeline skips a record (glip_jax/data/pipeline.py counts each as
# `data/skipped/<reason>`): the image does not decode (truncated, not an image, zero-sized, absurd
# dimensions), no caption is left after cleaning, a field is missing, or the bytes are no record.
SKIP_REASONS = ("undecodable_image", "empty_caption", "missing_field", "unreadable_record")


class BadRecordError(ValueError):
  """A record the pipeline skips (and counts under `reason`, one of SKIP_REASONS)."""

  reason = "unreadable_record"

  def __init__(self, message: str, reason: str | None = None):
    super().__init__(message)
    if reason is not None:
      self.reason = reason


def scalar_metadata(meta: dict[str, Any]) -> dict[str, Any]:
  """The msgpack-friendly scalar fields of img2dataset's json (url, width, ...), caption excluded."""
  return {
      k: v
      for k, v in meta.items()
      if k != "caption" and isinstance(v, (str, int, float, bool)) and v is not None
  }


def encode_record(
    image: bytes,
    captions: list[str],
    key: str,
    label: int = -1,
    metadata: dict[str, Any] | None = None,
) -> bytes:
  """Serialises one example to msgpack bytes."""
  if not captions:
    raise ValueError(f"record {key!r} has no captions")
  record: dict[str, Any] = {"v": FORMAT_VERSION, "image": bytes(image), "captions": list(captions)}
  record["key"] = key
  record["label"] = int(label)
  if metadata:
    record["metadata"] = metadata
  return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  """Parses msgpack bytes into the common record dict (image stays encoded as 'image_bytes').

  BadRecordError (reason 'unreadable_record' or 'missing_field') for bytes written by another tool
  that are not such a record.
  """
  try:
    record = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several types (ExtraData, UnpackValueError, ...).
    raise BadRecordError(f"not a msgpack record ({len(data)} bytes): {e}") from None
  if not isinstance(record, dict):
    raise BadRecordError(f"not a msgpack map but {type(record).__name__}")
  missing = [f for f in ("image", "captions", "key") if f not in record]
  if missing:
    raise BadRecordError(f"record {record.get('key', '?')!r} lacks {missing}", "missing_field")
  try:
    captions = list(record["captions"])
    label = int(record.get("label", -1))
  except (TypeError, ValueError) as e:
    raise BadRecordError(f"record {record['key']!r}: bad captions or label ({e})") from None
  return {
      "image_bytes": record["image"],
      "captions": captions,
      "label": label,
      "key": record["key"],
      "metadata": record.get("metadata", {}),
  }


# The record dict every source hands the pipeline (glip_jax/data/sources.py): 'image_bytes' or a
# decoded 'image', 'captions', 'label', 'key' (optionally 'labels'). Two helpers read it.

def image_of(record: dict[str, Any]) -> Any:
  """A record's image: encoded bytes (ArrayRecord, TFDS) or a decoded array (synthetic)."""
  return record["image_bytes"] if "image_bytes" in record else record["image"]


def random_caption(record: dict[str, Any], rng: np.random.Generator) -> str:
  """One of the record's captions, chosen with `rng`; training needs at least one."""
  captions = record["captions"]
  if not captions:
    raise BadRecordError(f"record {record['key']!r} has no caption; training needs text",
                         "empty_caption")
  return captions[int(rng.integers(len(captions)))]


def checked(record: Any, need_caption: bool) -> dict[str, Any]:
  """The record with its captions cleaned (stripped, empty ones dropped); BadRecordError if unusable.

  Sources other than our converter (own tools, TFDS, Karpathy files) can hand over records with a
  missing field or only blank captions; training needs at least one caption (`need_caption`);
  evaluation accepts none at all (sets of images and labels) but not only blank ones.
  """
  if not isinstance(record, dict):
    raise BadRecordError(f"the source returned {type(record).__name__}, not a record dict")
  missing = [f for f in ("captions", "label", "key") if f not in record]
  if "image_bytes" not in record and "image" not in record:
    missing.insert(0, "image_bytes")
  if missing:
    raise BadRecordError(f"record {record.get('key', '?')!r} lacks {missing}", "missing_field")
  image = image_of(record)
  if image is None or (isinstance(image, (bytes, bytearray)) and not image):
    raise BadRecordError(f"record {record['key']!r} has an empty image", "undecodable_image")
  captions = [c.strip() for c in record["captions"] if isinstance(c, str) and c.strip()]
  # Evaluation keeps records without captions (image/label sets) but not ones whose captions are
  # all blank: in a captioned set such an image could never be retrieved.
  if not captions and (need_caption or record["captions"]):
    raise BadRecordError(f"record {record['key']!r} has no non-blank caption "
                         f"({record['captions']!r})", "empty_caption")
  return {**record, "captions": captions}
