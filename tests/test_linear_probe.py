"""Linear probe: separable features, random labels, regulariser choice, evaluator end to end."""
import jax.numpy as jnp
import numpy as np
import pytest

from glip_jax.evaluation import linear_probe

NUM_CLASSES = 4
DIM = 16


def _features(num, labels_fn, seed=0, noise=1.0):
  """L2-normalised Gaussian clusters around well-separated class centres."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(NUM_CLASSES, DIM)) * 3
  labels = rng.integers(0, NUM_CLASSES, num).astype(np.int32)
  x = centres[labels] + noise * rng.normal(size=(num, DIM))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), labels_fn(rng, labels)


def test_separable_features_reach_full_accuracy_with_weak_regularisation():
  x, y = _features(400, lambda rng, labels: labels)
  result = linear_probe.linear_probe_metrics(x[:300], y[:300], x[300:], y[300:], NUM_CLASSES)
  assert result["linear_probe_top1"] >= 0.99
  assert result["linear_probe_val_top1"] >= 0.99
  # Every weight separates the classes; the cross-entropy tie-break picks a weak one.
  assert result["linear_probe_best_l2"] <= 1e-3


def test_random_labels_give_chance_accuracy():
  x, y = _features(400, lambda rng, labels: rng.integers(0, NUM_CLASSES, len(labels)))
  result = linear_probe.linear_probe_metrics(x[:300], y[:300], x[300:], y[300:], NUM_CLASSES)
  assert result["linear_probe_top1"] < 0.45  # Chance: 0.25 on 100 test examples.


def test_selection_depends_on_validation_not_on_sweep_order():
  # l2 = 10 shrinks w until the (unregularised) bias dominates: a majority-class predictor.
  x, y = _features(200, lambda rng, labels: labels, seed=1)
  results = [
      linear_probe.linear_probe_metrics(x[:150], y[:150], x[150:], y[150:], NUM_CLASSES,
                                        l2_values=l2_values)
      for l2_values in [(10.0, 1e-3), (1e-3, 10.0)]
  ]
  assert results[0] == results[1]
  assert results[0]["linear_probe_best_l2"] == 1e-3


def test_fit_minimises_the_regularised_objective():
  x, y = _features(200, lambda rng, labels: labels, noise=3.0)
  l2 = 1e-2
  params = linear_probe.fit_logistic_regression(x, y, jnp.float32(l2), num_classes=NUM_CLASSES)

  def objective(w, b):
    logits = x @ w + b
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(w ** 2)

  w, b = np.asarray(params["w"]), np.asarray(params["b"])
  best = objective(w, b)
  rng = np.random.default_rng(0)
  for _ in range(5):  # The optimum: no small perturbation does better.
    assert objective(w + 1e-2 * rng.normal(size=w.shape), b) >= best - 1e-6
  assert np.linalg.norm(w) > 0.1


def test_split_is_disjoint_and_seeded():
  tr, va = linear_probe.split_train_val(10, 0.3, seed=1)
  assert len(va) == 3 and sorted(np.concatenate([tr, va])) == list(range(10))
  np.testing.assert_array_equal(va, linear_probe.split_train_val(10, 0.3, seed=1)[1])
  with pytest.raises(ValueError):
    linear_probe.split_train_val(10, 0.0, seed=1)


def _encode_image(params, images, keep_indices=None):
  """Looks up the features of the example whose index is painted into the image."""
  del keep_indices
  index = images[:, 0, 0, 0].astype(jnp.int32) * 256 + images[:, 0, 0, 1].astype(jnp.int32)
  return params["features"][index]


def _batches(offset, labels, batch_size=32):
  for start in range(0, len(labels), batch_size):
    idx = np.arange(start, start + batch_size)
    mask = idx < len(labels)
    image = np.zeros((batch_size, 2, 2, 3), np.uint8)
    image[:, 0, 0, 0], image[:, 0, 0, 1] = (offset + idx) // 256, (offset + idx) % 256
    yield {"image": image, "label": np.where(mask, labels[np.minimum(idx, len(labels) - 1)], 0),
           "mask": mask}


def test_evaluator_end_to_end():
  x, y = _features(400, lambda rng, labels: labels)
  evaluator = linear_probe.LinearProbeEvaluator(
      "toy", _encode_image, lambda: _batches(0, y[:300]), lambda: _batches(300, y[300:]),
      num_classes=NUM_CLASSES, l2_values=(1e-4, 1e-1))
  # 3x scaled features: the evaluator must normalise them itself.
  result = evaluator.run({"features": jnp.asarray(3 * x)})
  assert set(result) == {"linear_probe_top1", "linear_probe_best_l2", "linear_probe_val_top1"}
  assert result["linear_probe_top1"] >= 0.99
  # Wrong labels on the test set (shifted by one class): accuracy collapses.
  shifted = linear_probe.LinearProbeEvaluator(
      "toy", _encode_image, lambda: _batches(0, y[:300]),
      lambda: _batches(300, (y[300:] + 1) % NUM_CLASSES), num_classes=NUM_CLASSES,
      l2_values=(1e-4,))
  assert shifted.run({"features": jnp.asarray(3 * x)})["linear_probe_top1"] < 0.05


def test_labels_outside_num_classes_are_rejected():
  x = np.eye(4, dtype=np.float32)
  with pytest.raises(ValueError, match="labels"):
    linear_probe.linear_probe_metrics(x, np.array([0, 1, 2, 4]), x, np.zeros(4, int), 4)
