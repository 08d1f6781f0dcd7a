"""The shim's tests again with the shim built with AddressSanitizer and UBSan (issue 10, Shim).

As cwrap's socket_wrapper does in its CI: tests/shim/test_shim.py (without the real-sipp cases, which
the plain run covers) and tests/shim/test_shim_malformed.py run in a child pytest with
SHIM_TEST_SANITIZE=1 (helpers/shimbuild.py's flags, the ASan runtime preloaded first). UBSan is
made fatal, so any report fails the program and so the test; the child's output is checked for
a sanitizer report too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.support.paths import REPO
from tests.support.shim import asan_runtime

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
    env = {
        **os.environ,
        "SHIM_TEST_SANITIZE": "1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1",
    }
    basetemp = tempfile.mkdtemp(prefix="fdk-san-")  # short: the tests bind unix sockets under it
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
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
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert not [report for report in SANITIZER_REPORTS if report in output], output[-6000:]
    assert " passed" in output and " failed" not in output, output[-3000:]
