"""Contrastive losses over the global batch.

The embeddings passed in are global `jax.Array`s sharded over the batch; computing `img @ txt.T`
inside the compiled step lets XLA insert the gathers, so every example sees every other example of
the global batch as a negative (as FLIP/GLIP/A-CLIP do). Logits are float32 whatever the compute
dtype, because the softmax over tens of thousands of negatives is where bf16 loses the signal.
"""

import jax
import jax.numpy as jnp
import optax

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
