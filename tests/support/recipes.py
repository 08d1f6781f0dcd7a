"""The install recipes as the install tests (tests/install/) run them: the README's Quick start
commands under a stock machine's environment, and the GitHub composite action (action.yml) as
GitHub would run its steps' commands. Shared by the test modules and by tests/install/conftest.py,
which runs the slow ones side by side once per session."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.support.checkout import STOCK_PATH
from tests.support.paths import REPO

ACTION = REPO / "action.yml"
GITLAB_TEMPLATE = REPO / "docs" / "ci" / "gitlab-template.yml"
EXPRESSION = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")


# --------------------------------------------------------------------------
# The README's Quick start
# --------------------------------------------------------------------------


def readme_commands() -> list[str]:
    """The shell blocks of the README's Quick start: the set-up and the test command."""
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", quick_start, re.S)]


def debian_packages_missing() -> list[str]:
    """The Debian packages .ci/install would install (its own list) that are not installed."""
    listed = re.search(r"packages=\(([^)]*)\)", (REPO / ".ci" / "install").read_text())
    assert listed, ".ci/install no longer lists its packages as packages=(...)"
    missing = []
    for package in listed.group(1).split():
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        if "install ok installed" not in status.stdout:
            missing.append(package)
    return missing


@functools.cache
def readme_setup_skipped() -> str | None:
    """Why the README's set-up command cannot run here, or None (asked once a session: the skip
    mark's condition and reason and tests/install/conftest.py's from_source all ask)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return "needs git and a git checkout to copy"
    if os.geteuid() != 0 and debian_packages_missing():
        return "Debian packages missing and not root: .ci/install would ask sudo for a password"
    return None


def run_stock(command: str, cwd: Path, bin_dir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """`command` under `env -i HOME=... PATH=<stock>`, linking `fdkeeper` into bin_dir so the
    real machine's /usr/local/bin and ~/.local/bin are left alone."""
    environment = {"HOME": os.environ.get("HOME", "/root"), "PATH": STOCK_PATH, "FDKEEPER_BIN_DIR": str(bin_dir)}
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------
# The GitHub composite action
# --------------------------------------------------------------------------


def action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def substitute(text: str, values: dict[str, str]) -> str:
    """GitHub's `${{ ... }}` expressions, each of which must be one this test knows."""

    def value(match: re.Match[str]) -> str:
        assert match.group(1) in values, f"action.yml uses ${{{{ {match.group(1)} }}}}, unknown to this test"
        return values[match.group(1)]

    return EXPRESSION.sub(value, text)


def expressions(inputs: dict[str, str], action_path: Path) -> dict[str, str]:
    """The values of the expressions action.yml uses: its inputs (defaults, then those given)."""
    declared = action()["inputs"]
    unknown = set(inputs) - set(declared)
    assert not unknown, f"not inputs of action.yml: {unknown}"
    values = {f"inputs.{name}": str(spec.get("default", "")) for name, spec in declared.items()}
    values.update({f"inputs.{name}": given for name, given in inputs.items()})
    values.update({"github.action_path": str(action_path), "github.job": "sip-tests"})
    return values


def run_action(inputs: dict[str, str], action_path: Path, workspace: Path, runner_temp: Path) -> dict[str, str]:
    """Run the action's shell steps in order, as GitHub would; return the outputs they set."""
    values = expressions(inputs, action_path)
    github_path = runner_temp / "github_path"
    github_path.touch()
    outputs: dict[str, str] = {}
    for step in action()["runs"]["steps"]:
        if "uses" in step or "install-packages" in step.get("if", ""):
            continue  # GitHub's upload action; apt (the suite's machine has the packages)
        assert step["shell"] == "bash", step["name"]
        output_file = runner_temp / "github_output"
        output_file.write_text("")
        added = [line for line in github_path.read_text().splitlines() if line]
        environment = {
            "HOME": os.environ.get("HOME", "/root"),
            "PATH": ":".join([*reversed(added), STOCK_PATH]),
            "RUNNER_TEMP": str(runner_temp),
            "GITHUB_PATH": str(github_path),
            "GITHUB_OUTPUT": str(output_file),
            "GITHUB_ACTION_PATH": str(action_path),
            **{name: substitute(str(text), values) for name, text in step.get("env", {}).items()},
        }
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", substitute(step["run"], values)],
            cwd=workspace,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"step {step['name']!r}:\n{done.stdout}{done.stderr}"
        outputs.update(line.split("=", 1) for line in output_file.read_text().splitlines() if "=" in line)
    return outputs
