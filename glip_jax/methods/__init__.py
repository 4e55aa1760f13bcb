"""Training methods by name (`config.method`): 'clip' (CLIP, FLIP, GLIP, …) and 'aclip'.

For 'clip' the masking kind picks the strategy (none / random / gaussian / …); 'aclip' adds an EMA
teacher, extra views and SSL losses. A new method is one module defining a `Method` and one line
here (or `register(...)` from a user's own code).
"""

from __future__ import annotations

import importlib

from glip_jax.methods.base import Method

# name -> module defining METHOD; imported on first use so that importing the registry is cheap.
_MODULES = {
    "clip": "glip_jax.methods.clip",
    "aclip": "glip_jax.aclip.method",
}
_REGISTERED: dict[str, Method] = {}


def names() -> list[str]:
  """Every method name config.method accepts."""
  return sorted(set(_MODULES) | set(_REGISTERED))


def register(method: Method) -> None:
  """Adds (or replaces) a method under `method.name`."""
  _REGISTERED[method.name] = method


def get(name: str) -> Method:
  """The method `config.method` names; ValueError naming the allowed values otherwise."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in _MODULES:
    raise ValueError(f"method={name!r} is not a training method; allowed: {names()}.")
  return importlib.import_module(_MODULES[name]).METHOD
