"""Params-only Orbax checkpoints in the trainer's layout, for `init_from.path` and for export.

`save` writes DIR/0/state (a pytree {'params': …}) and DIR/0/config (JSON with the model config),
i.e. a checkpoints directory with one step, the layout `glip_jax.checkpointing` reads: the trainer's
`init_from.path=DIR` restores the 'params' subtree (optimizer_state must stay False: there is none),
and `load` reads back any of our checkpoints — a workdir, its checkpoints/ dir or one step dir.
DIR is deliberately not a workdir (no checkpoints/ subdirectory), so pointing a training run's
--workdir at it can never be mistaken for a resume.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from glip_jax import checkpointing
from glip_jax.interop import open_clip as open_clip_lib

STEP = 0


def save(directory: str | os.PathLike[str], params: Any, model_config: ml_collections.ConfigDict,
         **info: Any) -> None:
  """Writes `params` (numpy or jax) as step 0 of a checkpoints directory, with the model config."""
  manager = checkpointing.create_manager(directory, keep=None)
  try:
    state = {"params": jax.tree.map(np.asarray, params)}
    config = {"model": model_config.to_dict(), "info": dict(info)}
    checkpointing.save(manager, STEP, state, None, config)
    manager.wait_until_finished()
  finally:
    manager.close()


def load(path: str | os.PathLike[str], step: int | None = None,
         model_config: ml_collections.ConfigDict | None = None,
         ) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
  """(params as numpy, model config) of a checkpoint; the config comes from the checkpoint
  unless given."""
  if model_config is None:
    saved = checkpointing.load_config(path, step)
    if "model" not in saved:
      raise ValueError(f"checkpoint config at {path} has no 'model' entry; pass the model config.")
    model_config = ml_collections.ConfigDict(saved["model"])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          open_clip_lib.abstract_params(model_config))
  params = checkpointing.restore_params_from(path, abstract, step)
  return jax.tree.map(np.asarray, params), model_config
