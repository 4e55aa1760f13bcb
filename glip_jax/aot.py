"""Ahead-of-time compilation of the real train step for any device set, with no parameters built.

`compile_train_step(config, devices)` builds the abstract train state with `jax.eval_shape` of the
config method's own `create_train_state` (the same init and logical shardings; CLIP/FLIP/GLIP and
A-CLIP alike), lowers that method's sharded train step on `ShapeDtypeStruct` arguments and compiles
it. With libtpu installed (the
`aot` extra) `tpu_devices('v5e:4x4')` gives the devices of a TPU slice on a CPU-only host, so the
per-chip memory, FLOPs and collectives of a pod-scale run can be read before paying for it
(tools/fit_report.py). On CPU devices it measures the same things for the local host.
"""

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from glip_jax import flops as flops_lib
from glip_jax import masking
from glip_jax import methods
from glip_jax import sharding as sharding_lib
from glip_jax import train_step as train_step_lib
from glip_jax.models import clip as clip_lib

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# `%name = <shape> all-gather(` or the async `-start`/`-done` pair (counted once, at `-done`,
# whose shape is the result).
_COLLECTIVE_RE = re.compile(
    r"=\s+(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<suffix>-start|-done)?\("
    r"(?P<rest>.*)")
_CHANNEL_RE = re.compile(r"channel_id=(\d+)")
_ARRAY_RE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def enable_compilation_cache(path: str, min_compile_seconds: float = 1.0) -> None:
  """Persists compiled executables under `path` (a local or gs:// directory) across runs.

  A restarted or resumed run then loads its train step instead of recompiling it (minutes for
  ViT-L on a pod). Programs that compile faster than `min_compile_seconds` are not stored.
  """
  from jax.experimental.compilation_cache import compilation_cache
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # The cache is set up once per process at the first compile; start over with the new directory.
  compilation_cache.reset_cache()


def tpu_devices(topology: str) -> list[jax.Device]:
  """The devices of a TPU slice such as 'v5e:2x2' or 'v4:2x2x1', described by libtpu (no TPU)."""
  from jax.experimental import topologies
  # libtpu takes a machine-wide lock file (/tmp/libtpu_lockfile) so that two processes cannot
  # drive one TPU; describing a slice drives none, so parallel compiles (tests, reports) may share.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # v4 and v5p chips have two TensorCores. jax runs them as one device per chip ("megacore", as on
  # a real v4 VM) and its meshes require that; libtpu describes v4 per core unless told.
  megacore = {"chip_config_name": "megacore"} if topology.split(":")[0] == "v4" else {}
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                             **megacore).devices)
  except Exception as e:  # libtpu missing or an unknown topology name; say which
    raise ValueError(f"--topology={topology!r}: libtpu cannot describe it ({e}); install the "
                     f"'aot' extra (pip install -e '.[aot]') and use names like v5e:2x2, "
                     f"v4:2x2x1, v5p:2x2x1, v6e:4x4.") from e


def abstract_train_state(method: methods.Method, model: nn.Module, tx: Any,
                         model_config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                         seed: int, method_spec: Any) -> tuple[Any, Any]:
  """(train state of ShapeDtypeStruct with shardings, the shardings) — no array is allocated.

  Traces the method's own `create_train_state` under `jax.eval_shape`, so the state (A-CLIP's
  teacher and heads included) has exactly the shapes and shardings a run would build.
  """
  captured = {}

  def build():
    state, shardings = method.create_train_state(model, tx, model_config, mesh, seed, method_spec)
    captured["shardings"] = shardings
    return state

  shapes = jax.eval_shape(build)
  shardings = captured["shardings"]
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return abstract, shardings


def abstract_batch(config: ml_collections.ConfigDict, method: methods.Method, method_spec: Any,
                   batch_size: int, sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """The method's complete batch as batch-sharded ShapeDtypeStruct (no image is allocated)."""
  height, width = clip_lib.image_size_hw(config.model.image_size)
  plain = {
      "image": jax.ShapeDtypeStruct((batch_size, height, width, 3), jnp.uint8),
      "text": jax.ShapeDtypeStruct((batch_size, config.model.text.context_length), jnp.int32),
  }
  # `example_batch` completes a plain batch (A-CLIP: its other views alias the image, its boxes are
  # small arrays); it only reads shapes, so it runs on the abstract batch too.
  batch = method.example_batch(method_spec, plain)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
          for k, v in batch.items() if k in method.batch_keys}


def step_spec(config: ml_collections.ConfigDict, total_steps: int = 0) -> train_step_lib.StepSpec:
  """The StepSpec a run of `config` trains with (as glip_jax.run_spec builds it)."""
  return train_step_lib.StepSpec(
      masking=masking.from_config(config.masking), grid=clip_lib.grid(config.model),
      loss=config.loss.kind, seed=config.seed, total_steps=total_steps,
      loss_impl=config.loss.get("impl", "dense"), accum_steps=config.optim.get("accum_steps", 1))


@dataclasses.dataclass
class CompiledStep:
  """What the compiler says about one train step, per device."""

  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  flops: float
  analytic_flops: float  # glip_jax/flops.py per device, the accumulation's extra forward included
  compile_seconds: float
  collectives: dict[str, "CollectiveStats"]
  hlo_text: str

  @property
  def total_bytes(self) -> int:
    """Peak live bytes: arguments + temporaries + outputs not aliased onto donated arguments."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


@dataclasses.dataclass(frozen=True)
class CollectiveStats:
  """One collective kind in a compiled program."""

  count: int  # distinct collectives (one per channel id)
  bytes: int  # bytes of their results, each distinct collective once
  instructions: int  # HLO instructions, clones included


def collective_stats(hlo_text: str) -> dict[str, CollectiveStats]:
  """Every collective kind in an optimized HLO module's text, with counts and result bytes.

  XLA:TPU clones one all-gather into each "async collective fusion" that consumes it: the clones
  keep the original's channel id, so distinct channel ids count the collectives the program really
  performs and `instructions` the raw HLO lines. Collective-permutes are the exception: XLA:TPU
  gives every permute of the ring loss's loops the same channel id (1) although they move
  different arrays (text blocks, their running max, sum and argmax), so each permute instruction
  counts as one. Counts are static: a collective inside a loop body (the ring loss) counts once,
  although it runs once per iteration.
  """
  seen: dict[str, dict[str, int]] = {}
  lines: dict[str, int] = {}
  for match in _COLLECTIVE_RE.finditer(hlo_text):
    if match["suffix"] == "-start":
      continue
    op = match["op"]
    channel = _CHANNEL_RE.search(match["rest"])
    key = (channel.group(1) if channel and op != "collective-permute"
           else f"line{match.start()}")
    nbytes = sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
                 for dtype, dims in _ARRAY_RE.findall(match["shape"]))
    seen.setdefault(op, {})[key] = nbytes
    lines[op] = lines.get(op, 0) + 1
  return {op: CollectiveStats(len(by_channel), sum(by_channel.values()), lines[op])
          for op, by_channel in sorted(seen.items())}


_UNITS = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}


def largest_buffers(memory_report: str, top: int = 15) -> list[tuple[int, str]]:
  """(bytes, shapes) of the largest buffer allocations in XLA's memory-usage report.

  The report is what `--xla_dump_to` writes as `*memory-usage-report.txt`: one line per
  allocation with every value (HLO shape) that shares it during the program.
  """
  rows = []
  for line in memory_report.splitlines():
    parts = [p.strip() for p in line.split(";")]
    if len(parts) != 5:
      continue
    size = re.fullmatch(r"([\d.]+)(B|KiB|MiB|GiB)", parts[1])
    if size:
      rows.append((int(float(size.group(1)) * _UNITS[size.group(2)]), parts[4]))
  return sorted(rows, key=lambda r: -r[0])[:top]


_SIZE_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
# The two ways libtpu says a program cannot fit: its temporaries alone exceed the usable HBM
# (checked early), or the whole allocation does (after memory-space assignment).
_HBM_EXHAUSTED_RES = (
    re.compile(r"required for HLO temporaries \((?P<need>[\d.]+)(?P<nu>[KMGT]?)B?\) exceeds "
               r"available HBM \((?P<have>[\d.]+)(?P<hu>[KMGT]?)B?\)"),
    re.compile(r"[Uu]sed (?P<need>[\d.]+)(?P<nu>[KMGT]?)B? of (?P<have>[\d.]+)(?P<hu>[KMGT]?)B? "
               r"hbm"),
)


class HbmExhaustedError(Exception):
  """The TPU compiler refused the program: it needs more HBM per chip than the chip has.

  `needed_bytes` is what the compiler said it needs (`what`: 'temporaries' or 'total'),
  `available_bytes` the chip's usable HBM as libtpu counts it (a little under the nominal size),
  `argument_bytes` the per-chip train state + batch from their shardings (no compile needed).
  """

  def __init__(self, message: str, what: str, needed_bytes: int, available_bytes: int,
               argument_bytes: int, compile_seconds: float):
    super().__init__(message)
    self.what, self.needed_bytes, self.available_bytes = what, needed_bytes, available_bytes
    self.argument_bytes, self.compile_seconds = argument_bytes, compile_seconds


def parse_hbm_exhausted(message: str) -> tuple[str, int, int] | None:
  """(what, needed bytes, available bytes) from libtpu's out-of-HBM compile error, else None."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  for what, pattern in zip(("temporaries", "total"), _HBM_EXHAUSTED_RES):
    m = pattern.search(message)
    if m:
      return (what, int(float(m["need"]) * _SIZE_UNITS[m["nu"]]),
              int(float(m["have"]) * _SIZE_UNITS[m["hu"]]))
  return None


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (its shards' sizes)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def compile_train_step(config: ml_collections.ConfigDict,
                       devices: Sequence[jax.Device] | None = None,
                       batch_size: int | None = None) -> CompiledStep:
  """Lowers and compiles the train step of the config's method for `devices` (default: local)."""
  batch_size = config.batch_size if batch_size is None else batch_size
  mesh = sharding_lib.create_mesh(config.mesh, devices)
  sharding_lib.check_batch_size(batch_size, mesh)
  method = methods.get(config.method)
  # The schedule's length changes no shape; total_epochs would need the data, so it is not read.
  total_steps = config.total_steps or 1
  method_spec = method.validate(config, total_steps)
  spec = step_spec(config, total_steps)
  train_step_lib.check_accum_steps(spec.accum_steps, batch_size,
                                   sharding_lib.data_parallel_size(mesh))
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, total_steps)
  state, shardings = abstract_train_state(method, model, tx, config.model, mesh, config.seed,
                                          method_spec)
  step = method.compile_train_step(model, tx, schedule, spec, mesh, shardings, method_spec)
  batch = abstract_batch(config, method, method_spec, batch_size,
                         sharding_lib.batch_sharding(mesh))
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    refused = parse_hbm_exhausted(str(e))
    if refused is None:
      raise
    raise HbmExhaustedError(str(e).splitlines()[0], *refused,
                            argument_bytes=per_device_bytes((state, batch)),
                            compile_seconds=time.perf_counter() - start) from e
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  per_example = (method.flops_per_example(config.model, method_spec, spec.masking)
                 * flops_lib.accumulation_factor(spec.accum_steps))
  return CompiledStep(
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      flops=float(cost.get("flops", float("nan"))),
      analytic_flops=per_example * batch_size / len(mesh.devices.flat),
      compile_seconds=seconds,
      collectives=collective_stats(text),
      hlo_text=text)
