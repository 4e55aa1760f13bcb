"""Sources: ArrayRecord round trip and path errors, TFDS (built here, read without TF) including
through the pipeline, and the synthetic source from config."""

import io
import json
import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import runs
from glip_jax.data import config as config_lib
from glip_jax.data import pipeline
from glip_jax.data import records
from glip_jax.data import sources
from glip_jax.data.tokenizer import Tokenizer


def _jpeg(value: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((24, 32, 3), value, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def _write_shards(directory, counts):
  from array_record.python.array_record_module import ArrayRecordWriter

  index = 0
  for shard, count in enumerate(counts):
    writer = ArrayRecordWriter(str(directory / f"part-{shard:05d}.array_record"), "group_size:1")
    for _ in range(count):
      writer.write(
          records.encode_record(
              _jpeg(index), [f"caption {index}", "other"], f"k{index}", label=index % 3
          )
      )
      index += 1
    writer.close()


def test_record_format_round_trip():
  data = records.encode_record(b"\xff\xd8", ["a", "b"], "key1", 4, {"url": "u"})
  assert b"pickle" not in data
  record = records.decode_record(data)
  assert record == {
      "image_bytes": b"\xff\xd8",
      "captions": ["a", "b"],
      "label": 4,
      "key": "key1",
      "metadata": {"url": "u"},
  }
  with pytest.raises(ValueError):
    records.encode_record(b"", [], "k")


def test_arrayrecord_source_glob_list_and_order(tmp_path):
  _write_shards(tmp_path, [3, 2])
  by_glob = sources.ArrayRecordSource(str(tmp_path / "part-*.array_record"))
  by_list = sources.ArrayRecordSource(sorted(str(p) for p in tmp_path.glob("*.array_record")))
  assert len(by_glob) == len(by_list) == 5
  record = by_glob[4]
  assert record["key"] == "k4" and record["captions"] == ["caption 4", "other"]
  assert record["label"] == 1 and by_list[4]["key"] == "k4"


def test_arrayrecord_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="matches no file"):
    sources.ArrayRecordSource(str(tmp_path / "*.array_record"))
  with pytest.raises(ValueError, match="empty"):
    sources.ArrayRecordSource([])


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  """Images with two captions and a label; DatasetInfo built directly (no package directory)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "label": tfds.features.ClassLabel(num_classes=4),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12), "test": self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      yield str(i), {
          "image": _jpeg(20 * i),
          "captions": [f"thing {i}", f"item {i}"],
          "label": i % 4,
      }


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  TinyCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)


def _tfds_config(data_dir, **overrides):
  cfg = config_lib.default_data_config()
  cfg.source = "tfds"
  cfg.tfds.update(
      dict(
          name="tiny_captions",
          data_dir=data_dir,
          image_key="image",
          text_key="captions",
          label_key="label",
      )
  )
  cfg.tfds.update(overrides)
  return cfg


_READ_TFDS_WITHOUT_TF = runs.NO_TENSORFLOW + textwrap.dedent("""
    import json
    from glip_jax import train  # noqa: F401  (the trainer's whole import graph)
    from glip_jax import logging as glog
    from glip_jax.data import config as config_lib
    from glip_jax.data import sources
    data_dir, workdir = sys.argv[1:]
    cfg = config_lib.default_data_config()
    cfg.source = "tfds"
    cfg.tfds.update(dict(name="tiny_captions", data_dir=data_dir, image_key="image",
                         text_key="captions", label_key="label"))
    source = sources.source_from_config(cfg)
    writer = glog.create_writer(workdir, just_logging=False)
    writer.write_scalars(1, {"n": len(source)})
    writer.close()
    print(json.dumps(dict(n=len(source), captions=source[0]["captions"], label=source[0]["label"],
                          attempts=attempts, tf_loaded="tensorflow" in sys.modules)))
""")


def test_tfds_source_reads(tfds_dir):
  source = sources.source_from_config(_tfds_config(tfds_dir))
  assert len(source) == 12
  record = source[0]
  assert isinstance(record["image_bytes"], bytes)
  i = int(record["captions"][0].split()[1])
  assert record["captions"] == [f"thing {i}", f"item {i}"] and record["label"] == i % 4


# Slow: a fresh interpreter importing the trainer takes ~9 s on two loaded cores; .ci/run runs it.
@pytest.mark.slow
def test_tfds_source_reads_without_tensorflow(tfds_dir, tmp_path):
  record = sources.source_from_config(_tfds_config(tfds_dir))[0]  # as test_tfds_source_reads
  proc = subprocess.run(
      [sys.executable, "-c", _READ_TFDS_WITHOUT_TF, tfds_dir, str(tmp_path)],
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), capture_output=True, text=True,
      timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out == dict(n=12, captions=record["captions"], label=record["label"], attempts=[],
                     tf_loaded=False)
  assert os.path.exists(tmp_path / "metrics.jsonl")


def test_tfds_errors_name_what_is_missing(tfds_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared.*tfds build tiny_captions"):
    sources.source_from_config(_tfds_config(str(tmp_path)))
  with pytest.raises(FileNotFoundError, match="mnist.*tfds build mnist"):
    sources.source_from_config(_tfds_config(str(tmp_path), name="mnist"))
  with pytest.raises(ValueError, match="text_key='caption'.*available"):
    sources.source_from_config(_tfds_config(tfds_dir, text_key="caption"))
  with pytest.raises(ValueError, match="split='validation'"):
    sources.source_from_config(_tfds_config(tfds_dir, split="validation"))


def test_tfds_through_the_pipeline(tfds_dir):
  cfg = _tfds_config(tfds_dir)
  tokenizer = Tokenizer(context_length=8)
  one = grain.sharding.ShardOptions(0, 1)
  batch = next(
      pipeline.make_train_iterator(
          cfg, global_batch_size=4, image_size=16, seed=0, tokenizer=tokenizer, shard_options=one
      )
  )
  assert batch["image"].shape == (4, 16, 16, 3) and batch["text"].shape == (4, 8)
  assert set(batch["label"].tolist()) <= {0, 1, 2, 3}
  eval_batches = list(
      pipeline.make_eval_batches(
          cfg, batch_size=4, image_size=16, tokenizer=tokenizer, split="test", shard_options=one
      )
  )
  assert len(eval_batches) == 2 and eval_batches[1]["mask"].tolist() == [True, False, False, False]
  assert eval_batches[0]["text_mask"][:, :2].all() and not eval_batches[0]["text_mask"][:, 2:].any()


def test_synthetic_source_from_config():
  cfg = config_lib.default_data_config()
  cfg.synthetic.update(dict(image_size=32, eval_size=10, label="colour"))
  val = sources.source_from_config(cfg, "validation")
  assert len(val) == 10 and val[0]["image"].shape == (32, 32, 3)
  assert val[0]["label"] == val[0]["labels"]["colour"]
  assert val[0]["key"] == "synthetic/validation/0"
