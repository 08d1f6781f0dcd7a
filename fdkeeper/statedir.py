"""Where a keeper lives: its private state directory and the files in it.

The control socket hands out live connections (often root's), so the directory is treated as
OpenSSH treats ~/.ssh and systemd its runtime directories: created 0700 without following links,
refused (one line naming owner, mode and fix) when it is a link, is not ours, or another user
could write to it or to a parent on the way; files in it are opened relative to the checked
directory without following links; and a client checks who answers on a control socket
(SO_PEERCRED): only a process of our own uid or root. Every check happens before the socket
is touched.

Files outside it that a request names (TLS CA, CRL, certificate, key, key log) are opened by
``open_named_file``: never blocking (a FIFO or device another user planted would hold the
keeper's loop in open()), never through a link, and only when they are regular files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fdkeeper.errors import FdkeeperError
from fdkeeper.textsafe import escape_controls

SOCKET_NAME = "control.sock"
LOCK_NAME = "keeper.lock"
LOG_NAME = "keeper.log"
# The running keeper's record (pid, start, last sign of life, connections); gone after a clean
# stop, so a record with no keeper holding the lock means the keeper died. Moved to DIED_NAME
# once that has been said.
RECORD_NAME = "keeper.state"
DIED_NAME = "keeper.died"
# A keeper's record as read back: JSON a dead keeper left, so every value is checked where it is used.
LeftRecord = dict[str, object]
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ELSEWHERE = "pass --dir (or set FDKEEPER_DIR) to a directory of your own"


class NotPrivate(FdkeeperError):
    """Another user controls the state directory, a file in it, or the process answering there.

    Never retried and never read as "no keeper runs": starting afresh would not make it safe.
    """


# ---------------------------------------------------------------- which directory


def default_directory() -> Path:
    """Where the keeper lives when neither --dir nor $FDKEEPER_DIR says.

    Only places another user cannot create first: $XDG_RUNTIME_DIR or /run/user/UID when it
    is ours (systemd's per-user runtime directory), for root /run, else /tmp/fdkeeper-UID, which
    ensure_private_directory refuses if someone else made it.
    """
    configured = os.environ.get("FDKEEPER_DIR")
    if configured:
        return Path(configured)
    uid = os.getuid()
    for runtime in (os.environ.get("XDG_RUNTIME_DIR"), f"/run/user/{uid}"):
        # sudo and su keep the invoking user's XDG_RUNTIME_DIR: only our own one counts.
        if runtime and _is_safe_directory_of(runtime, uid):
            return Path(runtime) / "fdkeeper"
    if uid == 0 and _is_safe_directory_of("/run", 0):
        return Path("/run/fdkeeper")
    return Path(f"/tmp/fdkeeper-{uid}")


def _is_safe_directory_of(path: str, uid: int) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == uid and not info.st_mode & WRITABLE_BY_OTHERS


def resolve_directory(option: str | os.PathLike[str] | None) -> Path:
    """The state directory as an absolute path whose parents are links resolved once, here.

    The directory itself is left as named, so a link there is seen (and refused) by the checks.
    """
    path = Path(option if option else default_directory()).absolute()
    return Path(os.path.realpath(path.parent)) / path.name


def socket_path(directory: Path) -> Path:
    return directory / SOCKET_NAME


# ---------------------------------------------------------------- checking it


def ensure_private_directory(directory: Path) -> Path:
    """Create the directory 0700 (without following a link), or check an existing one; return it."""
    _check_socket_length(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cannot_create(directory, error) from None
    try:
        os.mkdir(directory, 0o700)  # mkdir never follows a link: a planted one makes EEXIST
    except FileExistsError:
        pass  # whatever is there is checked next
    except OSError as error:
        raise _cannot_create(directory, error) from None
    check_private_directory(directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise FdkeeperError(f"fdkeeper: the state directory {directory} is not writable; {_ELSEWHERE}")
    return directory


def _cannot_create(directory: Path, error: OSError) -> FdkeeperError:
    return FdkeeperError(
        f"fdkeeper: cannot create the state directory {directory}: {error.strerror}; "
        "pass --dir (or set FDKEEPER_DIR) to a writable place"
    )


def check_private_directory(directory: Path) -> Path:
    """Check an existing state directory before anything in it is trusted; return it.

    Raises FileNotFoundError when it does not exist (no keeper can run there), NotPrivate when
    another user controls it or a parent, FdkeeperError when it is no directory at all.
    """
    _check_socket_length(directory)
    try:
        info = os.lstat(directory)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(errno.ENOENT, "no such directory", os.fspath(directory)) from None
    except OSError as error:
        raise FdkeeperError(f"fdkeeper: cannot examine the state directory {directory}: {error.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise NotPrivate(
            f"fdkeeper: the state directory {directory} is a symbolic link (to {_link_target(directory)}), "
            "which fdkeeper does not follow; pass --dir the real directory if it is yours, or remove the link"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise FdkeeperError(
            f"fdkeeper: the state directory {directory} is not a directory; pass --dir a directory (or remove the file)"
        )
    check_private(directory, info)
    _check_parents(directory)
    return directory


@dataclass(frozen=True)
class PrivateFolder:
    """What a folder that must be ours alone is called, what another user could do with it, and
    where to go instead: the words of check_private's refusals."""

    what: str  # "the state directory"
    owned_risk: str  # what another user who made it could do: "receive your connections"
    planted: str  # what a writer could plant: "links or a fake keeper"
    elsewhere: str  # the fix: "pass --dir ..."
    error: type[NotPrivate] = NotPrivate


STATE_DIRECTORY = PrivateFolder("the state directory", "receive your connections", "links or a fake keeper", _ELSEWHERE)


def check_private(folder: Path, info: os.stat_result, kind: PrivateFolder = STATE_DIRECTORY) -> None:
    """Ours and writable by nobody else (readable is fine: what is in it is 0600); ``info`` is
    the folder's fstat through a descriptor opened without following links."""
    mode = f"mode {stat.S_IMODE(info.st_mode):04o}"
    if info.st_uid != os.getuid():
        raise kind.error(
            f"fdkeeper: {kind.what} {folder} belongs to {_user(info.st_uid)}, {mode}, not to you: another user "
            f"may have made it to {kind.owned_risk}; have it removed (rm -r {folder}) or {kind.elsewhere}"
        )
    if info.st_mode & WRITABLE_BY_OTHERS:
        raise kind.error(
            f"fdkeeper: {kind.what} {folder} is yours but writable by other users ({mode}), who could plant "
            f"{kind.planted} in it; check what is in it, then 'chmod 700 {folder}', or {kind.elsewhere}"
        )


def _check_parents(directory: Path) -> None:
    """Nobody but us and root may replace the directory: every parent is theirs, and not writable
    by others unless sticky (like /tmp, where only an entry's owner may rename or remove it)."""
    for parent in directory.parents:
        link = os.lstat(parent)
        info = os.stat(parent) if stat.S_ISLNK(link.st_mode) else link
        owner = link.st_uid if not trusted_uid(link.st_uid) else info.st_uid
        mode = f"mode {stat.S_IMODE(info.st_mode):04o}"
        if not trusted_uid(owner):
            raise NotPrivate(
                f"fdkeeper: {parent}, a parent of the state directory {directory}, belongs to {_user(owner)} ({mode}), "
                f"who could replace the state directory; {_ELSEWHERE} under parents of yours or root's"
            )
        if info.st_mode & WRITABLE_BY_OTHERS and not info.st_mode & stat.S_ISVTX:
            raise NotPrivate(
                f"fdkeeper: {parent}, a parent of the state directory {directory}, is writable by other users "
                f"({mode}, not sticky), who could replace the state directory; {_ELSEWHERE} elsewhere"
            )


def _check_socket_length(directory: Path) -> None:
    check_socket_path(socket_path(directory))


def check_socket_path(path: Path) -> None:
    """A unix socket's path fits in sun_path, or one line naming it and the fix."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise FdkeeperError(
            f"fdkeeper: the control socket path {path} is longer than {MAX_SOCKET_PATH} bytes; pass a shorter --dir"
        )


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"  # gone or changed since: the refusal stands


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


# ---------------------------------------------------------------- using it


def open_private_file(directory: Path, name: str, mode: str, **kwargs: Any) -> IO[Any]:
    """open(directory / name, mode), but never through a link: the directory is opened
    O_NOFOLLOW and checked again through its descriptor, the file opened relative to it with
    O_NOFOLLOW, created 0600, and refused unless it is a regular file of ours."""
    path = directory / name

    def opener(_path: str, flags: int) -> int:
        directory_fd = _open_directory(directory)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=directory_fd)
        finally:
            os.close(directory_fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            os.close(fd)
            raise NotPrivate(
                f"fdkeeper: {path} is not a regular file of yours ({_user(info.st_uid)}, "
                f"mode {info.st_mode:o}); remove it"
            )
        return fd

    return open_unlinked(path, mode, opener, **kwargs)


def open_unlinked(
    path: Path,
    mode: str,
    opener: Callable[[str, int], int] | None = None,
    refusal: type[NotPrivate] = NotPrivate,
    **kwargs: Any,
) -> IO[Any]:
    """open(path, mode) through ``opener`` (default: O_NOFOLLOW at the file, created 0600), or
    one line saying a link was planted where the file should be: fdkeeper never writes through one."""
    try:
        return open(path, mode, opener=opener or _no_link, **kwargs)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise refusal(
                f"fdkeeper: {path} is a symbolic link (to {_link_target(path)}), which fdkeeper does not follow; "
                "someone may have planted it to make fdkeeper write elsewhere: remove it"
            ) from None
        raise FdkeeperError(f"fdkeeper: cannot open {path}: {error.strerror}") from None


def _no_link(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _open_directory(directory: Path) -> int:
    """A descriptor of the state directory itself (never a link), checked again through it."""
    try:
        fd = os.open(directory, _DIRECTORY_FLAGS)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            check_private_directory(directory)  # says what it is instead
        raise
    try:
        check_private(directory, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def connect_control_socket(path: Path, timeout: float, kind: int = socket.SOCK_SEQPACKET) -> socket.socket:
    """Connect to the control socket of a keeper once its directory checked out, and make sure
    the process answering is ours. FileNotFoundError/ConnectionRefusedError: nobody listens."""
    check_private_directory(path.parent)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        verify_peer(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


def trusted_uid(uid: int) -> bool:
    """Whom fdkeeper trusts with kept connections: our own uid, and root."""
    return uid in (os.getuid(), 0)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def verify_peer(sock: socket.socket, path: Path) -> None:
    """The process listening on a connected unix socket must run as our uid or root."""
    pid, uid, _gid = peer_credentials(sock)
    if not trusted_uid(uid):
        raise NotPrivate(
            f"fdkeeper: the process answering on {path} (pid {pid}) runs as {_user(uid)}, not as you or root; "
            f"refusing to talk to it: stop it and remove {path}"
        )


# ---------------------------------------------------------------- files a request names


# Never wait in open() (a FIFO with no writer, or a device, would hold the keeper's loop), never
# follow a link in the last component, never take a terminal as controlling tty.
NAMED_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def open_named_file(path: str, flags: int, option: str, mode: int = 0o600) -> tuple[int, os.stat_result]:
    """``os.open(path, flags)`` for a file a user named with ``option`` (a CA, a key, a key log):
    without blocking and without following a link, and only if it is a regular file.

    Returns the descriptor and its fstat. Anything else is one line naming the option, the path
    and what is there instead (FdkeeperError, code badrequest). The type is looked at before
    the open (so a device or a FIFO is not even opened) and again through the descriptor (so a
    file swapped in between is caught).
    """
    shown = escape_controls(path)
    if not path or "\0" in path:  # no file name can hold one (os.open would raise ValueError)
        what = "contains a NUL byte" if path else "is empty"
        raise FdkeeperError(f"fdkeeper: {option} '{shown}' {what}; name a regular file", "badrequest")
    _refuse_unless_regular(path, option, _lstat(path))
    try:
        fd = os.open(path, flags | NAMED_FILE_FLAGS, mode)
    except OSError as error:
        _refuse_unless_regular(path, option, _lstat(path))  # ELOOP, ENXIO, EISDIR: say what it is
        if error.errno == errno.ENOENT:
            raise FdkeeperError(f"fdkeeper: {option} file {shown} not found; check the path", "badrequest") from None
        raise FdkeeperError(f"fdkeeper: cannot open {option} {shown}: {error.strerror}", "badrequest") from None
    info = os.fstat(fd)
    try:
        _refuse_unless_regular(path, option, info)
    except FdkeeperError:
        os.close(fd)
        raise
    return fd, info


def check_named_file(path: str, option: str) -> None:
    """Refuse now what open_named_file would refuse for what is at ``path`` (nothing there is
    fine); for a client, before anything starts. The keeper checks again when it opens it."""
    _refuse_unless_regular(path, option, _lstat(path))


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, for a message ("a FIFO", "a directory", ...)."""
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None  # not there (yet): the open says what is wrong


def _refuse_unless_regular(path: str, option: str, info: os.stat_result | None) -> None:
    if info is None or stat.S_ISREG(info.st_mode):
        return
    shown = escape_controls(path)
    if stat.S_ISLNK(info.st_mode):
        raise FdkeeperError(
            f"fdkeeper: {option} {shown} is a symbolic link (to {escape_controls(_link_target(Path(path)))}), "
            "which fdkeeper does not follow; name a regular file",
            "badrequest",
        )
    raise FdkeeperError(f"fdkeeper: {option} {shown} is {file_kind(info.st_mode)}; name a regular file", "badrequest")


# ---------------------------------------------------------------- the keeper's record


def keeper_runs(directory: Path) -> bool:
    """True if a keeper holds the directory's lock, answering or not (flock, as the keeper takes it)."""
    if not os.path.lexists(directory / LOCK_NAME):
        return False
    try:
        lock = open_private_file(directory, LOCK_NAME, "r")
    except FdkeeperError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False  # closing the file releases our shared lock at once


def write_keeper_record(directory: Path, record: Mapping[str, object]) -> None:
    """Replace the keeper's record atomically (a reader never sees half of it)."""
    with open_private_file(directory, RECORD_NAME + ".new", "w") as new:
        json.dump(record, new)
    directory_fd = _open_directory(directory)
    try:
        os.replace(RECORD_NAME + ".new", RECORD_NAME, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    finally:
        os.close(directory_fd)


def remove_keeper_record(directory: Path) -> None:
    try:
        os.unlink(directory / RECORD_NAME)
    except FileNotFoundError:
        pass


def dead_keeper_notice(directory: Path, take: bool = True) -> str | None:
    """If the last keeper of ``directory`` died (record left, nobody holds the lock), the line
    that says so. ``take``: say it once, moving the record to keeper.died (so the next run stays
    quiet); else only read it."""
    if not os.path.lexists(directory / RECORD_NAME) or keeper_runs(directory):
        return None
    record = take_keeper_record(directory) if take else _read_record(directory)
    return None if record is None else describe_dead_keeper(directory, record)


def take_keeper_record(directory: Path) -> LeftRecord | None:
    """Read a left record and move it aside to keeper.died; None if there was none (or another
    process took it first). Only for a record no running keeper owns."""
    if not os.path.lexists(directory / RECORD_NAME):
        return None
    record = _read_record(directory)
    try:
        directory_fd = _open_directory(directory)
        try:
            os.replace(RECORD_NAME, DIED_NAME, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
        finally:
            os.close(directory_fd)
    except FileNotFoundError:
        return None  # another run said it first
    return record


def _read_record(directory: Path) -> LeftRecord:
    try:
        with open_private_file(directory, RECORD_NAME, "r") as file:
            record = json.load(file)
    except (ValueError, FdkeeperError):
        return {}  # unreadable, or gone meanwhile: what is known is that it died
    return record if isinstance(record, dict) else {}


def describe_dead_keeper(directory: Path, record: LeftRecord) -> str:
    pid = record.get("pid", "?")
    started = _when(record.get("started"))
    alive = _when(record.get("alive"))
    count = record.get("connections", 0)
    return (
        f"fdkeeper: the previous keeper for {directory} (pid {pid}, started {started}, last known alive {alive}) "
        f"died without being stopped: its {count} kept connection(s) closed with it, and registrations made over "
        f"them are gone; re-register (see {directory / LOG_NAME} for its last words)"
    )


def _when(epoch: object) -> str:
    if not isinstance(epoch, (int, float)):
        return "at an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
