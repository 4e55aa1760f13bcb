"""Webdataset source: the converter's examples, skips and counts, sidecar index, globbing, and
through the training pipeline: exact mid-shard resume and disjoint process shards."""

import io
import json
import os
import sys
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from glip_jax.data import config as config_lib
from glip_jax.data import pipeline
from glip_jax.data import sources
from glip_jax.data import webdataset
from glip_jax.data.tokenizer import Tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))

import make_arrayrecord  # noqa: E402

N = 20  # good examples in the clean fixture; example i has label i (a .cls member).
PER_SHARD = (7, 7, 6)


def _jpeg(value: int, size=(28, 20)) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_example(tar, key, i, caption=None):
  _add(tar, f"{key}.jpg", _jpeg(i * 10))
  _add(tar, f"{key}.txt", (caption if caption is not None else f"photo {i}").encode())
  _add(tar, f"{key}.json", json.dumps({"url": f"http://x/{i}", "width": 28}).encode())
  _add(tar, f"{key}.cls", str(i).encode())


@pytest.fixture(scope="module")
def clean_glob(tmp_path_factory):
  directory = tmp_path_factory.mktemp("wds")
  i = 0
  for shard, count in enumerate(PER_SHARD):
    with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
      for _ in range(count):
        _write_example(tar, f"{shard:05d}{i:04d}", i)
        i += 1
  return str(directory / "*.tar")


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer(context_length=8)


def _messy_tar(path):
  """Good examples mixed with every kind of incomplete one the converter skips."""
  with tarfile.open(path, "w") as tar:
    _write_example(tar, "000", 1)
    _add(tar, "001.jpg", _jpeg(2))  # Caption only in the json, as img2dataset can write it.
    _add(tar, "001.json", json.dumps({"caption": "from json", "url": "u"}).encode())
    _add(tar, "002.jpg", _jpeg(3))  # No caption at all.
    _add(tar, "002.json", json.dumps({"url": "u"}).encode())
    _add(tar, "003.txt", b"no image")  # Missing image.
    _write_example(tar, "004", 4, caption="   ")  # Blank caption.
    _add(tar, "005.jpg", _jpeg(5)[:60])  # Header parses, decode fails.
    _add(tar, "005.txt", b"a broken file")
    _write_example(tar, "006", 6)


def test_same_examples_as_the_converter(tmp_path):
  _messy_tar(tmp_path / "00000.tar")
  # Without the (costly) image check the undecodable image comes through; it fails clearly when
  # decoded (transforms.UndecodableImageError).
  unverified = webdataset.WebDatasetSource(str(tmp_path / "*.tar"))
  assert [unverified[i]["key"] for i in range(len(unverified))] == [
      "00000/000",
      "00000/001",
      "00000/005",
      "00000/006",
  ]
  assert "undecodable_image" not in unverified.skipped
  out = tmp_path / "ar"
  summary = make_arrayrecord.main(
      ["--input_format=webdataset", f"--input={tmp_path}/*.tar", f"--output_dir={out}"]
  )
  converted = sources.ArrayRecordSource(str(out / "data-*.array_record"))
  # verify_images re-indexes (the sidecar above was not verified) and then matches exactly.
  source = webdataset.WebDatasetSource(str(tmp_path / "*.tar"), verify_images=True)
  assert len(source) == len(converted) == 3
  for i in range(3):
    assert source[i] == converted[i]
  assert dict(source.skipped) == summary["skipped"] == {
      "empty_caption": 2,
      "missing_image": 1,
      "undecodable_image": 1,
  }


@pytest.mark.parametrize("cut", ["in_data", "in_header"])
def test_truncated_shard_keeps_complete_examples_and_counts(tmp_path, cut):
  with tarfile.open(tmp_path / "full.tar", "w") as tar:
    for i in range(3):
      _write_example(tar, f"{i:03d}", i)
  data = (tmp_path / "full.tar").read_bytes()
  with tarfile.open(tmp_path / "full.tar") as tar:
    last = [m for m in tar.getmembers() if m.name.startswith("002")]
  # Cut inside the last example's image bytes, or inside the header of its .txt member.
  end = last[0].offset_data + 10 if cut == "in_data" else last[1].offset + 100
  (tmp_path / "cut.tar").write_bytes(data[:end])
  source = webdataset.WebDatasetSource(str(tmp_path / "cut.tar"))
  assert [source[i]["key"] for i in range(len(source))] == ["cut/000", "cut/001"]
  assert dict(source.skipped) == {"truncated": 1}


def test_sidecar_index_is_reused_and_rebuilt_when_stale(tmp_path):
  with tarfile.open(tmp_path / "a.tar", "w") as tar:
    _write_example(tar, "000", 0)
  webdataset.WebDatasetSource(str(tmp_path / "a.tar"))
  sidecar = tmp_path / f"a.tar{webdataset.INDEX_SUFFIX}"
  index = json.loads(sidecar.read_text())
  assert index["fingerprint"].startswith(f"{os.path.getsize(tmp_path / 'a.tar')}:")
  assert [key for key, _ in index["examples"]] == ["000"]
  # A copy keeps its index; a rewritten shard (here of the same size: tars pad to 10 KiB) is
  # re-indexed, not read at stale offsets.
  mtime = sidecar.stat().st_mtime_ns
  os.utime(tmp_path / "a.tar", ns=(1, 1))
  webdataset.WebDatasetSource(str(tmp_path / "a.tar"))
  assert sidecar.stat().st_mtime_ns == mtime
  with tarfile.open(tmp_path / "a.tar", "w") as tar:
    _write_example(tar, "000", 0, caption="a much longer caption than before")
    _write_example(tar, "001", 1)
  source = webdataset.WebDatasetSource(str(tmp_path / "a.tar"))
  assert len(source) == 2 and source[0]["captions"] == ["a much longer caption than before"]


def test_index_goes_to_index_dir_when_the_shard_directory_refuses_it(tmp_path):
  with tarfile.open(tmp_path / "a.tar", "w") as tar:
    _write_example(tar, "000", 0)
  # A directory where the sidecar would go makes that location unwritable (even for root).
  (tmp_path / f"a.tar{webdataset.INDEX_SUFFIX}").mkdir()
  cache = tmp_path / "cache"
  source = webdataset.WebDatasetSource(str(tmp_path / "a.tar"), index_dir=str(cache))
  assert len(source) == 1
  written = list(cache.iterdir())
  assert len(written) == 1 and written[0].name.startswith("a.tar-")
  assert sorted(os.listdir(tmp_path)) == ["a.tar", f"a.tar{webdataset.INDEX_SUFFIX}", "cache"]


def test_globs_ranges_and_errors(clean_glob):
  directory = os.path.dirname(clean_glob)
  by_range = webdataset.expand_shards(os.path.join(directory, "{00000..00002}.tar"))
  assert by_range == webdataset.expand_shards(clean_glob) == webdataset.expand_shards(
      [os.path.join(directory, f"0000{i}.tar") for i in range(3)]
  )
  with pytest.raises(FileNotFoundError, match="matches no webdataset shard"):
    webdataset.expand_shards(os.path.join(directory, "*.tgz"))
  with pytest.raises(ValueError, match="empty"):
    webdataset.expand_shards("")
  cfg = config_lib.default_data_config()
  cfg.source = "webdataset"
  with pytest.raises(ValueError, match="config.data.paths=''.*webdataset"):
    config_lib.validate_data_config(cfg)


def test_records_and_order(clean_glob):
  source = webdataset.WebDatasetSource(clean_glob)
  assert len(source) == N and "3 shards, 20 examples, 0 skipped" in repr(source)
  record = source[9]
  assert record["key"] == "00001/000010009" and record["captions"] == ["photo 9"]
  assert record["label"] == 9 and record["metadata"] == {"url": "http://x/9", "width": 28}
  pixels = np.asarray(Image.open(io.BytesIO(record["image_bytes"])))
  assert pixels.mean() == pytest.approx(90, abs=2)
  with pytest.raises(IndexError):
    source[N]


def _config(paths):
  cfg = config_lib.default_data_config()
  cfg.source, cfg.paths = "webdataset", paths
  return cfg


def _train(cfg, tokenizer, process=0, count=1, batch=6):
  return pipeline.make_train_iterator(
      cfg,
      global_batch_size=batch,
      image_size=16,
      seed=0,
      tokenizer=tokenizer,
      shard_options=grain.sharding.ShardOptions(process, count, drop_remainder=True),
  )


def test_exact_resume_mid_shard(clean_glob, tokenizer):
  cfg = _config(clean_glob)
  it = _train(cfg, tokenizer)
  for _ in range(2):  # 12 of 20 examples: the position is inside the second epoch's shards.
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # Crosses the epoch boundary.
  restored = _train(cfg, tokenizer)  # A fresh process would build exactly this.
  restored.set_state(json.loads(json.dumps(state)) if isinstance(state, dict) else state)
  for want in expected:
    got = next(restored)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_two_processes_see_disjoint_halves_of_the_epoch(clean_glob, tokenizer):
  cfg = _config(clean_glob)
  seen = []
  for process in range(2):
    it = _train(cfg, tokenizer, process, 2, batch=10)  # local batch 5; an epoch is 2 batches.
    labels = np.concatenate([next(it)["label"] for _ in range(2)]).tolist()
    assert len(set(labels)) == N // 2
    seen.append(set(labels))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(N))


_KILLED_CHILD = r"""
import hashlib, os, signal, sys
from absl import flags
flags.FLAGS.mark_as_parsed()
import grain
from etils import epath
sys.path.insert(0, {tests!r})
import test_webdataset as t
from glip_jax.data.tokenizer import Tokenizer
it = t._train(t._config({paths!r}), Tokenizer(context_length=8))
for _ in range(2):
  next(it)
grain.checkpoint.CheckpointHandler().save(
    epath.Path({ckpt!r}), args=grain.checkpoint.CheckpointSave(it))
with open({out!r}, "w") as f:
  for _ in range(3):
    f.write(hashlib.sha1(next(it)["image"].tobytes()).hexdigest() + "\n")
os.kill(os.getpid(), signal.SIGKILL)  # No clean-up, no atexit: as a preempted host.
"""


def test_resume_after_kill_9(clean_glob, tokenizer, tmp_path):
  import hashlib
  import subprocess

  from etils import epath

  ckpt, out = tmp_path / "data", tmp_path / "hashes.txt"
  ckpt.mkdir()
  code = _KILLED_CHILD.format(
      tests=os.path.dirname(__file__), paths=clean_glob, ckpt=str(ckpt), out=str(out)
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
  assert child.returncode == -9, child.stderr.decode()[-2000:]
  restored = _train(_config(clean_glob), tokenizer)
  grain.checkpoint.CheckpointHandler().restore(
      epath.Path(ckpt), args=grain.checkpoint.CheckpointRestore(restored)
  )
  got = [hashlib.sha1(next(restored)["image"].tobytes()).hexdigest() for _ in range(3)]
  assert got == out.read_text().split()
