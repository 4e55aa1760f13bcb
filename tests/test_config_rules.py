"""The config rules table (glip_jax/config_rules.py): every default field has a rule, and each bad
value of issue 12 fails before anything is written, naming the field, the value and what is allowed."""

import importlib
import os

import ml_collections
import pytest

from configs import common
from glip_jax import config_rules
from glip_jax import errors
from glip_jax import train
from runs import tiny_config


def _leaves(node, prefix=""):
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def test_every_default_field_has_a_rule():
  leaves = list(_leaves(common.base_config()))
  assert len(leaves) > 80 and "optim.lr" in leaves and "data.max_skip_fraction" in leaves
  assert [path for path in leaves if config_rules.rule_for(path) is None] == []


@pytest.mark.parametrize("recipe,arg", [
    ("demo", ""), ("demo", "aclip"), ("demo", "pgs"), ("clip_vit_b16", ""), ("flip_vit_b16", ""),
    ("glip_vit_b16", ""), ("aclip_vit_b16", ""), ("cluster_vit_b16", ""), ("pgs_vit_b16", "runlocal=1"),
])
def test_every_recipe_passes_the_rules(recipe, arg):
  config_rules.validate(importlib.import_module(f"configs.{recipe}").get_config(arg))


_BAD = [
    ("optim.lr", -1e-3, "a number > 0.0"),
    ("optim.lr", 0.0, "a number > 0.0"),
    ("optim.lr", "1e-3", "a number > 0.0"),  # a string where a number is expected
    ("optim.b1", 1.0, "a number in [0.0, 1.0)"),
    ("optim.b2", -0.1, "a number in [0.0, 1.0)"),
    ("optim.eps", 0.0, "a number > 0.0"),
    ("optim.weight_decay", -0.2, "a number >= 0.0"),
    ("optim.warmup_steps", -1, "an int >= 0"),
    ("optim.warmup_steps", 2.5, "an int >= 0"),
    ("optim.end_lr", -1e-5, "a number >= 0.0"),
    ("optim.grad_clip_norm", -1.0, "a number >= 0.0"),
    ("optim.accum_steps", 0, "an int >= 1"),
    ("optim.lr", float("nan"), "a number > 0.0"),
    ("model.embed_dim", 0, "an int >= 1"),
    ("model.text.width", -64, "an int >= 1"),
    ("model.text.heads", 3, "a divisor of model.text.width=64"),
    ("model.text.depth", True, "an int >= 1"),
    ("model.image_size", -32, "a positive int or a pair"),
    ("model.image.variant", "Q/8", "'<size>/<patch>' with size one of"),
    ("model.dtype", "float8", "one of ['float32', 'bfloat16', 'float16']"),
    ("batch_size", "16", "an int >= 1"),
    ("total_steps", 0, "an int >= 1"),
    ("seed", 0.5, "an int"),
    ("masking.ratio", "0.5", "a number"),
    ("masking.sigma", 0.0, "a number > 0.0"),
    ("loss.impl", "chunked", "one of ['dense', 'ring']"),
    ("data.read_threads", 0, "an int >= 1"),
    ("data.crop_scale", (0.9, 0.5), "a pair (min, max) with 0.0 < min <= max <= 1.0"),
    ("data.flip", "yes", "True or False"),
    ("data.max_skip_fraction", 1.5, "a number in [0.0, 1.0]"),
    ("data.skip_window", 0, "an int >= 1"),
    ("data.synthetic.train_size", 0, "an int >= 1"),
    ("data.synthetic.split", "dev", "one of ['train', 'validation', 'test']"),
    ("mesh.data", 0, "-1 (all remaining devices) or an int >= 1"),
    ("mesh.tensor", "2", "-1 (all remaining devices) or an int >= 1"),
    ("tokenizer.kind", "bpe", "one of ['clip', 'sentencepiece']"),
    ("keep_checkpoints", -1, "an int >= 0"),
    ("init_from.optimizer_state", 1, "True or False"),
    ("evals", 5, "a dict of {name: entry}"),
]


def _set(config, field, value):
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  with config.unlocked():  # a string into a float field: ml_collections' own check stays aside
    node.__setattr__(leaf, value) if not isinstance(node[leaf], ml_collections.FieldReference) \
        else node[leaf].set(value)


@pytest.mark.parametrize("field,value,allowed", _BAD, ids=[f"{f}={v!r}" for f, v, _ in _BAD])
def test_a_bad_value_fails_before_anything_is_written(field, value, allowed, tmp_path):
  config = tiny_config()
  try:
    _set(config, field, value)
  except TypeError:  # ml_collections refuses the type itself: the rule stands behind it
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    _set(config, field, value)
  workdir = tmp_path / "run"
  with pytest.raises(errors.ConfigError) as err:
    train.train_and_evaluate(config, str(workdir))
  message = str(err.value)
  assert message.startswith(f"config.{field}={errors.show(value)} is invalid; allowed: "), message
  assert allowed in message
  assert not os.path.exists(workdir)  # failed before writing anything


def test_mixture_entries_follow_the_source_rules():
  config = tiny_config()
  config.data.mixture = [dict(source="synthetic", weight=1.0),
                         dict(source="synthetic", synthetic=dict(label="weight"), weight=1.0)]
  with pytest.raises(ValueError, match=r"config.data.mixture\[1\].synthetic.label='weight' is "
                                       r"invalid; allowed: one of \['shape', 'colour', 'size'\]"):
    config_rules.validate(config)
  config.data.mixture = [(dict(source="synthetic"), -1.0)]
  with pytest.raises(ValueError, match=r"config.data.mixture\[0\].weight=-1.0 is invalid"):
    config_rules.validate(config)


def test_warmup_past_the_end_of_the_run_is_only_a_warning(caplog):
  config = tiny_config()
  config.optim.warmup_steps = 100
  config_rules.check_schedule(config, 40)
  assert "optim.warmup_steps=100 >= the run's 40 steps" in caplog.text
