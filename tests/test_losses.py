"""Contrastive losses against direct numpy implementations."""

import numpy as np
import pytest

from glip_jax import losses


def _normalised(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_softmax_contrastive_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = _normalised(rng, 16, 8), _normalised(rng, 16, 8)
  txt[3] = img[3]  # one easy pair, so accuracy is not trivially 0
  scale = np.log(1 / 0.07)
  logits = np.exp(scale) * img @ txt.T
  expected = -0.5 * (np.diag(_log_softmax(logits, 1)).mean() + np.diag(_log_softmax(logits, 0)).mean())
  loss, aux = losses.softmax_contrastive(img.astype(np.float32), txt.astype(np.float32),
                                         np.float32(scale))
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(aux["i2t_accuracy"]) == pytest.approx((logits.argmax(1) == np.arange(16)).mean())
  assert float(aux["t2i_accuracy"]) == pytest.approx((logits.argmax(0) == np.arange(16)).mean())


def test_sigmoid_contrastive_matches_numpy():
  rng = np.random.default_rng(1)
  img, txt = _normalised(rng, 8, 4), _normalised(rng, 8, 4)
  scale, bias = np.log(10.0), -10.0
  logits = np.exp(scale) * img @ txt.T + bias
  signs = 2 * np.eye(8) - 1
  expected = np.sum(np.log1p(np.exp(-signs * logits))) / 8
  loss, _ = losses.sigmoid_contrastive(img.astype(np.float32), txt.astype(np.float32),
                                       np.float32(scale), np.float32(bias))
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_bad_loss_kind():
  with pytest.raises(ValueError, match=r"loss.kind='cosine'.*allowed: \['softmax', 'sigmoid'\]"):
    losses.contrastive_loss("cosine", {})
  with pytest.raises(ValueError, match="logit_bias_init"):
    losses.contrastive_loss("sigmoid", {"image_emb": 0, "text_emb": 0, "logit_scale": 0})
