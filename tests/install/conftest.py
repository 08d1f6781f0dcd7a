"""Fixtures of the install tests, each made once per session from one clean copy of the checkout:
- the sdist and the wheel built from it (the wheel from the sdist, as pip does with an sdist it
  downloads), then the GitLab template's script run with that wheel (a fresh venv holding the
  wheel, which ran a test file in a user's repository: test_action.py checks the run,
  test_install.py the venv);
- the two installs from source: the README's set-up command in a clean copy of its own, and the
  GitHub action's steps from a copy of its own. These two are started side by side in threads at
  the first request of either, and each test waits for the one it checks while the tests after
  it go on: the README's install is then done beside the action's and the wheel's. (All three
  side by side was slower on the shared 2-core machine: pip is mostly CPU.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.checkout import STOCK_PATH, copy_of_what_would_be_committed
from tests.support.paths import REPO
from tests.support.recipes import GITLAB_TEMPLATE, readme_commands, readme_setup_skipped, run_action, run_stock


@pytest.fixture(scope="session")
def clean_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout as the next commit would have it, outside the tree (a build leaves no egg-info here)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout to copy")
    copy = tmp_path_factory.mktemp("clean") / "fdkeeper"
    copy_of_what_would_be_committed(copy)
    return copy


# --------------------------------------------------------------------------
# the jobs (each in a directory of its own)
# --------------------------------------------------------------------------


def build_sdist(clean_copy: Path, dist: Path) -> Path:
    """fdkeeper-VERSION.tar.gz, built from the clean copy."""
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


def build_wheel(sdist: Path, wheels: Path) -> Path:
    """The wheel pip builds from the sdist (`pip wheel --no-deps`: the shim and the pump compiled)."""
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "--wheel-dir", str(wheels), str(sdist)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (archive,) = wheels.glob("fdkeeper-*.whl")
    return archive


def their_repository(root: Path, tests: str) -> Path:
    """A user's repository under root: register-answer-tcp.yaml and its users' CSV in its folder ``tests``."""
    workspace = root / "their-repository"
    (workspace / tests).mkdir(parents=True)
    for name in ("register-answer-tcp.yaml", "users-alice.csv"):
        shutil.copy(REPO / "docs" / "examples" / name, workspace / tests / name)
    return workspace


@dataclass(frozen=True)
class TemplateRun:
    """The GitLab template's before_script (less apt) and script, run once in a user's repository."""

    workspace: Path  # the user's repository: the test file, the report, the logs
    venv: Path  # the venv the before_script made with the system's Python and pip-installed the wheel into
    variables: dict[str, str]  # the job's variables, as GitLab would set them
    done: subprocess.CompletedProcess[str]


def run_gitlab_template(wheel: Path, root: Path) -> TemplateRun:
    """docs/ci/gitlab-template.yml's job under GitLab's variables with FDKEEPER_SOURCE the wheel
    (the action's test builds from source) and register-answer-tcp.yaml as the user's test file,
    from a directory that is not the checkout, on a stock PATH."""
    template = yaml.safe_load(GITLAB_TEMPLATE.read_text())
    job = template[".fdkeeper"]
    workspace, venv = their_repository(root, "sip-tests"), root / "venv"
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


@dataclass(frozen=True)
class ReadmeSetup:
    """The README's set-up command run in a clean copy of the checkout on a stock PATH."""

    checkout: Path
    bin_dir: Path  # where the command linked `fdkeeper` (FDKEEPER_BIN_DIR), off the stock PATH
    done: subprocess.CompletedProcess[str]


def set_up_as_the_readme_says(root: Path) -> ReadmeSetup:
    checkout, bin_dir = root / "fdkeeper", root / "bin"
    copy_of_what_would_be_committed(checkout)
    setup, _suite = readme_commands()
    return ReadmeSetup(checkout, bin_dir, run_stock(setup, checkout, bin_dir, timeout=240))


@dataclass(frozen=True)
class ActionRun:
    """The GitHub action's shell steps run in a user's repository, with `action_path` as the action."""

    action_path: Path
    workspace: Path
    runner_temp: Path
    inputs: dict[str, str]
    outputs: dict[str, str]


def run_the_action(action_path: Path, root: Path, shard: str) -> ActionRun:
    """register-answer-tcp.yaml in a user's repository, run by the action's steps from
    `action_path`, a copy of the clean copy (pip builds in the tree it installs from, as the sdist
    does in the clean copy meanwhile)."""
    workspace = their_repository(root, "sip tests")  # a space: the inputs are not split inside a glob's match
    runner_temp = root / "runner-temp"
    runner_temp.mkdir()
    inputs = {"tests": "sip*/*.yaml", "junit": "out/report.xml", "logs": "out/logs", "shard": shard}
    return ActionRun(
        action_path, workspace, runner_temp, inputs, run_action(inputs, action_path, workspace, runner_temp)
    )


def shard_in_run_help() -> bool:
    """Whether `fdkeeper run` has --shard (the action is then given the whole suite as its one
    shard). Asked in pytest's own thread: CliRunner swaps sys.stdout while it runs."""
    from click.testing import CliRunner

    from fdkeeper.cli import main

    return "--shard" in CliRunner().invoke(main, ["run", "--help"]).output


# --------------------------------------------------------------------------
# the jobs side by side, and a fixture per result
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FromSource:
    readme: Future[ReadmeSetup] | None  # None where the README's test is skipped
    action: Future[ActionRun]


@pytest.fixture(scope="session")
def from_source(clean_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FromSource]:
    """The README's set-up and the action's steps, started side by side (see the module's doc)."""
    readme_root, action_root = tmp_path_factory.mktemp("readme"), tmp_path_factory.mktemp("action")
    action_path = action_root / "action"
    shutil.copytree(clean_copy, action_path, symlinks=True)  # here: the sdist may build in clean_copy meanwhile
    shard = "1/1" if shard_in_run_help() else ""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="install") as pool:
        readme = pool.submit(set_up_as_the_readme_says, readme_root) if readme_setup_skipped() is None else None
        yield FromSource(readme, pool.submit(run_the_action, action_path, action_root, shard))


@pytest.fixture(scope="session")
def sdist(clean_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sdist(clean_copy, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def wheel(sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(sdist, tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="session")
def gitlab_template_run(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> TemplateRun:
    return run_gitlab_template(wheel, tmp_path_factory.mktemp("gitlab"))


@pytest.fixture
def readme_setup(from_source: FromSource) -> ReadmeSetup:
    assert from_source.readme is not None, readme_setup_skipped()
    return from_source.readme.result()


@pytest.fixture
def action_run(from_source: FromSource) -> ActionRun:
    return from_source.action.result()
