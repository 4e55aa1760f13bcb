"""The `config.data` ConfigDict: documented defaults and validation with actionable messages."""

from __future__ import annotations

from typing import Any

import ml_collections

from glip_jax import errors

from glip_jax.data import sources
from glip_jax.data import synthetic

SOURCES = ("synthetic", "arrayrecord", "parquet", "webdataset", "tfds", "karpathy")


def default_source_config() -> ml_collections.ConfigDict:
  """Fields that describe where examples come from (also the shape of a mixture entry)."""
  cfg = ml_collections.ConfigDict()
  cfg.source = "synthetic"  # One of SOURCES.
  # Procedural scenes (glip_jax/data/synthetic.py); nothing stored, rendered on demand.
  cfg.synthetic = ml_collections.ConfigDict(
      dict(
          image_size=64,  # Render size; crops are then resized to the model's image_size.
          center_bias=0.5,  # 0: main object anywhere; 1: exactly centred.
          max_distractors=3,  # 0..N small objects the captions do not mention.
          num_captions=3,  # Captions per example (different templates).
          seed=0,  # Dataset identity: the same seed renders the same scenes.
          split="train",  # train / validation / test: disjoint index ranges.
          train_size=1_000_000,  # Examples in the train split (an epoch).
          eval_size=1024,  # Examples in the validation and test splits.
          label="shape",  # Which label becomes 'label': shape / colour / size.
      )
  )
  # Shards of the 'arrayrecord' source (made by tools/make_arrayrecord.py) or of the 'webdataset'
  # source (img2dataset .tar files): a glob, a `{00000..00099}` range, comma-separated globs or a
  # list.
  cfg.paths = ""
  # Parquet shards read in place, also from gs:// / s3:// (sources.ParquetSource; `paths` above).
  cfg.parquet = ml_collections.ConfigDict(
      dict(
          image_column="jpg",  # encoded image bytes (or an HF {'bytes': ...} struct)
          caption_column="caption",  # a string or a list of strings
      )
  )
  # Webdataset .tar shards read in place (glip_jax/data/webdataset.py).
  cfg.webdataset = ml_collections.ConfigDict(
      dict(
          # Where shard indexes go when the shards' own directory is not writable
          # ('' = ~/.cache/glip_jax/webdataset_index).
          index_dir="",
          # Fully decode every image once while indexing and skip undecodable ones (as the
          # converter does); costs one decode pass over the data.
          verify_images=False,
      )
  )
  # A TFDS dataset prepared elsewhere with --file_format=array_record (no download here).
  cfg.tfds = ml_collections.ConfigDict(
      dict(
          name="",
          split="train",
          data_dir="",
          image_key="image",
          text_key="",  # '' for image/label sets; '/' for nested features ('captions/text').
          label_key="",  # '' when there is no label.
      )
  )
  # Karpathy-split captions (COCO 5k / Flickr30k 1k test) + the folder of their images.
  cfg.karpathy = ml_collections.ConfigDict(
      dict(
          json_path="",  # dataset_coco.json / dataset_flickr30k.json
          image_dir="",  # images at image_dir/filepath/filename
          split="test",  # train / val / test / restval
      )
  )
  return cfg


def default_data_config() -> ml_collections.ConfigDict:
  """`config.data` with every field documented; the synthetic dataset by default."""
  cfg = default_source_config()
  # Optional weighted mixture: a list of source configs (as default_source_config()) each with an
  # extra float field `weight`. When non-empty it replaces the single source above.
  cfg.mixture = []
  cfg.crop_scale = (0.5, 1.0)  # RandomResizedCrop area range (FLIP / GLIP).
  cfg.crop_ratio = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range.
  cfg.flip = True  # Random horizontal flip in training (A-CLIP turns it off).
  cfg.shuffle_seed = -1  # -1: derive from the trainer's seed.
  cfg.worker_count = 0  # Grain worker processes (0: preprocess in the main process' threads).
  cfg.worker_buffer_size = 2  # Batches each worker prepares ahead.
  cfg.read_threads = 4  # Threads per process that preprocess batches (PIL releases the GIL).
  cfg.prefetch_batches = 4  # Batches those threads keep ready.
  # Global batches the trainer keeps already on the devices (glip_jax/data/prefetch.py), so the
  # host→device copy overlaps the step; 0: transfer each batch when the step needs it.
  cfg.device_prefetch = 2
  cfg.max_captions = 5  # Eval: captions per image kept for retrieval ('texts' [b, C, L]).
  # Bad records (undecodable image, blank caption, missing field) are skipped and counted
  # (docs/data.md, "Bad records"); more than this share of a window of `skip_window` training
  # examples skipped stops the run, naming the records (0: stop at the first one).
  cfg.max_skip_fraction = 0.01
  cfg.skip_window = 10_000
  return cfg


# Pipeline knobs (field → smallest allowed value): config.data's, and those an eval dataset may set.
PIPELINE_KNOBS = {"worker_count": 0, "worker_buffer_size": 1, "read_threads": 1,
                  "prefetch_batches": 1, "max_captions": 1}


def _fail(field: str, value: Any, allowed: str) -> None:
  errors.fail(f"data.{field}", value, allowed)


def validate_knobs(cfg: Any, fail: Any = _fail) -> None:
  """Each pipeline knob is an int at or above its minimum."""
  for field, minimum in PIPELINE_KNOBS.items():
    if not isinstance(cfg[field], int) or cfg[field] < minimum:
      fail(field, cfg[field], f"an int >= {minimum}")


def _validate_range(field: str, value: Any, low: float, high: float) -> None:
  try:
    a, b = (float(v) for v in value)
  except (TypeError, ValueError):
    _fail(field, value, f"a pair (min, max) with {low} < min <= max <= {high}")
  if not low < a <= b <= high:
    _fail(field, value, f"a pair (min, max) with {low} < min <= max <= {high}")


def validate_source_config(cfg: Any, prefix: str = "") -> None:
  """Raises ValueError naming the field, its value and the allowed values."""
  if cfg.source not in SOURCES:
    _fail(f"{prefix}source", cfg.source, str(SOURCES))
  if cfg.source == "synthetic":
    s = cfg.synthetic
    if not 0.0 <= float(s.center_bias) <= 1.0:
      _fail(f"{prefix}synthetic.center_bias", s.center_bias, "a float in [0, 1]")
    if int(s.image_size) < 8:
      _fail(f"{prefix}synthetic.image_size", s.image_size, "an int >= 8")
    if int(s.max_distractors) < 0:
      _fail(f"{prefix}synthetic.max_distractors", s.max_distractors, "an int >= 0")
    if not 1 <= int(s.num_captions) <= len(synthetic.CAPTION_TEMPLATES):
      _fail(
          f"{prefix}synthetic.num_captions",
          s.num_captions,
          f"1..{len(synthetic.CAPTION_TEMPLATES)}",
      )
    if s.split not in synthetic.SPLITS:
      _fail(f"{prefix}synthetic.split", s.split, str(synthetic.SPLITS))
    if s.label not in synthetic.CLASS_NAMES:
      _fail(f"{prefix}synthetic.label", s.label, str(tuple(synthetic.CLASS_NAMES)))
    for field in ("train_size", "eval_size"):
      if int(s[field]) < 1:
        _fail(f"{prefix}synthetic.{field}", s[field], "an int >= 1")
  elif cfg.source == "arrayrecord":
    if not cfg.paths:
      _fail(
          f"{prefix}paths",
          cfg.paths,
          "a glob, comma-separated globs or a list of ArrayRecord shard paths "
          "(make them with tools/make_arrayrecord.py)",
      )
  elif cfg.source == "parquet":
    if not cfg.paths:
      _fail(f"{prefix}paths", cfg.paths, "a glob, comma-separated globs or a list of Parquet "
            "shard paths, local or gs:// / s3:// (tools/make_arrayrecord.py --output_format=parquet)")
    for field in ("image_column", "caption_column"):
      if not cfg.parquet[field]:
        _fail(f"{prefix}parquet.{field}", cfg.parquet[field], "a column name")
  elif cfg.source == "webdataset":
    if not cfg.paths:
      _fail(f"{prefix}paths", cfg.paths, "a glob, range or list of webdataset .tar shard paths")
  elif cfg.source == "tfds":
    if not cfg.tfds.name:
      _fail(f"{prefix}tfds.name", cfg.tfds.name, "the name of a TFDS dataset prepared in data_dir")
    if not cfg.tfds.image_key:
      _fail(f"{prefix}tfds.image_key", cfg.tfds.image_key, "the name of the image feature")
  elif cfg.source == "karpathy":
    k = cfg.karpathy
    if not k.json_path:
      _fail(f"{prefix}karpathy.json_path", k.json_path, "a Karpathy-split JSON file path")
    if not k.image_dir:
      _fail(f"{prefix}karpathy.image_dir", k.image_dir, "the folder holding its images")
    if k.split not in sources.KARPATHY_SPLITS:
      _fail(f"{prefix}karpathy.split", k.split, str(sources.KARPATHY_SPLITS))


def validate_data_config(cfg: Any) -> None:
  """Checks `config.data` before any compute; raises ValueError naming field, value and allowed values."""
  if cfg.mixture:
    for i, entry in enumerate(cfg.mixture):
      source_cfg, weight = _mixture_entry(entry)
      validate_source_config(source_cfg, prefix=f"mixture[{i}].")
      if not float(weight) > 0:
        _fail(f"mixture[{i}].weight", weight, "a float > 0")
  else:
    validate_source_config(cfg)
  _validate_range("crop_scale", cfg.crop_scale, 0.0, 1.0)
  _validate_range("crop_ratio", cfg.crop_ratio, 0.0, float("inf"))
  validate_knobs(cfg)
  # Training only: global batches kept on the devices ahead of the step (glip_jax/data/prefetch.py).
  if not isinstance(cfg.device_prefetch, int) or cfg.device_prefetch < 0:
    _fail("device_prefetch", cfg.device_prefetch, "an int >= 0 (0: no device prefetch)")
  if (isinstance(cfg.max_skip_fraction, bool) or not isinstance(cfg.max_skip_fraction, (int, float))
      or not 0 <= cfg.max_skip_fraction <= 1):
    _fail("max_skip_fraction", cfg.max_skip_fraction, "a float in [0, 1]")
  if not isinstance(cfg.skip_window, int) or cfg.skip_window < 1:
    _fail("skip_window", cfg.skip_window, "an int >= 1 (examples)")


def _mixture_entry(entry: Any) -> tuple[Any, float]:
  """A mixture entry is a (source_config, weight) pair or a source config with a `weight` field."""
  if isinstance(entry, (tuple, list)) and len(entry) == 2:
    return entry[0], float(entry[1])
  return entry, float(entry.get("weight", 1.0))


def mixture_components(cfg: Any) -> list[tuple[Any, float]]:
  """[(source_config, weight), ...] — the single top-level source when there is no mixture."""
  if cfg.mixture:
    return [_mixture_entry(entry) for entry in cfg.mixture]
  return [(cfg, 1.0)]
