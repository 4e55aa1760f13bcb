"""The trainer: one linear `train_and_evaluate` whose sections run in the order written.

  config check → logging → mesh → data → model + optimizer → restore → compile → evaluators
  → loop (step, metrics, checkpoint, eval, preemption) → final checkpoint + eval

Exact resume rests on three facts: the train state and the Grain iterator position are saved in the
same checkpoint; every step's randomness is `fold_in(seed, step)`; and the metrics written after
the restored step by a killed run are dropped. A resumed run therefore reproduces, bit for bit,
the parameters and per-step metrics of an uninterrupted one.
"""

import math
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
from clu import parameter_overview

from glip_jax import aclip
from glip_jax import checkpointing
from glip_jax import flops
from glip_jax import logging as logging_lib
from glip_jax import losses
from glip_jax import masking
from glip_jax import sharding as sharding_lib
from glip_jax import train_step as train_step_lib
from glip_jax.data import config as data_config_lib
from glip_jax.data import pipeline
from glip_jax.data import sources
from glip_jax.data import tokenizer as tokenizer_lib
from glip_jax.data import views
from glip_jax.evaluation import builder as eval_builder
from glip_jax.models import clip as clip_lib


class NonFiniteError(FloatingPointError):
  """Raised when a step produces a non-finite loss or gradient; nothing is saved after it."""


def dataset_size(data_config: ml_collections.ConfigDict) -> int:
  """Examples in one epoch of the training data (sum over a mixture's sources)."""
  return sum(len(sources.source_from_config(source))
             for source, _ in data_config_lib.mixture_components(data_config))


def resolve_total_steps(config: ml_collections.ConfigDict) -> int:
  """Training length in steps; `total_examples` or `total_epochs`, if set, take precedence."""
  if config.total_examples is not None and config.total_epochs is not None:
    raise ValueError(f"total_examples={config.total_examples} and total_epochs="
                     f"{config.total_epochs} are both set; give at most one of them (or neither, "
                     f"and total_steps).")
  if config.total_examples is not None:
    return math.ceil(config.total_examples / config.batch_size)
  if config.total_epochs is not None:
    return math.ceil(config.total_epochs * dataset_size(config.data) / config.batch_size)
  return int(config.total_steps)


def _positive(config: ml_collections.ConfigDict, field: str, allow_zero: bool = False) -> None:
  value = config[field]
  if not isinstance(value, int) or value < (0 if allow_zero else 1):
    raise ValueError(f"{field}={value!r} is invalid; allowed: an integer >= {0 if allow_zero else 1}.")


def validate_config(config: ml_collections.ConfigDict) -> masking.MaskingSpec:
  """Checks the whole config before any compute; errors name the field and the allowed values."""
  for field in ("batch_size", "log_every_steps"):
    _positive(config, field)
  for field in ("checkpoint_every_steps", "keep_checkpoints", "keep_checkpoints_every_steps"):
    _positive(config, field, allow_zero=True)
  spec = masking.from_config(config.masking)
  if config.loss.kind not in losses.LOSSES:
    raise ValueError(f"loss.kind={config.loss.kind!r}; allowed: {list(losses.LOSSES)}.")
  clip_lib.build_model(config.model)  # validates every model field; builds no parameters
  data_config_lib.validate_data_config(config.data)
  mesh = sharding_lib.create_mesh(config.mesh)  # a mesh is only a device layout: no compute yet
  sharding_lib.check_batch_size(config.batch_size, mesh)
  if resolve_total_steps(config) < 1:
    raise ValueError(f"total_steps={config.total_steps!r} is invalid; allowed: an integer >= 1.")
  height, width = clip_lib.image_size_hw(config.model.image_size)
  if height != width:
    raise ValueError(f"model.image_size={config.model.image_size!r}: the input pipeline crops "
                     f"square images; use an int.")
  if spec.kind == "attentive" and "aclip" not in config:
    raise ValueError("masking.kind='attentive' needs the A-CLIP step and its config.aclip section "
                     "(teacher, views, losses); start from configs/aclip_vit_b16.py or "
                     "configs/demo.py:aclip.")
  if "aclip" in config:
    aclip.spec_from_config(config.aclip, 1)  # validates the A-CLIP fields
  for name, entry in eval_builder.validate_evals(config).items():
    sharding_lib.check_batch_size(entry.batch_size, mesh, field=f"evals.{name}.batch_size")
  return spec


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from `workdir` if it holds checkpoints) and returns the final metrics."""
  # ---------------------------------------------------------------- config check (no compute yet)
  masking_spec = validate_config(config)
  total_steps = resolve_total_steps(config)

  # ---------------------------------------------------------------- mesh
  mesh = sharding_lib.create_mesh(config.mesh)
  logging.info("Mesh %s over %d devices (%s), %d processes.", dict(mesh.shape), jax.device_count(),
               jax.devices()[0].device_kind, jax.process_count())

  # ---------------------------------------------------------------- data
  tokenizer = tokenizer_lib.Tokenizer(config.model.text.context_length, config.tokenizer.kind,
                                      config.tokenizer.model_path or None)
  image_size = clip_lib.image_size_hw(config.model.image_size)
  # A-CLIP trains on two online views plus a zoom-out teacher view of each example, and its step
  # carries an EMA teacher; everything else in this trainer is shared with CLIP/FLIP/GLIP.
  is_aclip = "aclip" in config
  batch_keys = views.BATCH_KEYS if is_aclip else ("image", "text")
  preprocess = (views.ACLIPPreprocess(image_size[0], tokenizer, config.data.crop_scale,
                                      config.data.crop_ratio) if is_aclip else None)
  train_iter = pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, image_size=image_size[0],
      seed=config.seed, tokenizer=tokenizer, preprocess=preprocess)

  # ---------------------------------------------------------------- model + optimizer
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, total_steps)
  if is_aclip:
    aclip_spec = aclip.spec_from_config(config.aclip, total_steps)
    state, state_shardings = aclip.create_train_state(model, tx, config.model, mesh, config.seed,
                                                      aclip_spec)
  else:
    state, state_shardings = train_step_lib.create_train_state(model, tx, config.model, mesh,
                                                               config.seed)

  # ---------------------------------------------------------------- restore / init
  manager = checkpointing.create_manager(
      checkpointing.checkpoint_dir(workdir), save_every=max(config.checkpoint_every_steps, 1),
      keep=config.keep_checkpoints or None, keep_every=config.keep_checkpoints_every_steps or None)
  start_step = checkpointing.latest_step(manager)
  abstract_state = checkpointing.abstract_like(state, state_shardings)
  if start_step is not None:
    logging.info("Resuming from %s/%d.", manager.directory, start_step)
    state = checkpointing.restore(manager, start_step, abstract_state, train_iter)
  elif config.init_from.path:
    # Unmasked tuning and fine-tuning start from another run's parameters, with a fresh step count.
    logging.info("Initialising parameters from %s.", config.init_from.path)
    subtrees = {"params": abstract_state.params}
    if config.init_from.optimizer_state:
      subtrees["opt_state"] = abstract_state.opt_state
    restored = checkpointing.restore_subtrees(config.init_from.path, subtrees)
    state = state.replace(**restored)
  start_step = start_step or 0

  # ---------------------------------------------------------------- logging (process 0 writes)
  writer = logging_lib.create_writer(workdir, just_logging=jax.process_index() > 0,
                                     resume_step=start_step or None)
  if start_step == 0:
    logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(state.params))
    writer.write_hparams(config.to_dict())
  report_progress = logging_lib.periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps)

  # ---------------------------------------------------------------- compile the train step
  step_spec = train_step_lib.StepSpec(masking=masking_spec, grid=clip_lib.grid(config.model),
                                      loss=config.loss.kind, seed=config.seed)
  if is_aclip:
    train_step = aclip.compile_train_step(model, tx, schedule, step_spec, mesh, state_shardings,
                                          aclip_spec)
    flops_per_example = aclip.aclip_train_flops_per_example(config.model, aclip_spec, masking_spec)
  else:
    train_step = train_step_lib.compile_train_step(model, tx, schedule, step_spec, mesh,
                                                   state_shardings)
    flops_per_example = flops.train_flops_per_example(
        config.model, masking_spec.ratio if masking_spec.active else 0.0)

  # ---------------------------------------------------------------- evaluators
  evaluators = eval_builder.build_evaluators(config, model, mesh)

  def run_evals(step: int) -> dict[str, float]:
    due = [e for e in evaluators if e.due(step, total_steps)]
    if not due:
      return {}
    t0 = time.perf_counter()
    results = eval_builder.run_evaluators(due, state.params)
    logging.info("Evaluation at step %d took %.1fs.", step, time.perf_counter() - t0)
    writer.write_scalars(step, results)
    writer.flush()
    return results

  # ---------------------------------------------------------------- training loop
  preemption = checkpointing.install_sigterm_handler()
  summary: dict[str, float] = {}
  previous = None  # (step, metrics) of the step before: checked while the next one runs
  interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0
  step = start_step
  try:
    while step < total_steps:
      t0 = time.perf_counter()
      local_batch = next(train_iter)
      data_wait += time.perf_counter() - t0
      batch = pipeline.make_global_batch({k: local_batch[k] for k in batch_keys}, mesh)
      state, metrics = train_step(state, batch)
      step += 1
      interval_steps += 1
      # Reading the previous step's scalars keeps at most two steps in flight: enough to overlap
      # host and device, and it bounds the queue (XLA:CPU collectives can deadlock on deep ones).
      if previous is not None:
        _check_finite(*previous)
      previous = (step, metrics)
      report_progress(step, time.time())

      if step == start_step + 1:  # the first step includes compilation: time from here on
        jax.block_until_ready(metrics)
        interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, scalars)
        if interval_steps:
          elapsed = time.perf_counter() - interval_start
          scalars.update(logging_lib.throughput_metrics(
              interval_steps * config.batch_size, elapsed, flops_per_example, jax.device_count(),
              jax.devices()[0].device_kind))
          scalars["step_time_s"] = elapsed / interval_steps
          scalars["data_wait_s"] = data_wait / interval_steps
        writer.write_scalars(step, scalars)
        writer.flush()
        summary.update(scalars)
        interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0

      stop = checkpointing.should_stop(preemption, manager, step)
      if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0) or stop:
        _check_finite(step, metrics)  # never let a non-finite state replace a good checkpoint
        checkpointing.save(manager, step, state, train_iter, config, force=True)
      if stop:
        logging.warning("Preempted at step %d: checkpoint written, exiting.", step)
        summary["preempted_at_step"] = step
        return summary
      summary.update(run_evals(step))

    # -------------------------------------------------------------- final checkpoint + evaluation
    if previous is not None:
      _check_finite(*previous)
    if checkpointing.latest_step(manager) != step:
      checkpointing.save(manager, step, state, train_iter, config, force=True)
    if step == start_step:  # resumed a finished run: evaluate its final state again
      summary.update(run_evals(step))
    summary["steps"] = step
    return summary
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    preemption.uninstall()
    if hasattr(train_iter, "close"):
      train_iter.close()


def _check_finite(step: int, metrics: dict[str, Any]) -> None:
  values = {k: float(metrics[k]) for k in ("loss", "grad_norm") if k in metrics}
  if not all(np.isfinite(v) for v in values.values()):
    raise NonFiniteError(
        f"Non-finite training values at step {step}: {values}. Stopping without saving; the last "
        f"good checkpoint is intact. Lower optim.lr, raise optim.warmup_steps or keep "
        f"optim.grad_clip_norm > 0, then resume from the workdir.")

