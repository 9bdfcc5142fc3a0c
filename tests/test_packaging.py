"""The distributions: what the source archive and the wheel hold, built with no warning."""

import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from tests.conftest import REPO

BUILD = """
import warnings
warnings.simplefilter("error")  # a deprecation in our metadata fails the build
from setuptools import build_meta
sdist = build_meta.build_sdist("dist")
wheel = build_meta.build_wheel("dist")
print("BUILT", sdist, wheel)
"""


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "CHANGELOG.md"):
        shutil.copy(f"{REPO}/{name}", tree / name)
    for folder in ("gradguard", "tests", "docs", "examples"):
        shutil.copytree(f"{REPO}/{folder}", tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-c", BUILD], cwd=tree, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deprecat" not in (proc.stdout + proc.stderr).lower(), proc.stderr
    built = next(line for line in proc.stdout.splitlines() if line.startswith("BUILT "))
    sdist, wheel = built.split()[1:]
    return tree / "dist" / sdist, tree / "dist" / wheel


def test_the_source_archive_holds_the_package_and_licence_not_the_tests(dists):
    with tarfile.open(dists[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "gradguard/__init__.py"} <= names
    assert "gradguard/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]


def test_the_wheel_metadata(dists):
    with zipfile.ZipFile(dists[1]) as whl:
        names = whl.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(info).decode()
        entry_points = whl.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "Project-URL: Source, https://github.com/gradguard/gradguard" in metadata
    assert "Classifier: Framework :: Pytest" in metadata
    assert "[pytest11]\ngradguard = gradguard.pytest_plugin" in entry_points
    assert "gradguard = gradguard.cli:main" in entry_points
    assert not [n for n in names if n.startswith("tests/")]
