"""What users run but no other test did (issue 20): non-square images end to end, every recipe,
the README's commands, the Makefile and .ci/run, the benchmark, bf16 / remat / tensor-parallel
training steps, init_from with the optimizer state, Grain workers in the trainer, mixture weights.

The training runs share one reference: the tiny demo config at a non-square 48×32 input (a 6×4
patch grid) with Gaussian masking, 3 steps; each variant changes one thing and is compared with it.
"""

import io
import json
import math
import os
import re
import shlex
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from glip_jax import aclip
from glip_jax import checkpointing
from glip_jax import logging as logging_lib
from glip_jax import run_spec
from glip_jax import train
from glip_jax import train_step as train_step_lib
from glip_jax.data import config as data_config_lib
from glip_jax.data import pipeline
from glip_jax.data import records
from glip_jax.data import transforms
from glip_jax.data import views
from glip_jax.data.tokenizer import Tokenizer
from glip_jax.evaluation import builder
from glip_jax.models import clip as clip_lib
from configs import demo
from runs import OVERRIDES, REPO, apply_overrides, read_losses, tiny_config

NON_SQUARE = (48, 32)  # (height, width): a 6×4 grid of 8-px patches for the tiny model


def _set(config, **overrides):
  """config with dotted-path overrides (`model__dtype="bfloat16"` sets model.dtype)."""
  return apply_overrides(config, overrides, sep="__")


def _non_square(config):
  del config.model["image_size"]  # the recipe's int field; (H, W) replaces it
  config.model.image_size = NON_SQUARE
  return config


def _metrics(workdir):
  return logging_lib.read_metrics_jsonl(os.path.join(workdir, logging_lib.METRICS_FILENAME))


def _per_step(workdir, key):
  return {r["step"]: r[key] for r in _metrics(workdir) if key in r}


# ----------------------------------------------------------------------------------------------
# Non-square images: the pieces (cheap).

def test_center_crop_to_a_non_square_size_keeps_the_aspect_and_the_centre():
  # R encodes the column, G the row of a 200×100 (W×H) image; a (40, 60) crop has aspect 1.5,
  # so the box is the central 150×100 (scale 2.5 source px per output px): x from 25 to 175.
  x, y = np.meshgrid(np.arange(200), np.arange(100))
  image = np.stack([x * 255 / 199, y * 255 / 99, np.zeros_like(x)], -1).astype(np.uint8)
  out = transforms.center_crop(image, (40, 60))
  assert out.shape == (40, 60, 3)
  cols = (25 + (np.arange(60) + 0.5) * 2.5 - 0.5) * 255 / 199
  rows = ((np.arange(40) + 0.5) * 2.5 - 0.5) * 255 / 99
  np.testing.assert_allclose(out[20, 2:-2, 0], cols[2:-2], atol=2)
  np.testing.assert_allclose(out[2:-2, 30, 1], rows[2:-2], atol=2)
  # A square size is still the middle square (100×100 from x = 50).
  square = transforms.center_crop(image, 40)
  np.testing.assert_allclose(square[20, 2:-2, 0], ((50 + (np.arange(40) + 0.5) * 2.5 - 0.5)
                                                   * 255 / 199)[2:-2], atol=2)


def _record(image):
  return {"image": image, "captions": ["a caption"], "key": "k", "label": 3,
          "labels": {"shape": 1}}


def test_preprocessors_crop_to_height_by_width():
  tok = Tokenizer(context_length=8)
  image = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
  rng = np.random.default_rng(0)
  train_out = pipeline.TrainPreprocess(NON_SQUARE, tok).random_map(_record(image), rng)
  assert train_out["image"].shape == (48, 32, 3)
  eval_pre = pipeline.EvalPreprocess(NON_SQUARE, tok, max_captions=2, label_names=("shape",))
  assert eval_pre.map(_record(image))["image"].shape == (48, 32, 3)
  assert eval_pre.map({"pad": True})["image"].shape == (48, 32, 3)  # padding matches real rows
  views_out = views.ACLIPPreprocess(NON_SQUARE, tok).random_map(_record(image), rng)
  for key in ("image", "image2", "teacher_image"):
    assert views_out[key].shape == (48, 32, 3)


def test_run_spec_and_evaluation_take_a_non_square_size(tmp_path):
  config = _non_square(tiny_config())
  spec = run_spec.build(config, str(tmp_path / "run"))
  assert spec.image_size == NON_SQUARE and spec.step.grid == (6, 4)
  assert builder._image_size(config.model) == NON_SQUARE
  config.model.image_size = (48, 30)  # not a multiple of the 8-px patch
  with pytest.raises(ValueError, match=r"not divisible by the patch size 8"):
    run_spec.build(config)


def test_aclip_block_pooling_on_a_non_square_grid():
  # Grid 4×6 in 2×2 blocks: a 2×3 block grid; the reference is a loop over the blocks.
  rng = np.random.default_rng(0)
  scores = rng.random((3, 24)).astype(np.float32)
  pooled = np.asarray(aclip.block_scores(scores, (4, 6), 2))
  grid = scores.reshape(3, 4, 6)
  want = np.array([[grid[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean() for i in range(2)
                    for j in range(3)] for b in range(3)])
  np.testing.assert_allclose(pooled, want, rtol=1e-6)
  patches = np.asarray(aclip.blocks_to_patches(np.array([[5, 1]]), (4, 6), 2))
  # block 1 = rows 0-1, cols 2-3; block 5 = rows 2-3, cols 4-5 (row-major, 6 patches a row).
  assert patches.tolist() == [[2, 3, 8, 9, 16, 17, 22, 23]]


# ----------------------------------------------------------------------------------------------
# Every recipe loads and validates (the run spec only: no parameters, no compile).

@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
  """16 converted synthetic examples: a real ArrayRecord glob for the recipes' `data=`."""
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import make_arrayrecord  # pylint: disable=g-import-not-at-top

  out = tmp_path_factory.mktemp("shards")
  make_arrayrecord.main(["--input_format=synthetic", "--num_examples=16",
                         "--synthetic_image_size=32", f"--output_dir={out}", "--prefix=train"])
  return str(out / "train-*.array_record")


# recipe, argument, then what the run spec must hold: method, masking kind, ratio dropped.
RECIPES = [
    ("clip_vit_b16", "", "clip", "none", 0.0),
    ("flip_vit_b16", "ratio=0.75", "clip", "random", 0.75),
    ("glip_vit_b16", "", "clip", "gaussian", 0.5),
    ("aclip_vit_b16", "", "aclip", "attentive", None),
    ("cluster_vit_b16", "", "clip", "cluster", 0.5),
    ("pgs_vit_b16", "", "clip", "pgs", 0.3),
    ("unmasked_tuning", "init=/ckpt/masked_run,base=glip_vit_b16", "clip", "none", 0.0),
]


@pytest.mark.parametrize("name,arg,method,kind,ratio", RECIPES, ids=[r[0] for r in RECIPES])
def test_every_recipe_loads_and_validates(tiny_shards, name, arg, method, kind, ratio):
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  config = module.get_config(",".join(a for a in (f"data={tiny_shards}", arg) if a))
  # The tiny override: a run length (16 examples make less than one epoch-based step).
  config.total_epochs, config.total_examples, config.total_steps = None, None, 10
  spec = run_spec.build(config)
  assert spec.total_steps == 10 and spec.method.name == method
  assert config.masking.kind == kind
  if ratio is not None:
    assert spec.masking.ratio == pytest.approx(ratio)
  assert spec.image_size == (224, 224) and spec.step.grid == (14, 14)
  assert [len(s) for s, _ in spec.train_sources] == [16]
  if name == "unmasked_tuning":
    assert config.init_from.path == "/ckpt/masked_run" and not config.init_from.optimizer_state


def test_a_broken_recipe_override_is_caught_by_the_same_check(tiny_shards):
  from configs import glip_vit_b16  # pylint: disable=g-import-not-at-top

  config = glip_vit_b16.get_config(f"data={tiny_shards}")
  config.total_epochs, config.total_steps = None, 10
  config.masking.ratio = 1.0
  with pytest.raises(ValueError, match=r"masking\.ratio=1\.0"):
    run_spec.build(config)


# ----------------------------------------------------------------------------------------------
# The Makefile and .ci/run call what the README says (a dry run: `make -n`).

def _readme_block(heading):
  text = open(os.path.join(REPO, "README.md")).read()
  section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)```", section, re.S)[0]


def _make_n(*args):
  # -B: print every step, also when .venv is already up to date (as in CI after `make .venv`).
  out = subprocess.run(["make", "-n", "-B", "-C", REPO, "PYTEST_ARGS=", *args], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, check=True).stdout
  return [line.strip() for line in out.splitlines()]


def test_make_targets_run_the_readme_commands():
  block = _readme_block("On your machine")
  assert re.search(r"^make demo\b", block, re.M) and re.search(r"^make test\b", block, re.M)
  # `make demo` is the README's first command line, run by the venv's python.
  train_line = next(line for line in _readme_block("The command line").splitlines()
                    if line.startswith("python -m glip_jax.main"))
  assert train_line == "python -m glip_jax.main --config=configs/demo.py --workdir=runs/demo"
  demo_lines = _make_n("demo")
  assert f".venv/bin/{train_line}" in demo_lines
  # WORKDIR and DEMO_FLAGS (README: "make demo WORKDIR=runs/other", "DEMO_FLAGS=...").
  lines = _make_n("demo", "WORKDIR=runs/other", "DEMO_FLAGS=--config.total_steps=100")
  assert (".venv/bin/python -m glip_jax.main --config=configs/demo.py --workdir=runs/other "
          "--config.total_steps=100") in lines
  # Two xdist workers by default (CI's two cores); PYTEST_WORKERS=0 runs in-process.
  assert ".venv/bin/python -m pytest -q -n 2 --dist worksteal" in _make_n("test")
  assert ".venv/bin/python -m pytest -q -n 0 --dist worksteal" in _make_n("test", "PYTEST_WORKERS=0")
  assert ".venv/bin/python -m pytest -q -m slow" in _make_n("test-slow")
  assert ".venv/bin/python tools/benchmark.py --config=configs/demo.py" in _make_n("benchmark")
  # Every target installs from the lock first (the README's "exact tested versions").
  assert any("pip install -q -c requirements.lock -e '.[test]'" in line for line in demo_lines)


def test_ci_runs_the_suite_the_demo_as_written_and_the_slow_tests():
  path = os.path.join(REPO, ".ci", "run")
  assert subprocess.run(["bash", "-n", path]).returncode == 0  # it parses
  lines = [line.strip() for line in open(path)
           if line.strip() and not line.lstrip().startswith("#")]
  assert "make test" in lines
  demo_index = next(i for i, line in enumerate(lines) if line.startswith("make demo "))
  assert "--workdir" not in lines[demo_index]  # the README's default relative runs/demo
  assert "grep -q \"Run summary: $(pwd)/runs/demo\" /tmp/demo.out" in lines
  slow = lines.index((
      ".venv/bin/python -m pytest -v -m slow -n 2 --dist worksteal --durations=15 || rc=$?"))
  assert lines.index("make test") < demo_index < slow
  # The slow demo test checks that very run rather than training the demo again.
  export = next(i for i, line in enumerate(lines) if line.startswith("export GLIP_DEMO_WORKDIR="))
  assert demo_index < export < slow


# ----------------------------------------------------------------------------------------------
# Mixture weights over many batches and across a resume (the pipeline alone).

@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
  """Two ArrayRecord files whose labels say which one a row came from (0..9 and 100..109)."""
  from array_record.python.array_record_module import ArrayRecordWriter

  directory = tmp_path_factory.mktemp("mix")
  globs = []
  for name, base in (("a", 0), ("b", 100)):
    writer = ArrayRecordWriter(str(directory / f"{name}.array_record"), "group_size:1")
    for i in range(10):
      buffer = io.BytesIO()
      Image.fromarray(np.full((12, 12, 3), i * 20, np.uint8)).save(buffer, format="PNG")
      writer.write(records.encode_record(buffer.getvalue(), [f"c {i}"], f"{name}{i}", base + i))
    writer.close()
    globs.append(str(directory / f"{name}.array_record"))
  return globs


def _mixture_iterator(globs, weights):
  cfg = data_config_lib.default_data_config()
  components = []
  for path, weight in zip(globs, weights):
    source = data_config_lib.default_source_config()
    source.source, source.paths = "arrayrecord", path
    components.append((source, weight))
  cfg.mixture = components
  cfg.read_threads = 1
  return pipeline.make_train_iterator(
      cfg, global_batch_size=16, image_size=8, seed=0, tokenizer=Tokenizer(context_length=4),
      shard_options=grain.sharding.ShardOptions(0, 1, drop_remainder=True))


def _share_of_b(batches):
  labels = np.concatenate([b["label"] for b in batches])
  assert set(np.unique(labels)) <= set(range(10)) | set(range(100, 110))
  return int((labels >= 100).sum()), labels.size


def _binomial_bound(n, p, sigmas=4.0):
  return sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.slow  # ~700 examples through Grain: seconds on 2 cores, too many for `make test`
def test_mixture_proportions_over_many_batches_and_across_a_resume(two_sources):
  it = _mixture_iterator(two_sources, (1.0, 3.0))
  first = [next(it) for _ in range(12)]
  state = it.get_state()
  rest = [next(it) for _ in range(12)]
  from_b, n = _share_of_b(first + rest)
  # 384 rows at p = 0.75: the bound is ±34 rows (a 50/50 mixture is 96 off, a swapped one 192).
  assert abs(from_b - 0.75 * n) <= _binomial_bound(n, 0.75)
  for batch in first + rest:  # every batch, not only the total, follows the weights
    assert abs((batch["label"] >= 100).sum() - 12) <= _binomial_bound(16, 0.75)
  resumed = _mixture_iterator(two_sources, (1.0, 3.0))
  resumed.set_state(state)
  again = [next(resumed) for _ in range(12)]
  for want, got in zip(rest, again):
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(got["image"], want["image"])
  from_b, n = _share_of_b(again)
  assert abs(from_b - 0.75 * n) <= _binomial_bound(n, 0.75)
  # Other weights give other proportions (the check above is not vacuous).
  other = _mixture_iterator(two_sources, (3.0, 1.0))
  from_b, n = _share_of_b([next(other) for _ in range(8)])
  assert abs(from_b - 0.25 * n) <= _binomial_bound(n, 0.25)


# ----------------------------------------------------------------------------------------------
# Training runs (slow): one reference, and variants that must train like it.

def _tiny(arg="", **overrides):
  config = _non_square(tiny_config(arg))
  config.total_steps = 3
  config.checkpoint_every_steps = 0  # one checkpoint, at the end
  return _set(config, **overrides)


def _small_evals(arg, names):
  evals = demo.get_config(arg).evals
  out = {}
  for name in names:
    entry = evals[name]
    entry.update(batch_size=16, every_steps=3)
    entry.dataset.synthetic.eval_size = 32
    out[name] = entry
  return out


def _train(tmp_path_factory, name, config):
  workdir = str(tmp_path_factory.mktemp(name))
  summary = train.train_and_evaluate(config, workdir)
  return workdir, summary


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """3 steps of the tiny model on 48×32 images, Gaussian masking at 50%, evaluated at the end."""
  config = _tiny()
  # Zero-shot with the training (Gaussian) masking on the 6×4 grid, and retrieval unmasked.
  config.evals = _small_evals("", ["shape_masked", "retrieval"])
  return _train(tmp_path_factory, "reference", config)


@pytest.mark.slow
def test_non_square_images_train_with_gaussian_masking_and_evaluate(reference):
  workdir, summary = reference
  assert sorted(read_losses(workdir)) == [1, 2, 3]
  assert all(np.isfinite(v) for v in read_losses(workdir).values())
  assert summary["kept_tokens"] == 12  # half of the 6×4 grid
  for key in ("eval/shape_masked/zeroshot_top1", "eval/retrieval/i2t_recall_at_1"):
    assert 0.0 <= summary[key] <= 1.0
  assert checkpointing.load_config(workdir)["model"]["image_size"] == list(NON_SQUARE)


@pytest.mark.slow
def test_non_square_images_train_with_aclip_and_evaluate(tmp_path_factory):
  config = _tiny("aclip", total_steps=2)
  config.evals = _small_evals("aclip", ["shape"])
  config.evals.shape.every_steps = 2
  workdir, summary = _train(tmp_path_factory, "aclip", config)
  assert sorted(read_losses(workdir)) == [1, 2]
  # 6×4 grid in 2×2 blocks = 3×2 blocks; the top ceil(6 · 0.5) = 3 blocks = 12 patches per view.
  assert summary["kept_tokens"] == 12
  assert np.isfinite(summary["loss_simclr"]) and np.isfinite(summary["loss_byol"])
  assert 0.0 <= summary["eval/shape/zeroshot_top1"] <= 1.0


def _compare(workdir, reference_dir, key, rtol, atol=0.0):
  got, want = _per_step(workdir, key), _per_step(reference_dir, key)
  assert sorted(got) == sorted(want) == [1, 2, 3]
  for step in want:
    print(f"{key} step {step}: {got[step]!r} vs {want[step]!r} "
          f"(diff {abs(got[step] - want[step]):.3g})")
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_tensor_parallel_mesh_trains_like_data_parallel(reference, tmp_path_factory):
  config = _tiny(mesh__data=-1, mesh__tensor=2)  # 4 × data, 2 × tensor
  spec = run_spec.build(config)
  assert dict(spec.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  # The run is not data-parallel in disguise: some parameters are split over 'tensor'.
  from glip_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  params = sharding_lib.abstract_params(clip_lib.build_model(config.model), config.model,
                                        spec.mesh)
  assert any("tensor" in jax.tree.leaves(tuple(p.sharding.spec)) for p in jax.tree.leaves(params))
  workdir, _ = _train(tmp_path_factory, "tensor", config)
  # Same batches, same math; only the reduction order of the split matmuls differs (float32).
  _compare(workdir, reference[0], "loss", rtol=1e-5)
  _compare(workdir, reference[0], "grad_norm", rtol=1e-5)


@pytest.mark.slow
def test_remat_training_step_equals_the_plain_one(reference, tmp_path_factory):
  workdir, _ = _train(tmp_path_factory, "remat", _tiny(model__remat=True))
  # Rematerialisation recomputes the same float32 ops in the backward pass.
  _compare(workdir, reference[0], "loss", rtol=1e-6)
  _compare(workdir, reference[0], "grad_norm", rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_training_step_is_close_to_float32(reference, tmp_path_factory):
  workdir, _ = _train(tmp_path_factory, "bf16", _tiny(model__dtype="bfloat16"))
  # bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8. The logits and the loss are float32,
  # so the loss carries the towers' rounding: within 2u of float32 (measured 0.19%). The gradient
  # also goes through the bf16 backward pass: within 8u (measured 0.7%).
  _compare(workdir, reference[0], "loss", rtol=2 * 2**-8)
  _compare(workdir, reference[0], "grad_norm", rtol=8 * 2**-8)
  assert read_losses(workdir)[1] != read_losses(reference[0])[1]  # the compute dtype did change


@pytest.mark.slow
def test_grain_worker_processes_inside_the_trainer_give_the_same_run(reference, tmp_path_factory):
  workdir, _ = _train(tmp_path_factory, "workers",
                      _tiny(data__worker_count=2, data__worker_buffer_size=1))
  assert read_losses(workdir) == read_losses(reference[0])  # bit-identical batches and steps


def _opt_states(config, *workdirs):
  """The optimizer state saved in each workdir (one abstract state for all)."""
  spec = run_spec.build(config)
  model = clip_lib.build_model(config.model)
  tx, _ = train_step_lib.make_optimizer(config.optim, spec.total_steps)
  state, shardings = spec.method.create_train_state(model, tx, config.model, spec.mesh,
                                                    config.seed, spec.method_spec)
  abstract = checkpointing.abstract_like(state, shardings).opt_state
  return [checkpointing.restore_subtrees(w, {"opt_state": abstract})["opt_state"]
          for w in workdirs]


def _counts(opt_state):
  leaves = jax.tree_util.tree_leaves_with_path(opt_state)
  return sorted({int(v) for path, v in leaves if "count" in jax.tree_util.keystr(path)})


@pytest.mark.slow
def test_init_from_with_the_optimizer_state_continues_adam(reference, tmp_path_factory):
  config = _tiny(init_from__path=reference[0], init_from__optimizer_state=True, total_steps=1)
  workdir, _ = _train(tmp_path_factory, "opt_state", config)
  before, after = _opt_states(config, reference[0], workdir)
  assert _counts(before) == [3]
  assert _counts(after) == [4]  # Adam's step count went on from the 3 restored steps, not from 0
  # Adam's moments went on from the restored ones. The step's gradient was clipped to norm
  # exactly 1 (its raw norm is > 1), so with g that clipped gradient:
  #   ‖mu_after − b1 · mu_before‖ = (1 − b1) · ‖g‖ = 1 − b1,
  #   Σ (nu_after − b2 · nu_before) = (1 − b2) · ‖g‖² = 1 − b2.
  # From a fresh state (mu = nu = 0) the second would be off by b2 · Σ nu_before.
  assert _per_step(workdir, "grad_norm")[1] > config.optim.grad_clip_norm == 1.0
  b1, b2 = config.optim.b1, config.optim.b2

  def moments(state, name):
    return [np.asarray(v, np.float64) for p, v in jax.tree_util.tree_leaves_with_path(state)
            if f".{name}" in jax.tree_util.keystr(p)]

  mu_b, mu_a, nu_b, nu_a = (moments(before, "mu"), moments(after, "mu"), moments(before, "nu"),
                            moments(after, "nu"))
  assert mu_b and len(mu_b) == len(mu_a) == len(nu_b) == len(nu_a)
  mu_step = math.sqrt(sum(((a - b1 * b) ** 2).sum() for a, b in zip(mu_a, mu_b)))
  nu_step = sum((a - b2 * b).sum() for a, b in zip(nu_a, nu_b))
  assert mu_step == pytest.approx(1 - b1, rel=1e-3)
  assert nu_step == pytest.approx(1 - b2, rel=1e-3)
  assert b2 * sum(b.sum() for b in nu_b) > 1 - b2  # restoring nothing would break the check


@pytest.mark.slow
def test_sigmoid_loss_trains_and_the_loss_falls(tmp_path_factory):
  config = _tiny(loss__kind="sigmoid", model__logit_bias_init=-10.0,
                 model__logit_scale_init=math.log(10.0), total_steps=6)
  workdir, _ = _train(tmp_path_factory, "sigmoid", config)
  losses = read_losses(workdir)
  assert sorted(losses) == list(range(1, 7))
  # SigLIP's loss at init: positives cost −log σ(10·cos − 10) ≈ 10 − 10·cos with the untrained
  # cosines near 0, each of the 15 negatives per row only ≈ e^−10; so ≈ 10 (softmax: ≈ log 16).
  assert 9.0 < losses[1] < 11.5
  assert losses[6] < 0.6 * losses[1]


# ----------------------------------------------------------------------------------------------
# The README's commands through glip_jax.main, and the benchmark (subprocesses; slow).

ENV_2 = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
# The tiny model, 6 steps with a checkpoint every 2, the demo's evaluators on 64 test images
# (in-loop at step 6 in the default mode).
CLI_FLAGS = ([f"--config.{k}={v}" for k, v in OVERRIDES.items()
              if k not in ("total_steps", "checkpoint_every_steps")]
             + ["--config.total_steps=6", "--config.checkpoint_every_steps=2"]
             + [f"--config.evals.{name}.{field}={value}"
                for name in ("shape", "retrieval", "shape_masked")
                for field, value in (("batch_size", 64), ("dataset.synthetic.eval_size", 64),
                                     ("every_steps", 6))])


def _readme_commands():
  """The README's `python -m glip_jax.main` lines on the demo config, by what they do."""
  lines = [line for line in _readme_block("The command line").splitlines()
           if line.startswith("python -m glip_jax.main --config=configs/demo.py ")]
  by_role = {"train": [l for l in lines if "--mode" not in l and "demo.py:" not in l],
             "watch": [l for l in lines if l.endswith("--mode=eval")],
             "one": [l for l in lines if "--mode=eval --checkpoint=" in l]}
  assert all(len(v) == 1 for v in by_role.values()), lines
  return {role: [sys.executable] + shlex.split(v[0])[1:] for role, v in by_role.items()}


def _eval_metrics(path, step):
  rows = [r for r in logging_lib.read_metrics_jsonl(path) if r["step"] == step]
  return {k.split("/", 1)[1] if k.startswith("eval/") else k: v
          for row in rows for k, v in row.items() if "zeroshot" in k or "recall" in k}


@pytest.mark.slow
def test_readme_commands_default_mode_with_a_watcher_running_then_one_checkpoint(tmp_path):
  """The README's train line (default mode: train + in-loop eval) with the README's watcher line
  running beside it while checkpoints are written, then its --checkpoint line."""
  commands = _readme_commands()
  os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")  # `--config=configs/demo.py`
  logs = {role: open(tmp_path / f"{role}.log", "w") for role in ("train", "watch")}
  procs = {role: subprocess.Popen(commands[role] + CLI_FLAGS, cwd=tmp_path, env=ENV_2,
                                  stdout=logs[role], stderr=subprocess.STDOUT)
           for role in ("train", "watch")}
  try:
    for role in ("train", "watch"):
      assert procs[role].wait(timeout=500) == 0, (tmp_path / f"{role}.log").read_text()[-3000:]
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
    for log in logs.values():
      log.close()
  workdir = tmp_path / "runs" / "demo"
  assert checkpointing.all_steps(workdir / "checkpoints") == [2, 4, 6]
  assert sorted(read_losses(str(workdir))) == list(range(1, 7))
  # The default mode evaluated in the loop (--mode=train would not have).
  in_loop = _eval_metrics(workdir / logging_lib.METRICS_FILENAME, 6)
  assert {"shape/zeroshot_top1", "retrieval/i2t_recall_at_1",
          "shape_masked/zeroshot_top1"} <= set(in_loop)
  # The watcher evaluated every checkpoint while the trainer wrote them, and exited after the
  # last; its step-6 numbers are the trainer's (same parameters, same evaluators).
  assert json.loads((workdir / "eval" / "evaluated.json").read_text())["steps"] == [2, 4, 6]
  watched = _eval_metrics(workdir / "eval" / logging_lib.METRICS_FILENAME, 6)
  assert set(watched) == set(in_loop)
  for key, value in in_loop.items():
    assert watched[key] == pytest.approx(value, abs=1e-6), key
  assert "zeroshot_top1" in (tmp_path / "watch.log").read_text()  # its summary table

  one = subprocess.run(commands["one"] + CLI_FLAGS, cwd=tmp_path, env=ENV_2, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=400)
  assert one.returncode == 0, one.stdout[-3000:]
  assert f"{workdir}/checkpoints/6 (step 6)" in one.stdout and "chance" in one.stdout
  value = f"{in_loop['shape/zeroshot_top1']:.4f}"[:5]
  assert re.search(r"zeroshot_top1\s+" + re.escape(value), one.stdout), one.stdout[-2000:]


@pytest.mark.slow
def test_benchmark_one_row_smoke_run():
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  args = [sys.executable, "tools/benchmark.py", "--config=configs/demo.py", "--ratios=0",
          "--steps=1", "--warmup=0", "--json", *flags]
  run = subprocess.run(args, cwd=REPO, env=ENV_2, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=400)
  assert run.returncode == 0, run.stdout[-3000:]
  rows = json.loads(run.stdout.strip().splitlines()[-1])
  assert len(rows) == 1
  row = rows[0]
  assert row["ratio"] == 0.0 and row["kept_tokens"] == 16  # 32-px images, 8-px patches: 4×4
  assert row["speedup_measured"] == row["speedup_analytic"] == 1.0
  assert row["examples_per_s"] == pytest.approx(16 / row["step_time_s"])
  assert row["train_gflops_per_example"] > 0 and row["compile_s"] > 0
  assert re.search(r"^\s+0\.0\s+16\s", run.stdout, re.M)  # the printed table's one row
