"""Evaluators from `config.evals`: validation, sharded encoders, masking regimes, eval batches.

`config.evals` maps an evaluator name to its settings, e.g.

  evals.shape = dict(kind='zeroshot', dataset=dict(source='synthetic',
                                                   synthetic=dict(split='test', label='shape')),
                     classnames='synthetic:shape', templates='synthetic', every_steps=200,
                     batch_size=128)

Fields and defaults per kind are in `default_eval_config(kind)`; unset fields take those defaults.
The trainer runs an evaluator when `due(step, final_step)` says so; the watcher runs all of them on
every checkpoint. Results are logged under `eval/<name>/<metric>` (`run_evaluators`).

Encoders are `model.apply(..., method=...)` jitted with the batch constrained to
`sharding.batch_sharding(mesh)`; parameters keep the shardings they arrive with (the train state's,
or the watcher's restore target built from the same logical rules). Every process reads the whole
eval set (host batches are global), which keeps the evaluators' host-side bookkeeping
process-agnostic at the price of redundant decoding on multi-process jobs.
"""
import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping
from typing import Any

import grain
import jax
import ml_collections

from glip_jax import masking as masking_lib
from glip_jax import sharding as sharding_lib
from glip_jax.data import config as data_config
from glip_jax.data import pipeline
from glip_jax.data import synthetic
from glip_jax.data.tokenizer import Tokenizer
from glip_jax.evaluation import base
from glip_jax.evaluation import classnames as classnames_lib
from glip_jax.evaluation import linear_probe
from glip_jax.evaluation import retrieval
from glip_jax.evaluation import templates as templates_lib
from glip_jax.evaluation import zeroshot
from glip_jax.models import clip as clip_lib

KINDS = ("zeroshot", "retrieval", "linear_probe")
MASKING_MODES = ("none", "train")
SYNTHETIC_CLASSNAMES = tuple(f"synthetic:{label}" for label in synthetic.CLASS_NAMES)
# 'imagenet' is the short name the configs use; the sets themselves live in classnames.py.
NAMED_CLASSNAMES = {"imagenet": "imagenet2012", **{k: k for k in classnames_lib.CLASSNAME_SETS}}
CLASSNAME_CHOICES = ("", "tfds") + SYNTHETIC_CLASSNAMES + tuple(NAMED_CLASSNAMES)
TEMPLATE_CHOICES = ("", "synthetic") + tuple(templates_lib.TEMPLATE_SETS)
# Eval-only pipeline knobs a dataset entry may set besides the source fields.
DATASET_KNOBS = ("read_threads", "prefetch_batches", "worker_count", "worker_buffer_size",
                 "max_captions")


def default_eval_config(kind: str) -> ml_collections.ConfigDict:
  """Every field of one `config.evals.<name>` entry of `kind`, with its default."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; allowed: {list(KINDS)}")
  c = ml_collections.ConfigDict()
  c.kind = kind
  c.every_steps = 0  # in-loop period; 0 = only after the last step (the watcher runs it always)
  c.batch_size = 256  # global; a multiple of the mesh's data×fsdp size
  # 'none' (all tokens), 'train' (config.masking's kind and ratio), or a dict as config.masking.
  c.masking = "none"
  if kind in ("zeroshot", "retrieval"):
    c.dataset = _default_dataset()
  if kind == "zeroshot":
    # '' = from the dataset (synthetic label, or the TFDS label names); see CLASSNAME_CHOICES.
    c.classnames = ""
    # '' = 'synthetic' on the synthetic dataset, else 'clip_imagenet_80'; or a file path.
    c.templates = ""
  elif kind == "retrieval":
    c.ks = (1, 5, 10)
  elif kind == "linear_probe":
    c.train_dataset = _default_dataset()
    c.test_dataset = _default_dataset()
    c.num_classes = 0  # 0 = from the dataset (synthetic label or the TFDS label feature)
    c.l2_values = linear_probe.DEFAULT_L2_VALUES
    c.val_fraction = 0.2
    c.max_steps = 500
    c.seed = 0
  return c


def _default_dataset() -> ml_collections.ConfigDict:
  ds = data_config.default_source_config()
  ds.synthetic.split = "test"
  ds.tfds.split = "test"
  defaults = data_config.default_data_config()
  for knob in DATASET_KNOBS:
    ds[knob] = defaults[knob]
  return ds


def _is_mapping(value: Any) -> bool:
  # ConfigDicts are not collections.abc.Mappings.
  return isinstance(value, (Mapping, ml_collections.ConfigDict, ml_collections.FrozenConfigDict))


def _show(value: Any) -> str:
  # A ConfigDict's repr is multi-line YAML; messages show it as the dict one would write.
  return repr(value.to_dict() if hasattr(value, "to_dict") else value)


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"config.{field}={_show(value)} is invalid; allowed: {allowed}")


def _merge(defaults: ml_collections.ConfigDict, given: Mapping[str, Any],
           prefix: str) -> ml_collections.ConfigDict:
  """`defaults` overridden by `given`, recursively; unknown fields raise naming their path."""
  out = ml_collections.ConfigDict(defaults.to_dict())
  for key, value in given.items():
    if key not in out:
      _fail(f"{prefix}{key}", value, f"one of the fields {sorted(out.keys())}")
    # `masking` may be a string or a dict, so it is replaced rather than merged or type-checked.
    if key == "masking":
      with out.ignore_type():
        out[key] = value.to_dict() if hasattr(value, "to_dict") else value
    elif isinstance(out[key], ml_collections.ConfigDict) and _is_mapping(value):
      out[key] = _merge(out[key], value, f"{prefix}{key}.")
    else:
      with out.ignore_type():
        out[key] = value
  return out


def resolved_evals(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """{name: entry with defaults filled in} for `config.evals` (empty when there is none)."""
  evals = config.get("evals") or {}
  out = {}
  for name, entry in evals.items():
    prefix = f"evals.{name}."
    if not _is_mapping(entry) or "kind" not in entry:
      _fail(f"evals.{name}", entry, f"a dict with a field 'kind' in {list(KINDS)}")
    if entry["kind"] not in KINDS:
      _fail(f"{prefix}kind", entry["kind"], str(list(KINDS)))
    out[name] = _merge(default_eval_config(entry["kind"]), entry, prefix)
  return out


def _validate_dataset(ds: ml_collections.ConfigDict, field: str) -> None:
  try:
    data_config.validate_source_config(ds, prefix=f"{field}.")
  except ValueError as e:
    # The data module names fields relative to config.data; these live elsewhere.
    raise ValueError(str(e).replace("config.data.", "config.", 1)) from None
  for knob, minimum in (("read_threads", 1), ("prefetch_batches", 1), ("worker_count", 0),
                        ("worker_buffer_size", 1), ("max_captions", 1)):
    if not isinstance(ds[knob], int) or ds[knob] < minimum:
      _fail(f"{field}.{knob}", ds[knob], f"an int >= {minimum}")


def masking_spec(config: ml_collections.ConfigDict, mode: Any,
                 field: str = "masking") -> masking_lib.MaskingSpec | None:
  """The inference MaskingSpec of an eval entry's `masking` field; None = unmasked."""
  if isinstance(mode, str):
    if mode not in MASKING_MODES:
      _fail(field, mode, f"{list(MASKING_MODES)} or a dict like config.masking")
    if mode == "none":
      return None
    spec_cfg = config.masking
  elif _is_mapping(mode):
    spec_cfg = ml_collections.ConfigDict(dict(mode.items()))
  else:
    _fail(field, mode, f"{list(MASKING_MODES)} or a dict like config.masking")
  try:
    spec = masking_lib.from_config(spec_cfg)
  except ValueError as e:
    raise ValueError(f"config.{field}={_show(mode)}: {e}") from None
  if spec.kind == "attentive":
    # Attentive selection needs the A-CLIP teacher's scores, which an evaluator does not have.
    _fail(field, mode, "a masking whose kind is 'none', 'random' or 'gaussian' (attentive needs "
          "the A-CLIP teacher); give a dict such as {kind: 'random', ratio: 0.5}")
  return spec if spec.active else None


def _synthetic_label(entry: ml_collections.ConfigDict) -> str | None:
  """The synthetic label a zero-shot entry classifies, or None for other datasets."""
  if entry.classnames in SYNTHETIC_CLASSNAMES:
    return entry.classnames.split(":", 1)[1]
  if entry.dataset.source == "synthetic":
    return entry.dataset.synthetic.label
  return None


def _validate_zeroshot(name: str, entry: ml_collections.ConfigDict) -> None:
  prefix = f"evals.{name}."
  names, ds = entry.classnames, entry.dataset
  if names in SYNTHETIC_CLASSNAMES:
    label = names.split(":", 1)[1]
    if ds.source != "synthetic":
      _fail(f"{prefix}classnames", names, "'synthetic:*' only with dataset.source='synthetic'")
    if ds.synthetic.label != label:
      # The batches' 'label' is the dataset's label: the two must agree or every hit is wrong.
      _fail(f"{prefix}dataset.synthetic.label", ds.synthetic.label,
            f"{label!r}, to match classnames={names!r}")
  elif names == "tfds" or (names == "" and ds.source == "tfds"):
    if ds.source != "tfds" or not ds.tfds.label_key:
      _fail(f"{prefix}classnames", names,
            "'tfds' only with dataset.source='tfds' and a dataset.tfds.label_key")
  elif names == "":
    if ds.source != "synthetic":
      _fail(f"{prefix}classnames", names,
            f"one of {list(CLASSNAME_CHOICES[1:])} or a class-name file path for "
            f"dataset.source={ds.source!r}")
  elif names not in NAMED_CLASSNAMES and not os.path.isfile(names):
    _fail(f"{prefix}classnames", names,
          f"one of {list(CLASSNAME_CHOICES)} or an existing class-name file")
  templates = entry.templates
  if templates == "synthetic":
    if _synthetic_label(entry) is None:
      _fail(f"{prefix}templates", templates, "'synthetic' only for synthetic labels")
  elif templates and templates not in templates_lib.TEMPLATE_SETS:
    if not os.path.isfile(templates):
      _fail(f"{prefix}templates", templates,
            f"one of {list(TEMPLATE_CHOICES)} or an existing template file")
    try:
      templates_lib.load_templates(templates)
    except ValueError as e:
      raise ValueError(f"config.{prefix}templates={templates!r}: {e}") from None


def validate_evals(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """Checks every `config.evals` field before any compute; returns the resolved entries.

  Raises ValueError naming `evals.<name>.<field>`, the value and the allowed values.
  """
  entries = resolved_evals(config)
  for name, entry in entries.items():
    prefix = f"evals.{name}."
    if not isinstance(entry.every_steps, int) or entry.every_steps < 0:
      _fail(f"{prefix}every_steps", entry.every_steps, "an int >= 0 (0: only at the end)")
    if not isinstance(entry.batch_size, int) or entry.batch_size < 1:
      _fail(f"{prefix}batch_size", entry.batch_size, "an int >= 1")
    masking_spec(config, entry.masking, f"{prefix}masking")
    datasets = ("train_dataset", "test_dataset") if entry.kind == "linear_probe" else ("dataset",)
    for field in datasets:
      _validate_dataset(entry[field], f"{prefix}{field}")
    if entry.kind == "zeroshot":
      _validate_zeroshot(name, entry)
    elif entry.kind == "retrieval":
      ks = tuple(entry.ks)
      if not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
        _fail(f"{prefix}ks", entry.ks, "a non-empty list of ints >= 1")
    else:
      if not isinstance(entry.num_classes, int) or entry.num_classes < 0:
        _fail(f"{prefix}num_classes", entry.num_classes, "an int >= 0 (0: from the dataset)")
      if entry.num_classes == 0:
        for field in datasets:
          if _dataset_num_classes(entry[field]) is None:
            _fail(f"{prefix}num_classes", 0,
                  f"an int >= 2: {field}.source={entry[field].source!r} has no known classes")
      l2 = tuple(entry.l2_values)
      if not l2 or not all(isinstance(v, (int, float)) and v >= 0 for v in l2):
        _fail(f"{prefix}l2_values", entry.l2_values, "a non-empty list of floats >= 0")
      if not 0 < entry.val_fraction < 1:
        _fail(f"{prefix}val_fraction", entry.val_fraction, "a float in (0, 1)")
      if not isinstance(entry.max_steps, int) or entry.max_steps < 1:
        _fail(f"{prefix}max_steps", entry.max_steps, "an int >= 1")
  return entries


def _dataset_num_classes(ds: ml_collections.ConfigDict) -> int | None:
  """Number of classes the dataset's 'label' can take, when the config alone tells (no I/O)."""
  if ds.source == "synthetic":
    return len(synthetic.CLASS_NAMES[ds.synthetic.label])
  if ds.source == "tfds" and ds.tfds.label_key:
    return -1  # known, but only from the dataset's metadata; see _num_classes
  return None


def _tfds_label_names(ds: ml_collections.ConfigDict) -> tuple[str, ...]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  builder = tfds.builder(ds.tfds.name, data_dir=ds.tfds.data_dir or None)
  return tuple(builder.info.features[ds.tfds.label_key].names)


def _num_classes(ds: ml_collections.ConfigDict) -> int:
  known = _dataset_num_classes(ds)
  return len(_tfds_label_names(ds)) if known == -1 else known


def resolve_classnames(entry: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Class names, in label order, of a (validated) zero-shot entry."""
  names = entry.classnames
  label = _synthetic_label(entry)
  if names in SYNTHETIC_CLASSNAMES or (names == "" and label is not None):
    return tuple(synthetic.CLASS_NAMES[label])
  if names in ("", "tfds"):
    return classnames_lib.classnames_from_label_names(_tfds_label_names(entry.dataset))
  if names in NAMED_CLASSNAMES:
    return classnames_lib.CLASSNAME_SETS[NAMED_CLASSNAMES[names]]
  return templates_lib.load_classnames(names)


def resolve_template_set(entry: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Prompt templates of a (validated) zero-shot entry."""
  label = _synthetic_label(entry)
  spec = entry.templates or ("synthetic" if label is not None else "clip_imagenet_80")
  if spec == "synthetic":
    return tuple(synthetic.ZERO_SHOT_TEMPLATES[label])
  return templates_lib.resolve_templates(spec)


@dataclasses.dataclass
class ScheduledEvaluator:
  """An evaluator plus how often the trainer runs it."""

  name: str
  every_steps: int
  evaluator: base.Evaluator

  def run(self, params: base.Params) -> dict[str, float]:
    """Metric name -> value (without the 'eval/<name>/' prefix)."""
    return self.evaluator.run(params)

  def due(self, step: int, final_step: int) -> bool:
    """Whether the trainer runs this evaluator after `step`: every `every_steps` and at the end."""
    return step == final_step or (self.every_steps > 0 and step % self.every_steps == 0)


def run_evaluators(evaluators: Iterable[ScheduledEvaluator],
                   params: base.Params) -> dict[str, float]:
  """Runs `evaluators`; keys are 'eval/<name>/<metric>', as written to TensorBoard/metrics.jsonl."""
  results = {}
  for evaluator in evaluators:
    for key, value in evaluator.run(params).items():
      results[f"eval/{evaluator.name}/{key}"] = float(value)
  return results


@dataclasses.dataclass(frozen=True)
class Encoders:
  """The jitted, batch-sharded encoders evaluators take (see base.py for the call forms)."""

  encode_image: base.ImageEncoder
  encode_text: base.TextEncoder


def make_encoders(model: clip_lib.CLIP, mesh: jax.sharding.Mesh) -> Encoders:
  """encode_image(params, images, keep=None) and encode_text(params, tokens), batch-sharded."""
  batch = sharding_lib.batch_sharding(mesh)
  shard = functools.partial(jax.lax.with_sharding_constraint, shardings=batch)

  # Host batches arrive replicated (every process holds the whole batch); the constraint splits
  # them over the batch axes, so each device encodes only its share.
  @jax.jit
  def image_unmasked(params, images):
    return model.apply({"params": params}, shard(images), method=clip_lib.CLIP.encode_image)

  @jax.jit
  def image_masked(params, images, keep_indices):
    return model.apply({"params": params}, shard(images), shard(keep_indices),
                       method=clip_lib.CLIP.encode_image)

  @jax.jit
  def encode_text(params, tokens):
    return model.apply({"params": params}, shard(tokens), method=clip_lib.CLIP.encode_text)

  def encode_image(params, images, keep_indices=None):
    if keep_indices is None:
      return image_unmasked(params, images)
    return image_masked(params, images, keep_indices)

  return Encoders(encode_image, encode_text)


def make_masking(spec: masking_lib.MaskingSpec | None, grid: tuple[int, int],
                 mesh: jax.sharding.Mesh) -> base.Masking | None:
  """select_keep(rng, images) -> keep indices [B,K] batch-sharded; None when unmasked."""
  if spec is None:
    return None
  batch = sharding_lib.batch_sharding(mesh)
  # Evaluators hold no parameters: the embedding-similarity mix (cluster / pgs) is off here.
  spec = dataclasses.replace(spec, embed_mix=0.0)

  @jax.jit
  def select_keep(rng, images):
    images = jax.lax.with_sharding_constraint(images, batch)
    return masking_lib.keep_indices(rng, spec, images.shape[0], grid, sharding=batch,
                                    images=images)

  return select_keep


def _image_size(model_config: ml_collections.ConfigDict) -> int:
  h, w = clip_lib.image_size_hw(model_config.image_size)
  if h != w:
    raise ValueError(f"model.image_size={model_config.image_size!r}: evaluation centre-crops "
                     "square images; non-square models are not supported here.")
  return h


def make_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer the model was trained with (`config.tokenizer` kind/model_path, if any)."""
  tok = config.get("tokenizer") or {}
  return Tokenizer(int(config.model.text.context_length), kind=tok.get("kind", "clip"),
                   model_path=tok.get("model_path") or None)


def _batches_fn(ds_cfg: ml_collections.ConfigDict, batch_size: int, image_size: int,
                tokenizer: Tokenizer) -> base.BatchesFn:
  dataset = pipeline.make_eval_batches(
      ds_cfg, batch_size=batch_size, image_size=image_size, tokenizer=tokenizer,
      shard_options=grain.sharding.NoSharding())
  # An IterDataset starts a fresh pass each time it is iterated.
  return lambda: dataset


def build_evaluators(config: ml_collections.ConfigDict, model: clip_lib.CLIP,
                     mesh: jax.sharding.Mesh, *,
                     tokenizer: Tokenizer | None = None) -> list[ScheduledEvaluator]:
  """One ScheduledEvaluator per `config.evals` entry (validated first), sharing one encoder pair."""
  entries = validate_evals(config)
  for name, entry in entries.items():
    sharding_lib.check_batch_size(entry.batch_size, mesh, field=f"evals.{name}.batch_size")
  if not entries:
    return []
  tokenizer = tokenizer or make_tokenizer(config)
  encoders = make_encoders(model, mesh)
  image_size = _image_size(config.model)
  grid = clip_lib.grid(config.model)
  out = []
  for name, entry in entries.items():
    masking = make_masking(masking_spec(config, entry.masking), grid, mesh)
    batches = functools.partial(_batches_fn, batch_size=entry.batch_size, image_size=image_size,
                                tokenizer=tokenizer)
    if entry.kind == "zeroshot":
      evaluator = zeroshot.ZeroShotEvaluator(
          name, encoders.encode_image, encoders.encode_text, tokenizer,
          resolve_classnames(entry), resolve_template_set(entry), batches(entry.dataset),
          masking=masking, text_batch_size=entry.batch_size)
    elif entry.kind == "retrieval":
      evaluator = retrieval.RetrievalEvaluator(
          name, encoders.encode_image, encoders.encode_text, batches(entry.dataset),
          masking=masking, ks=tuple(entry.ks))
    else:
      num_classes = entry.num_classes or _num_classes(entry.train_dataset)
      evaluator = linear_probe.LinearProbeEvaluator(
          name, encoders.encode_image, batches(entry.train_dataset), batches(entry.test_dataset),
          num_classes, masking=masking, l2_values=tuple(float(v) for v in entry.l2_values),
          val_fraction=float(entry.val_fraction), max_steps=entry.max_steps, seed=entry.seed)
    out.append(ScheduledEvaluator(name, entry.every_steps, evaluator))
  return out

