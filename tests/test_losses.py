"""Contrastive losses against direct numpy implementations; the ring loss against the dense one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from glip_jax import losses
from glip_jax import sharding as sharding_lib


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


def _embeddings(batch=32, dim=8):
  rng = np.random.default_rng(2)
  img, txt = _normalised(rng, batch, dim), _normalised(rng, batch, dim)
  txt[:8] = img[:8]  # some easy pairs, so the accuracies are neither 0 nor 1
  return {"image_emb": jnp.float32(img), "text_emb": jnp.float32(txt),
          "logit_scale": jnp.float32(np.log(10.0)), "logit_bias": jnp.float32(-2.0)}


def _loss_and_grads(kind, outputs, impl, mesh=None):
  fn = lambda o: losses.contrastive_loss(kind, o, impl, mesh)
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(outputs)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mesh_sizes", [{"data": 1}, {"data": 4, "fsdp": 2}, {"fsdp": 8}])
def test_ring_loss_equals_dense(kind, mesh_sizes):
  """Values, accuracies and gradients w.r.t. both embeddings, the scale and the bias."""
  outputs = _embeddings()
  if kind == "softmax":
    del outputs["logit_bias"]
  (dense, dense_aux), dense_grads = _loss_and_grads(kind, outputs, "dense")
  devices = jax.devices()[:1] if mesh_sizes == {"data": 1} else jax.devices()
  mesh = sharding_lib.create_mesh(mesh_sizes, devices)
  batch, rep = sharding_lib.batch_sharding(mesh), NamedSharding(mesh, P())
  sharded = {k: jax.device_put(v, batch if v.ndim else rep) for k, v in outputs.items()}
  (ring, ring_aux), ring_grads = _loss_and_grads(kind, sharded, "ring", mesh)
  assert float(ring) == pytest.approx(float(dense), rel=1e-6)
  assert 0 < float(dense_aux["i2t_accuracy"]) < 1
  for name in ("i2t_accuracy", "t2i_accuracy"):
    assert float(ring_aux[name]) == float(dense_aux[name])
  for name, grad in dense_grads.items():
    assert np.abs(grad).max() > 0, name
    # Sums over blocks instead of rows: float32 round-off, relative to the gradient's scale.
    np.testing.assert_allclose(ring_grads[name], grad, rtol=1e-4,
                               atol=1e-5 * float(np.abs(grad).max()), err_msg=name)


def test_ring_accuracy_breaks_ties_like_argmax():
  """Two identical texts: the first (lowest index) counts as the prediction, as jnp.argmax."""
  outputs = _embeddings(batch=8)
  txt = np.array(outputs["text_emb"])
  txt[5] = txt[4] = np.array(outputs["image_emb"])[4]
  outputs["text_emb"] = jnp.float32(txt)
  mesh = sharding_lib.create_mesh({"data": 8})
  (_, dense_aux), _ = _loss_and_grads("softmax", outputs, "dense")
  (_, ring_aux), _ = _loss_and_grads("softmax", outputs, "ring", mesh)
  assert float(ring_aux["i2t_accuracy"]) == float(dense_aux["i2t_accuracy"])
  assert float(ring_aux["t2i_accuracy"]) == float(dense_aux["t2i_accuracy"])


def test_bad_loss_impl():
  with pytest.raises(ValueError, match=r"loss.impl='chunked'.*allowed: \['dense', 'ring'\]"):
    losses.contrastive_loss("softmax", {}, impl="chunked")
  with pytest.raises(ValueError, match="needs the device mesh"):
    losses.contrastive_loss("softmax", _embeddings(), impl="ring")
