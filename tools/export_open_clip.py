"""Exports one of our checkpoints (its parameters) as an open_clip model (docs/interop.md).

--checkpoint is a workdir, its checkpoints/ directory or one step directory (newest step unless
--step). Writes OUTPUT/open_clip_model.safetensors, OUTPUT/open_clip_config.json and
OUTPUT/NAME.json, then any of these loads it:

  open_clip.create_model_and_transforms('local-dir:OUTPUT')
  open_clip.add_model_config('OUTPUT/NAME.json')
  open_clip.create_model_and_transforms('NAME', pretrained='OUTPUT/open_clip_model.safetensors')
  clip_benchmark eval --model=local-dir:OUTPUT --pretrained=OUTPUT/open_clip_model.safetensors ...

  python tools/export_open_clip.py --checkpoint=/ckpt/glip_b16_r50_tuned --output=/export/glip_b16
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glip_jax import checkpointing  # noqa: E402
from glip_jax.interop import open_clip as open_clip_lib  # noqa: E402
from glip_jax.interop import params_checkpoint  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True,
                      help="a workdir, its checkpoints/ directory or one step directory")
  parser.add_argument("--step", type=int, default=None, help="step to export (default: newest)")
  parser.add_argument("--output", required=True, help="directory to write the export into")
  parser.add_argument("--name", default="glip-export",
                      help="model name for open_clip.add_model_config (the NAME.json file)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, str]:
  """Runs the export; returns the paths written."""
  args = parse_args(argv)
  saved = checkpointing.load_config(args.checkpoint, args.step)
  tokenizer = saved.get("tokenizer", {}).get("kind", "clip")
  if tokenizer != "clip":
    raise SystemExit(f"{args.checkpoint}: tokenizer.kind={tokenizer!r}; open_clip's models "
                     "tokenise with the CLIP BPE, so only tokenizer.kind='clip' exports.")
  params, model_config = params_checkpoint.load(args.checkpoint, args.step)
  paths = open_clip_lib.write_open_clip_dir(args.output, params, model_config, args.name)
  builtin = open_clip_lib.builtin_name(model_config)
  print(f"Wrote {paths['weights']}, {paths['config']} and {paths['model_config']}.")
  print(f"  open_clip.create_model_and_transforms('local-dir:{args.output}')")
  if builtin:
    print(f"  open_clip.create_model_and_transforms('{builtin}', pretrained='{paths['weights']}')")
  return paths


if __name__ == "__main__":
  main()
