"""Faults end to end (issue 12): bad records skipped and counted, damaged checkpoints, non-finite
steps. The shard is written with the record writer directly, as a user's own tool would."""

import io
import json
import os
import struct
import subprocess
import zlib

import grain
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from PIL import Image

from glip_jax import checkpointing as ck
from glip_jax import logging as logging_lib
from glip_jax import train
from glip_jax.data import config as config_lib
from glip_jax.data import pipeline
from glip_jax.data import records
from glip_jax.data import transforms
from glip_jax.data.tokenizer import Tokenizer

N = 32  # records in the shard; record i has label i
BAD = {3: "undecodable_image", 5: "undecodable_image", 7: "empty_caption", 11: "missing_field"}
PER_EPOCH = {"undecodable_image": 2, "empty_caption": 1, "missing_field": 1, "unreadable_record": 0}


def _jpeg(i, size=(20, 28)):
  buffer = io.BytesIO()
  Image.fromarray(np.full((*size, 3), i * 7 % 256, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def write_shard(path, bad_indices=BAD, n=N):
  """n records, record i labelled i; the `bad_indices` broken the way BAD names."""
  from array_record.python.array_record_module import ArrayRecordWriter

  writer = ArrayRecordWriter(str(path), "group_size:1")
  for i in range(n):
    kind = bad_indices.get(i) if isinstance(bad_indices, dict) else (
        ("undecodable_image", "empty_caption", "missing_field")[i % 3] if i in bad_indices else None)
    if kind == "undecodable_image":
      image = b"<html>not an image</html>" if i == 5 else _jpeg(i)[:200]  # not one / truncated
      writer.write(records.encode_record(image, [f"caption {i}"], f"k{i}", i))
    elif kind == "empty_caption":
      writer.write(records.encode_record(_jpeg(i), [""], f"k{i}", i))
    elif kind == "missing_field":  # a foreign writer that forgot the captions
      writer.write(msgpack.packb({"v": 1, "image": _jpeg(i), "key": f"k{i}", "label": i},
                                 use_bin_type=True))
    else:
      writer.write(records.encode_record(_jpeg(i), [f"caption {i}"], f"k{i}", i))
  writer.close()
  return str(path)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
  return write_shard(tmp_path_factory.mktemp("bad") / "bad.array_record")


def _data_config(paths, **overrides):
  cfg = config_lib.default_data_config()
  cfg.update({**dict(source="arrayrecord", paths=paths, read_threads=1, max_skip_fraction=0.5,
                     skip_window=1000), **overrides})
  return cfg


def _iterator(cfg, seed=0):
  return pipeline.make_train_iterator(cfg, global_batch_size=16, image_size=16, seed=seed,
                                      tokenizer=Tokenizer(context_length=8))


def test_bad_records_are_replaced_by_the_next_good_one_and_counted_exactly(shard):
  it = _iterator(_data_config(shard))
  batches = [next(it) for _ in range(4)]  # two epochs of the 32 records
  counts = pipeline.skip_counts(it.get_state())
  assert counts == {r: 2 * n for r, n in PER_EPOCH.items()}
  assert set(batches[0]) == {"image", "text", "label"}  # the skip fields stay on the host
  # The replacement rule: position p of the shuffled order holds the first good record at or
  # after p (grain's shuffle of the source, then repeat; pipeline._seed(seed, component, 0)).
  order = grain.MapDataset.range(N).shuffle(seed=pipeline._seed(0, 0, 0)).repeat()[:80]
  order = [order[q] for q in range(80)]
  expected = [next(order[q] for q in range(p, len(order)) if order[q] not in BAD)
              for p in range(64)]
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), expected)


def test_counts_and_batches_resume_exactly(shard):
  cfg = _data_config(shard)
  it = _iterator(cfg)
  next(it)
  state = it.get_state()
  after = [next(it) for _ in range(3)]
  resumed = _iterator(cfg)
  resumed.set_state(state)
  for a, b in zip(after, [next(resumed) for _ in range(3)]):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  assert pipeline.skip_counts(resumed.get_state()) == pipeline.skip_counts(it.get_state())
  plain = _iterator(cfg)  # a state saved before skips were counted (the inner state only)
  plain.set_state(state["pipeline"])
  np.testing.assert_array_equal(next(plain)["label"], after[0]["label"])


def test_the_ceiling_stops_a_mostly_corrupt_shard_naming_the_records(tmp_path):
  path = write_shard(tmp_path / "mostly_bad.array_record", bad_indices=set(range(4, 16)), n=16)
  it = _iterator(_data_config(path, max_skip_fraction=0.1, skip_window=64))
  with pytest.raises(pipeline.TooManySkipsError) as err:
    next(it)
  message = str(err.value)
  assert "data.max_skip_fraction=0.1" in message and "data.skip_window=64" in message
  assert path in message  # the source, by its shard
  named = {int(x.split(" ")[0]) for x in message.split("records ")[1].split(". ")[0].split(", ")}
  assert named and named <= set(range(4, 16))  # the indices of skipped records


def test_an_all_broken_source_fails_instead_of_searching_forever(tmp_path):
  path = write_shard(tmp_path / "broken.array_record", bad_indices=set(range(8)), n=8)
  with pytest.raises(pipeline.TooManySkipsError, match=r"65 consecutive records of .*broken"):
    next(_iterator(_data_config(path, max_skip_fraction=1.0)))


def test_evaluation_pads_bad_records_out(shard):
  cfg = _data_config(shard)
  batches = list(pipeline.make_eval_batches(cfg, batch_size=8, image_size=16,
                                            tokenizer=Tokenizer(context_length=8)))
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert sorted(labels[mask]) == sorted(set(range(N)) - set(BAD))


def _png_claiming(width, height):
  """A PNG whose header claims width × height (the CRC fixed, so only the size is wrong)."""
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(buffer, format="PNG")
  data = bytearray(buffer.getvalue())
  ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
  return bytes(data)


@pytest.mark.parametrize("width,height", [(0, 5), (12_000, 9_000)])
def test_zero_sized_and_absurd_dimensions_are_undecodable(width, height):
  with pytest.raises(transforms.UndecodableImageError) as err:
    transforms.random_resized_crop(_png_claiming(width, height), np.random.default_rng(0), 16)
  assert err.value.reason == "undecodable_image"


def test_record_checks():
  good = {"image_bytes": b"x", "captions": [" a cat ", "  "], "label": 1, "key": "k"}
  assert records.checked(good, need_caption=True)["captions"] == ["a cat"]
  for record, reason in [({**good, "captions": ["", " \n"]}, "empty_caption"),
                         ({k: v for k, v in good.items() if k != "captions"}, "missing_field"),
                         ({k: v for k, v in good.items() if k != "image_bytes"}, "missing_field"),
                         ({**good, "image_bytes": b""}, "undecodable_image")]:
    with pytest.raises(records.BadRecordError) as err:
      records.checked(record, need_caption=True)
    assert err.value.reason == reason
  assert records.checked({**good, "captions": []}, need_caption=False)["captions"] == []
  with pytest.raises(records.BadRecordError) as err:
    records.decode_record(b"\xc1 garbage")
  assert err.value.reason == "unreadable_record"


# ------------------------------------------------------------------ damaged checkpoints


def _state(step):
  return {"w": jnp.full((64, 64), float(step)), "b": jnp.full((8,), float(step))}


def _saved(directory, steps=(1, 2, 3)):
  manager = ck.create_manager(directory, keep=10)
  for step in steps:
    ck.save(manager, step, _state(step), None, {"step": step})
  manager.wait_until_finished()
  return manager


def _truncate_arrays(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      if os.path.basename(root) == "d":  # the array data files
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  manager = _saved(tmp_path)
  abstract = ck.abstract_like(_state(0))
  _truncate_arrays(tmp_path / "3")
  os.remove(tmp_path / "2" / "state" / "manifest.ocdbt")  # a deleted file
  step, state = ck.restore_latest(manager, abstract)
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, state, _state(1))
  # Set aside, so the resumed run saves steps 2 and 3 again and nothing lists the damaged ones.
  assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged", "3.damaged"]
  assert ck.all_steps(tmp_path) == [1] and manager.all_steps() == [1]
  ck.save(manager, 2, _state(2), None, {})
  manager.wait_until_finished()
  assert ck.all_steps(tmp_path) == [1, 2]
  manager.close()


def test_no_restorable_checkpoint_is_an_error_and_renames_nothing(tmp_path):
  manager = _saved(tmp_path, steps=(1, 2))
  wrong = {"w": jax.ShapeDtypeStruct((3, 3), jnp.float32), "b": jax.ShapeDtypeStruct(
      (8,), jnp.float32)}  # e.g. a config that changed since
  with pytest.raises(ck.CheckpointRestoreError, match=r"step 2: .*step 1: .*original one"):
    ck.restore_latest(manager, jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), wrong))
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  assert ck.restore_latest(ck.create_manager(tmp_path / "empty", keep=1), {}) == (None, None)
  manager.close()


def test_an_unwritable_workdir_fails_before_any_compute(tmp_path):
  from runs import tiny_config  # pylint: disable=g-import-not-at-top

  blocker = tmp_path / "a_file"
  blocker.write_text("x")  # a workdir below a file: mkdir fails as on a read-only mount
  with pytest.raises(ck.CheckpointSaveError, match=(
      r"checkpoints is not writable \(NotADirectoryError.*\): the run cannot start\.")):
    train.train_and_evaluate(tiny_config(), str(blocker / "run"))
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


# ------------------------------------------------------------------ non-finite steps


class _State:
  def __init__(self, params):
    self.params = params


def test_non_finite_origin_names_the_batch_or_the_parameters():
  batch = {"image": jnp.zeros((2, 4, 4, 3), jnp.uint8), "box1": jnp.array([[0.0, 1.0], [2.0, 3.0]])}
  finite = _State({"w": jnp.ones(3)})
  assert "it came from the batch: its entries ['box1']" in train.nonfinite_origin(
      {**batch, "box1": batch["box1"].at[1, 0].set(jnp.nan)}, finite)
  assert train.nonfinite_origin(batch, finite) == (
      "the step's inputs are finite, so it came from the parameters/gradients (the loss or "
      "gradient overflowed)")
  assert "(the parameters are now non-finite)" in train.nonfinite_origin(
      batch, _State({"w": jnp.array([1.0, jnp.inf])}))


# ------------------------------------------------------------------ what the command line says


def test_run_stopping_errors_print_one_line_and_exit_1(capsys):
  from glip_jax import errors  # pylint: disable=g-import-not-at-top
  from glip_jax import main  # pylint: disable=g-import-not-at-top

  for cls in (pipeline.TooManySkipsError, ck.CheckpointSaveError, ck.CheckpointRestoreError,
              train.NonFiniteError):
    assert issubclass(cls, errors.RunStopped), cls
  inner = pipeline.TooManySkipsError("40 of the last 100 records\n  were skipped")
  try:
    raise RuntimeError("a Grain thread failed") from inner  # how Grain re-raises
  except RuntimeError as e:
    wrapped = e
  assert main.stopped_by(wrapped) is inner
  assert main.stopped_by(ValueError("a bug")) is None
  with pytest.raises(SystemExit) as exit_info:
    main.run_stopped(inner, argv=["glip_jax.main"])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == (
      "error: run stopped: TooManySkipsError: 40 of the last 100 records were skipped\n")


# ------------------------------------------------------------------ the trainer over the shard


def _shard_overrides(shard_path):
  return {"data.source": "arrayrecord", "data.paths": shard_path, "data.max_skip_fraction": 0.5,
          "total_steps": 8, "checkpoint_every_steps": 4}


def _train_config(shard_path):
  from runs import apply_overrides, tiny_config  # pylint: disable=g-import-not-at-top

  return apply_overrides(tiny_config(), _shard_overrides(shard_path))


def _skips(workdir):
  lines = logging_lib.read_metrics_jsonl(os.path.join(workdir, logging_lib.METRICS_FILENAME))
  return {r["step"]: {k.split("/")[-1]: v for k, v in r.items() if k.startswith("data/skipped/")}
          for r in lines if "loss" in r}


@pytest.mark.slow  # three short runs and one subprocess (~1 min); .ci/run runs it
def test_training_over_a_bad_shard_counts_exactly_and_survives_kill_9_and_damage(shard, tmp_path):
  import test_train  # pylint: disable=g-import-not-at-top  (its helpers: params, killed runs)

  straight = str(tmp_path / "straight")
  assert train.train_and_evaluate(_train_config(shard), straight)["steps"] == 8
  skips = _skips(straight)
  # 16 examples a step: step 2 ends the first epoch of the 32 records, step 8 the fourth.
  assert skips[2] == PER_EPOCH and skips[8] == {r: 4 * n for r, n in PER_EPOCH.items()}

  killed = str(tmp_path / "killed")
  test_train.run_killed_at(killed, str(tmp_path / "log"), "save:8:dispatched", extra=[
      f"--config.{k}={v}" for k, v in _shard_overrides(shard).items()])
  assert ck.all_steps(ck.checkpoint_dir(killed)) == [4]
  train.train_and_evaluate(_train_config(shard), killed)
  assert _skips(killed) == skips  # the counts resume exactly with the iterator
  test_train._compare_with_straight(killed, straight, total_steps=8)

  # The final checkpoint damaged: the next start resumes from step 4, sets 8 aside, retrains it.
  _truncate_arrays(os.path.join(ck.checkpoint_dir(killed), "8"))
  train.train_and_evaluate(_train_config(shard), killed)
  assert sorted(os.listdir(ck.checkpoint_dir(killed))) == ["4", "8", "8.damaged"]
  test_train._compare_with_straight(killed, straight, total_steps=8)

  # The eval watcher on the straight run with its step-4 checkpoint damaged: step 4 is recorded in
  # eval/damaged.json and skipped, step 8 (the final one) is evaluated, the watch ends.
  from configs import demo  # pylint: disable=g-import-not-at-top
  from glip_jax.evaluation import watcher  # pylint: disable=g-import-not-at-top
  from runs import REPO, command  # pylint: disable=g-import-not-at-top

  _truncate_arrays(os.path.join(ck.checkpoint_dir(straight), "4"))
  eval_config = _train_config(shard)
  eval_config.evals = {"shape": demo.get_config().evals.shape}
  eval_config.evals["shape"].update(batch_size=16, every_steps=4)
  eval_config.evals["shape"].dataset.synthetic.eval_size = 32
  results = watcher.run_watcher(eval_config, straight, poll_seconds=0.1, timeout_seconds=120)
  assert sorted(results) == [8]
  damaged = json.loads((watcher.eval_dir(straight) / watcher.DAMAGED_FILENAME).read_text())
  assert list(damaged) == ["4"] and damaged["4"]
  assert watcher.read_record(straight) == {8}

  # Every checkpoint damaged: the CLI stops with one line naming what it tried (exit status 1),
  # and sets nothing aside (a restart after a fix finds the same files).
  _truncate_arrays(os.path.join(ck.checkpoint_dir(killed), "4"))
  _truncate_arrays(os.path.join(ck.checkpoint_dir(killed), "8"))
  args, env = command(killed, *(f"--config.{k}={v}" for k, v in _shard_overrides(shard).items()))
  out = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  # (Interpreter shutdown may still print an asyncio "Exception ignored" after it: not ours.)
  lines = out.stderr.splitlines()
  index, line = next((i, s) for i, s in enumerate(lines) if s.startswith("error: "))
  assert line.startswith("error: run stopped: CheckpointRestoreError: "), line
  assert "step 8: " in line and "step 4: " in line
  # Not also raised as a traceback (whose last line would name the class with its module);
  # libraries' own "Exception ignored" noise in threads is not ours to assert on.
  assert not any(s.startswith(("glip_jax.checkpointing.CheckpointRestoreError",
                               "CheckpointRestoreError")) for s in lines), out.stderr[-3000:]
  assert sorted(os.listdir(ck.checkpoint_dir(killed))) == ["4", "8", "8.damaged"]
