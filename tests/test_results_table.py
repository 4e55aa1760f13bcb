"""Tests for tools/results_table.py (the GLIP README table from eval metrics.jsonl files)."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

import plots  # noqa: E402
import results_table  # noqa: E402


def _throughput(step, batch, tflop_per_example, devices=8, step_time=0.2):
  """A training line as the trainer writes it (glip_jax.logging.throughput_metrics)."""
  per_s = batch / step_time
  return {"step": step, "loss": 2.0, "examples_per_s": per_s, "step_time_s": step_time,
          "examples_per_s_per_device": per_s / devices,
          "tflops_per_s_per_device": per_s * tflop_per_example / devices}


def _write(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def runs(tmp_path):
  glip, tuned, clip = (str(tmp_path / n) for n in ("glip50", "glip50_tuned", "clip"))
  _write(os.path.join(glip, "eval", "metrics.jsonl"), [
      {"step": 100, "eval/imagenet/zeroshot_top1": 0.2, "eval/imagenet_masked/zeroshot_top1": 0.1},
      {"step": 200, "eval/imagenet/zeroshot_top1": 0.371,
       "eval/imagenet_masked/zeroshot_top1": 0.354},
  ])
  # In-loop metrics of the same run: train lines without eval keys, an older eval.
  _write(os.path.join(glip, "metrics.jsonl"), [
      {"step": 150, "loss": 3.0}, {"step": 100, "eval/imagenet/zeroshot_top1": 0.2},
      _throughput(100, 64, 2e-4), _throughput(200, 64, 1e-4)])
  _write(os.path.join(tuned, "metrics.jsonl"),
         [_throughput(10, 32, 2e-4), {"step": 10, "eval/imagenet/zeroshot_top1": 0.372}])
  _write(os.path.join(clip, "eval", "metrics.jsonl"),
         [{"step": 5, "eval/in1k/zeroshot_top1": 0.365}])
  _write(os.path.join(clip, "metrics.jsonl"), [_throughput(5, 128, 5e-4, devices=4)])
  return glip, tuned, clip


def test_table_in_glip_readme_layout(runs):
  glip, tuned, clip = runs
  table = results_table.build_table(
      [f"CLIP|-|-|{clip}:in1k|-", "---", f"GLIP|50%|{glip}|{glip}|{tuned}"],
      eval_name="imagenet", masked_eval="imagenet_masked", metric="zeroshot_top1")
  lines = table.splitlines()
  assert [c.strip() for c in lines[0].strip("|").split("|")] == list(results_table.HEADER)
  assert set(lines[1]) == {"|", "-"} and lines[3] == lines[1]
  assert [c.strip() for c in lines[2].strip("|").split("|")] == ["CLIP", "-", "-", "36.5", "-"]
  assert [c.strip() for c in lines[4].strip("|").split("|")] == [
      "GLIP", "50%", "35.4", "37.1", "37.2"]
  assert len({len(line) for line in lines}) == 1  # aligned columns


def test_missing_metric_and_bad_row(runs):
  glip, _, _ = runs
  with pytest.raises(KeyError, match="eval/imagenet/zeroshot_top5"):
    results_table.build_table([f"GLIP|50%|-|{glip}|-"], eval_name="imagenet",
                              masked_eval="x", metric="zeroshot_top5")
  with pytest.raises(ValueError, match="METHOD|RATIO"):
    results_table.build_table(["GLIP|50%"], eval_name="a", masked_eval="b", metric="c")


def test_command_line(runs):
  glip, tuned, _ = runs
  out = subprocess.run(
      [sys.executable, os.path.join(TOOLS, "results_table.py"), "--metric=zeroshot_top1",
       f"--row=GLIP|50%|{glip}|{glip}|{tuned}"], capture_output=True, text=True, check=True)
  assert "| GLIP   | 50%" in out.stdout and "37.2" in out.stdout
  bad = subprocess.run([sys.executable, os.path.join(TOOLS, "results_table.py"),
                        "--row=GLIP|50%|/nonexistent|-|-"], capture_output=True, text=True)
  assert bad.returncode == 1 and "not a directory" in bad.stderr


def test_training_compute_from_the_throughput_metrics(runs):
  glip, tuned, clip = runs
  # steps × batch × TFLOP/example, from the last training line; in PFLOP.
  assert results_table.training_pflop(glip) == pytest.approx(200 * 64 * 1e-4 / 1e3)
  assert results_table.training_pflop(tuned) == pytest.approx(10 * 32 * 2e-4 / 1e3)
  assert results_table.training_pflop(clip) == pytest.approx(5 * 128 * 5e-4 / 1e3)
  with pytest.raises(KeyError, match="training compute is unknown"):
    results_table.training_pflop(os.path.join(glip, "eval"))


def test_accuracy_vs_compute_png(runs, tmp_path):
  glip, tuned, clip = runs
  rows = [f"CLIP|-|-|{clip}:in1k|-", "---", f"GLIP|50%|{glip}|{glip}|{tuned}"]
  series = results_table.plot_series(rows, eval_name="imagenet", masked_eval="imagenet_masked",
                                     metric="zeroshot_top1")
  glip_pflop, tuned_pflop = 200 * 64 * 1e-4 / 1e3, 10 * 32 * 2e-4 / 1e3
  assert list(series) == ["CLIP", "GLIP 50%"]
  assert series["CLIP"] == (pytest.approx([5 * 128 * 5e-4 / 1e3]), [0.365])
  assert series["GLIP 50%"] == (pytest.approx([glip_pflop, glip_pflop + tuned_pflop]),
                                [0.371, 0.372])  # unmasked, then after tuning
  path = str(tmp_path / "results.png")
  drawn = plots.accuracy_vs_compute(series, path, "zeroshot_top1")
  assert drawn == series
  with Image.open(path) as png:
    assert png.format == "PNG" and png.size == (720, 504)  # 6.0 × 4.2 in at 120 dpi
    assert len(set(png.convert("RGB").getdata())) > 50  # lines, text and a legend, not blank


def test_speedup_vs_ratio_png(tmp_path):
  rows = [{"ratio": r, "speedup_measured": m, "speedup_analytic": a}
          for r, m, a in ((0.75, 2.9, 3.6), (0.0, 1.0, 1.0), (0.5, 1.7, 1.9))]
  path = str(tmp_path / "speedup.png")
  series = plots.speedup_vs_ratio(rows, path, title="demo")
  assert series == {"measured": ([0.0, 0.5, 0.75], [1.0, 1.7, 2.9]),
                    "analytic (FLOPs)": ([0.0, 0.5, 0.75], [1.0, 1.9, 3.6])}
  with Image.open(path) as png:
    assert png.format == "PNG" and png.size == (660, 456)  # 5.5 × 3.8 in at 120 dpi
  with pytest.raises(ValueError, match=r"row 0 lacks \['speedup_analytic'\]"):
    plots.speedup_vs_ratio([{"ratio": 0, "speedup_measured": 1}], path)


def test_command_line_plot(runs, tmp_path):
  glip, tuned, _ = runs
  path = str(tmp_path / "out.png")
  out = subprocess.run(
      [sys.executable, os.path.join(TOOLS, "results_table.py"), "--metric=zeroshot_top1",
       f"--row=GLIP|50%|{glip}|{glip}|{tuned}", f"--plot={path}"],
      capture_output=True, text=True, check=True)
  assert f"Wrote {path} (1 series)." in out.stdout
  with Image.open(path) as png:
    assert png.format == "PNG"
