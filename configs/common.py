"""Shared defaults for every recipe: one place that documents each top-level field.

Recipes (`configs/*.py`) start from `base_config()` and change what their paper changes. Every field
here can be overridden on the command line, e.g. `--config.masking.ratio=0.75`.
"""

from typing import Any

import ml_collections

from glip_jax.data import config as data_config_lib
from glip_jax.models import clip as clip_lib


def base_config(variant: str = "B/16", image_size: int = 224) -> ml_collections.ConfigDict:
  """All fields with their defaults; recipes override what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # root of all randomness: init, masking, augmentation, data order
  c.batch_size = 1024  # global batch, split over mesh data×fsdp and over processes
  # The training method (glip_jax/methods): 'clip' (CLIP/FLIP/GLIP: config.masking picks the
  # strategy) or 'aclip' (EMA teacher, extra views, SSL losses; needs the config.aclip section).
  c.method = "clip"

  # Duration: give exactly one of total_steps / total_epochs / total_examples (converted once).
  c.total_steps = 10_000
  c.total_epochs = ml_collections.FieldReference(None, field_type=float)
  c.total_examples = ml_collections.FieldReference(None, field_type=int)

  c.model = clip_lib.model_config(variant, image_size)
  # What each transformer block keeps for the backward pass (glip_jax/models/layers.py
  # REMAT_POLICIES): 'none' | 'full' | 'dots_no_batch'. docs/pod_scale.md measures them.
  c.model.remat_policy = "none"

  # Token selection (SPEC §1–3): kind none | random | gaussian | attentive; ratio = dropped share.
  c.masking = ml_collections.ConfigDict(dict(
      kind="none", ratio=0.0, sigma=0.2, sigma_is_variance=True, strength=1.0, gumbel=False))

  c.loss = ml_collections.ConfigDict(dict(kind="softmax"))  # softmax (CLIP) | sigmoid (SigLIP)
  c.loss.impl = "dense"  # dense | ring (shard_map ring: O(B_local²) logits memory, same values)

  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-4,  # peak learning rate (absolute, for the global batch above)
      end_lr=0.0,  # value the cosine decays to at total_steps
      warmup_steps=1000,
      b1=0.9, b2=0.98, eps=1e-6,
      weight_decay=0.2,  # not applied to biases, norms, position embeddings, cls, temperature
      grad_clip_norm=1.0,  # global-norm clipping; 0 disables
  ))
  c.optim.accum_steps = 1  # micro-batches per step; >1 caches features so the loss sees all B

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: remaining devices

  # Training data (glip_jax/data/config.py documents every field); synthetic scenes by default.
  c.data = data_config_lib.default_data_config()
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="clip",  # 'clip' (BPE, 49408 tokens) | 'sentencepiece'
      model_path="",  # the .model file for 'sentencepiece'
  ))

  # In-loop evaluation: {name: evaluator config}; see docs/evaluation.md. Empty: none.
  c.evals = ml_collections.ConfigDict()

  c.log_every_steps = 50  # metrics.jsonl / TensorBoard interval (values of that step, not means)
  c.checkpoint_every_steps = 1000  # 0: only at the end (and on SIGTERM)
  c.keep_checkpoints = 3  # newest checkpoints kept; 0 keeps all
  c.keep_checkpoints_every_steps = 0  # additionally keep every multiple of this step; 0: none

  # Start from another run's parameters (unmasked tuning, fine-tuning); ignored when resuming.
  c.init_from = ml_collections.ConfigDict(dict(
      path="",  # a workdir, its checkpoints/ directory, or one step directory
      optimizer_state=False,  # also take the optimizer state
      open_clip="",  # or an open_clip/OpenAI checkpoint file (.safetensors/.pt); docs/interop.md
  ))
  return c


def parse_arg(arg: str, **defaults: str) -> dict[str, str]:
  """'data=/x,epochs=30' → {'data': '/x', 'epochs': '30', ...} over `defaults` (as big_vision)."""
  values = dict(defaults)
  for item in filter(None, arg.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r}: expected key=value with key in "
                       f"{sorted(defaults)}.")
    values[key] = value
  return values


# `:arg` keys every ViT-B/16 recipe accepts besides its own (see apply_recipe_args).
RECIPE_ARGS = dict(runlocal="", imagenet="", coco="", flickr="")


def imagenet_eval(data_dir: str, batch_size: int = 1024, masking: Any = "none") -> dict:
  """Zero-shot ImageNet-1k (validation, CLIP's 80 templates) from a TFDS data_dir (array_record)."""
  return dict(kind="zeroshot", classnames="imagenet", templates="clip_imagenet_80",
              batch_size=batch_size, masking=masking, dataset=dict(source="tfds", tfds=dict(
                  name="imagenet2012", split="validation", data_dir=data_dir, image_key="image",
                  label_key="label")))


def karpathy_eval(json_path: str, image_dir: str, batch_size: int = 1024) -> dict:
  """Image-text retrieval on a Karpathy test split (COCO 5k, Flickr30k 1k), recall@1/5/10."""
  return dict(kind="retrieval", batch_size=batch_size, dataset=dict(
      source="karpathy", karpathy=dict(json_path=json_path, image_dir=image_dir, split="test")))


def apply_recipe_args(c: ml_collections.ConfigDict,
                      args: dict[str, str]) -> ml_collections.ConfigDict:
  """The shared recipe arguments: standard evaluations, and `runlocal` for a one-minute smoke run.

  imagenet=DIR  zero-shot ImageNet from the TFDS data_dir DIR (imagenet2012 built with
                --file_format=array_record); masked recipes also get `imagenet_masked`, the papers'
                masked-inference column.
  coco=DIR      COCO 5k retrieval: DIR/dataset_coco.json, images under DIR (DIR/val2014/...).
  flickr=DIR    Flickr30k 1k retrieval: DIR/dataset_flickr30k.json, images in DIR/flickr30k-images.
  runlocal=1    shrinks the recipe to check a data pipeline in a minute on a laptop CPU: a tiny
                model at 64 px in float32, batch 16, 20 steps, warmup 5, no worker processes.
                (The recipe's own defaults assume an accelerator: bfloat16, worker_count=8,
                warmup_steps=10000 and a batch of thousands.)
  """
  runlocal = args.get("runlocal", "") not in ("", "0", "false", "False")
  eval_batch = 64 if runlocal else 1024
  if args.get("imagenet"):
    c.evals.imagenet = imagenet_eval(args["imagenet"], eval_batch)
    if c.masking.kind not in ("none", "attentive") and c.masking.ratio > 0:
      c.evals.imagenet_masked = imagenet_eval(args["imagenet"], eval_batch, masking="train")
  if args.get("coco"):
    root = args["coco"].rstrip("/")
    c.evals.coco = karpathy_eval(f"{root}/dataset_coco.json", root, eval_batch)
  if args.get("flickr"):
    root = args["flickr"].rstrip("/")
    c.evals.flickr = karpathy_eval(f"{root}/dataset_flickr30k.json", f"{root}/flickr30k-images",
                                   eval_batch)
  if runlocal:
    c.model.update(clip_lib.model_config("mu/16", 64).to_dict())
    c.model.text.update(width=64, heads=2, depth=2, context_length=32)
    c.model.embed_dim = 64
    c.model.dtype = "float32"
    c.batch_size = 16
    c.total_steps = 20
    c.total_epochs = None
    c.total_examples = None
    c.optim.warmup_steps = 5
    c.data.update(worker_count=0, read_threads=2, prefetch_batches=2)
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
    c.keep_checkpoints_every_steps = 0
  return c
