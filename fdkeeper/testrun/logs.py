"""The log folder of a run: `<logs>/<timestamp>/<test>/`, with `<logs>/latest` pointing at
the newest run. Older runs beyond ``KEEP_RUNS`` are removed unless the caller keeps them.

The logs base (default `./fdkeeper-logs`, which another user may have made first, e.g. under
/tmp) is treated as the keeper's state directory is (fdkeeper.statedir): never followed when
it is a link, refused unless it is ours and writable by nobody else; the run and test folders
are created 0700 relative to their checked parent's descriptor, and step output is created
through ``create_log_file`` (O_NOFOLLOW), so a run as root never writes it through another
user's links.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from fdkeeper.errors import FdkeeperError
from fdkeeper.statedir import NotPrivate, PrivateFolder, check_private, open_unlinked, resolve_directory

KEEP_RUNS = 10
LATEST = "latest"
_RUN_NAME = re.compile(r"^\d{8}-\d{6}(-\d+)?$")
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ELSEWHERE = "pass --logs DIR (a folder of yours)"


class LogsNotPrivate(NotPrivate):
    """The logs folder is a link, not ours, or writable by others: writing there is refused."""


LOGS_FOLDER = PrivateFolder("the logs folder", "read or redirect your logs", "links", _ELSEWHERE, LogsNotPrivate)


def new_run_dir(base: Path, keep_all: bool = False) -> Path:
    """Create this run's folder (0700) under the checked base, point `latest` at it and prune older runs."""
    base = resolve_directory(base)  # the base's parents' links resolved once; the base itself is checked
    _make_base(base)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with _opened(base) as base_fd:
        name, suffix = stamp, 1
        while not _made(name, base_fd, base):  # two runs within one second
            suffix += 1
            name = f"{stamp}-{suffix}"
        _point_latest(base_fd, name)
    if not keep_all:
        _prune(base, KEEP_RUNS)
    return base / name


def folder_for_test(run_dir: Path, name: str) -> Path:
    """A folder (0700) for one test; a second test of the same name gets `name-2`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "test"
    candidate, number = safe, 1
    with _opened(run_dir) as run_fd:
        while not _made(candidate, run_fd, run_dir):
            number += 1
            candidate = f"{safe}-{number}"
    return run_dir / candidate


def create_log_file(path: Path) -> IO[bytes]:
    """open(path, "wb") for a step's output, never through a link planted as the file (the
    folders themselves were made 0700 and checked above; the pytest plugin's are its tmp_path's)."""
    stream: IO[bytes] = open_unlinked(path, "wb", refusal=LogsNotPrivate)
    return stream


# ---------------------------------------------------------------- the checked folders


def _make_base(base: Path) -> None:
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(base, 0o700)  # mkdir never follows a link: a planted one makes EEXIST, checked next
    except FileExistsError:
        pass
    except OSError as error:
        raise FdkeeperError(f"fdkeeper: cannot create the logs folder {base}: {error.strerror}; {_ELSEWHERE}") from None


@contextmanager
def _opened(folder: Path) -> Iterator[int]:
    """A descriptor of ``folder`` itself (never a link), checked to be ours and private."""
    try:
        fd = os.open(folder, _DIRECTORY_FLAGS)
    except OSError as error:
        raise _refusal(folder, error) from None
    try:
        check_private(folder, os.fstat(fd), LOGS_FOLDER)
        yield fd
    finally:
        os.close(fd)


def _refusal(folder: Path, error: OSError) -> FdkeeperError:
    if error.errno in (errno.ELOOP, errno.ENOTDIR):  # O_DIRECTORY|O_NOFOLLOW on a link: ENOTDIR
        with suppress(OSError):
            target = os.readlink(folder)
            return LogsNotPrivate(
                f"fdkeeper: the logs folder {folder} is a symbolic link (to {target}), which fdkeeper does not "
                f"follow: another user may have planted it; remove it or {_ELSEWHERE}"
            )
    if error.errno == errno.ENOTDIR:
        return FdkeeperError(f"fdkeeper: the logs folder {folder} is not a folder; remove it or {_ELSEWHERE}")
    return FdkeeperError(f"fdkeeper: cannot open the logs folder {folder}: {error.strerror}; {_ELSEWHERE}")


def _made(name: str, parent_fd: int, parent: Path) -> bool:
    """Create folder ``name`` (0700) in the checked parent; False when the name is taken."""
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        return False
    except OSError as error:
        raise FdkeeperError(f"fdkeeper: cannot create {parent / name}: {error.strerror}; {_ELSEWHERE}") from None
    return True


def _point_latest(base_fd: int, run_name: str) -> None:
    """Replace the `latest` symlink atomically (readers never see it missing)."""
    temporary = f".{LATEST}.{os.getpid()}"
    with suppress(FileNotFoundError):
        os.unlink(temporary, dir_fd=base_fd)
    os.symlink(run_name, temporary, dir_fd=base_fd)
    os.replace(temporary, LATEST, src_dir_fd=base_fd, dst_dir_fd=base_fd)


def _prune(base: Path, keep: int) -> None:
    runs = sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and _RUN_NAME.match(p.name))
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)  # rmtree does not follow links (fd-based where the OS allows)
