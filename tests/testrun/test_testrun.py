"""`fdkeeper run`: test files, their checks, the scheduler, the JUnit report, the shipped
examples and the CI recipes that run them (real sipp, real Kamailio).

The JUnit report is validated three ways: against Jenkins' own junit-10.xsd (a local copy named
by FDKEEPER_JENKINS_XSD; the suite fetches nothing) with xmllint, against docs/ci/junit.xsd (which
also holds Ant's one-outcome rule), and by `check_junit_schema`'s structural rules
(tests/support/junit.py).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fdkeeper.testrun import variables
from fdkeeper.testrun.command import run_command
from fdkeeper.testrun.junit import write_junit
from fdkeeper.testrun.model import TestFileError, load_test
from fdkeeper.testrun.results import ERROR, FAILED, PASSED, XFAILED, StepResult, TestResult
from fdkeeper.testrun.steps import screen_counts, trace_options
from tests.support.junit import cases_by_class, check_junit_schema, outcome_tags, xmllint_schema
from tests.support.paths import REPO

EXAMPLES = REPO / "docs" / "examples"
CI_DIR = REPO / "docs" / "ci"
# The README's set-up command, and what test_shipped_examples_pass runs (from the repo root).
INSTALL_COMMAND = "bash .ci/install"
EXAMPLES_COMMAND = ".venv/bin/fdkeeper run docs/examples/*.yaml --junit report.xml"


def fdkeeper_run_command(*args: str) -> list[str]:
    """`fdkeeper run ARGS` with the interpreter running the suite."""
    from fdkeeper import cli

    entry = ["-m", "fdkeeper", "run"] if "run" in cli.main.commands else ["-m", "fdkeeper.testrun.command"]
    return [sys.executable, *entry, *args]


def fdkeeper_run(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(fdkeeper_run_command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------
# the test file: one line naming the file, the step and the field
# --------------------------------------------------------------------------

GOOD = """
sut: embedded
steps:
  - name: register
    sipp: -sf x.xml -t t1 ${{sut}}
  - name: answer
    after: register
    timeout: {timeout}
    sipp: [-sf, y.xml, -t, t1, -p, "${{free_port:a}}"]
"""


def test_a_bad_timeout_names_the_file_the_step_and_the_field(tmp_path):
    path = write(tmp_path, GOOD.format(timeout="soon"), "reg.yaml")
    with pytest.raises(TestFileError) as error:
        load_test(path)
    assert str(error.value) == f"fdkeeper: {path}: step 'answer': field 'timeout': expected seconds, got 'soon'"


def test_a_good_file_reads_into_steps(tmp_path):
    spec = load_test(write(tmp_path, GOOD.format(timeout="30s")))
    assert spec.name == "t" and str(spec.sut) == "embedded"
    register, answer = spec.steps
    assert register.args == ["-sf", "x.xml", "-t", "t1", "${sut}"]
    assert answer.after == ("register",) and answer.timeout == 30.0 and answer.expect.exit == 0


@pytest.mark.parametrize(
    "text, where",
    [
        ("steps: []", "field 'steps': no steps: a test needs at least one step"),
        ("stepz: []", "field 'stepz': unknown field"),
        ("steps:\n  - {name: a, sipp: -v, after: b}", "step 'a': field 'after': no step named 'b'"),
        (
            "steps:\n  - {name: a, sipp: -v, after: b}\n  - {name: b, sipp: -v, ready: a}",
            "step 'a': field 'after': the steps wait for each other",
        ),
        (
            "steps:\n  - {name: a, command: ls, expect: {successful: 1}}",
            "step 'a': field 'expect': call counts are read from sipp",
        ),
        (
            "steps:\n  - {name: a, command: ls}\n  - {name: b, sipp: -v, ready: a}",
            "step 'b': field 'ready': 'a' is a command",
        ),
        ("steps:\n  - {name: a, sipp: '-v ${nope}'}", "step 'a': field 'sipp': unknown variable ${nope}"),
        ("steps:\n  - {name: a, sipp: '-v ${sut}'}", "step 'a': field 'sipp': unknown variable ${sut}"),
        ("steps:\n  - {name: a}", "step 'a': field 'sipp': expected exactly one of"),
        (
            "steps:\n  - {name: a, sipp: -v, expect: {failed: -1}}",
            "step 'a': field 'expect.failed': expected a whole number",
        ),
        ("steps:\n  - {name: a, sipp: -v, wait: -2}", "step 'a': field 'wait': expected seconds (0 or more)"),
        ("steps:\n  - {name: a/b, sipp: -v}", "step 'a/b': field 'name': expected letters"),
        ("sut: nowhere\nsteps:\n  - {name: a, sipp: -v}", "field 'sut': expected 'embedded' or HOST:PORT"),
        (
            "sut: 10.0.0.1:5060\ntransport: tls\nsteps:\n  - {name: a, sipp: -v}",
            "field 'transport': only an embedded SuT",
        ),
        ("steps:\n  - {name: a, sipp: -v\n", "line 3: not valid YAML: expected ',' or '}'"),
    ],
)
def test_bad_files_say_where_in_one_line(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(TestFileError) as error:
        load_test(path)
    message = str(error.value)
    assert message.startswith(f"fdkeeper: {path}: ") and where in message
    assert "\n" not in message


def test_a_bad_file_is_an_error_entry_of_its_own_and_the_others_run(tmp_path):
    good = write(tmp_path, "steps:\n  - {name: a, command: 'touch ran'}", "good.yaml")
    bad = write(tmp_path, GOOD.format(timeout="soon"), "bad.yaml")
    also_good = write(tmp_path, "steps:\n  - {name: b, command: 'touch ran-too'}", "also-good.yaml")
    report = tmp_path / "r.xml"
    args = [str(good), str(bad), str(also_good), "--logs", str(tmp_path / "logs"), "--junit", str(report)]
    result = CliRunner().invoke(run_command, args)
    assert result.exit_code == 2, result.output  # bad input, though the good files passed
    assert f"{bad}: step 'answer': field 'timeout'" in result.output
    assert (tmp_path / "ran").exists() and (tmp_path / "ran-too").exists()
    check_junit_schema(report)
    cases = cases_by_class(report)
    assert outcome_tags(cases["good"]["a"]) == [] and outcome_tags(cases["also-good"]["b"]) == []
    error = cases["bad"]["bad"].find("error")
    assert error is not None and f"{bad}: step 'answer': field 'timeout'" in error.get("message")


def test_a_selection_that_matches_nothing_runs_nothing(tmp_path):
    good = write(tmp_path, "steps:\n  - {name: a, command: 'touch ran'}", "good.yaml")
    result = CliRunner().invoke(run_command, [str(good), "-k", "nothing", "--logs", str(tmp_path / "logs")])
    assert result.exit_code == 2 and "no test matches -k 'nothing'" in result.output
    assert not (tmp_path / "ran").exists() and not (tmp_path / "logs").exists()


def test_variables_and_free_ports():
    ports = {"a": 5071, "b": 5072}
    free_port = ports.__getitem__
    values = variables.resolve_declared({"users": "${here}/u.csv"}, {"here": "/x"}, free_port)
    text = "${users} -p ${free_port:a} -p ${free_port:a} ${free_port:b} $$HOME"
    assert variables.substitute(text, values, free_port) == "/x/u.csv -p 5071 -p 5071 5072 $HOME"


# --------------------------------------------------------------------------
# steps: sipp's traces and counts
# --------------------------------------------------------------------------


def test_trace_options_keep_what_the_step_gives(tmp_path):
    added, files = trace_options(["-sf", "a.xml", "-stf", "mine.csv"], tmp_path, "s")
    assert files["stat"] == Path("mine.csv") and files["screen"] == tmp_path / "s.screen.log"
    assert "-stf" not in added and "-screen_file" in added and "-nostdin" in added


def test_counts_from_the_final_screen_when_there_is_no_statistics_file():
    screen = (
        "  Successful call        |        0                  |        7                 \n"
        "  Failed call            |        1                  |        2                 \n"
    )
    assert screen_counts(screen) == (7, 2)
    assert screen_counts("nothing") == (None, None)


def test_commands_run_in_order_and_a_timeout_kills_and_fails(tmp_path):
    test = write(
        tmp_path,
        """
steps:
  - {name: first, command: "sh -c 'echo one > order'"}
  - {name: second, after: first, command: "sh -c 'echo two >> order; exec tail -f /dev/null'", timeout: 1}
  - {name: never, after: second, command: "touch never"}
""",
    )
    result = CliRunner().invoke(
        run_command, [str(test), "--logs", str(tmp_path / "logs"), "--junit", str(tmp_path / "r.xml")]
    )
    assert result.exit_code == 1, result.output
    assert (tmp_path / "order").read_text() == "one\ntwo\n" and not (tmp_path / "never").exists()
    assert "second: FAIL" in result.output and "timed out after 1 s (killed)" in result.output
    steps = cases_by_class(tmp_path / "r.xml")["t"]
    assert steps["second"].find("failure").get("message") == "timed out after 1 s (killed)"
    assert outcome_tags(steps["first"]) == [] and steps["never"].find("skipped").get("type") == "skipped"
    assert (tmp_path / "logs" / "latest" / "t" / "second.out").exists()


def test_started_lets_a_step_run_beside_the_one_it_waits_for(tmp_path):
    # 'first' ends as soon as 'second' has run, so 'second' must start while 'first' runs.
    wait_for_second = "import os, time\nfor _ in range(200):\n    if os.path.exists('second-ran'): break\n    time.sleep(0.05)\nelse: raise SystemExit(3)"
    test = write(
        tmp_path,
        f"""
steps:
  - name: first
    command: [{sys.executable!r}, -c, {wait_for_second!r}]
  - {{name: second, started: first, command: "touch second-ran"}}
  - {{name: third, after: first, wait: 0.2, command: "touch third-ran"}}
""",
    )
    result = CliRunner().invoke(run_command, [str(test), "--logs", str(tmp_path / "logs")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "third-ran").exists()


def test_a_step_waiting_for_a_run_that_never_became_ready_is_skipped(tmp_path):
    test = write(
        tmp_path,
        """
steps:
  - {name: server, sipp: -v, expect: {exit: 99}}     # sipp -v prints its version, exits 99
  - {name: client, ready: server, command: "touch ran"}
""",
    )
    result = CliRunner().invoke(run_command, [str(test), "--logs", str(tmp_path / "logs")])
    assert result.exit_code == 1, result.output
    assert "'server' ended before it was ready to receive" in result.output and not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------
# JUnit: the rules of the common schemas
# --------------------------------------------------------------------------


def test_junit_report_meets_the_schemas_rules(tmp_path):
    out = tmp_path / "step.out"
    out.write_text("line\n\x1b[2Jescape and a \x00 nul\n")
    failing = StepResult(
        "call",
        FAILED,
        ["1 successful calls, expected 3"],
        exit=0,
        successful=1,
        failed=0,
        out=out,
        err=tmp_path / "none",
    )
    results = [
        TestResult("good", Path("docs/examples/good.yaml"), PASSED, tmp_path, [StepResult("a", PASSED)], 1.5),
        TestResult("bad", Path("bad.yaml"), FAILED, tmp_path, [failing], 2.0),
        TestResult("broken", Path("broken.yaml"), ERROR, tmp_path, error="could not run: no Kamailio"),
        TestResult("known", Path("known.yaml"), XFAILED, tmp_path, [failing], xfail="issue 11"),
    ]
    report = tmp_path / "report.xml"
    write_junit(report, results, 1796062593.8, 5.5)
    check_junit_schema(report)
    cases = cases_by_class(report)
    assert set(cases) == {"docs.examples.good", "bad", "broken", "known"}
    assert outcome_tags(cases["docs.examples.good"]["a"]) == []
    failure = cases["bad"]["call"].find("failure")
    assert failure.get("message") == "1 successful calls, expected 3" and "1 successful calls" in failure.text
    assert cases["bad"]["call"].find("system-out").text == "line\n\\x1b[2Jescape and a \\x00 nul\n"
    assert cases["broken"]["broken"].find("error").get("message") == "could not run: no Kamailio"
    assert cases["known"]["call"].find("skipped").get("type") == "xfail"


@pytest.mark.skipif(not shutil.which("xmllint"), reason="xmllint (libxml2-utils) is not installed")
def test_the_junit_schema_refuses_what_ci_systems_refuse(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text(
        '<testsuites><testsuite name="s" tests="1" failures="0" errors="0" time="1" '
        'timestamp="2026-11-30T18:59:17" hostname="h"><testcase name="c" classname="c" time="1">'
        '<failure type="t"/><skipped/></testcase></testsuite></testsuites>'
    )  # two outcomes
    checked = xmllint_schema(bad)
    assert checked.returncode != 0 and "skipped" in checked.stderr


def jenkins_junit_xsd() -> Path:
    """Jenkins' own junit-10.xsd, where FDKEEPER_JENKINS_XSD names a local copy of it (pytest's
    source distribution carries one for its own tests). Never fetched: the suite reaches
    nothing but loopback, so without the variable this check is skipped and docs/ci/junit.xsd
    (which holds the same types and Ant's one-outcome rule) is what the report is held to."""
    named = os.environ.get("FDKEEPER_JENKINS_XSD", "")
    if not named:
        pytest.skip("set FDKEEPER_JENKINS_XSD to a local junit-10.xsd to validate against Jenkins' own schema")
    xsd = Path(named)
    if not xsd.is_file():
        pytest.fail(f"FDKEEPER_JENKINS_XSD={named} is not a file")
    return xsd


@pytest.mark.skipif(not shutil.which("xmllint"), reason="xmllint (libxml2-utils) is not installed")
def test_the_report_validates_against_jenkins_junit_10_xsd(tmp_path):
    xsd = jenkins_junit_xsd()
    out = tmp_path / "step.out"
    out.write_text("last lines\n")
    failing = StepResult(
        "call",
        FAILED,
        ["1 successful calls, expected 3"],
        exit=0,
        successful=1,
        failed=0,
        out=out,
        err=tmp_path / "none",
    )
    report = tmp_path / "report.xml"
    write_junit(
        report,
        [
            TestResult("good", Path("good.yaml"), PASSED, tmp_path, [StepResult("a", PASSED)], 1.5),
            TestResult("bad", Path("bad.yaml"), FAILED, tmp_path, [failing], 2.0),
            TestResult("broken", Path("broken.yaml"), ERROR, tmp_path, error="could not run"),
            TestResult("known", Path("known.yaml"), XFAILED, tmp_path, [failing], xfail="why"),
        ],
        1796062593.8,
        5.5,
    )
    checked = xmllint_schema(report, xsd)
    assert checked.returncode == 0, checked.stderr


# --------------------------------------------------------------------------
# the shipped examples and the CI recipes (end to end)
# --------------------------------------------------------------------------


def test_ci_recipes_use_the_action_and_the_template_from_a_users_repository():
    """The recipes are for a user's own repository: the GitHub workflow uses fdkeeper's action
    (action.yml) over a matrix of shards, the GitLab one extends the template with `parallel:`;
    tests/install/test_action.py runs the action's and the template's commands themselves."""
    github = yaml.safe_load((CI_DIR / "github-actions.yml").read_text())
    assert not [step for job in github["jobs"].values() for step in job["steps"] if "run" in step]
    tests_job = github["jobs"]["sip-tests"]
    [action] = [step for step in tests_job["steps"] if step.get("uses", "").startswith("OWNER/fdkeeper@")]
    assert action["with"]["shard"] == "${{ matrix.shard }}/3" and tests_job["strategy"]["matrix"]["shard"] == [1, 2, 3]
    reporters = [step for step in github["jobs"]["report"]["steps"] if "junit" in step.get("uses", "")]
    assert reporters and reporters[0]["with"]["report_paths"] == "**/fdkeeper-report.xml"
    assert github["jobs"]["report"]["permissions"]["checks"] == "write" and "checks" not in github["permissions"]
    gitlab = yaml.safe_load((CI_DIR / "gitlab-ci.yml").read_text())
    assert gitlab["include"][0]["remote"].endswith("/docs/ci/gitlab-template.yml")
    job = gitlab["sip-tests"]
    assert job["extends"] == ".fdkeeper" and job["parallel"] == 3 and "script" not in job


def test_install_command_is_the_readmes():
    assert f"{INSTALL_COMMAND} && .venv/bin/fdkeeper demo" in (REPO / "README.md").read_text()


# The shipped examples run as shares of a CI matrix do (--shard K/N), side by side: each
# example has a keeper and an embedded Kamailio of its own, and most of a run's time is
# sipp's and Kamailio's waiting, so two shares take about half the time of one run.
# tests/testrun/test_shard.py proves that the shares hold every file exactly once.
EXAMPLE_SHARDS = 2


def test_shipped_examples_pass(tmp_path):
    """EXAMPLES_COMMAND from the repo root (the suite's own interpreter for .venv/bin/fdkeeper;
    the reports and logs go to tmp_path), in EXAMPLE_SHARDS shares run side by side."""
    program, *args = shlex.split(EXAMPLES_COMMAND)
    assert program == ".venv/bin/fdkeeper" and args[0] == "run"
    tests = sorted(glob.glob(args[1], root_dir=REPO))
    assert len(tests) >= 4
    shards = [tmp_path / f"shard-{index}" for index in range(1, EXAMPLE_SHARDS + 1)]
    runs = [
        subprocess.Popen(
            fdkeeper_run_command(
                *tests,
                "--shard",
                f"{index}/{EXAMPLE_SHARDS}",
                "--junit",
                str(shard / "report.xml"),
                "--logs",
                str(shard / "logs"),
            ),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index, shard in enumerate(shards, 1)
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0] * EXAMPLE_SHARDS, "\n".join(outputs)
    tests = {}
    for shard in shards:
        check_junit_schema(shard / "report.xml")
        tests.update({name.rsplit(".", 1)[-1]: steps for name, steps in cases_by_class(shard / "report.xml").items()})
    assert {"register-answer-tcp", "register-answer-tls", "many-users-tn", "caller-callee-tcp"} <= set(tests)
    assert tests["register-answer-tcp"].keys() == {"register", "answer", "call"}
    assert all(
        outcome_tags(case) == []
        for test, steps in tests.items()
        if test != "caller-callee-tcp"
        for case in steps.values()
    )
    [latest] = [
        shard / "logs" / "latest" for shard in shards if (shard / "logs" / "latest" / "register-answer-tcp").is_dir()
    ]
    assert (latest / "register-answer-tcp" / "answer.stat.csv").exists()
    assert (latest / "register-answer-tcp" / "keeper.log").exists()
    known = [case.find("skipped") for case in tests["caller-callee-tcp"].values() if case.find("skipped") is not None]
    if known:  # issue 11, item 1: the example says it is expected to fail
        pytest.xfail("caller and callee both through fdkeeper: " + known[0].get("message"))


def test_no_example_sleeps():
    for path in EXAMPLES.rglob("*.yaml"):
        assert not re.search(r"\bsleep\b", path.read_text()), path


def test_a_wrong_call_count_fails_naming_the_step(tmp_path):
    report = tmp_path / "report.xml"
    result = fdkeeper_run(
        os.fspath(EXAMPLES / "failing" / "wrong-count.yaml"),
        "--junit",
        str(report),
        "--logs",
        str(tmp_path / "logs"),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED   wrong-count: step 'call': 1 successful calls, expected 3" in result.stdout
    check_junit_schema(report)
    call = cases_by_class(report)["wrong-count"]["call"]  # an absolute path: the test's name alone
    assert call.find("failure").get("message") == "1 successful calls, expected 3"
    assert "Successful call" in call.find("system-out").text  # the step's last lines
