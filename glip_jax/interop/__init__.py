"""Weights in and out: open_clip / OpenAI CLIP checkpoints ↔ our parameters (docs/interop.md)."""
