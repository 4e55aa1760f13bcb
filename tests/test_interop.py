"""open_clip interop: import / export against open_clip itself, round trips, errors, tools.

Tests that need the PyTorch reference (the 'interop' extra: torch CPU + open_clip_torch) take the
`oc` fixture and skip, saying so, where it is absent; the rest run everywhere.
"""

import json
import os
import re
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from glip_jax import checkpointing
from glip_jax import sharding as sharding_lib
from glip_jax import train_step as train_step_lib
from glip_jax.data import synthetic
from glip_jax.data import tokenizer as tokenizer_lib
from glip_jax.evaluation import builder as eval_builder
from glip_jax.evaluation import zeroshot
from glip_jax.interop import open_clip as oc_lib
from glip_jax.interop import params_checkpoint
from glip_jax.models import clip as clip_lib
from glip_jax.models import posemb
import torch_reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import export_open_clip  # noqa: E402
import import_open_clip  # noqa: E402

TOL = 1e-4  # relative, float32
TINY_OPEN_CLIP = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
    text_cfg=dict(context_length=12, vocab_size=49408, width=64, heads=2, layers=2))


def tiny_config(image_size=32, context_length=12):
  config = clip_lib.model_config("mu/8", image_size)
  config.text.context_length = context_length
  return config


def rel_err(ours, reference):
  """max |ours - reference| / max |reference|."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def our_forward(config, params, images, tokens):
  model = clip_lib.build_model(config)
  out = jax.jit(model.apply)({"params": params}, images, tokens)
  logits = np.exp(out["logit_scale"]) * out["image_emb"] @ out["text_emb"].T
  return {"image_emb": out["image_emb"], "text_emb": out["text_emb"], "logits": logits}


def assert_equal_outputs(ours, reference):
  for key in ("image_emb", "text_emb", "logits"):
    assert rel_err(ours[key], reference[key]) <= TOL, key


def inputs(config, batch, seed=0):
  rng = np.random.default_rng(seed)
  h, w = clip_lib.image_size_hw(config.image_size)
  images = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
  length = config.text.context_length
  tokens = rng.integers(1, 49000, (batch, length)).astype(np.int32)
  tokens[:, 0] = tokenizer_lib.CLIP_SOT
  for i in range(batch):  # EOT at different positions, zeros after it
    end = 2 + (i * 3) % (length - 2)
    tokens[i, end], tokens[i, end + 1:] = tokenizer_lib.CLIP_EOT, 0
  return images, tokens


def perturbed_params(config, seed):
  """Random parameters of our model (from its abstract shapes, no compile): weights N(0, 0.05²),
  every bias and LayerNorm scale off 0 / 1 by N(0, 0.1²)."""
  rng = np.random.default_rng(seed)

  def sample(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == "scale":
      return 1.0 + 0.1 * noise
    if name == "logit_scale":
      return np.float32(np.log(1 / 0.07)) + 0.1 * noise
    return (0.1 if name in ("bias", "logit_bias") else 0.05) * noise
  return jax.tree_util.tree_map_with_path(sample, oc_lib.abstract_params(config))


def swapped_qk_rules():
  """A deliberately wrong mapping (test-only): q and k exchanged in every attention import."""
  def swap(to_ours):
    def convert(t, shape):
      x = to_ours(t, shape)
      return np.stack([x[..., 1, :, :], x[..., 0, :, :], x[..., 2, :, :]], axis=-3)
    return convert
  return tuple(oc_lib.LeafRule(r.suffix, r.torch_suffix, r.to_torch, swap(r.to_ours))
               if r.suffix[0] == "in_proj" else r for r in oc_lib.RULES)


@pytest.fixture(scope="module")
def oc():
  _, open_clip = torch_reference.import_open_clip()
  return open_clip


@pytest.fixture(scope="module")
def tiny(oc):
  """A perturbed random open_clip tiny model, its state dict, our params and both forwards."""
  model = torch_reference.create(oc, TINY_OPEN_CLIP, seed=0)
  state_dict = torch_reference.state_dict(model)
  config = tiny_config()
  images, tokens = inputs(config, 4)
  return dict(model=model, state_dict=state_dict, config=config, images=images, tokens=tokens,
              reference=torch_reference.forward(model, images, tokens))


# ---------------------------------------------------------------------------- open_clip → ours
def test_tiny_import_equals_open_clip(tiny):
  params = oc_lib.state_dict_to_params(tiny["state_dict"], tiny["config"])
  ours = our_forward(tiny["config"], params, tiny["images"], tiny["tokens"])
  assert_equal_outputs(ours, tiny["reference"])


def test_swapped_qk_mapping_fails_the_equality(tiny):
  # The negative control: the equality check above must catch a wrong attention mapping.
  params = oc_lib.state_dict_to_params(tiny["state_dict"], tiny["config"],
                                       rules=swapped_qk_rules())
  ours = our_forward(tiny["config"], params, tiny["images"], tiny["tokens"])
  assert rel_err(ours["image_emb"], tiny["reference"]["image_emb"]) > 100 * TOL
  assert rel_err(ours["text_emb"], tiny["reference"]["text_emb"]) > 100 * TOL
  with pytest.raises(AssertionError):
    assert_equal_outputs(ours, tiny["reference"])


def test_non_square_image_grid_keeps_row_major_patch_order(oc):
  config = dict(TINY_OPEN_CLIP, vision_cfg=dict(TINY_OPEN_CLIP["vision_cfg"], image_size=[32, 48]))
  model = torch_reference.create(oc, config, seed=3)
  ours_config = tiny_config((32, 48))
  images, tokens = inputs(ours_config, 2, seed=1)
  params = oc_lib.state_dict_to_params(torch_reference.state_dict(model), ours_config)
  assert_equal_outputs(our_forward(ours_config, params, images, tokens),
                       torch_reference.forward(model, images, tokens))


def test_quick_gelu_import(oc):
  model = torch_reference.create(oc, dict(TINY_OPEN_CLIP, quick_gelu=True), seed=4)
  state_dict = torch_reference.state_dict(model)
  config = oc_lib.infer_model_config(state_dict, quick_gelu=True)
  images, tokens = inputs(config, 2, seed=2)
  reference = torch_reference.forward(model, images, tokens)
  params = oc_lib.state_dict_to_params(state_dict, config)
  assert_equal_outputs(our_forward(config, params, images, tokens), reference)
  config.quick_gelu = False  # what a wrong flag does: clearly different
  assert rel_err(our_forward(config, params, images, tokens)["image_emb"],
                 reference["image_emb"]) > 10 * TOL


# ---------------------------------------------------------------------------- ours → open_clip
def test_tiny_export_loads_in_open_clip_and_matches(oc, tmp_path):
  config = tiny_config()
  params = perturbed_params(config, seed=1)
  images, tokens = inputs(config, 4)
  ours = our_forward(config, params, images, tokens)
  paths = oc_lib.write_open_clip_dir(tmp_path, params, config, "glip-tiny-test")
  model, _, preprocess = oc.create_model_and_transforms(f"local-dir:{tmp_path}")
  assert_equal_outputs(ours, torch_reference.forward(model.eval(), images, tokens))
  assert preprocess.transforms[0].size in (32, [32, 32], (32, 32))
  # The other documented route: register the bare model config, load the weights file.
  oc.add_model_config(paths["model_config"])
  model, _, _ = oc.create_model_and_transforms("glip-tiny-test", pretrained=paths["weights"])
  assert_equal_outputs(ours, torch_reference.forward(model.eval(), images, tokens))


def test_export_of_flip_and_siglip_options(oc, tmp_path):
  # Average pooling and fixed sin-cos positions (FLIP) and a learnable logit bias (SigLIP):
  # open_clip computes them its own way, so the exported config has to say so.
  config = tiny_config()
  config.image.update(pool="avg", pos_embedding="sincos")
  config.logit_bias_init = -10.0
  params = perturbed_params(config, seed=2)
  images, tokens = inputs(config, 2)
  ours = our_forward(config, params, images, tokens)
  oc_lib.write_open_clip_dir(tmp_path, params, config, "x")
  model, _, _ = oc.create_model_and_transforms(f"local-dir:{tmp_path}")
  assert_equal_outputs(ours, torch_reference.forward(model.eval(), images, tokens))
  assert float(model.logit_bias.detach()) == pytest.approx(float(params["logit_bias"]))


# ---------------------------------------------------------------------------- round trips, files
def test_import_export_round_trip_is_bit_identical(tiny):
  state_dict = tiny["state_dict"]
  params = oc_lib.state_dict_to_params(state_dict, tiny["config"])
  back = oc_lib.params_to_state_dict(params, tiny["config"])
  assert sorted(back) == sorted(state_dict)
  for key, value in state_dict.items():
    assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
  again = oc_lib.state_dict_to_params(back, tiny["config"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, params)


def test_safetensors_and_torch_files_give_the_same_parameters(oc, tiny, tmp_path):
  import safetensors.torch
  import torch
  state = tiny["model"].state_dict()
  safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                              tmp_path / "m.safetensors")
  torch.save(state, tmp_path / "m.pt")
  # An open_clip training checkpoint: {'state_dict': ...} saved from DDP ('module.' prefixes).
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
             tmp_path / "epoch_3.bin")
  loaded = [oc_lib.load_params(tmp_path / name, tiny["config"])
            for name in ("m.safetensors", "m.pt", "epoch_3.bin")]
  reference = oc_lib.state_dict_to_params(tiny["state_dict"], tiny["config"])
  for params in loaded:
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, reference)


def test_torchscript_archives_are_read_like_openais(oc, tmp_path):
  import torch

  class Tiny(torch.nn.Module):  # OpenAI's files are TorchScript archives of fp16 modules
    def __init__(self):
      super().__init__()
      self.proj = torch.nn.Parameter(torch.arange(6, dtype=torch.float16).reshape(2, 3))
      self.register_buffer("input_resolution", torch.tensor(224))

    def forward(self, x):
      return x @ self.proj

  torch.jit.script(Tiny()).save(str(tmp_path / "ViT-B-16.pt"))
  with pytest.warns(Warning):  # torch deprecates torch.jit.load; it still is how these load
    state_dict = oc_lib.read_state_dict(tmp_path / "ViT-B-16.pt")
  assert sorted(state_dict) == ["input_resolution", "proj"]
  assert state_dict["proj"].dtype == np.float32
  np.testing.assert_array_equal(state_dict["proj"], np.arange(6).reshape(2, 3))


def test_fp16_checkpoints_are_read_as_float32(tiny, tmp_path):
  from safetensors.numpy import save_file
  save_file({k: v.astype(np.float16) for k, v in tiny["state_dict"].items()},
            str(tmp_path / "half.safetensors"))
  state_dict = oc_lib.read_state_dict(tmp_path / "half.safetensors")
  key = "visual.proj"
  assert state_dict[key].dtype == np.float32
  np.testing.assert_array_equal(state_dict[key], tiny["state_dict"][key].astype(np.float16))


def test_torch_files_without_torch_fail_clearly(tmp_path, monkeypatch):
  (tmp_path / "model.pt").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)  # as where the 'interop' extra is absent
  with pytest.raises(ImportError, match=r"needs PyTorch, which is not installed; install the "
                     r"'interop' extra .* or convert the file to .safetensors"):
    oc_lib.read_state_dict(tmp_path / "model.pt")


def test_unknown_checkpoint_suffix_fails(tmp_path):
  with pytest.raises(ValueError, match=r"unknown format; allowed suffixes: \('.safetensors'"):
    oc_lib.read_state_dict(tmp_path / "weights.npz")


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-32-quickgelu"])
def test_config_inferred_from_shapes_equals_named_config(name):
  config = oc_lib.model_config_from_name(name)
  shapes = oc_lib.params_to_state_dict(
      jax.tree.map(lambda x: np.broadcast_to(np.float32(0), x.shape),
                   oc_lib.abstract_params(config)))
  inferred = oc_lib.infer_model_config(shapes, quick_gelu=config.quick_gelu)
  assert inferred.to_dict() == config.to_dict()


def test_named_configs_equal_open_clip_builtins(oc):
  from open_clip import model as oc_model
  def normalise(cfg):
    vision = oc_model.CLIPVisionCfg(**cfg["vision_cfg"])
    text = oc_model.CLIPTextCfg(**cfg["text_cfg"])
    size = vision.image_size
    return dict(embed_dim=cfg["embed_dim"], quick_gelu=cfg.get("quick_gelu", False),
                image=(tuple(size) if isinstance(size, list) else (size, size), vision.layers,
                       vision.width, vision.width // vision.head_width,
                       int(vision.width * vision.mlp_ratio), vision.patch_size),
                text=(text.context_length, text.vocab_size, text.width, text.heads, text.layers,
                      int(text.width * text.mlp_ratio)))
  for name in oc_lib.OPEN_CLIP_MODELS:
    ours = oc_lib.open_clip_model_config(oc_lib.model_config_from_name(name))
    assert normalise(ours) == normalise(oc.get_model_config(name)), name
    assert oc_lib.builtin_name(oc_lib.model_config_from_name(name)) == name


def test_config_errors():
  with pytest.raises(ValueError, match=r"open_clip model name='ViT-X'.*allowed: \['ViT-B-16'"):
    oc_lib.model_config_from_name("ViT-X")
  with pytest.raises(ValueError, match=r"checkpoint has no 'visual.conv1.weight'"):
    oc_lib.infer_model_config({"foo": np.zeros(1)})


# ---------------------------------------------------------------------------- validation errors
@pytest.fixture(scope="module")
def own_state_dict():
  config = tiny_config()
  return config, oc_lib.params_to_state_dict(perturbed_params(config, seed=5), config)


def test_missing_and_unexpected_keys_are_listed(own_state_dict):
  config, state_dict = own_state_dict
  broken = dict(state_dict)
  del broken["visual.ln_post.bias"], broken["transformer.resblocks.1.mlp.c_fc.weight"]
  broken["visual.attnpool.weight"] = np.zeros(3, np.float32)
  broken["context_length"] = np.array(77)  # OpenAI's TorchScript scalars are ignored
  with pytest.raises(ValueError) as error:
    oc_lib.state_dict_to_params(broken, config)
  message = str(error.value)
  assert ("missing keys: ['transformer.resblocks.1.mlp.c_fc.weight', 'visual.ln_post.bias']"
          in message)
  assert "unexpected keys: ['visual.attnpool.weight']" in message


def test_shape_mismatch_names_the_parameter_and_both_shapes(own_state_dict):
  config, state_dict = own_state_dict
  broken = dict(state_dict, **{"visual.proj": np.zeros((64, 32), np.float32)})
  with pytest.raises(ValueError, match=re.escape(
      "visual.proj (our image/proj): checkpoint (64, 32), model config expects (64, 64)")):
    oc_lib.state_dict_to_params(broken, config)
  # Without resizing, a different grid is a shape mismatch too.
  with pytest.raises(ValueError, match=r"visual.positional_embedding .*\(17, 64\).*\(37, 64\)"):
    oc_lib.state_dict_to_params(state_dict, tiny_config(48), resize=False)


def test_one_element_logit_scale_is_accepted(own_state_dict):
  config, state_dict = own_state_dict
  params = oc_lib.state_dict_to_params(
      dict(state_dict, logit_scale=state_dict["logit_scale"].reshape(1)), config)
  assert params["logit_scale"].shape == () and params["logit_scale"] == state_dict["logit_scale"]


# ---------------------------------------------------------------------------- resizing
def test_import_resizes_position_embeddings(own_state_dict):
  config, state_dict = own_state_dict
  target = tiny_config(image_size=48, context_length=8)
  params = oc_lib.state_dict_to_params(state_dict, target)
  source = state_dict["visual.positional_embedding"]
  expected = posemb.resize_image_posemb(source, (4, 4), (6, 6))
  np.testing.assert_array_equal(params["image"]["positional_embedding"], expected)
  np.testing.assert_array_equal(params["text"]["positional_embedding"],
                                state_dict["positional_embedding"][:8])
  # Everything else is untouched.
  np.testing.assert_array_equal(params["image"]["proj"], state_dict["visual.proj"])


def test_resize_image_posemb_keeps_cls_and_is_bicubic():
  rng = np.random.default_rng(0)
  table = rng.standard_normal((1 + 4 * 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(posemb.resize_image_posemb(table, (4, 4), (4, 4)), table)
  out = posemb.resize_image_posemb(table, (4, 4), (8, 6))
  assert out.shape == (1 + 8 * 6, 3)
  np.testing.assert_array_equal(out[0], table[0])
  # Independent reference: PIL's bicubic (Keys a=-0.5, half-pixel centres, as jax.image.resize).
  from PIL import Image
  for c in range(3):
    grid = Image.fromarray(table[1:, c].reshape(4, 4), mode="F")
    pil = np.asarray(grid.resize((6, 8), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(out[1:, c].reshape(8, 6), pil, atol=1e-5)
  # Constant grids stay constant (weights sum to one, also antialiased when shrinking).
  constant = np.concatenate([table[:1], np.full((16, 3), 0.25, np.float32)])
  np.testing.assert_allclose(posemb.resize_image_posemb(constant, (4, 4), (2, 3))[1:], 0.25,
                             atol=1e-6)


def test_resize_text_posemb_truncates_or_extends():
  table = np.arange(12, dtype=np.float32).reshape(4, 3)
  np.testing.assert_array_equal(posemb.resize_text_posemb(table, 2), table[:2])
  extended = posemb.resize_text_posemb(table, 6)
  np.testing.assert_array_equal(extended[:4], table)
  np.testing.assert_array_equal(extended[4:], [table[3], table[3]])
  with pytest.raises(ValueError, match="text context length=0"):
    posemb.resize_text_posemb(table, 0)
  with pytest.raises(ValueError, match="do not form a square grid"):
    posemb.square_grid(15)


# ---------------------------------------------------------------------------- Orbax + tools
def test_params_checkpoint_restores_into_the_trainers_state(own_state_dict, tmp_path):
  config, state_dict = own_state_dict
  params = oc_lib.state_dict_to_params(state_dict, config)
  params_checkpoint.save(tmp_path / "imported", params, config, source="test")
  # What the trainer does for init_from.path (optimizer_state=False): restore 'params' onto its.
  # sharded abstract state (built as train_step.create_train_state does, without running init),
  # FSDP-sharded so that placement has shards to get right.
  mesh = sharding_lib.create_mesh({"data": 2, "fsdp": 4})
  model = clip_lib.build_model(config)
  tx, _ = train_step_lib.make_optimizer(common.base_config().optim, 10)

  def init(rng):
    params = model.init(rng, *clip_lib.dummy_inputs(config))["params"]
    return train_step_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                                     opt_state=tx.init(params))
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding_lib.logical_to_shardings(boxed, mesh)
  abstract = checkpointing.abstract_like(nn.unbox(boxed), shardings)
  restored = checkpointing.restore_subtrees(tmp_path / "imported", {"params": abstract.params})
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
               restored["params"], params)
  leaf = restored["params"]["image"]["proj"]
  assert leaf.sharding == shardings.params["image"]["proj"]
  assert checkpointing.load_config(tmp_path / "imported")["model"] == config.to_dict()
  # What init_from.open_clip does instead: host params placed straight into the same layout.
  placed = oc_lib.place_params(params, shardings.params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), placed, params)
  assert placed["image"]["proj"].sharding == shardings.params["image"]["proj"]
  assert not placed["image"]["proj"].sharding.is_fully_replicated


def test_import_and_export_tools_round_trip_files_bit_identically(tiny, tmp_path):
  from safetensors.numpy import load_file, save_file
  source = tmp_path / "source.safetensors"
  save_file(tiny["state_dict"], str(source))
  flags = import_open_clip.main([f"--checkpoint={source}", f"--output={tmp_path / 'ours'}"])
  # mu/8's text tower is the preset's; only the context length differs from model_config('mu/8').
  assert flags == ["--config.model.image.variant=mu/8", "--config.model.image_size=32",
                   "--config.model.text.context_length=12"]
  paths = export_open_clip.main([f"--checkpoint={tmp_path / 'ours'}",
                                 f"--output={tmp_path / 'export'}", "--name=glip-rt"])
  exported = load_file(paths["weights"])
  assert sorted(exported) == sorted(tiny["state_dict"])
  for key, value in tiny["state_dict"].items():
    assert np.array_equal(exported[key], value), key
  with open(paths["config"]) as f:
    assert json.load(f)["model_cfg"] == oc_lib.open_clip_model_config(tiny["config"])


def test_export_tool_refuses_a_sentencepiece_run(tmp_path):
  config = tiny_config()
  params = jax.tree.map(np.zeros_like, perturbed_params(config, 0))
  manager = checkpointing.create_manager(tmp_path / "checkpoints", keep=None)
  checkpointing.save(manager, 7, {"params": params}, None,
                     {"model": config.to_dict(), "tokenizer": {"kind": "sentencepiece"}})
  manager.wait_until_finished()
  manager.close()
  with pytest.raises(SystemExit, match="tokenizer.kind='sentencepiece'"):
    export_open_clip.main([f"--checkpoint={tmp_path}", f"--output={tmp_path / 'x'}"])


# ---------------------------------------------------------------------------- zero-shot, tokenizer
def test_zeroshot_through_our_evaluator_equals_open_clip_classifier(oc, tiny):
  import torch
  config, model = tiny["config"], tiny["model"]
  params = oc_lib.state_dict_to_params(tiny["state_dict"], config)
  scenes = [synthetic.render(i, synthetic.SceneConfig(image_size=32)) for i in range(32)]
  images = np.stack([s["image"] for s in scenes])
  labels = np.array([s["shape"] for s in scenes], np.int32)
  classnames, templates = synthetic.SHAPES, synthetic.ZERO_SHOT_TEMPLATES["shape"]

  def batches():
    for i in range(0, 32, 8):
      yield {"image": images[i:i + 8], "label": labels[i:i + 8], "mask": np.ones(8, bool)}

  encoders = eval_builder.make_encoders(clip_lib.build_model(config),
                                        sharding_lib.create_mesh({"data": -1}))
  evaluator = zeroshot.ZeroShotEvaluator(
      "shape", encoders.encode_image, encoders.encode_text,
      tokenizer_lib.Tokenizer(config.text.context_length), classnames, templates, batches)
  ours_classifier = np.asarray(evaluator.classifier(params))
  emb, _ = zeroshot.base.embed_images(encoders.encode_image, params, batches())
  ours_pred = np.argmax(emb @ ours_classifier, axis=1)

  tokenizer = lambda texts: oc.tokenize(texts, context_length=config.text.context_length)
  with torch.no_grad():
    classifier = oc.build_zero_shot_classifier(model, tokenizer, classnames, templates,
                                               num_classes_per_batch=3)
    features = model.encode_image(torch_reference.normalize_images(images), normalize=True)
    reference_pred = (features @ classifier).argmax(dim=1).numpy()
  assert rel_err(ours_classifier, classifier.numpy()) <= TOL
  np.testing.assert_array_equal(ours_pred, reference_pred)
  assert len(set(reference_pred.tolist())) > 1  # a non-trivial comparison
  results = evaluator.run(params)
  assert results["zeroshot_top1"] == pytest.approx(np.mean(reference_pred == labels))


def _captions(count=400):
  rng = np.random.default_rng(0)
  words = ["a", "photo", "of", "the", "Cat", "DOG", "running", "isn't", "it's", "café", "naïve",
           "Straße", "Ünïcödé", "日本語", "東京タワー", "🐱", "🚀🔥", "über", "façade", "Ελληνικά",
           "русский", "&amp;", "&lt;b&gt;", "&#39;", "&quot;quoted&quot;", "&nbsp;", "&amp;amp;",
           "mojibake: \u00e2\u0080\u0099", "1984", "3.14", "$100", "e-mail", "#hashtag", "@user",
           "http://example.com/a?b=c", "(parens)", "[x]", "well...", "—", "“curly”", "\t", "\n",
           "  ", "COVID-19", "x2", "a/b", "o'clock", "‘single’"]
  captions = []
  for i in range(count):
    length = int(rng.integers(1, 12)) if i % 5 else int(rng.integers(60, 120))  # >77 tokens
    captions.append(" ".join(rng.choice(words, size=length)))
  return captions + ["", " ", "&amp;" * 50, "a" * 300]


def test_tokenizer_equals_open_clip_on_hundreds_of_captions(oc):
  captions = _captions()
  bpe = oc.tokenizer.SimpleTokenizer()
  lengths = [len(bpe.encode(c)) for c in captions]
  assert sum(n > 77 for n in lengths) > 50 and len(captions) >= 400
  for context_length in (77, 16):
    ours = tokenizer_lib.Tokenizer(context_length)(captions)
    reference = oc.tokenize(captions, context_length=context_length).numpy()
    mismatches = [c for c, a, b in zip(captions, ours, reference) if not np.array_equal(a, b)]
    assert not mismatches, mismatches[:3]


# ---------------------------------------------------------------------------- ViT-B/16
@pytest.mark.slow  # ~25 s of CPU time and 3 GB: CI runs it with `-m slow`
def test_b16_import_and_export_equal_open_clip(oc):
  import torch
  model = torch_reference.create(oc, oc.get_model_config("ViT-B-16"), seed=7)
  state_dict = torch_reference.state_dict(model)
  config = oc_lib.model_config_from_name("ViT-B-16")
  images, tokens = inputs(config, 2)
  reference = torch_reference.forward(model, images, tokens)
  params = oc_lib.state_dict_to_params(state_dict, config)
  ours = our_forward(config, params, images, tokens)
  assert_equal_outputs(ours, reference)
  exported = oc_lib.params_to_state_dict(params, config)
  for key, value in state_dict.items():
    assert np.array_equal(exported[key], value), key
  del model, state_dict, params
  fresh = torch_reference.create(oc, oc.get_model_config("ViT-B-16"), seed=8, perturb=False)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  assert_equal_outputs(ours, torch_reference.forward(fresh, images, tokens))


@pytest.mark.slow  # ~20 s on CI's 2 cores: keeps `make test` under 10 minutes
def test_trainer_starts_from_an_open_clip_file(own_state_dict, tmp_path):
  """--config.init_from.open_clip=FILE: step 1 runs at lr 0 (warmup), so the checkpoint after it
  holds exactly the imported parameters — the trainer placed them, not its own initialisation."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from glip_jax import train  # pylint: disable=g-import-not-at-top
  from runs import tiny_config as tiny_run  # pylint: disable=g-import-not-at-top
  model_config, state_dict = own_state_dict
  path = str(tmp_path / "weights.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
  config = tiny_run()
  config.model.update(model_config.to_dict())
  config.init_from.open_clip = path
  config.total_steps = 1
  config.checkpoint_every_steps = 0
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  expected = oc_lib.load_params(path, config.model)
  model = clip_lib.build_model(config.model)
  mesh = sharding_lib.create_mesh({"data": 1}, devices=jax.devices()[:1])
  got = checkpointing.restore_params_from(
      workdir, sharding_lib.abstract_params(model, config.model, mesh))
  for (path_a, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=str(path_a))
  config.init_from.path = workdir
  with pytest.raises(ValueError, match="give at most one"):
    train.train_and_evaluate(config, str(tmp_path / "both"))
