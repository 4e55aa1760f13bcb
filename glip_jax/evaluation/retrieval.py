"""Image-text retrieval (SPEC §6): recall@K in both directions over a whole test set.

Image→text: each image queries all captions of the set; a hit at K if any of *its* captions is
within the top K. Text→image: each caption queries all images; a hit at K if its one image is
within the top K. Ranks follow ranking.py (ties count against the query). Images whose captions are
all padding are not i2t queries (their recall is undefined) but stay t2i candidates.

Embeddings of the whole set are gathered on the host (Flickr30K: 1k images/5k captions, COCO:
5k/25k); similarities are then computed in fixed-size query chunks so memory stays
O(chunk × candidates) and one compiled shape serves every chunk.
"""
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from glip_jax import errors
from glip_jax.evaluation import base
from glip_jax.evaluation import ranking

DEFAULT_KS = (1, 5, 10)


@jax.jit
def _chunk_ranks(queries: jax.Array, query_ids: jax.Array, candidates: jax.Array,
                 candidate_ids: jax.Array) -> jax.Array:
  scores = queries @ candidates.T
  return ranking.rank_of_best_positive(scores, query_ids[:, None] == candidate_ids[None, :])


def query_ranks(queries: np.ndarray, query_ids: np.ndarray, candidates: np.ndarray,
                candidate_ids: np.ndarray, chunk_size: int = 1024) -> np.ndarray:
  """Rank [Q] of each query's best matching candidate (match: equal ids) among all candidates."""
  num = queries.shape[0]
  chunk_size = min(chunk_size, num)
  padded = -(-num // chunk_size) * chunk_size
  # Padding queries get id -1, which matches nothing; their ranks are cut off below.
  queries = np.concatenate([queries, np.zeros((padded - num, queries.shape[1]), queries.dtype)])
  query_ids = np.concatenate([query_ids, np.full(padded - num, -1, query_ids.dtype)])
  candidates, candidate_ids = jnp.asarray(candidates), jnp.asarray(candidate_ids)
  ranks = [
      base.to_host(_chunk_ranks(queries[i:i + chunk_size], query_ids[i:i + chunk_size],
                                candidates, candidate_ids))
      for i in range(0, padded, chunk_size)
  ]
  return np.concatenate(ranks)[:num]


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_image_ids: np.ndarray,
                      ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024) -> dict[str, float]:
  """i2t_recall_at_K and t2i_recall_at_K from normalised embeddings; caption t belongs to image ids[t]."""
  num_images = image_emb.shape[0]
  image_ids = np.arange(num_images, dtype=np.int32)
  text_image_ids = np.asarray(text_image_ids, np.int32)
  has_caption = np.isin(image_ids, text_image_ids)
  if not has_caption.any():
    raise ValueError("Retrieval set has no captions.")
  i2t = query_ranks(image_emb[has_caption], image_ids[has_caption], text_emb, text_image_ids,
                    chunk_size)
  t2i = query_ranks(text_emb, text_image_ids, image_emb, image_ids, chunk_size)
  results = {}
  for k in ks:
    results[f"i2t_recall_at_{k}"] = float(np.mean(i2t < k))
  for k in ks:
    results[f"t2i_recall_at_{k}"] = float(np.mean(t2i < k))
  return results


def embed_retrieval_set(embed_image: base.ImageEncoder, embed_text: base.TextEncoder,
                        params: base.Params, batches: Iterable[base.Batch],
                        masking: base.Masking | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(image_emb [N,E], text_emb [T,E], text_image_ids [T]) of all non-padding images/captions."""
  images, texts, owners = [], [], []
  num_images = 0
  for emb, batch in base.iter_image_embeddings(embed_image, params, batches, masking):
    mask = np.asarray(batch["mask"], bool)
    tokens = np.asarray(batch["texts"], np.int32)  # [b, C, L]
    b, c, length = tokens.shape
    text_valid = np.asarray(batch["text_mask"], bool) & mask[:, None]
    text_emb = base.to_host(embed_text(params, tokens.reshape(b * c, length))).reshape(b, c, -1)
    # Global image index of each kept image in this batch, and of each kept caption's image.
    index = num_images + np.cumsum(mask) - 1
    images.append(base.to_host(emb)[mask])
    texts.append(text_emb[text_valid])
    owners.append(np.broadcast_to(index[:, None], (b, c))[text_valid])
    num_images += int(mask.sum())
  if not images:
    raise ValueError("No eval batches.")
  return (np.concatenate(images).astype(np.float32), np.concatenate(texts).astype(np.float32),
          np.concatenate(owners).astype(np.int32))


class RetrievalEvaluator:
  """Image→text and text→image recall@K on a captioned test set (several captions per image)."""

  def __init__(self, name: str, encode_image: base.ImageEncoder, encode_text: base.TextEncoder,
               batches_fn: base.BatchesFn, masking: base.Masking | None = None,
               ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024):
    self.name = name
    self.batches_fn = batches_fn
    self.masking = masking
    self.ks = tuple(ks)
    self.chunk_size = chunk_size
    self._embed_image = base.make_image_embedder(encode_image)
    self._embed_text = base.make_text_embedder(encode_text)

  def run(self, params: base.Params) -> dict[str, float]:
    """Returns i2t_recall_at_K and t2i_recall_at_K for each K (fractions)."""
    image_emb, text_emb, owners = embed_retrieval_set(self._embed_image, self._embed_text, params,
                                                      self.batches_fn(), self.masking)
    return retrieval_metrics(image_emb, text_emb, owners, self.ks, self.chunk_size)


# ----------------------------------------------------------------------------------------------
# Config: this kind's fields, their validation and the evaluator built from an entry.

DATASET_FIELDS = ("dataset",)


def default_config() -> dict:
  """Fields of a retrieval entry besides the generic ones."""
  return dict(ks=(1, 5, 10))  # recall@K for each K, both directions


def validate(entry: ml_collections.ConfigDict, prefix: str) -> None:
  """`ks` is a non-empty list of positive ints."""
  ks = tuple(entry.ks)
  if not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
    errors.fail(f"{prefix}ks", entry.ks, "a non-empty list of ints >= 1")


def from_config(name: str, entry: ml_collections.ConfigDict,
                context: base.BuildContext) -> RetrievalEvaluator:
  """The retrieval evaluator of a validated entry."""
  return RetrievalEvaluator(name, context.encode_image, context.encode_text,
                            context.batches(entry.dataset), masking=context.masking,
                            ks=tuple(entry.ks))
