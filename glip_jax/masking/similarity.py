"""Similarity-cluster kinds: cluster masking (Wei et al., CVPR 2024) and CLIP-PGS (Pei et al.,
CVPR 2025). See ../../docs/masking.md and SPEC_SELECTION.md for the algorithms and the reference
code's bugs.

Both drop the patches most similar to a few random anchors. With a static K the exact form is a
ranking: keep score = −max over anchors of the similarity, top-K. That equals a per-image
threshold that drops exactly N−K patches, so no threshold search and no coupling across the
batch. Only the anchor rows [B, A, N] of the similarity are computed, except for PGS's
optimal-transport normalisation, which needs the full [B, N, N] matrix.
"""

import jax
import jax.numpy as jnp

from glip_jax.masking.core import SelectionInputs, constrain, replicated, select_top_k
from glip_jax.masking.spec import MaskingSpec
from glip_jax.models import vit

# Below float32 resolution of any real similarity difference that matters, above its spacing near
# 1 (6e-8): breaks exact ties (identical patches) at random rather than by index.
TIE_BREAK = 1e-5
# The reference codes' per-patch standardisation eps.
STD_EPS = 1e-6
# Luma weights (ITU-R BT.601) for the grayscale image Sobel runs on.
LUMA = (0.299, 0.587, 0.114)


def _require_images(spec: MaskingSpec, inputs: SelectionInputs, grid: tuple[int, int]):
  if inputs.images is None:
    raise ValueError(f"masking.kind={spec.kind!r} scores patches from the pixels; no images "
                     "were given to the selection.")
  _, h, w, _ = inputs.images.shape
  if h % grid[0] or w % grid[1] or h // grid[0] != w // grid[1]:
    raise ValueError(f"images of {h}x{w} px do not split into square patches on the grid {grid}.")
  return inputs.images, h // grid[0]


def patchify(x: jax.Array, patch: int) -> jax.Array:
  """[B,H,W,C] → [B, N, p·p·C], raster patch order, (row, col, channel) inside a patch."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def standardise(v: jax.Array) -> jax.Array:
  """Per-patch (v − mean)/sqrt(var_unbiased + eps): cluster masking's standardisation."""
  mean = v.mean(-1, keepdims=True)
  var = jnp.sum((v - mean) ** 2, -1, keepdims=True) / (v.shape[-1] - 1)
  return (v - mean) / jnp.sqrt(var + STD_EPS)


def unit(v: jax.Array) -> jax.Array:
  """v/‖v‖; a zero (flat) patch stays zero, so its cosine to anything is 0 instead of NaN."""
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)


def pixel_patches(images: jax.Array, patch: int) -> jax.Array:
  """CLIP-normalised patch vectors [B, N, p·p·3], as the model sees them before conv1."""
  return patchify(vit.normalize_images(images, jnp.float32), patch)


def patch_embeddings(patches: jax.Array, image_params, sharding=None) -> jax.Array:
  """conv1(patch) + position embedding [B, N, D] from the image tower's (frozen) parameters."""
  kernel = jax.lax.stop_gradient(image_params["conv1"]["kernel"]).astype(jnp.float32)
  # conv1 is FSDP-sharded over its output width; the forward pass gathers it anyway, and a whole
  # kernel per device keeps this per-image einsum free of reductions across devices.
  kernel = constrain(kernel, replicated(sharding))
  emb = jnp.einsum("bnp,pd->bnd", patches, kernel.reshape(-1, kernel.shape[-1]))
  if "positional_embedding" in image_params:  # learned; absent for fixed sin-cos embeddings
    pos = jax.lax.stop_gradient(image_params["positional_embedding"]).astype(jnp.float32)
    emb = emb + constrain(pos, replicated(sharding))[1:]
  return emb


def anchor_rows(x: jax.Array, anchors: jax.Array) -> jax.Array:
  """Cosines of the anchors to every patch, [B, A, N], from unit vectors x [B, N, d]."""
  xa = jnp.take_along_axis(x, anchors[:, :, None], axis=1)
  return jnp.einsum("bad,bnd->ban", xa, x)


def _embed_weight(spec: MaskingSpec, inputs: SelectionInputs) -> jax.Array | float:
  """w = embed_mix · progress: the reference codes' epoch/32 ramp, as a fraction of training."""
  if spec.embed_mix == 0 or (spec.kind == "cluster" and spec.as_coded):
    return 0.0  # cluster masking's use_embed path raises NameError: RGB only, as coded
  if inputs.image_params is None:
    raise ValueError(f"masking.embed_mix={spec.embed_mix} for kind {spec.kind!r} needs the image "
                     "tower's parameters (conv1); none were given. Set masking.embed_mix=0.")
  return spec.embed_mix * jnp.clip(jnp.asarray(inputs.progress, jnp.float32), 0.0, 1.0)


def _features(spec, inputs, patches, sharding):
  """Unit pixel vectors and (when mixed in) unit embeddings, with the mixing weight."""
  pix = unit(standardise(patches))
  w = _embed_weight(spec, inputs)
  emb = None if isinstance(w, float) else unit(patch_embeddings(patches, inputs.image_params,
                                                                sharding))
  return pix, emb, w


def _mixed(pix_sim, emb_sim, w):
  return pix_sim if emb_sim is None else (1.0 - w) * pix_sim + w * emb_sim


def cluster_score(rng: jax.Array, spec: MaskingSpec, grid: tuple[int, int],
                  inputs: SelectionInputs, sharding=None) -> jax.Array:
  """Cluster masking: drop the patches nearest (in cosine) to A random anchors."""
  images, patch = _require_images(spec, inputs, grid)
  n = grid[0] * grid[1]
  k_anchor, k_tie = jax.random.split(rng)
  anchors = select_top_k(jax.random.uniform(k_anchor, (inputs.batch_size, n)),
                         spec.num_anchors(n), sharding)
  pix, emb, w = _features(spec, inputs, pixel_patches(images, patch), sharding)
  sim = _mixed(anchor_rows(pix, anchors), None if emb is None else anchor_rows(emb, anchors), w)
  tie = constrain(jax.random.uniform(k_tie, (inputs.batch_size, n)), sharding)
  threshold = 0.5 if spec.as_coded and spec.threshold is None else spec.threshold
  return _score_from_similarity(sim, threshold, tie)


def _score_from_similarity(sim: jax.Array, threshold: float | None, tie: jax.Array) -> jax.Array:
  """Keep score from anchor rows [B,A,N]: exact ranking, or the fixed-threshold cluster mask."""
  if threshold is None:
    return -sim.max(axis=1) + TIE_BREAK * tie
  # Option "closest to the code": a patch is in a cluster when any anchor's similarity exceeds
  # the threshold (strict, as coded). Visible patches first, then the rest at random.
  masked = jnp.any(sim > threshold, axis=1)
  return 2.0 * (1.0 - masked) + tie


def cluster_fraction(images: jax.Array, spec: MaskingSpec, grid: tuple[int, int],
                     threshold: float, rng: jax.Array) -> jax.Array:
  """Mean fraction of patches a fixed `threshold` puts in the anchors' clusters (pixel cosine)."""
  _, patch = _require_images(spec, SelectionInputs(images.shape[0], images), grid)
  n = grid[0] * grid[1]
  anchors = select_top_k(jax.random.uniform(rng, (images.shape[0], n)), spec.num_anchors(n))
  sim = anchor_rows(unit(standardise(pixel_patches(images, patch))), anchors)
  return jnp.mean(jnp.any(sim > threshold, axis=1))


def calibrate_threshold(images: jax.Array, spec: MaskingSpec, grid: tuple[int, int],
                        target: float, rng: jax.Array, steps: int = 20) -> float:
  """The fixed threshold whose mean cluster fraction on `images` is `target` (bisection).

  Cluster masking's intended `search()` (never called by its main.py), run offline on a few
  batches; set the result as masking.threshold.
  """
  fraction = jax.jit(lambda t: cluster_fraction(images, spec, grid, t, rng))
  lo, hi = -1.0, 1.0  # the fraction falls as the threshold rises
  for _ in range(steps):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if float(fraction(mid)) > target else (lo, mid)
  return 0.5 * (lo + hi)


def sobel_magnitude(gray: jax.Array, pad_mode: str) -> jax.Array:
  """|∇| of [B,H,W] with the 3×3 Sobel pair Gx=[[-1,0,1],[-2,0,2],[-1,0,1]], Gy=Gxᵀ."""
  g = jnp.pad(gray, ((0, 0), (1, 1), (1, 1)), mode=pad_mode)
  h, w = gray.shape[1:]

  def at(dy, dx):
    return g[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

  gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
  gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
  return jnp.sqrt(gx ** 2 + gy ** 2)


def _min_max(x: jax.Array) -> jax.Array:
  lo = x.min(axis=-1, keepdims=True)
  hi = x.max(axis=-1, keepdims=True)
  return (x - lo) / (hi - lo + 1e-6)


def edge_map(images: jax.Array, patch: int) -> jax.Array:
  """Per-patch edge strength [B, N] in [0, 1]: Sobel on the grayscale image, mean per patch.

  Edge padding, so the image border is not an edge; min-max per image, as the reference code.
  """
  gray = jnp.tensordot(images.astype(jnp.float32) / 255.0, jnp.asarray(LUMA), axes=1)
  mag = sobel_magnitude(gray, "edge")
  b, h, w = mag.shape
  pooled = mag.reshape(b, h // patch, patch, w // patch, patch).mean(axis=(2, 4))
  return _min_max(pooled.reshape(b, -1))


def edge_map_as_coded(pix_std: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """CLIP-PGS's edge map: Sobel on the per-patch mean of *standardised* patches (≈ 0: noise)."""
  gray = pix_std.mean(-1).reshape(-1, *grid)
  return _min_max(sobel_magnitude(gray, "constant").reshape(gray.shape[0], -1))


def sinkhorn(sim: jax.Array, temperature: float, iters: int) -> jax.Array:
  """Doubly-stochastic plan [B,N,N] of the positive kernel exp((S − 1)/T), fixed iterations.

  S ≤ 1 (a cosine), so the kernel lies in (0, 1] and cannot overflow; a fixed count needs no
  batch-global convergence test (which would be a cross-device reduction).
  """
  kernel = jnp.exp((sim - 1.0) / temperature)

  def body(_, uv):
    _, v = uv
    u = 1.0 / jnp.einsum("bij,bj->bi", kernel, v)
    v = 1.0 / jnp.einsum("bij,bi->bj", kernel, u)
    return u, v

  ones = jnp.ones(sim.shape[:2], sim.dtype)
  u, v = jax.lax.fori_loop(0, iters, body, (ones, ones))
  return u[:, :, None] * kernel * v[:, None, :]


def sinkhorn_as_coded(sim: jax.Array, iters: int) -> jax.Array:
  """CLIP-PGS's OTN: alternate column/row division of S itself (signed: does not converge)."""
  def body(_, m):
    c = m.sum(axis=1, keepdims=True)
    r = m.sum(axis=2, keepdims=True)  # from the same M: the row step uses stale sums, as coded
    return m / (c + 1e-3) / (r + 1e-3)

  return jax.lax.fori_loop(0, iters, body, sim)


def pgs_score(rng: jax.Array, spec: MaskingSpec, grid: tuple[int, int],
              inputs: SelectionInputs, sharding=None) -> jax.Array:
  """CLIP-PGS: anchors away from edges, OT-normalised similarity clusters dropped, edges kept."""
  images, patch = _require_images(spec, inputs, grid)
  n = grid[0] * grid[1]
  k_anchor, k_tie = jax.random.split(rng)
  patches = pixel_patches(images, patch)
  pix, emb, w = _features(spec, inputs, patches, sharding)
  noise = constrain(jax.random.uniform(k_anchor, (inputs.batch_size, n)), sharding)
  tie = constrain(jax.random.uniform(k_tie, (inputs.batch_size, n)), sharding)
  if spec.as_coded:
    edge = edge_map_as_coded(standardise(patches), grid)
    anchors = select_top_k(noise + 1e6 * edge, spec.num_anchors(n), sharding)  # edges → masked
  else:
    edge = edge_map(images, patch)
    anchors = select_top_k(noise - spec.edge_weight * edge, spec.num_anchors(n), sharding)

  def full(x):
    return jnp.einsum("bid,bjd->bij", x, x)

  if spec.otn:
    sim = _mixed(full(pix), None if emb is None else full(emb), w)
    if spec.as_coded:
      sim = sim + sinkhorn_as_coded(sim, spec.sinkhorn_iters)
    else:
      # The plan's entries are ~1/N; ×N puts them on the cosine's scale (mean 1 per row).
      sim = sim + n * sinkhorn(sim, spec.temperature, spec.sinkhorn_iters)
    rows = jnp.take_along_axis(sim, anchors[:, :, None], axis=1)
  else:
    rows = _mixed(anchor_rows(pix, anchors), None if emb is None else anchor_rows(emb, anchors), w)

  if spec.as_coded:
    return _score_from_similarity(rows, 0.5 if spec.threshold is None else spec.threshold, tie)
  score = _score_from_similarity(rows, spec.threshold, tie) + spec.edge_weight * edge
  # Anchors seed the masks: always dropped, whatever their edge strength.
  is_anchor = jnp.any(anchors[:, :, None] == jnp.arange(n), axis=1)
  return jnp.where(is_anchor, -jnp.inf, score)
