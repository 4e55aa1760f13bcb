"""The PyTorch reference for interop tests: open_clip on CPU (the optional 'interop' extra).

`import_open_clip()` skips the calling test module when torch or open_clip is absent. torchvision
from the index is a CUDA build whose compiled operators do not register beside the CPU torch
("operator torchvision::nms does not exist"); open_clip imports it but uses none of them, so
`torch.library.register_fake` is a no-op for `torchvision::*` names while torchvision is imported
(see /work/shared/ENV.md).
"""

import numpy as np
import pytest

from glip_jax.models import vit


def import_open_clip():
  """(torch, open_clip), or skip the module with the reason."""
  torch = pytest.importorskip("torch", reason="PyTorch is not installed (the 'interop' extra)")
  library = torch.library
  original = library.register_fake

  def register_fake(name, *args, **kwargs):
    if isinstance(name, str) and name.startswith("torchvision::"):
      return lambda fn=None, *a, **k: fn
    return original(name, *args, **kwargs)

  library.register_fake = register_fake
  try:
    open_clip = pytest.importorskip(
        "open_clip", reason="open_clip_torch is not installed (the 'interop' extra)")
  finally:
    library.register_fake = original
  return torch, open_clip


def create(open_clip, config: dict, seed: int, perturb: bool = True):
  """A random-init open_clip CLIP (eval mode) from a model-config dict; with every bias,
  LayerNorm gain and the temperature perturbed so that zeros and ones cannot hide a mapping bug."""
  import torch
  torch.manual_seed(seed)
  model = open_clip.CLIP(**config).eval()
  if perturb:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
      for name, param in model.named_parameters():
        if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
          param.add_(0.1 * torch.randn(param.shape, generator=generator))
      model.logit_scale.add_(0.3)
  return model


def state_dict(model) -> dict:
  """The model's state dict as float32 numpy arrays."""
  return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def normalize_images(images: np.ndarray):
  """uint8 NHWC → the float NCHW tensor open_clip's transforms produce (CLIP mean/std)."""
  import torch
  x = (images.astype(np.float32) / 255.0 - np.array(vit.CLIP_MEAN, np.float32)) / np.array(
      vit.CLIP_STD, np.float32)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def forward(model, images: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
  """open_clip's normalised image and text embeddings and image→text logits, as numpy."""
  import torch
  with torch.no_grad():
    image = model.encode_image(normalize_images(images), normalize=True)
    text = model.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True)
    logits = model.logit_scale.exp() * image @ text.T
  return {"image_emb": image.numpy(), "text_emb": text.numpy(), "logits": logits.numpy()}
