"""Random-access data sources that all yield one common record dict.

Common record (what every source's `__getitem__` returns):
  'image_bytes' bytes           encoded image (ArrayRecord, webdataset, TFDS), or
  'image'       uint8 [H,W,3]   an already decoded image (synthetic)
  'captions'    list[str]       all captions of the example (may be empty for image/label sets)
  'label'       int             class id, -1 when the source has none
  'key'         str             a stable identifier
  'labels'      dict[str,int]   optional extra labels (synthetic: shape, colour, size)

Sources are plain picklable objects with `__len__`/`__getitem__`, so Grain can hand them to worker
processes and index them in any order.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from glip_jax import paths as paths_lib
from glip_jax import storage
from glip_jax.data import records
from glip_jax.data import synthetic
from glip_jax.data import webdataset

Record = dict[str, Any]


def expand_paths(paths: str | Sequence[str], kind: str = "ArrayRecord") -> list[str]:
  """Expands a glob, a comma-separated string or a list of paths/globs into sorted shard paths.

  Local, gs:// and s3:// globs alike (glip_jax/storage.py).
  """
  return paths_lib.expand_patterns(
      paths, storage.glob, empty=f"{kind} shard paths or a glob",
      no_match="matches no file; create shards with tools/make_arrayrecord.py (see docs/data.md)")


class ArrayRecordSource:
  """ArrayRecord shards of msgpack records (see glip_jax/data/records.py)."""

  def __init__(self, paths: str | Sequence[str]):
    import grain  # Deferred: importing grain is only needed when this source is used.

    self.paths = expand_paths(paths)
    remote = [p for p in self.paths if storage.is_remote(p)]
    if remote:
      # array_record opens files with its own C++ file layer (POSIX only): no gs:// or s3://.
      raise ValueError(
          f"data.paths: ArrayRecord shards cannot be read from object storage ({remote[0]}): "
          "mount the bucket (gcsfuse / mountpoint-s3, see docs/launching.md) and give the mounted "
          "path, or convert to Parquet shards (data.source='parquet', read natively from gs:// "
          "and s3://).")
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    return records.decode_record(self._source[index])

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records)"


class ParquetSource:
  """Parquet shards read in place, locally or straight from gs:// / s3:// (no copy, no mount).

  Columns: `image_column` (encoded image bytes, or an HF-style {'bytes': ...} struct) and
  `caption_column` (a string or a list of strings); `key`/`label` when present. Random access goes
  by row group: an index lookup reads (and caches) the one row group holding it, so shards should
  be written with small row groups (tools/make_arrayrecord.py --output_format=parquet writes
  `--parquet_row_group_size` rows each, 64 by default). Grain's global shuffle then reads a row
  group once per example in it at worst; its prefetching hides the latency of object storage.
  """

  def __init__(self, paths: str | Sequence[str], image_column: str = "jpg",
               caption_column: str = "caption"):
    import pyarrow.parquet as pq  # Deferred: only this source needs it.

    self.paths = expand_paths(paths, kind="Parquet")
    self.image_column, self.caption_column = image_column, caption_column
    self._row_groups: list[tuple[int, int]] = []  # (shard, row group) in order
    starts = [0]
    for shard, path in enumerate(self.paths):
      with storage.path(path).open("rb") as f:
        meta = pq.ParquetFile(f).metadata
        names = meta.schema.to_arrow_schema().names
      for field, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in names:
          raise ValueError(f"data.parquet.{field}={column!r} is not a column of {path}; "
                           f"columns: {names}")
      for group in range(meta.num_row_groups):
        self._row_groups.append((shard, group))
        starts.append(starts[-1] + meta.row_group(group).num_rows)
    self._starts = starts
    self._thread = threading.local()

  def __len__(self) -> int:
    return self._starts[-1]

  def __getstate__(self) -> dict[str, Any]:
    # Open files and the row-group cache stay in the thread that made them: Grain's reader
    # threads share this object, and its worker processes get a pickled copy.
    return {k: v for k, v in self.__dict__.items() if k != "_thread"}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._thread = threading.local()

  def _read_row_group(self, index: int) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    shard, group = self._row_groups[index]
    files = self._thread.__dict__.setdefault("files", {})
    if shard not in files:
      files[shard] = pq.ParquetFile(storage.path(self.paths[shard]).open("rb"))
    file = files[shard]
    columns = [c for c in (self.image_column, self.caption_column, "key", "label")
               if c in file.schema_arrow.names]
    return file.read_row_group(group, columns=columns).to_pydict()

  def __getitem__(self, index: int) -> Record:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} rows")
    group = bisect.bisect_right(self._starts, index) - 1
    cached = getattr(self._thread, "cache", None)  # this thread's last row group
    if cached is None or cached[0] != group:
      cached = self._thread.cache = (group, self._read_row_group(group))
    data, row = cached[1], index - self._starts[group]
    image = data[self.image_column][row]
    if isinstance(image, dict):  # HF-style {'bytes': ..., 'path': ...}
      image = image.get("bytes")
    caption = data[self.caption_column][row]
    captions = [str(c) for c in (caption if isinstance(caption, list) else [caption])
                if c is not None and str(c).strip()]
    shard = self._row_groups[group][0]
    key = data["key"][row] if "key" in data else (
        f"{os.path.splitext(os.path.basename(self.paths[shard]))[0]}/{index}")
    label = data["label"][row] if "label" in data else -1
    return {"image_bytes": image, "captions": captions, "key": str(key),
            "label": -1 if label is None else int(label)}

  def __repr__(self) -> str:
    return f"ParquetSource({len(self.paths)} shards, {len(self)} rows)"


def _get_path(tree: Any, path: str) -> Any:
  """Looks up a '/'-separated feature path ('captions/text') in a nested dict."""
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _has_path(features: Any, path: str) -> bool:
  try:
    _get_path(features, path)
  except (KeyError, TypeError):
    return False
  return True


def _nested(path: str, value: Any) -> dict[str, Any]:
  """{'a/b': v} → {'a': {'b': v}}, the shape TFDS expects for decoders of nested features."""
  *parents, leaf = path.split("/")
  tree: dict[str, Any] = {leaf: value}
  for part in reversed(parents):
    tree = {part: tree}
  return tree


def _as_text_list(value: Any) -> list[str]:
  """TFDS text features come as bytes, str or an array/list of them."""
  if isinstance(value, (bytes, str)):
    value = [value]
  texts = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(value).ravel()]
  return [t for t in texts if t.strip()]


def _prepare_hint(name: str) -> str:
  return (
      f"prepare it on a machine with network access with `tfds build {name} "
      "--file_format=array_record --data_dir=DIR` and copy DIR here, then set data.tfds.data_dir "
      "(glip_jax never downloads data; see docs/data.md)"
  )


class TfdsSource:
  """A TFDS dataset prepared in array_record format, read without TensorFlow."""

  def __init__(
      self,
      name: str,
      split: str,
      data_dir: str | None,
      image_key: str = "image",
      text_key: str = "",
      label_key: str = "",
  ):
    import tensorflow_datasets as tfds

    self.name, self.split = name, split
    self.image_key, self.text_key, self.label_key = image_key, text_key, label_key
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    try:
      self._source = tfds.data_source(
          name,
          split=split,
          data_dir=data_dir,
          download=False,
          # Keep images encoded: decoding happens in our transforms, with our crop.
          decoders=_nested(image_key, tfds.decode.SkipDecoding()),
      )
    except ValueError as e:
      if "split" in str(e).lower():
        raise ValueError(f"data.tfds.split={split!r} for {name!r}: {e}") from None
      raise FileNotFoundError(
          f"TFDS dataset {name!r} cannot be read from data_dir={data_dir!r} ({e}); "
          + _prepare_hint(name)
      ) from None
    except Exception as e:  # DatasetNotFoundError, AssertionError, missing files …
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} "
          f"({type(e).__name__}); " + _prepare_hint(name)
      ) from None
    features = self._source.dataset_info.features
    for field, key in (("image_key", image_key), ("text_key", text_key), ("label_key", label_key)):
      if key and not _has_path(features, key):
        raise ValueError(
            f"data.tfds.{field}={key!r} is not a feature of {name!r}; "
            f"available: {sorted(features.keys())}"
        )

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    example = self._source[index]
    return {
        "image_bytes": _get_path(example, self.image_key),
        "captions": _as_text_list(_get_path(example, self.text_key)) if self.text_key else [],
        "label": int(_get_path(example, self.label_key)) if self.label_key else -1,
        "key": f"{self.name}/{self.split}/{index}",
    }

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"


KARPATHY_SPLITS = ("train", "val", "test", "restval")


class KarpathySource:
  """One split of a Karpathy-split caption file (dataset_coco.json, dataset_flickr30k.json).

  The JSON is {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...]}, ...]};
  image i of the split is read from `image_dir/filepath/filename` (COCO keeps `filepath`, e.g.
  val2014; Flickr30k has none). Captions are the `raw` sentences, in file order.
  """

  def __init__(self, json_path: str, image_dir: str, split: str = "test"):
    if split not in KARPATHY_SPLITS:
      raise ValueError(f"karpathy split={split!r}; allowed: {KARPATHY_SPLITS}")
    self.json_path = os.path.expanduser(json_path)
    self.image_dir = os.path.expanduser(image_dir)
    self.split = split
    if not os.path.isfile(self.json_path):
      raise FileNotFoundError(
          f"data.karpathy.json_path={json_path!r} does not exist; get dataset_coco.json / "
          "dataset_flickr30k.json from Karpathy's caption_datasets.zip "
          "(see docs/evaluation.md)"
      )
    with open(self.json_path, encoding="utf-8") as f:
      images = json.load(f)["images"]
    # Only paths and captions are kept: a plain list pickles cheaply to Grain workers.
    self._items = [
        (
            os.path.join(self.image_dir, image.get("filepath", ""), image["filename"]),
            [s["raw"] for s in image.get("sentences", [])],
        )
        for image in images
        if image.get("split") == split
    ]
    if not self._items:
      raise ValueError(f"{json_path!r} has no images in split {split!r}")
    # Fail here, not in a reader thread, when image_dir points at the wrong folder.
    if not os.path.isfile(self._items[0][0]):
      raise FileNotFoundError(
          f"data.karpathy.image_dir={image_dir!r}: {self._items[0][0]!r} does not exist"
      )

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> Record:
    path, captions = self._items[index]
    with open(path, "rb") as f:
      image_bytes = f.read()
    return {
        "image_bytes": image_bytes,
        "captions": list(captions),
        "label": -1,
        "key": os.path.relpath(path, self.image_dir),
    }

  def __repr__(self) -> str:
    return f"KarpathySource({self.json_path!r}, split={self.split!r}, {len(self)} images)"


def scene_config(cfg: Any) -> synthetic.SceneConfig:
  """SceneConfig from the `synthetic` part of a source config."""
  return synthetic.SceneConfig(
      image_size=int(cfg.image_size),
      center_bias=float(cfg.center_bias),
      max_distractors=int(cfg.max_distractors),
      num_captions=int(cfg.num_captions),
      seed=int(cfg.seed),
  )


def source_from_config(cfg: Any, split: str | None = None) -> Any:
  """Builds the source a (validated) source config describes; `split` overrides its split."""
  if cfg.source == "synthetic":
    split = split or cfg.synthetic.split
    size = cfg.synthetic.train_size if split == "train" else cfg.synthetic.eval_size
    return synthetic.SyntheticScenes(
        scene_config(cfg.synthetic), split=split, size=int(size), label=cfg.synthetic.label
    )
  if cfg.source == "arrayrecord":
    return ArrayRecordSource(cfg.paths)
  if cfg.source == "parquet":
    p = cfg.get("parquet", {})
    return ParquetSource(cfg.paths, p.get("image_column", "jpg"), p.get("caption_column", "caption"))
  if cfg.source == "webdataset":
    w = cfg.get("webdataset", {})
    return webdataset.WebDatasetSource(
        cfg.paths, w.get("index_dir", ""), bool(w.get("verify_images", False))
    )
  if cfg.source == "tfds":
    t = cfg.tfds
    return TfdsSource(
        t.name, split or t.split, t.data_dir or None, t.image_key, t.text_key, t.label_key
    )
  if cfg.source == "karpathy":
    k = cfg.karpathy
    return KarpathySource(k.json_path, k.image_dir, split or k.split)
  raise ValueError(
      f"data.source={cfg.source!r}; allowed: "
      "('synthetic', 'arrayrecord', 'parquet', 'webdataset', 'tfds', 'karpathy')"
  )
