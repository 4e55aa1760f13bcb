"""Pure train/eval step functions and the optimizer (no I/O).

`train_step(state, batch) -> (state, metrics)` is compiled once with explicit in/out shardings and
the state donated. Token selection happens inside it, from a key derived from (seed, step) only, so
any step can be reproduced exactly — the basis of bit-exact resume.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh

from glip_jax import losses
from glip_jax import masking
from glip_jax import sharding as sharding_lib
from glip_jax.models import clip as clip_lib

MAX_LOGIT_SCALE = math.log(100.0)
# Parameters never decayed (SPEC §2): biases, norms, position embeddings, cls token, temperature.
NO_DECAY_NAMES = frozenset({"bias", "scale", "positional_embedding", "class_embedding",
                            "logit_scale", "logit_bias"})


@struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree that Orbax saves as one item."""

  step: jax.Array
  params: Any
  opt_state: Any


def weight_decay_mask(params: Any) -> Any:
  """True for the parameters AdamW decays: weight matrices and embeddings, nothing else."""
  def decays(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    return name not in NO_DECAY_NAMES and jnp.ndim(leaf) >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak learning rate, then cosine decay to `end_lr` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
      decay_steps=max(total_steps, optim.warmup_steps + 1), end_value=optim.end_lr)


def make_optimizer(optim: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with the no-decay mask, global-norm clipping and warmup+cosine schedule."""
  schedule = make_schedule(optim, total_steps)
  chain = []
  if optim.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=weight_decay_mask))
  return optax.chain(*chain), schedule


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       model_config: ml_collections.ConfigDict, mesh: Mesh,
                       seed: int) -> tuple[TrainState, Any]:
  """Initialises parameters and optimizer state directly in their sharded layout.

  Returns the state and its shardings (a TrainState of NamedSharding), used by the compiled step
  and by checkpoint restore.
  """
  images, tokens = clip_lib.dummy_inputs(model_config)

  def init(rng):
    params = model.init(rng, images, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  rng = jax.random.key(seed)
  # Boxed (nn.Partitioned) shapes carry the logical axes of every parameter and of the optimizer
  # moments that mirror them.
  abstract_boxed = jax.eval_shape(init, rng)
  shardings = sharding_lib.logical_to_shardings(abstract_boxed, mesh)
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def step_rng(seed: int, step: jax.Array) -> jax.Array:
  """The key of one training step: a function of (seed, step) alone."""
  return jax.random.fold_in(jax.random.key(seed), step)


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Static configuration of the train step (hashable: it closes over the compiled function)."""

  masking: masking.MaskingSpec
  grid: tuple[int, int]
  loss: str = "softmax"
  seed: int = 0
  total_steps: int = 0  # for the selection's progress ramp (cluster / pgs); 0 = progress 0
  loss_impl: str = "dense"  # 'dense' | 'ring' (glip_jax.losses)
  accum_steps: int = 1  # micro-batches per step, with cached features (see cached_feature_grads)

  def __post_init__(self):
    losses.check_impl(self.loss_impl)
    check_accum_steps(self.accum_steps)


def check_accum_steps(accum_steps: int, batch_size: int | None = None,
                      data_parallel: int = 1) -> None:
  """Raises ValueError unless `optim.accum_steps` is a positive integer splitting the batch.

  Every micro-batch is itself split over the batch axes, so the global batch must be a multiple
  of accum_steps × the data-parallel size.
  """
  if not isinstance(accum_steps, int) or accum_steps < 1:
    raise ValueError(f"optim.accum_steps={accum_steps!r} is invalid; allowed: an integer >= 1.")
  if batch_size is not None and batch_size % (accum_steps * data_parallel):
    raise ValueError(f"batch_size={batch_size} is not divisible by optim.accum_steps × the "
                     f"data-parallel size = {accum_steps} × {data_parallel}; each micro-batch is "
                     f"split over the devices.")


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule, spec: StepSpec,
               batch_sharding: jax.sharding.Sharding | None = None) -> tuple[TrainState, dict]:
  """One optimisation step on a global batch {'image': uint8 [B,H,W,3], 'text': int32 [B,L]}."""
  images, tokens = batch["image"], batch["text"]
  rng = step_rng(spec.seed, state.step)
  progress = state.step / spec.total_steps if spec.total_steps else 0.0
  keep = masking.keep_indices(jax.random.fold_in(rng, 0), spec.masking, images.shape[0], spec.grid,
                              sharding=batch_sharding, images=images, progress=progress,
                              image_params=state.params["image"])
  mesh = getattr(batch_sharding, "mesh", None)

  def loss_fn(params):
    outputs = model.apply({"params": params}, images, tokens, keep_indices=keep)
    loss, aux = losses.contrastive_loss(spec.loss, outputs, spec.loss_impl, mesh)
    return loss, (aux, outputs["logit_scale"])

  if spec.accum_steps == 1:
    (loss, (aux, logit_scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  else:
    loss, aux, grads = cached_feature_grads(state.params, images, tokens, keep, model=model,
                                            spec=spec, mesh=mesh)
    logit_scale = state.params["logit_scale"]
  params, opt_state = apply_gradients(state, grads, tx)
  metrics = step_metrics(state, grads, schedule, loss, aux, logit_scale, spec.grid, keep)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def cached_feature_grads(params: Any, images: jax.Array, tokens: jax.Array,
                         keep: jax.Array | None, *, model: nn.Module, spec: StepSpec,
                         mesh: Mesh | None) -> tuple[jax.Array, dict[str, jax.Array], Any]:
  """Loss, metrics and parameter gradients of the full batch in `spec.accum_steps` micro-batches.

  Feature caching (open_clip's --accum-freq): embed every micro-batch without gradient, take the
  loss over the whole global batch (all negatives) and its gradient w.r.t. the embeddings, then
  re-run each micro-batch's forward under `jax.vjp` and pull those embedding gradients back to the
  parameters, summing. Only one micro-batch's activations are alive at a time (~1/k of the
  un-accumulated step), for one extra forward pass. Mathematically the gradient is the
  un-accumulated one; `keep` was drawn for the whole batch, so the masks are the same too.
  """
  k = spec.accum_steps
  if images.shape[0] % k:
    raise ValueError(f"batch of {images.shape[0]} is not divisible by optim.accum_steps={k}.")
  micro_sharding = (None if mesh is None else
                    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                        None, sharding_lib.BATCH_AXES)))

  def split(x):
    # [B, ...] → [k, B/k, ...] with micro-batch m = rows m, m+k, m+2k, ...: every device holds
    # B_local/k rows of each micro-batch, so the split moves no data between devices.
    if x is None:
      return None
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return x if micro_sharding is None else jax.lax.with_sharding_constraint(x, micro_sharding)

  def merge(x):
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])

  def embed(p, micro_batch):
    imgs, toks, kp = micro_batch
    out = model.apply({"params": p}, imgs, toks, keep_indices=kp)
    return out["image_emb"], out["text_emb"]

  micro_batches = (split(images), split(tokens), split(keep))
  img_emb, txt_emb = jax.lax.map(functools.partial(embed, params), micro_batches)
  scalar_names = [n for n in ("logit_scale", "logit_bias") if n in params]

  def loss_of_features(features, scalars):
    outputs = {"image_emb": merge(features[0]), "text_emb": merge(features[1]), **scalars}
    return losses.contrastive_loss(spec.loss, outputs, spec.loss_impl, mesh)

  (loss, aux), (feature_grads, scalar_grads) = jax.value_and_grad(
      loss_of_features, argnums=(0, 1), has_aux=True)(
          (img_emb, txt_emb), {n: params[n] for n in scalar_names})

  def accumulate(total, xs):
    micro_batch, cotangent = xs
    _, pullback = jax.vjp(lambda p: embed(p, micro_batch), params)
    return jax.tree.map(jnp.add, total, pullback(cotangent)[0]), None

  grads, _ = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params),
                          (micro_batches, feature_grads))
  grads = {**grads, **{n: grads[n] + scalar_grads[n] for n in scalar_names}}
  return loss, aux, grads


def apply_gradients(state: TrainState, grads: Any,
                    tx: optax.GradientTransformation) -> tuple[Any, Any]:
  """The optimizer update, then the temperature clamp; returns (params, opt_state)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # As open_clip: the temperature is clamped after the update, so it can come back down.
  params = {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)}
  return params, opt_state


def step_metrics(state: TrainState, grads: Any, schedule: optax.Schedule, loss: jax.Array,
                 aux: dict[str, jax.Array], logit_scale: jax.Array, grid: tuple[int, int],
                 keep: jax.Array | None) -> dict[str, jax.Array]:
  """The metrics every train step reports (CLIP/FLIP/GLIP and A-CLIP alike)."""
  return {
      "loss": loss,
      **aux,
      "logit_scale": jnp.exp(logit_scale),
      "grad_norm": optax.global_norm(grads),
      "lr": schedule(state.step),
      "kept_tokens": jnp.asarray(grid[0] * grid[1] if keep is None else keep.shape[1], jnp.float32),
  }


def jit_train_step(step: Callable, mesh: Mesh, state_shardings: Any) -> Callable:
  """`jax.jit(step)` with explicit shardings and the state donated; `step(state, batch)`."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # One batch sharding serves every array of the batch dict (a pytree prefix).
  return jax.jit(step, in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def compile_train_step(model: nn.Module, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, spec: StepSpec, mesh: Mesh,
                       state_shardings: Any) -> Callable:
  """The jitted, sharded train_step for this model, optimizer and step spec."""
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, spec=spec,
                           batch_sharding=sharding_lib.batch_sharding(mesh))
  return jit_train_step(step, mesh, state_shardings)
