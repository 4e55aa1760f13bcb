"""The `--mode=eval` job: evaluate every new complete checkpoint of a training run, once.

  python -m glip_jax.main --config=CONFIG --workdir=WORKDIR --mode=eval
  python -m glip_jax.main --config=CONFIG --workdir=WORKDIR --mode=eval --checkpoint=PATH

Watching: polls `WORKDIR/checkpoints`, restores only the parameters of each complete checkpoint
not yet evaluated (oldest first) onto this job's own mesh, runs every evaluator of `config.evals`
and writes `eval/<name>/<metric>` at the checkpoint's step to TensorBoard and
`WORKDIR/eval/metrics.jsonl`. The steps done are recorded in `WORKDIR/eval/evaluated.json`
(rewritten atomically after each checkpoint's metrics are flushed), so a restarted watcher
evaluates nothing twice. Partial saves (`N.orbax-checkpoint-tmp-*`) are never listed; a checkpoint
deleted by keep-N retention before it could be read is skipped; one that exists but does not
restore (a truncated or deleted file inside it) is logged, skipped and listed with its error in
`WORKDIR/eval/damaged.json`. The job exits once the final
training step's checkpoint is evaluated, or after `timeout_seconds`.

`--checkpoint=PATH` (a step directory, a checkpoint directory or a workdir: its latest) evaluates
that one checkpoint, prints a table and writes nothing.
"""
import copy
import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from glip_jax import checkpointing
from glip_jax import logging as logging_lib
from glip_jax import paths
from glip_jax import report
from glip_jax import sharding as sharding_lib
from glip_jax import storage
from glip_jax import train
from glip_jax.evaluation import builder
from glip_jax.models import clip as clip_lib

EVAL_SUBDIR = "eval"
RECORD_FILENAME = "evaluated.json"

# Indirection so tests can act between polls (write or delete checkpoints) without threads.
_sleep = time.sleep


def eval_dir(workdir: str | os.PathLike[str]) -> epath.Path:
  """Where the watcher writes: `workdir/eval` (metrics.jsonl, event files, evaluated.json)."""
  return epath.Path(workdir) / EVAL_SUBDIR


def final_step(config: ml_collections.ConfigDict) -> int:
  """The last training step (the trainer's resolution of total_steps/epochs/examples)."""
  return train.resolve_total_steps(config)


def eval_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """config.mesh if it fits this job's devices, else all devices on the data axis."""
  try:
    return sharding_lib.create_mesh(config.mesh)
  except ValueError as e:
    # The eval job often runs on fewer devices than training; parameters restore onto any mesh.
    logging.info("config.mesh does not fit this job's %d devices (%s); evaluating data-parallel.",
                 jax.device_count(), e)
    return sharding_lib.create_mesh({"data": -1})


def read_record(workdir: str | os.PathLike[str]) -> set[int]:
  """Steps already evaluated (empty if the watcher never ran)."""
  path = eval_dir(workdir) / RECORD_FILENAME
  if not path.exists():
    return set()
  return set(json.loads(path.read_text())["steps"])


def _write_record(workdir: str | os.PathLike[str], steps: set[int]) -> None:
  # Temporary file + rename locally, one whole-object write on gs:// / s3://: a kill leaves the
  # old record, and the step is then evaluated again, its metrics line repeated
  # (read_metrics_jsonl merges repeated steps).
  storage.write_text_atomic(eval_dir(workdir) / RECORD_FILENAME,
                            json.dumps({"steps": sorted(steps)}))


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
  """'field: a != b' for every leaf where two nested dicts differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b))
            for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
  # JSON turns tuples into lists; compare them alike.
  norm = lambda x: list(x) if isinstance(x, (list, tuple)) else x  # noqa: E731
  return [] if norm(a) == norm(b) else [f"{prefix[:-1]}: {b!r} != {a!r}"]


class ModelMismatchError(ValueError):
  """A checkpoint of another model than config.model (a user error, not a damaged checkpoint)."""


DAMAGED_FILENAME = "damaged.json"


def _record_damaged(workdir: str | os.PathLike[str], damaged: dict[int, str]) -> None:
  """Writes {step: error} of the checkpoints this watcher found damaged (for humans only)."""
  (eval_dir(workdir) / DAMAGED_FILENAME).write_text(
      json.dumps({str(k): v for k, v in sorted(damaged.items())}, indent=1))


def restore_params(step_dir: epath.Path, target: Any,
                   config: ml_collections.ConfigDict) -> Any:
  """Parameters of one checkpoint; a shape mismatch names the model fields that differ."""
  try:
    return checkpointing.restore_params_from(step_dir, target)
  except ValueError as e:
    saved = checkpointing.load_config(step_dir).get("model", {})
    diff = _differences(config.model.to_dict(), saved, "model.")
    if not diff:
      raise
    raise ModelMismatchError(f"{os.fspath(step_dir)} was written by a different model than config.model "
                     f"describes (checkpoint != given): {'; '.join(diff)}. Evaluate with the "
                     f"config the run was trained with.") from e


def summary_table(config: ml_collections.ConfigDict, results: dict[str, float], title: str) -> str:
  """The evaluation part of the run summary (grouped, ordered, chance levels) under `title`."""
  return "\n".join([f"\nEvaluation: {title}", "-" * 72,
                    *report.format_eval_groups(results, report.describe_evals(config))])


def run_watcher(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *,
                checkpoint: str | None = None, poll_seconds: float = 10,
                timeout_seconds: float | None = None) -> dict:
  """Watches `workdir` (returns {step: metrics}) or evaluates one `checkpoint` (returns metrics)."""
  workdir = paths.resolve(workdir)
  checkpoint = paths.resolve(checkpoint) if checkpoint else checkpoint
  config = copy.deepcopy(config)
  paths.resolve_config_paths(config, builder.CLASSNAME_CHOICES + builder.TEMPLATE_CHOICES)
  entries = builder.validate_evals(config)
  if not config.get("evals"):
    raise ValueError("config.evals is empty: nothing to evaluate (see docs/evaluation.md).")
  mesh = eval_mesh(config)
  model = clip_lib.build_model(config.model)
  evaluators = builder.build_evaluators(config, model, mesh, entries=entries)
  target = sharding_lib.abstract_params(model, config.model, mesh)

  if checkpoint is not None:
    step_dir, step = checkpointing.resolve_step_dir(checkpoint)
    params = restore_params(step_dir, target, config)
    results = builder.run_evaluators(evaluators, params)
    print(summary_table(config, results, f"{os.fspath(step_dir)} (step {step})"))
    return results

  storage.check_access(workdir)
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  out_dir = eval_dir(workdir)
  out_dir.mkdir(parents=True, exist_ok=True)
  done = read_record(workdir)
  last = final_step(config)
  writer = logging_lib.create_writer(os.fspath(out_dir), just_logging=jax.process_index() > 0)
  deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
  evaluated: dict[int, dict[str, float]] = {}
  # Damaged checkpoints are skipped for the life of this job (a restarted watcher tries them again,
  # e.g. once the trainer has rewritten the step); the final step damaged ends the watch.
  damaged: dict[int, str] = {}
  try:
    while last not in done and last not in damaged:
      for step in checkpointing.all_steps(ckpt_dir):
        if step in done:
          continue
        step_dir = ckpt_dir / str(step)
        if step in damaged:
          continue
        try:
          params = restore_params(step_dir, target, config)
        except ModelMismatchError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          # Orbax raises various errors for files vanishing mid-read or truncated.
          if not step_dir.exists():
            logging.warning("Checkpoint %d was deleted before it could be evaluated; skipped.",
                            step)
            continue
          damaged[step] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
          logging.error("Checkpoint %d is damaged (%s); skipped, recorded in %s.", step,
                        damaged[step], eval_dir(workdir) / DAMAGED_FILENAME)
          if jax.process_index() == 0:
            _record_damaged(workdir, damaged)
          continue
        results = builder.run_evaluators(evaluators, params)
        writer.write_scalars(step, results)
        writer.flush()
        done.add(step)
        if jax.process_index() == 0:
          _write_record(workdir, done)
        evaluated[step] = results
        logging.info("Evaluated checkpoint %d: %s", step, results)
      if last in done or last in damaged:
        break
      if deadline is not None and time.monotonic() >= deadline:
        logging.warning("Timed out after %ss before the final step %d was evaluated.",
                        timeout_seconds, last)
        break
      _sleep(poll_seconds if deadline is None
             else max(0.0, min(poll_seconds, deadline - time.monotonic())))
  finally:
    writer.close()
  if evaluated and jax.process_index() == 0:
    step = max(evaluated)
    print(summary_table(config, evaluated[step], f"{os.fspath(workdir)} (step {step}, the last "
                        f"of {len(evaluated)} checkpoints evaluated)"))
    print(f"metrics: {os.fspath(out_dir / logging_lib.METRICS_FILENAME)}\n"
          f"curves:  {report.tensorboard_command(out_dir)}   (pip install tensorboard)")
  return evaluated
