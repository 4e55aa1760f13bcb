"""Tests for tools/results_table.py (the GLIP README table from eval metrics.jsonl files)."""
import json
import os
import subprocess
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

import results_table  # noqa: E402


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
      {"step": 150, "loss": 3.0}, {"step": 100, "eval/imagenet/zeroshot_top1": 0.2}])
  _write(os.path.join(tuned, "metrics.jsonl"),
         [{"step": 10, "eval/imagenet/zeroshot_top1": 0.372}])
  _write(os.path.join(clip, "eval", "metrics.jsonl"),
         [{"step": 5, "eval/in1k/zeroshot_top1": 0.365}])
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
