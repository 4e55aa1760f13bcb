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
  """Parses msgpack bytes into the common record dict (image stays encoded as 'image_bytes')."""
  record = msgpack.unpackb(data, raw=False)
  return {
      "image_bytes": record["image"],
      "captions": list(record["captions"]),
      "label": int(record.get("label", -1)),
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
    raise ValueError(f"record {record['key']!r} has no caption; training needs text")
  return captions[int(rng.integers(len(captions)))]
