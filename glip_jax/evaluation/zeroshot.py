"""Zero-shot classification (SPEC §6): image embeddings against text-built class embeddings.

Class embedding = L2-normalised mean of the L2-normalised text embeddings of every template filled
with the class name; the prediction for an image is the class of highest cosine similarity with its
L2-normalised embedding. Reported: top-1, top-5 and mean per-class recall (see ranking.py for the
tie rule). Metrics accumulate over batches as a clu.metrics Collection of sufficient statistics
(hit counts; per-class hit and example counts), so the result is exact whatever the batching.
"""
import os
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics

from glip_jax import errors
from glip_jax.data import synthetic
from glip_jax.evaluation import base
from glip_jax.evaluation import classnames as classnames_lib
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


# ----------------------------------------------------------------------------------------------
# Config: this kind's fields, their validation and the evaluator built from an entry.

SYNTHETIC_CLASSNAMES = tuple(f"synthetic:{label}" for label in synthetic.CLASS_NAMES)
# 'imagenet' is the short name the configs use; the sets themselves live in classnames.py.
NAMED_CLASSNAMES = {"imagenet": "imagenet2012", **{k: k for k in classnames_lib.CLASSNAME_SETS}}
CLASSNAME_CHOICES = ("", "tfds") + SYNTHETIC_CLASSNAMES + tuple(NAMED_CLASSNAMES)
TEMPLATE_CHOICES = ("", "synthetic") + tuple(templates_lib.TEMPLATE_SETS)
DATASET_FIELDS = ("dataset",)


def default_config() -> dict:
  """Fields of a zero-shot entry besides the generic ones (kind, schedule, batch, masking)."""
  return dict(
      # '' = from the dataset (synthetic label, or the TFDS label names); see CLASSNAME_CHOICES.
      classnames="",
      # '' = 'synthetic' on the synthetic dataset, else 'clip_imagenet_80'; or a file path.
      templates="",
  )


def _synthetic_label(entry: ml_collections.ConfigDict) -> str | None:
  """The synthetic label a zero-shot entry classifies, or None for other datasets."""
  if entry.classnames in SYNTHETIC_CLASSNAMES:
    return entry.classnames.split(":", 1)[1]
  if entry.dataset.source == "synthetic":
    return entry.dataset.synthetic.label
  return None


def validate(entry: ml_collections.ConfigDict, prefix: str) -> None:
  """Class names and templates exist and agree with the dataset; ValueError names the field."""
  names, ds = entry.classnames, entry.dataset
  if names in SYNTHETIC_CLASSNAMES:
    label = names.split(":", 1)[1]
    if ds.source != "synthetic":
      errors.fail(f"{prefix}classnames", names, "'synthetic:*' only with dataset.source='synthetic'")
    if ds.synthetic.label != label:
      # The batches' 'label' is the dataset's label: the two must agree or every hit is wrong.
      errors.fail(f"{prefix}dataset.synthetic.label", ds.synthetic.label,
            f"{label!r}, to match classnames={names!r}")
  elif names == "tfds" or (names == "" and ds.source == "tfds"):
    if ds.source != "tfds" or not ds.tfds.label_key:
      errors.fail(f"{prefix}classnames", names,
            "'tfds' only with dataset.source='tfds' and a dataset.tfds.label_key")
  elif names == "":
    if ds.source != "synthetic":
      errors.fail(f"{prefix}classnames", names,
            f"one of {list(CLASSNAME_CHOICES[1:])} or a class-name file path for "
            f"dataset.source={ds.source!r}")
  elif names not in NAMED_CLASSNAMES and not os.path.isfile(names):
    errors.fail(f"{prefix}classnames", names,
          f"one of {list(CLASSNAME_CHOICES)} or an existing class-name file")
  templates = entry.templates
  if templates == "synthetic":
    if _synthetic_label(entry) is None:
      errors.fail(f"{prefix}templates", templates, "'synthetic' only for synthetic labels")
  elif templates and templates not in templates_lib.TEMPLATE_SETS:
    if not os.path.isfile(templates):
      errors.fail(f"{prefix}templates", templates,
            f"one of {list(TEMPLATE_CHOICES)} or an existing template file")
    try:
      templates_lib.load_templates(templates)
    except ValueError as e:
      raise ValueError(f"config.{prefix}templates={templates!r}: {e}") from None


def resolve_classnames(entry: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Class names, in label order, of a (validated) zero-shot entry."""
  names = entry.classnames
  label = _synthetic_label(entry)
  if names in SYNTHETIC_CLASSNAMES or (names == "" and label is not None):
    return tuple(synthetic.CLASS_NAMES[label])
  if names in ("", "tfds"):
    return classnames_lib.classnames_from_label_names(base.tfds_label_names(entry.dataset))
  if names in NAMED_CLASSNAMES:
    return classnames_lib.CLASSNAME_SETS[NAMED_CLASSNAMES[names]]
  return templates_lib.load_classnames(names)


def resolve_template_set(entry: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Prompt templates of a (validated) zero-shot entry."""
  label = _synthetic_label(entry)
  spec = entry.templates or ("synthetic" if label is not None else "clip_imagenet_80")
  if spec == "synthetic":
    return tuple(synthetic.ZERO_SHOT_TEMPLATES[label])
  return templates_lib.resolve_templates(spec)


def from_config(name: str, entry: ml_collections.ConfigDict,
                context: base.BuildContext) -> ZeroShotEvaluator:
  """The zero-shot evaluator of a validated entry."""
  return ZeroShotEvaluator(
      name, context.encode_image, context.encode_text, context.tokenizer,
      resolve_classnames(entry), resolve_template_set(entry), context.batches(entry.dataset),
      masking=context.masking, text_batch_size=entry.batch_size)
