"""Data throughput: decoded + augmented examples per second per worker (tools/benchmark.py --mode=data).

Measures the per-record preprocessing a Grain worker does (decode + RandomResizedCrop + flip +
tokenise) in one thread, so the figure is per core; multiply by workers for a machine estimate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from glip_jax.data import synthetic
from glip_jax.data.pipeline import TrainPreprocess
from glip_jax.data.sources import ArrayRecordSource
from glip_jax.data.tokenizer import Tokenizer


def _rate(fn, count: int) -> float:
  fn(0)  # Warm-up (lazy imports, caches).
  start = time.perf_counter()
  for i in range(count):
    fn(i)
  return count / (time.perf_counter() - start)


def make_jpeg_shards(directory: str, num_examples: int = 256, stored_size: int = 256) -> str:
  """Writes synthetic scenes as JPEG ArrayRecord shards (shorter side `stored_size`) with the converter."""
  tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "make_arrayrecord.py")
  subprocess.run(
      [
          sys.executable,
          tool,
          "--input_format=synthetic",
          f"--num_examples={num_examples}",
          f"--synthetic_image_size={stored_size + 64}",
          f"--resize={stored_size}",
          f"--output_dir={directory}",
          "--prefix=bench",
      ],
      check=True,
      capture_output=True,
  )
  return os.path.join(directory, "bench-*.array_record")


def benchmark_data(
    image_size: int = 224,
    stored_size: int = 256,
    num_examples: int = 256,
    synthetic_sizes: tuple[int, ...] = (32, 64),
    paths: str | None = None,
    synthetic_count: int = 2000,
) -> dict[str, Any]:
  """Examples/s per worker: JPEG ArrayRecord decode+augment+tokenise, and synthetic render(+augment)."""
  tokenizer = Tokenizer()
  results: dict[str, Any] = {"image_size": image_size, "stored_size": stored_size}
  with tempfile.TemporaryDirectory() as tmp:
    source = ArrayRecordSource(paths or make_jpeg_shards(tmp, num_examples, stored_size))
    records = [source[i] for i in range(len(source))]
    preprocess = TrainPreprocess(image_size, tokenizer)
    rng = np.random.default_rng(0)
    n = len(records)
    results["jpeg_records_per_s"] = _rate(
        lambda i: preprocess.random_map(records[i % n], rng), 2 * n
    )
  for size in synthetic_sizes:
    config = synthetic.SceneConfig(image_size=size)
    results[f"synthetic_render_{size}px_per_s"] = _rate(
        lambda i: synthetic.render(i, config), synthetic_count
    )
    source = synthetic.SyntheticScenes(config, size=10**6)
    augment = TrainPreprocess(size, tokenizer)
    results[f"synthetic_render_augment_{size}px_per_s"] = _rate(
        lambda i: augment.random_map(source[i], rng), synthetic_count
    )
  return results


if __name__ == "__main__":
  for key, value in benchmark_data().items():
    print(f"{key}: {value:.0f}" if isinstance(value, float) else f"{key}: {value}")
