"""Text tokenisation: the CLIP BPE (default) or a SentencePiece model, with open_clip's cleaning.

Output is int32 [n, context_length]: start token, ids, end token, zeros after. Over-long texts are
truncated so that the end token is always the last token (open_clip's behaviour), because the text
tower pools at the end-token position.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import ftfy
import numpy as np

CLIP_SOT = 49406
CLIP_EOT = 49407
CLIP_VOCAB_SIZE = 49408
KINDS = ("clip", "sentencepiece")


def clean_text(text: str) -> str:
  """open_clip's default cleaning: ftfy, html-unescape twice, collapse whitespace, lowercase."""
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text))
  return " ".join(text.split()).lower()


class Tokenizer:
  """Callable list[str] → int32 [n, context_length]; picklable (backends load lazily)."""

  def __init__(self, context_length: int = 77, kind: str = "clip", model_path: str | None = None):
    if kind not in KINDS:
      raise ValueError(f"tokenizer kind={kind!r}; allowed: {KINDS}")
    if kind == "sentencepiece" and not model_path:
      raise ValueError("tokenizer kind='sentencepiece' needs model_path (a .model file)")
    if context_length < 2:
      raise ValueError(f"tokenizer context_length={context_length}; must be >= 2")
    self.context_length = context_length
    self.kind = kind
    self.model_path = model_path
    self._backend = None
    self._load()

  def _load(self) -> None:
    if self.kind == "clip":
      import instant_clip_tokenizer

      self._backend = instant_clip_tokenizer.Tokenizer()
      self.sot, self.eot, self.vocab_size = CLIP_SOT, CLIP_EOT, CLIP_VOCAB_SIZE
    else:
      import sentencepiece

      self._backend = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
      # SentencePiece models define their own specials; -1 means "not defined" → not added.
      self.sot, self.eot = self._backend.bos_id(), self._backend.eos_id()
      self.vocab_size = self._backend.get_piece_size()

  # The Rust / C++ backends do not pickle; Grain workers rebuild them from the settings.
  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k != "_backend"}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._load()

  def encode(self, text: str) -> list[int]:
    """Ids of the cleaned text, without start/end tokens."""
    return list(self._backend.encode(clean_text(text)))

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """Tokenises, adds start/end tokens, truncates (end token kept last) and zero-pads."""
    if isinstance(texts, str):
      raise TypeError("Tokenizer expects a list of strings, got a single str")
    out = np.zeros((len(texts), self.context_length), np.int32)
    prefix = [self.sot] if self.sot >= 0 else []
    suffix = [self.eot] if self.eot >= 0 else []
    room = self.context_length - len(prefix) - len(suffix)
    for row, text in enumerate(texts):
      ids = prefix + self.encode(text)[:room] + suffix
      out[row, : len(ids)] = ids
    return out

  def __repr__(self) -> str:
    return f"Tokenizer(context_length={self.context_length}, kind={self.kind!r})"
