"""The GitHub composite action (action.yml at the repository's root), run as GitHub would run its
steps' commands: the inputs and `github.*` substituted, each `run:` under `bash -eo pipefail` with
RUNNER_TEMP, GITHUB_PATH and GITHUB_OUTPUT, in a user's repository that is not the checkout.
The apt step (the suite's machine has the packages) and the upload step (an action of GitHub's)
are not run; what the upload would keep is checked to be there. The GitLab template does the
same with the same commands."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml
from click.testing import CliRunner

from fdkeeper.cli import main
from tests.support.checkout import STOCK_PATH
from tests.support.paths import REPO

ACTION = REPO / "action.yml"
GITLAB_TEMPLATE = REPO / "docs" / "ci" / "gitlab-template.yml"
EXPRESSION = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")

# What `fdkeeper doctor` asks for on the basic path: the action and the GitLab template install it.
DOCTORS_PACKAGES = (
    "sip-tester",
    "kamailio",
    "kamailio-tls-modules",
    "kamailio-websocket-modules",
    "gcc",
    "libc6-dev",
    "python3-venv",
)


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


def shard_given() -> str:
    """ "1/1" when `fdkeeper run` has --shard (the whole suite in its one shard), else no shard."""
    return "1/1" if "--shard" in CliRunner().invoke(main, ["run", "--help"]).output else ""


def test_the_actions_commands_install_fdkeeper_and_run_the_test_files(clean_copy, tmp_path):
    workspace = tmp_path / "their-repository"
    (workspace / "sip tests").mkdir(parents=True)  # a space: the inputs are not split inside a glob's match
    for name in ("register-answer-tcp.yaml", "users-alice.csv"):
        shutil.copy(REPO / "docs" / "examples" / name, workspace / "sip tests" / name)
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir()
    shard = shard_given()
    inputs = {"tests": "sip*/*.yaml", "junit": "out/report.xml", "logs": "out/logs", "shard": shard}

    outputs = run_action(inputs, clean_copy, workspace, runner_temp)

    installed = runner_temp / "fdkeeper-venv" / "bin"
    assert (installed / "fdkeeper").exists() and str(installed) in (runner_temp / "github_path").read_text()
    report = ET.parse(workspace / "out" / "report.xml").getroot()
    assert [case.get("name") for case in report.iter("testcase")]
    assert not [outcome for outcome in report.iter() if outcome.tag in ("failure", "error")]
    assert (workspace / "out" / "logs" / "latest" / "register-answer-tcp").is_dir()
    assert "register-answer-tcp" in (workspace / "fdkeeper-report.html").read_text()  # the html input's default
    # What the upload step keeps, under a name that differs per job and per shard.
    upload = next(step for step in action()["runs"]["steps"] if "upload-artifact" in step.get("uses", ""))
    kept = substitute(upload["with"]["path"], expressions(inputs, clean_copy)).split()
    assert kept == ["out/report.xml", "fdkeeper-report.html", "out/logs"] and upload["if"].startswith("always()")
    assert outputs["artifact"] == "fdkeeper-logs-sip-tests" + ("-shard-1-of-1" if shard else "")


def test_the_apt_step_installs_what_the_doctor_asks_for():
    """The packages the action installs are those `fdkeeper doctor` names for the basic path."""
    apt = next(step for step in action()["runs"]["steps"] if "install-packages" in step.get("if", ""))
    packages = set(apt["run"].split("--no-install-recommends", 1)[1].split())
    assert set(DOCTORS_PACKAGES) <= packages


def test_the_gitlab_template_runs_the_same_commands():
    """docs/ci/gitlab-template.yml: a hidden job to extend, with the action's packages and run command."""
    template = yaml.safe_load(GITLAB_TEMPLATE.read_text())
    job = template[".fdkeeper"]
    script = "\n".join(job["before_script"] + job["script"])
    for package in DOCTORS_PACKAGES:
        assert package in script, package
    assert "fdkeeper run" in script or '"${command[@]}"' in script
    assert "--junit" in script and "CI_NODE_INDEX" in script  # parallel: N gives the shard
    assert job["artifacts"]["when"] == "always" and job["artifacts"]["reports"]["junit"] == "$FDKEEPER_JUNIT"


def test_the_gitlab_templates_script_runs(gitlab_template_run):
    """The template's before_script (less apt) and script, under GitLab's variables, in a user's
    repository: fdkeeper installed from the wheel (the action's test builds from source), the test
    file run, the report written (the run is tests/install/conftest.py's gitlab_template_run)."""
    run = gitlab_template_run
    assert run.done.returncode == 0, run.done.stdout + run.done.stderr
    report = ET.parse(run.workspace / run.variables["FDKEEPER_JUNIT"]).getroot()
    assert [case.get("name") for case in report.iter("testcase")]
    assert (run.workspace / run.variables["FDKEEPER_LOGS"] / "latest" / "register-answer-tcp").is_dir()
    assert (run.workspace / run.variables["FDKEEPER_HTML"]).is_file()
