"""The shim's tests again with the shim built with AddressSanitizer and UBSan (issue 10, Shim).

As cwrap's socket_wrapper does in its CI: tests/shim/test_shim.py (without the real-sipp cases, which
the plain run covers), tests/shim/test_shim_malformed.py and tests/shim/test_shim_rewrite.py run in
a child pytest with SHIM_TEST_SANITIZE=1 (helpers/shimbuild.py's flags, the ASan runtime preloaded
first). UBSan is made fatal, so any report fails the program and so the test; the child's output is
checked for a sanitizer report too. The shim is compiled once, here (SHIM_TEST_BUILT), and the
child runs its tests WORKERS at a time under xdist when it is installed: they mostly wait on
sockets and timeouts, not on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.shim import EXTRA_CFLAGS, SANITIZE_CFLAGS, asan_runtime, build_shim_and_program

WORKERS = 3

SANITIZER_REPORTS = (
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
    "SUMMARY: UndefinedBehaviorSanitizer",
)


def _asan_available() -> bool:
    try:
        return bool(asan_runtime())
    except Exception:
        return False


@pytest.mark.skipif(not _asan_available(), reason="gcc's AddressSanitizer runtime is not installed")
def test_shim_tests_pass_under_asan_and_ubsan():
    built = Path(tempfile.mkdtemp(prefix="fdk-san-build-"))
    library = build_shim_and_program(built, [*EXTRA_CFLAGS, *SANITIZE_CFLAGS])["lib"]  # without a warning
    assert b"__asan_" in Path(library).read_bytes() and b"__ubsan_" in Path(library).read_bytes()
    env = {
        **os.environ,
        "SHIM_TEST_SANITIZE": "1",
        "SHIM_TEST_BUILT": str(built),
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1",
    }
    side_by_side = ["-n", str(WORKERS)] if importlib.util.find_spec("xdist") is not None else []
    basetemp = tempfile.mkdtemp(prefix="fdk-san-")  # short: the tests bind unix sockets under it
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *side_by_side,
            "--basetemp",
            basetemp,
            "tests/shim/test_shim.py",
            "tests/shim/test_shim_malformed.py",
            "tests/shim/test_shim_rewrite.py",
            "-k",
            "not real_sipp",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    shutil.rmtree(basetemp, ignore_errors=True)
    shutil.rmtree(built, ignore_errors=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert not [report for report in SANITIZER_REPORTS if report in output], output[-6000:]
    assert " passed" in output and " failed" not in output, output[-3000:]
