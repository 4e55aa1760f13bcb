"""Errors the command line reports as one line, and the one way to raise them.

ConfigError: a usage mistake, found before any compute (exit status 2). RunStopped: a run that
started and stopped for a stated reason — data mostly broken, no restorable checkpoint, a failed
save, a non-finite step — whose message already says what is intact (exit status 1).
"""

from typing import Any, NoReturn


class ConfigError(ValueError):
  """A config field (or a path it names) is invalid; raised before any compute."""


class RunStopped(Exception):
  """Mixed into the errors that stop a started run; their message is complete (no traceback)."""


def show(value: Any) -> str:
  """A value as one would write it in a config (a ConfigDict's repr is multi-line YAML)."""
  return repr(value.to_dict() if hasattr(value, "to_dict") else value)


def fail(field: str, value: Any, allowed: str) -> NoReturn:
  """Raises ValueError 'config.<field>=<value> is invalid; allowed: <allowed>'."""
  raise ValueError(f"config.{field}={show(value)} is invalid; allowed: {allowed}")
