"""Contrastive losses over the global batch.

The embeddings passed in are global `jax.Array`s sharded over the batch; every example sees every
other example of the global batch as a negative (as FLIP/GLIP/A-CLIP do). Logits are float32
whatever the compute dtype, because the softmax over tens of thousands of negatives is where bf16
loses the signal; their matmuls run at HIGHEST precision, because TPUs otherwise round float32
matmul operands to bfloat16 (the compiled step all-gathered bf16 embeddings) and the cost, a
[B_local, B, E] product, is negligible next to the towers. Two implementations (`loss.impl`)
give the same values and gradients:

  dense  `img @ txt.T` on global arrays; XLA all-gathers the text embeddings and each device holds
         its [B_local, B_global] logits and their gradient.
  ring   under `shard_map` over the batch axes: text-embedding blocks travel round the devices with
         `ppermute` while each device accumulates its rows' log-sum-exp online; the column (t2i)
         log-sum-exp travels with its text block and comes home after a full turn. A custom VJP
         runs a second ring in the backward pass, so no device ever holds more than
         [B_local, B_local] logits (plus O(B_local·E) embeddings), whatever the global batch.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from glip_jax.models.clip import l2_normalize

LOSSES = ("softmax", "sigmoid")
IMPLS = ("dense", "ring")
# Mesh axes the batch is split over (glip_jax.sharding.BATCH_AXES; not imported to keep this
# module free of the model code).
BATCH_AXES = ("data", "fsdp")


def check_impl(impl: str) -> None:
  """Raises ValueError unless `impl` is a loss implementation."""
  if impl not in IMPLS:
    raise ValueError(f"loss.impl={impl!r} is not a loss implementation; allowed: {list(IMPLS)}.")


def _logits(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  return jnp.exp(logit_scale.astype(jnp.float32)) * _matmul(image_emb, text_emb.T)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


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


def contrastive_loss(kind: str, outputs: dict[str, jax.Array], impl: str = "dense",
                     mesh: Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Dispatches on `loss.kind` and `loss.impl` given the CLIP module's outputs.

  `mesh` is needed by impl 'ring' (its batch axes are the ring).
  """
  if kind not in LOSSES:
    raise ValueError(f"loss.kind={kind!r} is not a loss; allowed: {list(LOSSES)}.")
  check_impl(impl)
  if kind == "sigmoid" and "logit_bias" not in outputs:
    raise ValueError("loss.kind='sigmoid' needs model.logit_bias_init set (SigLIP uses -10.0).")
  image_emb, text_emb, scale = outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"]
  if impl == "ring":
    if mesh is None:
      raise ValueError("loss.impl='ring' needs the device mesh (its batch axes form the ring).")
    # The softmax loss ignores a bias (as the dense one does): a constant cancels in the softmax.
    bias = outputs["logit_bias"] if kind == "sigmoid" else jnp.zeros((), jnp.float32)
    loss, i2t, t2i = ring_loss_fn(kind, mesh)(image_emb, text_emb, scale, bias)
    return loss, {"i2t_accuracy": i2t, "t2i_accuracy": t2i}
  if kind == "softmax":
    return softmax_contrastive(image_emb, text_emb, scale)
  return sigmoid_contrastive(image_emb, text_emb, scale, outputs["logit_bias"])


# ------------------------------------------------------------------------------------ ring losses


def _argmax_update(best: tuple[jax.Array, jax.Array], values: jax.Array, offset: jax.Array,
                   axis: int) -> tuple[jax.Array, jax.Array]:
  """Running (max, first index of the max) over blocks, ties to the lowest global index.

  jnp.argmax over the full row returns the first maximum; blocks arrive in ring order, not index
  order, so the index breaks ties explicitly.
  """
  best_val, best_idx = best
  val = jnp.max(values, axis=axis)
  idx = jnp.argmax(values, axis=axis).astype(jnp.int32) + offset
  better = (val > best_val) | ((val == best_val) & (idx < best_idx))
  return jnp.where(better, val, best_val), jnp.where(better, idx, best_idx)


def _ring_shift(tree, n: int, axes: tuple[str, ...]):
  """Sends every device's arrays to its predecessor on the ring (device d receives d+1's)."""
  if n == 1:
    return tree
  perm = [(i, (i - 1) % n) for i in range(n)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), tree)


def _block_logits(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  return scale * _matmul(img, txt.T) + bias


def _sigmoid_signs(logits: jax.Array, own_block: jax.Array) -> jax.Array:
  """SigLIP's labels of one block: +1 on the positive pairs (only in a device's own block)."""
  eye = jnp.eye(logits.shape[0], logits.shape[1], dtype=jnp.bool_)
  return jnp.where(eye & own_block, 1.0, -1.0)


def _ring_forward(kind: str, img, txt, scale, bias, n: int, axes: tuple[str, ...]):
  """Per-device forward ring. Returns (loss, i2t, t2i) and the residuals of the backward ring."""
  b = img.shape[0]
  me = jax.lax.axis_index(axes)
  neg_inf = jnp.full((b,), -jnp.inf, jnp.float32)
  no_idx = jnp.full((b,), jnp.iinfo(jnp.int32).max, jnp.int32)
  own = _block_logits(img, txt, scale, bias)
  positives = jnp.diagonal(own)

  def visit(s, carry):
    blk, col_lse, col_best, row_lse, row_best, sig_sum = carry
    src = (me + s) % n  # the device whose text block this is
    logits = _block_logits(img, blk, scale, bias)
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
    col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(logits, axis=0))
    row_best = _argmax_update(row_best, logits, src * b, axis=1)
    col_best = _argmax_update(col_best, logits, me * b, axis=0)
    if kind == "sigmoid":
      signs = _sigmoid_signs(logits, s == 0)
      sig_sum = sig_sum - jnp.sum(jax.nn.log_sigmoid(signs * logits))
    return blk, col_lse, col_best, row_lse, row_best, sig_sum

  def step(s, carry):
    blk, col_lse, col_best, *rest = visit(s, carry)
    # The text block moves on with its column statistics; after n moves they are home again.
    blk, col_lse, col_best = _ring_shift((blk, col_lse, col_best), n, axes)
    return (blk, col_lse, col_best, *rest)

  carry = (txt, neg_inf, (neg_inf, no_idx), neg_inf, (neg_inf, no_idx), jnp.float32(0.0))
  carry = jax.lax.fori_loop(0, n - 1, step, carry)
  _, col_lse, col_best, row_lse, row_best, sig_sum = visit(n - 1, carry)
  col_lse, col_best = _ring_shift((col_lse, col_best), n, axes)

  total = b * n
  labels = me * b + jnp.arange(b, dtype=jnp.int32)
  i2t = jax.lax.psum(jnp.sum(row_best[1] == labels), axes) / total
  t2i = jax.lax.psum(jnp.sum(col_best[1] == labels), axes) / total
  if kind == "softmax":
    local = 0.5 * (jnp.sum(row_lse - positives) + jnp.sum(col_lse - positives))
  else:
    local = sig_sum
  loss = jax.lax.psum(local, axes) / total
  return (loss, i2t, t2i), (row_lse, col_lse)


def _ring_backward(kind: str, img, txt, scale, bias, row_lse, col_lse, g, n: int,
                   axes: tuple[str, ...]):
  """Per-device backward ring: recomputes each logits block and sends d(text) home with it."""
  b = img.shape[0]
  total = b * n

  def step(s, carry):
    blk, blk_col_lse, d_blk, d_img, d_scale, d_bias = carry
    logits = _block_logits(img, blk, scale, bias)
    if kind == "softmax":
      eye = jnp.eye(b, dtype=jnp.float32) * (s == 0)
      grad = (0.5 * (jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - blk_col_lse[None, :]))
              - eye) / total
    else:
      signs = _sigmoid_signs(logits, s == 0)
      grad = -signs * jax.nn.sigmoid(-signs * logits) / total
    grad = g * grad
    d_img = d_img + scale * _matmul(grad, blk)
    d_blk = d_blk + scale * _matmul(grad.T, img)
    d_scale = d_scale + jnp.sum(grad * _matmul(img, blk.T))
    d_bias = d_bias + jnp.sum(grad)
    blk, blk_col_lse, d_blk = _ring_shift((blk, blk_col_lse, d_blk), n, axes)
    return blk, blk_col_lse, d_blk, d_img, d_scale, d_bias

  zeros = jnp.zeros_like(img)
  carry = (txt, col_lse, zeros, zeros, jnp.float32(0.0), jnp.float32(0.0))
  _, _, d_txt, d_img, d_scale, d_bias = jax.lax.fori_loop(0, n, step, carry)
  return d_img, d_txt, jax.lax.psum(d_scale, axes), jax.lax.psum(d_bias, axes)


@functools.lru_cache(maxsize=None)
def ring_loss_fn(kind: str, mesh: Mesh) -> Callable:
  """`(image_emb, text_emb, logit_scale, logit_bias) -> (loss, i2t_acc, t2i_acc)` as a ring.

  The embeddings are global arrays sharded over the mesh's batch axes; `logit_scale` is the log
  temperature (as the parameter), `logit_bias` is 0 for the softmax loss.
  """
  if kind not in LOSSES:
    raise ValueError(f"loss.kind={kind!r} is not a loss; allowed: {list(LOSSES)}.")
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  batch, rep = P(axes), P()
  # check_vma off: the loop carries start replicated and become device-varying; the results the
  # out_specs call replicated are psums.
  shard = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)

  @shard(in_specs=(batch, batch, rep, rep), out_specs=((rep, rep, rep), (batch, batch)))
  def forward(img, txt, scale, bias):
    return _ring_forward(kind, img, txt, scale, bias, n, axes)

  @shard(in_specs=(batch, batch, rep, rep, batch, batch, rep),
         out_specs=(batch, batch, rep, rep))
  def backward(img, txt, scale, bias, row_lse, col_lse, g):
    return _ring_backward(kind, img, txt, scale, bias, row_lse, col_lse, g, n, axes)

  @jax.custom_vjp
  def ring(img, txt, temperature, bias):
    return forward(img, txt, temperature, bias)[0]

  def fwd(img, txt, temperature, bias):
    out, (row_lse, col_lse) = forward(img, txt, temperature, bias)
    return out, (img, txt, temperature, bias, row_lse, col_lse)

  def bwd(res, cotangents):
    g = cotangents[0]  # the accuracies are not differentiable
    return backward(*res, g)

  ring.defvjp(fwd, bwd)

  def loss_fn(image_emb, text_emb, logit_scale, logit_bias):
    # Casts and the exp stay outside the custom VJP: autodiff handles their chain rule.
    return ring(image_emb.astype(jnp.float32), text_emb.astype(jnp.float32),
                jnp.exp(logit_scale.astype(jnp.float32)), logit_bias.astype(jnp.float32))

  return loss_fn


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
