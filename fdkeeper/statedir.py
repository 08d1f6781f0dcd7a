"""Where a keeper lives: its private state directory and the files in it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fdkeeper.errors import FdkeeperError

SOCKET_NAME = "control.sock"
LOCK_NAME = "keeper.lock"
LOG_NAME = "keeper.log"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def default_directory() -> Path:
    """$FDKEEPER_DIR, else $XDG_RUNTIME_DIR/fdkeeper, else /tmp/fdkeeper-UID."""
    configured = os.environ.get("FDKEEPER_DIR")
    if configured:
        return Path(configured)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "fdkeeper"
    return Path(f"/tmp/fdkeeper-{os.getuid()}")


def resolve_directory(option: str | os.PathLike | None) -> Path:
    return Path(option).absolute() if option else default_directory().absolute()


def socket_path(directory: Path) -> Path:
    return directory / SOCKET_NAME


def ensure_private_directory(directory: Path) -> Path:
    """Create the directory 0700, or check an existing one is ours and private.

    The control socket hands out live connections, so nobody else may reach it: a
    directory owned by someone else is refused, a loose mode of our own is tightened.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise FdkeeperError(
            f"fdkeeper: cannot create the state directory {directory}: {error.strerror}; "
            "pass --dir (or set FDKEEPER_DIR) to a writable place"
        ) from None
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise FdkeeperError(
            f"fdkeeper: the state directory {directory} belongs to uid {info.st_uid}, not to you; "
            "pass --dir (or set FDKEEPER_DIR) to a directory of your own"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        directory.chmod(0o700)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise FdkeeperError(
            f"fdkeeper: the state directory {directory} is not writable; "
            "pass --dir (or set FDKEEPER_DIR) to a writable place"
        )
    path = socket_path(directory)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise FdkeeperError(
            f"fdkeeper: the control socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "pass a shorter --dir"
        )
    return directory
