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

import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

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
  for i, (source, weight) in enumerate(opened_sources):
    ds = grain.MapDataset.source(source)
    ds = ds.shuffle(seed=_seed(base_seed, i, 0)).repeat()
    ds = ds.random_map(preprocess, seed=_seed(base_seed, i, 1))
    parts.append(ds)
    weights.append(weight)
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  # The global sequence (shuffle, augmentation seeds, mixing) is the same for every process
  # count; global batch k is local chunks k·P … k·P+P−1, and process p takes chunk k·P+p, i.e.
  # rows [p·b, (p+1)·b) of each global batch — exactly the rows its devices hold. So a job's
  # batches, masks and losses do not depend on how many processes it runs on. MapDataset is
  # lazy: a process decodes only its own rows.
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[shard_options.shard_index :: shard_options.shard_count]
  return iter(_finish(ds, data_cfg))


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
  padded = _PaddedShard(source, shard_options.shard_index, shard_options.shard_count, length)
  preprocess = EvalPreprocess(
      image_size, tokenizer, int(knobs["max_captions"]), getattr(source, "label_names", ())
  )
  ds = grain.MapDataset.source(padded).map(preprocess).batch(local_batch)
  return _finish(ds, knobs)


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process' local numpy batch into global jax.Arrays split over the batch axes."""
  sharding = sharding_lib.batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )
