"""Converts captioned image collections into sharded ArrayRecord files of glip_jax records.

Inputs (--input_format):
  webdataset  .tar shards as img2dataset writes them: KEY.jpg (or .png/.webp) + KEY.txt and/or
              KEY.json (its 'caption' field is used when there is no .txt)
  parquet     files with an image-bytes column and a caption column (names configurable)
  csv         a CSV/TSV of image path + caption, paths relative to --image_root
  synthetic   the procedural dataset of glip_jax/data/synthetic.py (PNG-encoded, or JPEG if --resize)

Corrupt or undecodable images, empty captions, non-integer labels and the examples of a truncated
tar (at the cut) are skipped and counted by reason, never fatal. With
--resize=N images are downscaled to shorter side N and re-encoded as JPEG, which cuts the training
decode cost several-fold. Records follow glip_jax/data/records.py; shards are written as
OUTPUT_DIR/PREFIX-00000.array_record, ... and a PREFIX-summary.json. OUTPUT_DIR may be gs:// or
s3://; --output_format=parquet writes PREFIX-00000.parquet shards instead (columns jpg, caption,
key, label), which training reads straight from object storage (data.source='parquet').

Example:
  python tools/make_arrayrecord.py --input_format=webdataset \
    --input='/data/cc3m/*.tar' --output_dir=/data/cc3m_ar --prefix=train --resize=256
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import io
import json
import multiprocessing
import os
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any, NamedTuple

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glip_jax import paths  # noqa: E402
from glip_jax import storage  # noqa: E402
from glip_jax.data import records  # noqa: E402
from glip_jax.data import synthetic  # noqa: E402
from glip_jax.data import transforms  # noqa: E402

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
FORMATS = ("webdataset", "parquet", "csv", "synthetic")

# A raw example before validation: key, encoded image bytes (None if missing), captions, label,
# metadata.
Raw = tuple[str, bytes | None, list[str], int, dict[str, Any]]


class Skip(NamedTuple):
  """An example a reader could not even assemble (cut-off tar, bad label): counted as `reason`."""

  key: str
  reason: str


# A truncated tar's examples after the cut are gone; the one at the cut (possibly missing members)
# is skipped under this reason, once per damaged file even when the cut fell between examples.
TRUNCATED_TAR = "truncated_tar"
BAD_LABEL = "bad_label"


def _label(value: Any) -> int | None:
  """An integer class label (-1: none) from a .cls member, a column or a field; None if invalid."""
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError:
      return None
  if isinstance(value, str):
    value = value.strip()
  try:
    label = int(value)
  except (TypeError, ValueError):
    return None
  return label if label == float(value) else None


def _expand(inputs: list[str]) -> list[str]:
  paths = sorted(p for pattern in inputs for p in glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise SystemExit(f"--input {inputs} matches no file")
  return paths


def _ends_cleanly(tar: tarfile.TarFile, path: str) -> bool:
  """Whether the archive has its end-of-archive zero block where iteration stopped."""
  with open(path, "rb") as f:
    f.seek(tar.offset)
    block = f.read(tarfile.BLOCKSIZE)
  return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def read_webdataset(paths: list[str]) -> Iterator[Raw | Skip]:
  """Groups tar members by key (file name up to the first dot) and yields examples in order.

  A damaged tar (cut short, or unreadable) yields a Skip for the example at the damage and the
  conversion goes on with the next file: Python's tarfile stops silently when a cut falls on a
  member boundary, so the missing end-of-archive block is checked too.
  """
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
      tar = tarfile.open(path)
    except tarfile.TarError:
      yield Skip(f"{stem}/", TRUNCATED_TAR)
      continue
    with tar:
      group: dict[str, bytes] = {}
      key = None
      try:
        for member in tar:
          if not member.isfile():
            continue
          base = os.path.basename(member.name)
          member_key, _, ext = base.partition(".")
          member_key = os.path.join(os.path.dirname(member.name), member_key)
          if member_key != key and key is not None:
            yield _webdataset_example(path, key, group)
            group = {}
          key = member_key
          group[ext.lower()] = tar.extractfile(member).read()
        truncated = not _ends_cleanly(tar, path)
      except (tarfile.TarError, EOFError, OSError):
        truncated = True
      if truncated:
        yield Skip(f"{stem}/{os.path.basename(key or '')}", TRUNCATED_TAR)
      elif key is not None:
        yield _webdataset_example(path, key, group)


def _webdataset_example(path: str, key: str, group: dict[str, bytes]) -> Raw | Skip:
  name = f"{os.path.splitext(os.path.basename(path))[0]}/{os.path.basename(key)}"
  image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
  meta: dict[str, Any] = {}
  if "json" in group:
    try:
      meta = json.loads(group["json"])
    except ValueError:
      meta = {}
  if "txt" in group:
    caption = group["txt"].decode("utf-8", errors="replace")
  else:
    caption = str(meta.get("caption") or "")
  label = _label(group["cls"]) if "cls" in group else -1
  if label is None:
    return Skip(name, BAD_LABEL)
  return name, image, [caption], label, records.scalar_metadata(meta)


def read_parquet(paths: list[str], args: argparse.Namespace) -> Iterator[Raw]:
  """Streams row groups so that large parquet files never load whole."""
  import pyarrow.parquet as pq

  for path in paths:
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    for column in (args.image_column, args.caption_column):
      if column not in names:
        raise SystemExit(f"{path}: no column {column!r}; columns: {names}")
    columns = [args.image_column, args.caption_column]
    columns += [c for c in (args.key_column, args.label_column) if c and c in names]
    stem = os.path.splitext(os.path.basename(path))[0]
    row = 0
    for batch in file.iter_batches(batch_size=256, columns=columns):
      data = batch.to_pydict()
      for i in range(batch.num_rows):
        image = data[args.image_column][i]
        if isinstance(image, dict):  # HF-style {'bytes': ..., 'path': ...} structs.
          image = image.get("bytes")
        caption = data[args.caption_column][i]
        captions = caption if isinstance(caption, list) else [caption or ""]
        key = str(data[args.key_column][i]) if args.key_column in data else f"{stem}/{row}"
        label = _label(data[args.label_column][i]) if args.label_column in data else -1
        row += 1
        if label is None:
          yield Skip(key, BAD_LABEL)
          continue
        yield key, image, [str(c) for c in captions if c is not None], label, {}


def read_csv(paths: list[str], args: argparse.Namespace) -> Iterator[Raw]:
  """Rows of (image path, caption); the delimiter follows the extension unless given."""
  for path in paths:
    delimiter = args.delimiter or ("\t" if path.endswith((".tsv", ".tab")) else ",")
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f, delimiter=delimiter)
      for column in (args.image_column, args.caption_column):
        if column not in (reader.fieldnames or []):
          raise SystemExit(f"{path}: no column {column!r}; columns: {reader.fieldnames}")
      for row in reader:
        rel = row[args.image_column]
        try:
          with open(os.path.join(args.image_root, rel), "rb") as image_file:
            image = image_file.read()
        except OSError:
          image = None
        label = _label(row[args.label_column]) if args.label_column in row else -1
        if label is None:
          yield Skip(rel, BAD_LABEL)
          continue
        yield rel, image, [row[args.caption_column] or ""], label, {}


def read_synthetic(args: argparse.Namespace) -> Iterator[Raw]:
  config = synthetic.SceneConfig(
      image_size=args.synthetic_image_size, center_bias=args.center_bias, seed=args.seed
  )
  source = synthetic.SyntheticScenes(config, split=args.split, size=args.num_examples)
  for i in range(len(source)):
    record = source[i]
    buffer = io.BytesIO()
    Image.fromarray(record["image"]).save(buffer, format="PNG")
    yield record["key"], buffer.getvalue(), record["captions"], record["label"], record["labels"]


def process(raw: Raw | Skip, resize: int, quality: int) -> tuple[bytes | None, str]:
  """Validates (and optionally shrinks) one example → (record bytes, '') or (None, skip reason)."""
  if isinstance(raw, Skip):
    return None, raw.reason
  key, image, captions, label, metadata = raw
  captions = [c.strip() for c in captions if c and c.strip()]
  if not captions:
    return None, "empty_caption"
  if image is None:
    return None, "missing_image"
  try:
    pil = Image.open(io.BytesIO(image))
    pil.load()  # Forces a full decode: truncated or corrupt files fail here, not in training.
    if resize:
      pil = transforms.resize_shorter_side(transforms.decode(pil), resize)
      buffer = io.BytesIO()
      pil.save(buffer, format="JPEG", quality=quality)
      image = buffer.getvalue()
  except Exception:  # PIL raises many types for bad data; all mean "undecodable".
    return None, "undecodable_image"
  return records.encode_record(image, captions, key, label, metadata), ""


def _process_star(job: tuple[Raw, int, int]) -> tuple[bytes | None, str]:
  return process(*job)


class ShardWriter:
  """Writes records into PREFIX-NNNNN.array_record (or .parquet) files of <= `per_shard` records.

  `output_dir` may be gs:// or s3:// (glip_jax/storage.py): array_record's writer is POSIX-only,
  so each shard is written into a local staging folder and uploaded whole when it is closed (one
  shard of local disk at a time); a killed conversion leaves only complete shards in the bucket.
  """

  def __init__(self, output_dir: str, prefix: str, per_shard: int, output_format: str = "arrayrecord",
               row_group_size: int = 64):
    self.remote = storage.is_remote(output_dir)
    if self.remote:
      storage.check_access(output_dir)
      self._stage = tempfile.mkdtemp(prefix="glip_jax_convert_")
    else:
      os.makedirs(output_dir, exist_ok=True)
      self._stage = output_dir
    self.output_dir, self.prefix, self.per_shard = output_dir, prefix, per_shard
    self.output_format, self.row_group_size = output_format, row_group_size
    self.extension = "parquet" if output_format == "parquet" else "array_record"
    self.paths: list[str] = []
    self._writer = None
    self._count = 0

  def write(self, record: bytes) -> None:
    if self._writer is None or self._count == self.per_shard:
      self.close()
      name = f"{self.prefix}-{len(self.paths):05d}.{self.extension}"
      self._local = os.path.join(self._stage, name)
      if self.output_format == "parquet":
        self._writer = _ParquetShard(self._local, self.row_group_size)
      else:
        from array_record.python.array_record_module import ArrayRecordWriter
        # group_size:1 keeps every record individually seekable (random access for shuffling).
        self._writer = ArrayRecordWriter(self._local, "group_size:1")
      self.paths.append(os.fspath(storage.path(self.output_dir) / name)
                        if self.remote else self._local)
      self._count = 0
    self._writer.write(record)
    self._count += 1

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      if self.remote:
        storage.upload(self._local, self.paths[-1])
        os.remove(self._local)

  def finish(self) -> None:
    """Closes the last shard and removes the staging folder."""
    self.close()
    if self.remote:
      os.rmdir(self._stage)


class _ParquetShard:
  """One Parquet shard of the records' fields (what data.source='parquet' reads)."""

  def __init__(self, path: str, row_group_size: int):
    self.path, self.row_group_size = path, row_group_size
    self.rows: list[dict[str, Any]] = []

  def write(self, record: bytes) -> None:
    r = records.decode_record(record)
    self.rows.append({"jpg": r["image_bytes"], "caption": list(r["captions"]),
                      "key": str(r["key"]), "label": int(r["label"])})

  def close(self) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("jpg", pa.binary()), ("caption", pa.list_(pa.string())),
                        ("key", pa.string()), ("label", pa.int64())])
    table = pa.Table.from_pylist(self.rows, schema=schema)
    # Small row groups: the source reads one whole row group per random access.
    pq.write_table(table, self.path, row_group_size=self.row_group_size)


def convert(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the conversion and returns the summary (also written as PREFIX-summary.json)."""
  if args.input_format == "synthetic":
    raws: Iterator[Raw | Skip] = read_synthetic(args)
    total = args.num_examples
  else:
    paths = _expand(args.input)
    readers = {"webdataset": lambda: read_webdataset(paths)}
    readers["parquet"] = lambda: read_parquet(paths, args)
    readers["csv"] = lambda: read_csv(paths, args)
    raws, total = readers[args.input_format](), None

  writer = ShardWriter(args.output_dir, args.prefix, args.records_per_shard, args.output_format,
                       args.parquet_row_group_size)
  skipped: collections.Counter[str] = collections.Counter()
  written = 0
  jobs = ((raw, args.resize, args.jpeg_quality) for raw in raws)
  pool = multiprocessing.Pool(args.num_workers) if args.num_workers > 1 else None
  results = pool.imap(_process_star, jobs, chunksize=16) if pool else map(_process_star, jobs)
  try:
    for record, reason in tqdm(results, total=total, desc="converting", unit="ex"):
      if record is None:
        skipped[reason] += 1
      else:
        writer.write(record)
        written += 1
  finally:
    writer.finish()
    if pool:
      pool.close()
      pool.join()
  summary = {
      "written": written,
      "skipped": dict(sorted(skipped.items())),
      "shards": [os.path.basename(p) for p in writer.paths],
      "pattern": os.fspath(storage.path(args.output_dir) / f"{args.prefix}-*.{writer.extension}"),
  }
  storage.write_text_atomic(storage.path(args.output_dir) / f"{args.prefix}-summary.json",
                            json.dumps(summary, indent=2))
  return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--input_format", required=True, choices=FORMATS)
  p.add_argument("--input", nargs="*", default=[], help="files or globs (tar / parquet / csv)")
  p.add_argument("--output_dir", required=True, help="local folder, gs://… or s3://…")
  p.add_argument("--output_format", default="arrayrecord", choices=("arrayrecord", "parquet"),
                 help="parquet: read in place from object storage (data.source='parquet')")
  p.add_argument("--parquet_row_group_size", type=int, default=64,
                 help="parquet: rows per row group (the unit one random access reads)")
  p.add_argument("--prefix", default="data", help="shard file name prefix, e.g. train")
  p.add_argument("--records_per_shard", type=int, default=10_000)
  p.add_argument("--resize", type=int, default=0, help="shorter side in px; 0 keeps the bytes")
  p.add_argument("--jpeg_quality", type=int, default=90)
  p.add_argument("--num_workers", type=int, default=1, help="processes validating/resizing")
  p.add_argument("--image_column", default=None, help="parquet: 'jpg'; csv: 'filepath'")
  p.add_argument("--caption_column", default=None, help="parquet/csv caption column: 'caption'")
  p.add_argument("--key_column", default="key")
  p.add_argument("--label_column", default="label")
  p.add_argument("--image_root", default=".", help="csv: folder the image paths are relative to")
  p.add_argument("--delimiter", default=None, help="csv: default ',' (tab for .tsv)")
  p.add_argument("--num_examples", type=int, default=10_000, help="synthetic: examples to write")
  p.add_argument("--split", default="train", choices=synthetic.SPLITS, help="synthetic split")
  p.add_argument("--synthetic_image_size", type=int, default=256)
  p.add_argument("--center_bias", type=float, default=0.5)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  # Resolved once here, like every user-given path (glip_jax/paths.py).
  args.output_dir = paths.resolve(args.output_dir)
  args.image_root = paths.resolve(args.image_root)
  args.input = [paths.resolve(pattern) for pattern in args.input]
  defaults = {"parquet": ("jpg", "caption"), "csv": ("filepath", "caption")}
  image_default, caption_default = defaults.get(args.input_format, (None, None))
  args.image_column = args.image_column or image_default
  args.caption_column = args.caption_column or caption_default
  if args.input_format != "synthetic" and not args.input:
    p.error(f"--input is required for --input_format={args.input_format}")
  if args.records_per_shard < 1:
    p.error("--records_per_shard must be >= 1")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  summary = convert(parse_args(argv))
  skipped = ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()) or "none"
  print(
      f"wrote {summary['written']} records in {len(summary['shards'])} shards "
      f"({summary['pattern']}); skipped {sum(summary['skipped'].values())} ({skipped})"
  )
  return summary


if __name__ == "__main__":
  main()
