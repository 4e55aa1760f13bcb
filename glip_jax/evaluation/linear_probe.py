"""Linear probe (SPEC §6): multinomial logistic regression on frozen, L2-normalised image features.

As in CLIP (Radford et al. 2021, App. A.3): the L2 weight is chosen by a sweep on a held-out part of
the training features, then the classifier is refit on all training features with that weight and
scored on the test split. Fitting is full-batch L-BFGS (optax.lbfgs with its zoom line search) on

  mean softmax cross-entropy + l2 / 2 · ||W||²        (bias not regularised)

run until the gradient norm falls below `tol` or `max_steps`. Full batch keeps the fit deterministic
and free of learning-rate tuning; it holds all features in memory, which suits sets up to a few
hundred thousand examples (for ImageNet-1k, probe a class-balanced subset).

Model selection: highest held-out top-1; ties (common on easy sets, where every weight separates
the classes) go to the lowest held-out cross-entropy, i.e. the best-calibrated classifier.
"""
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import optax.tree_utils as otu

from glip_jax import errors
from glip_jax.evaluation import base

DEFAULT_L2_VALUES = tuple(float(v) for v in np.logspace(-6, 2, 9))


def _cross_entropy(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  logits = x @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnames=("num_classes", "max_steps"))
def fit_logistic_regression(x: jax.Array, y: jax.Array, l2: jax.Array, num_classes: int,
                            max_steps: int = 500, tol: float = 1e-6) -> dict[str, jax.Array]:
  """Weights {'w': [E,C], 'b': [C]} minimising mean cross-entropy + l2/2·||w||² with L-BFGS."""
  # l2 is traced, so the whole regularisation sweep shares one compilation.
  def loss_fn(params):
    return _cross_entropy(params, x, y) + 0.5 * l2 * jnp.sum(params["w"] ** 2)

  params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    grad = otu.tree_get(state, "grad")
    return (count == 0) | ((count < max_steps) & (otu.tree_norm(grad) >= tol))

  params, _ = jax.lax.while_loop(keep_going, step, (params, opt.init(params)))
  return params


@jax.jit
def _evaluate(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
  """(top-1 accuracy, mean cross-entropy) of a fitted probe."""
  logits = x @ params["w"] + params["b"]
  return jnp.mean(jnp.argmax(logits, -1) == y), _cross_entropy(params, x, y)


def split_train_val(num: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint (train, val) index arrays from a seeded permutation of range(num)."""
  num_val = int(round(num * val_fraction))
  if not 0 < num_val < num:
    raise ValueError(f"val_fraction={val_fraction} leaves no train or no val examples of {num}.")
  perm = np.random.default_rng(seed).permutation(num)
  return np.sort(perm[num_val:]), np.sort(perm[:num_val])


def linear_probe_metrics(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, num_classes: int,
                 l2_values: Sequence[float] = DEFAULT_L2_VALUES, val_fraction: float = 0.2,
                 max_steps: int = 500, seed: int = 0) -> dict[str, float]:
  """Sweeps l2 on a held-out split of train, refits on all of train, returns test top-1."""
  for name, labels in (("train", train_y), ("test", test_y)):
    if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
      raise ValueError(f"{name} labels must lie in [0, {num_classes}).")
  fit = functools.partial(fit_logistic_regression, num_classes=num_classes, max_steps=max_steps)
  tr, va = split_train_val(train_x.shape[0], val_fraction, seed)
  best = None  # (-val accuracy, val cross-entropy, l2): the smallest tuple wins.
  for l2 in l2_values:
    params = fit(train_x[tr], train_y[tr], jnp.float32(l2))
    accuracy, xent = _evaluate(params, train_x[va], train_y[va])
    candidate = (-float(accuracy), float(xent), float(l2))
    if best is None or candidate < best:
      best = candidate
  best_l2 = best[2]
  params = fit(train_x, train_y, jnp.float32(best_l2))
  test_accuracy, _ = _evaluate(params, test_x, test_y)
  return {"linear_probe_top1": float(test_accuracy), "linear_probe_best_l2": best_l2,
          "linear_probe_val_top1": -best[0]}


class LinearProbeEvaluator:
  """Linear-probe top-1 of frozen image features (train and test sets given as batch sources)."""

  def __init__(self, name: str, encode_image: base.ImageEncoder,
               train_batches_fn: base.BatchesFn, test_batches_fn: base.BatchesFn,
               num_classes: int, masking: base.Masking | None = None,
               l2_values: Sequence[float] = DEFAULT_L2_VALUES, val_fraction: float = 0.2,
               max_steps: int = 500, seed: int = 0):
    self.name = name
    self.encode_image = encode_image
    self.train_batches_fn = train_batches_fn
    self.test_batches_fn = test_batches_fn
    self.num_classes = num_classes
    self.masking = masking
    self.l2_values = tuple(l2_values)
    self.val_fraction = val_fraction
    self.max_steps = max_steps
    self.seed = seed

  def run(self, params: base.Params) -> dict[str, float]:
    """Returns linear_probe_top1, linear_probe_best_l2 and linear_probe_val_top1."""
    train_x, train_y = base.embed_images(self.encode_image, params, self.train_batches_fn(),
                                         self.masking)
    test_x, test_y = base.embed_images(self.encode_image, params, self.test_batches_fn(),
                                       self.masking)
    return linear_probe_metrics(train_x, train_y, test_x, test_y, self.num_classes, self.l2_values,
                        self.val_fraction, self.max_steps, self.seed)


# ----------------------------------------------------------------------------------------------
# Config: this kind's fields, their validation and the evaluator built from an entry.

DATASET_FIELDS = ("train_dataset", "test_dataset")


def default_config() -> dict:
  """Fields of a linear-probe entry besides the generic ones (datasets are filled in generically)."""
  return dict(
      num_classes=0,  # 0 = from the dataset (synthetic label or the TFDS label feature)
      l2_values=DEFAULT_L2_VALUES,
      val_fraction=0.2,
      max_steps=500,
      seed=0,
  )


def validate(entry: ml_collections.ConfigDict, prefix: str) -> None:
  """Class count known, a non-empty l2 sweep, a validation fraction in (0, 1), max_steps >= 1."""
  if not isinstance(entry.num_classes, int) or entry.num_classes < 0:
    errors.fail(f"{prefix}num_classes", entry.num_classes, "an int >= 0 (0: from the dataset)")
  if entry.num_classes == 0:
    for field in DATASET_FIELDS:
      if base.dataset_num_classes(entry[field]) is None:
        errors.fail(f"{prefix}num_classes", 0,
                    f"an int >= 2: {field}.source={entry[field].source!r} has no known classes")
  l2 = tuple(entry.l2_values)
  if not l2 or not all(isinstance(v, (int, float)) and v >= 0 for v in l2):
    errors.fail(f"{prefix}l2_values", entry.l2_values, "a non-empty list of floats >= 0")
  if not 0 < entry.val_fraction < 1:
    errors.fail(f"{prefix}val_fraction", entry.val_fraction, "a float in (0, 1)")
  if not isinstance(entry.max_steps, int) or entry.max_steps < 1:
    errors.fail(f"{prefix}max_steps", entry.max_steps, "an int >= 1")


def from_config(name: str, entry: ml_collections.ConfigDict,
                context: base.BuildContext) -> LinearProbeEvaluator:
  """The linear-probe evaluator of a validated entry."""
  num_classes = entry.num_classes or base.num_classes(entry.train_dataset)
  return LinearProbeEvaluator(
      name, context.encode_image, context.batches(entry.train_dataset),
      context.batches(entry.test_dataset), num_classes, masking=context.masking,
      l2_values=tuple(float(v) for v in entry.l2_values), val_fraction=float(entry.val_fraction),
      max_steps=entry.max_steps, seed=entry.seed)
