"""Tests for glip_jax.evaluation.builder: config.evals validation and the evaluators built."""
import functools

import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from glip_jax import masking as masking_lib
from glip_jax import sharding
from glip_jax import train_step
from glip_jax.evaluation import base
from glip_jax.evaluation import builder
from glip_jax.models import clip

BATCH = 32  # a multiple of the 8 fake devices


def _synthetic(split="test", label="shape", **kw):
  return dict(source="synthetic",
              synthetic=dict(image_size=32, split=split, label=label, eval_size=64, **kw))


def _config(**evals) -> ml_collections.ConfigDict:
  c = common.base_config("mu/8", 32)
  c.model.text.context_length = 16
  c.masking.kind = "random"
  c.masking.ratio = 0.5
  c.evals = ml_collections.ConfigDict(evals)
  return c


FULL = dict(
    shape=dict(kind="zeroshot", dataset=_synthetic(), classnames="synthetic:shape",
               templates="synthetic", batch_size=BATCH, every_steps=100),
    shape_masked=dict(kind="zeroshot", dataset=_synthetic(), batch_size=BATCH, masking="train"),
    colour=dict(kind="zeroshot", dataset=_synthetic(label="colour"), batch_size=BATCH,
                masking=dict(kind="gaussian", ratio=0.75)),
    captions=dict(kind="retrieval", dataset=_synthetic(), batch_size=BATCH),
    captions_masked=dict(kind="retrieval", dataset=_synthetic(), batch_size=BATCH,
                         masking="train"),
    # ratio 0 keeps every patch: the unmasked path, and the unmasked scores.
    shape_ratio0=dict(kind="zeroshot", dataset=_synthetic(), batch_size=BATCH,
                      masking=dict(kind="random", ratio=0.0)),
    probe=dict(kind="linear_probe", train_dataset=_synthetic(split="validation"),
               test_dataset=_synthetic(), batch_size=BATCH, l2_values=(1e-3, 1e-1),
               max_steps=30),
)


@pytest.fixture(scope="module")
def setup():
  config = _config(**FULL)
  mesh = sharding.create_mesh(config.mesh)
  model = clip.build_model(config.model)
  state, _ = train_step.create_train_state(model, optax.sgd(0.1), config.model, mesh, seed=0)
  evaluators = {e.name: e for e in builder.build_evaluators(config, model, mesh)}
  return config, mesh, model, state.params, evaluators


@pytest.fixture(scope="module")
def results(setup):
  _, _, _, params, evaluators = setup
  return {name: e.run(params) for name, e in evaluators.items()}


ZEROSHOT_KEYS = {"zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall"}
RETRIEVAL_KEYS = {f"{d}_recall_at_{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_evaluators_return_expected_keys_in_unit_interval(setup, results):
  _, _, _, _, evaluators = setup
  assert evaluators["shape"].every_steps == 100 and evaluators["probe"].every_steps == 0
  expected = {"shape": ZEROSHOT_KEYS, "shape_masked": ZEROSHOT_KEYS, "colour": ZEROSHOT_KEYS,
              "shape_ratio0": ZEROSHOT_KEYS,
              "captions": RETRIEVAL_KEYS, "captions_masked": RETRIEVAL_KEYS,
              "probe": {"linear_probe_top1", "linear_probe_val_top1", "linear_probe_best_l2"}}
  assert {name: set(r) for name, r in results.items()} == expected
  for name, metrics in results.items():
    for key, value in metrics.items():
      if key != "linear_probe_best_l2":
        assert 0.0 <= value <= 1.0, (name, key, value)
  assert results["probe"]["linear_probe_best_l2"] in (1e-3, 1e-1)


def test_masked_regime_differs_from_unmasked(results):
  assert results["shape_masked"] != results["shape"]
  assert results["captions_masked"] != results["captions"]
  assert results["shape_ratio0"] == results["shape"]


# ------------------------------------------------------------ exact values vs a direct reference
# The reference encodes with model.apply on one device (no sharding), builds the classifier
# and ranks in numpy, and draws keep indices from the spec each entry should resolve to: an
# evaluator wired to the wrong dataset, classnames, templates or masking regime scores otherwise.


@functools.lru_cache(maxsize=None)
def _encoder(model, method):
  """model.apply(method=...) jitted on one device (op by op it is several times slower)."""
  return jax.jit(lambda params, *args: model.apply({"params": params}, *args, method=method))


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_images(config, model, params, batches, spec):
  """Normalised image embeddings [N,E] (non-padding rows) and their batches' fields."""
  grid = clip.grid(config.model)
  embs, rows = [], []
  for index, batch in enumerate(batches):
    images = np.asarray(batch["image"])
    keep = None
    if spec is not None:  # the evaluators' fixed per-batch keys (base.keep_indices_for_batch)
      rng = jax.random.fold_in(jax.random.key(base.MASKING_SEED), index)
      keep = masking_lib.keep_indices(rng, spec, images.shape[0], grid, images=images)
    encode = _encoder(model, clip.CLIP.encode_image)
    emb = encode(params, images) if keep is None else encode(params, images, keep)
    valid = np.asarray(batch["mask"], bool)
    embs.append(_unit(emb)[valid])
    rows.append({k: np.asarray(v)[valid] for k, v in batch.items()})
  return np.concatenate(embs), {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _reference_zeroshot(config, model, params, evaluator, entry, spec):
  classnames = builder.resolve_classnames(entry)
  templates = builder.resolve_template_set(entry)
  tokens = builder.make_tokenizer(config)([t.format(c) for c in classnames for t in templates])
  text = _unit(_encoder(model, clip.CLIP.encode_text)(params, np.asarray(tokens, np.int32)))
  classifier = _unit(text.reshape(len(classnames), len(templates), -1).mean(1))  # [C,E]
  image, rows = _reference_images(config, model, params, evaluator.batches_fn(), spec)
  logits, labels = image @ classifier.T, rows["label"]
  # Rank of the true class: how many other classes score at least as high (ties count against).
  true = logits[np.arange(len(labels)), labels][:, None]
  rank = ((logits >= true) & (np.arange(logits.shape[1]) != labels[:, None])).sum(1)
  recalls = [np.mean(rank[labels == c] == 0) for c in np.unique(labels)]
  return {"zeroshot_top1": np.mean(rank == 0), "zeroshot_top5": np.mean(rank < 5),
          "zeroshot_mean_per_class_recall": np.mean(recalls)}


def _reference_retrieval(config, model, params, evaluator, spec):
  image, rows = _reference_images(config, model, params, evaluator.batches_fn(), spec)
  valid = rows["text_mask"]  # [N, C]
  tokens = rows["texts"][valid]
  owner = np.broadcast_to(np.arange(len(image))[:, None], valid.shape)[valid]
  text = _unit(_encoder(model, clip.CLIP.encode_text)(params, tokens.astype(np.int32)))
  sims = image @ text.T  # [N images, T captions]
  # Image to text: other images' captions scoring at least the best own caption (synthetic
  # captions repeat, so exact ties occur and count against); text to image: likewise.
  mine = owner[None, :] == np.arange(len(image))[:, None]  # [N, T]
  best_own = np.where(mine, sims, -np.inf).max(1)
  i2t = ((sims >= best_own[:, None]) & ~mine).sum(1)
  own = sims[owner, np.arange(len(owner))]
  t2i = ((sims >= own[None, :]) & ~mine).sum(0)
  return {**{f"i2t_recall_at_{k}": np.mean(i2t < k) for k in (1, 5, 10)},
          **{f"t2i_recall_at_{k}": np.mean(t2i < k) for k in (1, 5, 10)}}


_TRAIN = dict(kind="random", ratio=0.5)  # config.masking, for masking="train"


# Slow: each case compiles the single-device reference encoders for its shapes (2-5 s each on
# two cores, ~15 s in all); .ci/run runs them.
@pytest.mark.slow
@pytest.mark.parametrize("name, masking", [
    ("shape", None), ("colour", dict(kind="gaussian", ratio=0.75)), ("shape_masked", _TRAIN),
    ("captions", None), ("captions_masked", _TRAIN),
])
def test_exact_values_against_a_direct_reference(setup, results, name, masking):
  config, _, model, params, evaluators = setup
  params = jax.device_put(jax.device_get(params), jax.devices()[0])  # unsharded
  entry = builder.validate_evals(config)[name]
  spec = masking and masking_lib.from_config(ml_collections.ConfigDict(masking))
  evaluator = evaluators[name].evaluator
  if entry.kind == "zeroshot":
    reference = _reference_zeroshot(config, model, params, evaluator, entry, spec)
  else:
    reference = _reference_retrieval(config, model, params, evaluator, spec)
  assert results[name] == pytest.approx(reference, abs=1e-6)



def test_runs_are_deterministic_and_prefixed(setup, results):
  _, _, _, params, evaluators = setup
  # Masked inference draws its keys from a fixed seed: a second run scores identically.
  again = builder.run_evaluators([evaluators["shape_masked"], evaluators["captions"]], params)
  assert again == {**{f"eval/shape_masked/{k}": v for k, v in results["shape_masked"].items()},
                   **{f"eval/captions/{k}": v for k, v in results["captions"].items()}}


def test_resolved_names_and_templates(setup):
  config, _, _, _, evaluators = setup
  entries = builder.validate_evals(config)
  assert builder.resolve_classnames(entries["colour"])[0] == "red"
  assert builder.resolve_template_set(entries["colour"])[0] == "a photo of a {} object"
  assert evaluators["shape_masked"].evaluator.masking is not None
  assert evaluators["shape"].evaluator.masking is None


def test_due():
  e = builder.ScheduledEvaluator("x", 200, evaluator=None)
  assert [s for s in range(1, 602) if e.due(s, 601)] == [200, 400, 600, 601]
  end_only = builder.ScheduledEvaluator("x", 0, evaluator=None)
  assert [s for s in range(1, 11) if end_only.due(s, 10)] == [10]


def test_no_evals_builds_nothing(setup):
  _, mesh, model, _, _ = setup
  assert builder.build_evaluators(_config(), model, mesh) == []


def test_batch_size_not_divisible_by_data_parallel_size(setup):
  _, mesh, model, _, _ = setup
  config = _config(shape=dict(kind="zeroshot", dataset=_synthetic(), batch_size=12))
  with pytest.raises(ValueError, match=r"evals\.shape\.batch_size=12 .*data-parallel size 8"):
    builder.build_evaluators(config, model, mesh)


def _entry(**kw):
  return dict(dict(kind="zeroshot", dataset=_synthetic(), batch_size=BATCH), **kw)


@pytest.mark.parametrize("entry, pattern", [
    (dict(kind="knn"), r"evals\.x\.kind='knn' .*'zeroshot', 'retrieval', 'linear_probe'"),
    (_entry(colour="red"), r"evals\.x\.colour='red' .*fields"),
    (_entry(every_steps=-1), r"evals\.x\.every_steps=-1"),
    (_entry(batch_size=0), r"evals\.x\.batch_size=0"),
    (_entry(masking="half"), r"evals\.x\.masking='half' .*'none', 'train'"),
    (_entry(masking=dict(kind="random", ratio=1.5)), r"evals\.x\.masking=.*ratio"),
    (_entry(masking=dict(kind="attentive", ratio=0.5)), r"evals\.x\.masking=.*attentive"),
    (_entry(classnames="klingon"), r"evals\.x\.classnames='klingon' .*imagenet"),
    (_entry(classnames="synthetic:colour"),
     r"evals\.x\.dataset\.synthetic\.label='shape' .*'colour'"),
    (_entry(classnames="tfds"), r"evals\.x\.classnames='tfds'"),
    (_entry(templates="nope.txt"), r"evals\.x\.templates='nope.txt' .*clip_imagenet_80"),
    (_entry(dataset=dict(source="web")), r"evals\.x\.dataset\.source='web'"),
    (_entry(dataset=dict(source="synthetic", synthetic=dict(split="dev"))),
     r"evals\.x\.dataset\.synthetic\.split='dev'"),
    (_entry(dataset=dict(source="karpathy")), r"evals\.x\.dataset\.karpathy\.json_path=''"),
    (_entry(dataset=dict(source="tfds", tfds=dict(name="cifar10"))),
     r"evals\.x\.classnames=''"),
    (dict(kind="retrieval", dataset=_synthetic(), ks=(1, 0)), r"evals\.x\.ks="),
    (dict(kind="linear_probe", train_dataset=dict(source="arrayrecord", paths="/a/*"),
          test_dataset=dict(source="arrayrecord", paths="/b/*")),
     r"evals\.x\.num_classes=0 .*train_dataset\.source='arrayrecord'"),
    (dict(kind="linear_probe", val_fraction=1.0), r"evals\.x\.val_fraction=1\.0"),
])
def test_validation_names_field_value_and_allowed(entry, pattern):
  with pytest.raises(ValueError, match=pattern):
    builder.validate_evals(_config(x=entry))


def test_train_masking_of_attentive_run_is_rejected():
  config = _config(x=_entry(masking="train"))
  config.masking.kind = "attentive"
  with pytest.raises(ValueError, match=r"evals\.x\.masking='train' .*A-CLIP teacher"):
    builder.validate_evals(config)


def test_defaults_are_filled_in():
  entries = builder.validate_evals(_config(x=_entry(), r=dict(kind="retrieval")))
  assert entries["x"].masking == "none" and entries["x"].every_steps == 0
  assert entries["x"].dataset.synthetic.num_captions == 3  # untouched default
  assert entries["r"].dataset.synthetic.split == "test"
  assert tuple(entries["r"].ks) == (1, 5, 10)
