"""Analytic FLOPs against SPEC §7's published ViT-B/16 figures and hand arithmetic.

The expectations are written out from the model's dimensions with SPEC §7's per-token formula
2·(12·D² + 2·n·D) per block (MLP width 4·D), never from glip_jax.flops itself, so a wrong token
count (forgotten [CLS], masking applied to the text, patch embedding on kept patches only), a
wrong factor or a wrong width fails here.
"""

import pytest

from glip_jax import flops
from glip_jax.aclip import spec as aclip
from glip_jax import masking
from glip_jax.models import clip as clip_lib


def spec_block_flops(tokens: int, width: int, depth: int) -> int:
  """SPEC §7: forward FLOPs of `depth` blocks on `tokens` tokens, 2·(12·D² + 2·n·D) per token."""
  return depth * tokens * 2 * (12 * width ** 2 + 2 * tokens * width)


# ViT-B/16 at 224 px: 14×14 = 196 patches of 16·16·3 = 768 values, width 768, 12 blocks,
# embed 512. Patch embedding: a 768→768 matmul on all 196 patches (also when masking); the
# [CLS] token joins the kept patches; the image projection 768→512 runs on [CLS] only.
PATCH_EMBED = 2 * 196 * 768 * 768  # 231,211,008
IMAGE_PROJ = 2 * 768 * 512  # 786,432
# Text: 77 tokens, width 512, 12 blocks, projection 512→512 on the EOT token.
TEXT = spec_block_flops(77, 512, 12) + 2 * 512 * 512  # 5,959,540,736


def image_forward(kept: int) -> int:
  return spec_block_flops(kept + 1, 768, 12) + PATCH_EMBED + IMAGE_PROJ


def test_vit_b16_figures():
  model = clip_lib.model_config("B/16", 224)
  # Hand arithmetic, exact.
  assert image_forward(196) == 35_126_906_880
  assert TEXT == 5_959_540_736
  assert flops.image_forward_flops(model) == image_forward(196)
  assert flops.text_forward_flops(model) == TEXT
  for ratio, kept in ((0.0, 196), (0.5, 98), (0.75, 49)):
    assert flops.image_forward_flops(model, ratio) == image_forward(kept)
    assert flops.train_flops_per_example(model, ratio) == 3 * (image_forward(kept) + TEXT)
  # SPEC §7's published, rounded figures: 35.1 and ≈6.0 GFLOPs forward; 123 / 70 / 44 GFLOPs per
  # training example; 1.76× and 2.8× fewer.
  unmasked = flops.train_flops_per_example(model, 0.0) / 1e9
  half = flops.train_flops_per_example(model, 0.5) / 1e9
  quarter = flops.train_flops_per_example(model, 0.75) / 1e9
  assert round(flops.image_forward_flops(model) / 1e9, 1) == 35.1
  assert round(flops.text_forward_flops(model) / 1e9, 1) == 6.0
  assert (round(unmasked), round(half), round(quarter)) == (123, 70, 44)
  assert round(unmasked / half, 2) == 1.76 and round(unmasked / quarter, 1) == 2.8


def test_aclip_b16_by_hand():
  """A-CLIP ViT-B/16 (SPEC §4): teacher forward on 196 patches, two students on 100 each
  (25 of 49 2×2 blocks), text, heads; students, text and heads trained (3×)."""
  model = clip_lib.model_config("B/16", 224)
  spec = aclip.spec_from_config(aclip.default_config(), 1)
  simclr = 2 * (768 * 4096 + 4096 * 4096 + 4096 * 256)  # 768→4096→4096→256
  projector = 2 * (768 * 4096 + 4096 * 256)  # 768→4096→256
  predictor = 2 * (256 * 4096 + 4096 * 256)  # 256→4096→256
  heads = simclr + projector + predictor  # per online view
  teacher = image_forward(196) + projector  # EMA tower and EMA projector, forward only
  expected = teacher + 3 * (2 * image_forward(100) + TEXT + 2 * heads)
  assert flops.aclip_train_flops_per_example(model, spec) == expected
  assert round(expected / 1e9, 1) == 159.9  # docs/benchmarks.md's analytic figure
  # The random 2×50% ablation keeps 98 patches per view.
  random = masking.MaskingSpec("random", 0.5)
  assert flops.aclip_train_flops_per_example(model, spec, random) == (
      teacher + 3 * (2 * image_forward(98) + TEXT + 2 * heads))
  assert flops.aclip_train_flops_per_example(model, spec, masking.MaskingSpec("none")) == (
      teacher + 3 * (2 * image_forward(196) + TEXT + 2 * heads))
  assert expected / flops.train_flops_per_example(model) == pytest.approx(1.297, abs=1e-3)
