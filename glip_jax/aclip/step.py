"""The A-CLIP train step: EMA teacher, attentive masking, two masked views, SSL heads, one update.

One compiled step does everything, from the state and the batch alone:
  1. EMA update of the teacher (image tower + BYOL projector) from the current parameters, with the
     momentum on a cosine schedule (config `aclip.ema_momentum`, 0.996 → 1.0 over the run; the
     authors update before the forward, so do we);
  2. teacher forward (no gradient) on the full zoom-out view: [CLS]→patch attention averaged over
     heads and all layers is the score map, the BYOL projector gives the regression targets;
  3. the score map is resampled into each online view's patch grid through the crop boxes, pooled
     to blocks, and the top blocks are kept (glip_jax/aclip/geometry.py);
  4. one student forward over both masked online views (stacked on the batch axis), one text
     forward, the SimCLR / BYOL heads, and the loss
       w_clip·(CLIP(v1) + CLIP(v2)) + w_simclr·NT-Xent(v1, v2) + w_byol·BYOL(v1, v2 → teacher).

Parameters: `state.params` is the CLIP parameter tree plus `state.params['aclip_heads']` (the SSL
heads), so the CLIP model and every consumer of CLIP params (evaluation, export) are unchanged —
flax ignores the extra key. `state.ema_params` = {'image': …, 'projector': …} is just more pytree
and is checkpointed with the state.
"""

import functools
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
from glip_jax import train_step as train_step_lib
from glip_jax.aclip.geometry import attentive_keep_indices, map_scores_to_view, teacher_scores
from glip_jax.aclip.heads import build_heads
from glip_jax.aclip.spec import HEADS_KEY, ACLIPSpec, block_grid
from glip_jax.models import clip as clip_lib


@struct.dataclass
class ACLIPState(train_step_lib.TrainState):
  """TrainState plus the EMA teacher: {'image': image-tower params, 'projector': BYOL projector}."""

  ema_params: Any


def teacher_source(params: Any) -> dict[str, Any]:
  """The part of the student parameters that the EMA teacher tracks."""
  return {"image": params["image"], "projector": params[HEADS_KEY]["projector"]}


def momentum_at(step: jax.Array, spec: ACLIPSpec) -> jax.Array:
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
  momentum = momentum_at(state.step, aclip_spec)
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
    image_emb = clip_lib.l2_normalize(image["embedding"]).reshape(batch_size, 2, -1)
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
    loss_simclr, simclr_accuracy = losses.nt_xent(simclr[:, 0], simclr[:, 1], aclip_spec.simclr_temperature)
    loss_byol = losses.byol_loss(head_out["byol"], targets)
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
