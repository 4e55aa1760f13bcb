"""Image-text retrieval recall@K: hand-computed cases, a sort-based reference, evaluator."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glip_jax.evaluation import retrieval


def _reference_ranks(scores, positive):
  """Position of the first positive after a stable sort, score descending, negatives first on ties."""
  ranks = []
  for row, pos in zip(scores, positive):
    order = np.lexsort((pos, -row))  # Last key is primary: -score; then negatives (False) first.
    ranks.append(int(np.argmax(pos[order])))
  return np.array(ranks)


def _reference_metrics(image_emb, text_emb, owners, ks=(1, 5, 10)):
  scores = image_emb @ text_emb.T
  positive = owners[None, :] == np.arange(len(image_emb))[:, None]
  has_caption = positive.any(1)
  i2t = _reference_ranks(scores[has_caption], positive[has_caption])
  t2i = _reference_ranks(scores.T, positive.T)
  out = {f"i2t_recall_at_{k}": np.mean(i2t < k) for k in ks}
  out.update({f"t2i_recall_at_{k}": np.mean(t2i < k) for k in ks})
  return out


def test_hand_computed_recall_with_several_captions_and_ties():
  image_emb = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
  text_emb = np.array([
      [0.2, 0.9, 0.0],  # caption of image 0, but closer to image 1.
      [0.8, 0.1, 0.0],  # caption of image 0 (its best: i2t rank 0 for image 0).
      [0.5, 0.5, 0.0],  # caption of image 1: tied between images 0 and 1.
      [0.0, 0.0, 1.0],  # caption of image 2.
  ], np.float32)
  owners = np.array([0, 0, 1, 2])
  got = retrieval.retrieval_metrics(image_emb, text_emb, owners, ks=(1, 2))
  # i2t: image 0 best own caption 0.8 beats everything -> rank 0. Image 1: own caption 0.5;
  # caption 0 (0.9) scores higher -> rank 1. Image 2: rank 0.
  assert got["i2t_recall_at_1"] == pytest.approx(2 / 3)
  assert got["i2t_recall_at_2"] == pytest.approx(1.0)
  # t2i: caption 0 -> image 1 scores 0.9 > 0.2: rank 1. Caption 1: rank 0. Caption 2: tie 0.5 with
  # image 0 counts against -> rank 1. Caption 3: rank 0.
  assert got["t2i_recall_at_1"] == pytest.approx(2 / 4)
  assert got["t2i_recall_at_2"] == pytest.approx(1.0)


def test_all_tied_scores_give_no_hits_at_one():
  image_emb = np.ones((4, 3), np.float32) / np.sqrt(3)
  got = retrieval.retrieval_metrics(image_emb, image_emb.copy(), np.arange(4), ks=(1, 4))
  assert got["i2t_recall_at_1"] == 0.0 and got["t2i_recall_at_1"] == 0.0
  assert got["i2t_recall_at_4"] == 1.0 and got["t2i_recall_at_4"] == 1.0


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_matches_sort_reference_on_random_quantised_embeddings(chunk_size):
  rng = np.random.default_rng(0)
  num_images = 17
  owners = np.repeat(np.arange(num_images), rng.integers(1, 6, size=num_images))
  owners = owners.astype(np.int32)  # Every image has 1-5 captions.
  # Coarse values make exact ties frequent.
  image_emb = rng.integers(-2, 3, size=(num_images, 4)).astype(np.float32)
  text_emb = image_emb[owners] + rng.integers(-2, 3, size=(len(owners), 4))
  text_emb = text_emb.astype(np.float32)
  got = retrieval.retrieval_metrics(image_emb, text_emb, owners, chunk_size=chunk_size)
  expected = _reference_metrics(image_emb, text_emb, owners)
  assert got.keys() == expected.keys()
  for key in expected:
    assert got[key] == pytest.approx(expected[key]), key
  assert len(set(got.values())) > 2  # Not a degenerate all-0/all-1 case.


# Toy towers: the image id is painted into pixels (0,0,0) and (0,0,1) (id = 256·hi + lo); a caption
# token sequence starts with its image id + 1; both towers map ids to fixed random directions.
TABLE = jax.random.normal(jax.random.key(1), (64, 16))


def _encode_image(params, images, keep_indices=None):
  del keep_indices
  ids = images[:, 0, 0, 0].astype(jnp.int32) * 256 + images[:, 0, 0, 1].astype(jnp.int32)
  return params["table"][ids]


def _encode_text(params, tokens):
  # Captions of an image share its direction plus a caption-specific perturbation.
  return params["table"][tokens[:, 0] - 1] + 1.5 * params["table"][32 + tokens[:, 1] % 32]


def _batches(captions_per_image, batch_size=4, max_captions=5):
  num = len(captions_per_image)
  for start in range(0, num, batch_size):
    ids = np.arange(start, start + batch_size)
    mask = ids < num
    counts = np.where(mask, np.pad(captions_per_image[start:], (0, batch_size))[:batch_size], 0)
    image = np.zeros((batch_size, 2, 2, 3), np.uint8)
    image[:, 0, 0, 0], image[:, 0, 0, 1] = ids // 256, ids % 256
    texts = np.zeros((batch_size, max_captions, 3), np.int32)
    texts[:, :, 0] = ids[:, None] + 1
    texts[:, :, 1] = ids[:, None] * max_captions + np.arange(max_captions)[None, :]
    text_mask = np.arange(max_captions)[None, :] < counts[:, None]
    # Padding images and padding captions carry valid-looking content: they must be dropped.
    yield {"image": image, "label": np.zeros(batch_size, np.int32), "mask": mask,
           "texts": texts, "text_mask": text_mask | ~mask[:, None]}


def test_evaluator_gathers_variable_captions_and_drops_padding():
  captions_per_image = np.array([1, 5, 2, 3, 4, 1, 0, 2, 3, 5, 1])  # 11 images, one uncaptioned.
  params = {"table": TABLE}
  evaluator = retrieval.RetrievalEvaluator("toy", _encode_image, _encode_text,
                                           lambda: _batches(captions_per_image), chunk_size=8)
  got = evaluator.run(params)

  image_emb = np.asarray(TABLE[:11])
  owners = np.repeat(np.arange(11), captions_per_image)
  caption_index = np.concatenate([np.arange(c) for c in captions_per_image])
  text_emb = np.asarray(TABLE[owners] + 1.5 * TABLE[32 + (owners * 5 + caption_index) % 32])
  normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  expected = _reference_metrics(normalise(image_emb), normalise(text_emb), owners)
  assert list(got) == ["i2t_recall_at_1", "i2t_recall_at_5", "i2t_recall_at_10",
                       "t2i_recall_at_1", "t2i_recall_at_5", "t2i_recall_at_10"]
  for key in expected:
    assert got[key] == pytest.approx(expected[key]), key
  # Neither direction trivially perfect, so a wrong gather would show.
  assert 0.0 < got["t2i_recall_at_1"] < 1.0 and 0.0 < got["i2t_recall_at_1"] < 1.0


def test_embed_retrieval_set_owner_ids():
  from glip_jax.evaluation import base
  captions_per_image = np.array([2, 0, 1, 3, 1])
  _, text_emb, owners = retrieval.embed_retrieval_set(
      base.make_image_embedder(_encode_image), base.make_text_embedder(_encode_text),
      {"table": TABLE}, _batches(captions_per_image))
  np.testing.assert_array_equal(owners, [0, 0, 2, 3, 3, 3, 4])
  assert text_emb.shape == (7, 16)
