"""Data throughput (tools/benchmark.py --mode=data): examples/s per core and with all cores.

Per core: one thread reads a record from its source and runs the training preprocessing (decode +
RandomResizedCrop + flip + tokenise), timed by that thread's CPU time (`time.thread_time`), so the
figure is examples per CPU-second and holds better on a shared machine; wall-clock rates are
reported next to it, and all variants are measured interleaved (compare ratios within a run).
`*_read` is the source read alone; `*_full_decode` the previous decode path (no draft mode).
All cores: the real Grain training iterator (`pipeline.make_train_iterator`) with reader threads
or with worker processes, in wall-clock examples/s.

Benchmark sets, all generated here: photo-like JPEGs (smooth colour fields + oriented texture +
sensor noise, quality 90) at web sizes (shorter side 400–768, longer up to 1024), the same images
shrunk to shorter side 256 (what `make_arrayrecord.py --resize=256` stores), written as
img2dataset-style webdataset tars and as ArrayRecord shards of the same bytes; plus the synthetic
scenes.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from glip_jax.data import config as config_lib
from glip_jax.data import pipeline
from glip_jax.data import records
from glip_jax.data import sources
from glip_jax.data import transforms
from glip_jax.data.tokenizer import Tokenizer


def web_like_jpegs(
    count: int, min_side: int = 400, max_side: int = 1024, seed: int = 0, quality: int = 90
) -> list[bytes]:
  """Photo-like JPEGs: ~1.5 bits/pixel at q90, about what web photos of these sizes weigh."""
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(count):
    short = int(rng.integers(min_side, min(768, max_side) + 1))
    long = int(rng.integers(short, max_side + 1))
    h, w = (short, long) if rng.random() < 0.7 else (long, short)  # Mostly landscape.
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    image = np.empty((h, w, 3))
    for c in range(3):  # Smooth colour fields (sky, walls, out-of-focus background).
      a, b, phase = rng.uniform(-1, 1, 3)
      image[..., c] = 128 + 60 * np.sin(3 * (a * x + b * y) + 3 * phase)
    for _ in range(6):  # Oriented texture at several frequencies (foliage, fabric, edges).
      freq, angle = rng.uniform(10, 60), rng.uniform(0, np.pi)
      wave = np.sin(freq * (np.cos(angle) * x + np.sin(angle) * y) + rng.uniform(0, 2 * np.pi))
      image += rng.uniform(5, 20) * wave[..., None] * rng.uniform(0.5, 1, 3)
    image += rng.normal(0, 8, image.shape)  # Sensor noise: what makes photos expensive to code.
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    images.append(buffer.getvalue())
  return images


def shrink_jpegs(images: Sequence[bytes], side: int, quality: int = 90) -> list[bytes]:
  """The images re-encoded at shorter side `side`, as the converter's `--resize` stores them."""
  out = []
  for image in images:
    pil = transforms.resize_shorter_side(transforms.decode(image), side)
    buffer = io.BytesIO()
    pil.save(buffer, "JPEG", quality=quality)
    out.append(buffer.getvalue())
  return out


def _captions(count: int) -> list[str]:
  words = ("a photo of", "a dog on", "two people near", "an old house by", "a red car in")
  places = ("the beach", "a park", "the city at night", "a snowy mountain", "a kitchen")
  return [f"{words[i % 5]} {places[(i // 5) % 5]} number {i}" for i in range(count)]


def write_webdataset(directory: str, images: Sequence[bytes], per_shard: int = 1000) -> str:
  """img2dataset's layout: NNNNN.tar holding KEY.jpg + KEY.txt + KEY.json; returns the glob."""
  os.makedirs(directory, exist_ok=True)
  captions = _captions(len(images))
  for shard in range(math.ceil(len(images) / per_shard)):
    with tarfile.open(os.path.join(directory, f"{shard:05d}.tar"), "w") as tar:
      for i in range(shard * per_shard, min(len(images), (shard + 1) * per_shard)):
        key = f"{shard:05d}{i:04d}"
        meta = f'{{"url": "http://example.com/{i}.jpg", "key": "{key}"}}'.encode()
        for ext, data in (("jpg", images[i]), ("txt", captions[i].encode()), ("json", meta)):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return os.path.join(directory, "*.tar")


def write_arrayrecord(directory: str, images: Sequence[bytes]) -> str:
  """The same examples as write_webdataset, as one ArrayRecord shard; returns the glob."""
  from array_record.python.array_record_module import ArrayRecordWriter

  os.makedirs(directory, exist_ok=True)
  writer = ArrayRecordWriter(os.path.join(directory, "bench-00000.array_record"), "group_size:1")
  for i, (image, caption) in enumerate(zip(images, _captions(len(images)))):
    writer.write(records.encode_record(image, [caption], f"bench/{i}"))
  writer.close()
  return os.path.join(directory, "bench-*.array_record")


class _FullDecodePreprocess(pipeline.TrainPreprocess):
  """TrainPreprocess with the previous decode path (no JPEG draft mode), for the speed-up ratio."""

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, _ = transforms.random_resized_crop(
        records.image_of(record), rng, self.image_size, self.scale, self.ratio, self.flip, False
    )
    caption = records.random_caption(record, rng)
    return {"image": image, "text": self.tokenizer([caption])[0], "label": np.int32(-1)}


def per_core_rates(
    fns: dict[str, Callable[[int], Any]], count: int, repeats: int = 3
) -> dict[str, dict[str, float]]:
  """Best of `repeats` passes of each fn(0..count-1), interleaved so that load from other jobs
  hits every variant alike: {name: {'cpu': examples per CPU-second, 'wall': per wall-second}}."""
  rates = {name: {"cpu": 0.0, "wall": 0.0} for name in fns}
  for fn in fns.values():
    fn(0)  # Warm-up (lazy imports, caches).
  for _ in range(repeats):
    for name, fn in fns.items():
      t_cpu, t_wall = time.thread_time(), time.perf_counter()
      for i in range(count):
        fn(i)
      cpu = count / max(time.thread_time() - t_cpu, 1e-9)
      wall = count / (time.perf_counter() - t_wall)
      rates[name] = {"cpu": max(rates[name]["cpu"], cpu), "wall": max(rates[name]["wall"], wall)}
  return rates


def pipeline_rate(
    data_cfg: Any, image_size: int, batch_size: int, batches: int, tokenizer: Tokenizer
) -> float:
  """Wall-clock examples/s of the training iterator (after two warm-up batches)."""
  it = pipeline.make_train_iterator(
      data_cfg,
      global_batch_size=batch_size,
      image_size=image_size,
      seed=0,
      tokenizer=tokenizer,
      shard_options=grain.sharding.NoSharding(),
  )
  try:
    for _ in range(2):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * batch_size / (time.perf_counter() - start)
  finally:
    if hasattr(it, "close"):
      it.close()


def cores_needed(devices: int, examples_per_s_per_device: float, per_core: float) -> float:
  """Host cores of preprocessing needed to feed `devices` each consuming that many examples/s."""
  return devices * examples_per_s_per_device / per_core


def benchmark_data(
    image_size: int = 224,
    num_examples: int = 48,
    synthetic_size: int = 64,
    all_cores: bool = True,
    cores: int | None = None,
    batch_size: int = 32,
    batches: int = 6,
    devices: int = 8,
    device_rate: float = 10_000.0,
) -> dict[str, Any]:
  """Per-core and all-core examples/s for ArrayRecord@256, webdataset full-size and @256, synthetic.

  `devices` × `device_rate` (examples/s each, e.g. from `--mode=train`) is the consumption the
  `cores_needed_*` entries are computed for.
  """
  cores = cores or os.cpu_count() or 1
  tokenizer = Tokenizer()
  results: dict[str, Any] = {"image_size": image_size, "cores": cores}
  with tempfile.TemporaryDirectory() as tmp:
    full = web_like_jpegs(num_examples)
    small = shrink_jpegs(full, 256)
    results["full_size_kb_per_image"] = sum(map(len, full)) / len(full) / 1e3
    results["stored_256_kb_per_image"] = sum(map(len, small)) / len(small) / 1e3
    configs = {}
    for name, kind, paths in (
        ("arrayrecord_256", "arrayrecord", write_arrayrecord(os.path.join(tmp, "ar"), small)),
        ("webdataset_256", "webdataset", write_webdataset(os.path.join(tmp, "wds256"), small)),
        ("webdataset_full", "webdataset", write_webdataset(os.path.join(tmp, "wdsfull"), full)),
    ):
      cfg = config_lib.default_data_config()
      cfg.source, cfg.paths = kind, paths
      configs[name] = cfg
    synthetic_cfg = config_lib.default_data_config()
    synthetic_cfg.synthetic.image_size = synthetic_size
    configs[f"synthetic_{synthetic_size}px"] = synthetic_cfg

    # Synthetic scenes are cropped at their own size, as the demo trains on them.
    sizes = {n: synthetic_size if n.startswith("synthetic") else image_size for n in configs}
    rng = np.random.default_rng(0)
    fns: dict[str, Callable[[int], Any]] = {}
    for name, cfg in configs.items():
      source = sources.source_from_config(cfg)
      n = len(source)
      fns[f"{name}_read"] = lambda i, source=source, n=n: source[i % n]
      steps = {"": pipeline.TrainPreprocess(sizes[name], tokenizer)}
      if not name.startswith("synthetic"):
        steps["_full_decode"] = _FullDecodePreprocess(image_size, tokenizer)
      for suffix, step in steps.items():
        fns[f"{name}{suffix}"] = lambda i, s=source, n=n, p=step: p.random_map(s[i % n], rng)
    for key, rate in per_core_rates(fns, 2 * num_examples).items():
      results[f"{key}_per_core"] = rate["cpu"]
      results[f"{key}_per_core_wall"] = rate["wall"]
    for name in configs:
      need = cores_needed(devices, device_rate, results[f"{name}_per_core"])
      results[f"cores_needed_{name}"] = need
    results["cores_needed_for"] = f"{devices} devices at {device_rate:.0f} examples/s each"

    if all_cores:
      for name, cfg in configs.items():
        threads = cfg.copy_and_resolve_references()
        threads.read_threads, threads.prefetch_batches = 2 * cores, 4
        results[f"{name}_all_cores_threads"] = pipeline_rate(
            threads, sizes[name], batch_size, batches, tokenizer
        )
        workers = cfg.copy_and_resolve_references()
        workers.read_threads, workers.worker_count = 1, cores
        results[f"{name}_all_cores_workers"] = pipeline_rate(
            workers, sizes[name], batch_size, batches, tokenizer
        )
  return results


def format_results(results: dict[str, Any]) -> str:
  """Human-readable table of benchmark_data's dict, ending with the cores-needed lines."""
  lines = []
  for key, value in results.items():
    if key.startswith("cores_needed"):
      continue
    text = f"{value:>10.0f}" if isinstance(value, float) else f"{value:>10}"
    lines.append(f"  {key:<44} {text}")
  target = results["cores_needed_for"]
  for key, value in results.items():
    if key.startswith("cores_needed_") and key != "cores_needed_for":
      lines.append(f"  cores needed to feed {target} ({key[len('cores_needed_'):]}): {value:.1f}")
  return "\n".join(lines)


if __name__ == "__main__":
  from absl import flags

  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags (see docs/ENV traps).
  print(format_results(benchmark_data()))
