""".ci/constraints.txt: CI pins every dependency to the versions the suite was last measured with."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for n, line in enumerate((REPO / ".ci" / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt:{n}: {line!r} is not an exact name==version pin"
        assert _norm(name) not in pins, f"constraints.txt:{n}: {name} pinned twice"
        pins[_norm(name)] = Version(version)
    return pins


def test_constraints_pin_every_declared_dependency_inside_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = _pins()
    for req in declared:
        assert _norm(req.name) in pins, f"{req.name} is a dependency but .ci/constraints.txt does not pin it"
        assert req.specifier.contains(pins[_norm(req.name)], prereleases=True), (
            f"{req.name}=={pins[_norm(req.name)]} in .ci/constraints.txt is outside pyproject's {req}")
    assert "difftools" not in pins  # the package itself is installed from the work tree


def test_ci_installs_with_the_constraints_and_readme_stays_unpinned():
    run = (REPO / ".ci" / "run").read_text()
    assert 'pip install -c .ci/constraints.txt -e ".[dev]"' in run
    readme = (REPO / "README.md").read_text()
    assert readme.split("```")[1].strip().splitlines()[1] == 'pip install -e ".[dev]"'
