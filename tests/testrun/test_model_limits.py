"""Test files that are not what a test file is (bytes that are not UTF-8, endless nesting,
names too long for a file name, waits of years, no steps, megabytes) are refused in one line
naming the file and the fix, never with a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fdkeeper.testrun.model import MAX_FILE_BYTES, MAX_NAME_BYTES, MAX_SECONDS, TestFileError, load_test

ONE_STEP = "steps:\n  - {name: a, command: ls}\n"


@pytest.mark.parametrize(
    "data, says",
    [
        (b"steps:\n  - {name: a\xff, command: ls}\n", "line 2: not UTF-8 (byte 0xff); save the file as UTF-8"),
        (b"steps: " + b"[" * 100_000 + b"]" * 100_000, "nests lists or mappings too deeply"),
        (b"steps: " + b"{a: " * 100_000 + b"}" * 100_000, "nests lists or mappings too deeply"),
        (
            f"name: {'x' * 300}\n{ONE_STEP}".encode(),
            f"field 'name': 300 bytes long ('xxxxxxxxxxxxxxxxxxxx'...); at most {MAX_NAME_BYTES}",
        ),
        (
            f"name: {'é' * 150}\n{ONE_STEP}".encode(),  # 150 characters, 300 bytes
            "field 'name': 300 bytes long",
        ),
        (
            f"steps:\n  - {{name: {'s' * 256}, command: ls}}\n".encode(),
            f"step '{'s' * 40}...': field 'name': 256 bytes long",
        ),
        (
            b"steps:\n  - {name: a, command: ls, wait: 1e10}\n",
            f"step 'a': field 'wait': expected seconds (0 or more) up to {MAX_SECONDS:.0f} (a day), got '1e10'",
        ),
        (b"steps:\n  - {name: a, command: ls, wait: .inf}\n", "field 'wait': expected seconds (0 or more) up to"),
        (
            b"steps:\n  - {name: a, command: ls, timeout: 100000}\n",
            "field 'timeout': expected seconds (above 0) up to",
        ),
        (b"steps:\n  - {name: a, command: ls, timeout: 0}\n", "field 'timeout': expected seconds (above 0"),
        (b"steps: []\n", "field 'steps': no steps: a test needs at least one step"),
        (b"steps: {a: 1}\n", "field 'steps': expected a list of steps, got a mapping"),
        (b"#" * (MAX_FILE_BYTES + 1), f"larger than {MAX_FILE_BYTES // 1024} KiB"),
    ],
)
def test_a_file_that_is_no_test_file_is_one_line_naming_it(tmp_path: Path, data: bytes, says: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_bytes(data)
    with pytest.raises(TestFileError) as error:
        load_test(path)
    message = str(error.value)
    assert message.startswith(f"fdkeeper: {path}: ") and says in message
    assert "\n" not in message and len(message) < 300


def test_the_bounds_themselves_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    name = "n" * MAX_NAME_BYTES
    path.write_text(f"name: {name}\nsteps:\n  - {{name: {name}, command: ls, wait: 0, timeout: {MAX_SECONDS:.0f}}}\n")
    spec = load_test(path)
    assert spec.name == name and spec.steps[0].timeout == MAX_SECONDS and spec.steps[0].wait == 0
