r"""One table of accelerator throughput: masking ratios, A-CLIP vs CLIP, attention paths, input.

  python tools/device_bench.py               # ViT-B/16 bf16 on the local accelerator
  python tools/device_bench.py --cpu_smoke   # the same cases at demo size on CPU (seconds)

Cases: CLIP at masking 0 / 0.5 / 0.75 (random, FLIP) with the einsum attention, the same with
`model.attention_impl='dot_product'` (cuDNN flash attention on GPUs), A-CLIP (teacher + two
masked views), and the input pipeline alone with every host core (grain workers). The per-device
batch halves until the step fits (an out-of-memory error) from --per_device_batch. Examples/s
are timed over --steps steps after a warm-up step; TFLOP/s use the analytic FLOPs of
glip_jax/flops.py (flops.aclip_train_flops_per_example for A-CLIP); MFU divides by the device's
peak dense bf16 FLOP/s (glip_jax/flops.py; n/a where unknown, e.g. CPU).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_CPU_SMOKE = flags.DEFINE_bool("cpu_smoke", False, "Demo-size models on CPU: checks the script.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per case.")
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 256, "Largest per-device batch tried.")
_CASES = flags.DEFINE_list("cases", [], "Subset of case names to run (default: all).")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 8, "Batches timed for the input.")

CASES = ("clip_r0", "clip_r0.5", "clip_r0.75", "dpa_r0", "dpa_r0.75", "aclip", "pipeline")


def peak_tflops(device_kind: str) -> float | None:
  """Peak bf16 TFLOP/s of a device kind (glip_jax/flops.py's table), or None (e.g. CPU)."""
  from glip_jax import flops
  peak = flops.peak_flops_per_device(device_kind)
  return None if peak is None else peak / 1e12


def case_config(name: str, smoke: bool):
  """The training config of one case (ViT-B/16 bf16 recipes, or the demo for --cpu_smoke)."""
  from configs import aclip_vit_b16, clip_vit_b16, demo
  if name == "aclip":
    config = demo.get_config("aclip") if smoke else aclip_vit_b16.get_config()
  else:
    config = demo.get_config("random") if smoke else clip_vit_b16.get_config()
    ratio = float(name.split("_r")[1])
    config.masking.kind, config.masking.ratio = ("random", ratio) if ratio else ("none", 0.0)
    if name.startswith("dpa"):
      config.model.attention_impl = "dot_product"
  config.data.source = "synthetic"
  config.data.synthetic.image_size = config.model.image_size
  config.evals = {}
  return config


def _batch(spec, batch_size: int):
  """One real batch of the config's input pipeline (synthetic scenes), on the devices."""
  from glip_jax.data import pipeline
  config, method = spec.config, spec.method
  size = spec.image_size[0]
  preprocess = method.make_preprocess(spec.method_spec, config.data, size, spec.tokenizer)
  it = pipeline.make_train_iterator(config.data, global_batch_size=batch_size, image_size=size,
                                    seed=0, tokenizer=spec.tokenizer, preprocess=preprocess)
  local = next(it)
  return pipeline.make_global_batch({k: local[k] for k in method.batch_keys}, spec.mesh)


def run_step_case(name: str, smoke: bool, steps: int, per_device: int) -> dict:
  """Compiles one case's real train step and times it; halves the batch on out-of-memory."""
  import jax
  from glip_jax import run_spec
  from glip_jax import train_step as train_step_lib
  from glip_jax.models import clip as clip_lib
  config = case_config(name, smoke)
  spec = run_spec.build(config)  # the case's method (CLIP or A-CLIP) and step, as the trainer
  method, mesh = spec.method, spec.mesh
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, 1000)
  while True:
    batch_size = per_device * jax.device_count()
    try:
      state, shardings = method.create_train_state(model, tx, config.model, mesh, 0,
                                                   spec.method_spec)
      step = method.compile_train_step(model, tx, schedule, spec.step, mesh, shardings,
                                       spec.method_spec)
      per_example = method.flops_per_example(config.model, spec.method_spec, spec.masking)
      batch = _batch(spec, batch_size)
      state, metrics = step(state, batch)  # compiles
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      seconds = time.perf_counter() - start
      break
    except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED: try a smaller batch
      if "RESOURCE_EXHAUSTED" not in str(e) or per_device == 1:
        raise
      per_device //= 2
  examples_per_s = batch_size * steps / seconds
  tflops = per_example * examples_per_s / 1e12 / jax.device_count()
  peak = peak_tflops(jax.devices()[0].device_kind)
  return dict(case=name, batch=batch_size, examples_per_s=examples_per_s, tflops=tflops,
              mfu=None if peak is None else tflops / peak, loss=float(metrics["loss"]))


def run_pipeline_case(smoke: bool, batches: int, per_device: int) -> dict:
  """The input pipeline alone, with a grain worker per host core."""
  import jax
  from glip_jax.data import pipeline, tokenizer as tokenizer_lib
  config = case_config("clip_r0", smoke)
  config.data.worker_count = 0 if smoke else os.cpu_count()
  config.data.read_threads = os.cpu_count()
  batch_size = per_device * jax.device_count()
  tokenizer = tokenizer_lib.Tokenizer(config.model.text.context_length, config.tokenizer.kind)
  it = pipeline.make_train_iterator(config.data, global_batch_size=batch_size,
                                    image_size=config.model.image_size, seed=0,
                                    tokenizer=tokenizer)
  next(it)  # worker start-up
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()
  return dict(case=f"pipeline ({os.cpu_count()} cores)", batch=batch_size,
              examples_per_s=batch_size * batches / seconds, tflops=None, mfu=None, loss=None)


def format_table(rows: list[dict]) -> str:
  """The results as one fixed-width table."""
  lines = [f"{'case':<22} {'batch':>6} {'examples/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'loss':>7}"]
  for r in rows:
    tflops = "n/a" if r["tflops"] is None else f"{r['tflops']:.3g}"
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    loss = "" if r["loss"] is None else f"{r['loss']:.3f}"
    lines.append(f"{r['case']:<22} {r['batch']:>6} {r['examples_per_s']:>11.1f} {tflops:>8} "
                 f"{mfu:>6} {loss:>7}")
  return "\n".join(lines)


def main(argv):
  del argv
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  smoke = _CPU_SMOKE.value
  per_device = 2 if smoke else _PER_DEVICE.value
  steps = 1 if smoke else _STEPS.value
  names = _CASES.value or list(CASES)
  unknown = set(names) - set(CASES)
  if unknown:
    raise app.UsageError(f"--cases has unknown names {sorted(unknown)}; allowed: {list(CASES)}.")
  device = jax.devices()[0]
  print(f"device: {device.device_kind} x{jax.device_count()} ({device.platform}), "
        f"host cores: {os.cpu_count()}", flush=True)
  rows = []
  for name in names:
    if name == "pipeline":
      rows.append(run_pipeline_case(smoke, 2 if smoke else _PIPELINE_BATCHES.value, per_device))
    else:
      rows.append(run_step_case(name, smoke, steps, per_device))
    print(f"  done: {name}", flush=True)
  print(format_table(rows))


if __name__ == "__main__":
  app.run(main)
