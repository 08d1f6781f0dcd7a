"""docs/ci/register-answer.sh as the tests run it: the script's path and the environment that
points it at a test's Kamailio, keeper and sipp (tests/core/test_readiness.py runs it as
documented, tests/testrun/test_cancel.py with a caller that fails)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fdkeeper import testbed
from tests.support.paths import REPO

REGISTER_ANSWER_SCRIPT = REPO / "docs" / "ci" / "register-answer.sh"


def register_answer_env(
    sipp_path: str, kamailio: testbed.Kamailio, keeper_dir: Path, users: Path, caller: str, answer_port: int
) -> dict[str, str]:
    """The script's variables (SUT, USERS, CALLER, SCENARIOS, ANSWER_PORT), this interpreter's
    `fdkeeper` first on PATH, and the keeper directory and sipp of the test."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FDKEEPER_DIR": str(keeper_dir),
        "FDKEEPER_SIPP": sipp_path,
        "SUT": kamailio.address,
        "USERS": str(users),
        "CALLER": caller,
        "SCENARIOS": str(testbed.SCENARIOS_DIR),
        "ANSWER_PORT": str(answer_port),
    }
