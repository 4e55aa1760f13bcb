"""Imports an open_clip / OpenAI CLIP checkpoint as a glip_jax params checkpoint (docs/interop.md).

The architecture comes from --model (an open_clip model name) or is inferred from the checkpoint's
shapes (--quick_gelu says what shapes cannot: OpenAI's original weights and the '-quickgelu'
open_clip models use QuickGELU). --image_size / --context_length resize the position embeddings
(bicubic on the patch grid, [CLS] kept; text truncated or extended). The output directory is a
checkpoints directory for `--config.init_from.path=OUTPUT`; the flags printed at the end make a
recipe's model config match the imported one.

  python tools/import_open_clip.py --checkpoint=open_clip_model.safetensors --model=ViT-B-16 \\
      --output=/ckpt/vit_b16_laion
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glip_jax.interop import open_clip as open_clip_lib  # noqa: E402
from glip_jax.interop import params_checkpoint  # noqa: E402


def _image_size(text: str) -> int | tuple[int, int]:
  parts = [int(p) for p in text.split(",")]
  return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True,
                      help="open_clip/OpenAI state dict: .safetensors, or .pt/.pth/.bin with torch")
  parser.add_argument("--output", required=True, help="directory for the Orbax checkpoint")
  parser.add_argument("--model", default="",
                      help=f"open_clip model name; one of {sorted(open_clip_lib.OPEN_CLIP_MODELS)}"
                      " (default: infer from the checkpoint's shapes)")
  parser.add_argument("--quick_gelu", action="store_true",
                      help="the checkpoint was trained with QuickGELU (when inferring)")
  parser.add_argument("--text_heads", type=int, default=None,
                      help="text tower heads when inferring (default: CLIP preset, or width/64)")
  parser.add_argument("--image_size", type=_image_size, default=None,
                      help="target image size N or H,W (default: the checkpoint's)")
  parser.add_argument("--context_length", type=int, default=None,
                      help="target text context length (default: the checkpoint's)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
  """Runs the import; returns the config flags to train from it."""
  args = parse_args(argv)
  state_dict = open_clip_lib.read_state_dict(args.checkpoint)
  if args.model:
    model_config = open_clip_lib.model_config_from_name(args.model)
  else:
    model_config = open_clip_lib.infer_model_config(state_dict, quick_gelu=args.quick_gelu,
                                                    text_heads=args.text_heads)
  if args.image_size is not None:
    model_config.image_size = args.image_size
  if args.context_length is not None:
    model_config.text.context_length = args.context_length
  params = open_clip_lib.state_dict_to_params(state_dict, model_config)
  params_checkpoint.save(args.output, params, model_config,
                         source=os.path.abspath(args.checkpoint), open_clip_model=args.model)
  flags = open_clip_lib.config_overrides(model_config)
  print(f"Wrote {args.output}. Train from it with:\n  --config.init_from.path={args.output} "
        + " ".join(flags))
  return flags


if __name__ == "__main__":
  main()
