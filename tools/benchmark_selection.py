r"""Cost of token selection relative to the train step, per masking kind (issue 17: < 1%).

For each kind, in one process and on the same device-resident batch: the compiled train step with
that kind, the same step with kind 'random' at the same ratio (same K, so the same transformer
cost), and the selection alone (`masking.keep_indices`, jitted with the step's inputs). Timings
are interleaved round by round so that load on a shared machine hits all three alike; medians.

  python tools/benchmark_selection.py                                   # configs/demo.py
  python tools/benchmark_selection.py --config=configs/clip_vit_b16.py --batch_size=8 --rounds=3
  python tools/benchmark_selection.py --config=configs/clip_vit_b16.py --flops   # no timing

`--flops` compiles only the selection and compares XLA's FLOP count of it with the analytic
FLOPs of one train step (glip_jax.flops), per example: a machine-independent ratio.
Prints a markdown table (docs/masking.md records the figures).
"""

import argparse
import functools
import importlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from glip_jax import flops
from glip_jax import masking
from glip_jax import sharding as sharding_lib
from glip_jax import train_step as train_step_lib
from glip_jax.models import clip as clip_lib

KINDS = ("random", "gaussian", "cluster", "pgs", "grid", "block")
# Per-kind settings on top of the config (kinds keep the config's ratio unless given here).
KIND_FIELDS = {"grid": dict(ratio=0.75, window=2), "pgs": dict(embed_mix=1.0)}


def load_config(path: str) -> ml_collections.ConfigDict:
  """`configs/x.py[:arg]` → its get_config(arg)."""
  file, _, arg = path.partition(":")
  module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
  return module.get_config(arg)


def masking_spec(kind: str, ratio: float) -> masking.MaskingSpec:
  fields = {"ratio": ratio, **KIND_FIELDS.get(kind, {})}
  return masking.MaskingSpec(kind, **fields)


def timed(fn, repeat: int = 1) -> float:
  """Seconds per call of fn(), over `repeat` back-to-back calls (amortises dispatch)."""
  start = time.perf_counter()
  jax.block_until_ready([fn() for _ in range(repeat)])
  return (time.perf_counter() - start) / repeat


def flop_table(config: ml_collections.ConfigDict, args: argparse.Namespace) -> None:
  """Selection FLOPs (XLA's count) / train-step FLOPs (analytic), per example, per kind."""
  batch = args.batch_size or 8
  model = clip_lib.build_model(config.model)
  grid = clip_lib.grid(config.model)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             *clip_lib.dummy_inputs(config.model))["params"])
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        nn_unbox(params))
  h, w = clip_lib.image_size_hw(config.model.image_size)
  images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8)
  print("| kind | ratio | selection GFLOP / example | train step GFLOP / example | ratio |")
  print("|---|---|---|---|---|")
  for kind in args.kinds.split(","):
    spec = masking_spec(kind, args.ratio)

    def select(p, x, spec=spec):
      return masking.keep_indices(jax.random.key(0), spec, batch, grid, images=x, progress=0.5,
                                  image_params=p["image"])

    cost = jax.jit(select).lower(params, images).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    sel = cost["flops"] / batch
    step = flops.train_flops_per_example(config.model, spec.ratio)
    print(f"| {kind} | {spec.ratio:g} | {sel / 1e9:.4f} | {step / 1e9:.1f} | "
          f"{100 * sel / step:.3f}% |", flush=True)


def nn_unbox(tree):
  """Parameters without flax's logical-partitioning boxes."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.unbox(tree)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--ratio", type=float, default=0.5)
  parser.add_argument("--kinds", default=",".join(KINDS))
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--flops", action="store_true", help="FLOP ratio only, no timing")
  args = parser.parse_args(argv)
  if args.flops:
    flop_table(load_config(args.config), args)
    return

  config = load_config(args.config)
  batch_size = args.batch_size or config.batch_size
  mesh = sharding_lib.create_mesh({"data": -1})
  model = clip_lib.build_model(config.model)
  tx, schedule = train_step_lib.make_optimizer(config.optim, 1000)
  state, shardings = train_step_lib.create_train_state(model, tx, config.model, mesh, 0)
  grid = clip_lib.grid(config.model)
  h, w = clip_lib.image_size_hw(config.model.image_size)
  rng = np.random.default_rng(0)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = jax.device_put({
      "image": rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8),
      "text": rng.integers(1, 49000, (batch_size, config.model.text.context_length)).astype(
          np.int32)}, batch_sharding)

  def compile_step(spec):
    step_spec = train_step_lib.StepSpec(spec, grid, seed=0, total_steps=1000)
    step = functools.partial(train_step_lib.train_step, model=model, tx=tx, schedule=schedule,
                             spec=step_spec, batch_sharding=batch_sharding)
    # As compile_train_step, but not donated: the same state is fed to every timed call.
    return jax.jit(step, in_shardings=(shardings, batch_sharding))

  def compile_selection(spec):
    @jax.jit
    def select(params, images, step):
      return masking.keep_indices(jax.random.fold_in(jax.random.key(0), step), spec, batch_size,
                                  grid, sharding=batch_sharding, images=images,
                                  progress=step / 1000, image_params=params["image"])
    return select

  print(f"config={args.config} batch={batch_size} grid={grid} devices={jax.device_count()} "
        f"({jax.devices()[0].device_kind})", flush=True)
  rows = []
  for kind in args.kinds.split(","):
    spec = masking_spec(kind, args.ratio)
    baseline = masking_spec("random", spec.ratio)
    fns = {"step": compile_step(spec), "random_step": compile_step(baseline),
           "selection": compile_selection(spec)}
    calls = {"step": lambda f: f(state, batch), "random_step": lambda f: f(state, batch),
             "selection": lambda f: f(state.params, batch["image"], jnp.int32(3))}
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # compile and warm up
      jax.block_until_ready(calls[name](fn))
    for _ in range(args.rounds):
      for name, fn in fns.items():
        repeat = 10 if name == "selection" else 1
        times[name].append(timed(lambda f=fn, n=name: calls[n](f), repeat))
    med = {name: statistics.median(t) for name, t in times.items()}
    rows.append((kind, spec.ratio, masking.num_kept(grid[0] * grid[1], spec.ratio), med))
    print(f"{kind}: {med}", flush=True)

  print("\n| kind | ratio | K | step (s) | step with random (s) | step − random | "
        "selection alone (s) | selection / step |")
  print("|---|---|---|---|---|---|---|---|")
  for kind, ratio, k, med in rows:
    extra = med["step"] - med["random_step"]
    print(f"| {kind} | {ratio:g} | {k} | {med['step']:.4f} | {med['random_step']:.4f} | "
          f"{100 * extra / med['step']:+.1f}% | {med['selection']:.5f} | "
          f"{100 * med['selection'] / med['step']:.2f}% |")


if __name__ == "__main__":
  main(sys.argv[1:])
