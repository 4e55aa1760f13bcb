r"""Does a config fit a TPU slice? Compiles the real train step for it on this (CPU-only) host.

  pip install -e '.[aot]'   # libtpu, which describes TPU slices without a TPU
  python tools/fit_report.py --config=configs/demo.py --topology=v5e:2x2
  python tools/fit_report.py --config=configs/flip_vit_b16.py --topology=v5e:4x4 \
      --config.model.dtype=bfloat16 --config.batch_size=4096 --config.masking.ratio=0.75
  python tools/fit_report.py --config=configs/demo.py --topology=v4:2x2x1 --find_max_batch

Per chip it prints the compiler's argument / temporary / output bytes against the chip's HBM, the
margin, XLA's FLOPs against the analytic model (glip_jax/flops.py), every collective kind with its
count and bytes, and the compile time. `--topology=cpu` compiles for the local devices instead
(e.g. 8 fake CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=8), for comparing
memory of two settings on any machine. Nothing is executed: no parameters are built.
"""

import dataclasses
import glob
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

GIB = 2 ** 30
# Per-chip HBM and peak bf16 FLOP/s by TPU generation, from Google's Cloud TPU pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e; checked 2026-12): v4 32 GiB, 275 TFLOP/s;
# v5e 16 GB, 197 TFLOP/s; v5p 95 GB, 459 TFLOP/s; v6e (Trillium) 32 GB, 918 TFLOP/s. Google writes
# "GB" for the same HBM stacks it sizes in GiB (16/32 GiB); we use GiB, libtpu reserves a little
# of it, so a margin under ~0.5 GiB is "tight", not "fits".
TPU_CHIPS = {
    "v4": (32.0, 275e12),
    "v5e": (16.0, 197e12),
    "v5litepod": (16.0, 197e12),
    "v5p": (95.0, 459e12),
    "v6e": (32.0, 918e12),
}
TIGHT_GIB = 0.5
_HLO_OUT = None  # defined by define_flags() when run as a script


def chip_of(topology: str) -> tuple[str, float | None, float | None]:
  """(generation, HBM GiB, peak bf16 FLOP/s) of a topology name; unknown values are None."""
  if topology == "cpu":
    return "cpu", None, None
  generation = topology.split(":")[0].lower()
  if generation not in TPU_CHIPS:
    raise ValueError(f"--topology={topology!r}: unknown TPU generation {generation!r}; allowed: "
                     f"{sorted(TPU_CHIPS)} (as in v5e:4x4) or 'cpu'.")
  return (generation, *TPU_CHIPS[generation])


def report(config, topology: str, batch_size: int, hbm_gib: float | None) -> dict:
  """Compiles once and returns the report as a dict."""
  from glip_jax import aot
  import jax
  devices = jax.devices() if topology == "cpu" else aot.tpu_devices(topology)
  out = dict(
      method=config.method, topology=topology, chips=len(devices), batch_size=batch_size,
      per_chip_batch=batch_size / len(devices), variant=config.model.image.variant,
      dtype=config.model.dtype, masking=f"{config.masking.kind}:{config.masking.ratio}",
      loss_impl=config.loss.get("impl", "dense"),
      accum_steps=config.optim.get("accum_steps", 1), remat=bool(config.model.remat),
      remat_policy=config.model.get("remat_policy", "none"))
  try:
    result = aot.compile_train_step(config, devices, batch_size)
  except aot.HbmExhaustedError as e:
    # Not a crash: the answer to "does it fit?" is no, with the compiler's own number. No FLOPs
    # or collectives: the compiler stops before it has a program.
    needed = e.needed_bytes + (e.argument_bytes if e.what == "temporaries" else 0)
    out.update(refused=str(e), argument_gib=e.argument_bytes / GIB,
               needed_gib=needed / GIB, needed_is_lower_bound=e.what == "temporaries",
               usable_hbm_gib=e.available_bytes / GIB, hbm_gib=hbm_gib, fits=False,
               margin_gib=(hbm_gib if hbm_gib is not None else e.available_bytes / GIB)
               - needed / GIB, compile_seconds=e.compile_seconds)
    return out
  if _HLO_OUT is not None and _HLO_OUT.value:
    with open(_HLO_OUT.value, "w") as f:
      f.write(result.hlo_text)
  out.update(
      argument_gib=result.argument_bytes / GIB, temp_gib=result.temp_bytes / GIB,
      output_gib=result.output_bytes / GIB, alias_gib=result.alias_bytes / GIB,
      total_gib=result.total_bytes / GIB, hbm_gib=hbm_gib,
      xla_tflops=result.flops / 1e12, analytic_tflops=result.analytic_flops / 1e12,
      collectives={k: dataclasses.asdict(v) for k, v in result.collectives.items()},
      compile_seconds=result.compile_seconds)
  if hbm_gib is not None:
    out["margin_gib"] = hbm_gib - out["total_gib"]
    out["fits"] = out["margin_gib"] > 0
  return out


def print_report(r: dict) -> None:
  """The human-readable table."""
  print(f"\n== {r['method']} {r['variant']} {r['dtype']} masking={r['masking']} "
        f"loss={r['loss_impl']} accum={r['accum_steps']} remat={r['remat']} "
        f"remat_policy={r['remat_policy']} on {r['topology']} ({r['chips']} chips), "
        f"global batch {r['batch_size']} ({r['per_chip_batch']:g}/chip)")
  if "refused" in r:
    bound = "at least " if r["needed_is_lower_bound"] else ""
    print(f"DOES NOT FIT: the TPU compiler refused it ({r['refused']})")
    print(f"  per chip it needs {bound}{r['needed_gib']:.3f} GiB ({r['argument_gib']:.3f} of "
          f"arguments + temporaries) of {r['usable_hbm_gib']:.3f} GiB usable "
          f"(margin {r['margin_gib']:+.3f} GiB)")
    print(f"compile time: {r['compile_seconds']:.1f} s")
    return
  print("per chip        GiB")
  for name in ("argument", "temp", "output"):
    print(f"  {name:<12} {r[name + '_gib']:8.3f}")
  print(f"  {'aliased':<12} {-r['alias_gib']:8.3f}   (outputs written into donated arguments)")
  print(f"  {'total':<12} {r['total_gib']:8.3f}")
  if r["hbm_gib"] is not None:
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    if r["fits"] and r["margin_gib"] < TIGHT_GIB:
      verdict = "TIGHT"
    print(f"  {'HBM':<12} {r['hbm_gib']:8.3f}   margin {r['margin_gib']:+.3f} GiB: {verdict}")
  ratio = r["xla_tflops"] / r["analytic_tflops"] if r["analytic_tflops"] else float("nan")
  print(f"FLOPs per chip: XLA {r['xla_tflops']:.4g} TFLOP, analytic {r['analytic_tflops']:.4g} "
        f"TFLOP (XLA/analytic {ratio:.2f})")
  print("collectives (distinct, static count; bytes of their results; HLO instructions):")
  for kind, c in r["collectives"].items():
    print(f"  {kind:<20} {c['count']:5d}  {c['bytes'] / 2 ** 20:12.2f} MiB  "
          f"({c['instructions']} instructions)")
  if not r["collectives"]:
    print("  none")
  print(f"compile time: {r['compile_seconds']:.1f} s")


def find_max_batch(config, topology: str, hbm_gib: float, quantum: int,
                   max_compiles: int) -> tuple[int, list[dict]]:
  """Largest multiple of `quantum` that fits: doubles from the config's batch, then bisects."""
  tried = []

  def fits(batch):
    r = report(config, topology, batch, hbm_gib)
    tried.append(r)
    total = r.get("total_gib", r.get("needed_gib"))
    print(f"  batch {batch:7d}: total {'≥ ' if 'refused' in r else ''}{total:.3f} GiB -> "
          f"{'fits' if r['fits'] else 'does not fit'}", flush=True)
    return r["fits"]

  lo, hi = 0, max(quantum, config.batch_size // quantum * quantum)
  while len(tried) < max_compiles and fits(hi):
    lo, hi = hi, hi * 2
  # Now lo fits (or is 0) and hi does not (or the budget is spent).
  while hi - lo > quantum and len(tried) < max_compiles:
    mid = (lo + hi) // 2 // quantum * quantum
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo, tried


def print_breakdown(dump_dir: str, top: int) -> None:
  """The largest buffers of the last compiled train step in `dump_dir`."""
  from glip_jax import aot
  reports = sorted(glob.glob(os.path.join(dump_dir, "*jit_train_step*memory-usage-report.txt")),
                   key=os.path.getmtime)
  if not reports:
    print("no memory-usage report was dumped (XLA_FLAGS set after the backend started?)")
    return
  with open(reports[-1]) as f:
    rows = aot.largest_buffers(f.read(), top)
  print(f"largest buffers ({os.path.basename(reports[-1])}):")
  for size, shapes in rows:
    print(f"  {size / 2 ** 20:10.2f} MiB  {shapes[:150]}")


def define_flags() -> None:
  """The command-line flags (only when run as a script: importing this next to glip_jax.main, as
  the tests do, must not define a second --config)."""
  global _CONFIG, _TOPOLOGY, _FIND_MAX, _HBM_GIB, _JSON, _BREAKDOWN, _HLO_OUT, _MAX_COMPILES  # pylint: disable=global-statement
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
  _TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU slice, e.g. v5e:4x4, v4:2x2x1, "
                                  "v5p:2x2x1, v6e:2x2; or 'cpu' for the local devices.")
  _FIND_MAX = flags.DEFINE_bool("find_max_batch", False, "Bisect the largest global batch (a "
                                "multiple of data-parallel size × accum_steps) that fits in HBM.")
  _HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Override the per-chip memory (GiB).")
  _JSON = flags.DEFINE_string("json", "", "Also append the report as one JSON line to this file.")
  _BREAKDOWN = flags.DEFINE_integer("breakdown", 0, "Also print the N largest buffers of the step "
                                    "(from XLA's memory-usage report; adds a dump to a temp dir).")
  _HLO_OUT = flags.DEFINE_string("hlo_out", "", "Write the compiled (optimized) HLO text here.")
  _MAX_COMPILES = flags.DEFINE_integer("max_compiles", 8, "Budget of compiles for --find_max_batch.")


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  dump_dir = ""
  if _BREAKDOWN.value:
    dump_dir = tempfile.mkdtemp(prefix="fit_report_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir}"
                               " --xla_dump_hlo_module_re=.*train_step.*").strip()
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  config = _CONFIG.value
  topology = _TOPOLOGY.value
  _, hbm_gib, _ = chip_of(topology)
  hbm_gib = _HBM_GIB.value if _HBM_GIB.value is not None else hbm_gib
  if _FIND_MAX.value:
    if hbm_gib is None:
      raise app.UsageError("--find_max_batch needs a memory size: a TPU topology or --hbm_gib.")
    from glip_jax import aot
    from glip_jax import sharding as sharding_lib
    devices = jax.devices() if topology == "cpu" else aot.tpu_devices(topology)
    mesh = sharding_lib.create_mesh(config.mesh, devices)
    quantum = math.lcm(sharding_lib.data_parallel_size(mesh) * config.optim.get("accum_steps", 1),
                       jax.process_count())
    best, tried = find_max_batch(config, topology, hbm_gib, quantum, _MAX_COMPILES.value)
    print(f"largest global batch that fits on {topology}: {best} "
          f"({len(tried)} compiles, step {quantum})")
    results = tried
  else:
    results = [report(config, topology, config.batch_size, hbm_gib)]
    print_report(results[0])
    if dump_dir:
      print_breakdown(dump_dir, _BREAKDOWN.value)
  if _JSON.value:
    with open(_JSON.value, "a") as f:
      for r in results:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
