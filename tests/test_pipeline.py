"""Pipeline: per-process shards, determinism, checkpoint/restore, worker processes, mixing, eval
padding, global arrays on the 8 fake CPU devices, config validation."""

import io

import grain
import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from PIL import Image

from glip_jax.data import config as config_lib
from glip_jax.data import pipeline
from glip_jax.data import records
from glip_jax.data.tokenizer import Tokenizer

N = 20  # records in the ArrayRecord fixture; record i has label i.


@pytest.fixture(scope="module")
def shard_glob(tmp_path_factory):
  from array_record.python.array_record_module import ArrayRecordWriter

  directory = tmp_path_factory.mktemp("ar")
  for shard in range(2):
    writer = ArrayRecordWriter(str(directory / f"s-{shard}.array_record"), "group_size:1")
    for i in range(shard * N // 2, (shard + 1) * N // 2):
      buffer = io.BytesIO()
      Image.fromarray(np.full((20, 28, 3), i * 10, np.uint8)).save(buffer, format="PNG")
      writer.write(records.encode_record(buffer.getvalue(), [f"x {i}", f"y {i}"], f"{i}", i))
    writer.close()
  return str(directory / "s-*.array_record")


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer(context_length=8)


def _ar_config(paths):
  cfg = config_lib.default_data_config()
  cfg.source, cfg.paths = "arrayrecord", paths
  return cfg


def _synthetic_config():
  cfg = config_lib.default_data_config()
  cfg.synthetic.update(dict(image_size=32, train_size=1000, eval_size=21))
  return cfg


def _train(cfg, tokenizer, process=0, count=1, seed=0, batch=10):
  return pipeline.make_train_iterator(
      cfg,
      global_batch_size=batch,
      image_size=16,
      seed=seed,
      tokenizer=tokenizer,
      shard_options=grain.sharding.ShardOptions(process, count, drop_remainder=True),
  )


def test_batch_structure(shard_glob, tokenizer):
  batch = next(_train(_ar_config(shard_glob), tokenizer))
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (10, 16, 16, 3)
  assert batch["text"].dtype == np.int32 and batch["text"].shape == (10, 8)
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (10,)
  assert set(batch) == {"image", "text", "label"}


def test_two_processes_get_disjoint_shards_covering_the_data(shard_glob, tokenizer):
  cfg = _ar_config(shard_glob)
  epoch = []
  for process in range(2):
    it = _train(cfg, tokenizer, process, 2)  # local batch 5; an epoch is 2 batches.
    labels = np.concatenate([next(it)["label"] for _ in range(2)])
    assert len(set(labels.tolist())) == N // 2
    epoch.append(set(labels.tolist()))
  assert not epoch[0] & epoch[1]
  assert epoch[0] | epoch[1] == set(range(N))


def test_shuffle_is_seeded_and_epochs_reshuffle(shard_glob, tokenizer):
  cfg = _ar_config(shard_glob)
  first = [next(_train(cfg, tokenizer, seed=s))["label"].tolist() for s in (0, 0, 1)]
  assert first[0] == first[1] and first[0] != first[2]
  it = _train(cfg, tokenizer)
  epochs = [np.concatenate([next(it)["label"] for _ in range(2)]).tolist() for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N)) and epochs[0] != epochs[1]


def test_captions_are_picked_at_random(shard_glob, tokenizer):
  it = _train(_ar_config(shard_glob), tokenizer)
  first_tokens = {int(t) for _ in range(4) for t in next(it)["text"][:, 1]}
  assert len(first_tokens) == 2  # 'x' and 'y'


def test_checkpoint_restore_gives_identical_batches(tokenizer):
  cfg = _synthetic_config()
  it = _train(cfg, tokenizer, batch=8)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  restored = _train(cfg, tokenizer, batch=8)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_worker_processes_give_the_same_batches(tokenizer):
  cfg = _synthetic_config()
  in_process = _train(cfg, tokenizer, batch=8)
  expected = [next(in_process) for _ in range(3)]
  cfg.worker_count = 2
  it = _train(cfg, tokenizer, batch=8)
  try:
    for want in expected:
      got = next(it)
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["text"], want["text"])
    state = it.get_state()
    after = next(it)
  finally:
    it.close()
  restored = _train(cfg, tokenizer, batch=8)
  try:
    restored.set_state(state)
    np.testing.assert_array_equal(next(restored)["image"], after["image"])
  finally:
    restored.close()


def test_weighted_mixture(shard_glob, tokenizer):
  ar = config_lib.default_source_config()
  ar.source, ar.paths = "arrayrecord", shard_glob
  syn = config_lib.default_source_config()
  syn.synthetic.update(dict(image_size=32, train_size=1000))
  cfg = config_lib.default_data_config()
  cfg.mixture = [(ar, 1.0), (syn, 3.0)]
  cfg.synthetic.label = "size"  # Synthetic labels (0..2) vs ArrayRecord labels (0..19).
  it = _train(cfg, tokenizer, batch=40)
  batch = next(it)
  # Mix interleaves deterministically by weight: exactly a quarter comes from the first source.
  from_ar = (batch["text"][:, 1] == Tokenizer(8)(["x"])[0, 1]) | (
      batch["text"][:, 1] == Tokenizer(8)(["y"])[0, 1]
  )
  assert from_ar.sum() == 10


def test_eval_batches_pad_and_split_over_processes(tokenizer):
  cfg = _synthetic_config()  # 21 validation examples.
  seen, counts = [], []
  for process in range(2):
    batches = list(
        pipeline.make_eval_batches(
            cfg,
            batch_size=8,
            image_size=16,
            tokenizer=tokenizer,
            split="validation",
            shard_options=grain.sharding.ShardOptions(process, 2),
        )
    )
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (4, 16, 16, 3) and b["mask"].dtype == bool
      assert b["texts"].shape == (4, 5, 8) and b["text_mask"].shape == (4, 5)
      np.testing.assert_array_equal(b["text"], b["texts"][:, 0])
      assert (b["text_mask"].sum(1) == np.where(b["mask"], 3, 0)).all()
      assert not b["image"][~b["mask"]].any() and (b["label"][~b["mask"]] == -1).all()
      seen.append(b["image"][b["mask"]])
  assert counts == [3, 3]  # 11 and 10 valid examples, each padded to 12.
  assert sum(len(s) for s in seen) == 21
  # Same images as a single-process pass (order aside): nothing dropped or duplicated.
  single = list(
      pipeline.make_eval_batches(
          cfg,
          batch_size=8,
          image_size=16,
          tokenizer=tokenizer,
          split="validation",
          shard_options=grain.sharding.ShardOptions(0, 1),
      )
  )
  flat = np.concatenate([b["image"][b["mask"]] for b in single])
  key = lambda a: sorted(x.tobytes() for x in a)  # noqa: E731
  assert key(flat) == key(np.concatenate(seen))


def test_eval_batches_carry_synthetic_labels(tokenizer):
  batch = next(
      iter(
          pipeline.make_eval_batches(
              _synthetic_config(),
              batch_size=4,
              image_size=16,
              tokenizer=tokenizer,
              split="test",
              shard_options=grain.sharding.ShardOptions(0, 1),
          )
      )
  )
  for name in ("label_shape", "label_colour", "label_size"):
    assert batch[name].dtype == np.int32
  np.testing.assert_array_equal(batch["label"], batch["label_shape"])


def test_global_batch_on_eight_devices(tokenizer):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 3)
  local = next(_train(_synthetic_config(), tokenizer, batch=16))
  batch = pipeline.make_global_batch(local, mesh)
  assert batch["image"].shape == (16, 16, 16, 3) and batch["image"].dtype == np.uint8
  spec = batch["image"].sharding.spec
  assert tuple(spec[0]) == ("data", "fsdp")
  assert len(batch["text"].addressable_shards) == 8
  assert batch["text"].addressable_shards[0].data.shape == (2, 8)
  np.testing.assert_array_equal(np.asarray(batch["text"]), local["text"])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("source", "hdf5", "config.data.source='hdf5'.*'webdataset'"),
        ("crop_scale", (0.9, 0.5), "crop_scale"),
        ("worker_count", -1, "worker_count"),
    ],
)
def test_validation_names_field_value_and_allowed(field, value, message):
  cfg = config_lib.default_data_config()
  cfg[field] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate_data_config(cfg)


def test_validation_of_sources():
  cfg = config_lib.default_data_config()
  cfg.source = "arrayrecord"
  with pytest.raises(ValueError, match="config.data.paths=''.*make_arrayrecord"):
    config_lib.validate_data_config(cfg)
  cfg = config_lib.default_data_config()
  cfg.source = "tfds"
  with pytest.raises(ValueError, match="tfds.name"):
    config_lib.validate_data_config(cfg)
  cfg = config_lib.default_data_config()
  cfg.synthetic.center_bias = 1.5
  with pytest.raises(ValueError, match="center_bias=1.5.*\\[0, 1\\]"):
    config_lib.validate_data_config(cfg)


def test_batch_size_must_divide_over_processes(tokenizer):
  with pytest.raises(ValueError, match="multiple of the process count 2"):
    _train(_synthetic_config(), tokenizer, 0, 2, batch=9)


def test_benchmark_data_smoke():
  from glip_jax.data import throughput

  result = throughput.benchmark_data(
      image_size=32, num_examples=4, synthetic_size=32, batch_size=4, batches=1, cores=1
  )
  for name in ("arrayrecord_256", "webdataset_256", "webdataset_full", "synthetic_32px"):
    assert result[f"{name}_per_core"] > 0 and result[f"{name}_all_cores_workers"] > 0
    assert result[f"cores_needed_{name}"] == pytest.approx(8 * 10_000 / result[f"{name}_per_core"])
  assert "cores needed to feed 8 devices at 10000 examples/s each" in throughput.format_results(
      result
  )
