"""Weights in and out: open_clip / OpenAI CLIP checkpoints ↔ glip_jax parameters (docs/interop.md)."""
