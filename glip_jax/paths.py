"""User-given paths, resolved once at the boundary (the CLI and the trainer's entry points).

Orbax (through tensorstore) refuses relative checkpoint paths, and a relative path means something
different to a process that changes directory or to another host. So every path a user gives —
`--workdir`, `--checkpoint`, `init_from.path`, data globs, class-name and template files, converter
outputs — is made absolute with `~` expanded, once, before anything else reads it. Object-store
URLs (`gs://…`, `s3://…`, anything with a scheme) are left exactly as given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str) -> bool:
  """Whether `path` names an object-store or other URL (scheme://...) rather than a local path."""
  return bool(_URL.match(path))


def resolve(path: str | os.PathLike[str]) -> str:
  """Absolute, `~`-expanded local path; URLs and '' are returned unchanged."""
  path = os.fspath(path)
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_globs(value: Any) -> Any:
  """`resolve` applied to a glob, comma-separated globs, or a list of them (same shape back)."""
  if isinstance(value, str):
    return ",".join(resolve(p.strip()) for p in value.split(",")) if value else value
  return type(value)(resolve(p) for p in value)


# Fields of a data-source config (config.data, a mixture entry, an eval dataset) holding paths.
_SOURCE_PATH_FIELDS = ("tfds.data_dir", "karpathy.json_path", "karpathy.image_dir")


def _get(node: Any, dotted: str) -> tuple[Any, str] | None:
  *parents, leaf = dotted.split(".")
  for p in parents:
    if p not in node:
      return None
    node = node[p]
  return (node, leaf) if leaf in node else None


def _resolve_source(source: Any) -> None:
  if "paths" in source and source["paths"]:
    source["paths"] = resolve_globs(source["paths"])
  for dotted in _SOURCE_PATH_FIELDS:
    found = _get(source, dotted)
    if found is not None:
      node, leaf = found
      node[leaf] = resolve(node[leaf])


def _looks_like_file(value: Any, names: tuple[str, ...]) -> bool:
  # Class-name and template fields hold either a built-in set's name or a file path.
  return isinstance(value, str) and bool(value) and value not in names and ":" not in value


def resolve_config_paths(config: ml_collections.ConfigDict,
                         builtin_names: tuple[str, ...] = ()) -> None:
  """Resolves, in place, every path field of a run config (see the module docstring)."""
  with config.unlocked():
    if "init_from" in config:
      for field in ("path", "open_clip"):
        if field in config.init_from and config.init_from[field]:
          config.init_from[field] = resolve(config.init_from[field])
    if "tokenizer" in config and config.tokenizer.get("model_path"):
      config.tokenizer.model_path = resolve(config.tokenizer.model_path)
    if "data" in config:
      _resolve_source(config.data)
      for entry in config.data.get("mixture") or []:
        _resolve_source(entry[0] if isinstance(entry, (tuple, list)) else entry)
    for entry in (config.get("evals") or {}).values():
      for field in ("dataset", "train_dataset", "test_dataset"):
        if field in entry and hasattr(entry[field], "keys"):
          _resolve_source(entry[field])
      for field in ("classnames", "templates"):
        if field in entry and _looks_like_file(entry[field], builtin_names):
          entry[field] = resolve(entry[field])


def expand_patterns(value: str | Sequence[str], match: Callable[[str], list[str]], *,
                    empty: str, no_match: str) -> list[str]:
  """Shard paths of a pattern, comma-separated patterns or a list, each expanded by `match`.

  Raises ValueError 'data.paths is empty: give <empty>' or FileNotFoundError
  'data.paths entry <pattern> <no_match>' — the one shard-list reader every shard source uses.
  """
  patterns = value.split(",") if isinstance(value, str) else list(value)
  patterns = [p.strip() for p in patterns if p and p.strip()]
  if not patterns:
    raise ValueError(f"data.paths is empty: give {empty}")
  shards: list[str] = []
  for pattern in patterns:
    matches = match(pattern)
    if not matches:
      raise FileNotFoundError(f"data.paths entry {pattern!r} {no_match}")
    shards.extend(matches)
  return shards
