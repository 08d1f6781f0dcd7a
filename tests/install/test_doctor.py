"""`fdkeeper doctor`: each check's answer on this machine (the suite's machine has what the basic
path needs), and what it says when something is missing: the thing, and the command that installs it."""

from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

from click.testing import CliRunner

from fdkeeper import doctor
from fdkeeper.cli import main
from fdkeeper.modes.preload import shim_path

BASIC_PATH = {"sipp", "shim", "kamailio", "open-file limit"}


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {check.name: check for check in checks}


def test_each_check_on_this_machine():
    checks = by_name(doctor.run_checks())
    sipp = shutil.which(os.environ.get("FDKEEPER_SIPP") or "sipp")
    assert checks["sipp"].ok == (sipp is not None) and checks["sipp"].needed
    if sipp:
        assert checks["sipp"].found.startswith(sipp) and "SIPp v" in checks["sipp"].found
        assert "linked" in checks["sipp linkage"].found
    shim = shim_path()
    assert checks["shim"].ok == bool(shim and shim.exists())
    assert checks["C compiler"].ok == bool(shutil.which("cc") or shutil.which("gcc"))
    kamailio = shutil.which("kamailio") or shutil.which("kamailio", path="/usr/sbin:/usr/local/sbin:/sbin")
    assert checks["kamailio"].ok == (kamailio is not None)
    for module in ("tls.so", "websocket.so"):
        present = (
            any(Path("/usr/lib").glob(f"*/kamailio/modules/{module}"))
            or Path(f"/usr/lib/kamailio/modules/{module}").exists()
        )
        assert checks[f"kamailio {module}"].ok == present, checks[f"kamailio {module}"]
        assert not checks[f"kamailio {module}"].needed  # the basic path is TCP
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert f"soft {soft}, hard" in checks["open-file limit"].found
    assert "ptrace" in checks
    # Every missing thing that can be installed says how.
    assert all(check.fix for check in checks.values() if not check.ok and check.name != "ptrace")
    # The suite itself runs the basic path here, so the machine passes.
    assert {name for name, check in checks.items() if check.needed} >= BASIC_PATH
    assert doctor.healthy(list(checks.values()))


def test_the_command_exits_0_and_says_every_check():
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-1] == "fdkeeper doctor: all the basic path needs is here"
    assert any(line.startswith("ok") and " sipp " in line for line in lines)
    as_json = CliRunner().invoke(main, ["doctor", "--json"])
    report = json.loads(as_json.output)
    assert as_json.exit_code == 0 and report["ok"] is True
    assert {"name", "ok", "found", "needed", "fix"} == set(report["checks"][0])


def test_a_missing_sipp_is_named_with_the_command_that_installs_it():
    result = CliRunner().invoke(main, ["doctor"], env={"FDKEEPER_SIPP": "/nonexistent"})
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    missing = next(index for index, line in enumerate(lines) if line.startswith("MISSING") and " sipp " in line)
    assert "/nonexistent" in lines[missing]
    assert lines[missing + 1].split() == ["fix:", *doctor.apt_install("sip-tester").split()]
    assert not any("sipp linkage" in line for line in lines)  # nothing to say of a sipp not found
    report = json.loads(CliRunner().invoke(main, ["doctor", "--json"], env={"FDKEEPER_SIPP": "/nonexistent"}).output)
    assert report["ok"] is False
    [sipp] = [check for check in report["checks"] if check["name"] == "sipp"]
    assert sipp["needed"] and not sipp["ok"] and sipp["fix"].endswith("apt-get install -y sip-tester")


def test_a_missing_kamailio_module_names_its_debian_package(tmp_path):
    missing = doctor.check_kamailio_module(str(tmp_path), "websocket.so", "WebSocket")
    assert not missing.ok and missing.fix and missing.fix.endswith("install -y kamailio-websocket-modules")
    (tmp_path / "tls.so").write_bytes(b"")
    assert doctor.check_kamailio_module(str(tmp_path), "tls.so", "TLS").ok


def test_a_library_not_built_says_to_reinstall_with_a_compiler():
    check = doctor.check_library("shim", "fdkeeper._not_built", True, "the preload mode")
    assert not check.ok and check.needed and check.fix
    assert "gcc libc6-dev" in check.fix and "pip install --force-reinstall --no-deps" in check.fix


def test_a_low_open_file_limit_is_missing(monkeypatch):
    monkeypatch.setattr(doctor.resource, "getrlimit", lambda _which: (256, 512))
    check = doctor.check_open_files()
    assert not check.ok and check.needed and "hard 512" in check.found and check.fix and "nofile" in check.fix
