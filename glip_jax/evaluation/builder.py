"""Evaluators from `config.evals`: the generic fields, the registry of kinds, sharded encoders.

`config.evals` maps an evaluator name to its settings, e.g.

  evals.shape = dict(kind='zeroshot', dataset=dict(source='synthetic',
                                                   synthetic=dict(split='test', label='shape')),
                     classnames='synthetic:shape', templates='synthetic', every_steps=200,
                     batch_size=128)

This module owns only what every kind shares: `kind`, the schedule (`every_steps`), `batch_size`,
the masking regime (`masking`) and the dataset fields (source configs plus eval pipeline knobs).
Each kind's module (`KINDS` below: zeroshot.py, retrieval.py, linear_probe.py) owns the rest:
`default_config()` (its own fields), `validate(entry, prefix)` and `from_config(name, entry,
context)`, plus `DATASET_FIELDS`. Adding a kind is one module and one line in `KINDS`.

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
from collections.abc import Iterable, Mapping
from typing import Any

import grain
import jax
import ml_collections

from glip_jax import errors
from glip_jax import masking as masking_lib
from glip_jax import sharding as sharding_lib
from glip_jax.data import config as data_config
from glip_jax.data import pipeline
from glip_jax.data.tokenizer import Tokenizer
from glip_jax.evaluation import base
from glip_jax.evaluation import linear_probe
from glip_jax.evaluation import retrieval
from glip_jax.evaluation import zeroshot
from glip_jax.models import clip as clip_lib

# The evaluator kinds: config.evals.<name>.kind -> the module that owns that kind.
KINDS = {
    "zeroshot": zeroshot,
    "retrieval": retrieval,
    "linear_probe": linear_probe,
}
MASKING_MODES = ("none", "train")
# Names a zero-shot entry's classnames / templates may take besides a file path.
CLASSNAME_CHOICES = zeroshot.CLASSNAME_CHOICES
TEMPLATE_CHOICES = zeroshot.TEMPLATE_CHOICES
resolve_classnames = zeroshot.resolve_classnames
resolve_template_set = zeroshot.resolve_template_set
# Eval-only pipeline knobs a dataset entry may set besides the source fields.
DATASET_KNOBS = tuple(data_config.PIPELINE_KNOBS)


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
  for field in KINDS[kind].DATASET_FIELDS:
    c[field] = _default_dataset()
  c.update(KINDS[kind].default_config())
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


def _merge(defaults: ml_collections.ConfigDict, given: Mapping[str, Any],
           prefix: str) -> ml_collections.ConfigDict:
  """`defaults` overridden by `given`, recursively; unknown fields raise naming their path."""
  out = ml_collections.ConfigDict(defaults.to_dict())
  for key, value in given.items():
    if key not in out:
      errors.fail(f"{prefix}{key}", value, f"one of the fields {sorted(out.keys())}")
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
      errors.fail(f"evals.{name}", entry, f"a dict with a field 'kind' in {list(KINDS)}")
    if entry["kind"] not in KINDS:
      errors.fail(f"{prefix}kind", entry["kind"], str(list(KINDS)))
    out[name] = _merge(default_eval_config(entry["kind"]), entry, prefix)
  return out


def _validate_dataset(ds: ml_collections.ConfigDict, field: str) -> None:
  try:
    data_config.validate_source_config(ds, prefix=f"{field}.")
  except ValueError as e:
    # The data module names fields relative to config.data; these live elsewhere.
    raise ValueError(str(e).replace("config.data.", "config.", 1)) from None
  data_config.validate_knobs(
      ds, lambda knob, value, allowed: errors.fail(f"{field}.{knob}", value, allowed))


def masking_spec(config: ml_collections.ConfigDict, mode: Any,
                 field: str = "masking") -> masking_lib.MaskingSpec | None:
  """The inference MaskingSpec of an eval entry's `masking` field; None = unmasked."""
  if isinstance(mode, str):
    if mode not in MASKING_MODES:
      errors.fail(field, mode, f"{list(MASKING_MODES)} or a dict like config.masking")
    if mode == "none":
      return None
    spec_cfg = config.masking
  elif _is_mapping(mode):
    spec_cfg = ml_collections.ConfigDict(dict(mode.items()))
  else:
    errors.fail(field, mode, f"{list(MASKING_MODES)} or a dict like config.masking")
  try:
    spec = masking_lib.from_config(spec_cfg)
  except ValueError as e:
    raise ValueError(f"config.{field}={errors.show(mode)}: {e}") from None
  if spec.kind == "attentive":
    # Attentive selection needs the A-CLIP teacher's scores, which an evaluator does not have.
    errors.fail(field, mode, f"a masking whose kind is one of "
                f"{[k for k in masking_lib.KINDS if k != 'attentive']} (attentive needs the "
                f"A-CLIP teacher); give a dict such as {{kind: 'random', ratio: 0.5}}")
  return spec if spec.active else None


def validate_evals(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """Checks every `config.evals` field before any compute; returns the resolved entries.

  Raises ValueError naming `evals.<name>.<field>`, the value and the allowed values.
  """
  entries = resolved_evals(config)
  for name, entry in entries.items():
    prefix = f"evals.{name}."
    if not isinstance(entry.every_steps, int) or entry.every_steps < 0:
      errors.fail(f"{prefix}every_steps", entry.every_steps, "an int >= 0 (0: only at the end)")
    if not isinstance(entry.batch_size, int) or entry.batch_size < 1:
      errors.fail(f"{prefix}batch_size", entry.batch_size, "an int >= 1")
    masking_spec(config, entry.masking, f"{prefix}masking")
    kind = KINDS[entry.kind]
    for field in kind.DATASET_FIELDS:
      _validate_dataset(entry[field], f"{prefix}{field}")
    kind.validate(entry, prefix)
  return entries


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


def _image_size(model_config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(H, W) of the evaluation crops: the model's input size, square or not."""
  return clip_lib.image_size_hw(model_config.image_size)


def make_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer the model was trained with (`config.tokenizer` kind/model_path, if any)."""
  tok = config.get("tokenizer") or {}
  return Tokenizer(int(config.model.text.context_length), kind=tok.get("kind", "clip"),
                   model_path=tok.get("model_path") or None)


def _batches_fn(ds_cfg: ml_collections.ConfigDict, batch_size: int, image_size: tuple[int, int],
                tokenizer: Tokenizer) -> base.BatchesFn:
  dataset = pipeline.make_eval_batches(
      ds_cfg, batch_size=batch_size, image_size=image_size, tokenizer=tokenizer,
      shard_options=grain.sharding.NoSharding())
  # An IterDataset starts a fresh pass each time it is iterated.
  return lambda: dataset


def build_evaluators(config: ml_collections.ConfigDict, model: clip_lib.CLIP,
                     mesh: jax.sharding.Mesh, *, tokenizer: Tokenizer | None = None,
                     entries: Mapping[str, ml_collections.ConfigDict] | None = None,
                     ) -> list[ScheduledEvaluator]:
  """One ScheduledEvaluator per `config.evals` entry, sharing one encoder pair.

  `entries` are the already validated entries (the run spec's); without them `config.evals` is
  validated here.
  """
  entries = validate_evals(config) if entries is None else entries
  for name, entry in entries.items():
    sharding_lib.check_batch_size(entry.batch_size, mesh, field=f"evals.{name}.batch_size")
  if not entries:
    return []
  tokenizer = tokenizer or make_tokenizer(config)
  encoders = make_encoders(model, mesh)
  image_size = _image_size(config.model)
  grid = clip_lib.grid(config.model)
  batches = functools.partial(_batches_fn, image_size=image_size, tokenizer=tokenizer)
  out = []
  for name, entry in entries.items():
    context = base.BuildContext(
        encode_image=encoders.encode_image, encode_text=encoders.encode_text,
        tokenizer=tokenizer, masking=make_masking(masking_spec(config, entry.masking), grid, mesh),
        batches=functools.partial(batches, batch_size=entry.batch_size))
    evaluator = KINDS[entry.kind].from_config(name, entry, context)
    out.append(ScheduledEvaluator(name, entry.every_steps, evaluator))
  return out
