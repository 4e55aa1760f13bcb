"""Device mesh, logical-axis rules and the shardings of parameters, optimizer state and batches.

Mesh axes are ('data', 'fsdp', 'tensor'). The batch is split over ('data', 'fsdp'); parameters
carry logical axis names (see glip_jax.models.layers) that LOGICAL_RULES maps onto mesh axes, so
data parallelism, FSDP and tensor parallelism are all a change of `config.mesh`, not of code.

The mesh uses `AxisType.Auto` (GSPMD propagation): the train step is written once for a global
batch and XLA inserts the collectives. jax 0.10's `jax.make_mesh` would default to Explicit axes,
which would make every intermediate's sharding part of its type; we do not need that here.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis → mesh axis. 'embed' over fsdp shards every weight matrix along the model width
# (ZeRO-3 style); 'mlp'/'heads'/'vocab' over tensor gives Megatron-style tensor parallelism.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
)


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves config mesh sizes (one may be −1 = the rest) to a shape over MESH_AXES."""
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh has unknown axes {sorted(unknown)}; allowed: {list(MESH_AXES)}.")
  sizes = [int(axis_sizes.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh={dict(axis_sizes)}: at most one axis may be -1 (the remaining devices).")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh={dict(axis_sizes)}: sizes must be positive or -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh={dict(axis_sizes)}: the fixed axes ({known} devices) do not divide "
                       f"the {num_devices} available devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh={dict(axis_sizes)} multiplies to {math.prod(sizes)} devices but "
                     f"{num_devices} are available; the sizes of {list(MESH_AXES)} must multiply "
                     f"to the device count (use -1 for one axis to take the rest).")
  return tuple(sizes)


def create_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh from config sizes."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(axis_sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """Number of batch shards (product of the batch axes)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of any array whose leading axis is the batch (other axes replicated)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over the batch axes and processes."""
  dp = data_parallel_size(mesh)
  if global_batch_size % dp:
    raise ValueError(f"{field}={global_batch_size} is not divisible by the data-parallel size {dp} "
                     f"(mesh data×fsdp = {mesh.shape['data']}×{mesh.shape['fsdp']}); use a "
                     f"multiple of {dp}.")
  if global_batch_size % jax.process_count():
    raise ValueError(f"{field}={global_batch_size} is not divisible by the process count "
                     f"{jax.process_count()}.")


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Replicates any dimension the mapped mesh axes do not divide (e.g. 3 heads over 2 devices)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else (axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if size > 1 and dim % size == 0 else None)
  return P(*fitted)


def logical_to_shardings(abstract_boxed: Any, mesh: Mesh,
                         rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """Maps a pytree with `nn.Partitioned` boxes (from `jax.eval_shape`) to NamedShardings.

  The result has the structure of the *unboxed* tree: one NamedSharding per array leaf.
  """
  logical_specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  shapes = nn.unbox(abstract_boxed)
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, _fit_spec(spec, np.shape(leaf), mesh)),
      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def abstract_params(model: Any, model_config: Any, mesh: Mesh) -> Any:
  """ShapeDtypeStructs of the model's parameters with the train state's shardings on `mesh`."""
  from glip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  images, tokens = clip_lib.dummy_inputs(model_config)
  boxed = jax.eval_shape(lambda rng: model.init(rng, images, tokens)["params"], jax.random.key(0))
  shardings = logical_to_shardings(boxed, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), shardings)
