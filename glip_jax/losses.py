"""Contrastive losses over the global batch.

The embeddings passed in are global `jax.Array`s sharded over the batch; computing `img @ txt.T`
inside the compiled step lets XLA insert the gathers, so every example sees every other example of
the global batch as a negative (as FLIP/GLIP/A-CLIP do). Logits are float32 whatever the compute
dtype, because the softmax over tens of thousands of negatives is where bf16 loses the signal.
"""

import jax
import jax.numpy as jnp
import optax

from glip_jax.models.clip import l2_normalize

LOSSES = ("softmax", "sigmoid")


def _logits(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  return jnp.exp(logit_scale.astype(jnp.float32)) * image_emb @ text_emb.T


def in_batch_accuracy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Top-1 image→text and text→image retrieval accuracy within the batch."""
  labels = jnp.arange(logits.shape[0])
  i2t = jnp.mean(jnp.argmax(logits, axis=1) == labels)
  t2i = jnp.mean(jnp.argmax(logits, axis=0) == labels)
  return i2t, t2i


def softmax_contrastive(image_emb: jax.Array, text_emb: jax.Array,
                        logit_scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE (CLIP): mean of image→text and text→image cross-entropies."""
  logits = _logits(image_emb, text_emb, logit_scale)
  labels = jnp.arange(logits.shape[0])
  loss_i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss_t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  i2t, t2i = in_batch_accuracy(logits)
  return 0.5 * (loss_i2t + loss_t2i), {"i2t_accuracy": i2t, "t2i_accuracy": t2i}


def sigmoid_contrastive(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                        logit_bias: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SigLIP: independent binary losses on every pair, summed over pairs, averaged over images."""
  logits = _logits(image_emb, text_emb, logit_scale) + logit_bias.astype(jnp.float32)
  signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]
  i2t, t2i = in_batch_accuracy(logits)
  return loss, {"i2t_accuracy": i2t, "t2i_accuracy": t2i}


def contrastive_loss(kind: str, outputs: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Dispatches on `loss.kind` given the CLIP module's outputs."""
  if kind == "softmax":
    return softmax_contrastive(outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"])
  if kind == "sigmoid":
    if "logit_bias" not in outputs:
      raise ValueError("loss.kind='sigmoid' needs model.logit_bias_init set (SigLIP uses -10.0).")
    return sigmoid_contrastive(outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"],
                               outputs["logit_bias"])
  raise ValueError(f"loss.kind={kind!r} is not a loss; allowed: {list(LOSSES)}.")


# ----------------------------------------------------------------------------------------------
# Self-supervised losses of A-CLIP's image views (SLIP's SimCLR, BYOL).

def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """SimCLR NT-Xent between paired views [B, d] over the global batch → (loss, top-1 accuracy).

  For each anchor in view 1 the positive is its view-2 partner; negatives are every other example
  of both views (2B − 2). Symmetrised over the two views, as SLIP/A-CLIP's SIMCLRLoss. The authors'
  A-CLIP code passes view 1 as both views (a bug); this is the intended v1-vs-v2 pairing.
  """
  z1, z2 = l2_normalize(z1), l2_normalize(z2)
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
  p = l2_normalize(predictions)
  z = l2_normalize(jax.lax.stop_gradient(targets))
  return jnp.mean(2.0 - 2.0 * jnp.sum(p * z, axis=-1))
