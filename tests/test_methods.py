"""The method seam: methods and evaluator kinds by name, a run spec built once, and a third
method defined here, trained through the unchanged trainer (the proof that the seam is real)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glip_jax import checkpointing
from glip_jax import errors
from glip_jax import losses
from glip_jax import methods
from glip_jax import run_spec
from glip_jax import train
from glip_jax import train_step as train_step_lib
from glip_jax.data import sources
from glip_jax.methods import clip as clip_method
from glip_jax.models import clip as clip_lib
from runs import read_losses, tiny_config


def test_unknown_method_names_the_allowed_ones(tmp_path):
  config = tiny_config()
  config.method = "siglip2"
  with pytest.raises(errors.ConfigError, match=r"method='siglip2' is not a training method; "
                                                r"allowed: \['aclip', 'clip'"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_unknown_evaluator_kind_names_the_allowed_ones():
  config = tiny_config()
  config.evals = {"x": {"kind": "captioning"}}
  with pytest.raises(errors.ConfigError, match=r"evals\.x\.kind='captioning' is invalid; "
                                                r"allowed: \['zeroshot', 'retrieval', "
                                                r"'linear_probe'\]"):
    run_spec.build(config)


def test_aclip_without_its_section_and_clip_with_attentive_fail_clearly():
  config = tiny_config()
  config.method = "aclip"
  with pytest.raises(errors.ConfigError, match="needs the config.aclip section"):
    run_spec.build(config)
  config = tiny_config()
  config.masking.kind = "attentive"
  with pytest.raises(errors.ConfigError, match="config.method='aclip'"):
    run_spec.build(config)


def test_training_sources_are_opened_once_for_an_epoch_run(tmp_path, monkeypatch):
  """`total_epochs` needs the dataset size: the run spec opens the source once and passes it on."""
  opened = []
  real = sources.source_from_config

  def counting(cfg, split=None):
    opened.append(split)
    return real(cfg, split)

  monkeypatch.setattr(sources, "source_from_config", counting)
  config = tiny_config()
  config.data.synthetic.train_size = 48
  config.total_epochs = 0.5  # 24 examples: 2 steps of 16
  config.checkpoint_every_steps = 0
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 2
  assert len(opened) == 1


# A third method, defined only here: image-locked tuning (the image tower and temperature are
# frozen, only the text tower learns), with its own step, batch keys and cost model.

def _locked_image_step(state, batch, *, model, tx, schedule, spec):
  def loss_fn(text_params):
    params = {**state.params, "text": text_params}
    outputs = model.apply({"params": params}, batch["image"], batch["text"])
    return losses.contrastive_loss(spec.loss, outputs)

  (loss, aux), text_grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["text"])
  grads = jax.tree.map(jnp.zeros_like, state.params)
  grads["text"] = text_grads
  params, opt_state = train_step_lib.apply_gradients(state, grads, tx)
  params = {**params, "image": state.params["image"], "logit_scale": state.params["logit_scale"]}
  metrics = train_step_lib.step_metrics(state, grads, schedule, loss, aux,
                                        state.params["logit_scale"], spec.grid, None)
  return train_step_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _compile(model, tx, schedule, step_spec, mesh, state_shardings, spec):
  del spec
  step = functools.partial(_locked_image_step, model=model, tx=tx, schedule=schedule,
                           spec=step_spec)
  return train_step_lib.jit_train_step(step, mesh, state_shardings)


LOCKED_IMAGE = methods.Method(
    name="locked_image",
    validate=lambda config, total_steps: None,
    batch_keys=("image", "text"),
    make_preprocess=lambda spec, data, image_size, tokenizer: None,
    create_train_state=clip_method.create_train_state,
    compile_train_step=_compile,
    flops_per_example=lambda model_config, spec, masking_spec: 1e6,
)


def test_a_third_method_trains_through_the_unchanged_trainer(tmp_path):
  methods.register(LOCKED_IMAGE)
  assert "locked_image" in methods.names()
  config = tiny_config()
  config.method = "locked_image"
  config.total_steps = 2
  config.checkpoint_every_steps = 0
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)
  assert summary["steps"] == 2 and np.isfinite(summary["loss"])
  assert sorted(read_losses(workdir)) == [1, 2]
  # Its own step ran: the image tower is exactly the initialisation, the text tower moved.
  spec = run_spec.build(config)
  model = clip_lib.build_model(config.model)
  tx, _ = train_step_lib.make_optimizer(config.optim, 2)
  init, _ = LOCKED_IMAGE.create_train_state(model, tx, config.model, spec.mesh, config.seed, None)
  restored = checkpointing.restore_params_from(
      workdir, checkpointing.abstract_like(init.params))
  for a, b in zip(jax.tree.leaves(restored["image"]), jax.tree.leaves(init.params["image"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
           zip(jax.tree.leaves(restored["text"]), jax.tree.leaves(init.params["text"]))]
  assert any(moved)


def test_sigmoid_loss_without_bias_fails_in_validation(tmp_path):
  config = tiny_config()
  config.loss.kind = "sigmoid"
  with pytest.raises(errors.ConfigError, match=r"loss.kind='sigmoid' needs model.logit_bias_init"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # before any file is written
