"""Fixtures of the install tests: one clean copy of the checkout, and the sdist and the wheel built
from it once per session (the wheel from the sdist, as pip does with an sdist it downloads)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.checkout import copy_of_what_would_be_committed
from tests.support.paths import REPO


@pytest.fixture(scope="session")
def clean_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout as the next commit would have it, outside the tree (a build leaves no egg-info here)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout to copy")
    copy = tmp_path_factory.mktemp("clean") / "fdkeeper"
    copy_of_what_would_be_committed(copy)
    return copy


@pytest.fixture(scope="session")
def sdist(clean_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fdkeeper-VERSION.tar.gz, built from the clean copy."""
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)],
        cwd=clean_copy,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (archive,) = dist.glob("fdkeeper-*.tar.gz")
    return archive


@pytest.fixture(scope="session")
def wheel(sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from the sdist (`pip wheel --no-deps`: the shim and the pump compiled)."""
    wheels = tmp_path_factory.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "--wheel-dir", str(wheels), str(sdist)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (archive,) = wheels.glob("fdkeeper-*.whl")
    return archive
