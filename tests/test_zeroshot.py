"""Zero-shot classification: metrics against numpy references, classifier, evaluator end to end."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glip_jax.evaluation import base
from glip_jax.evaluation import zeroshot

NUM_CLASSES = 6
EMBED_DIM = 8  # Dims 0..5: class one-hots; 6..7: template-dependent offsets.
CLASSNAMES = tuple(f"class{i}" for i in range(NUM_CLASSES))
TEMPLATES = ("a photo of a {}.", "art of the {}.", "a {} in a video game.")
BATCH = 8


def _reference_metrics(logits, labels, mask):
  """Plain numpy: rank = wrong classes scoring >= the true class; hit@k iff rank < k."""
  logits, labels, mask = np.asarray(logits), np.asarray(labels), np.asarray(mask)
  ranks = np.array([np.sum(np.delete(row, y) >= row[y]) for row, y in zip(logits, labels)])
  ranks, labels = ranks[mask], labels[mask]
  per_class = [np.mean(ranks[labels == c] == 0) for c in np.unique(labels)]
  return {"top1": np.mean(ranks < 1), "top5": np.mean(ranks < 5),
          "mean_per_class_recall": np.mean(per_class)}


def test_metrics_hand_computed_with_ties_and_padding():
  logits = jnp.array([
      [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: clear hit.
      [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 1: tied with class 0 -> counts as a miss.
      [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0],  # label 0: rank 5 -> top-5 miss.
      [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0],  # label 1: rank 4 -> top-5 hit.
      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 2: all tied -> rank 6, miss everywhere.
      [9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # padding (label 1 would be a miss): ignored.
  ])
  labels = jnp.array([0, 1, 0, 1, 2, 1])
  mask = jnp.array([True, True, True, True, True, False])
  got = zeroshot.zeroshot_metrics(logits, labels, mask).compute()
  assert got["top1"] == pytest.approx(1 / 5)
  assert got["top5"] == pytest.approx(3 / 5)  # Examples 0, 1, 3.
  # Class 0: 1 of 2; class 1: 0 of 2; class 2: 0 of 1; classes 3..6 absent and skipped.
  assert got["mean_per_class_recall"] == pytest.approx(0.5 / 3)
  for key, value in _reference_metrics(logits, labels, mask).items():
    assert got[key] == pytest.approx(value)


def test_nan_scores_never_hit():
  logits = jnp.full((2, 3), jnp.nan)
  got = zeroshot.zeroshot_metrics(logits, jnp.array([0, 1])).compute()
  assert got["top1"] == 0.0 and got["mean_per_class_recall"] == 0.0


def test_metrics_merged_over_batches_equal_single_batch():
  rng = np.random.default_rng(0)
  # Imbalanced classes, so mean per-class recall differs from top-1 and a per-batch average of
  # recalls would be wrong.
  labels = rng.choice(NUM_CLASSES, size=40, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]).astype(np.int32)
  logits = rng.normal(size=(40, NUM_CLASSES)).astype(np.float32)
  logits[np.arange(40), labels] += rng.normal(1.0, 1.0, size=40)
  mask = rng.random(40) < 0.9
  whole = zeroshot.zeroshot_metrics(logits, labels, mask).compute()
  merged = None
  for start in range(0, 40, 7):
    part = zeroshot.zeroshot_metrics(logits[start:start + 7], labels[start:start + 7],
                                      mask[start:start + 7])
    merged = part if merged is None else merged.merge(part)
  merged = merged.compute()
  reference = _reference_metrics(logits, labels, mask)
  for key in whole:
    assert float(merged[key]) == pytest.approx(float(whole[key]))
    assert float(whole[key]) == pytest.approx(reference[key])
  assert abs(reference["top1"] - reference["mean_per_class_recall"]) > 1e-3


# Toy two-tower model. Tokens: [class index + 1, prompt length, 0, 0]. The text tower embeds a
# class one-hot plus a template-dependent offset, so the template average matters; the image tower
# reads the label painted into pixel (0, 0) and rotates it by `params` classes.
def _tokenizer(prompts):
  tokens = np.zeros((len(prompts), 4), np.int32)
  for i, prompt in enumerate(prompts):
    tokens[i, 0] = 1 + int(re.search(r"class(\d)", prompt).group(1))
    tokens[i, 1] = len(prompt)  # Differs between the templates.
  return tokens


def _encode_text(params, tokens):
  del params
  cls = jax.nn.one_hot(tokens[:, 0] - 1, EMBED_DIM)
  offset = jax.nn.one_hot(NUM_CLASSES + tokens[:, 1] % 2, EMBED_DIM)
  return 3.0 * cls + offset  # Not normalised: the evaluator must do it.


def _encode_image(params, images, keep_indices=None):
  label = images[:, 0, 0, 0].astype(jnp.int32)
  shift = params["shift"] + (0 if keep_indices is None else keep_indices[:, 0])
  return 2.0 * jax.nn.one_hot((label + shift) % NUM_CLASSES, EMBED_DIM)


def _batches(labels, batch_size=BATCH):
  """Padded eval batches with the label painted into the image; padding gets label 0."""
  for start in range(0, len(labels), batch_size):
    chunk = labels[start:start + batch_size]
    pad = batch_size - len(chunk)
    label = np.concatenate([chunk, np.zeros(pad, np.int32)]).astype(np.int32)
    image = np.zeros((batch_size, 4, 4, 3), np.uint8)
    image[:, 0, 0, 0] = label
    yield {"image": image, "label": label,
           "mask": np.concatenate([np.ones(len(chunk), bool), np.zeros(pad, bool)])}


LABELS = np.array([0, 1, 2, 3, 4, 5, 0, 0, 1, 2, 1, 0, 3, 3, 5, 4, 2, 1, 0], np.int32)  # 19: padded.


def test_build_classifier_is_normalised_mean_of_normalised_template_embeddings():
  params = {"shift": 0}
  classifier = np.asarray(zeroshot.build_classifier(_encode_text, params, _tokenizer, CLASSNAMES,
                                                    TEMPLATES, batch_size=4))
  assert classifier.shape == (EMBED_DIM, NUM_CLASSES)
  tokens = _tokenizer([t.replace("{}", name) for name in CLASSNAMES for t in TEMPLATES])
  emb = np.array(_encode_text(params, tokens)).reshape(NUM_CLASSES, len(TEMPLATES), EMBED_DIM)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  expected = emb.mean(1)
  expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
  np.testing.assert_allclose(classifier, expected.T, atol=1e-6)


def test_evaluator_perfect_toy_model_and_padding_excluded():
  evaluator = zeroshot.ZeroShotEvaluator("toy", _encode_image, _encode_text, _tokenizer,
                                         CLASSNAMES, TEMPLATES, lambda: _batches(LABELS))
  assert isinstance(evaluator, base.Evaluator)
  results = evaluator.run({"shift": 0})
  assert results == {"zeroshot_top1": 1.0, "zeroshot_top5": 1.0,
                     "zeroshot_mean_per_class_recall": 1.0}


def test_evaluator_with_shuffled_class_names_scores_the_unswapped_fraction():
  swapped = list(CLASSNAMES)
  swapped[0], swapped[1] = swapped[1], swapped[0]  # Classes 0 and 1 now always mispredicted.
  evaluator = zeroshot.ZeroShotEvaluator("toy", _encode_image, _encode_text, _tokenizer,
                                         swapped, TEMPLATES, lambda: _batches(LABELS))
  results = evaluator.run({"shift": 0})
  assert results["zeroshot_top1"] == pytest.approx(np.mean(LABELS >= 2))
  assert results["zeroshot_mean_per_class_recall"] == pytest.approx(4 / 6)
  # For an image of class 0 the true class scores 0, tied with the 4 other wrong classes, behind
  # class 1: rank 5, a top-5 miss under the ties-count-against rule.
  assert results["zeroshot_top5"] == pytest.approx(np.mean(LABELS >= 2))


def test_evaluator_reads_params_and_masking():
  evaluator = zeroshot.ZeroShotEvaluator("toy", _encode_image, _encode_text, _tokenizer,
                                         CLASSNAMES, "class_name", lambda: _batches(LABELS))
  assert evaluator.run({"shift": 1})["zeroshot_top1"] == 0.0
  calls = []

  def masking(rng, images):
    calls.append(images.shape[0])
    return jnp.ones((images.shape[0], 2), jnp.int32)  # Keep-indices the toy encoder turns into a shift.

  evaluator.masking = masking
  assert evaluator.run({"shift": 0})["zeroshot_top1"] == 0.0
  assert calls == [BATCH] * 3


def test_embed_images_drops_padding():
  emb, labels = base.embed_images(_encode_image, {"shift": 0}, _batches(LABELS))
  np.testing.assert_array_equal(labels, LABELS)
  np.testing.assert_allclose(emb, np.eye(EMBED_DIM)[LABELS])


def test_evaluator_with_batch_sharded_encoder():
  # The trainer hands in encoders jitted with shardings; outputs are then sharded global arrays.
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded_encode = jax.jit(_encode_image, in_shardings=(None, batch_sharding),
                           out_shardings=batch_sharding)
  evaluator = zeroshot.ZeroShotEvaluator(
      "toy", sharded_encode, _encode_text, _tokenizer, CLASSNAMES, TEMPLATES,
      lambda: _batches(LABELS))
  assert evaluator.run({"shift": 0})["zeroshot_top1"] == 1.0
  emb, labels = base.embed_images(sharded_encode, {"shift": 0}, _batches(LABELS))
  assert emb.shape == (len(LABELS), EMBED_DIM) and labels.tolist() == LABELS.tolist()
