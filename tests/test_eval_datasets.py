"""Tests for the Karpathy-split retrieval source (COCO / Flickr30k JSON + an image folder)."""
import io
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from glip_jax.data import config as data_config
from glip_jax.data import pipeline
from glip_jax.data import sources
from glip_jax.data.tokenizer import Tokenizer
from glip_jax.evaluation import builder

COLOURS = {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "c.png": (0, 0, 255), "t.png": (9, 9, 9)}


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
  """dataset_coco.json-style file: 3 test images (one under a filepath folder), 1 train image."""
  root = tmp_path_factory.mktemp("karpathy")
  (root / "images" / "val2014").mkdir(parents=True)
  for name, rgb in COLOURS.items():
    folder = root / "images" / ("val2014" if name == "b.png" else "")
    Image.new("RGB", (40, 24), rgb).save(folder / name)
  images = [
      {"filename": "a.png", "split": "test",
       "sentences": [{"raw": "A red thing."}, {"raw": "red"}]},
      {"filename": "b.png", "filepath": "val2014", "split": "test",
       "sentences": [{"raw": "green"}, {"raw": "a green box"}, {"raw": "grass"}]},
      {"filename": "t.png", "split": "train", "sentences": [{"raw": "train only"}]},
      {"filename": "c.png", "split": "test", "sentences": [{"raw": "blue"}]},
  ]
  path = root / "dataset_coco.json"
  path.write_text(json.dumps({"images": images, "dataset": "coco"}))
  return str(path), str(root / "images")


def test_source_reads_one_split_with_all_captions(karpathy):
  json_path, image_dir = karpathy
  src = sources.KarpathySource(json_path, image_dir, "test")
  assert len(src) == 3
  record = src[1]
  assert record["captions"] == ["green", "a green box", "grass"]
  assert record["label"] == -1 and record["key"] == "val2014/b.png"
  assert Image.open(io.BytesIO(record["image_bytes"])).getpixel((0, 0)) == (0, 255, 0)
  assert len(sources.KarpathySource(json_path, image_dir, "train")) == 1


def test_source_errors(karpathy, tmp_path):
  json_path, image_dir = karpathy
  with pytest.raises(FileNotFoundError, match="json_path"):
    sources.KarpathySource(str(tmp_path / "missing.json"), image_dir)
  with pytest.raises(FileNotFoundError, match="image_dir"):
    sources.KarpathySource(json_path, str(tmp_path))
  with pytest.raises(ValueError, match="no images in split 'val'"):
    sources.KarpathySource(json_path, image_dir, "val")
  cfg = data_config.default_source_config()
  cfg.source, cfg.karpathy.json_path, cfg.karpathy.image_dir = "karpathy", json_path, image_dir
  cfg.karpathy.split = "dev"
  with pytest.raises(ValueError, match=r"karpathy\.split='dev'.*'restval'"):
    data_config.validate_source_config(cfg)


def test_eval_batches_through_the_pipeline(karpathy):
  json_path, image_dir = karpathy
  cfg = data_config.default_source_config()
  cfg.source = "karpathy"
  cfg.karpathy.json_path, cfg.karpathy.image_dir = json_path, image_dir
  cfg.max_captions = 2
  batches = list(pipeline.make_eval_batches(cfg, batch_size=4, image_size=16,
                                            tokenizer=Tokenizer(16)))
  assert len(batches) == 1
  batch = batches[0]
  assert batch["image"].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(batch["mask"], [True, True, True, False])
  np.testing.assert_array_equal(batch["text_mask"],
                                [[True, True], [True, True], [True, False], [False, False]])
  np.testing.assert_array_equal(batch["image"][2, 8, 8], [0, 0, 255])
  assert batch["texts"].shape == (4, 2, 16)


def test_retrieval_entry_with_karpathy_dataset_validates(karpathy):
  json_path, image_dir = karpathy
  config = ml_collections.ConfigDict(dict(masking=dict(kind="none"), evals=dict(coco=dict(
      kind="retrieval", batch_size=8,
      dataset=dict(source="karpathy", karpathy=dict(json_path=json_path, image_dir=image_dir))))))
  entry = builder.validate_evals(config)["coco"]
  assert entry.dataset.karpathy.split == "test" and entry.dataset.max_captions == 5
