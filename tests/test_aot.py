"""AOT compilation of the real train step: collectives parsed from HLO, memory, TPU fit report."""

import importlib.util
import os
import sys

import pytest

from glip_jax import aot
from configs import common
from configs import demo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import fit_report  # noqa: E402  (a script in tools/)

HLO = """
%async_collective_fusion.1 (p: bf16[32,96]) -> bf16[128,96] {
  %all-gather.15 = bf16[128,96]{1,0:T(8,128)(2,1)S(1)} all-gather(%p), channel_id=3, dimensions={0}
}
%async_collective_fusion.2 (p: bf16[32,96]) -> bf16[128,96] {
  %all-gather.17 = bf16[128,96]{1,0:T(8,128)(2,1)S(1)} all-gather(%p), channel_id=3, dimensions={0}
}
ENTRY %main {
  %all-gather.7 = s32[4,1,128]{2,1,0:T(1,128)S(1)} all-gather(%b), channel_id=100, dimensions={0}
  %all-reduce-start.2 = (f32[96]{0}, f32[64,96]{1,0}) all-reduce-start(%x, %y), channel_id=6
  %all-reduce-done.2 = (f32[96]{0}, f32[64,96]{1,0}) all-reduce-done(%all-reduce-start.2)
  %collective-permute.1 = f32[4,8]{1,0} collective-permute(%z), channel_id=1, pairs={{0,1}}
  %collective-permute.2 = s32[4]{0} collective-permute(%w), channel_id=1, pairs={{0,1}}
}
"""


def test_collective_stats_counts_distinct_channels_and_result_bytes():
  stats = aot.collective_stats(HLO)
  assert stats["all-gather"] == aot.CollectiveStats(count=2, bytes=128 * 96 * 2 + 4 * 128 * 4,
                                                    instructions=3)
  # The async pair counts once, at -done, with every array of its tuple result.
  assert stats["all-reduce"] == aot.CollectiveStats(count=1, bytes=(96 + 64 * 96) * 4,
                                                    instructions=1)
  # Permutes share channel 1 in the ring loss's loops (as XLA:TPU emits them): each one counts.
  assert stats["collective-permute"] == aot.CollectiveStats(2, 4 * 8 * 4 + 4 * 4, 2)
  assert set(stats) == {"all-gather", "all-reduce", "collective-permute"}


def _tiny_config():
  config = common.base_config("mu/8", 32)
  config.model.text.context_length = 8
  config.masking.kind, config.masking.ratio = "random", 0.5
  config.model.text.vocab_size = 1000  # activations, not the token table, should dominate
  config.batch_size = 512
  return config


@pytest.mark.slow  # ~20 s on CI's 2 cores: keeps `make test` under 10 minutes
def test_accumulation_lowers_temporary_memory_on_cpu():
  """The compiled CPU step for 8 devices: 4 cached-feature micro-batches need fewer temp bytes."""
  config = _tiny_config()
  full = aot.compile_train_step(config)
  config.optim.accum_steps = 4
  accumulated = aot.compile_train_step(config)
  assert full.argument_bytes == accumulated.argument_bytes > 0
  assert accumulated.temp_bytes < 0.6 * full.temp_bytes
  # Data parallelism on CPU: the gradient all-reduce; no collective-permute without the ring.
  assert "all-reduce" in full.collectives and "collective-permute" not in full.collectives


def test_hbm_exhausted_messages_are_parsed():
  """Both forms of libtpu's out-of-HBM compile error (as printed by libtpu 0.0.42)."""
  early = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (27.50G) exceeds available HBM (15.75G).")
  assert aot.parse_hbm_exhausted(early) == ("temporaries", int(27.5 * 2 ** 30), int(15.75 * 2 ** 30))
  late = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
          "hbm. Used 20.47G of 15.75G hbm. Exceeded hbm capacity by 4.72G.")
  assert aot.parse_hbm_exhausted(late) == ("total", int(20.47 * 2 ** 30), int(15.75 * 2 ** 30))
  assert aot.parse_hbm_exhausted("RESOURCE_EXHAUSTED: out of host memory") is None
  assert aot.parse_hbm_exhausted("INVALID_ARGUMENT: Used 1G of 2G hbm") is None


def test_unknown_topology_and_generation():
  with pytest.raises(ValueError, match=r"--topology='v9x:2x2': unknown TPU generation 'v9x'"):
    fit_report.chip_of("v9x:2x2")
  assert fit_report.chip_of("v5e:4x4") == ("v5e", 16.0, 197e12)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (the 'aot' extra: pip install -e '.[aot]'); "
                           "it describes TPU slices on a CPU-only host")
@pytest.mark.slow  # ~20 s on CI's 2 cores: keeps `make test` under 10 minutes
def test_demo_config_compiles_for_a_v5e_2x2_slice():
  """The demo's real train step, compiled for 4 v5e chips on this host: it fits in 16 GiB."""
  config = demo.get_config()
  config.batch_size = 32
  r = fit_report.report(config, "v5e:2x2", config.batch_size, 16.0)
  assert r["chips"] == 4 and r["fits"]
  assert 0 < r["argument_gib"] < 1 and r["temp_gib"] > 0
  # Pure data parallelism: parameters and optimizer state are replicated, so arguments hold them
  # whole; the outputs (the new state) are written into the donated arguments.
  assert r["alias_gib"] == pytest.approx(r["output_gib"], rel=0.01)
  assert set(r["collectives"]) <= {"all-gather", "all-reduce", "reduce-scatter"}
  assert 0.7 < r["xla_tflops"] / r["analytic_tflops"] < 1.5
  # 32,768 per chip: the [B_local, B] logits alone are 16 GiB, so libtpu refuses to compile. The
  # report answers "does not fit" with the compiler's number instead of crashing (which would also
  # end --find_max_batch at its first too-large batch).
  big = fit_report.report(config, "v5e:2x2", 131072, 16.0)
  assert not big["fits"] and "RESOURCE_EXHAUSTED" in big["refused"]
  assert big["needed_gib"] > big["usable_hbm_gib"] > 15 and big["margin_gib"] < 0
  # The refused report's arguments come from the shardings, not the compiler: they must differ
  # from the compiled report's by about the larger per-chip batch (uint8 32×32×3 images + 16
  # int32 tokens = 3,136 bytes an example; measured 3,099: XLA's count for the small batch
  # includes TPU tile padding, the shapes' count does not).
  per_example = (big["argument_gib"] - r["argument_gib"]) * 2 ** 30 / ((131072 - 32) / 4)
  assert 3000 <= per_example < 3300, per_example


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (the 'aot' extra: pip install -e '.[aot]'); "
                           "it describes TPU slices on a CPU-only host")
def test_v4_slices_are_described_one_device_per_chip():
  """libtpu describes v4 per TensorCore by default, which jax's TPU meshes reject; megacore."""
  devices = aot.tpu_devices("v4:2x2x1")
  assert len(devices) == 4 and {d.core_on_chip for d in devices} == {0}
  assert len({tuple(d.coords) for d in devices}) == 4
  assert len(aot.tpu_devices("v5p:2x2x1")) == 4  # v5p is described per chip already


def test_compilation_cache_persists_executables(tmp_path):
  import jax
  import jax.numpy as jnp
  from jax.experimental.compilation_cache import compilation_cache
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {name: jax.config.values[name] for name in names}
  try:
    aot.enable_compilation_cache(str(tmp_path), min_compile_seconds=0.0)
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.25)(jnp.arange(7.0)).block_until_ready()
    assert any(tmp_path.iterdir()), "no executable was written to the cache directory"
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_largest_buffers_parses_the_memory_usage_report():
  report = """Memory Space: default (color=0)
Total bytes: 375282688 (357.90MiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
   27.00MiB(  8%);   27.00MiB;    187645952;                1; f32[256,3,65,65]
   36.14MiB( 11%);    9.14MiB;     33292288;                1; bf16[256,65,3,3,32]
   54.00MiB( 17%);   17.86MiB;     96698368;                2; f32[256,65,384], f32[256,65]
   54.00MiB( 17%);      512B;     96698368;                1; f32[128]
"""
  assert aot.largest_buffers(report, top=2) == [
      (27 * 2 ** 20, "f32[256,3,65,65]"), (int(17.86 * 2 ** 20), "f32[256,65,384], f32[256,65]")]
  assert aot.largest_buffers(report)[-1] == (512, "f32[128]")
