#!/usr/bin/env bash
# Device check on one NVIDIA GPU host (<= 8 minutes): installs the CUDA wheels matching our jax,
# then prints one table (examples/s, TFLOP/s, MFU) for ViT-B/16 bf16 at masking 0/0.5/0.75,
# dot-product attention on/off, A-CLIP vs CLIP, and the input pipeline on every host core.
#
#   tools/device_check.sh              # on the GPU host, from the repository root
#   tools/device_check.sh --cpu-smoke  # demo-size cases on CPU: checks the script anywhere
#
# Extra arguments go to tools/device_bench.py (e.g. --per_device_batch=128 --steps=5).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
args=()
smoke=0
for arg in "$@"; do
  if [[ "$arg" == "--cpu-smoke" ]]; then smoke=1; else args+=("$arg"); fi
done
if [[ "$smoke" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  exec timeout 480 "$PYTHON" tools/device_bench.py --cpu_smoke "${args[@]+"${args[@]}"}"
fi
if ! "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  "$PYTHON" -m pip install -q "jax[cuda12]==0.10.2"
fi
"$PYTHON" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
# Compiled steps are cached across the cases' shared shapes and across reruns of this script.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/glip_jax_jit_cache}"
# XLA preallocates 75% of the GPU; the OOM fallback in device_bench needs the real limit instead.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
exec timeout 480 "$PYTHON" tools/device_bench.py "${args[@]+"${args[@]}"}"
