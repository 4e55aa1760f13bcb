r"""Entry point: train, evaluate, or both.

  python -m glip_jax.main --config=configs/demo.py --workdir=runs/demo               # train + eval
  python -m glip_jax.main --config=configs/demo.py --workdir=runs/demo --mode=eval   # watch & eval
  python -m glip_jax.main --config=configs/glip_vit_b16.py:data=/data/cc12m --workdir=… \
      --config.masking.ratio=0.75 --config.optim.lr=5e-4

Every config field can be overridden with --config.<field>=<value>. Several processes (one per
host) are joined with `jax.distributed.initialize`: explicitly with --coordinator_address,
--num_processes and --process_id, or automatically under SLURM and on Cloud TPU pod slices.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (optionally 'file.py:arg').",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"],
                          "train: no in-loop evaluation; train_and_eval: with config.evals; eval: "
                          "watch the workdir and evaluate every new checkpoint.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "With --mode=eval: evaluate this one "
                                  "checkpoint (a step directory or a workdir) and print a table.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for "
                                   "multi-process jobs outside SLURM/TPU auto-detection.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")

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
  """Drops INFO lines from Orbax and Grain (dozens per checkpoint); warnings still pass."""

  def filter(self, record):
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return not noisy or record.levelno >= logging.logging.WARNING


def print_table(title: str, results: dict[str, float]) -> None:
  """Prints `results` as an aligned two-column table (the end of `make demo`)."""
  width = max([len(k) for k in results] + [10])
  print(f"\n{title}\n" + "-" * (width + 14))
  for key, value in results.items():
    text = f"{value:.4f}" if isinstance(value, float) and not float(value).is_integer() else f"{value:g}"
    print(f"{key:<{width}}  {text:>12}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required.")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  jax.config.update("jax_threefry_partitionable", True)  # shard-local random draws
  initialize_distributed()
  config = _CONFIG.value
  # Imported after jax.distributed.initialize, which must precede any computation.
  from glip_jax import train  # pylint: disable=g-import-not-at-top
  from glip_jax.evaluation import watcher  # pylint: disable=g-import-not-at-top

  if _MODE.value == "eval":
    watcher.run_watcher(config, _WORKDIR.value, checkpoint=_CHECKPOINT.value)
    return
  if _MODE.value == "train":
    with config.unlocked():
      config.evals = {}
  summary = train.train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() == 0:
    keys = ["steps", "preempted_at_step", "loss", "examples_per_s", "examples_per_s_per_device",
            "mfu"] + sorted(k for k in summary if k.startswith("eval/"))
    print_table(f"Run summary ({_WORKDIR.value})", {k: summary[k] for k in keys if k in summary})
  logging.info("Done.")


if __name__ == "__main__":
  app.run(main)
