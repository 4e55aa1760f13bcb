"""Grain input pipelines: training iterators, padded evaluation batches, and global jax.Arrays.

Training: source → global shuffle(seed) → repeat → decode + augment + tokenise (`random_map`, one
Generator per record) → [weighted mix of sources] → batch(global / processes) → this process'
chunk of every global batch → to_iter_dataset (threads) → mp_prefetch (worker processes, optional).
Global batches are identical whatever the number of processes (see make_train_iterator).
The iterator's position is checkpointable: `get_state()` / `set_state()` (or
`grain.checkpoint.CheckpointSave/Restore` under Orbax) resume with identical batches.

Train batch: {'image': uint8 [b,H,W,3], 'text': int32 [b,L], 'label': int32 [b] (-1 = none)};
`image_size` is an int or (H, W) (non-square models).
Eval batch adds 'texts' int32 [b,C,L], 'text_mask' bool [b,C], 'mask' bool [b] and, for the
synthetic source, 'label_shape' / 'label_colour' / 'label_size' int32 [b].
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence
from typing import Any

from absl import logging
import grain
import jax
import numpy as np
from jax.sharding import Mesh

from glip_jax import errors
from glip_jax import sharding as sharding_lib
from glip_jax.data import config as config_lib
from glip_jax.data import records
from glip_jax.data import sources
from glip_jax.data import transforms
from glip_jax.data.tokenizer import Tokenizer


class TrainPreprocess(grain.transforms.RandomMap):
  """Record → {'image', 'text', 'label'} with a random crop/flip and a random caption."""

  def __init__(
      self,
      image_size: int | tuple[int, int],
      tokenizer: Tokenizer,
      scale: Sequence[float] = transforms.DEFAULT_SCALE,
      ratio: Sequence[float] = transforms.DEFAULT_RATIO,
      flip: bool = True,
  ):
    self.image_size = image_size
    self.tokenizer = tokenizer
    self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, _ = transforms.random_resized_crop(
        records.image_of(record), rng, self.image_size, self.scale, self.ratio, self.flip
    )
    return {
        "image": image,
        "text": self.tokenizer([records.random_caption(record, rng)])[0],
        "label": np.int32(record["label"]),
    }


_PAD = {"pad": True}


class EvalPreprocess(grain.transforms.Map):
  """Record (or padding) → centre crop, first caption, all captions (padded) and the valid mask."""

  def __init__(
      self,
      image_size: int | tuple[int, int],
      tokenizer: Tokenizer,
      max_captions: int,
      label_names: Sequence[str] = (),
  ):
    self.image_size = image_size
    self.tokenizer = tokenizer
    self.max_captions = max_captions
    self.label_names = tuple(label_names)

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    size, length, c = self.image_size, self.tokenizer.context_length, self.max_captions
    if record is _PAD or record.get("pad"):
      height, width = (size, size) if isinstance(size, int) else size
      out = {
          "image": np.zeros((height, width, 3), np.uint8),
          "text": np.zeros((length,), np.int32),
          "texts": np.zeros((c, length), np.int32),
          "text_mask": np.zeros((c,), bool),
          "label": np.int32(-1),
          "mask": np.bool_(False),
      }
      out.update({f"label_{n}": np.int32(-1) for n in self.label_names})
      return out
    captions = record["captions"][:c]
    texts = np.zeros((c, length), np.int32)
    if captions:
      texts[: len(captions)] = self.tokenizer(captions)
    out = {
        "image": transforms.center_crop(records.image_of(record), size),
        "text": texts[0],
        "texts": texts,
        "text_mask": np.arange(c) < len(captions),
        "label": np.int32(record["label"]),
        "mask": np.bool_(True),
    }
    out.update({f"label_{n}": np.int32(record["labels"][n]) for n in self.label_names})
    return out


class _PaddedShard:
  """This process' strided share of a source, padded with _PAD records to `length`."""

  def __init__(self, source: Any, shard_index: int, shard_count: int, length: int):
    self._source = source
    self._indices = range(shard_index, len(source), shard_count)
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[self._indices[index]] if index < len(self._indices) else _PAD


def default_shard_options() -> grain.sharding.ShardOptions:
  """One shard per JAX process (equal sizes, so every process runs the same number of steps)."""
  return grain.sharding.ShardByJaxProcess(drop_remainder=True)


def _local_batch_size(global_batch_size: int, shard_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % shard_count:
    raise ValueError(
        f"global batch size {global_batch_size} must be a positive multiple of the "
        f"process count {shard_count}"
    )
  return global_batch_size // shard_count


def _seed(*parts: int) -> int:
  """A well-mixed 32-bit seed from several integers (seed, shard, component, purpose)."""
  return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


_PARALLELISM_FIELDS = tuple(f for f in config_lib.PIPELINE_KNOBS if f != "max_captions")


def _finish(ds: grain.MapDataset, knobs: Any) -> grain.IterDataset:
  """Threads for decode/augment, then optional worker processes; `knobs` maps the fields above."""
  it = ds.to_iter_dataset(
      grain.ReadOptions(
          num_threads=int(knobs["read_threads"]),
          prefetch_buffer_size=int(knobs["prefetch_batches"]),
      )
  )
  if knobs["worker_count"] > 0:
    it = it.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=int(knobs["worker_count"]),
            per_worker_buffer_size=int(knobs["worker_buffer_size"]),
        )
    )
  return it

# ------------------------------------------------------------------ skipping bad records
# A record that cannot be used (records.SKIP_REASONS) is skipped, never fatal. Where: the source is
# read through _CheckedSource (fields, captions cleaned) and the preprocessing through _Guard
# (image decode); both turn a bad record into a marker. Training (_ReplaceSkipped) replaces the
# marker at position i of the shuffled sequence by the first good record after it (i+1, i+2, …),
# preprocessed exactly as at its own position, so a step's batch stays a pure function of (seed,
# step) and resume is exact; position i's own reason travels with the example as host-side fields
# (SKIP_FIELDS) that SkipCounter sums into the iterator state. Evaluation replaces it by padding
# ('mask' False): no example counts twice.

_SKIP = "_skip"  # marker key: its value is the reason
SKIP_FIELDS = ("_skip_reason", "_skip_source", "_skip_index")  # per example; -1 = not skipped
# Consecutive bad records _ReplaceSkipped looks past before it gives up (the data is broken).
MAX_CONSECUTIVE_SKIPS = 64
_LOGGED_SKIPS = 10  # bad records logged in full (source, index, key, reason, error) per process
_log_lock = threading.Lock()
_logged: set[tuple[str, int]] = set()


class TooManySkipsError(errors.RunStopped, RuntimeError):
  """The data is mostly broken: more records skipped than data.max_skip_fraction allows."""


def describe_source(source: Any) -> str:
  """A source as the skip messages name it (its repr, plus its first shard path if it has any)."""
  shards = getattr(source, "paths", None)
  if isinstance(shards, (list, tuple)) and shards:
    return f"{source!r} [{shards[0]}{', …' if len(shards) > 1 else ''}]"
  return repr(source)


def _log_skip(name: str, index: int, key: Any, reason: str, detail: str) -> None:
  with _log_lock:  # a record can be read more than once (replacement search, eval re-runs)
    if len(_logged) >= _LOGGED_SKIPS or (name, index) in _logged:
      return
    _logged.add((name, index))
    last = len(_logged) == _LOGGED_SKIPS
  logging.warning("Skipped record %d of %s (key %r): %s: %s%s", index, name, key, reason, detail,
                  " (further skipped records are only counted)" if last else "")


def _marker(reason: str, index: int, name: str, key: Any, detail: str) -> dict[str, Any]:
  _log_skip(name, index, key, reason, detail)
  return {_SKIP: reason, "_index": index}


def _key(record: Any) -> Any:
  return record.get("key", "?") if isinstance(record, dict) else "?"


class _CheckedSource:
  """A source whose records come checked and cleaned (records.checked); a bad one → a marker."""

  def __init__(self, source: Any, need_caption: bool):
    self._source = source
    self._need_caption = need_caption
    self.name = describe_source(source)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    raw = None
    try:
      raw = self._source[index]
      record = records.checked(raw, self._need_caption)
    except records.BadRecordError as e:
      return _marker(e.reason, index, self.name, _key(raw), str(e))
    except KeyError as e:  # a source's own reader found a field missing
      return _marker("missing_field", index, self.name, _key(raw), f"missing {e}")
    record["_index"] = index
    return record

  def __repr__(self) -> str:
    return self.name


class _Guard(grain.transforms.RandomMap):
  """A training preprocess whose BadRecordError (an image that does not decode) → a marker."""

  def __init__(self, preprocess: Any, name: str):
    self._preprocess = preprocess
    self._name = name

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if _SKIP in record:
      return record
    try:
      return self._preprocess.random_map(record, rng)
    except records.BadRecordError as e:
      return _marker(e.reason, record["_index"], self._name, record.get("key"), str(e))


class _ReplaceSkipped(grain.MapDataset):
  """Position i: its own example, or (marker) the first good one after it; + SKIP_FIELDS."""

  def __init__(self, parent: grain.MapDataset, component: int, name: str):
    super().__init__(parent)
    self._component = component
    self._name = name

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return "ReplaceSkippedMapDataset"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    element = self._parent[index]
    if element is None or _SKIP not in element:
      return element if element is None else {
          **element, "_skip_reason": np.int32(-1), "_skip_source": np.int32(-1),
          "_skip_index": np.int64(-1)}
    bad = [element]
    while _SKIP in bad[-1]:
      if len(bad) > MAX_CONSECUTIVE_SKIPS:
        raise TooManySkipsError(
            f"{len(bad)} consecutive records of {self._name} are unusable (e.g. records "
            f"{sorted(b['_index'] for b in bad)[:10]}: {bad[0][_SKIP]}); the data is broken "
            f"(see docs/data.md, 'Bad records').")
      bad.append(self._parent[index + len(bad)])
    return {**bad[-1], "_skip_reason": np.int32(records.SKIP_REASONS.index(element[_SKIP])),
            "_skip_source": np.int32(self._component), "_skip_index": np.int64(element["_index"])}


class SkipCounter(grain.DatasetIterator):
  """Sums a batch's SKIP_FIELDS into its state (exact on resume) and enforces the ceiling.

  State: {'pipeline': the inner iterator's, 'skipped': {reason: count}, 'window': [examples,
  skipped] of the current window, 'recent': the last skipped [source, index, reason]}. Windows are
  consecutive blocks of `window` examples; more than `max_fraction · window` skips in one stops
  the run (TooManySkipsError naming the sources and the indices).
  """

  def __init__(self, inner: grain.DatasetIterator, names: Sequence[str], max_fraction: float,
               window: int):
    super().__init__(inner)
    self._inner = inner
    self._names = tuple(names)
    self._max_fraction, self._window = float(max_fraction), int(window)
    self._counts = {r: 0 for r in records.SKIP_REASONS}
    self._in_window = [0, 0]
    self._recent: list[list[Any]] = []

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._inner))
    reasons, where, index = (np.asarray(batch.pop(f)) for f in SKIP_FIELDS)
    bad = np.flatnonzero(reasons >= 0)
    for i in bad:
      reason = records.SKIP_REASONS[int(reasons[i])]
      self._counts[reason] += 1
      self._recent = (self._recent + [[int(where[i]), int(index[i]), reason]])[-10:]
    if self._in_window[0] >= self._window:
      self._in_window = [0, 0]
    self._in_window[0] += len(reasons)
    self._in_window[1] += len(bad)
    if self._in_window[1] > self._max_fraction * self._window:
      raise TooManySkipsError(self._ceiling_message())
    return batch

  def _ceiling_message(self) -> str:
    by_source: dict[int, list[str]] = {}
    for source, index, reason in self._recent:
      by_source.setdefault(source, []).append(f"{index} ({reason})")
    where = "; ".join(f"{self._names[s]}: records {', '.join(v)}" for s, v in by_source.items())
    counts = ", ".join(f"{r} {n}" for r, n in self._counts.items() if n)
    return (f"The training data is mostly unusable: {self._in_window[1]} of the last "
            f"{self._in_window[0]} examples were skipped, more than data.max_skip_fraction="
            f"{self._max_fraction} of a window of data.skip_window={self._window} examples allows "
            f"(in all: {counts}). Last skipped: {where}. Repair or drop these records, or raise "
            f"data.max_skip_fraction (docs/data.md, 'Bad records').")

  def get_state(self) -> dict[str, Any]:
    """The inner iterator's state plus the skip counts up to here."""
    return {"pipeline": self._inner.get_state(), "skipped": dict(self._counts),
            "window": list(self._in_window), "recent": copy.deepcopy(self._recent)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a state of get_state (or a plain inner state, saved before skips were counted)."""
    if "skipped" not in state:
      state = {"pipeline": state, "skipped": {}, "window": [0, 0], "recent": []}
    self._inner.set_state(state["pipeline"])
    self._counts = {r: int(state["skipped"].get(r, 0)) for r in records.SKIP_REASONS}
    self._in_window = [int(v) for v in state["window"]]
    self._recent = [list(v) for v in state["recent"]]

  def close(self) -> None:
    """Closes the inner iterator (its worker processes)."""
    if hasattr(self._inner, "close"):
      self._inner.close()


def skip_counts(iterator_state: dict[str, Any]) -> dict[str, int]:
  """{reason: records skipped so far} from a training iterator's state (a SkipCounter's)."""
  skipped = iterator_state.get("skipped", {})
  return {r: int(skipped.get(r, 0)) for r in records.SKIP_REASONS}


class _EvalGuard(grain.transforms.Map):
  """EvalPreprocess whose bad records (marker or undecodable image) become padding."""

  def __init__(self, preprocess: "EvalPreprocess", name: str):
    self._preprocess = preprocess
    self._name = name

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    if _SKIP not in record:
      try:
        return self._preprocess.map(record)
      except records.BadRecordError as e:
        _marker(e.reason, record.get("_index", -1), self._name, record.get("key"), str(e))
    return self._preprocess.map(_PAD)


def make_train_iterator(
    data_cfg: Any,
    *,
    global_batch_size: int,
    image_size: int | tuple[int, int],
    seed: int,
    tokenizer: Tokenizer,
    shard_options: grain.sharding.ShardOptions | None = None,
    preprocess: grain.transforms.RandomMap | None = None,
    opened_sources: Sequence[tuple[Any, float]] | None = None,
) -> grain.DatasetIterator:
  """Checkpointable, infinite iterator over this process' local training batches.

  `preprocess` replaces the default TrainPreprocess (e.g. A-CLIP's multi-view crops,
  glip_jax/data/views.py); sharding, shuffling, mixing and batching stay the same.
  `opened_sources` ((source, weight) per mixture component, as the run spec holds them) saves
  opening the sources of `data_cfg` again.
  """
  config_lib.validate_data_config(data_cfg)
  shard_options = shard_options or default_shard_options()
  local_batch = _local_batch_size(global_batch_size, shard_options.shard_count)
  base_seed = seed if data_cfg.shuffle_seed < 0 else int(data_cfg.shuffle_seed)
  if preprocess is None:
    preprocess = TrainPreprocess(
        image_size, tokenizer, data_cfg.crop_scale, data_cfg.crop_ratio, bool(data_cfg.flip)
    )
  parts, weights = [], []
  if opened_sources is None:
    opened_sources = [(sources.source_from_config(source_cfg), weight)
                      for source_cfg, weight in config_lib.mixture_components(data_cfg)]
  names = []
  for i, (source, weight) in enumerate(opened_sources):
    checked = _CheckedSource(source, need_caption=True)
    names.append(checked.name)
    ds = grain.MapDataset.source(checked)
    ds = ds.shuffle(seed=_seed(base_seed, i, 0)).repeat()
    ds = ds.random_map(_Guard(preprocess, checked.name), seed=_seed(base_seed, i, 1))
    parts.append(_ReplaceSkipped(ds, i, checked.name))
    weights.append(weight)
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  # The global sequence (shuffle, augmentation seeds, mixing) is the same for every process
  # count; global batch k is local chunks k·P … k·P+P−1, and process p takes chunk k·P+p, i.e.
  # rows [p·b, (p+1)·b) of each global batch — exactly the rows its devices hold. So a job's
  # batches, masks and losses do not depend on how many processes it runs on. MapDataset is
  # lazy: a process decodes only its own rows.
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[shard_options.shard_index :: shard_options.shard_count]
  return SkipCounter(iter(_finish(ds, data_cfg)), names, data_cfg.max_skip_fraction,
                     data_cfg.skip_window)


def make_eval_batches(
    dataset_cfg: Any,
    *,
    batch_size: int,
    image_size: int | tuple[int, int],
    tokenizer: Tokenizer,
    split: str | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> grain.IterDataset:
  """Re-iterable evaluation batches for this process; `batch_size` is global over processes.

  No shuffle, no dropped examples: each process gets a strided share of the source, padded with
  invalid examples ('mask' False) so that every process runs the same number of batches.
  """
  # An eval dataset config needs only the source fields; the pipeline knobs fall back to defaults.
  defaults = config_lib.default_data_config()
  knobs = {f: dataset_cfg.get(f, defaults[f]) for f in config_lib.PIPELINE_KNOBS}
  config_lib.validate_source_config(dataset_cfg)
  shard_options = shard_options or grain.sharding.ShardByJaxProcess()
  local_batch = _local_batch_size(batch_size, shard_options.shard_count)
  source = sources.source_from_config(dataset_cfg, split)
  per_process = math.ceil(len(source) / shard_options.shard_count)
  length = math.ceil(per_process / local_batch) * local_batch
  checked = _CheckedSource(source, need_caption=False)
  padded = _PaddedShard(checked, shard_options.shard_index, shard_options.shard_count, length)
  preprocess = _EvalGuard(EvalPreprocess(
      image_size, tokenizer, int(knobs["max_captions"]), getattr(source, "label_names", ())
  ), checked.name)
  ds = grain.MapDataset.source(padded).map(preprocess).batch(local_batch)
  return _finish(ds, knobs)


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process' local numpy batch into global jax.Arrays split over the batch axes."""
  sharding = sharding_lib.batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )
