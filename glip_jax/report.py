"""The summary a person reads at the end of a run or an evaluation: grouped, ordered, with chance.

Evaluation results arrive as flat `eval/<name>/<metric>` scalars. This module groups them by
evaluator, orders the metrics (top-1 before top-5; recall@1, @5, @10 in that order), puts the
chance level beside every accuracy so a number can be judged at a glance, and says when a
metric carries no information (a "masked" evaluation of a run trained without masking is the
unmasked one again).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import ml_collections

_RECALL = re.compile(r"^(i2t|t2i)_recall_at_(\d+)$")
_TOP = re.compile(r"^(.*)_top(\d+)$")


@dataclasses.dataclass(frozen=True)
class EvalDescription:
  """What a reader needs to judge one evaluator's numbers."""

  kind: str
  num_classes: int | None = None  # zero-shot / linear probe: chance top-k = k / num_classes
  num_images: int | None = None  # retrieval: chance recall@k ≈ k / num_images
  masking: str = "unmasked"
  note: str = ""


def describe_evals(config: ml_collections.ConfigDict) -> dict[str, EvalDescription]:
  """EvalDescription of every `config.evals` entry (classes and set sizes where cheap to know)."""
  from glip_jax.evaluation import builder  # pylint: disable=g-import-not-at-top
  from glip_jax import masking as masking_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for name, entry in builder.resolved_evals(config).items():
    spec = builder.masking_spec(config, entry.masking, field=f"evals.{name}.masking")
    masking, note = "unmasked", ""
    if spec is not None:
      masking = f"{spec.kind} {spec.ratio:.0%} dropped"
    elif entry.masking == "train":
      train_spec = masking_lib.from_config(config.masking)
      if not train_spec.active:
        note = "the run trains without masking, so this equals the unmasked evaluation"
    num_classes = num_images = None
    dataset = entry.get("dataset") or entry.get("test_dataset")
    if entry.kind == "zeroshot":
      try:
        num_classes = len(builder.resolve_classnames(entry))
      except Exception:  # pylint: disable=broad-except
        num_classes = None  # e.g. TFDS label names unreadable here: chance is then omitted
    elif entry.kind == "linear_probe":
      num_classes = entry.num_classes or None
    if dataset is not None and dataset.source == "synthetic":
      num_images = int(dataset.synthetic.eval_size)
    out[name] = EvalDescription(entry.kind, num_classes, num_images, masking, note)
  return out


def _metric_sort_key(metric: str) -> tuple:
  recall = _RECALL.match(metric)
  if recall:
    return (0, recall.group(1), int(recall.group(2)))
  top = _TOP.match(metric)
  if top:
    return (0, top.group(1), int(top.group(2)))
  return (1, metric, 0)


def chance_level(metric: str, description: EvalDescription | None) -> float | None:
  """Expected value of `metric` for a model that ranks at random, when it is known."""
  if description is None:
    return None
  recall = _RECALL.match(metric)
  if recall and description.num_images:
    return min(1.0, int(recall.group(2)) / description.num_images)
  top = _TOP.match(metric)
  if top and description.num_classes and not metric.endswith("val_top1"):
    return min(1.0, int(top.group(2)) / description.num_classes)
  return None


def format_eval_groups(results: dict[str, float],
                       descriptions: dict[str, EvalDescription]) -> list[str]:
  """Lines of the evaluation part of a summary: one block per evaluator."""
  groups: dict[str, dict[str, float]] = {}
  for key, value in results.items():
    parts = key.split("/", 2)
    if len(parts) == 3 and parts[0] == "eval":
      groups.setdefault(parts[1], {})[parts[2]] = value
  lines = []
  for name in sorted(groups):
    d = descriptions.get(name)
    header = name if d is None else f"{name}  ({d.kind}, {d.masking}"
    if d is not None:
      if d.num_classes:
        header += f", {d.num_classes} classes"
      if d.num_images:
        header += f", {d.num_images} images"
      header += ")"
    lines.append(header)
    if d is not None and d.note:
      lines.append(f"    note: {d.note}")
    for metric in sorted(groups[name], key=_metric_sort_key):
      value = groups[name][metric]
      chance = chance_level(metric, d)
      text = f"    {metric:<24} {value:8.4f}"
      if chance is not None:
        text += f"   (chance {chance:.4f})"
      lines.append(text)
  return lines


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def tensorboard_command(logdir: str | os.PathLike[str]) -> str:
  """The exact command that shows a run's curves (tensorboard: `pip install tensorboard`)."""
  return f"tensorboard --logdir {os.fspath(logdir)}"


def format_run_summary(summary: dict[str, Any], config: ml_collections.ConfigDict,
                       workdir: str, *, wall_seconds: float | None = None) -> str:
  """The table `make demo` ends with: training figures, evaluations grouped, where the logs are."""
  lines = [f"\nRun summary: {workdir}", "-" * 72]
  train_rows = [("steps", summary.get("steps")),
                ("preempted at step", summary.get("preempted_at_step")),
                ("final loss", summary.get("loss")),
                ("examples/s", summary.get("examples_per_s")),
                ("examples/s per device", summary.get("examples_per_s_per_device")),
                ("MFU", summary.get("mfu")),
                ("wall time", _duration(wall_seconds) if wall_seconds is not None else None)]
  for label, value in train_rows:
    if value is None:
      continue
    if isinstance(value, float) and not float(value).is_integer():
      value = f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    elif isinstance(value, float):
      value = f"{int(value):,}"
    lines.append(f"{label:<24} {value}")
  eval_lines = format_eval_groups(summary, describe_evals(config))
  if eval_lines:
    lines += ["", "Evaluation (held-out split, final step)"] + eval_lines
  lines += ["", f"metrics:     {os.path.join(workdir, 'metrics.jsonl')}",
            f"checkpoints: {os.path.join(workdir, 'checkpoints')}",
            f"curves:      {tensorboard_command(workdir)}   (pip install tensorboard)"]
  return "\n".join(lines)
