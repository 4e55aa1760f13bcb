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
  params = nn.unbox(model.init(jax.random.key(0), *clip_lib.dummy_inputs(config)))["params"]
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


def test_bfloat16_compute_and_remat_agree(tiny):
  config, _, params, images, tokens = tiny
  reference = clip_lib.build_model(config).apply({"params": params}, images, tokens)
  config = config.copy_and_resolve_references()
  config.remat = True
  remat = clip_lib.build_model(config).apply({"params": params}, images, tokens)
  np.testing.assert_allclose(remat["image_emb"], reference["image_emb"], atol=1e-6)
  config.dtype = "bfloat16"
  bf16 = clip_lib.build_model(config).apply({"params": params}, images, tokens)
  assert bf16["image_emb"].dtype == jnp.float32  # embeddings leave the tower in float32
  np.testing.assert_allclose(bf16["image_emb"], reference["image_emb"], atol=0.05)


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
