r"""Benchmarks: step time vs. mask ratio (`--mode=train`), A-CLIP vs CLIP (`--mode=aclip`), input
pipeline (`--mode=data`).

Train mode compiles the real train step of a config (model, optimizer, sharding, masking) and times
it on a device-resident random batch: warm-up steps first, then the median of `--steps` timed steps,
each ended by `block_until_ready`. Speedups are relative to ratio 0; the analytic one comes from
the SPEC §7 FLOP model of both towers (glip_jax.flops), so `speedup_measured / speedup_analytic`
says how much of the FLOP saving the hardware turns into time.

  python tools/benchmark.py --config=configs/demo.py
  python tools/benchmark.py --config=configs/glip_vit_b16.py --config.batch_size=256 --json
  python tools/benchmark.py --config=configs/demo.py:aclip --mode=aclip
  python tools/benchmark.py --mode=data

With `--json` the last line printed is a JSON list of rows.
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from glip_jax import flops
from glip_jax import methods
from glip_jax import run_spec
from glip_jax import sharding as sharding_lib
from glip_jax import train_step as train_step_lib
from glip_jax.models import clip as clip_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file to benchmark.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "aclip", "data"],
                          "train: step time vs mask ratio; aclip: A-CLIP vs CLIP step time; "
                          "data: input pipeline examples/s.")
_RATIOS = flags.DEFINE_list("ratios", ["0", "0.5", "0.75", "0.9"], "Mask ratios to time.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per ratio (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_KIND = flags.DEFINE_string("kind", None, "Masking kind for ratios > 0 (default: the config's, "
                            "or 'random' if the config has none).")
_DATA_DEVICES = flags.DEFINE_integer("data_devices", 8, "--mode=data: devices in 'cores needed'.")
_DATA_RATE = flags.DEFINE_float("data_device_rate", 10_000.0,
                                "--mode=data: examples/s each device consumes (from --mode=train).")
_DATA_ALL_CORES = flags.DEFINE_bool("data_all_cores", True, "--mode=data: also time all cores.")
_PLOT = flags.DEFINE_string("plot", "", "--mode=train: also write the speedup-vs-ratio PNG here "
                            "(needs the plot extra).")
_JSON = flags.DEFINE_bool("json", False, "Print a JSON list of rows as the last line.")


def random_batch(config, method: methods.Method, method_spec, mesh) -> dict[str, jax.Array]:
  """A device-resident batch of random uint8 images and token ids with an EOT per caption,
  completed by the method (A-CLIP adds its second and teacher views and their crop boxes)."""
  rng = np.random.default_rng(0)
  h, w = clip_lib.image_size_hw(config.model.image_size)
  length = config.model.text.context_length
  tokens = rng.integers(1, 49000, (config.batch_size, length)).astype(np.int32)
  tokens[:, -1] = 49407
  batch = {"image": rng.integers(0, 256, (config.batch_size, h, w, 3), dtype=np.uint8),
           "text": tokens}
  return jax.device_put(method.example_batch(method_spec, batch),
                        sharding_lib.batch_sharding(mesh))


def time_train_step(config, mesh) -> dict[str, float]:
  """Compiles the config's train step (whichever method it names) and times it."""
  spec = run_spec.build(config)
  method, method_spec = spec.method, spec.method_spec
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, spec.total_steps)
  state, shardings = method.create_train_state(model, tx, config.model, mesh, config.seed,
                                               method_spec)
  step = method.compile_train_step(model, tx, schedule, spec.step, mesh, shardings, method_spec)
  # Accumulation (optim.accum_steps > 1) adds the cached-feature forward: 4/3 of the FLOPs.
  gflops = (method.flops_per_example(config.model, method_spec, spec.masking)
            * flops.accumulation_factor(spec.step.accum_steps) / 1e9)
  batch = random_batch(config, method, method_spec, mesh)
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(_WARMUP.value):
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  step_time = statistics.median(times)
  return {
      "kept_tokens": int(metrics["kept_tokens"]),
      "step_time_s": step_time,
      "examples_per_s": config.batch_size / step_time,
      "train_gflops_per_example": gflops,
      "compile_s": compile_s,
  }


def with_masking(config, kind: str, ratio: float, method: str | None = None):
  """A copy of `config` with other masking (and optionally another method)."""
  config = config.copy_and_resolve_references()
  config.masking.kind, config.masking.ratio = kind, ratio
  if method is not None:
    config.method = method
  return config


def add_speedups(rows: list[dict]) -> None:
  """Speedups (measured and analytic) relative to the first row."""
  base = rows[0]
  for row in rows:
    row["speedup_measured"] = base["step_time_s"] / row["step_time_s"]
    row["speedup_analytic"] = base["train_gflops_per_example"] / row["train_gflops_per_example"]


def print_rows(title: str, rows: list[dict], first_column: str) -> None:
  """The benchmark table."""
  print(f"\n{title}, {jax.device_count()}× {jax.devices()[0].device_kind}")
  print(f"{first_column:>18} {'kept':>5} {'step s':>8} {'ex/s':>9} {'GFLOP/ex':>9} "
        f"{'speedup':>8} {'analytic':>8} {'meas/anal':>9}")
  for r in rows:
    print(f"{r[first_column]!s:>18} {r['kept_tokens']:>5d} {r['step_time_s']:>8.4f} "
          f"{r['examples_per_s']:>9.1f} {r['train_gflops_per_example']:>9.3f} "
          f"{r['speedup_measured']:>8.2f} {r['speedup_analytic']:>8.2f} "
          f"{r['speedup_measured'] / r['speedup_analytic']:>9.2f}")


def benchmark_train(config, mesh) -> list[dict[str, float]]:
  """Times every requested mask ratio; speedups are relative to the first (ratio 0)."""
  kind = _KIND.value or (config.masking.kind if config.masking.kind not in ("none", "attentive")
                         else "random")
  rows = []
  for r in map(float, _RATIOS.value):
    row = time_train_step(with_masking(config, kind if r > 0 else "none", r, "clip"), mesh)
    rows.append({"ratio": r, **row})
  add_speedups(rows)
  print_rows(f"{config.model.image.variant} @ {config.model.image_size}px, batch "
             f"{config.batch_size}, masking kind {kind}", rows, "ratio")
  return rows


def benchmark_aclip(config, mesh) -> list[dict[str, float]]:
  """A-CLIP's cost against unmasked CLIP: CLIP, 'random 2×50%' ablation, attentive A-CLIP."""
  if config.method != "aclip":
    raise app.UsageError("--mode=aclip needs an A-CLIP config, e.g. configs/demo.py:aclip.")
  variants = {"clip": with_masking(config, "none", 0.0, "clip"),
              "aclip_random": with_masking(config, "random", 0.5),
              "aclip_attentive": with_masking(config, "attentive", 0.5)}
  rows = [{"variant": name, **time_train_step(c, mesh)} for name, c in variants.items()]
  add_speedups(rows)
  for row in rows:  # A-CLIP reports its cost as a multiple of CLIP's time
    row["time_vs_clip"] = 1 / row["speedup_measured"]
  print_rows(f"A-CLIP vs CLIP: {config.model.image.variant} @ {config.model.image_size}px, batch "
             f"{config.batch_size}", rows, "variant")
  return rows


def main(argv):
  del argv
  jax.config.update("jax_threefry_partitionable", True)
  config = _CONFIG.value
  if _MODE.value in ("train", "aclip"):
    mesh = sharding_lib.create_mesh(config.mesh)
    sharding_lib.check_batch_size(config.batch_size, mesh)
    rows = (benchmark_train if _MODE.value == "train" else benchmark_aclip)(config, mesh)
    if _PLOT.value and _MODE.value == "train":
      import plots  # tools/plots.py  # pylint: disable=g-import-not-at-top
      plots.speedup_vs_ratio(rows, _PLOT.value, title=(
          f"{config.model.image.variant} @ {config.model.image_size}px, batch {config.batch_size}, "
          f"{jax.device_count()}× {jax.devices()[0].device_kind}"))
      print(f"Wrote {_PLOT.value}.")
  else:
    from glip_jax.data import throughput  # pylint: disable=g-import-not-at-top
    rows = throughput.benchmark_data(devices=_DATA_DEVICES.value, device_rate=_DATA_RATE.value,
                                     all_cores=_DATA_ALL_CORES.value)
    print("\nInput pipeline, examples/s (per core = per CPU-second of one thread):")
    print(throughput.format_results(rows))
  if _JSON.value:
    print(json.dumps(rows))


if __name__ == "__main__":
  app.run(main)
