"""Installing fdkeeper without a checkout: the sdist carries the C sources, the scenarios and the
Kamailio configurations; the wheel pip builds from it has the shim and the pump compiled, and
installed into a fresh venv it runs a test file from a directory that is not the checkout. The
README's set-up command works from a clean copy of the checkout with nothing but the system's own
Python, as on a stock Debian machine."""

from __future__ import annotations

import subprocess
import tarfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from tests.support.checkout import STOCK_PATH
from tests.support.paths import REPO
from tests.support.recipes import readme_commands, readme_setup_skipped, run_stock


def test_sdist_carries_the_c_sources_scenarios_and_configs(sdist, wheel):
    """An sdist (what `pip download` or a package index hands out) holds everything setup.py
    compiles from (helpers/: sources, headers, shimbuild.py), and the wheel pip builds from it
    has the shim, the pump and the ptrace send stub compiled, the scenarios and the Kamailio configurations."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    with tarfile.open(sdist) as archive:
        packed = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = [name for name in tracked if name.startswith(("helpers/", "scenarios/")) and name not in packed]
    assert not missing, f"the sdist lacks {missing} (MANIFEST.in)"
    assert "action.yml" in packed
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    libraries = [name for name in names if name.endswith(".so")]
    assert all(any(part in name for name in libraries) for part in ("_shim", "_tlspump", "_sendstub")), libraries
    scenarios = sorted(Path(name).name for name in names if name.startswith("fdkeeper/scenarios/"))
    shipped = sorted(path.name for path in (REPO / "scenarios").iterdir() if path.suffix in (".xml", ".csv"))
    assert scenarios == shipped, "the wheel built from the sdist lacks scenarios (MANIFEST.in, fdkeeper/scenarios)"
    assert "fdkeeper/testbed/configs/sut.cfg" in names


def test_the_wheel_runs_a_test_file_from_a_fresh_venv_outside_the_checkout(gitlab_template_run):
    """What a user without a checkout does: pip install the wheel into a venv of their own, put
    a test file in their repository, run `fdkeeper run` on it against the embedded SuT. The
    GitLab template's job does exactly that (a venv of the system's Python, the wheel, the run
    from the user's repository on a stock PATH; tests/install/conftest.py's gitlab_template_run,
    whose run test_action.py checks): here, that the venv's fdkeeper is whole and its own."""
    venv, work = gitlab_template_run.venv, gitlab_template_run.workspace
    assert gitlab_template_run.done.returncode == 0, gitlab_template_run.done.stdout + gitlab_template_run.done.stderr
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    environment = {"HOME": str(work), "PATH": f"{venv / 'bin'}:{STOCK_PATH}"}

    # Run from elsewhere so the checkout is not on sys.path: only the installed copy counts.
    probe = (
        "from fdkeeper.modes.preload import shim_path; "
        "from fdkeeper import testbed; "
        "import os; print(shim_path()); print(os.path.exists(shim_path())); "
        "print((testbed.SCENARIOS_DIR / 'uac-register.xml').exists()); "
        # The Kamailio configurations are package data: rendering one starts nothing.
        "print('request_route' in testbed.Kamailio('/fdkeeper-probe').config_text()); "
        # The TLS pump is built too (optional for setuptools: a silent miss would cost speed only).
        "from fdkeeper.keeper import tlspump; print(tlspump._library_path() is not None)"
    )
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, cwd=work, env=environment
    )
    shim, exists, scenarios, config, pump = result.stdout.split()
    assert shim.startswith(str(venv)) and exists == "True" and scenarios == "True", result.stderr
    assert config == "True" and pump == "True", result.stderr
    nm = subprocess.run(["nm", "-D", "--defined-only", shim], capture_output=True, text=True)
    assert " T connect" in nm.stdout and " T epoll_wait" in nm.stdout

    report = ET.parse(work / gitlab_template_run.variables["FDKEEPER_JUNIT"]).getroot()
    assert [case.get("name") for case in report.iter("testcase")], ET.tostring(report, encoding="unicode")
    assert not [outcome for outcome in report.iter() if outcome.tag in ("failure", "error", "skipped")]


# --------------------------------------------------------------------------
# The README's two commands, from a clean copy, as on a stock machine
# --------------------------------------------------------------------------


def test_readme_commands_are_the_install_and_the_suite():
    setup, suite = readme_commands()
    assert setup.startswith("bash .ci/install && ") and setup.endswith(" demo"), setup
    # The suite's own tools (cppcheck, chromium) come with --tests; a user's set-up never installs them.
    assert suite.startswith("bash .ci/install --tests && ") and suite.endswith(" tests"), suite
    assert suite in (REPO / ".ci" / "run").read_text(), ".ci/run must run the README's test command"


@pytest.mark.skipif(readme_setup_skipped() is not None, reason=str(readme_setup_skipped()))
def test_readme_setup_command_works_from_a_clean_copy_with_the_system_python(readme_setup):
    """The set-up command ran beside the action's install (tests/install/conftest.py's from_source)."""
    checkout, bin_dir, installed = readme_setup.checkout, readme_setup.bin_dir, readme_setup.done
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "demo PASSED" in installed.stdout, installed.stdout + installed.stderr
    venv_config = (checkout / ".venv" / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in venv_config, venv_config
    assert (bin_dir / "fdkeeper").resolve() == (checkout / ".venv" / "bin" / "fdkeeper").resolve()

    started = time.monotonic()
    again = run_stock("bash .ci/install", checkout, bin_dir, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert time.monotonic() - started < 10, "nothing changed: the second install must skip pip"
    assert again.stderr.count("\n") == 1 and "fdkeeper install:" in again.stderr, again.stderr
    assert "not on PATH" in again.stderr, again.stderr  # bin_dir is not on the stock PATH

    linked = run_stock(f"{bin_dir}/fdkeeper --version", checkout.parent, bin_dir, timeout=30)
    assert linked.returncode == 0 and "version" in linked.stdout, linked.stdout + linked.stderr
