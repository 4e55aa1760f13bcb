"""Masking that saves memory: remat policies, low-precision attention probabilities, collectives,
and the AOT fit report for every method (CPU, 8 fake devices)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import demo
from glip_jax import aot
from glip_jax import flops
from glip_jax.models import clip as clip_lib
from glip_jax.models import layers

RATIO = 0.75


def _config(ratio: float, policy: str = "dots_no_batch"):
  """An image-heavy tiny CLIP: 65 image tokens unmasked (mu/4 at 32 px), an 8-token text tower."""
  config = common.base_config("mu/4", 32)
  config.model.embed_dim = 64
  config.model.text.update(width=64, heads=2, depth=2, context_length=8, vocab_size=1000)
  config.model.remat_policy = policy
  config.masking.kind, config.masking.ratio = ("random", ratio) if ratio else ("none", 0.0)
  config.batch_size = 256  # 32 per device
  return config


@pytest.fixture(scope="module")
def compiled():
  """{ratio: CompiledStep} of the default step with the dots_no_batch policy."""
  return {ratio: aot.compile_train_step(_config(ratio)) for ratio in (0.0, RATIO)}


def test_temporaries_fall_with_the_kept_tokens(compiled):
  """At 75% masking the image tower runs 1 + 16 of 65 tokens: the step's temporaries must fall
  with them. With nothing fixed the ratio would be 17/65 = 0.26; the text tower, the [B, B]
  logits and the gradient/optimizer buffers (~parameter-sized, ~1 MiB here) do not shrink, and
  measured it is ~0.3 (docs/pod_scale.md). 0.45 leaves room for compiler noise but fails if the
  per-layer activations stop scaling with the tokens (unmasked-size buffers at 75%)."""
  full, masked = compiled[0.0], compiled[RATIO]
  assert full.argument_bytes == masked.argument_bytes
  assert masked.temp_bytes < 0.45 * full.temp_bytes, (masked.temp_bytes, full.temp_bytes)


def test_masking_adds_no_cross_device_collective(compiled):
  """Token selection and the gather are shard-local: the masked step's all-gathers and
  all-to-alls are exactly the unmasked step's (the dense loss's text-embedding gathers)."""
  def kinds(step):
    return {k: (v.count, v.instructions) for k, v in step.collectives.items()
            if k in ("all-gather", "all-to-all", "collective-permute")}
  assert kinds(compiled[RATIO]) == kinds(compiled[0.0])
  assert "all-to-all" not in compiled[RATIO].collectives


@functools.lru_cache(maxsize=None)
def _grads(policy: str, dtype: str = "float32"):
  config = _config(0.0, policy).model
  config.dtype = dtype
  model = clip_lib.build_model(config)
  images, tokens = clip_lib.dummy_inputs(config, batch_size=4)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, images.shape), jnp.uint8)
  tokens = jnp.asarray(rng.integers(1, 999, tokens.shape), jnp.int32)
  keep = jnp.asarray(np.sort(rng.permutation(64)[:16])[None].repeat(4, 0), jnp.int32)
  params = clip_lib.build_model(_config(0.0, "none").model).init(
      jax.random.key(0), images, tokens)["params"]

  def loss(p):
    out = model.apply({"params": p}, images, tokens, keep_indices=keep)
    return jnp.sum(out["image_emb"] @ out["text_emb"].T * jnp.arange(4.0))

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", [pytest.param("full", marks=pytest.mark.slow), pytest.param("dots_no_batch", marks=pytest.mark.slow)])
def test_remat_policy_does_not_change_gradients(policy):
  (value, grads), (ref_value, ref_grads) = _grads(policy), _grads("none")
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  flat, ref = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
  assert len(flat) == len(ref) and any(np.abs(r).max() > 0 for r in ref)
  for g, r in zip(flat, ref):
    # Recomputation reorders float32 sums: round-off relative to each gradient's scale.
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(np.abs(r).max()))


def test_low_precision_softmax_values_and_gradient():
  """softmax_lowp: the float32 softmax rounded to bf16, and its float32-computed VJP."""
  logits = jax.random.normal(jax.random.key(1), (2, 3, 5, 7)) * 3
  g = jax.random.normal(jax.random.key(2), logits.shape)
  probs, pullback = jax.vjp(lambda x: layers.softmax_lowp(x, jnp.bfloat16), logits)
  assert probs.dtype == jnp.bfloat16
  np.testing.assert_array_equal(probs, jax.nn.softmax(logits).astype(jnp.bfloat16))
  _, ref_pullback = jax.vjp(jax.nn.softmax, logits)
  (grad,), (ref,) = pullback(g.astype(jnp.bfloat16)), ref_pullback(g)
  assert grad.dtype == jnp.float32
  np.testing.assert_allclose(grad, ref, atol=0.03 * float(jnp.abs(ref).max()))


def test_bad_remat_policy_names_the_field():
  config = _config(0.0, "selective").model
  with pytest.raises(ValueError, match=r"model.remat_policy='selective'.*allowed: \['none', "
                                       r"'full', 'dots_no_batch'\]"):
    clip_lib.build_model(config)


def test_accumulation_factor_in_throughput_and_mfu():
  """k > 1 runs 4 forwards' worth per example (1 cached + 3): TFLOP/s and MFU count 4/3."""
  assert flops.accumulation_factor(1) == 1.0 and flops.accumulation_factor(4) == 4.0 / 3.0
  # 1200 examples in 2 s on 4 v5e chips at 3 GFLOP per plain example, 4 micro-batches:
  # 600 ex/s × 3e9 × 4/3 / 4 chips = 6e11 FLOP/s per chip; MFU 6e11 / 197e12.
  out = flops.throughput_metrics(1200, 2.0, 3e9, 4, "TPU v5 lite", accum_steps=4)
  assert out["tflops_per_s_per_device"] == pytest.approx(0.6)
  assert out["mfu"] == pytest.approx(6e11 / 197e12)
  plain = flops.throughput_metrics(1200, 2.0, 3e9, 4, "TPU v5 lite")
  assert plain["tflops_per_s_per_device"] == pytest.approx(0.45)


@pytest.mark.slow  # minute-scale on CI's 2 cores: keeps `make test` under 10 minutes
def test_aot_compiles_the_aclip_step():
  """The fit report compiles whatever the method's compile_train_step gives: A-CLIP's state
  carries the EMA teacher and heads (more argument bytes than CLIP's), its batch three views."""
  config = demo.get_config("aclip")
  config.model.image.variant = "mu/8"
  config.model.text.update(width=64, heads=2, depth=2, context_length=8, vocab_size=1000)
  config.model.embed_dim = 64
  config.batch_size = 64
  result = aot.compile_train_step(config)
  plain = config.copy_and_resolve_references()
  plain.method, plain.masking.kind = "clip", "none"
  clip_result = aot.compile_train_step(plain)
  assert result.argument_bytes > clip_result.argument_bytes > 0
  assert result.temp_bytes > 0 and result.flops > 0
  assert result.analytic_flops > clip_result.analytic_flops
