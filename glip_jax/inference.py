"""Using a trained model from Python: load a checkpoint, embed images and texts, rank captions.

  from glip_jax import inference
  model = inference.load("runs/demo")           # a workdir, its checkpoints/ or one step directory
  probs = model.rank_captions(image, ["a red circle", "a blue square"])   # {caption: probability}

The model config comes from the checkpoint itself (saved with every checkpoint), so nothing but
the path is needed. Images are uint8 arrays [H,W,3] / [B,H,W,3], PIL images or encoded bytes; they
are centre-cropped and resized to the model's input size exactly as evaluation does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from glip_jax import checkpointing
from glip_jax import paths
from glip_jax import sharding as sharding_lib
from glip_jax.data import tokenizer as tokenizer_lib
from glip_jax.evaluation import builder as eval_builder
from glip_jax.data import transforms
from glip_jax.models import clip as clip_lib

ImageLike = Any  # np.ndarray uint8 [H,W,3], PIL.Image.Image or encoded bytes


@dataclasses.dataclass
class Model:
  """A trained CLIP model ready for inference on this process's default device."""

  model: clip_lib.CLIP
  params: Any
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer

  def __post_init__(self):
    self._encode_image = jax.jit(lambda p, x: self.model.apply(
        {"params": p}, x, method=clip_lib.CLIP.encode_image))
    self._encode_text = jax.jit(lambda p, t: self.model.apply(
        {"params": p}, t, method=clip_lib.CLIP.encode_text))

  @property
  def image_size(self) -> int:
    """The side of the square input images."""
    return clip_lib.image_size_hw(self.config.model.image_size)[0]

  def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
    """uint8 [B,S,S,3]: each image centre-cropped and resized as evaluation does."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
      images = list(images)
    elif not isinstance(images, (list, tuple)):
      images = [images]
    return np.stack([transforms.center_crop(im, self.image_size) for im in images])

  def encode_images(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
    """L2-normalised image embeddings [B, E] (float32)."""
    return np.asarray(self._encode_image(self.params, jnp.asarray(self.preprocess(images))))

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    """L2-normalised text embeddings [T, E] (float32)."""
    return np.asarray(self._encode_text(self.params, jnp.asarray(self.tokenizer(list(texts)))))

  def rank_captions(self, image: ImageLike, captions: Sequence[str]) -> dict[str, float]:
    """{caption: probability} for one image, most probable first (softmax at the learnt scale)."""
    logits = float(np.exp(self.params["logit_scale"])) * (
        self.encode_images(image) @ self.encode_texts(captions).T)[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    return {captions[i]: float(probs[i]) for i in order}


def load(path: str | os.PathLike[str], step: int | None = None) -> Model:
  """The model of a checkpoint (a workdir, its checkpoints/ dir or a step dir; latest by default)."""
  path = paths.resolve(path)
  config = ml_collections.ConfigDict(checkpointing.load_config(path, step))
  model = clip_lib.build_model(config.model)
  mesh = sharding_lib.create_mesh({"data": 1}, devices=jax.devices()[:1])
  params = checkpointing.restore_params_from(
      path, sharding_lib.abstract_params(model, config.model, mesh), step)
  tokenizer = eval_builder.make_tokenizer(config)
  return Model(model, params, config, tokenizer)
