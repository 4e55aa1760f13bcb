"""CLIP towers: shapes, open_clip parameter parity, token dropping against a reference forward."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glip_jax.models import clip as clip_lib
from reference_vit import reference_vit


def param_count(variant, image_size=224):
  config = clip_lib.model_config(variant, image_size)
  model = clip_lib.build_model(config)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *clip_lib.dummy_inputs(config))))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"])), shapes["params"]


def test_b16_matches_open_clip_parameter_count():
  # open_clip ViT-B-16: 149,620,737 parameters (86,192,640 visual + 63,428,096 text + logit_scale).
  total, params = param_count("B/16")
  assert total == 149_620_737
  visual = sum(math.prod(x.shape) for x in jax.tree.leaves(params["image"]))
  assert visual == 86_192_640


@pytest.mark.parametrize("variant,expected", [("L/14", 427_616_513), ("B/32", 151_277_313)])
def test_more_open_clip_parameter_counts(variant, expected):
  assert param_count(variant)[0] == expected


@pytest.fixture(scope="module")
def tiny():
  config = clip_lib.model_config("mu/8", (32, 48))  # non-square: a 4×6 grid
  config.text.context_length = 12
  model = clip_lib.build_model(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *clip_lib.dummy_inputs(config)))["params"]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
  tokens = rng.integers(1, 1000, (3, 12)).astype(np.int32)
  tokens[:, 7] = 49407
  tokens[:, 8:] = 0
  return config, model, params, images, tokens


def test_shapes(tiny):
  config, model, params, images, tokens = tiny
  out = model.apply({"params": params}, images, tokens)
  assert out["image_emb"].shape == (3, config.embed_dim)
  assert out["text_emb"].shape == (3, config.embed_dim)
  np.testing.assert_allclose(jnp.linalg.norm(out["image_emb"], axis=-1), 1.0, rtol=1e-5)
  assert float(out["logit_scale"]) == pytest.approx(math.log(1 / 0.07))
  assert params["image"]["positional_embedding"].shape == (1 + 4 * 6, 64)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_keeping_all_patches_in_order_equals_no_masking(tiny):
  _, model, params, images, _ = tiny
  full = model.apply({"params": params}, images, method="encode_image")
  identity = jnp.tile(jnp.arange(24, dtype=jnp.int32), (3, 1))
  kept = model.apply({"params": params}, images, identity, method="encode_image")
  np.testing.assert_allclose(full, kept, atol=1e-6)


def test_forward_on_kept_tokens_equals_independent_reference(tiny):
  _, model, params, images, _ = tiny
  keep = np.array([[0, 5, 23, 11], [3, 4, 9, 20], [1, 2, 7, 8]], np.int32)
  ours = model.apply({"params": params}, images, keep, normalize=False, method="encode_image")
  reference, _ = reference_vit(params["image"], images, keep)
  np.testing.assert_allclose(ours, reference, rtol=2e-4, atol=2e-5)
  # Order of kept tokens is irrelevant: position embeddings travel with the tokens.
  shuffled = model.apply({"params": params}, images, keep[:, ::-1].copy(), normalize=False,
                         method="encode_image")
  np.testing.assert_allclose(ours, shuffled, atol=2e-5)


def test_text_pools_at_eot_and_is_causal(tiny):
  _, model, params, _, tokens = tiny
  base = model.apply({"params": params}, tokens, method="encode_text")
  after_eot = tokens.copy()
  after_eot[:, 8:] = 123  # tokens after EOT cannot influence it under the causal mask
  np.testing.assert_allclose(model.apply({"params": params}, after_eot, method="encode_text"), base,
                             atol=1e-6)
  before_eot = tokens.copy()
  before_eot[:, 2] += 1
  assert not np.allclose(model.apply({"params": params}, before_eot, method="encode_text"), base)


# bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8. Every activation rounded to bf16
# adds a relative error of about u (rms u/√3 per rounding; they accumulate through the two blocks,
# partly cancelling). Measured on this tiny model: the embeddings' rms error relative to their rms
# component is 1.6·u. A correct bf16 cast must land between 0.5·u and 4·u: computing in float32
# (the dtype ignored) gives 0, float16 (u = 2^-11) gives 0.23·u of bf16, and any cast coarser than
# bf16 or a numerics bug (masking, overflow) exceeds 4·u.
BF16_U = 2.0 ** -8


def _relative_rms_error(x, reference):
  x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
  return np.sqrt(np.mean((x - reference) ** 2)) / np.sqrt(np.mean(reference ** 2))


def test_bfloat16_compute_is_bf16_with_float32_outputs(tiny):
  config, _, params, images, tokens = tiny
  reference = jax.jit(clip_lib.build_model(config).apply)({"params": params}, images, tokens)
  config = config.copy_and_resolve_references()
  config.dtype = "bfloat16"
  bf16_model = clip_lib.build_model(config)
  bf16 = jax.jit(bf16_model.apply)({"params": params}, images, tokens)
  for name in ("image_emb", "text_emb"):
    assert bf16[name].dtype == jnp.float32  # embeddings leave the tower in float32
    # The L2 normalisation runs in float32: bf16 would leave the norm off by ~u.
    np.testing.assert_allclose(jnp.linalg.norm(bf16[name], axis=-1), 1.0, atol=1e-6)
    error = _relative_rms_error(bf16[name], reference[name])
    assert 0.5 * BF16_U < error < 4 * BF16_U, (name, error / BF16_U)
  # The attention softmax runs in float32 (rows sum to 1 to float32 precision, not bf16's).
  attention = jax.jit(lambda p, x: bf16_model.apply(
      {"params": p}, x, return_attention=True, method=clip_lib.CLIP.image_features))(
          params, images)["attention"]
  assert attention.dtype == jnp.float32
  np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-6)
  # float16 is a different cast: 8× finer, so well below the bf16 band.
  config.dtype = "float16"
  fp16 = jax.jit(clip_lib.build_model(config).apply)({"params": params}, images, tokens)
  assert _relative_rms_error(fp16["image_emb"], reference["image_emb"]) < 0.5 * BF16_U


def test_remat_gives_the_same_forward_and_gradients(tiny):
  """Rematerialisation recomputes the blocks in the backward pass: same values, same gradients."""
  config, model, params, images, tokens = tiny
  config = config.copy_and_resolve_references()
  config.remat = True
  remat_model = clip_lib.build_model(config)

  def loss(m, p):
    out = m.apply({"params": p}, images, tokens)
    # Contrastive-like: every embedding and the logit scale get a gradient.
    logits = jnp.exp(out["logit_scale"]) * out["image_emb"] @ out["text_emb"].T
    return jax.nn.logsumexp(logits, axis=1).mean() - jnp.diagonal(logits).mean(), out

  (loss_ref, out_ref), grads_ref = jax.jit(jax.value_and_grad(
      lambda p: loss(model, p), has_aux=True))(params)
  remat_grad = jax.value_and_grad(lambda p: loss(remat_model, p), has_aux=True)
  (loss_remat, out_remat), grads_remat = jax.jit(remat_grad)(params)
  np.testing.assert_allclose(out_remat["image_emb"], out_ref["image_emb"], atol=1e-6)
  np.testing.assert_allclose(loss_remat, loss_ref, rtol=1e-6)
  flat_ref = jax.tree_util.tree_leaves_with_path(grads_ref)
  flat_remat = dict(jax.tree_util.tree_leaves_with_path(grads_remat))
  assert len(flat_ref) == len(flat_remat)
  # Recomputation may reassociate float32 sums: differences of a few float32 ulps of the leaf's
  # largest gradient (measured: 8e-7 on gradients of ~0.02, 4e-5 of the entry). A remat bug
  # (a block's gradient cut, recomputed with another mask or key) changes gradients by O(1).
  for path, g in flat_ref:
    g = np.asarray(g)
    scale = np.abs(g).max()
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(flat_remat[path], g, rtol=1e-4, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))
  # Remat is really on: the backward pass recomputes inside checkpoint regions.
  jaxpr = str(jax.make_jaxpr(remat_grad)(params))
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  assert "checkpoint" not in str(jax.make_jaxpr(
      jax.grad(lambda p: loss(model, p)[0]))(params))


def test_sincos_avgpool_and_sigmoid_bias_options():
  config = clip_lib.model_config("mu/8", 32)
  config.image.pos_embedding = "sincos"
  config.image.pool = "avg"
  config.logit_bias_init = -10.0
  model = clip_lib.build_model(config)
  params = nn.unbox(model.init(jax.random.key(0), *clip_lib.dummy_inputs(config)))["params"]
  assert "positional_embedding" not in params["image"]
  assert float(params["logit_bias"]) == -10.0
  out = model.apply({"params": params}, *clip_lib.dummy_inputs(config, 2))
  assert out["image_emb"].shape == (2, 64) and "logit_bias" in out


@pytest.mark.parametrize("field,value,message", [
    ("image_size", 30, r"model.image_size=\(30, 30\) is not divisible by the patch size 8"),
    ("dtype", "float64", r"model.dtype='float64'.*allowed"),
])
def test_bad_model_config(field, value, message):
  config = clip_lib.model_config("mu/8", 32)
  config[field] = value
  with pytest.raises(ValueError, match=message):
    clip_lib.build_model(config)


def test_unknown_variant():
  with pytest.raises(ValueError, match=r"model.image.variant='X/16'.*'B'"):
    clip_lib.model_config("X/16")


def test_dot_product_attention_equals_einsum(tiny):
  """jax.nn.dot_product_attention: same embeddings (masked image, causal text), same [CLS] rows."""
  config, model, params, images, tokens = tiny
  config = config.copy_and_resolve_references()
  config.attention_impl = "dot_product"
  fast = clip_lib.build_model(config)
  keep = jnp.asarray(np.sort(np.random.default_rng(1).permuted(
      np.tile(np.arange(24), (3, 1)), axis=1)[:, :12], axis=1), jnp.int32)
  ref = model.apply({"params": params}, images, tokens, keep_indices=keep)
  out = fast.apply({"params": params}, images, tokens, keep_indices=keep)
  for name in ("image_emb", "text_emb"):
    np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
  ref_attn = model.apply({"params": params}, images, return_attention=True,
                         method=clip_lib.CLIP.image_features)["attention"]
  attn = fast.apply({"params": params}, images, return_attention=True,
                    method=clip_lib.CLIP.image_features)["attention"]
  assert attn.shape == ref_attn.shape == (3, 2, 2, 25)  # [B, depth, heads, 1+N]
  np.testing.assert_allclose(attn, ref_attn, rtol=1e-5, atol=1e-7)


def test_bad_attention_impl():
  config = clip_lib.model_config("mu/8", 32)
  config.attention_impl = "flash"
  with pytest.raises(ValueError, match=r"model.attention_impl='flash'.*allowed: \['einsum', "
                                       r"'dot_product'\]"):
    clip_lib.build_model(config)
