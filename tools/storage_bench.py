"""Examples/s reading training data from object storage vs local disk (docs/launching.md).

  python tools/storage_bench.py [--count=512] [--batches=8]

Writes the same web-like JPEGs (shorter side 256, as `make_arrayrecord.py --resize=256` stores)
as Parquet shards locally and into a GCS bucket (the local emulator of tests/storage_emulators.py
unless STORAGE_EMULATOR_HOST points elsewhere), plus local ArrayRecord shards, and measures
(1) the source read alone in shuffled order and (2) the real training iterator (decode, crop,
tokenise, batch). All variants run interleaved; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from glip_jax import storage  # noqa: E402
from glip_jax.data import config as data_config  # noqa: E402
from glip_jax.data import sources  # noqa: E402
from glip_jax.data import throughput  # noqa: E402
from glip_jax.data import tokenizer as tokenizer_lib  # noqa: E402


def write_parquet(target_dir: str, images: list[bytes], per_shard: int, row_group: int) -> str:
  captions = [f"a photo number {i}" for i in range(len(images))]
  for shard, start in enumerate(range(0, len(images), per_shard)):
    rows = slice(start, start + per_shard)
    table = pa.table({"jpg": images[rows], "caption": captions[rows],
                      "key": [str(i) for i in range(len(images))][rows]})
    local = tempfile.mktemp(suffix=".parquet")
    pq.write_table(table, local, row_group_size=row_group)
    storage.upload(local, storage.path(target_dir) / f"train-{shard:05d}.parquet")
    os.remove(local)
  return os.fspath(storage.path(target_dir) / "train-*.parquet")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--count", type=int, default=512)
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--row_group", type=int, default=64)
  args = p.parse_args()
  emulators = None
  if not os.environ.get("STORAGE_EMULATOR_HOST"):
    import storage_emulators  # pylint: disable=g-import-not-at-top
    emulators = storage_emulators.Emulators(s3=False)
    os.environ.update(emulators.env)
  try:
    images = throughput.shrink_jpegs(throughput.web_like_jpegs(args.count, seed=0), 256)
    local_dir = tempfile.mkdtemp(prefix="storage_bench_")
    bucket_dir = f"gs://glip-test/storage_bench_{time.time_ns()}"
    patterns = {
        "parquet local": write_parquet(local_dir + "/pq", images, 256, args.row_group),
        "parquet gs:// (emulator)": write_parquet(bucket_dir, images, 256, args.row_group),
        "arrayrecord local": throughput.write_arrayrecord(local_dir + "/ar", images),
    }
    opened = {name: (sources.ParquetSource(pat) if "parquet" in name
                     else sources.ArrayRecordSource(pat)) for name, pat in patterns.items()}
    order = list(range(args.count))
    random.Random(0).shuffle(order)
    reads = {name: (lambda i, s=s: s[order[i % len(order)]]) for name, s in opened.items()}
    read_rates = throughput.per_core_rates(reads, count=args.count, repeats=2)
    tok = tokenizer_lib.Tokenizer()
    pipe_rates = {}
    for name, pattern in patterns.items():
      cfg = data_config.default_data_config()
      cfg.source = "parquet" if "parquet" in name else "arrayrecord"
      cfg.paths = pattern
      cfg.read_threads = 2
      pipe_rates[name] = throughput.pipeline_rate(cfg, 224, 32, args.batches, tok)
    print(f"{args.count} JPEGs (shorter side 256), row groups of {args.row_group}, shuffled reads")
    print(f"{'variant':28s} {'read ex/s (wall)':>18s} {'read ex/CPU-s':>14s} {'pipeline ex/s':>14s}")
    for name in patterns:
      print(f"{name:28s} {read_rates[name]['wall']:18.0f} {read_rates[name]['cpu']:14.0f} "
            f"{pipe_rates[name]:14.0f}")
  finally:
    if emulators is not None:
      emulators.stop()


if __name__ == "__main__":
  main()
