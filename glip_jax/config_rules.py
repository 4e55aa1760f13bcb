"""One rule per config field (type, range or allowed values), checked before anything else.

`validate(config)` walks RULES, the table below, and fails at the first field whose value breaks
its rule, with `errors.fail`'s message: 'config.<field>=<value> is invalid; allowed: <rule>'. It is
the first thing `run_spec.build` does, so a bad value never reaches compute or the workdir.
Facts that relate fields (heads divide the width, a patch divides the image, the batch divides
the mesh, a source's required fields) stay with their section's validator, which runs next
(run_spec._check). tests/test_config_rules.py walks every leaf of configs/common.py's defaults and
fails for a field without a rule here.

Fields a section may hold without the defaults setting them (the masking kinds' extra fields) have
rules too; a rule for a field a config lacks is skipped. Sections whose shape is open (config.evals
entries, a recipe's method section such as config.aclip) are validated by their own modules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging

from glip_jax import errors
from glip_jax import losses
from glip_jax.data import config as data_config
from glip_jax.data import sources
from glip_jax.data import synthetic
from glip_jax.data import tokenizer
from glip_jax.masking import spec as masking_spec
from glip_jax.models import clip as clip_models
from glip_jax.models import layers
from glip_jax.models import vit


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a field may hold: `allowed` (words, for the message) and the predicate that checks it."""

  allowed: str
  check: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(low: int | None = None, high: int | None = None) -> Rule:
  """An int (not a bool) in [low, high]."""
  bounds = ("" if low is None and high is None else f" >= {low}" if high is None
            else f" in [{low}, {high}]")
  return Rule(f"an int{bounds}", lambda v: _is_int(v) and (low is None or v >= low)
              and (high is None or v <= high))


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Rule:
  """A finite int or float in the interval; `*_open` excludes that end."""
  if low is not None and high is not None:
    bounds = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  elif low is not None:
    bounds = f" {'>' if low_open else '>='} {low}"
  elif high is not None:
    bounds = f" {'<' if high_open else '<='} {high}"
  else:
    bounds = ""

  def check(v: Any) -> bool:
    if not _is_number(v):
      return False
    if low is not None and (v <= low if low_open else v < low):
      return False
    return high is None or (v < high if high_open else v <= high)

  return Rule(f"a number{bounds}", check)


def boolean() -> Rule:
  """True or False."""
  return Rule("True or False", lambda v: isinstance(v, bool))


def text() -> Rule:
  """Any string ('' = unset)."""
  return Rule("a string", lambda v: isinstance(v, str))


def one_of(choices: Sequence[str] | Mapping[str, Any]) -> Rule:
  """One of the named strings."""
  choices = tuple(choices)
  return Rule(f"one of {list(choices)}", lambda v: isinstance(v, str) and v in choices)


def optional(rule: Rule) -> Rule:
  """None, or what `rule` allows."""
  return Rule(f"None or {rule.allowed}", lambda v: v is None or rule.check(v))


def pair(low: float, high: float) -> Rule:
  """A (min, max) pair of numbers with low < min <= max <= high."""
  return Rule(f"a pair (min, max) with {low} < min <= max <= {high}",
              lambda v: isinstance(v, (tuple, list)) and len(v) == 2
              and all(_is_number(x) for x in v) and low < v[0] <= v[1] <= high)


def _is_variant(v: Any) -> bool:
  try:
    vit.parse_variant(v)
  except (ValueError, TypeError, KeyError, AttributeError):
    return False
  return isinstance(v, str)


_SIZE = Rule("a positive int or a pair (height, width) of positive ints",
             lambda v: (_is_int(v) and v >= 1) or (isinstance(v, (tuple, list)) and len(v) == 2
                                                   and all(_is_int(x) and x >= 1 for x in v)))
_MESH_AXIS = Rule("-1 (all remaining devices) or an int >= 1",
                  lambda v: _is_int(v) and (v == -1 or v >= 1))
_PATHS = Rule("a string (a glob, a range or comma-separated globs) or a list of strings",
              lambda v: isinstance(v, str) or (isinstance(v, (list, tuple))
                                               and all(isinstance(p, str) for p in v)))
_MAPPING = Rule("a dict of {name: entry}", lambda v: isinstance(v, Mapping) or hasattr(v, "items"))
_LIST = Rule("a list", lambda v: isinstance(v, (list, tuple)))

# Rules of a data source's fields: config.data and each config.data.mixture entry.
SOURCE_RULES: dict[str, Rule] = {
    "source": one_of(data_config.SOURCES),
    "paths": _PATHS,
    "synthetic.image_size": integer(8),
    "synthetic.center_bias": number(0.0, 1.0),
    "synthetic.max_distractors": integer(0),
    "synthetic.num_captions": integer(1, len(synthetic.CAPTION_TEMPLATES)),
    "synthetic.seed": integer(),
    "synthetic.split": one_of(synthetic.SPLITS),
    "synthetic.train_size": integer(1),
    "synthetic.eval_size": integer(1),
    "synthetic.label": one_of(synthetic.CLASS_NAMES),
    "parquet.image_column": text(),
    "parquet.caption_column": text(),
    "webdataset.index_dir": text(),
    "webdataset.verify_images": boolean(),
    "tfds.name": text(),
    "tfds.split": text(),
    "tfds.data_dir": text(),
    "tfds.image_key": text(),
    "tfds.text_key": text(),
    "tfds.label_key": text(),
    "karpathy.json_path": text(),
    "karpathy.image_dir": text(),
    "karpathy.split": one_of(sources.KARPATHY_SPLITS),
}

RULES: dict[str, Rule] = {
    "seed": integer(),
    "batch_size": integer(1),
    # Which names exist is the registry's to say (methods.get lists them; a test may register one).
    "method": text(),
    "total_steps": integer(1),
    "total_epochs": optional(number(0.0, low_open=True)),
    "total_examples": optional(integer(1)),
    "log_every_steps": integer(1),
    "checkpoint_every_steps": integer(0),
    "keep_checkpoints": integer(0),
    "keep_checkpoints_every_steps": integer(0),
    # model
    "model.image.variant": Rule(f"'<size>/<patch>' with size one of {list(vit.VIT_SIZES)}",
                                _is_variant),
    "model.image.pool": one_of(clip_models.POOLS),
    "model.image.pos_embedding": one_of(clip_models.POS_EMBEDDINGS),
    "model.image_size": _SIZE,
    "model.embed_dim": integer(1),
    "model.dtype": one_of(clip_models.DTYPES),
    "model.attention_impl": one_of(layers.ATTENTION_IMPLS),
    "model.logit_scale_init": number(),
    "model.logit_bias_init": optional(number()),
    "model.quick_gelu": boolean(),
    "model.remat": boolean(),
    "model.remat_policy": one_of(tuple(layers.REMAT_POLICIES)),
    "model.text.width": integer(1),
    "model.text.heads": integer(1),
    "model.text.depth": integer(1),
    "model.text.context_length": integer(2),
    "model.text.vocab_size": integer(1),
    "model.text.eot_token_id": optional(integer(0)),
    "model.text.causal": boolean(),
    # masking (glip_jax/masking/spec.py documents each)
    "masking.kind": one_of(masking_spec.KINDS),
    # Its range, [0, 1), is MaskingSpec's to report (the documented CLI message).
    "masking.ratio": number(),
    "masking.sigma": number(0.0, low_open=True),
    "masking.sigma_is_variance": boolean(),
    "masking.strength": number(0.0),
    "masking.gumbel": boolean(),
    "masking.anchor_ratio": optional(number(0.0, 1.0, low_open=True, high_open=True)),
    "masking.threshold": optional(number(-1.0, 1.0)),
    "masking.embed_mix": optional(number(0.0, 1.0)),
    "masking.as_coded": boolean(),
    "masking.edge_weight": number(0.0),
    "masking.otn": boolean(),
    "masking.sinkhorn_iters": integer(1),
    "masking.temperature": number(0.0, low_open=True),
    "masking.window": integer(2),
    "masking.max_aspect": number(1.0),
    "loss.kind": one_of(losses.LOSSES),
    "loss.impl": one_of(losses.IMPLS),
    # optimizer
    "optim.lr": number(0.0, low_open=True),
    "optim.end_lr": number(0.0),
    "optim.warmup_steps": integer(0),
    "optim.b1": number(0.0, 1.0, high_open=True),
    "optim.b2": number(0.0, 1.0, high_open=True),
    "optim.eps": number(0.0, low_open=True),
    "optim.weight_decay": number(0.0),
    "optim.grad_clip_norm": number(0.0),
    "optim.accum_steps": integer(1),
    "mesh.data": _MESH_AXIS,
    "mesh.fsdp": _MESH_AXIS,
    "mesh.tensor": _MESH_AXIS,
    # data (glip_jax/data/config.py documents each)
    **{f"data.{k}": rule for k, rule in SOURCE_RULES.items()},
    "data.mixture": _LIST,
    "data.crop_scale": pair(0.0, 1.0),
    "data.crop_ratio": pair(0.0, math.inf),
    "data.flip": boolean(),
    "data.shuffle_seed": integer(-1),
    **{f"data.{k}": integer(low) for k, low in data_config.PIPELINE_KNOBS.items()},
    "data.device_prefetch": integer(0),
    "data.max_skip_fraction": number(0.0, 1.0),
    "data.skip_window": integer(1),
    "tokenizer.kind": one_of(tokenizer.KINDS),
    "tokenizer.model_path": text(),
    "evals": _MAPPING,
    "init_from.path": text(),
    "init_from.optimizer_state": boolean(),
    "init_from.open_clip": text(),
}

_MISSING = object()


def _get(node: Any, path: str) -> Any:
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def _check_rules(node: Any, rules: Mapping[str, Rule], prefix: str = "") -> None:
  for path, rule in rules.items():
    value = _get(node, path)
    if value is not _MISSING and not rule.check(value):
      errors.fail(prefix + path, value, rule.allowed)


def validate(config: Any) -> None:
  """Checks every field of `config` that RULES names; ValueError at the first bad one."""
  _check_rules(config, RULES)
  mixture = _get(config, "data.mixture")
  for i, entry in enumerate(mixture if isinstance(mixture, (list, tuple)) else ()):
    if isinstance(entry, (tuple, list)) and len(entry) == 2:
      entry, weight = entry
    else:
      weight = _get(entry, "weight")
    _check_rules(entry, SOURCE_RULES, f"data.mixture[{i}].")
    if weight is not _MISSING and not number(0.0, low_open=True).check(weight):
      errors.fail(f"data.mixture[{i}].weight", weight, "a number > 0")
  width, heads = _get(config, "model.text.width"), _get(config, "model.text.heads")
  if _is_int(width) and _is_int(heads) and width % heads:
    errors.fail("model.text.heads", heads, f"a divisor of model.text.width={width}")


def check_schedule(config: Any, total_steps: int) -> None:
  """Warns when the warmup does not end before the run does (the peak lr is never reached).

  A warning, not an error: short smoke and tuning runs (a few steps at warmup's lr 0) rely on it.
  """
  warmup = int(config.optim.warmup_steps)
  if warmup >= total_steps:
    logging.warning("optim.warmup_steps=%d >= the run's %d steps: the learning rate never reaches "
                    "optim.lr=%g.", warmup, total_steps, config.optim.lr)


def rule_for(path: str) -> Rule | None:
  """The rule of a dotted field path (None: no rule)."""
  return RULES.get(path)
