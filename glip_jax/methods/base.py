"""The `Method` seam: everything that differs between training methods, chosen once by name.

The trainer (glip_jax/train.py) and the benchmark call a Method's fields and never ask which
method runs. A method is a frozen value of functions, so a new method is one module defining one
`Method` plus one registry line (glip_jax/methods/__init__.py):

  validate(config, total_steps)     -> spec: checks the method's own config (its section, the
                                       masking kinds it supports) and returns a hashable spec the
                                       other functions take; raises ValueError naming the field
  batch_keys                         the batch entries the train step reads
  make_preprocess(spec, data, image_size, tokenizer) -> a grain RandomMap, or None for the
                                       standard (image, caption) preprocessing
  example_batch(spec, batch)         a complete batch from a plain {'image', 'text'} batch (for
                                       benchmarks and smoke tests that feed random data)
  create_train_state(model, tx, model_config, mesh, seed, spec) -> (state, state shardings)
  compile_train_step(model, tx, schedule, step_spec, mesh, state_shardings, spec) -> step
  flops_per_example(model_config, spec, masking_spec) -> analytic training FLOPs per example
  on_params_replaced(state)         the state after its parameters were set from elsewhere
                                       (imported weights): e.g. A-CLIP's teacher starts equal
                                       to the imported student
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


def plain_batch(spec: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`example_batch` of methods that train on (image, text) pairs alone."""
  del spec
  return batch


@dataclasses.dataclass(frozen=True)
class Method:
  """What one training method supplies to the trainer (see the module docstring)."""

  name: str
  validate: Callable[..., Any]
  batch_keys: tuple[str, ...]
  make_preprocess: Callable[..., Any]
  create_train_state: Callable[..., Any]
  compile_train_step: Callable[..., Any]
  flops_per_example: Callable[..., float]
  example_batch: Callable[..., dict[str, np.ndarray]] = plain_batch
  on_params_replaced: Callable[[Any], Any] = lambda state: state
