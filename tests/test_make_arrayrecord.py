"""Converter round trips for every input format, with a corrupt JPEG and an empty caption skipped."""

import csv
import io
import json
import os
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))

import make_arrayrecord  # noqa: E402

from glip_jax.data import sources  # noqa: E402
from glip_jax.data import transforms  # noqa: E402


def _jpeg(value: int, size=(40, 30)) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


CORRUPT = _jpeg(9)[:40]  # A truncated JPEG: the header parses, the decode fails.
# (key, image, caption): two good, one corrupt image, one empty caption.
EXAMPLES = [
    ("000", _jpeg(10), "a red square"),
    ("001", _jpeg(50), "two cats on a sofa"),
    ("002", CORRUPT, "a broken file"),
    ("003", _jpeg(90), "   "),
]
EXPECTED_CAPTIONS = {"a red square", "two cats on a sofa"}
EXPECTED_SKIPS = {"undecodable_image": 1, "empty_caption": 1}


def _read_back(out_dir, prefix="data"):
  source = sources.ArrayRecordSource(os.path.join(out_dir, f"{prefix}-*.array_record"))
  return [source[i] for i in range(len(source))]


def _check(summary, out_dir, resize=0):
  assert summary["written"] == 2
  assert summary["skipped"] == EXPECTED_SKIPS
  rows = _read_back(out_dir)
  assert {r["captions"][0] for r in rows} == EXPECTED_CAPTIONS
  for row in rows:
    image = transforms.decode(row["image_bytes"])
    assert min(image.size) == (resize or 30)
  with open(os.path.join(out_dir, "data-summary.json")) as f:
    assert json.load(f)["written"] == 2
  return rows


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_webdataset(tmp_path):
  with tarfile.open(tmp_path / "00000.tar", "w") as tar:
    for i, (key, image, caption) in enumerate(EXAMPLES):
      _add(tar, f"{key}.jpg", image)
      if i == 1:  # Caption only in the json, as img2dataset can write it.
        _add(tar, f"{key}.json", json.dumps({"caption": caption, "url": "http://x"}).encode())
      else:
        _add(tar, f"{key}.txt", caption.encode())
        _add(tar, f"{key}.json", json.dumps({"url": f"http://{key}", "width": 40}).encode())
  out = tmp_path / "out"
  summary = make_arrayrecord.main(
      [
          "--input_format=webdataset",
          f"--input={tmp_path}/*.tar",
          f"--output_dir={out}",
          "--records_per_shard=1",
          "--resize=20",
      ]
  )
  rows = _check(summary, out, resize=20)
  assert len(summary["shards"]) == 2  # one record per shard
  assert rows[0]["key"] == "00000/000" and rows[0]["metadata"]["url"] == "http://000"


def test_parquet(tmp_path):
  table = pa.table(
      {
          "jpg": [e[1] for e in EXAMPLES],
          "caption": [e[2] for e in EXAMPLES],
          "key": [e[0] for e in EXAMPLES],
      }
  )
  pq.write_table(table, tmp_path / "part.parquet")
  out = tmp_path / "out"
  summary = make_arrayrecord.main(
      ["--input_format=parquet", f"--input={tmp_path}/part.parquet", f"--output_dir={out}"]
  )
  rows = _check(summary, out)
  assert {r["key"] for r in rows} == {"000", "001"}


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_csv_with_image_folder(tmp_path, delimiter):
  images = tmp_path / "images"
  images.mkdir()
  name = "captions.tsv" if delimiter == "\t" else "captions.csv"
  with open(tmp_path / name, "w", newline="") as f:
    writer = csv.writer(f, delimiter=delimiter)
    writer.writerow(["filepath", "title"])
    for key, image, caption in EXAMPLES:
      (images / f"{key}.jpg").write_bytes(image)
      writer.writerow([f"{key}.jpg", caption])
    writer.writerow(["missing.jpg", "no such file"])
  out = tmp_path / "out"
  summary = make_arrayrecord.main(
      [
          "--input_format=csv",
          f"--input={tmp_path / name}",
          f"--image_root={images}",
          "--caption_column=title",
          f"--output_dir={out}",
      ]
  )
  assert summary["skipped"].pop("missing_image") == 1
  _check(summary, out)


def test_synthetic(tmp_path):
  summary = make_arrayrecord.main(
      [
          "--input_format=synthetic",
          "--num_examples=5",
          "--synthetic_image_size=40",
          "--resize=32",
          f"--output_dir={tmp_path}",
          "--prefix=val",
          "--split=validation",
      ]
  )
  assert summary["written"] == 5 and summary["skipped"] == {}
  rows = _read_back(tmp_path, "val")
  assert rows[0]["key"] == "synthetic/validation/0"
  assert set(rows[0]["metadata"]) == {"shape", "colour", "size"}
  assert rows[0]["label"] == rows[0]["metadata"]["shape"]


def test_unknown_column_is_a_clear_error(tmp_path):
  pq.write_table(pa.table({"jpg": [b""], "text": ["x"]}), tmp_path / "p.parquet")
  with pytest.raises(SystemExit, match="caption"):
    make_arrayrecord.main(
        ["--input_format=parquet", f"--input={tmp_path}/p.parquet", f"--output_dir={tmp_path}"]
    )


def _six_example_tar():
  """Six good examples (jpg + txt) as tar bytes, and the byte offset where each example ends."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tar:
    for i in range(6):
      _add(tar, f"{i:03d}.jpg", _jpeg(20 * i))
      _add(tar, f"{i:03d}.txt", f"caption {i}".encode())
  data = buffer.getvalue()
  with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    members = tar.getmembers()
  # An example's last member ends at its data offset + size (its data is padded to 512 after).
  ends = [members[2 * i + 1].offset_data + members[2 * i + 1].size for i in range(6)]
  starts = [members[2 * i].offset for i in range(6)]
  return data, starts, ends


def _convert_tar(tmp_path, data, name="00000.tar"):
  (tmp_path / name).write_bytes(data)
  out = tmp_path / "out"
  return make_arrayrecord.main(["--input_format=webdataset", f"--input={tmp_path}/*.tar",
                                f"--output_dir={out}"]), out


@pytest.mark.parametrize("where", ["inside_an_image", "between_examples", "half"])
def test_a_cut_off_tar_counts_the_example_at_the_cut_as_skipped(tmp_path, where):
  data, starts, ends = _six_example_tar()
  # Inside example 3's image; exactly at example 4's header (tarfile then stops without an
  # error); at half the bytes. Examples wholly before the example at the cut are written.
  cut = {"inside_an_image": starts[3] + 700, "between_examples": starts[4],
         "half": len(data) // 2}[where]
  at_cut = next(i for i in range(6) if ends[i] > cut or (cut == starts[i + 1] if i < 5 else True))
  summary, out = _convert_tar(tmp_path, data[:cut])
  assert summary["written"] == at_cut and 0 < at_cut < 6
  assert summary["skipped"] == {"truncated_tar": 1}
  assert [r["captions"][0] for r in _read_back(out)] == [f"caption {i}" for i in range(at_cut)]


def test_a_complete_tar_and_a_damaged_one_after_it(tmp_path):
  data, starts, _ = _six_example_tar()
  # Cut inside example 2's first header: example 1, read last, cannot be known complete (a
  # member of its key may have followed), so it is the one skipped; example 0 is written.
  (tmp_path / "00001.tar").write_bytes(data[:starts[2] + 100])
  (tmp_path / "00002.tar").write_bytes(b"not a tar at all" * 64)  # unreadable from byte 0
  summary, out = _convert_tar(tmp_path, data)
  assert summary["written"] == 6 + 1
  assert summary["skipped"] == {"truncated_tar": 2}
  assert [r["key"] for r in _read_back(out)] == [f"00000/{i:03d}" for i in range(6)] + ["00001/000"]


def test_a_non_integer_label_is_skipped_and_counted(tmp_path):
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tar:
    for key, label in (("000", b"3"), ("001", b"cat"), ("002", b" 7\n"), ("003", b"2.5"),
                       ("004", b"\xff\xfe")):
      _add(tar, f"{key}.jpg", _jpeg(40))
      _add(tar, f"{key}.txt", b"a caption")
      _add(tar, f"{key}.cls", label)
  summary, out = _convert_tar(tmp_path, buffer.getvalue())
  assert summary["written"] == 2
  assert summary["skipped"] == {"bad_label": 3}
  assert [r["label"] for r in _read_back(out)] == [3, 7]
