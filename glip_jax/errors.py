"""Errors the command line reports as one line (exit status 2), and the one way to raise them."""

from typing import Any, NoReturn


class ConfigError(ValueError):
  """A config field (or a path it names) is invalid; raised before any compute."""


def show(value: Any) -> str:
  """A value as one would write it in a config (a ConfigDict's repr is multi-line YAML)."""
  return repr(value.to_dict() if hasattr(value, "to_dict") else value)


def fail(field: str, value: Any, allowed: str) -> NoReturn:
  """Raises ValueError 'config.<field>=<value> is invalid; allowed: <allowed>'."""
  raise ValueError(f"config.{field}={show(value)} is invalid; allowed: {allowed}")
