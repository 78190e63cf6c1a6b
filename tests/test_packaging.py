"""The package list in pyproject.toml names every package directory, so a non-editable install
(``pip install .``) holds every module that the editable one imports."""
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_directory():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, directory in setuptools["package-dir"].items():
        for init in (ROOT / directory).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / directory).parts
            found.add(".".join((package, *parts)))
    assert found - listed == set(), "package directories missing from pyproject.toml [tool.setuptools] packages"
    assert listed - found == set(), "pyproject.toml lists packages that have no directory"
