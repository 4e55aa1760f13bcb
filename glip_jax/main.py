r"""Entry point: train, evaluate, or both.

  python -m glip_jax.main --config=configs/demo.py --workdir=runs/demo               # train + eval
  python -m glip_jax.main --config=configs/demo.py --workdir=runs/demo --mode=eval   # watch & eval
  python -m glip_jax.main --config=configs/glip_vit_b16.py:data=/data/cc12m/*.array_record \
      --workdir=… --config.masking.ratio=0.75 --config.optim.lr=5e-4

Every config field can be overridden with --config.<field>=<value>. Several processes (one per
host) are joined with `jax.distributed.initialize`: explicitly with --coordinator_address,
--num_processes and --process_id, or automatically under SLURM and on Cloud TPU pod slices.

Usage mistakes (an unknown or invalid flag or config field, a config file that does not load, a
missing data shard) print one line `error: …` and exit with status 2. A run that started and then
stopped for a stated reason (data mostly broken, no restorable checkpoint, a failed save, a
non-finite step) prints one line `error: run stopped: …` saying what is intact, and exits with
status 1. `--verbosity=1` adds the traceback to either.
"""

import difflib
import os
import re
import sys
import time
import traceback
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from glip_jax import errors
from glip_jax import paths

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (optionally 'file.py:arg').",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
MODES = ("train", "eval", "train_and_eval")
_MODE = flags.DEFINE_string("mode", "train_and_eval",
                            "train: no in-loop evaluation; train_and_eval: with config.evals; eval: "
                            "watch the workdir and evaluate every new checkpoint.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "With --mode=eval: evaluate this one "
                                  "checkpoint (a step directory or a workdir) and print a table.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for "
                                   "multi-process jobs outside SLURM/TPU auto-detection.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Directory for JAX's persistent compilation cache, so a restarted "
    "or resumed job skips recompiling (empty: off).")

USAGE_EXIT_CODE = 2
RUN_STOPPED_EXIT_CODE = 1  # a started run stopped for a stated reason (errors.RunStopped)
DURATION_FIELDS = ("total_steps", "total_epochs", "total_examples")


def cluster_detected(environ: dict[str, str]) -> bool:
  """Whether the environment describes a multi-process job jax can set up by itself."""
  return (int(environ.get("SLURM_NTASKS", "1")) > 1  # srun with several tasks
          or "," in environ.get("TPU_WORKER_HOSTNAMES", ""))  # a multi-host TPU slice


def initialize_distributed() -> None:
  """Joins a multi-process job when flags or the environment describe one."""
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif cluster_detected(dict(os.environ)):
    jax.distributed.initialize()


class _QuietLibraries(logging.logging.Filter):  # absl's `logging` exposes the stdlib module
  """Drops INFO lines from Orbax and Grain (dozens per checkpoint) and jax's backend probing.

  jax logs "Unable to initialize backend 'tpu': … Failed to open libtpu.so" at INFO on every CPU or
  GPU host: it is the normal outcome of looking for a TPU, not a problem. Warnings still pass.
  """

  def filter(self, record):
    noisy = ("/orbax/" in record.pathname or "/grain/" in record.pathname
             or record.pathname.endswith("xla_bridge.py"))
    return not noisy or record.levelno >= logging.logging.WARNING


def _wants_traceback(argv: Sequence[str]) -> bool:
  """Whether --verbosity/-v asks for more than INFO (then errors come with their traceback)."""
  for i, arg in enumerate(argv):
    match = re.fullmatch(r"--?(?:verbosity|v)(?:=(-?\d+))?", arg)
    if match:
      value = match.group(1) if match.group(1) is not None else (
          argv[i + 1] if i + 1 < len(argv) else "0")
      try:
        return int(value) >= 1
      except ValueError:
        return False
  return False


def usage_error(message: str, argv: Sequence[str] | None = None) -> None:
  """Prints `error: message` (one line; with the traceback at --verbosity>=1) and exits 2."""
  if _wants_traceback(sys.argv if argv is None else argv) and sys.exc_info()[0] is not None:
    traceback.print_exc()
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(USAGE_EXIT_CODE)


def _chain(e: BaseException) -> list[BaseException]:
  """`e` and the errors it was raised from or during, outermost first."""
  chain = [e]
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
    chain.append(e)
  return chain


def stopped_by(e: BaseException) -> errors.RunStopped | None:
  """The RunStopped error `e` is or wraps (Grain re-raises its threads' errors), else None."""
  return next((x for x in _chain(e) if isinstance(x, errors.RunStopped)), None)


def run_stopped(e: errors.RunStopped, argv: Sequence[str] | None = None) -> None:
  """Prints `error: run stopped: <Type>: <message>` (its message says what is intact), exits 1."""
  if _wants_traceback(sys.argv if argv is None else argv):
    traceback.print_exc()
  print(f"error: run stopped: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
  sys.exit(RUN_STOPPED_EXIT_CODE)


def _innermost(e: BaseException) -> BaseException:
  return _chain(e)[-1]


def describe_flag_error(e: BaseException, argv: Sequence[str]) -> str:
  """One line saying what is wrong with the command line (`e` raised while parsing `argv`)."""
  config_args = [a for a in argv if a.startswith("--config=") or a == "--config"]
  if isinstance(e, KeyError):  # ml_collections: an override names a field that does not exist
    text = str(e.args[0]) if e.args else str(e)
    field = text.split("\n")[0].strip("'\"")
    override = next((a.split("=")[0] for a in argv
                     if a.startswith("--config.") and field in a.split("=")[0].split(".")), None)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    where = f"{override}: " if override else ""
    suggestion = f"; did you mean {hint.group(1)}?" if hint else ""
    return f"{where}unknown config field {field}{suggestion}"
  inner = _innermost(e)
  message = str(inner).strip().splitlines()[-1] if str(inner).strip() else type(inner).__name__
  if isinstance(e, (OSError, ImportError)) or "Failed loading config file" in str(e):
    config = config_args[0] if config_args else "--config"
    return f"{config}: the config file could not be loaded: {message}"
  if isinstance(e, flags.Error):
    return str(e).strip().splitlines()[0]
  return f"{config_args[0] + ': ' if config_args else ''}{type(inner).__name__}: {message}"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing that turns every parse failure into one usage line and exit status 2."""
  try:
    return flags.FLAGS(list(argv))
  except Exception as e:  # pylint: disable=broad-except
    usage_error(describe_flag_error(e, argv), argv)
    raise  # unreachable: usage_error exits


def explicit_duration_fields(argv: Sequence[str]) -> list[str]:
  """Which of total_steps / total_epochs / total_examples the command line sets explicitly."""
  given = []
  for field in DURATION_FIELDS:
    if any(a == f"--config.{field}" or a.startswith(f"--config.{field}=") for a in argv):
      given.append(field)
  return given


def apply_duration_precedence(config, explicit: Sequence[str]) -> None:
  """A run length given on the command line wins over the recipe's; two of them are an error."""
  if len(explicit) > 1:
    raise errors.ConfigError(
        f"--config.{explicit[0]} and --config.{explicit[1]} both set the run length; give one.")
  if explicit:
    with config.unlocked():
      for field in DURATION_FIELDS:
        if field != explicit[0] and field != "total_steps":
          config[field] = None


def closest(name: str, allowed: Sequence[str]) -> str:
  """'; did you mean X?' for the closest allowed value, or ''."""
  match = difflib.get_close_matches(name, allowed, n=1)
  return f"; did you mean {match[0]}?" if match else ""


def main(argv):
  if len(argv) > 1:
    usage_error(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
  try:
    config = _CONFIG.value  # ml_collections loads the file lazily: its errors surface on use
    if config is not None:
      config.keys()
  except Exception as e:  # pylint: disable=broad-except
    usage_error(describe_flag_error(e, sys.argv))
  if config is None:
    usage_error("--config is required (e.g. --config=configs/demo.py).")
  if not _WORKDIR.value:
    usage_error("--workdir is required (where checkpoints, metrics and logs go).")
  if _MODE.value not in MODES:
    usage_error(f"--mode={_MODE.value!r} is not a mode; allowed: {list(MODES)}"
                f"{closest(_MODE.value, MODES)}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  jax.config.update("jax_threefry_partitionable", True)  # shard-local random draws
  initialize_distributed()
  if _COMPILATION_CACHE.value:
    from glip_jax import aot  # pylint: disable=g-import-not-at-top
    aot.enable_compilation_cache(paths.resolve(_COMPILATION_CACHE.value))
  workdir = paths.resolve(_WORKDIR.value)
  checkpoint = paths.resolve(_CHECKPOINT.value) if _CHECKPOINT.value else None
  # Imported after jax.distributed.initialize, which must precede any computation.
  from glip_jax import report  # pylint: disable=g-import-not-at-top
  from glip_jax import train  # pylint: disable=g-import-not-at-top
  from glip_jax.evaluation import watcher  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  try:
    apply_duration_precedence(config, explicit_duration_fields(sys.argv))
    if _MODE.value == "eval":
      watcher.run_watcher(config, workdir, checkpoint=checkpoint)
      return
    if _MODE.value == "train":
      with config.unlocked():
        config.evals = {}
    summary = train.train_and_evaluate(config, workdir)
  except errors.ConfigError as e:
    usage_error(str(e))
  except Exception as e:  # pylint: disable=broad-except
    stopped = stopped_by(e)
    if stopped is None:
      raise
    run_stopped(stopped)
  if jax.process_index() == 0:
    print(report.format_run_summary(summary, config, workdir,
                                    wall_seconds=time.perf_counter() - start))
  logging.info("Done.")


def run() -> None:
  """`python -m glip_jax.main`: absl's app.run with one-line usage errors."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
