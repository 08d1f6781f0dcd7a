"""The logs folder is opened as the keeper's state directory is: a planted link, a folder of
another user or one others can write to is refused in one line naming it and `--logs DIR`;
run and test folders are 0700, log files are created through no link."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fdkeeper.testrun import logs


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_run_and_test_folders_are_private_and_latest_points_at_the_run(tmp_path: Path) -> None:
    base = tmp_path / "fdkeeper-logs"
    run_dir = logs.new_run_dir(base)
    assert run_dir.parent == base and mode(base) == 0o700 and mode(run_dir) == 0o700
    assert os.readlink(base / logs.LATEST) == run_dir.name
    first, second = logs.folder_for_test(run_dir, "a b"), logs.folder_for_test(run_dir, "a b")
    assert (first.name, second.name) == ("a_b", "a_b-2") and mode(first) == 0o700
    with logs.create_log_file(first / "step.out") as out:
        out.write(b"hello")
    assert (first / "step.out").read_bytes() == b"hello" and mode(first / "step.out") == 0o600


def test_a_planted_link_as_the_logs_folder_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "fdkeeper-logs").symlink_to(elsewhere)
    with pytest.raises(logs.LogsNotPrivate) as error:
        logs.new_run_dir(tmp_path / "fdkeeper-logs")
    assert "fdkeeper-logs is a symbolic link" in str(error.value) and "--logs DIR" in str(error.value)
    assert list(elsewhere.iterdir()) == []


def test_a_logs_folder_others_can_write_to_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "logs"
    base.mkdir()
    base.chmod(0o777)
    with pytest.raises(logs.LogsNotPrivate, match=r"writable by other users \(mode 0777\).*--logs DIR"):
        logs.new_run_dir(base)


@pytest.mark.skipif(os.getuid() != 0, reason="making a folder of another user needs root")
def test_a_logs_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "logs"
    base.mkdir(mode=0o755)
    os.chown(base, 65534, 65534)
    with pytest.raises(logs.LogsNotPrivate, match=r"belongs to uid 65534.*not to you.*--logs DIR"):
        logs.new_run_dir(base)


def test_a_log_file_planted_as_a_link_is_not_written_through(tmp_path: Path) -> None:
    folder = logs.folder_for_test(logs.new_run_dir(tmp_path / "logs"), "t")
    target = tmp_path / "target"
    target.write_text("untouched")
    (folder / "step.out").symlink_to(target)
    with pytest.raises(logs.LogsNotPrivate, match=r"step\.out is a symbolic link"):
        logs.create_log_file(folder / "step.out")
    assert target.read_text() == "untouched"


def test_fdkeeper_run_refuses_a_linked_default_logs_folder_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("steps:\n  - {name: a, command: 'touch ran'}\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "fdkeeper-logs").symlink_to(tmp_path / "elsewhere")
    result = subprocess.run(
        [sys.executable, "-m", "fdkeeper", "run", "t.yaml", "--sipp", "/bin/true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "fdkeeper-logs is a symbolic link" in lines[0] and "--logs DIR" in lines[0]
    assert not (tmp_path / "ran").exists() and list((tmp_path / "elsewhere").iterdir()) == []
