"""Safe to cancel: SIGTERM, SIGHUP or SIGINT to `fdkeeper run` stops every step's process
group, the test's keeper and its embedded Kamailio, removes its temporary directory,
writes the JUnit (what did not finish marked as such) and exits 128 + the signal; the same
for the pytest plugin's fixtures when pytest is interrupted, and for
docs/ci/register-answer.sh on any exit. Also the scheduler's own bounds: a step that cannot
start followed by one after it, and a wait no number makes endless.

Real processes throughout: `fdkeeper run` in a subprocess against the embedded Kamailio with
real sipp, an inner pytest, the shell script; the process trees are read with psutil.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from fdkeeper.testrun.command import run_command
from fdkeeper.testrun.scheduler import MAX_WAIT, bounded_wait


def write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------
# the scheduler's own bounds
# --------------------------------------------------------------------------


def test_a_step_that_cannot_start_skips_the_step_after_it(tmp_path):
    test = write(
        tmp_path,
        """
steps:
  - {name: broken, command: /nonexistent/program}
  - {name: next, after: broken, command: "touch ran"}
  - {name: other, command: "true", wait: 0.5}
""",
    )
    result = CliRunner().invoke(run_command, [str(test), "--logs", str(tmp_path / "logs")])
    assert result.exit_code == 1, result.output
    assert "could not start" in result.output and "list.remove" not in result.output
    assert "next: skip" in result.output and not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    ("wait", "kept"), [(1e10, MAX_WAIT), (math.inf, MAX_WAIT), (math.nan, 0.0), (-3.0, 0.0), (0.5, 0.5)]
)
def test_no_wait_is_endless(wait, kept):
    assert bounded_wait(wait) == kept
