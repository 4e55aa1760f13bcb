"""Checkpoints: Orbax CheckpointManager over train state, data iterator, config.

A checkpoint step directory holds three items:
  state/   the train state pytree (jax Arrays; StandardSave/StandardRestore),
  data/    the Grain DatasetIterator position, one file per process,
  config/  the config as JSON (for humans, the watcher and tuning jobs).

Saving is asynchronous: `save` returns once the arrays are copied to host, and
Orbax writes into a temporary directory that is renamed (or, on object stores,
marked with commit_success.txt) when complete, so a job killed mid-save leaves
no directory that `latest_step`/`all_steps` would report. Restoring state and
iterator together resumes exactly: the next batches and the next step are those
an uninterrupted run would have seen. See docs/checkpointing.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from glip_jax import errors

PyTree = Any

STATE, DATA, CONFIG = "state", "data", "config"


# Deterministic crash points for tests (tests/test_faults.py, tests/test_train.py): the process
# SIGKILLs itself where `$GLIP_JAX_TEST_EXIT_AT` says, instead of tests racing a kill against a
# background save. "step:<n>": after step n (its metrics logged, its checkpoint, if any,
# dispatched); "save:<n>:<moment>", moments of the async save of step n in order:
#   before      in `save`, before Orbax is called: nothing of step n exists;
#   dispatched  `manager.save` returned: arrays on the host, files being written;
#   written     every file written and finalized, the temporary directory not yet renamed;
#   committed   the save finished and was checked (`raise_if_save_failed`): step n is complete.
TEST_EXIT_ENV = "GLIP_JAX_TEST_EXIT_AT"
_saving_step: list[int] = []  # the step of the save in flight, for the `written` moment


def exit_point(point: str) -> None:
  """SIGKILLs this process if $GLIP_JAX_TEST_EXIT_AT names `point` (a no-op otherwise)."""
  if os.environ.get(TEST_EXIT_ENV) == point:
    logging.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _written_callback() -> None:
  if _saving_step:
    exit_point(f"save:{_saving_step[-1]}:written")


def checkpoint_dir(workdir: str | os.PathLike[str]) -> epath.Path:
  """Where a job keeps its checkpoints: `workdir/checkpoints`."""
  return epath.Path(workdir) / "checkpoints"


def create_manager(directory: str | os.PathLike[str], *, keep: int | None,
                   keep_every: int | None = None) -> ocp.CheckpointManager:
  """Async manager keeping the last `keep` checkpoints plus every `keep_every`-th step.

  It saves whenever `save` is called: the trainer decides when (every checkpoint_every_steps, at
  the end and on preemption), so Orbax's own interval policy stays at its default of every step.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      # Steps that are multiples of keep_period are never deleted.
      keep_period=keep_every,
      enable_async_checkpointing=True,
      # Leftovers of a save killed before it committed; never read either way.
      cleanup_tmp_directories=True,
      async_options=(ocp.AsyncOptions(post_finalization_callback=_written_callback)
                     if os.environ.get(TEST_EXIT_ENV) else None),
  )
  # Explicit handlers, so a manager that has not saved yet (a resumed job or a
  # read-only one) can restore any item without being told the args first.
  return ocp.CheckpointManager(
      epath.Path(directory),
      options=options,
      item_handlers={
          STATE: ocp.StandardCheckpointHandler(),
          DATA: grain.checkpoint.CheckpointHandler(),
          CONFIG: ocp.JsonCheckpointHandler(),
      },
  )


def _config_to_json(config: Any) -> dict[str, Any]:
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    config = config.to_dict()
  # Round trip through text: values JSON cannot hold (dtypes, callables) become
  # strings here rather than failing later in the background save thread.
  return json.loads(json.dumps(config, default=str))


def save(manager: ocp.CheckpointManager, step: int, state: PyTree,
         data_iterator: grain.DatasetIterator | None, config: Any) -> bool:
  """Saves asynchronously (returns once arrays are on the host); True if a save started."""
  check_writable(manager.directory, step)
  items = {
      STATE: ocp.args.StandardSave(state),
      CONFIG: ocp.args.JsonSave(_config_to_json(config)),
  }
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
  exit_point(f"save:{step}:before")
  _saving_step[:] = [step]
  started = manager.save(step, args=ocp.args.Composite(**items), force=True)
  exit_point(f"save:{step}:dispatched")
  return started


class CheckpointSaveError(errors.RunStopped, RuntimeError):
  """A checkpoint save failed; training stops rather than run on unsaved."""


def _intact(directory: epath.Path) -> str:
  complete = all_steps(directory)
  if complete:
    return (f"the last complete checkpoint, step {complete[-1]}, is intact in {directory} and a "
            f"restart resumes from it")
  return f"no complete checkpoint exists in {directory}; a restart starts over"


def check_writable(directory: str | os.PathLike[str], step: int | None = None) -> None:
  """Writes and deletes a marker file in `directory`; CheckpointSaveError if that fails.

  Orbax creates step directories in a background thread and, when that fails, blocks the next
  call for minutes before reporting a timeout. One small synchronous write before each save
  turns an unwritable (or vanished, or full) checkpoint directory into an immediate, clear error.
  """
  directory = epath.Path(directory)
  marker = directory / f".write_check.{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text("ok")
    marker.unlink()
  except OSError as e:
    what = "the run cannot start" if step is None else (
        f"saving the checkpoint of step {step} failed. Training stopped; {_intact(directory)}")
    raise CheckpointSaveError(f"The checkpoint directory {directory} is not writable "
                              f"({type(e).__name__}: {e}): {what}.") from e


def raise_if_save_failed(manager: ocp.CheckpointManager, step: int | None, *,
                         wait: bool = False) -> int | None:
  """Surfaces the error of the save of `step` once it has finished; None when it succeeded.

  Orbax writes in background threads, and a failure there (an unwritable directory, a full disk)
  would otherwise only show at the next save, with every step since lost. Called after each
  step, this stops the run one step after the failure; `wait` blocks until the save is done.
  Returns `step` while the save is still in flight.
  """
  if step is None or (not wait and manager.is_saving_in_progress()):
    return step
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointSaveError(f"Saving the checkpoint of step {step} failed: "
                              f"{type(e).__name__}: {e}. Training stopped; "
                              f"{_intact(epath.Path(manager.directory))}.") from e
  exit_point(f"save:{step}:committed")
  return None


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  """Latest complete checkpoint step, or None."""
  return manager.latest_step()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree,
            data_iterator: grain.DatasetIterator | None = None) -> PyTree:
  """Restores state onto `abstract_state`'s shardings; the iterator in place."""
  # abstract_state leaves are jax.ShapeDtypeStruct(shape, dtype, sharding=...):
  # arrays are read straight into those shardings, whatever mesh saved them.
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE]


class CheckpointRestoreError(errors.RunStopped, RuntimeError):
  """No checkpoint of a workdir that has some could be restored; nothing was changed."""


DAMAGED_SUFFIX = ".damaged"


def set_aside(directory: str | os.PathLike[str], step: int) -> epath.Path:
  """Renames step dir `step` to `<step>.damaged[.k]`: kept for a post-mortem, never listed again.

  Orbax lists only digit names, so the trainer's next save of `step` starts afresh and neither
  keep-N retention nor the watcher touch the damaged copy.
  """
  src = epath.Path(directory) / str(step)
  dst = src.parent / f"{step}{DAMAGED_SUFFIX}"
  k = 0
  while dst.exists():
    k += 1
    dst = src.parent / f"{step}{DAMAGED_SUFFIX}.{k}"
  src.rename(dst)
  return dst


def restore_latest(manager: ocp.CheckpointManager, abstract_state: PyTree,
                   data_iterator: grain.DatasetIterator | None = None
                   ) -> tuple[int | None, PyTree | None]:
  """(step, state) of the newest checkpoint that restores; (None, None) when there is none.

  A checkpoint that fails to restore (a truncated or deleted file in its step directory, which
  Orbax reports as a read or decode error) is logged and the next older one is tried; once one
  restores, the newer failed ones were damaged and are set aside (`set_aside`). When none
  restores (a damaged run, or a config that no longer matches the checkpoints) nothing is renamed
  and CheckpointRestoreError lists each step's error: a restart fails the same clear way, it never
  trains from wrong or fresh parameters.
  """
  directory = epath.Path(manager.directory)
  failed: list[tuple[int, str]] = []
  for step in reversed(all_steps(directory)):
    try:
      state = restore(manager, step, abstract_state, data_iterator)
    except Exception as e:  # pylint: disable=broad-except
      # tensorstore, Orbax and json raise many types for missing or truncated files.
      reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      logging.error("Checkpoint %s/%d cannot be restored (%s); trying the next older one.",
                    directory, step, reason)
      failed.append((step, reason))
      continue
    if failed:
      if jax.process_index() == 0:
        for bad, _ in failed:
          logging.warning("Damaged checkpoint %d moved to %s.", bad, set_aside(directory, bad))
      manager.reload()
      logging.warning("Resumed from step %d, the newest complete checkpoint that restores; the "
                      "steps after it are trained again.", step)
    else:
      logging.info("Resuming from %s/%d.", directory, step)
    return step, state
  if failed:
    raise CheckpointRestoreError(
        f"No checkpoint in {directory} can be restored: "
        + "; ".join(f"step {s}: {r}" for s, r in failed)
        + ". If the config changed since they were written, use the original one; if they are "
        "damaged, move them aside (the run then starts over) or train with "
        "--config.init_from.path=<an intact copy>.")
  return None, None


def abstract_like(tree: PyTree, shardings: PyTree | None = None) -> PyTree:
  """ShapeDtypeStructs of `tree` with `shardings` (default: the arrays' own)."""
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def is_complete(step_dir: str | os.PathLike[str]) -> bool:
  """Whether a step directory is a committed (finalized) checkpoint."""
  path = epath.Path(step_dir)
  return (path.name.isdigit() and path.is_dir()
          and ocp.step.is_path_finalized(path))


def all_steps(directory: str | os.PathLike[str]) -> list[int]:
  """Sorted complete checkpoint steps; read-only, safe from another process."""
  path = epath.Path(directory)
  if not path.exists():
    return []
  steps = []
  for step_dir in path.iterdir():
    try:
      if is_complete(step_dir):
        steps.append(int(step_dir.name))
    except (FileNotFoundError, OSError):  # Deleted by retention meanwhile.
      continue
  return sorted(steps)


def resolve_step_dir(path: str | os.PathLike[str],
                     step: int | None = None) -> tuple[epath.Path, int | None]:
  """(step directory, step) of a step dir, or of a checkpoint dir / workdir (latest or `step`)."""
  path = epath.Path(path)
  if step is None and is_complete(path):
    return path, int(path.name)
  if (path / STATE).exists():
    if not ocp.step.is_path_finalized(path):
      raise FileNotFoundError(f"{os.fspath(path)} is a checkpoint save that never finished "
                              f"(killed mid-write): give a complete step directory, or the workdir.")
    if step is None:
      return path, None  # a step directory under another name (e.g. a copied checkpoint)
  for directory in (path, checkpoint_dir(path)):
    steps = all_steps(directory)
    if steps:
      chosen = steps[-1] if step is None else step
      if chosen not in steps:
        raise FileNotFoundError(
            f"No complete checkpoint for step {chosen} in {directory}; "
            f"have {steps}.")
      return directory / str(chosen), chosen
  raise FileNotFoundError(f"{os.fspath(path)}: no complete checkpoint there (give a step "
                          f"directory, a checkpoint directory or a workdir).")


def restore_subtrees(path: str | os.PathLike[str],
                     abstract_subtrees: Mapping[str, PyTree],
                     step: int | None = None) -> dict[str, PyTree]:
  """Restores only the named top-level subtrees of a checkpoint's state."""
  step_dir, _ = resolve_step_dir(path, step)
  target = dict(abstract_subtrees)
  # partial_restore reads only the leaves present in `target`; the rest of the
  # saved state (e.g. a large optimizer state) is never loaded. Top-level keys
  # match dict keys or dataclass/struct field names of the saved state.
  args = ocp.args.PyTreeRestore(
      item=target,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True,
  )
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(step_dir / STATE, args=args)


def restore_params_from(path: str | os.PathLike[str], abstract_params: PyTree,
                        step: int | None = None, *, key: str = "params") -> PyTree:
  """Restores `state[key]` (the params) from a step dir, checkpoint dir or workdir."""
  return restore_subtrees(path, {key: abstract_params}, step)[key]


def load_config(path: str | os.PathLike[str], step: int | None = None) -> dict[str, Any]:
  """The config dict saved with a checkpoint (step dir, checkpoint dir or workdir)."""
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    return checkpointer.restore(resolve_step_dir(path, step)[0] / CONFIG,
                                args=ocp.args.JsonRestore())


@dataclasses.dataclass
class PreemptionFlag:
  """Set by SIGTERM; the trainer saves and exits cleanly when it is set."""
  requested: bool = False
  _previous_handler: Any = None
  _installed: bool = False

  def uninstall(self) -> None:
    """Puts back the SIGTERM handler that was there before."""
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._installed = False


def install_sigterm_handler() -> PreemptionFlag:
  """Single process: a SIGTERM handler setting the returned flag (call after jax.distributed.initialize)."""
  flag = PreemptionFlag()
  if jax.process_count() > 1:
    # Processes would see SIGTERM at different steps and save different steps.
    # JAX's preemption service (started by jax.distributed.initialize) owns
    # SIGTERM and agrees on one step for all: see `should_stop`.
    logging.info("Multi-process job: SIGTERM left to JAX's preemption service.")
    return flag

  def handler(signum, frame):
    del frame
    # Only set a flag: the step in flight finishes, then the loop saves.
    logging.warning("Received signal %d: will save and stop.", signum)
    flag.requested = True

  flag._previous_handler = signal.signal(signal.SIGTERM, handler)  # pylint: disable=protected-access
  flag._installed = True  # pylint: disable=protected-access
  return flag


def should_stop(flag: PreemptionFlag, manager: ocp.CheckpointManager,
                step: int) -> bool:
  """Whether to save at `step` and exit: local SIGTERM or a JAX preemption sync point."""
  return flag.requested or manager.reached_preemption(step)


def restore_params_at_resolution(path: str | os.PathLike[str], abstract_params: PyTree,
                                 model_config: Any) -> PyTree:
  """Parameters of another run's checkpoint for `model_config`, whose image size may differ.

  CLIPA / RECLIP train at a low resolution and tune or evaluate at full size: the checkpoint's
  learned image position embeddings are then resampled to the new patch grid (bicubic, [CLS]
  kept; glip_jax/models/posemb.py). Every other parameter must match exactly.
  """
  # pylint: disable=g-import-not-at-top
  import ml_collections
  import numpy as np
  from glip_jax import sharding as sharding_lib
  from glip_jax.models import clip as clip_lib
  from glip_jax.models import posemb
  # pylint: enable=g-import-not-at-top
  saved = ml_collections.ConfigDict(load_config(path).get("model", {}))
  if (not saved or clip_lib.image_size_hw(saved.image_size)
      == clip_lib.image_size_hw(model_config.image_size)):
    return restore_subtrees(path, {"params": abstract_params})["params"]
  mesh = sharding_lib.create_mesh({"data": 1}, devices=jax.devices()[:1])
  host = sharding_lib.abstract_params(clip_lib.build_model(saved), saved, mesh)
  host = {k: v for k, v in host.items() if k in abstract_params}
  params = jax.device_get(restore_subtrees(path, {"params": host})["params"])
  image = dict(params["image"])
  if "positional_embedding" in image:
    image["positional_embedding"] = posemb.resize_image_posemb(
        image["positional_embedding"], clip_lib.grid(saved), clip_lib.grid(model_config))
  params = {**params, "image": image}
  logging.info("Resampled the image position embeddings from a %s to a %s patch grid.",
               clip_lib.grid(saved), clip_lib.grid(model_config))
  return jax.tree.map(lambda x, target: jax.device_put(np.asarray(x, target.dtype),
                                                       target.sharding),
                      params, abstract_params)
