"""open_clip / OpenAI CLIP state dicts ↔ glip_jax CLIP parameters.

Our towers follow open_clip's layout, parameter names and counts, so a conversion is a key mapping
plus transposes and reshapes, one `LeafRule` per kind of leaf:

  Linear weight [out, in]            ↔ Dense kernel [in, out] (transposed)
  attn.in_proj_weight [3W, W]        ↔ in_proj kernel [W, 3, heads, head_dim]
  attn.out_proj.weight [W, W]        ↔ out_proj kernel [heads, head_dim, W]
  conv1.weight OIHW                  ↔ conv1 kernel HWIO
  LayerNorm weight / bias            ↔ norm scale / bias
  visual.transformer.resblocks.3.…   ↔ image/transformer/resblocks_3/…  (text: no 'visual.')

Conversions are exact (no arithmetic), so import → export reproduces a state dict bit for bit.
Checkpoints are read with numpy from safetensors (open_clip's hub format; no torch needed) or,
when torch is installed, from torch `.pt`/`.pth`/`.bin` files (plain or TorchScript, such as
OpenAI's originals). See docs/interop.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from glip_jax.models import clip as clip_lib
from glip_jax.models import posemb
from glip_jax.models import vit

StateDict = dict[str, np.ndarray]
Params = dict[str, Any]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Non-parameter entries of OpenAI's TorchScript checkpoints and older open_clip state dicts: the
# model config carries what they say, and attn_mask is a derived buffer.
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

# open_clip model name → (our image variant, image size, QuickGELU). Both towers' sizes follow from
# the variant through clip_lib.CLIP_PRESETS, which mirrors open_clip's model configs.
OPEN_CLIP_MODELS: dict[str, tuple[str, int, bool]] = {
    "ViT-B-32": ("B/32", 224, False),
    "ViT-B-32-quickgelu": ("B/32", 224, True),
    "ViT-B-16": ("B/16", 224, False),
    "ViT-B-16-quickgelu": ("B/16", 224, True),
    "ViT-L-14": ("L/14", 224, False),
    "ViT-L-14-quickgelu": ("L/14", 224, True),
    "ViT-L-14-336": ("L/14", 336, False),
    "ViT-L-14-336-quickgelu": ("L/14", 336, True),
    "ViT-H-14": ("H/14", 224, False),
    "ViT-H-14-quickgelu": ("H/14", 224, True),
    "ViT-g-14": ("g/14", 224, False),
}


# ------------------------------------------------------------------------------- leaf mapping
@dataclasses.dataclass(frozen=True)
class LeafRule:
  """How one kind of parameter leaf maps: our path suffix ↔ open_clip key suffix + transforms."""

  suffix: tuple[str, ...]  # the last entries of our parameter path, e.g. ('in_proj', 'kernel')
  torch_suffix: str  # what replaces them in the open_clip key, e.g. 'in_proj_weight'
  to_torch: Callable[[Any], Any]  # our array → open_clip's (also traced for shapes)
  to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # open_clip array, our shape → ours


def _identity(x):
  return x


def _reshape(t, shape):
  return t.reshape(shape)


# Longest suffixes first: the first rule whose suffix ends our path wins.
RULES: tuple[LeafRule, ...] = (
    LeafRule(("norm", "scale"), "weight", _identity, _reshape),
    LeafRule(("norm", "bias"), "bias", _identity, _reshape),
    # [W, 3, H, Dh] ↔ [3W, W]: rows of in_proj_weight are q, k, v, each head-major.
    LeafRule(("in_proj", "kernel"), "in_proj_weight", lambda x: x.reshape(x.shape[0], -1).T,
             lambda t, shape: t.T.reshape(shape)),
    LeafRule(("in_proj", "bias"), "in_proj_bias", lambda x: x.reshape(-1), _reshape),
    # [H, Dh, W] ↔ [W, H*Dh]
    LeafRule(("out_proj", "kernel"), "out_proj.weight", lambda x: x.reshape(-1, x.shape[-1]).T,
             lambda t, shape: t.T.reshape(shape)),
    LeafRule(("out_proj", "bias"), "out_proj.bias", _identity, _reshape),
    LeafRule(("conv1", "kernel"), "conv1.weight", lambda x: x.transpose(3, 2, 0, 1),
             lambda t, shape: t.transpose(2, 3, 1, 0)),
    LeafRule(("token_embedding", "embedding"), "token_embedding.weight", _identity, _reshape),
    LeafRule(("kernel",), "weight", lambda x: x.T, lambda t, shape: t.T),  # c_fc, c_proj
    LeafRule(("bias",), "bias", _identity, _reshape),
)
_TOWER_PREFIX = {"image": "visual.", "text": ""}
# Leaves whose name and layout are the same on both sides (embeddings, projections, temperature).
_PLAIN_LEAVES = ("positional_embedding", "class_embedding", "proj", "text_projection",
                 "logit_scale", "logit_bias")


def _rule_for(path: tuple[str, ...], rules: tuple[LeafRule, ...]) -> tuple[str, LeafRule]:
  """The open_clip key of our parameter `path` and the rule converting it."""
  for rule in rules:
    n = len(rule.suffix)
    if path[-n:] == rule.suffix:
      head, tail = path[:-n], rule.torch_suffix
      break
  else:
    if path[-1] not in _PLAIN_LEAVES:
      raise ValueError(f"no open_clip mapping for parameter {'/'.join(path)}.")
    head, tail = path[:-1], path[-1]
    rule = LeafRule((path[-1],), path[-1], _identity, _reshape)
  prefix = ""
  if head and head[0] in _TOWER_PREFIX:
    prefix, head = _TOWER_PREFIX[head[0]], head[1:]
  parts = [re.sub(r"^resblocks_(\d+)$", r"resblocks.\1", name) for name in head]
  return prefix + ".".join([*parts, tail]), rule


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, (*prefix, key)))
    else:
      flat[(*prefix, key)] = value
  return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
  tree: Params = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


# ------------------------------------------------------------------------------- configs
def abstract_params(model_config: ml_collections.ConfigDict) -> Params:
  """ShapeDtypeStructs of `model.init(...)['params']` (unboxed) for a model config; no compute."""
  model = clip_lib.build_model(model_config)
  return jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), *clip_lib.dummy_inputs(model_config)))["params"])


def model_config_from_name(name: str) -> ml_collections.ConfigDict:
  """Our model config for an open_clip model name such as 'ViT-B-16' or 'ViT-L-14-quickgelu'."""
  if name not in OPEN_CLIP_MODELS:
    raise ValueError(f"open_clip model name={name!r} is not supported; allowed: "
                     f"{sorted(OPEN_CLIP_MODELS)}.")
  variant, image_size, quick_gelu = OPEN_CLIP_MODELS[name]
  config = clip_lib.model_config(variant, image_size)
  config.quick_gelu = quick_gelu
  return config


def _require(state_dict: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in state_dict:
    raise ValueError(f"checkpoint has no {key!r}: not an open_clip/OpenAI ViT CLIP state dict "
                     f"(first keys: {sorted(state_dict)[:8]}).")
  return state_dict[key]


def _count_blocks(state_dict: Mapping[str, np.ndarray], prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
  return max(found) + 1 if found else 0


def infer_model_config(state_dict: Mapping[str, np.ndarray], *, quick_gelu: bool = False,
                       image_size: int | tuple[int, int] | None = None,
                       text_heads: int | None = None) -> ml_collections.ConfigDict:
  """Our model config from a state dict's shapes; QuickGELU cannot show in shapes, so it is a flag.

  The image tower's (width, depth, mlp) must be one of glip_jax.models.vit.VIT_SIZES (its heads come
  from there); the image size is the square grid times the patch size unless given; text heads come
  from the CLIP preset of that text width and depth, else width // 64 (open_clip's head width).
  """
  conv = _require(state_dict, "visual.conv1.weight")
  width, _, patch, _ = conv.shape
  depth = _count_blocks(state_dict, "visual.transformer.resblocks.")
  mlp = _require(state_dict, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
  sizes = [name for name, (w, d, m, _) in vit.VIT_SIZES.items() if (w, d, m) == (width, depth, mlp)]
  if not sizes:
    allowed = {name: spec[:3] for name, spec in vit.VIT_SIZES.items()}
    raise ValueError(f"image tower width={width}, depth={depth}, mlp_dim={mlp} matches no ViT "
                     f"size; allowed (width, depth, mlp_dim): {allowed}.")
  if image_size is None:
    num_patches = _require(state_dict, "visual.positional_embedding").shape[0] - 1
    image_size = posemb.square_grid(num_patches)[0] * patch
  embed_dim = _require(state_dict, "visual.proj").shape[1]
  vocab_size, text_width = _require(state_dict, "token_embedding.weight").shape
  text_depth = _count_blocks(state_dict, "transformer.resblocks.")
  if text_heads is None:
    presets = [h for _, w, h, d in clip_lib.CLIP_PRESETS.values()
               if (w, d) == (text_width, text_depth)]
    text_heads = presets[0] if presets else max(text_width // 64, 1)
  config = clip_lib.model_config(f"{sizes[0]}/{patch}", image_size)
  config.embed_dim = int(embed_dim)
  config.text.update(width=int(text_width), depth=text_depth, heads=int(text_heads),
                     vocab_size=int(vocab_size),
                     context_length=int(_require(state_dict, "positional_embedding").shape[0]))
  config.quick_gelu = quick_gelu
  if "logit_bias" in state_dict:  # SigLIP-style models; the value itself is overwritten on load
    config.logit_bias_init = float(np.asarray(state_dict["logit_bias"]).reshape(()))
  return config


def _mlp_ratio(width: int, mlp_dim: int) -> float:
  """A ratio open_clip turns back into exactly `mlp_dim` (it computes int(width * ratio))."""
  ratio = round(mlp_dim / width, 4)
  return ratio if int(width * ratio) == mlp_dim else (mlp_dim + 0.5) / width


def open_clip_model_config(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The open_clip model config (the JSON of open_clip/model_configs/*.json) of our model config."""
  spec = vit.parse_variant(model_config.image.variant)
  height, width = clip_lib.image_size_hw(model_config.image_size)
  vision: dict[str, Any] = dict(
      image_size=height if height == width else [height, width], layers=spec.depth,
      width=spec.width, head_width=spec.width // spec.num_heads, patch_size=spec.patch_size)
  if spec.mlp_dim != 4 * spec.width:
    vision["mlp_ratio"] = _mlp_ratio(spec.width, spec.mlp_dim)
  if model_config.image.pool == "avg":
    # We pool, then normalise; open_clip's default normalises every token, then pools.
    vision.update(pool_type="avg", final_ln_after_pool=True)
  text_config = model_config.text
  text: dict[str, Any] = dict(context_length=text_config.context_length,
                              vocab_size=text_config.vocab_size, width=text_config.width,
                              heads=text_config.heads, layers=text_config.depth)
  if not text_config.causal:
    text["no_causal_mask"] = True
  if text_config.eot_token_id is not None:
    text.update(pool_type="eos", eos_id=text_config.eot_token_id)
  config: dict[str, Any] = dict(embed_dim=model_config.embed_dim, vision_cfg=vision, text_cfg=text)
  if model_config.quick_gelu:
    config["quick_gelu"] = True
  if model_config.logit_bias_init is not None:
    config["init_logit_bias"] = model_config.logit_bias_init
  return config


def builtin_name(model_config: ml_collections.ConfigDict) -> str | None:
  """The open_clip built-in model name with exactly this architecture, if there is one."""
  ours = open_clip_model_config(model_config)
  for name in OPEN_CLIP_MODELS:
    if open_clip_model_config(model_config_from_name(name)) == ours:
      return name
  return None


# ------------------------------------------------------------------------------- reading files
def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
  """An open_clip/OpenAI state dict as numpy (floats as float32) from safetensors or torch files."""
  path = os.fspath(path)
  if path.endswith(SAFETENSORS_SUFFIXES):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    tensors = dict(load_file(path))
  elif path.endswith(TORCH_SUFFIXES):
    tensors = _read_torch(path)
  else:
    raise ValueError(f"checkpoint {path!r}: unknown format; allowed suffixes: "
                     f"{SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}.")
  if tensors and all(key.startswith("module.") for key in tensors):  # saved from DDP
    tensors = {key[len("module."):]: value for key, value in tensors.items()}
  return {key: (value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value)
          for key, value in tensors.items()}


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading {path!r} needs PyTorch, which is not installed; install the 'interop' extra "
        "(pip install -e '.[interop]') or convert the file to .safetensors.") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except RuntimeError as e:
    if "TorchScript" not in str(e):
      raise
    obj = torch.jit.load(path, map_location="cpu")  # OpenAI's original checkpoints
  if isinstance(obj, torch.nn.Module):
    obj = obj.state_dict()
  if isinstance(obj, Mapping) and "state_dict" in obj:  # open_clip training checkpoints
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict.")
  # float() first: numpy has no bfloat16.
  return {key: (value.detach().float() if value.is_floating_point() else value.detach()).numpy()
          for key, value in obj.items() if isinstance(value, torch.Tensor)}


# ------------------------------------------------------------------------------- conversion
def resize_position_embeddings(state_dict: Mapping[str, np.ndarray],
                               model_config: ml_collections.ConfigDict) -> StateDict:
  """A copy of `state_dict` with image and text position embeddings resized to `model_config`."""
  out = dict(state_dict)
  key = "visual.positional_embedding"
  grid = clip_lib.grid(model_config)
  if (model_config.image.pos_embedding == "learned" and key in out
      and out[key].shape[0] != 1 + math.prod(grid)):
    old_grid = posemb.square_grid(out[key].shape[0] - 1)
    logging.info("Resizing the image position embeddings from a %s grid to %s.", old_grid, grid)
    out[key] = posemb.resize_image_posemb(out[key], old_grid, grid)
  length = model_config.text.context_length
  if "positional_embedding" in out and out["positional_embedding"].shape[0] != length:
    logging.info("Resizing the text position embeddings from %d to %d positions.",
                 out["positional_embedding"].shape[0], length)
    out["positional_embedding"] = posemb.resize_text_posemb(out["positional_embedding"], length)
  return out


def state_dict_to_params(state_dict: Mapping[str, np.ndarray],
                         model_config: ml_collections.ConfigDict, *, resize: bool = True,
                         rules: tuple[LeafRule, ...] = RULES) -> Params:
  """Our parameter pytree (numpy) for `model_config` from an open_clip state dict.

  Fails listing every missing and unexpected key and every shape mismatch (open_clip key, our
  parameter, both shapes). With `resize`, position embeddings are first resized to the config.
  """
  if resize:
    state_dict = resize_position_embeddings(state_dict, model_config)
  targets = _flatten(abstract_params(model_config))
  used, missing, mismatched, flat = set(), [], [], {}
  for path, target in targets.items():
    key, rule = _rule_for(path, rules)
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    value = np.asarray(state_dict[key])
    if target.shape == () and value.shape == (1,):  # older open_clip saved logit_scale as [1]
      value = value.reshape(())
    expected = jax.eval_shape(rule.to_torch, jax.ShapeDtypeStruct(target.shape, target.dtype)).shape
    if value.shape != tuple(expected):
      mismatched.append(f"{key} (our {'/'.join(path)}): checkpoint {value.shape}, model config "
                        f"expects {tuple(expected)}")
      continue
    flat[path] = np.asarray(rule.to_ours(value, target.shape), target.dtype, order="C")
  unexpected = sorted(set(state_dict) - used - set(IGNORED_KEYS))
  problems = []
  if missing:
    problems.append(f"missing keys: {sorted(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {unexpected}")
  if mismatched:
    problems.append("shape mismatches: " + "; ".join(mismatched))
  if problems:
    raise ValueError("open_clip checkpoint does not fit the model config:\n  " +
                     "\n  ".join(problems))
  return _unflatten(flat)


def params_to_state_dict(params: Params, model_config: ml_collections.ConfigDict | None = None, *,
                         rules: tuple[LeafRule, ...] = RULES) -> StateDict:
  """The open_clip state dict (numpy, contiguous) of our parameters.

  With `model_config`, fixed sin-cos image position embeddings (not parameters here) are written
  as open_clip's learned `visual.positional_embedding`, so the exported model computes the same.
  """
  out = {}
  for path, value in _flatten(params).items():
    key, rule = _rule_for(path, rules)
    out[key] = np.asarray(rule.to_torch(np.asarray(value)), order="C")
  if model_config is not None and model_config.image.pos_embedding == "sincos":
    spec = vit.parse_variant(model_config.image.variant)
    table = vit.sincos_2d(clip_lib.grid(model_config), spec.width)
    out["visual.positional_embedding"] = np.concatenate([np.zeros((1, spec.width), np.float32),
                                                         table])
  return out


def load_params(path: str | os.PathLike[str], model_config: ml_collections.ConfigDict, *,
                resize: bool = True) -> Params:
  """Reads an open_clip/OpenAI checkpoint file into our parameters (numpy), validated against
  `model_config` (e.g. for `--config.init_from.open_clip=PATH`)."""
  return state_dict_to_params(read_state_dict(path), model_config, resize=resize)


def place_params(params: Params, shardings: Any) -> Params:
  """Host (numpy) params → global jax arrays laid out as `shardings` (a matching pytree of
  Shardings); every process holds the full values, as after `load_params`, and keeps its shards."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      params, shardings)


# ------------------------------------------------------------------------------- export
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"  # what open_clip's 'local-dir:' and 'hf-hub:' schemas read


def write_open_clip_dir(directory: str | os.PathLike[str], params: Params,
                        model_config: ml_collections.ConfigDict, name: str) -> dict[str, str]:
  """Writes an open_clip-loadable export of our parameters; returns the paths written.

  DIRECTORY/open_clip_model.safetensors  the state dict (float32)
  DIRECTORY/open_clip_config.json        {'model_cfg', 'preprocess_cfg'}: `local-dir:DIRECTORY`
  DIRECTORY/NAME.json                    the bare model config, for `open_clip.add_model_config`
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  model_cfg = open_clip_model_config(model_config)
  height, width = clip_lib.image_size_hw(model_config.image_size)
  preprocess_cfg = dict(size=[height, width], mode="RGB", mean=list(vit.CLIP_MEAN),
                        std=list(vit.CLIP_STD), interpolation="bicubic", resize_mode="shortest")
  paths = {"weights": os.path.join(directory, WEIGHTS_FILE),
           "config": os.path.join(directory, CONFIG_FILE),
           "model_config": os.path.join(directory, f"{name}.json")}
  save_file(params_to_state_dict(params, model_config), paths["weights"],
            metadata={"format": "pt"})  # the Hugging Face convention for torch state dicts
  with open(paths["config"], "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
  with open(paths["model_config"], "w") as f:
    json.dump(model_cfg, f, indent=2)
  return paths


def config_overrides(model_config: ml_collections.ConfigDict) -> list[str]:
  """Command-line flags that turn a recipe's model config into `model_config`."""
  flat = _flatten(model_config.to_dict())
  defaults = _flatten(clip_lib.model_config(model_config.image.variant,
                                            model_config.image_size).to_dict())
  flags = [f"--config.model.image.variant={model_config.image.variant}",
           f"--config.model.image_size={_flag_value(model_config.image_size)}"]
  for path, value in flat.items():
    if path not in (("image", "variant"), ("image_size",)) and defaults.get(path) != value:
      flags.append(f"--config.model.{'.'.join(path)}={_flag_value(value)}")
  return flags


def _flag_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return f"'({','.join(str(v) for v in value)})'"
  return str(value)
