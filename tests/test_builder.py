"""Tests for glip_jax.evaluation.builder: config.evals validation and the evaluators built."""
import ml_collections
import optax
import pytest

from configs import common
from glip_jax import sharding
from glip_jax import train_step
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
