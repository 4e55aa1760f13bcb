"""img2dataset's webdataset `.tar` shards read in place as a random-access Grain source.

A shard holds members `KEY.jpg` (or .png/.webp/…) + `KEY.txt` and/or `KEY.json` (img2dataset's
json carries `caption` when there is no .txt) + optionally `KEY.cls`. Each shard is indexed once:
one sequential pass over the tar headers records every example's member offsets and sizes, and
the index is kept in a small sidecar JSON file. Random access is then one positional read
(`os.pread` of the example's contiguous span of members), so Grain can shuffle globally, shard
over processes and resume mid-epoch exactly, as with ArrayRecord.

Sidecar location: `SHARD.tar.glip-index.json` next to the shard when that directory is writable
(the index travels with the data and is built once for all users), else in `index_dir`
(default `~/.cache/glip_jax/webdataset_index/`, named by a hash of the shard path). An index is
reused only if its format version and the shard's fingerprint (size + hash of the first and
last 64 KiB, so a copied shard keeps its index and a rewritten one is re-indexed) match.

Examples are the ones `tools/make_arrayrecord.py --input_format=webdataset` would write: the same
keys (`<tar stem>/<KEY>`), captions, labels and scalar metadata. Incomplete examples are skipped at
indexing and counted (`skipped`): `missing_image`, `empty_caption`, `truncated` (member data past
the end of the file: an interrupted download). The converter also drops undecodable images; here
that needs a full decode of every image, so it is opt-in (`verify_images=True`, counted as
`undecodable_image`); otherwise a bad image surfaces when it is decoded
(`transforms.UndecodableImageError`).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from glip_jax import paths as paths_lib
from glip_jax.data import records

INDEX_VERSION = 1
_FINGERPRINT_BYTES = 1 << 16
INDEX_SUFFIX = ".glip-index.json"
DEFAULT_INDEX_DIR = "~/.cache/glip_jax/webdataset_index"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
# The member kinds an example's record is built from; others (e.g. .npy embeddings) are ignored.
_KINDS = IMAGE_EXTENSIONS + ("txt", "json", "cls")
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


class CorruptMemberError(OSError):
  """A shard's bytes no longer match its index (the file changed or shrank after indexing)."""


def _brace_expand(pattern: str) -> list[str]:
  """webdataset's `{00000..00099}` ranges (zero padding kept) → explicit patterns."""
  match = _BRACE_RANGE.search(pattern)
  if not match:
    return [pattern]
  low, high = match.group(1), match.group(2)
  width = len(low) if low.startswith("0") else 0
  head, tail = pattern[: match.start()], pattern[match.end() :]
  return [
      p
      for i in range(int(low), int(high) + 1)
      for p in _brace_expand(f"{head}{i:0{width}d}{tail}")
  ]


def _glob(pattern: str) -> list[str]:
  """Local or object-store glob through etils.epath (wildcards allowed in any component)."""
  pattern = os.path.expanduser(pattern)
  if not _GLOB_CHARS.search(pattern):
    return [pattern] if epath.Path(pattern).exists() else []
  parts = pattern.split("/")
  first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
  base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
  return sorted(os.fspath(p) for p in epath.Path(base).glob("/".join(parts[first:])))


def expand_shards(paths: str | Sequence[str]) -> list[str]:
  """A glob, `{a..b}` range, comma-separated list or sequence of them → sorted .tar paths."""
  return paths_lib.expand_patterns(
      paths, lambda pattern: [m for p in _brace_expand(pattern) for m in _glob(p)],
      empty="webdataset .tar shard paths or a glob", no_match="matches no webdataset shard")


def _parse_json(data: bytes) -> dict[str, Any]:
  try:
    meta = json.loads(data)
  except ValueError:
    return {}
  return meta if isinstance(meta, dict) else {}


def _caption(members: dict[str, bytes]) -> str:
  """The example's caption: the .txt member, else the json's `caption` (as the converter)."""
  if "txt" in members:
    return members["txt"].decode("utf-8", errors="replace").strip()
  return str(_parse_json(members.get("json", b"{}")).get("caption") or "").strip()


def _image_ext(members: Any) -> str | None:
  return next((e for e in IMAGE_EXTENSIONS if e in members), None)


def _decodes(data: bytes) -> bool:
  try:
    with Image.open(io.BytesIO(data)) as pil:
      pil.load()
  except Exception:  # PIL raises many types for bad data; all mean "undecodable".
    return False
  return True


def build_index(shard: str, verify_images: bool = False) -> dict[str, Any]:
  """One pass over a shard's headers → {'examples': [[key, {ext: [offset, size]}], ...], ...}."""
  path = epath.Path(shard)
  size = path.stat().length
  examples: list[list[Any]] = []
  skipped: collections.Counter[str] = collections.Counter()
  with path.open("rb") as f:

    def finish(key: str | None, members: dict[str, list[int]]) -> None:
      if key is None:
        return
      ext = _image_ext(members)
      # The caption needs the (small) .txt/.json bytes; the image is only read to verify it.
      wanted = [k for k in ("txt", "json") if k in members]
      if verify_images and ext:
        wanted.append(ext)
      data = {}
      for kind in wanted:
        f.seek(members[kind][0])
        data[kind] = f.read(members[kind][1])
      # The converter's order of checks, so that both count an example under the same reason.
      if not _caption(data):
        skipped["empty_caption"] += 1
      elif ext is None:
        skipped["missing_image"] += 1
      elif verify_images and not _decodes(data[ext]):
        skipped["undecodable_image"] += 1
      else:
        examples.append([os.path.basename(key), members])

    key, members = None, {}
    try:
      tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as e:
      raise ValueError(f"webdataset shard {shard!r} is not a tar file ({e})") from None
    # Headers are read in streaming order; `offset_data` is where a member's bytes start.
    with tar:
      try:
        for member in iter(tar.next, None):
          if not member.isfile():
            continue
          name = member.name
          member_key, _, ext = os.path.basename(name).partition(".")
          member_key = os.path.join(os.path.dirname(name), member_key)
          if member_key != key:
            position = f.tell()
            finish(key, members)
            f.seek(position)
            key, members = member_key, {}
          if member.offset_data + member.size > size:
            key, members = None, {}  # Cut inside this member: its example is incomplete.
            break
          if ext.lower() in _KINDS:
            members[ext.lower()] = [member.offset_data, member.size]
      except (tarfile.ReadError, EOFError):
        key, members = None, {}
      # A complete tar ends with >= 2 zero blocks; tarfile silently stops at a header cut off
      # mid-way, so check: if the end is missing, the example in progress may lack members.
      f.seek(tar.offset)
      tail = f.read(2 * tarfile.BLOCKSIZE)
      if len(tail) < 2 * tarfile.BLOCKSIZE or any(tail):
        skipped["truncated"] += 1
        key, members = None, {}
      finish(key, members)
  return {
      "version": INDEX_VERSION,
      "shard_size": size,
      "verified": verify_images,
      "examples": examples,
      "skipped": dict(sorted(skipped.items())),
  }


def _sidecar_paths(shard: str, index_dir: str) -> list[epath.Path]:
  """Where an index may live, in order of preference: next to the shard, then in index_dir."""
  digest = hashlib.sha1(os.path.abspath(shard).encode() if "://" not in shard else shard.encode())
  name = f"{os.path.basename(shard)}-{digest.hexdigest()[:16]}{INDEX_SUFFIX}"
  return [
      epath.Path(shard + INDEX_SUFFIX),
      epath.Path(os.path.expanduser(index_dir or DEFAULT_INDEX_DIR)) / name,
  ]


def fingerprint(shard: str) -> str:
  """Size + hash of the first and last 64 KiB: tells a rewritten shard from a copied one."""
  path = epath.Path(shard)
  size = path.stat().length
  digest = hashlib.sha1(str(size).encode())
  with path.open("rb") as f:
    digest.update(f.read(_FINGERPRINT_BYTES))
    f.seek(max(0, size - _FINGERPRINT_BYTES))
    digest.update(f.read(_FINGERPRINT_BYTES))
  return f"{size}:{digest.hexdigest()}"


def _load(path: epath.Path, shard_id: str, verify_images: bool) -> dict[str, Any] | None:
  try:
    index = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  if index.get("version") != INDEX_VERSION or index.get("fingerprint") != shard_id:
    return None  # Stale: the shard was rewritten.
  if verify_images and not index.get("verified"):
    return None
  return index


def load_or_build_index(shard: str, index_dir: str = "", verify_images: bool = False) -> dict:
  """The shard's index from a current sidecar, else built and written where writable."""
  shard_id = fingerprint(shard)
  candidates = _sidecar_paths(shard, index_dir)
  for path in candidates:
    index = _load(path, shard_id, verify_images)
    if index is not None:
      return index
  index = build_index(shard, verify_images)
  index["fingerprint"] = shard_id
  text = json.dumps(index, separators=(",", ":"))
  for path in candidates:
    # Write then rename: concurrent indexers (one per host) never see a half-written file.
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp.write_text(text)
      tmp.rename(path)
      break
    except OSError:
      if tmp.exists():
        tmp.unlink()
  return index


class WebDatasetSource:
  """Random access over img2dataset webdataset shards; records as glip_jax/data/sources.py."""

  def __init__(
      self, paths: str | Sequence[str], index_dir: str = "", verify_images: bool = False
  ):
    self.paths = expand_shards(paths)
    self.skipped: collections.Counter[str] = collections.Counter()
    # Per shard, the index's [key, {ext: [offset, size]}] list as loaded: no per-example work at
    # start-up (a 3M-example set starts in seconds); the member table is read per access.
    self._examples: list[list[Any]] = []
    self._stems = [os.path.splitext(os.path.basename(shard))[0] for shard in self.paths]
    for shard in self.paths:
      index = load_or_build_index(shard, index_dir, verify_images)
      self.skipped.update(index["skipped"])
      self._examples.append(index["examples"])
    self._ends = np.cumsum([len(examples) for examples in self._examples])
    if not len(self):
      raise ValueError(f"webdataset shards {self.paths[:3]} hold no complete example")

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def _read(self, shard: str, start: int, length: int) -> bytes:
    if "://" not in shard:
      fd = os.open(shard, os.O_RDONLY)
      try:
        data = os.pread(fd, length, start)  # Positional: safe across Grain's reader threads.
      finally:
        os.close(fd)
    else:
      with epath.Path(shard).open("rb") as f:
        f.seek(start)
        data = f.read(length)
    if len(data) != length:
      raise CorruptMemberError(
          f"{shard}: read {len(data)} of {length} bytes at offset {start}; the shard changed "
          f"after indexing (delete its {INDEX_SUFFIX} sidecar to re-index)"
      )
    return data

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    shard = int(np.searchsorted(self._ends, index, side="right"))
    key, members = self._examples[shard][index - (int(self._ends[shard - 1]) if shard else 0)]
    # An example's members are adjacent in the tar: one read covers them all.
    start = min(offset for offset, _ in members.values())
    end = max(offset + size for offset, size in members.values())
    span = self._read(self.paths[shard], start, end - start)
    data = {kind: span[o - start : o - start + n] for kind, (o, n) in members.items()}
    meta = _parse_json(data["json"]) if "json" in data else {}
    return {
        "image_bytes": data[_image_ext(data)],
        "captions": [_caption(data)],
        "label": int(data["cls"].decode().strip()) if "cls" in data else -1,
        "key": f"{self._stems[shard]}/{key}",
        "metadata": records.scalar_metadata(meta),
    }

  def __repr__(self) -> str:
    skipped = sum(self.skipped.values())
    return f"WebDatasetSource({len(self.paths)} shards, {len(self)} examples, {skipped} skipped)"


# Parquet (img2dataset --output_format parquet) is not read in place: a row is only reachable by
# decoding its whole page/row group, so global shuffling would read each row group once per row.
# Convert it with tools/make_arrayrecord.py --input_format=parquet instead (docs/data.md).
