"""Tests for tools/reproduce.py: aggregation over seeds, the compute-matched table, resuming a
killed study, and (slow) the quick grid end to end."""
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import reproduce  # noqa: E402


def _record(data, method, ratio, seed, phase, unmasked, masked=None, *, steps=40, batch=10,
            fpe=1e12):
  """A result.json as `reproduce.execute` writes it; curves are {step: value}."""
  return dict(data=data, method=method, label=method, ratio=ratio, seed=seed, phase=phase,
              steps=steps, batch=batch, flops_per_example=fpe, wall_s=1.0,
              pflop=steps * batch * fpe / 1e15,
              curve={"unmasked": {str(k): v for k, v in unmasked.items()},
                     "masked": {str(k): v for k, v in (masked or {}).items()}})


def _write(root, record):
  run = reproduce.Run(record["data"], reproduce.Method(record["method"], "", "x", ()),
                      record["ratio"], record["seed"], record["phase"])
  path = os.path.join(root, run.path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, reproduce.RESULT), "w") as f:
    json.dump(record, f)


def test_stat_is_the_mean_sample_std_and_t_interval():
  s = reproduce.stat([0.5, 0.6, 0.7])
  assert s.n == 3
  assert s.mean == pytest.approx(0.6)
  assert s.std == pytest.approx(0.1)  # sqrt(((-.1)² + 0 + .1²) / 2)
  assert s.ci95 == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-4)  # t(0.975, 2) = 4.3027
  assert s.format() == "60.0 ± 10.0"
  one = reproduce.stat([0.25])
  assert (one.n, one.mean, one.std, one.ci95, one.format()) == (1, 0.25, 0.0, math.inf, "25.0")
  assert reproduce.stat([]) is None


@pytest.fixture
def results(tmp_path):
  """Two seeds of CLIP (a 4-point curve) and GLIP 0.5 (trained at half the FLOPs, then tuned)."""
  root = str(tmp_path)
  clip_curves = {0: {10: 0.2, 20: 0.3, 30: 0.4, 40: 0.5}, 1: {10: 0.1, 20: 0.3, 30: 0.5, 40: 0.6}}
  for seed, curve in clip_curves.items():
    _write(root, _record("centred", "clip", 0.0, seed, "train", curve))
  for seed, (unmasked, masked, tuned) in {0: (0.45, 0.40, 0.5), 1: (0.35, 0.20, 0.6)}.items():
    _write(root, _record("centred", "glip", 0.5, seed, "train", {20: 0.3, 40: unmasked},
                         {40: masked}, fpe=0.5e12))
    _write(root, _record("centred", "glip", 0.5, seed, "tune", {10: tuned}, steps=10))
  _write(root, _record("centred", "flip", 0.5, 0, "train", {40: 0.30}, {40: 0.25}, fpe=0.5e12))
  # A-CLIP costs more than CLIP's whole run: no CLIP value at its compute.
  _write(root, _record("centred", "aclip", 0.5, 0, "train", {40: 0.55}, fpe=1.5e12))
  return reproduce.Results(reproduce.load_results(root))


def test_cells_are_the_final_values_over_seeds(results):
  glip = results.cell("centred", "glip", 0.5, "unmasked")
  assert (glip.n, glip.mean, glip.std) == (2, pytest.approx(0.40), pytest.approx(0.0707107))
  assert results.cell("centred", "glip", 0.5, "masked").mean == pytest.approx(0.30)
  assert results.cell("centred", "glip", 0.5, "tuned").mean == pytest.approx(0.55)
  assert results.cell("centred", "clip", 0.0, "unmasked").mean == pytest.approx(0.55)
  assert results.cell("centred", "clip", 0.0, "masked") is None
  assert results.cell("uncentred", "glip", 0.5, "unmasked") is None


def test_paired_difference_uses_the_seeds_both_cells_have(results):
  # Only seed 0 has FLIP: GLIP − FLIP = 0.45 − 0.30 on that seed alone.
  d = results.paired(("centred", "glip", 0.5, "unmasked"), ("centred", "flip", 0.5, "unmasked"))
  assert (d.n, d.mean) == (1, pytest.approx(0.15))
  # Tuned − unmasked over both seeds: 0.05 and 0.25 → mean 0.15, std 0.141421, t(0.975,1)=12.706.
  d = results.paired(("centred", "glip", 0.5, "tuned"), ("centred", "glip", 0.5, "unmasked"))
  assert (d.n, d.mean, d.std) == (2, pytest.approx(0.15), pytest.approx(0.1414214))
  assert d.ci95 == pytest.approx(12.7062 * 0.1414214 / math.sqrt(2), rel=1e-4)


def test_compute_matched_interpolates_clips_curve_per_seed(results):
  # GLIP trained 40 steps × 10 × 0.5 TFLOP = 0.2 PFLOP; CLIP's step s costs s × 0.01 PFLOP, so
  # CLIP at 0.2 PFLOP is its step-20 value: seed 0: 0.3, seed 1: 0.3.
  compute, clip_at, delta = reproduce.compute_matched(results, "centred", "glip", 0.5, "unmasked")
  assert compute == pytest.approx(0.2)
  assert clip_at.mean == pytest.approx(0.3)
  assert delta.mean == pytest.approx(0.40 - 0.3)
  # After tuning: + 10 × 10 × 1 TFLOP = 0.3 PFLOP in all; CLIP there: 0.4 and 0.5.
  compute, clip_at, delta = reproduce.compute_matched(results, "centred", "glip", 0.5, "tuned")
  assert compute == pytest.approx(0.3)
  assert clip_at.mean == pytest.approx(0.45)
  assert delta.mean == pytest.approx(((0.5 - 0.4) + (0.6 - 0.5)) / 2)
  # Between evaluations CLIP's curve is linear: at 0.25 PFLOP seed 0 has (0.3 + 0.4) / 2.
  xs, ys = results.compute_curve("centred", "clip", 0.0, 0)
  assert xs == pytest.approx([0.1, 0.2, 0.3, 0.4])
  assert reproduce.interpolate(0.25, xs, ys) == pytest.approx(0.35)
  # A-CLIP (0.6 PFLOP) is beyond CLIP's 0.4: no comparison.
  compute, clip_at, delta = reproduce.compute_matched(results, "centred", "aclip", 0.5, "unmasked")
  assert compute == pytest.approx(0.6) and clip_at is None and delta is None


def test_tables_show_the_aggregates(results):
  methods = [m for m in reproduce.default_methods() if m.key in ("clip", "flip", "glip", "aclip")]
  main = reproduce.main_table(results, methods, "centred")
  assert "| GLIP | 50% | 30.0 ± 14.1 | 40.0 ± 7.1 | 55.0 ± 7.1 | 2 | 35.4 / 37.1 / 37.2 |" in main
  assert "| CLIP | – | – | 55.0 ± 7.1 | – | 2 |  |" in main
  assert "| A-CLIP | 50% | – | 55.0 | – | 1 | – / 41.3 / – |" in main
  compute = reproduce.compute_table(results, methods, "centred")
  # Δ per seed 0.15 and 0.05: mean 0.10, CI 12.706 · 0.0707 / √2 = 0.635.
  assert ("| GLIP 0.5 | end of training | 500000.0 | 200.00 | 40.0 ± 7.1 | 30.0 ± 0.0 | "
          "+10.0 ± 63.5 |") in compute
  assert ("| GLIP 0.5 | after tuning | 500000.0 | 300.00 | 55.0 ± 7.1 | 45.0 ± 7.1 | "
          "+10.0 ± 0.0 |") in compute
  assert "| A-CLIP 0.5 | end of training | 1500000.0 | 600.00 | 55.0 | – | – |" in compute


def test_effects_and_the_closing_note_quote_the_aggregates(results):
  methods = [m for m in reproduce.default_methods() if m.key in ("clip", "flip", "glip")]
  table, found = reproduce.effects_table(results, methods)
  # GLIP − FLIP at 50%, unmasked, seed 0 only: 0.45 − 0.30; the paper's 37.1 − 36.1.
  assert "| GLIP − FLIP, 0.5, Unmasking | centred | +1.0 | +15.0 | same sign (1 seed) |" in table
  assert "| GLIP − FLIP, 0.75, Inference | centred | +2.6 | – | not run |" in table
  assert "uncentred" not in table  # no uncentred run: those rows are left out
  assert sum(f["ours"] is not None for f in found) == 2  # 50%: FLIP has no tuning run
  note = reproduce.closing_note(results, methods)
  assert note == ("*centred* (Inference / Unmasking / After Tuning): CLIP – / 55.0 ± 7.1 / – "
                  "(2 seeds); FLIP 50% 25.0 / 30.0 / – (1 seed); GLIP 50% 30.0 ± 14.1 / "
                  "40.0 ± 7.1 / 55.0 ± 7.1 (2 seeds).")


def test_verdicts():
  assert reproduce.verdict(1.5, reproduce.Stat(3, 0.05, 0.01, 0.02)) == "**reproduces**"
  assert reproduce.verdict(1.5, reproduce.Stat(3, 0.01, 0.02, 0.05)) == "same sign, within noise"
  assert reproduce.verdict(1.5, reproduce.Stat(3, -0.05, 0.01, 0.02)) == "**reversed**"
  assert reproduce.verdict(-4.9, reproduce.Stat(3, 0.01, 0.02, 0.05)) == (
      "opposite sign, within noise")
  assert reproduce.verdict(1.5, reproduce.Stat(1, 0.05, 0.0, math.inf)) == "same sign (1 seed)"
  assert reproduce.verdict(1.5, None) == "not run"


def test_the_grid_has_every_selection_kind_and_the_papers_ratios():
  methods = reproduce.default_methods()
  keys = [m.key for m in methods]
  assert keys[:5] == ["clip", "flip", "glip", "aclip", "aclip_random"]
  assert set(keys[5:]) == set(reproduce.masking.SCORES) - {"random", "gaussian", "attentive"}
  runs = reproduce.plan(methods, seeds=3, uncentred=["clip", "flip", "glip"])
  train = [r for r in runs if r.phase == "train"]
  # Per seed: centred 1 + 3 + 3 + 2 + 4 other kinds = 13, uncentred CLIP + FLIP/GLIP at 0.5 = 3.
  assert len(train) == 3 * 16
  assert len(runs) - len(train) == 3 * (10 + 2)  # tuning for the masked CLIP-method runs
  assert {(r.method.key, r.ratio) for r in train if r.data == "uncentred"} == {
      ("clip", 0.0), ("flip", 0.5), ("glip", 0.5)}
  every_ratio = reproduce.plan(methods, 3, ["clip", "flip", "glip"], uncentred_ratios=None)
  assert len([r for r in every_ratio if r.phase == "train"]) == 3 * 20
  assert {r.ratio for r in train if r.method.key == "glip"} == {0.5, 0.75, 0.918}
  sizes = reproduce.Sizes()
  glip_run = next(r for r in train if r.method.key == "glip")
  glip = reproduce.train_config(glip_run, sizes)
  assert (glip.masking.kind, glip.masking.ratio, glip.seed) == ("gaussian", 0.5, 0)
  assert sorted(glip.evals) == ["shape", "shape_masked"]
  assert glip.evals.shape_masked.masking == "train"
  aclip_random = next(r for r in train if r.method.key == "aclip_random")
  c = reproduce.train_config(aclip_random, sizes)
  assert (c.method, c.masking.kind, c.masking.ratio) == ("aclip", "random", 0.5)
  uncentred = next(r for r in train if r.data == "uncentred")
  c = reproduce.train_config(uncentred, sizes)
  assert c.data.synthetic.center_bias == 0.0
  assert c.evals.shape.dataset.synthetic.center_bias == 0.0
  tune = reproduce.tune_config(glip_run, sizes, "/x/train")
  assert (tune.init_from.path, tune.masking.kind, tune.total_steps) == ("/x/train", "none", 30)
  assert sorted(tune.evals) == ["shape"]


def _fake_trainer(calls, kill_at=None):
  """Stands in for train_and_evaluate: writes the metrics lines a finished run has."""
  def train(config, workdir):
    calls.append(workdir)
    if kill_at is not None and len(calls) == kill_at:
      raise KeyboardInterrupt("killed")
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": config.total_steps, "tflops_per_s_per_device": 2.0,
                          "examples_per_s_per_device": 4.0,
                          "eval/shape/zeroshot_top1": 0.5}) + "\n")
    return {"steps": config.total_steps}
  return train


def test_a_killed_study_resumes_without_redoing_finished_runs(tmp_path):
  root = str(tmp_path)
  methods, sizes, runs = reproduce.study(reproduce.parse_args(["--quick"]))
  assert [r.path for r in runs] == ["centred/clip_r0/s0/train", "centred/glip_r0.5/s0/train",
                                    "centred/glip_r0.5/s0/tune"]
  assert len(methods) == 2 and sizes == reproduce.QUICK
  calls = []
  with pytest.raises(KeyboardInterrupt):  # killed during the second run
    reproduce.run_study(runs, root, sizes, _fake_trainer(calls, kill_at=2), log=lambda s: None)
  assert os.path.exists(os.path.join(root, runs[0].path, reproduce.RESULT))
  assert not os.path.exists(os.path.join(root, runs[1].path, reproduce.RESULT))
  first = os.path.getmtime(os.path.join(root, runs[0].path, reproduce.RESULT))
  calls.clear()
  counts = reproduce.run_study(runs, root, sizes, _fake_trainer(calls), log=lambda s: None)
  assert counts == dict(done=2, skipped=1, not_started=0)
  assert calls == [os.path.join(root, r.path) for r in runs[1:]]
  assert os.path.getmtime(os.path.join(root, runs[0].path, reproduce.RESULT)) == first
  record = json.load(open(os.path.join(root, runs[2].path, reproduce.RESULT)))
  assert record["flops_per_example"] == pytest.approx(0.5e12)
  assert record["pflop"] == pytest.approx(sizes.tune_steps * sizes.batch * 0.5e12 / 1e15)
  config = json.load(open(os.path.join(root, runs[2].path, "config.json")))
  assert config["init_from"]["path"] == os.path.join(root, runs[1].cell, "train")
  calls.clear()
  assert reproduce.run_study(runs, root, sizes, _fake_trainer(calls), log=lambda s: None) == dict(
      done=0, skipped=3, not_started=0)
  assert calls == []


@pytest.mark.slow
def test_quick_study_writes_the_tables_and_plots_then_resumes(tmp_path):
  root, doc = str(tmp_path / "runs"), str(tmp_path / "docs" / "experiments.md")
  os.makedirs(os.path.dirname(doc))
  cmd = [sys.executable, os.path.join(REPO, "tools", "reproduce.py"), "--quick",
         f"--root={root}", f"--doc={doc}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "study: {'done': 3, 'skipped': 0, 'not_started': 0}" in out.stdout
  text = open(doc).read()
  assert "| CLIP | – | – |" in text and "| GLIP | 50% |" in text
  assert "## Accuracy at equal training compute (centred)" in text
  assert "| GLIP 0.5 | after tuning |" in text
  for name in ("accuracy_vs_compute_centred.png", "accuracy_vs_ratio.png", "keep_maps.png"):
    path = os.path.join(tmp_path, "docs", "experiments", name)
    assert f"experiments/{name}" in text
    with Image.open(path) as image:
      assert image.format == "PNG" and min(image.size) > 100
    assert os.path.getsize(path) < 150_000
  # Killed after the tuning's last checkpoint, before its result: the rerun redoes only that run,
  # which resumes from the checkpoint (no training step logged again).
  tune = os.path.join(root, "centred", "glip_r0.5", "s0", "tune")
  os.remove(os.path.join(tune, reproduce.RESULT))
  lines = open(os.path.join(tune, "metrics.jsonl")).read().count('"loss"')
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "study: {'done': 1, 'skipped': 2, 'not_started': 0}" in out.stdout
  assert open(os.path.join(tune, "metrics.jsonl")).read().count('"loss"') == lines
  assert os.path.exists(os.path.join(tune, reproduce.RESULT))
