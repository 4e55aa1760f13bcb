"""A-CLIP (Yang et al., ICCV 2023; SPEC §4): EMA teacher, attentive masking, SSL heads and losses.

One compiled step does everything, from the state and the batch alone:
  1. EMA update of the teacher (image tower + BYOL projector) from the current parameters, with the
     momentum on a cosine schedule 0.996 → 1.0 over the run (the authors update before the forward,
     so do we);
  2. teacher forward (no gradient) on the full zoom-out view: [CLS]→patch attention averaged over
     heads and all layers is the score map, the BYOL projector gives the regression targets;
  3. the score map is resampled into each online view's patch grid through the crop boxes
     (bilinear, vectorised), pooled to blocks, and the top blocks are kept (25 of 49 → 100 of 196
     patches for a 14×14 grid) — deterministically, by glip_jax.masking's 'attentive' kernel;
  4. one student forward over both masked online views (stacked on the batch axis), one text
     forward, the SimCLR / BYOL heads, and the loss
       w_clip·(CLIP(v1) + CLIP(v2)) + w_simclr·NT-Xent(v1, v2) + w_byol·BYOL(v1, v2 → teacher).

Parameters: `state.params` is the CLIP parameter tree plus `state.params['aclip_heads']` (the SSL
heads), so the CLIP model and every consumer of CLIP params (evaluation, export) are unchanged —
flax ignores the extra key. `state.ema_params` = {'image': …, 'projector': …} is just more pytree
and is checkpointed with the state.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh

from glip_jax import flops
from glip_jax import losses
from glip_jax import masking
from glip_jax import sharding as sharding_lib
from glip_jax import train_step as train_step_lib
from glip_jax.models import clip as clip_lib
from glip_jax.models import layers
from glip_jax.models import vit

HEADS_KEY = "aclip_heads"  # where the SSL heads' parameters live inside state.params


# ----------------------------------------------------------------------------------------------
# Configuration.

def default_config() -> ml_collections.ConfigDict:
  """The `config.aclip` section with the paper's values (SPEC §4)."""
  return ml_collections.ConfigDict(dict(
      ema_momentum=(0.996, 1.0),  # cosine schedule of the teacher's EMA momentum, start → end
      block_size=2,  # attentive masking selects square blocks of block_size² patches
      keep_blocks_fraction=0.5,  # kept blocks = ceil(blocks · fraction): 25 of 49 on 14×14
      simclr_temperature=0.1,
      weights=dict(clip=0.5, simclr=1.0, byol=2.0),  # clip: per online view
      # Layer widths after the input (the input is the image tower's width D):
      simclr_dims=(4096, 4096, 256),  # SimCLR MLP D→4096→4096→256
      projector_dims=(4096, 256),  # BYOL projector D→4096→256 (also EMA'd for the teacher)
      predictor_dims=(4096, 256),  # BYOL predictor 256→4096→256
  ))


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the A-CLIP loss terms; `clip` applies to each online view."""

  clip: float = 0.5
  simclr: float = 1.0
  byol: float = 2.0


@dataclasses.dataclass(frozen=True)
class ACLIPSpec:
  """Static A-CLIP settings (hashable); built from `config.aclip` by `spec_from_config`."""

  total_steps: int
  ema_momentum: tuple[float, float] = (0.996, 1.0)
  block_size: int = 2
  keep_blocks_fraction: float = 0.5
  simclr_temperature: float = 0.1
  weights: LossWeights = LossWeights()
  simclr_dims: tuple[int, ...] = (4096, 4096, 256)
  projector_dims: tuple[int, ...] = (4096, 256)
  predictor_dims: tuple[int, ...] = (4096, 256)

  def __post_init__(self):
    m0, m1 = self.ema_momentum
    if not 0.0 <= m0 <= m1 <= 1.0:
      raise ValueError(f"aclip.ema_momentum={self.ema_momentum!r}; need 0 <= start <= end <= 1.")
    if self.block_size < 1:
      raise ValueError(f"aclip.block_size={self.block_size!r} must be an int >= 1.")
    if not 0.0 < self.keep_blocks_fraction <= 1.0:
      raise ValueError(f"aclip.keep_blocks_fraction={self.keep_blocks_fraction!r} must be in (0, 1].")
    if self.simclr_temperature <= 0:
      raise ValueError(f"aclip.simclr_temperature={self.simclr_temperature!r} must be > 0.")
    for name in ("clip", "simclr", "byol"):
      if getattr(self.weights, name) < 0:
        raise ValueError(f"aclip.weights.{name}={getattr(self.weights, name)!r} must be >= 0.")
    for name in ("simclr_dims", "projector_dims", "predictor_dims"):
      dims = getattr(self, name)
      if not dims or any(int(d) < 1 for d in dims):
        raise ValueError(f"aclip.{name}={dims!r} must be a non-empty list of positive widths.")
    if self.predictor_dims[-1] != self.projector_dims[-1]:
      raise ValueError(f"aclip.predictor_dims[-1]={self.predictor_dims[-1]} must equal "
                       f"aclip.projector_dims[-1]={self.projector_dims[-1]}: the predictor "
                       f"regresses the teacher projector's output.")


def spec_from_config(config: ml_collections.ConfigDict, total_steps: int) -> ACLIPSpec:
  """Validates `config.aclip` and returns the static spec the step closes over."""
  allowed = set(default_config().keys())
  unknown = set(config.keys()) - allowed
  if unknown:
    raise ValueError(f"aclip has unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}.")
  weights = config.weights.to_dict() if hasattr(config.weights, "to_dict") else dict(config.weights)
  unknown = set(weights) - {"clip", "simclr", "byol"}
  if unknown:
    raise ValueError(f"aclip.weights has unknown fields {sorted(unknown)}; "
                     f"allowed: ['byol', 'clip', 'simclr'].")
  return ACLIPSpec(
      total_steps=int(total_steps),
      ema_momentum=tuple(float(m) for m in config.ema_momentum),
      block_size=int(config.block_size),
      keep_blocks_fraction=float(config.keep_blocks_fraction),
      simclr_temperature=float(config.simclr_temperature),
      weights=LossWeights(**{k: float(v) for k, v in weights.items()}),
      simclr_dims=tuple(int(d) for d in config.simclr_dims),
      projector_dims=tuple(int(d) for d in config.projector_dims),
      predictor_dims=tuple(int(d) for d in config.predictor_dims),
  )


def block_grid(grid: tuple[int, int], block_size: int) -> tuple[int, int]:
  """Grid of blocks (rows, cols); raises ValueError unless the patch grid divides evenly."""
  rows, cols = grid
  if rows % block_size or cols % block_size:
    raise ValueError(f"aclip.block_size={block_size} does not divide the patch grid {grid}; "
                     f"use a block size that divides both {rows} and {cols}.")
  return rows // block_size, cols // block_size


def num_kept_blocks(num_blocks: int, fraction: float) -> int:
  """ceil(num_blocks · fraction), at least 1 (25 of 49; the authors keep int(49·0.5)+1 = 25)."""
  return max(1, math.ceil(num_blocks * fraction - 1e-9))


def num_kept_patches(grid: tuple[int, int], spec: ACLIPSpec) -> int:
  """Patches per online view under attentive masking (100 of 196 for a 14×14 grid)."""
  rows, cols = block_grid(grid, spec.block_size)
  return num_kept_blocks(rows * cols, spec.keep_blocks_fraction) * spec.block_size ** 2


# ----------------------------------------------------------------------------------------------
# Heads. BatchNorm (the authors') needs cross-replica batch statistics and mutable state under
# data-parallel jit; LayerNorm normalises each example on its own, so the heads stay pure functions
# of the parameters and shard like everything else.

class MLPHead(nn.Module):
  """Dense → LayerNorm → ReLU for each hidden width, then a final Dense to dims[-1]."""

  dims: tuple[int, ...]
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    for i, width in enumerate(self.dims[:-1]):
      x = nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype,
                   kernel_init=layers.dense_init((layers.EMBED if i == 0 else None, layers.MLP)),
                   bias_init=layers.zeros_init((layers.MLP,)), name=f"dense_{i}")(x)
      x = nn.LayerNorm(
          epsilon=1e-5, dtype=jnp.float32,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (layers.MLP,)),
          bias_init=layers.zeros_init((layers.MLP,)), name=f"norm_{i}")(x.astype(jnp.float32))
      x = nn.relu(x).astype(self.dtype)
    last = len(self.dims) - 1
    x = nn.Dense(self.dims[-1], use_bias=self.use_bias, dtype=self.dtype,
                 kernel_init=layers.dense_init((layers.MLP if last else layers.EMBED, None)),
                 bias_init=layers.zeros_init((None,)), name=f"dense_{last}")(x)
    return x.astype(jnp.float32)


class ACLIPHeads(nn.Module):
  """SimCLR MLP, BYOL projector and BYOL predictor on the image tower's pooled features."""

  simclr_dims: tuple[int, ...]
  projector_dims: tuple[int, ...]
  predictor_dims: tuple[int, ...]
  dtype: Any = jnp.float32

  def setup(self):
    # As the authors: a biased SimCLR MLP, bias-free BYOL projector and predictor.
    self.simclr = MLPHead(self.simclr_dims, use_bias=True, dtype=self.dtype)
    self.projector = MLPHead(self.projector_dims, use_bias=False, dtype=self.dtype)
    self.predictor = MLPHead(self.predictor_dims, use_bias=False, dtype=self.dtype)

  def __call__(self, pooled: jax.Array) -> dict[str, jax.Array]:
    """Student heads: {'simclr': [n, S], 'byol': predictor(projector(pooled)) [n, P]}."""
    return {"simclr": self.simclr(pooled), "byol": self.predictor(self.projector(pooled))}

  def project(self, pooled: jax.Array) -> jax.Array:
    """The projector alone (the teacher side, run with EMA parameters)."""
    return self.projector(pooled)


def build_heads(model: clip_lib.CLIP, spec: ACLIPSpec) -> ACLIPHeads:
  """The SSL heads for a built CLIP model (input width and compute dtype from its image tower)."""
  return ACLIPHeads(spec.simclr_dims, spec.projector_dims, spec.predictor_dims,
                    dtype=model.image.dtype)


# ----------------------------------------------------------------------------------------------
# State and EMA.

@struct.dataclass
class ACLIPState(train_step_lib.TrainState):
  """TrainState plus the EMA teacher: {'image': image-tower params, 'projector': BYOL projector}."""

  ema_params: Any


def teacher_source(params: Any) -> dict[str, Any]:
  """The part of the student parameters that the EMA teacher tracks."""
  return {"image": params["image"], "projector": params[HEADS_KEY]["projector"]}


def ema_momentum(step: jax.Array, spec: ACLIPSpec) -> jax.Array:
  """Cosine schedule from ema_momentum[0] at step 0 to ema_momentum[1] at total_steps (BYOL)."""
  start, end = spec.ema_momentum
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(spec.total_steps, 1), 0.0, 1.0)
  return end - (end - start) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def ema_update(ema_params: Any, params: Any, momentum: jax.Array) -> Any:
  """ema ← m·ema + (1 − m)·params, leaf by leaf."""
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_params, params)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       model_config: ml_collections.ConfigDict, mesh: Mesh, seed: int,
                       aclip_config: ACLIPSpec) -> tuple[ACLIPState, Any]:
  """As train_step.create_train_state, plus the SSL heads and the EMA teacher (= student at init).

  The CLIP parameters are initialised from the same key as the plain CLIP state, so CLIP and A-CLIP
  runs with one seed start from identical towers.
  """
  heads = build_heads(model, aclip_config)
  images, tokens = clip_lib.dummy_inputs(model_config)
  width = model.image.spec.width

  def init(rng):
    params = dict(model.init(rng, images, tokens)["params"])
    params[HEADS_KEY] = heads.init(jax.random.fold_in(rng, 1), jnp.zeros((1, width)))["params"]
    return ACLIPState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=teacher_source(params))

  rng = jax.random.key(seed)
  abstract_boxed = jax.eval_shape(init, rng)
  shardings = sharding_lib.logical_to_shardings(abstract_boxed, mesh)
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


# ----------------------------------------------------------------------------------------------
# Attentive masking: teacher scores → online view grids → blocks → keep indices.

def teacher_scores(attention: jax.Array) -> jax.Array:
  """[CLS]→token attention rows [B, depth, heads, 1+N] → patch scores averaged over layers and heads, [B, N]."""
  return attention[:, :, :, 1:].astype(jnp.float32).mean(axis=(1, 2))


def _interpolation_matrix(coords: jax.Array, size: int) -> jax.Array:
  """Linear interpolation weights [B, n_out, size] sampling a length-`size` axis at `coords`.

  `coords` are in grid-index units (cell i's centre is i); outside [0, size−1] the edge value is
  used, as bilinear resizing does at borders.
  """
  coords = jnp.clip(coords, 0.0, size - 1.0)
  lower = jnp.floor(coords)
  frac = coords - lower
  lower = lower.astype(jnp.int32)
  upper = jnp.minimum(lower + 1, size - 1)
  return ((1.0 - frac)[..., None] * jax.nn.one_hot(lower, size)
          + frac[..., None] * jax.nn.one_hot(upper, size))


def map_scores_to_view(scores: jax.Array, teacher_box: jax.Array, view_box: jax.Array,
                       grid: tuple[int, int]) -> jax.Array:
  """Resamples teacher scores [B, N] (teacher-view grid) onto an online view's grid, [B, N].

  Boxes are normalised image coordinates [top, left, bottom, right]. Each online patch centre is
  placed in the image through `view_box`, expressed in the teacher view through `teacher_box`, and
  the teacher map is sampled there bilinearly. Sampling is separable (rows depend only on the
  patch row), so it is two small batched matmuls — no per-example loop, no gather. The teacher box
  contains the view box, so the view spans at most the teacher's grid and point sampling does not
  alias.
  """
  rows, cols = grid
  teacher_box = teacher_box.astype(jnp.float32)
  view_box = view_box.astype(jnp.float32)

  def axis_coords(lo, hi, n):
    centres = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n  # in the online view, 0..1
    image = view_box[:, lo, None] + centres[None] * (view_box[:, hi, None] - view_box[:, lo, None])
    extent = teacher_box[:, hi, None] - teacher_box[:, lo, None]
    return (image - teacher_box[:, lo, None]) / extent * n - 0.5  # teacher grid-index units

  weights_y = _interpolation_matrix(axis_coords(0, 2, rows), rows)  # [B, rows_out, rows_in]
  weights_x = _interpolation_matrix(axis_coords(1, 3, cols), cols)  # [B, cols_out, cols_in]
  score_map = scores.astype(jnp.float32).reshape(-1, rows, cols)
  mapped = jnp.einsum("bij,bjk,blk->bil", weights_y, score_map, weights_x)
  return mapped.reshape(scores.shape[0], rows * cols)


def block_scores(scores: jax.Array, grid: tuple[int, int], block_size: int) -> jax.Array:
  """Mean score of each block_size×block_size block, [B, N] → [B, blocks] (row-major blocks)."""
  rows, cols = block_grid(grid, block_size)
  blocks = scores.reshape(-1, rows, block_size, cols, block_size).mean(axis=(2, 4))
  return blocks.reshape(-1, rows * cols)


def blocks_to_patches(block_indices: jax.Array, grid: tuple[int, int],
                      block_size: int) -> jax.Array:
  """Block indices [B, Kb] → the indices of their patches [B, Kb·block_size²], sorted."""
  _, block_cols = block_grid(grid, block_size)
  block_row, block_col = block_indices // block_cols, block_indices % block_cols
  offsets = jnp.arange(block_size)
  patch_row = block_row[:, :, None, None] * block_size + offsets[None, None, :, None]
  patch_col = block_col[:, :, None, None] * block_size + offsets[None, None, None, :]
  patches = (patch_row * grid[1] + patch_col).reshape(block_indices.shape[0], -1)
  return jnp.sort(patches, axis=-1).astype(jnp.int32)


def attentive_keep_indices(scores: jax.Array, grid: tuple[int, int], spec: ACLIPSpec,
                           sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """Patches of the top-scoring blocks, int32 [B, num_kept_patches] sorted; deterministic.

  Selection is glip_jax.masking's 'attentive' kernel (top-K of the given scores, shard-local
  under a batch sharding) applied on the block grid, then each block expands to its patches.
  Ties go to the lower block index (lax.top_k), so the result is a function of the scores alone.
  """
  blocks = block_grid(grid, spec.block_size)
  num_blocks = blocks[0] * blocks[1]
  kept = num_kept_blocks(num_blocks, spec.keep_blocks_fraction)
  pooled = block_scores(scores, grid, spec.block_size)
  if kept == num_blocks:
    block_indices = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32), pooled.shape)
  else:
    block_spec = masking.MaskingSpec("attentive", ratio=1.0 - kept / num_blocks)
    assert masking.num_kept(num_blocks, block_spec.ratio) == kept
    block_indices = masking.keep_indices(None, block_spec, pooled.shape[0], blocks, scores=pooled,
                                         sharding=sharding)
  return blocks_to_patches(block_indices, grid, spec.block_size)


# ----------------------------------------------------------------------------------------------
# Losses.

def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """SimCLR NT-Xent between paired views [B, d] over the global batch → (loss, top-1 accuracy).

  For each anchor in view 1 the positive is its view-2 partner; negatives are every other example
  of both views (2B − 2). Symmetrised over the two views, as SLIP/A-CLIP's SIMCLRLoss. The authors'
  A-CLIP code passes view 1 as both views (a bug); this is the intended v1-vs-v2 pairing.
  """
  z1, z2 = _l2_normalize(z1), _l2_normalize(z2)
  n = z1.shape[0]
  labels = jnp.arange(n)
  self_mask = 1e9 * jnp.eye(n, dtype=jnp.float32)
  logits_12 = z1 @ z2.T / temperature
  logits_11 = z1 @ z1.T / temperature - self_mask
  logits_21 = z2 @ z1.T / temperature
  logits_22 = z2 @ z2.T / temperature - self_mask
  logits_1 = jnp.concatenate([logits_12, logits_11], axis=1)
  logits_2 = jnp.concatenate([logits_21, logits_22], axis=1)
  loss_1 = optax.softmax_cross_entropy_with_integer_labels(logits_1, labels).mean()
  loss_2 = optax.softmax_cross_entropy_with_integer_labels(logits_2, labels).mean()
  accuracy = jnp.mean(jnp.argmax(logits_1, axis=1) == labels)
  return 0.5 * (loss_1 + loss_2), accuracy


def byol_loss(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean of 2 − 2·cos(prediction, target); targets get no gradient."""
  p = _l2_normalize(predictions)
  z = _l2_normalize(jax.lax.stop_gradient(targets))
  return jnp.mean(2.0 - 2.0 * jnp.sum(p * z, axis=-1))


# ----------------------------------------------------------------------------------------------
# The train step.

def _clip_params(params: Any) -> dict[str, Any]:
  return {k: v for k, v in params.items() if k != HEADS_KEY}


def train_step(state: ACLIPState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               spec: train_step_lib.StepSpec, aclip_spec: ACLIPSpec,
               batch_sharding: jax.sharding.Sharding | None = None) -> tuple[ACLIPState, dict]:
  """One A-CLIP step on a global batch from glip_jax.data.views (three views, boxes, text)."""
  heads = build_heads(model, aclip_spec)
  weights = aclip_spec.weights
  batch_size = batch["image"].shape[0]
  n = spec.grid[0] * spec.grid[1]

  def constrain(x):
    return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

  # Teacher: EMA first (the authors' order: the teacher sees the parameters of this step).
  momentum = ema_momentum(state.step, aclip_spec)
  ema_params = ema_update(state.ema_params, teacher_source(state.params), momentum)
  teacher_params = jax.lax.stop_gradient(ema_params)
  attentive = spec.masking.kind == "attentive"
  teacher = model.apply({"params": {**_clip_params(state.params), "image": teacher_params["image"]}},
                        batch["teacher_image"], None, attentive, method="image_features")
  targets = heads.apply({"params": {"projector": teacher_params["projector"]}}, teacher["pooled"],
                        method="project")

  # Both online views in one forward. Stacking on axis 1 then merging keeps each example's two
  # views on the device that holds the example: no data moves between devices.
  views = jnp.stack([batch["image"], batch["image2"]], axis=1)
  views = constrain(views.reshape(2 * batch_size, *views.shape[2:]))
  if attentive:
    scores = jax.lax.stop_gradient(teacher_scores(teacher["attention"]))
    mapped = jnp.stack([map_scores_to_view(scores, batch["teacher_box"], batch[box], spec.grid)
                        for box in ("box1", "box2")], axis=1)
    keep = attentive_keep_indices(constrain(mapped.reshape(2 * batch_size, n)), spec.grid,
                                  aclip_spec, sharding=batch_sharding)
  else:  # the 'random 2×50%' ablation (or none/gaussian): the standard kernel, per view
    rng = train_step_lib.step_rng(spec.seed, state.step)
    keep = masking.keep_indices(jax.random.fold_in(rng, 0), spec.masking, 2 * batch_size,
                                spec.grid, sharding=batch_sharding)
  targets = jnp.repeat(targets, 2, axis=0)  # row 2b+v of the views pairs with teacher row b

  def loss_fn(params):
    clip_params = _clip_params(params)
    image = model.apply({"params": clip_params}, views, keep, method="image_features")
    text_emb = model.apply({"params": clip_params}, batch["text"], method="encode_text")
    head_out = heads.apply({"params": params[HEADS_KEY]}, image["pooled"])
    image_emb = _l2_normalize(image["embedding"]).reshape(batch_size, 2, -1)
    clip_losses, accuracies = [], {}
    for v in range(2):
      outputs = {"image_emb": image_emb[:, v], "text_emb": text_emb,
                 "logit_scale": clip_params["logit_scale"]}
      if "logit_bias" in clip_params:
        outputs["logit_bias"] = clip_params["logit_bias"]
      value, aux = losses.contrastive_loss(spec.loss, outputs)
      clip_losses.append(value)
      if v == 0:
        accuracies = aux  # in-batch retrieval accuracies are reported for view 1
    simclr = head_out["simclr"].reshape(batch_size, 2, -1)
    loss_simclr, simclr_accuracy = nt_xent(simclr[:, 0], simclr[:, 1], aclip_spec.simclr_temperature)
    loss_byol = byol_loss(head_out["byol"], targets)
    loss = (weights.clip * (clip_losses[0] + clip_losses[1]) + weights.simclr * loss_simclr
            + weights.byol * loss_byol)
    aux = {
        "loss_clip": 0.5 * (clip_losses[0] + clip_losses[1]),
        "loss_simclr": loss_simclr,
        "loss_byol": loss_byol,
        "simclr_accuracy": simclr_accuracy,
        **accuracies,
    }
    return loss, (aux, clip_params["logit_scale"])

  (loss, (aux, logit_scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  params, opt_state = train_step_lib.apply_gradients(state, grads, tx)
  metrics = train_step_lib.step_metrics(state, grads, schedule, loss, aux, logit_scale, spec.grid,
                                        keep)
  metrics["ema_momentum"] = momentum
  new_state = ACLIPState(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_params)
  return new_state, metrics


def compile_train_step(model: nn.Module, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, spec: train_step_lib.StepSpec, mesh: Mesh,
                       state_shardings: Any, aclip_config: ACLIPSpec) -> Callable:
  """`jax.jit` of the A-CLIP train_step with explicit shardings and the state donated."""
  if spec.masking.kind == "attentive":
    block_grid(spec.grid, aclip_config.block_size)  # fails before compiling, naming the field
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, spec=spec,
                           aclip_spec=aclip_config,
                           batch_sharding=sharding_lib.batch_sharding(mesh))
  return train_step_lib.jit_train_step(step, mesh, state_shardings)


# ----------------------------------------------------------------------------------------------
# Cost model.

def _mlp_flops(in_dim: int, dims: Sequence[int]) -> float:
  widths = (in_dim, *dims)
  return float(sum(2 * a * b for a, b in zip(widths[:-1], widths[1:])))


def aclip_train_flops_per_example(model_config: ml_collections.ConfigDict,
                                  aclip_config: ACLIPSpec | ml_collections.ConfigDict,
                                  masking_spec: masking.MaskingSpec | None = None) -> float:
  """Training FLOPs per example: teacher forward on the full zoom-out view, two masked student
  views (fwd+bwd), text (fwd+bwd) and the heads. Patches kept per view follow `masking_spec`:
  None or kind 'attentive' → attentive blocks; otherwise the standard kernel's K (random ablation).
  The EMA update (~3 FLOPs per tracked parameter per step) is negligible per example and omitted.
  """
  spec = vit.parse_variant(model_config.image.variant)
  grid = clip_lib.grid(model_config)
  n = grid[0] * grid[1]
  if masking_spec is None or masking_spec.kind == "attentive":
    rows, cols = block_grid(grid, aclip_config.block_size)
    kept = num_kept_blocks(rows * cols, aclip_config.keep_blocks_fraction) * aclip_config.block_size ** 2
  elif masking_spec.active:
    kept = masking.num_kept(n, masking_spec.ratio)
  else:
    kept = n
  # image_forward_flops keeps masking.num_kept(n, ratio) patches; this ratio gives exactly `kept`.
  teacher = flops.image_forward_flops(model_config, 0.0)
  student = flops.image_forward_flops(model_config, 1.0 - kept / n)
  width, proj_out = spec.width, aclip_config.projector_dims[-1]
  heads = (_mlp_flops(width, aclip_config.simclr_dims) + _mlp_flops(width, aclip_config.projector_dims)
           + _mlp_flops(proj_out, aclip_config.predictor_dims))
  teacher_projector = _mlp_flops(width, aclip_config.projector_dims)
  return (teacher + teacher_projector
          + 3.0 * (2 * student + flops.text_forward_flops(model_config) + 2 * heads))
