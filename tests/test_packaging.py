"""pyproject.toml declares compatible ranges; requirements.lock pins the tested set CI installs."""

import os
import re
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _lock() -> dict[str, str]:
  pins = {}
  with open(os.path.join(REPO, "requirements.lock"), encoding="utf-8") as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line:
        name, _, version = line.partition("==")
        assert version, f"requirements.lock: {line!r} is not an exact NAME==VERSION pin"
        pins[canonicalize_name(name)] = version
  return pins


def _requirements(project):
  """Every requirement of the package and its extras, except the self-references."""
  extras = [r for group in project["optional-dependencies"].values() for r in group]
  return [Requirement(r) for r in project["dependencies"] + extras
          if canonicalize_name(Requirement(r).name) != canonicalize_name(project["name"])]


def test_dependencies_are_ranges_whose_floor_is_the_locked_version():
  project, lock = _project(), _lock()
  for req in _requirements(project):
    name = canonicalize_name(req.name)
    operators = {s.operator for s in req.specifier}
    assert "==" not in operators and "===" not in operators, (
        f"{req}: exact pins belong in requirements.lock, pyproject.toml takes a range")
    floors = [s.version for s in req.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{req}: needs one lower bound (the tested version)"
    assert name in lock, f"{req}: not pinned in requirements.lock (refresh it with pip freeze)"
    # A local build label (torch's '+cpu') is not part of a range: compare the public version.
    assert floors[0] == lock[name].split("+")[0], (
        f"{req}: lower bound {floors[0]} is not the tested (locked) version {lock[name]}")


def test_accelerator_extras_follow_the_jax_range():
  project = _project()
  (jax,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "jax"]
  for extra, plugin in (("gpu", "cuda12"), ("tpu", "tpu")):
    (req,) = [Requirement(r) for r in project["optional-dependencies"][extra]]
    assert req.name == "jax" and req.extras == {plugin} and req.specifier == jax.specifier


def test_lock_has_no_installer_tools_and_matches_this_environment():
  lock = _lock()
  assert not {"pip", "setuptools", "glip-jax"} & set(lock)
  # `make .venv` installs with -c requirements.lock: every locked package present here must have
  # exactly the locked version (a mismatch means the venv or the lock is stale).
  stale = {}
  for name, version in lock.items():
    try:
      installed = metadata.version(name)
    except metadata.PackageNotFoundError:
      continue
    if installed != version:
      stale[name] = (installed, version)
  if stale:
    pytest.fail(f"installed != locked for {stale}: run `make .venv` (or refresh the lock)")


def test_make_installs_with_the_lock_and_rebuilds_when_it_changes():
  with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
    makefile = f.read()
  assert re.search(r"^\$\(VENV\)/\.installed: .*\brequirements\.lock\b", makefile, re.M)
  assert re.search(r"pip install .*-c requirements\.lock .*'\.\[test\]'", makefile)
