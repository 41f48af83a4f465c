"""The version ranges pyproject.toml gives each requirement (README's table and the compat checks read them)."""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import pytest

    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, list[SpecifierSet]]:
    """Every range pyproject.toml gives each requirement (dependencies and extras), and Python's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: dict[str, list[SpecifierSet]] = {"python": [SpecifierSet(project["requires-python"])]}
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    for text in requirements:
        requirement = Requirement(text)
        found.setdefault(requirement.name.lower(), []).append(requirement.specifier)
    return found
