"""The console during training: one readable progress line per log interval, a live bar on a TTY.

Metrics go in full to metrics.jsonl and TensorBoard; the console shows what a person watches a run
for — step/total, examples/s, loss, ETA — in a fixed order, so consecutive lines line up.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import tqdm

# The order metrics appear in on the console (the rest follow alphabetically at --verbosity=1).
CONSOLE_METRICS = ("loss", "i2t_accuracy", "t2i_accuracy", "logit_scale", "lr", "grad_norm",
                   "kept_tokens")


def format_eta(seconds: float) -> str:
  """'1h 02m', '3m 05s' or '12s'."""
  seconds = max(0, int(round(seconds)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  if h:
    return f"{h}h {m:02d}m"
  return f"{m}m {s:02d}s" if m else f"{s}s"


def format_line(step: int, total: int, scalars: dict[str, Any], eta_seconds: float | None) -> str:
  """'step 200/800 (25%) | 512 ex/s | loss 2.3456 | i2t_accuracy 0.12 ... | ETA 1m 10s'."""
  parts = [f"step {step}/{total} ({100 * step // max(total, 1)}%)"]
  if "examples_per_s" in scalars:
    parts.append(f"{scalars['examples_per_s']:,.0f} ex/s")
  for key in CONSOLE_METRICS:
    if key in scalars:
      value = float(scalars[key])
      parts.append(f"{key} {value:.4g}" if key in ("lr", "kept_tokens") else f"{key} {value:.4f}")
  if eta_seconds is not None:
    parts.append(f"ETA {format_eta(eta_seconds)}")
  return " | ".join(parts)


class Progress:
  """Progress of a training loop: a tqdm bar on a TTY, else a printed line per log interval."""

  def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True,
               stream: TextIO | None = None):
    self._total, self._start = total_steps, start_step
    self._stream = stream or sys.stdout
    self._enabled = enabled
    self._t0: float | None = None  # set after the first (compiling) step
    self._t0_step = start_step
    self._bar = None
    if enabled and self._stream.isatty():
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, file=self._stream,
                            unit="step", dynamic_ncols=True)

  def eta(self, step: int) -> float | None:
    """Seconds left at the pace since the first step (None before two steps have run)."""
    if self._t0 is None or step <= self._t0_step:
      return None
    per_step = (time.perf_counter() - self._t0) / (step - self._t0_step)
    return per_step * (self._total - step)

  def step(self, step: int) -> None:
    """Called after every step."""
    if self._t0 is None:
      self._t0, self._t0_step = time.perf_counter(), step
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def log(self, step: int, scalars: dict[str, Any]) -> None:
    """Called at each log interval with that step's scalars."""
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.set_postfix_str(format_line(step, self._total, scalars, None).split(" | ", 1)[-1])
    else:
      print(format_line(step, self._total, scalars, self.eta(step)), file=self._stream, flush=True)

  def close(self) -> None:
    """Ends the bar (if any)."""
    if self._bar is not None:
      self._bar.close()
