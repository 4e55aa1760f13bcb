"""The resolved run: every fact the trainer, the watcher and the benchmark need, derived once.

`build(config, workdir)` is the config check. It resolves paths, validates every section (each
error names the field, the value and what is allowed), opens each training source once, and
returns a frozen `RunSpec`; nothing downstream re-derives a fact from the config. It runs before
any compute and before any file is written.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import jax
import ml_collections

from glip_jax import config_rules
from glip_jax import errors
from glip_jax import losses
from glip_jax import masking
from glip_jax import methods
from glip_jax import paths
from glip_jax import sharding as sharding_lib
from glip_jax import train_step as train_step_lib
from glip_jax.data import config as data_config_lib
from glip_jax.data import sources
from glip_jax.data import tokenizer as tokenizer_lib
from glip_jax.evaluation import builder as eval_builder
from glip_jax.methods.base import Method
from glip_jax.models import clip as clip_lib


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A validated run; built once by `build`."""

  config: ml_collections.ConfigDict  # the run's config with every path resolved
  workdir: str
  mesh: jax.sharding.Mesh
  total_steps: int
  duration_source: str  # which field set the length, e.g. 'total_epochs=30'
  method: Method
  method_spec: Any  # what `method.validate` returned; the method's other functions take it
  masking: masking.MaskingSpec
  step: train_step_lib.StepSpec
  image_size: tuple[int, int]
  train_sources: tuple[tuple[Any, float], ...]  # (opened source, mixture weight)
  evals: dict[str, ml_collections.ConfigDict]  # resolved config.evals entries
  tokenizer: tokenizer_lib.Tokenizer

  @property
  def dataset_size(self) -> int:
    """Examples in one epoch of the training data (sum over a mixture's sources)."""
    return sum(len(source) for source, _ in self.train_sources)


def _positive(config: ml_collections.ConfigDict, field: str, allow_zero: bool = False) -> None:
  value = config[field]
  if not isinstance(value, int) or value < (0 if allow_zero else 1):
    raise ValueError(f"{field}={value!r} is invalid; allowed: an integer >= {0 if allow_zero else 1}.")


def duration_source(config: ml_collections.ConfigDict) -> str:
  """Which field sets the run length: 'total_examples=…', 'total_epochs=…' or 'total_steps=…'."""
  for field in ("total_examples", "total_epochs"):
    if config[field] is not None:
      return f"{field}={config[field]}"
  return f"total_steps={config.total_steps}"


def total_steps(config: ml_collections.ConfigDict, dataset_size: int | None) -> int:
  """Training length in steps; `total_examples` or `total_epochs`, if set, take precedence."""
  if config.total_examples is not None and config.total_epochs is not None:
    raise ValueError(f"total_examples={config.total_examples} and total_epochs="
                     f"{config.total_epochs} are both set; give at most one of them (or neither, "
                     f"and total_steps).")
  if config.total_examples is not None:
    return math.ceil(config.total_examples / config.batch_size)
  if config.total_epochs is not None:
    return math.ceil(config.total_epochs * dataset_size / config.batch_size)
  return int(config.total_steps)


def open_train_sources(data: ml_collections.ConfigDict) -> tuple[tuple[Any, float], ...]:
  """Each training source opened once, with its mixture weight (a missing shard fails here)."""
  return tuple((sources.source_from_config(source), weight)
               for source, weight in data_config_lib.mixture_components(data))


def _check(config: ml_collections.ConfigDict, workdir: str) -> RunSpec:
  for field in ("batch_size", "log_every_steps"):
    _positive(config, field)
  for field in ("checkpoint_every_steps", "keep_checkpoints", "keep_checkpoints_every_steps"):
    _positive(config, field, allow_zero=True)
  method = methods.get(config.method)
  masking_spec = masking.from_config(config.masking)
  if config.loss.kind not in losses.LOSSES:
    raise ValueError(f"loss.kind={config.loss.kind!r}; allowed: {list(losses.LOSSES)}.")
  if config.loss.kind == "sigmoid" and config.model.logit_bias_init is None:
    raise ValueError("loss.kind='sigmoid' needs model.logit_bias_init (SigLIP uses -10.0, with "
                     "model.logit_scale_init=log(10)); without the bias the loss starts far off.")
  clip_lib.build_model(config.model)  # validates every model field; builds no parameters
  height, width = clip_lib.image_size_hw(config.model.image_size)  # (H, W): crops are H×W
  data_config_lib.validate_data_config(config.data)
  mesh = sharding_lib.create_mesh(config.mesh)  # a mesh is only a device layout: no compute yet
  sharding_lib.check_batch_size(config.batch_size, mesh)
  losses.check_impl(config.loss.impl)
  train_step_lib.check_accum_steps(config.optim.accum_steps, config.batch_size,
                                   sharding_lib.data_parallel_size(mesh))
  train_sources = open_train_sources(config.data)
  steps = total_steps(config, sum(len(s) for s, _ in train_sources))
  if steps < 1:
    raise ValueError(f"total_steps={config.total_steps!r} is invalid; allowed: an integer >= 1.")
  config_rules.check_schedule(config, steps)
  method_spec = method.validate(config, steps)
  if config.init_from.path and config.init_from.open_clip:
    raise ValueError(f"init_from.path={config.init_from.path!r} and init_from.open_clip="
                     f"{config.init_from.open_clip!r}: give at most one.")
  evals = eval_builder.validate_evals(config)
  for name, entry in evals.items():
    sharding_lib.check_batch_size(entry.batch_size, mesh, field=f"evals.{name}.batch_size")
  return RunSpec(
      config=config, workdir=workdir, mesh=mesh, total_steps=steps,
      duration_source=duration_source(config), method=method, method_spec=method_spec,
      masking=masking_spec,
      step=train_step_lib.StepSpec(masking=masking_spec, grid=clip_lib.grid(config.model),
                                   loss=config.loss.kind, seed=config.seed, total_steps=steps,
                                   loss_impl=config.loss.impl,
                                   accum_steps=config.optim.accum_steps),
      image_size=(height, width), train_sources=train_sources, evals=evals,
      tokenizer=eval_builder.make_tokenizer(config))


def build(config: ml_collections.ConfigDict, workdir: str = "") -> RunSpec:
  """Validates `config` (a copy; paths resolved) into a RunSpec; ConfigError names the field."""
  config = copy.deepcopy(config)
  try:
    # Every field's type and range first (glip_jax/config_rules.py), then each section's facts.
    config_rules.validate(config)
  except (ValueError, TypeError) as e:
    raise errors.ConfigError(str(e)) from e
  workdir = paths.resolve(workdir)
  paths.resolve_config_paths(config, eval_builder.CLASSNAME_CHOICES + eval_builder.TEMPLATE_CHOICES)
  try:
    return _check(config, workdir)
  except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
    raise errors.ConfigError(str(e)) from e
