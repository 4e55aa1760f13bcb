"""What every evaluator shares: the `Evaluator` protocol and embedding of padded eval batches.

Evaluators receive the model as injected callables rather than a model object, so the trainer and
the checkpoint watcher can hand in whatever (jitted, sharded) encoders they already have:

  encode_image(params, images_uint8[B,H,W,3], keep_indices=None|int32[B,K]) -> [B,E]
  encode_text(params, tokens_int32[B,L]) -> [B,E]

Eval batches are dicts of numpy arrays with a fixed batch size (so one compilation serves the
whole set); the last batch is padded and 'mask' is False for the padding examples.
"""
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from glip_jax.models.clip import l2_normalize

Params = Any
Batch = Mapping[str, np.ndarray]
ImageEncoder = Callable[..., jax.Array]
TextEncoder = Callable[[Params, jax.Array], jax.Array]
Tokenizer = Callable[[list[str]], np.ndarray]
# Masked-inference regime: select_keep(rng, images uint8 [B,H,W,3]) -> keep_indices int32 [B, K].
Masking = Callable[[jax.Array, jax.Array], jax.Array]
BatchesFn = Callable[[], Iterable[Batch]]

# Masked inference must not depend on when or how often the evaluator runs, so its keys derive
# from a fixed seed and the batch index rather than from the training RNG.
MASKING_SEED = 0


@runtime_checkable
class Evaluator(Protocol):
  """One evaluation protocol on one dataset, run on a given set of parameters."""

  name: str

  def run(self, params: Params) -> dict[str, float]:
    """Evaluates `params`; returns metric name -> value."""
    ...


def to_host(x: jax.Array | np.ndarray) -> np.ndarray:
  """A global array as a numpy array on this host (gathered across processes if needed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# Cached per encoder: a fresh jit wrapper on every evaluation run would recompile every time.
@functools.lru_cache(maxsize=64)
def make_image_embedder(encode_image: ImageEncoder) -> Callable[..., jax.Array]:
  """jit(params, images, keep_indices) -> L2-normalised image embeddings [B,E]."""
  # Jitting around a possibly already-jitted encoder is cheap (the inner jit is inlined) and fuses
  # the normalisation into the same program.
  def embed(params, images, keep_indices):
    # Unmasked: call with two arguments, so an encoder jitted with two in_shardings also fits.
    if keep_indices is None:
      return l2_normalize(encode_image(params, images))
    return l2_normalize(encode_image(params, images, keep_indices))

  return jax.jit(embed)


@functools.lru_cache(maxsize=64)
def make_text_embedder(encode_text: TextEncoder) -> Callable[..., jax.Array]:
  """jit(params, tokens) -> L2-normalised text embeddings [B,E]."""
  return jax.jit(lambda params, tokens: l2_normalize(encode_text(params, tokens)))


def keep_indices_for_batch(masking: Masking | None, batch_index: int,
                           images: np.ndarray) -> jax.Array | None:
  """Deterministic keep indices for batch `batch_index`, or None for unmasked inference."""
  if masking is None:
    return None
  rng = jax.random.fold_in(jax.random.key(MASKING_SEED), batch_index)
  return masking(rng, images)


def iter_image_embeddings(embed: Callable[..., jax.Array], params: Params,
                          batches: Iterable[Batch],
                          masking: Masking | None = None) -> Iterator[tuple[jax.Array, Batch]]:
  """Yields (normalised embeddings [b,E] incl. padding rows, batch) for each batch."""
  for index, batch in enumerate(batches):
    images = batch["image"]
    keep = keep_indices_for_batch(masking, index, images)
    yield embed(params, images, keep), batch


def embed_images(encode_image: ImageEncoder, params: Params, batches: Iterable[Batch],
                 masking: Masking | None = None) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised embeddings [N,E] and labels [N] of all non-padding examples, on host."""
  embed = make_image_embedder(encode_image)
  embeddings, labels = [], []
  for emb, batch in iter_image_embeddings(embed, params, batches, masking):
    keep = np.asarray(batch["mask"], bool)
    embeddings.append(to_host(emb)[keep])
    labels.append(np.asarray(batch["label"])[keep])
  if not embeddings:
    raise ValueError("No eval batches.")
  return np.concatenate(embeddings).astype(np.float32), np.concatenate(labels).astype(np.int32)


def tfds_label_names(ds: Any) -> tuple[str, ...]:
  """The label names of a TFDS eval dataset's `label_key` feature (reads its metadata only)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  builder = tfds.builder(ds.tfds.name, data_dir=ds.tfds.data_dir or None)
  return tuple(builder.info.features[ds.tfds.label_key].names)


def dataset_num_classes(ds: Any) -> int | None:
  """Number of classes the dataset's 'label' can take, when the config alone tells (no I/O)."""
  from glip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  if ds.source == "synthetic":
    return len(synthetic.CLASS_NAMES[ds.synthetic.label])
  if ds.source == "tfds" and ds.tfds.label_key:
    return -1  # known, but only from the dataset's metadata; see num_classes
  return None


def num_classes(ds: Any) -> int:
  """Number of classes of a dataset that has them (reads TFDS metadata when needed)."""
  known = dataset_num_classes(ds)
  return len(tfds_label_names(ds)) if known == -1 else known


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What every evaluator's `from_config` gets besides its own entry (shared by all entries)."""

  encode_image: ImageEncoder
  encode_text: TextEncoder
  tokenizer: Any
  masking: Masking | None  # the entry's masked-inference regime; None = unmasked
  batches: Callable[[Any], BatchesFn]  # dataset config -> fresh-batches function
