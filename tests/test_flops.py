"""Analytic FLOPs reproduce SPEC §7's ViT-B/16 figures."""

import pytest

from glip_jax import flops
from glip_jax.models import clip as clip_lib


def test_vit_b16_figures():
  model = clip_lib.model_config("B/16", 224)
  assert flops.image_forward_flops(model) / 1e9 == pytest.approx(35.1, abs=0.1)
  assert flops.text_forward_flops(model) / 1e9 == pytest.approx(6.0, abs=0.05)
  unmasked = flops.train_flops_per_example(model, 0.0) / 1e9
  assert unmasked == pytest.approx(123, abs=1)
  assert flops.train_flops_per_example(model, 0.5) / 1e9 == pytest.approx(70, abs=1)
  assert flops.train_flops_per_example(model, 0.75) / 1e9 == pytest.approx(44, abs=1)
  assert unmasked / (flops.train_flops_per_example(model, 0.5) / 1e9) == pytest.approx(1.76, abs=0.01)
