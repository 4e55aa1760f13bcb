"""Prints the FLIP/GLIP results table (SPEC §6) from runs' eval metrics.jsonl files.

Masked training runs are reported in three regimes, as in the GLIP README:

  | Method | Masking Ratio | Inference | Unmasking | After Tuning |

  Inference     masked inference at the training ratio: an evaluator with masking='train'
  Unmasking     the same model evaluated with all patches: the evaluator with masking='none'
  After Tuning  the unmasked evaluator of the run continued by configs/unmasked_tuning.py

Each row is `METHOD|RATIO|INFERENCE|UNMASKING|TUNED`; a cell is `WORKDIR` or `WORKDIR:EVAL_NAME`
(default names: --masked_eval for the Inference column, --eval for the others) or `-` (empty).
`--row=---` draws a separator. A cell's value is the metric at the latest step that has it in
WORKDIR/eval/metrics.jsonl (the watcher's) or WORKDIR/metrics.jsonl (in-loop evaluation).

Example (ImageNet zero-shot top-1, in %):

  python tools/results_table.py --eval=imagenet --masked_eval=imagenet_masked \\
    --metric=zeroshot_top1 \\
    --row='CLIP|-|-|runs/clip|-' \\
    --row='FLIP|50%|runs/flip50|runs/flip50|runs/flip50_tuned' \\
    --row='GLIP|50%|runs/glip50|runs/glip50|runs/glip50_tuned' --plot=results.png

`--plot=PATH` also writes a PNG (needs the `plot` extra): one line per method/ratio, the metric
against training compute, at the masked run's compute (Unmasking column; Inference if that is
empty) and, after tuning, at the run's plus the tuning run's compute. Compute is the analytic
FLOP count the trainer logs (SPEC §7): steps × batch × train FLOP per example, read from the
throughput metrics of each run's last training line in metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

HEADER = ("Method", "Masking Ratio", "Inference", "Unmasking", "After Tuning")
SEPARATOR = "---"
METRICS_FILES = (os.path.join("eval", "metrics.jsonl"), "metrics.jsonl")


def _records(path: str) -> list[dict]:
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # a line torn by a kill mid-write
        continue
  return records


def latest_value(workdir: str, key: str) -> float | None:
  """`key` at the latest step that has it, over the workdir's eval and in-loop metrics files."""
  best_step, best = -1, None
  # The watcher's file first: on equal steps its value (same checkpoint) is kept.
  for name in METRICS_FILES:
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      continue
    for record in _records(path):
      if key in record and record.get("step", -1) > best_step:
        best_step, best = record["step"], float(record[key])
  return best


def training_pflop(workdir: str) -> float:
  """A run's analytic training compute in PFLOP, from the last training line of metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  keys = ("examples_per_s", "step_time_s", "tflops_per_s_per_device", "examples_per_s_per_device")
  records = [r for r in _records(path) if all(k in r for k in keys)] if os.path.exists(path) else []
  if not records:
    raise KeyError(f"{workdir}: no training line with {list(keys)} in metrics.jsonl, so its "
                   "training compute is unknown")
  last = max(records, key=lambda r: r["step"])
  batch = last["examples_per_s"] * last["step_time_s"]  # examples/s × s/step
  tflop_per_example = last["tflops_per_s_per_device"] / last["examples_per_s_per_device"]
  return last["step"] * batch * tflop_per_example / 1e3


def cell_value(cell: str, default_eval: str, metric: str) -> float | None:
  """The value a `WORKDIR[:EVAL_NAME]` cell refers to; None for '-' or ''."""
  cell = cell.strip()
  if cell in ("", "-"):
    return None
  workdir, _, name = cell.partition(":")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{cell!r}: {workdir!r} is not a directory")
  value = latest_value(workdir, f"eval/{name or default_eval}/{metric}")
  if value is None:
    raise KeyError(f"{cell!r}: no 'eval/{name or default_eval}/{metric}' in {workdir}'s "
                   "metrics.jsonl files")
  return value


def _parse_row(row: str) -> list[str]:
  parts = row.split("|")
  if len(parts) != 5:
    raise ValueError(f"--row={row!r}: expected METHOD|RATIO|INFERENCE|UNMASKING|TUNED")
  return [part.strip() for part in parts]


def _workdir(cell: str) -> str | None:
  return None if cell in ("", "-") else cell.partition(":")[0]


def plot_series(rows: Sequence[str], *, eval_name: str, masked_eval: str,
                metric: str) -> dict[str, tuple[list[float], list[float]]]:
  """{'METHOD RATIO': ([PFLOP...], [metric...])} for each row with a value (see --plot)."""
  series = {}
  for row in rows:
    if row.strip() == SEPARATOR:
      continue
    method, ratio, masked, unmasked, tuned = _parse_row(row)
    base, base_eval = (unmasked, eval_name) if _workdir(unmasked) else (masked, masked_eval)
    compute, values = [], []
    if _workdir(base):
      compute.append(training_pflop(_workdir(base)))
      values.append(cell_value(base, base_eval, metric))
      if _workdir(tuned):
        compute.append(compute[0] + training_pflop(_workdir(tuned)))
        values.append(cell_value(tuned, eval_name, metric))
    if values:
      series[f"{method} {ratio}" if ratio not in ("", "-") else method] = (compute, values)
  return series


def _format(value: float | None, scale: float, digits: int) -> str:
  if value is None or math.isnan(value):
    return "-"
  return f"{value * scale:.{digits}f}"


def build_table(rows: Sequence[str], *, eval_name: str, masked_eval: str, metric: str,
                scale: float = 100.0, digits: int = 1) -> str:
  """The markdown table for `rows` (see the module docstring for their format)."""
  table = [list(HEADER)]
  for row in rows:
    if row.strip() == SEPARATOR:
      table.append(None)
      continue
    method, ratio, masked, unmasked, tuned = _parse_row(row)
    values = [cell_value(masked, masked_eval, metric), cell_value(unmasked, eval_name, metric),
              cell_value(tuned, eval_name, metric)]
    table.append([method, ratio] + [_format(v, scale, digits) for v in values])
  widths = [max(len(r[i]) for r in table if r) for i in range(len(HEADER))]
  rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  lines = []
  for i, r in enumerate(table):
    lines.append(rule if r is None else
                 "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    if i == 0:
      lines.append(rule)
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses flags and prints the table."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--row", action="append", required=True,
                      help="METHOD|RATIO|INFERENCE|UNMASKING|TUNED, or --- for a separator")
  parser.add_argument("--eval", default="imagenet", help="unmasked evaluator name")
  parser.add_argument("--masked_eval", default="imagenet_masked",
                      help="evaluator name with masking='train' (the Inference column)")
  parser.add_argument("--metric", default="zeroshot_top1")
  parser.add_argument("--scale", type=float, default=100.0, help="100: print percentages")
  parser.add_argument("--digits", type=int, default=1)
  parser.add_argument("--plot", default="", help="also write this PNG: metric vs. training compute")
  args = parser.parse_args(argv)
  try:
    print(build_table(args.row, eval_name=args.eval, masked_eval=args.masked_eval,
                      metric=args.metric, scale=args.scale, digits=args.digits))
    if args.plot:
      import plots  # pylint: disable=g-import-not-at-top  (tools/plots.py; needs matplotlib)
      series = plot_series(args.row, eval_name=args.eval, masked_eval=args.masked_eval,
                           metric=args.metric)
      plots.accuracy_vs_compute(series, args.plot, args.metric,
                                title=f"{args.eval}: {args.metric} vs. training compute")
      print(f"Wrote {args.plot} ({len(series)} series).")
  except (FileNotFoundError, KeyError, ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
