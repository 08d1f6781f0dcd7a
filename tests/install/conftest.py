"""Fixtures of the install tests: one clean copy of the checkout, the sdist and the wheel built
from it once per session (the wheel from the sdist, as pip does with an sdist it downloads), and
the GitLab template's script run once with that wheel: a fresh venv holding the wheel, which
ran a test file in a user's repository (test_action.py checks the run, test_install.py the venv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.checkout import STOCK_PATH, copy_of_what_would_be_committed
from tests.support.paths import REPO

GITLAB_TEMPLATE = REPO / "docs" / "ci" / "gitlab-template.yml"


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


@dataclass(frozen=True)
class TemplateRun:
    """The GitLab template's before_script (less apt) and script, run once in a user's repository."""

    workspace: Path  # the user's repository: the test file, the report, the logs
    venv: Path  # the venv the before_script made with the system's Python and pip-installed the wheel into
    variables: dict[str, str]  # the job's variables, as GitLab would set them
    done: subprocess.CompletedProcess[str]


@pytest.fixture(scope="session")
def gitlab_template_run(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> TemplateRun:
    """docs/ci/gitlab-template.yml's job under GitLab's variables with FDKEEPER_SOURCE the wheel
    (the action's test builds from source) and register-answer-tcp.yaml as the user's test file,
    from a directory that is not the checkout, on a stock PATH."""
    template = yaml.safe_load(GITLAB_TEMPLATE.read_text())
    job = template[".fdkeeper"]
    root = tmp_path_factory.mktemp("gitlab")
    workspace, venv = root / "their-repository", root / "venv"
    (workspace / "sip-tests").mkdir(parents=True)
    for name in ("register-answer-tcp.yaml", "users-alice.csv"):
        shutil.copy(REPO / "docs" / "examples" / name, workspace / "sip-tests" / name)
    variables = {name: str(value) for name, value in {**template.get("variables", {}), **job["variables"]}.items()}
    variables.update({"FDKEEPER_TESTS": "sip-tests/*.yaml", "FDKEEPER_SOURCE": str(wheel)})
    variables.update({"FDKEEPER_VENV": str(venv), "FDKEEPER_INSTALL_PACKAGES": "false"})
    done = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", "\n".join([*job["before_script"], *job["script"]])],
        cwd=workspace,
        env={"HOME": os.environ.get("HOME", "/root"), "PATH": STOCK_PATH, **variables},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return TemplateRun(workspace, venv, variables, done)
