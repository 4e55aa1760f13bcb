r"""Benchmarks: train-step time vs. mask ratio (`--mode=train`), input pipeline (`--mode=data`).

Train mode compiles the real train step of a config (model, optimizer, sharding, masking) and times
it on a device-resident random batch: warm-up steps first, then the median of `--steps` timed steps,
each ended by `block_until_ready`. Speedups are relative to ratio 0; the analytic one comes from
the SPEC §7 FLOP model of both towers (glip_jax.flops), so `speedup_measured / speedup_analytic`
says how much of the FLOP saving the hardware turns into time.

  python tools/benchmark.py --config=configs/demo.py
  python tools/benchmark.py --config=configs/glip_vit_b16.py --config.batch_size=256 --json
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
from glip_jax import masking
from glip_jax import sharding as sharding_lib
from glip_jax import train_step as train_step_lib
from glip_jax.models import clip as clip_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file to benchmark.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "data"], "What to benchmark.")
_RATIOS = flags.DEFINE_list("ratios", ["0", "0.5", "0.75", "0.9"], "Mask ratios to time.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per ratio (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_KIND = flags.DEFINE_string("kind", None, "Masking kind for ratios > 0 (default: the config's, "
                            "or 'random' if the config has none).")
_JSON = flags.DEFINE_bool("json", False, "Print a JSON list of rows as the last line.")


def random_batch(config, mesh) -> dict[str, jax.Array]:
  """A device-resident batch of random uint8 images and token ids with an EOT per caption."""
  rng = np.random.default_rng(0)
  h, w = clip_lib.image_size_hw(config.model.image_size)
  length = config.model.text.context_length
  tokens = rng.integers(1, 49000, (config.batch_size, length)).astype(np.int32)
  tokens[:, -1] = 49407
  batch = {"image": rng.integers(0, 256, (config.batch_size, h, w, 3), dtype=np.uint8),
           "text": tokens}
  return jax.device_put(batch, sharding_lib.batch_sharding(mesh))


def time_train_step(config, ratio: float, kind: str, mesh) -> dict[str, float]:
  """Compiles the train step at one mask ratio and returns its timing row."""
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, config.total_steps)
  state, state_shardings = train_step_lib.create_train_state(model, tx, config.model, mesh,
                                                             config.seed)
  spec = train_step_lib.StepSpec(
      masking=masking.MaskingSpec(**{**config.masking.to_dict(), "kind": kind, "ratio": ratio}),
      grid=clip_lib.grid(config.model), loss=config.loss.kind, seed=config.seed)
  step = train_step_lib.compile_train_step(model, tx, schedule, spec, mesh, state_shardings)
  batch = random_batch(config, mesh)
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(_WARMUP.value):
    state, metrics = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  step_time = statistics.median(times)
  return {
      "ratio": ratio,
      "kept_tokens": int(metrics["kept_tokens"]),
      "step_time_s": step_time,
      "examples_per_s": config.batch_size / step_time,
      "train_gflops_per_example": flops.train_flops_per_example(config.model, ratio) / 1e9,
      "compile_s": compile_s,
  }


def benchmark_train(config) -> list[dict[str, float]]:
  """Times every requested ratio and adds speedups relative to the first (ratio 0)."""
  mesh = sharding_lib.create_mesh(config.mesh)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  kind = _KIND.value or (config.masking.kind if config.masking.kind != "none" else "random")
  rows = [time_train_step(config, float(r), kind if float(r) > 0 else "none", mesh)
          for r in _RATIOS.value]
  base = rows[0]
  for row in rows:
    row["speedup_measured"] = base["step_time_s"] / row["step_time_s"]
    row["speedup_analytic"] = base["train_gflops_per_example"] / row["train_gflops_per_example"]
  print(f"\n{config.model.image.variant} @ {config.model.image_size}px, batch {config.batch_size}, "
        f"masking kind {kind}, {jax.device_count()}× {jax.devices()[0].device_kind}")
  print(f"{'ratio':>6} {'kept':>5} {'step s':>8} {'ex/s':>9} {'GFLOP/ex':>9} "
        f"{'speedup':>8} {'analytic':>8} {'ratio m/a':>9}")
  for r in rows:
    print(f"{r['ratio']:>6.3f} {r['kept_tokens']:>5d} {r['step_time_s']:>8.4f} "
          f"{r['examples_per_s']:>9.1f} {r['train_gflops_per_example']:>9.3f} "
          f"{r['speedup_measured']:>8.2f} {r['speedup_analytic']:>8.2f} "
          f"{r['speedup_measured'] / r['speedup_analytic']:>9.2f}")
  return rows


def main(argv):
  del argv
  jax.config.update("jax_threefry_partitionable", True)
  if _MODE.value == "train":
    rows = benchmark_train(_CONFIG.value)
  else:
    from glip_jax.data import throughput  # pylint: disable=g-import-not-at-top
    rows = throughput.benchmark_data()
    print("\nInput pipeline, examples/s on one core (one worker):")
    for key, value in rows.items():
      print(f"  {key:<40} {value:>10.0f}" if isinstance(value, float) else f"  {key:<40} {value:>10}")
  if _JSON.value:
    print(json.dumps(rows))


if __name__ == "__main__":
  app.run(main)
