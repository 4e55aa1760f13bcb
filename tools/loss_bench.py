r"""Ring vs dense contrastive loss (value and gradient) on the local devices, in one run.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/loss_bench.py --batch=8192

Times `jax.value_and_grad` of the loss over image/text embeddings sharded over all devices and
prints each implementation's step time, their ratio and the compiled per-device temporary bytes.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 8192, "Global batch.")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding width.")
_KIND = flags.DEFINE_enum("kind", "softmax", ["softmax", "sigmoid"], "Loss kind.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per implementation.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from glip_jax import losses, sharding as sharding_lib
  mesh = sharding_lib.create_mesh({"data": -1})
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(2, _BATCH.value, _DIM.value)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  batch, rep = sharding_lib.batch_sharding(mesh), NamedSharding(mesh, P())
  outputs = {"image_emb": jax.device_put(emb[0], batch), "text_emb": jax.device_put(emb[1], batch),
             "logit_scale": jax.device_put(jnp.float32(np.log(10.0)), rep),
             "logit_bias": jax.device_put(jnp.float32(-10.0), rep)}
  if _KIND.value == "softmax":
    del outputs["logit_bias"]
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, global batch {_BATCH.value}, "
        f"dim {_DIM.value}, {_KIND.value}")
  times = {}
  for impl in ("dense", "ring"):
    fn = jax.jit(jax.value_and_grad(
        lambda o, impl=impl: losses.contrastive_loss(_KIND.value, o, impl, mesh), has_aux=True))
    compiled = fn.lower(outputs).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(outputs))
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      (loss, _), _ = compiled(outputs)
      float(loss)  # one step in flight: XLA:CPU collectives dislike deep queues
    times[impl] = (time.perf_counter() - start) / _STEPS.value
    print(f"  {impl:<6} {times[impl] * 1e3:9.1f} ms/step   temp {temp / 2 ** 20:9.1f} MiB/device"
          f"   loss {float(loss):.5f}")
  print(f"  ring/dense time ratio: {times['ring'] / times['dense']:.2f}")


if __name__ == "__main__":
  app.run(main)
