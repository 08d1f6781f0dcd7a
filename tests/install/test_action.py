"""The GitHub composite action (action.yml at the repository's root), run as GitHub would run its
steps' commands: the inputs and `github.*` substituted, each `run:` under `bash -eo pipefail` with
RUNNER_TEMP, GITHUB_PATH and GITHUB_OUTPUT, in a user's repository that is not the checkout.
The apt step (the suite's machine has the packages) and the upload step (an action of GitHub's)
are not run; what the upload would keep is checked to be there. The GitLab template does the
same with the same commands."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import yaml

from tests.support.recipes import GITLAB_TEMPLATE, action, expressions, substitute

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


def test_the_actions_commands_install_fdkeeper_and_run_the_test_files(action_run):
    """The action's steps from a copy of the checkout (tests/install/conftest.py's from_source,
    beside the README's set-up): fdkeeper built from source into its venv, the test file run."""
    workspace, runner_temp, inputs = action_run.workspace, action_run.runner_temp, action_run.inputs
    installed = runner_temp / "fdkeeper-venv" / "bin"
    assert (installed / "fdkeeper").exists() and str(installed) in (runner_temp / "github_path").read_text()
    report = ET.parse(workspace / "out" / "report.xml").getroot()
    assert [case.get("name") for case in report.iter("testcase")]
    assert not [outcome for outcome in report.iter() if outcome.tag in ("failure", "error")]
    assert (workspace / "out" / "logs" / "latest" / "register-answer-tcp").is_dir()
    assert "register-answer-tcp" in (workspace / "fdkeeper-report.html").read_text()  # the html input's default
    # What the upload step keeps, under a name that differs per job and per shard.
    upload = next(step for step in action()["runs"]["steps"] if "upload-artifact" in step.get("uses", ""))
    kept = substitute(upload["with"]["path"], expressions(inputs, action_run.action_path)).split()
    assert kept == ["out/report.xml", "fdkeeper-report.html", "out/logs"] and upload["if"].startswith("always()")
    shard = inputs["shard"]
    assert action_run.outputs["artifact"] == "fdkeeper-logs-sip-tests" + ("-shard-1-of-1" if shard else "")


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
