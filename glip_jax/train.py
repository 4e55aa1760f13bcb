"""The trainer: one linear `train_and_evaluate` whose sections run in the order written.

  run spec (the config check) → mesh → data → model + optimizer → restore → logging → compile
  → evaluators → loop (step, metrics, checkpoint, eval, preemption) → final checkpoint + eval

It never asks which method runs: the run spec's `Method` (glip_jax/methods) supplies the batch
keys, preprocessing, train state, compiled step and FLOP count.

Exact resume rests on three facts: the train state and the Grain iterator position are saved in the
same checkpoint; every step's randomness is `fold_in(seed, step)`; and the metrics written after
the restored step by a killed run are dropped. A resumed run therefore reproduces, bit for bit,
the parameters and per-step metrics of an uninterrupted one.
"""

import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
from clu import parameter_overview

from glip_jax import checkpointing
from glip_jax import errors
from glip_jax import flops
from glip_jax import logging as logging_lib
from glip_jax import progress as progress_lib
from glip_jax import run_spec as run_spec_lib
from glip_jax import sharding as sharding_lib
from glip_jax import storage
from glip_jax import train_step as train_step_lib
from glip_jax.data import pipeline
from glip_jax.data import prefetch
from glip_jax.evaluation import builder as eval_builder
from glip_jax.interop import open_clip as open_clip_interop
from glip_jax.models import clip as clip_lib
from glip_jax.models.vit import normalize_images


class NonFiniteError(errors.RunStopped, FloatingPointError):
  """Raised when a step produces a non-finite loss or gradient; nothing is saved after it."""


def resolve_total_steps(config: ml_collections.ConfigDict) -> int:
  """Training length in steps (opens the training sources only for `total_epochs`)."""
  size = None
  if config.total_epochs is not None and config.total_examples is None:
    size = sum(len(s) for s, _ in run_spec_lib.open_train_sources(config.data))
  return run_spec_lib.total_steps(config, size)


def duration_source(config: ml_collections.ConfigDict) -> str:
  """Which field sets the run length (see run_spec.duration_source)."""
  return run_spec_lib.duration_source(config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from `workdir` if it holds checkpoints) and returns the final metrics."""
  # ---------------------------------------------------------------- run spec (no compute yet)
  spec = run_spec_lib.build(config, workdir)
  config, workdir, method, mesh = spec.config, spec.workdir, spec.method, spec.mesh
  total_steps = spec.total_steps
  logging.info("Run length: %d steps of %d examples (set by %s).", total_steps, config.batch_size,
               spec.duration_source)
  logging.info("Mesh %s over %d devices (%s), %d processes.", dict(mesh.shape), jax.device_count(),
               jax.devices()[0].device_kind, jax.process_count())
  # Fails here, with the path and what is intact, rather than at the first save; a gs:// or s3://
  # workdir without credentials fails here too, naming what was tried (glip_jax/storage.py).
  storage.check_access(workdir)
  checkpointing.check_writable(checkpointing.checkpoint_dir(workdir))

  # ---------------------------------------------------------------- data
  host_iter = pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, image_size=spec.image_size,
      seed=config.seed, tokenizer=spec.tokenizer, opened_sources=spec.train_sources,
      preprocess=method.make_preprocess(spec.method_spec, config.data, spec.image_size,
                                        spec.tokenizer))
  # Batches already on the devices, `device_prefetch` ahead, so the copy overlaps the step; its
  # checkpointed state is the position after the batches consumed (glip_jax/data/prefetch.py).
  prefetching = config.data.device_prefetch > 0
  train_iter = (prefetch.DevicePrefetch(host_iter, mesh, size=config.data.device_prefetch,
                                        keys=method.batch_keys) if prefetching else host_iter)

  # ---------------------------------------------------------------- model + optimizer
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, total_steps)
  state, state_shardings = method.create_train_state(model, tx, config.model, mesh, config.seed,
                                                     spec.method_spec)

  # ---------------------------------------------------------------- restore / init
  manager = checkpointing.create_manager(
      checkpointing.checkpoint_dir(workdir), keep=config.keep_checkpoints or None,
      keep_every=config.keep_checkpoints_every_steps or None)
  abstract_state = checkpointing.abstract_like(state, state_shardings)
  # The newest checkpoint that restores; damaged newer ones are logged and set aside.
  start_step, restored = checkpointing.restore_latest(manager, abstract_state, train_iter)
  if start_step is not None:
    state = restored
  elif config.init_from.path:
    # Unmasked tuning and fine-tuning start from another run's parameters, with a fresh step count.
    logging.info("Initialising parameters from %s.", config.init_from.path)
    # Only the CLIP model's own parameters: a method's extras (A-CLIP's SSL heads) keep their init,
    # so a CLIP run can seed an A-CLIP run and vice versa.
    # A checkpoint trained at a lower resolution (CLIPA) gets its position embeddings resampled.
    model_keys = set(sharding_lib.abstract_params(model, config.model, mesh))
    params = checkpointing.restore_params_at_resolution(
        config.init_from.path,
        {k: v for k, v in abstract_state.params.items() if k in model_keys}, config.model)
    opt_state = state.opt_state
    if config.init_from.optimizer_state:
      opt_state = checkpointing.restore_subtrees(
          config.init_from.path, {"opt_state": abstract_state.opt_state})["opt_state"]
    state = method.on_params_replaced(state.replace(params={**state.params, **params},
                                                    opt_state=opt_state))
  elif config.init_from.open_clip:
    # open_clip / OpenAI weights (docs/interop.md): converted and checked against config.model on
    # the host, then placed in the sharded layout; other parameters (e.g. SSL heads) keep their init.
    logging.info("Initialising parameters from open_clip checkpoint %s.", config.init_from.open_clip)
    imported = open_clip_interop.load_params(config.init_from.open_clip, config.model)
    placed = open_clip_interop.place_params(
        imported, {key: state_shardings.params[key] for key in imported})
    state = method.on_params_replaced(state.replace(params={**state.params, **placed}))
  start_step = start_step or 0

  # ---------------------------------------------------------------- logging (process 0 writes)
  # Lines and events after the restored step (all of them when no checkpoint survived: a run that
  # died before its first save) belong to a run that is being redone: drop them.
  writer = logging_lib.create_writer(workdir, just_logging=jax.process_index() > 0,
                                     resume_step=start_step)
  if start_step == 0:
    logging.info("Parameters: %s", parameter_summary(state.params))
    if logging.get_verbosity() >= logging.DEBUG:
      logging.debug("Parameters:\n%s", parameter_overview.get_parameter_overview(state.params))
    writer.write_hparams(config.to_dict())
  progress = progress_lib.Progress(total_steps, start_step, enabled=jax.process_index() == 0)

  # ---------------------------------------------------------------- compile the train step
  train_step = method.compile_train_step(model, tx, schedule, spec.step, mesh, state_shardings,
                                         spec.method_spec)
  flops_per_example = method.flops_per_example(config.model, spec.method_spec, spec.masking)

  # ---------------------------------------------------------------- evaluators
  evaluators = eval_builder.build_evaluators(config, model, mesh, tokenizer=spec.tokenizer,
                                             entries=spec.evals)

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
  checkpoint_step = None  # the step of the save in flight (its errors surface at the next step)
  try:
    while step < total_steps:
      t0 = time.perf_counter()
      local_batch = next(train_iter)
      data_wait += time.perf_counter() - t0
      batch = (local_batch if prefetching else
               pipeline.make_global_batch({k: local_batch[k] for k in method.batch_keys}, mesh))
      state, metrics = train_step(state, batch)
      step += 1
      interval_steps += 1
      # Reading the previous step's scalars keeps at most two steps in flight: enough to overlap
      # host and device, and it bounds the queue (XLA:CPU collectives can deadlock on deep ones).
      if previous is not None:
        _check_finite(*previous, state)
      previous = (step, metrics, batch)
      progress.step(step)
      checkpoint_step = checkpointing.raise_if_save_failed(manager, checkpoint_step)

      if step == start_step + 1:  # the first step includes compilation: time from here on
        jax.block_until_ready(metrics)
        interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, scalars, batch, state)
        scalars.update(_skip_metrics(train_iter))
        if interval_steps:
          elapsed = time.perf_counter() - interval_start
          scalars.update(flops.throughput_metrics(
              interval_steps * config.batch_size, elapsed, flops_per_example, jax.device_count(),
              jax.devices()[0].device_kind, accum_steps=config.optim.accum_steps))
          scalars["step_time_s"] = elapsed / interval_steps
          scalars["data_wait_s"] = data_wait / interval_steps
        writer.write_scalars(step, scalars)
        writer.flush()
        progress.log(step, scalars)
        summary.update(scalars)
        interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0

      stop = checkpointing.should_stop(preemption, manager, step)
      if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0) or stop:
        # Never let a non-finite state replace a good checkpoint.
        _check_finite(step, metrics, batch, state)
        checkpointing.save(manager, step, state, train_iter, config)
        checkpoint_step = step
      checkpointing.exit_point(f"step:{step}")  # tests' deterministic kill -9 (a no-op otherwise)
      if stop:
        logging.warning("Preempted at step %d: checkpoint written, exiting.", step)
        summary["preempted_at_step"] = step
        return summary
      summary.update(run_evals(step))

    # -------------------------------------------------------------- final checkpoint + evaluation
    if previous is not None:
      _check_finite(*previous, state)
    if checkpointing.latest_step(manager) != step:
      checkpointing.save(manager, step, state, train_iter, config)
      checkpoint_step = step
    checkpointing.raise_if_save_failed(manager, checkpoint_step, wait=True)
    if step == start_step:  # resumed a finished run: evaluate its final state again
      summary.update(run_evals(step))
    summary["steps"] = step
    return summary
  finally:
    progress.close()
    try:
      manager.wait_until_finished()
      manager.close()
    except Exception:  # pylint: disable=broad-except
      # A failed save was reported (or is being raised) already; closing must not mask it.
      logging.exception("Closing the checkpoint manager failed.")
    writer.close()
    preemption.uninstall()
    if hasattr(train_iter, "close"):
      train_iter.close()


def parameter_summary(params: Any) -> str:
  """'image 2,123,456 · text 3,321,000 · other 97 · total 5,444,553 (21.8 MB)' per tower."""
  counts: dict[str, int] = {}
  nbytes = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    top = getattr(path[0], "key", str(path[0]))
    group = top if top in ("image", "text") else "other"
    counts[group] = counts.get(group, 0) + int(np.prod(leaf.shape))
    nbytes += int(np.prod(leaf.shape)) * leaf.dtype.itemsize
  parts = [f"{name} {counts[name]:,}" for name in ("image", "text", "other") if name in counts]
  return " · ".join(parts) + f" · total {sum(counts.values()):,} ({nbytes / 1e6:.1f} MB)"


def _skip_metrics(train_iter: Any) -> dict[str, float]:
  """`data/skipped/<reason>`: records skipped so far, over all processes (exact on resume)."""
  counts = pipeline.skip_counts(train_iter.get_state())
  values = np.array(list(counts.values()), np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    values = np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)
  return {f"data/skipped/{reason}": float(v) for reason, v in zip(counts, values)}


@jax.jit
def _finite_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per batch entry: whether the step's float inputs are all finite (images as normalised)."""
  def finite(key, x):
    if x.dtype == np.uint8:  # images: check them as the model sees them
      x = normalize_images(x, np.float32)
    return jax.numpy.all(jax.numpy.isfinite(x)) if jax.numpy.issubdtype(
        x.dtype, jax.numpy.inexact) else jax.numpy.array(True)
  return {k: finite(k, v) for k, v in batch.items()}


def nonfinite_origin(batch: dict[str, Any] | None, state: Any) -> str:
  """Where a non-finite step came from: named batch entries, or the parameters/gradients."""
  if batch is not None:
    bad = sorted(k for k, ok in jax.device_get(_finite_inputs(dict(batch))).items() if not ok)
    if bad:
      return (f"it came from the batch: its entries {bad} hold NaN/inf (after normalisation), "
              f"i.e. the data, not the optimisation")
  where = ("the step's inputs are finite, so " if batch is not None else "")
  params = getattr(state, "params", None)
  if params is not None and not all(bool(np.all(np.isfinite(jax.device_get(x))))
                                    for x in jax.tree.leaves(params)):
    return where + "it came from the parameters/gradients (the parameters are now non-finite)"
  return where + "it came from the parameters/gradients (the loss or gradient overflowed)"


def _check_finite(step: int, metrics: dict[str, Any], batch: dict[str, Any] | None = None,
                  state: Any = None) -> None:
  values = {k: float(metrics[k]) for k in ("loss", "grad_norm") if k in metrics}
  if not all(np.isfinite(v) for v in values.values()):
    raise NonFiniteError(
        f"Non-finite training values at step {step}: {values}; {nonfinite_origin(batch, state)}. "
        f"Stopping without saving; the last good checkpoint is intact. Lower optim.lr, raise "
        f"optim.warmup_steps or keep optim.grad_clip_norm > 0 (or, for the batch, check the "
        f"data), then resume from the workdir.")
