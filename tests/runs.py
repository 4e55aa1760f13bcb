"""Helpers for end-to-end tests: configs/demo.py shrunk by overrides, run in or out of process."""

import os
import subprocess
import sys
import textwrap

from configs import demo
from glip_jax import logging as logging_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 40
# configs/demo.py shrunk to a 0.2M-parameter model that takes ~0.1 s per step here.
OVERRIDES = {
    "model.image.variant": "mu/8", "model.embed_dim": 64, "model.text.width": 64,
    "model.text.heads": 2, "model.text.depth": 2, "data.synthetic.image_size": 32,
    "data.read_threads": 1, "batch_size": 16, "total_steps": TOTAL_STEPS, "log_every_steps": 1,
    "checkpoint_every_steps": 10, "optim.warmup_steps": 5,
}


def apply_overrides(config, overrides: dict, sep: str = "."):
  """`config` with dotted-path overrides set in place (`{"model.dtype": "bfloat16"}`)."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(sep)
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_config(arg: str = "", config=None):
  """The demo config (or `config`) with OVERRIDES applied and no evaluators (what `command` runs)."""
  config = apply_overrides(demo.get_config(arg) if config is None else config, OVERRIDES)
  config.evals = {}
  return config


def command(workdir: str, *extra: str, devices: int = 8, arg: str = ""):
  """argv and environment of `python -m glip_jax.main` on the tiny config (--mode=train)."""
  config = "configs/demo.py" + (f":{arg}" if arg else "")
  args = [sys.executable, "-m", "glip_jax.main", f"--config={config}", f"--workdir={workdir}",
          "--mode=train", *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), *extra]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return args, env


def run_command(workdir: str, *extra: str, devices: int = 8, timeout: int = 400):
  """Runs `command` to completion; stdout and stderr together in .stdout."""
  args, env = command(workdir, *extra, devices=devices)
  return subprocess.run(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=timeout)


def read_losses(workdir: str) -> dict[int, float]:
  """{step: loss} from a run's metrics.jsonl."""
  path = os.path.join(workdir, logging_lib.METRICS_FILENAME)
  if not os.path.exists(path):
    return {}
  return {r["step"]: r["loss"] for r in logging_lib.read_metrics_jsonl(path) if "loss" in r}


# The prelude of a `python -c` script in which TF looks installed but every `import tensorflow`
# (or submodule) raises ImportError and is recorded in `attempts`, whether TF is installed here or
# not: the trainer, the TensorBoard writer and the TFDS source must neither need TF nor try it (a
# guarded `try: import tensorflow` would load all of TF wherever it is installed).
# tensorflow_datasets itself is allowed; it reads array_record files.
NO_TENSORFLOW = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, sys
    attempts = []

    class Blocked(importlib.abc.Loader):
      def create_module(self, spec):
        attempts.append(spec.name)
        raise ImportError(f"{spec.name} is blocked in this test")

      def exec_module(self, module):  # never reached; a Loader without it fails silently
        pass

    class NoTensorflow(importlib.abc.MetaPathFinder):
      # Found (a probe like importlib.util.find_spec sees TF as installed), but not importable.
      def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
          return importlib.machinery.ModuleSpec(name, Blocked())
        return None

    sys.meta_path.insert(0, NoTensorflow())
""")
