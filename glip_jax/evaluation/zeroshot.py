"""Zero-shot classification (SPEC §6): image embeddings against text-built class embeddings.

Class embedding = L2-normalised mean of the L2-normalised text embeddings of every template filled
with the class name; the prediction for an image is the class of highest cosine similarity with its
L2-normalised embedding. Reported: top-1, top-5 and mean per-class recall (see ranking.py for the
tie rule). Metrics accumulate over batches as a clu.metrics Collection of sufficient statistics
(hit counts; per-class hit and example counts), so the result is exact whatever the batching.
"""
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from glip_jax.evaluation import base
from glip_jax.evaluation import ranking
from glip_jax.evaluation import templates as templates_lib


def _hits_at(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per example: 1.0 if the true class is within the top k (ties count against), else 0.0."""
  positive = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return (ranking.rank_of_best_positive(logits, positive) < k).astype(jnp.float32)


def top_k_accuracy(k: int) -> type[clu_metrics.Average]:
  """A clu Average of top-k hits computed from model outputs `logits`, `labels`, `mask`."""

  @flax.struct.dataclass
  class TopKAccuracy(clu_metrics.Average):

    @classmethod
    def from_model_output(cls, logits: jax.Array, labels: jax.Array,
                          mask: jax.Array | None = None, **_) -> clu_metrics.Average:
      return clu_metrics.Average.from_model_output.__func__(
          cls, values=_hits_at(logits, labels, k), mask=mask)

  return TopKAccuracy


@flax.struct.dataclass
class MeanPerClassRecall(clu_metrics.Metric):
  """Mean over classes of (top-1 hits / examples) of that class; absent classes are skipped."""

  hits: jax.Array  # [C] top-1 hits per true class.
  count: jax.Array  # [C] examples per true class.

  @classmethod
  def from_model_output(cls, logits: jax.Array, labels: jax.Array,
                        mask: jax.Array | None = None, **_) -> "MeanPerClassRecall":
    num_classes = logits.shape[-1]
    if mask is None:
      mask = jnp.ones(labels.shape, bool)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * mask[:, None]
    hits = _hits_at(logits, labels, 1).astype(jnp.int32)
    return cls(hits=(onehot * hits[:, None]).sum(0), count=onehot.sum(0))

  def merge(self, other: "MeanPerClassRecall") -> "MeanPerClassRecall":
    return type(self)(hits=self.hits + other.hits, count=self.count + other.count)

  def compute(self) -> jax.Array:
    # A class with no eval examples has no recall; averaging in a 0 would punish the model for
    # the dataset's composition.
    present = self.count > 0
    recall = jnp.where(present, self.hits / jnp.maximum(self.count, 1), 0.0)
    return recall.sum() / jnp.maximum(present.sum(), 1)


ZeroShotMetrics = clu_metrics.Collection.create(
    top1=top_k_accuracy(1), top5=top_k_accuracy(5), mean_per_class_recall=MeanPerClassRecall)


def zeroshot_metrics(logits: jax.Array, labels: jax.Array,
                     mask: jax.Array | None = None) -> clu_metrics.Collection:
  """Mergeable zero-shot metrics for one batch of class scores [B,C] (padding where mask False)."""
  return ZeroShotMetrics.single_from_model_output(logits=logits, labels=labels, mask=mask)


@jax.jit
def _batch_metrics(image_emb: jax.Array, classifier: jax.Array, labels: jax.Array,
                   mask: jax.Array) -> clu_metrics.Collection:
  return zeroshot_metrics(image_emb @ classifier, labels, mask)


def tokenize_prompts(tokenizer: base.Tokenizer, classnames: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
  """Tokens [C*T, L] of every (class, template) prompt, class-major."""
  prompts = [p for name in classnames for p in templates_lib.prompts_for_class(templates, name)]
  return np.asarray(tokenizer(prompts), np.int32)


def embed_texts(embed_text: base.TextEncoder, params: base.Params, tokens: np.ndarray, batch_size: int) -> jax.Array:
  """Normalised embeddings [N,E] of `tokens` [N,L], computed in fixed-size (padded) batches."""
  # Padding the last batch keeps a single compiled shape.
  num = tokens.shape[0]
  padded = -(-num // batch_size) * batch_size
  tokens = np.concatenate([tokens, np.zeros((padded - num, tokens.shape[1]), tokens.dtype)])
  parts = [embed_text(params, tokens[i:i + batch_size]) for i in range(0, padded, batch_size)]
  return jnp.concatenate(parts)[:num]


def classifier_from_tokens(encode_text: base.TextEncoder, params: base.Params, tokens: np.ndarray,
                           num_classes: int, batch_size: int = 256) -> jax.Array:
  """Zero-shot classifier [E,C] from class-major prompt tokens [C*T, L]."""
  text_emb = embed_texts(base.make_text_embedder(encode_text), params, tokens, batch_size)
  per_class = text_emb.reshape(num_classes, -1, text_emb.shape[-1])  # [C, T, E]
  return base.l2_normalize(per_class.mean(axis=1)).T


def build_classifier(encode_text: base.TextEncoder, params: base.Params,
                     tokenizer: base.Tokenizer, classnames: Sequence[str],
                     templates: Sequence[str], batch_size: int = 256) -> jax.Array:
  """Zero-shot classifier [E,C]: normalised mean of normalised template embeddings per class."""
  templates = templates_lib.validate_templates(templates)
  tokens = tokenize_prompts(tokenizer, classnames, templates)
  return classifier_from_tokens(encode_text, params, tokens, len(classnames), batch_size)


class ZeroShotEvaluator:
  """Zero-shot classification accuracy of the image tower against text-built class embeddings."""

  def __init__(self, name: str, encode_image: base.ImageEncoder, encode_text: base.TextEncoder,
               tokenizer: base.Tokenizer, classnames: Sequence[str],
               templates: Sequence[str] | str, batches_fn: base.BatchesFn,
               masking: base.Masking | None = None, text_batch_size: int = 256):
    self.name = name
    self.classnames = tuple(classnames)
    self.templates = templates_lib.resolve_templates(templates)
    self.batches_fn = batches_fn
    self.masking = masking
    self._encode_text = encode_text
    self._embed_image = base.make_image_embedder(encode_image)
    self._text_batch_size = text_batch_size
    # Prompts do not change between runs; only the text tower's parameters do.
    self._tokens = tokenize_prompts(tokenizer, self.classnames, self.templates)

  def classifier(self, params: base.Params) -> jax.Array:
    """The [E,C] class embeddings for `params`."""
    return classifier_from_tokens(self._encode_text, params, self._tokens, len(self.classnames),
                                  self._text_batch_size)

  def run(self, params: base.Params) -> dict[str, float]:
    """Returns zeroshot_top1, zeroshot_top5, zeroshot_mean_per_class_recall (fractions)."""
    classifier = self.classifier(params)
    metrics = None
    for emb, batch in base.iter_image_embeddings(self._embed_image, params, self.batches_fn(),
                                                 self.masking):
      update = _batch_metrics(emb, classifier, np.asarray(batch["label"], np.int32),
                              np.asarray(batch["mask"], bool))
      metrics = update if metrics is None else metrics.merge(update)
    if metrics is None:
      raise ValueError(f"{self.name}: no eval batches.")
    return {f"zeroshot_{key}": float(value) for key, value in metrics.compute().items()}
