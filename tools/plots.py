"""PNG plots: speedup vs. mask ratio (benchmark.py), accuracy vs. compute (results_table.py).

Each function draws from plain rows, writes a PNG and returns the series it drew, {label: (x, y)},
so callers and tests can check what is on the picture. matplotlib is the optional `plot` extra
(pip install 'glip_jax[plot]') and is imported only here, when a plot is asked for.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Series = dict[str, tuple[list[float], list[float]]]
DPI = 120


def _figure(size: tuple[float, float]) -> Any:
  try:
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Writing plots needs matplotlib: pip install 'glip_jax[plot]' "
                      "(or matplotlib).") from e
  # The object-oriented API draws with Agg and touches no pyplot state (scripts, CI, notebooks).
  return Figure(figsize=size, layout="constrained")


def speedup_vs_ratio(rows: Sequence[Mapping[str, float]], path: str, title: str = "") -> Series:
  """benchmark.py's train rows (ratio, speedup_measured, speedup_analytic) as speedup vs. ratio."""
  for i, row in enumerate(rows):
    missing = {"ratio", "speedup_measured", "speedup_analytic"} - set(row)
    if missing:
      raise ValueError(f"benchmark row {i} lacks {sorted(missing)}; give the rows of --mode=train.")
  rows = sorted(rows, key=lambda r: r["ratio"])
  ratios = [float(r["ratio"]) for r in rows]
  series = {"measured": (ratios, [float(r["speedup_measured"]) for r in rows]),
            "analytic (FLOPs)": (ratios, [float(r["speedup_analytic"]) for r in rows])}
  fig = _figure((5.5, 3.8))
  ax = fig.subplots()
  for (label, (x, y)), style in zip(series.items(), ("o-", "s--")):
    ax.plot(x, y, style, label=label)
  ax.axhline(1.0, color="grey", lw=0.8)
  ax.set_xlabel("mask ratio (fraction of patches dropped)")
  ax.set_ylabel("train-step speedup vs. ratio 0")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, dpi=DPI)
  return series


def accuracy_vs_compute(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str,
                        metric: str, title: str = "") -> Series:
  """One line per method/ratio: accuracy (fraction) against training compute in PFLOP."""
  if not series:
    raise ValueError("no series to plot: every row is empty or a separator.")
  fig = _figure((6.0, 4.2))
  ax = fig.subplots()
  drawn: Series = {}
  for label, (compute, accuracy) in series.items():
    if len(compute) != len(accuracy):
      raise ValueError(f"series {label!r}: {len(compute)} compute values for "
                       f"{len(accuracy)} accuracies.")
    drawn[label] = ([float(c) for c in compute], [float(a) for a in accuracy])
    ax.plot(drawn[label][0], [100 * a for a in drawn[label][1]], "o-", label=label)
  ax.set_xlabel("training compute (PFLOP, analytic)")
  ax.set_ylabel(f"{metric} (%)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=DPI)
  return drawn
