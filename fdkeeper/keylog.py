"""TLS key log (the SSLKEYLOGFILE format) so Wireshark can decrypt fdkeeper's TLS to the SuT.

A key log holds the secrets of every session written to it: the file is created 0600,
opened without blocking and never through a symbolic link (statedir.open_named_file: a FIFO
another user planted would hold the keeper's loop in open()), and must be a regular file of
ours. An existing file is appended to only if it is already private, has one name, and is
empty or a key log already: the keeper (often root) never changes the mode of a file it is
named, nor appends secrets to some other private file (a host key, a password file) that a
mistyped option points at. Python's ssl module opens the key log by name itself (and would follow a link, or wait
on a FIFO), so the file is opened here first and handed to it as /proc/self/fd/N: what ssl
opens is the inode that was checked, a regular file, where neither open nor write waits.
"""

from __future__ import annotations

import os
import ssl

from fdkeeper.errors import FdkeeperError
from fdkeeper.statedir import open_named_file
from fdkeeper.textsafe import escape_controls

OPTION = "--tls-keylog"
_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT  # read: to look at what an existing file holds
# How every line of an SSLKEYLOGFILE starts (NSS's format: a label, or a comment).
_KEYLOG_STARTS = (
    b"#",
    b"CLIENT_RANDOM ",
    b"CLIENT_EARLY_TRAFFIC_SECRET ",
    b"CLIENT_HANDSHAKE_TRAFFIC_SECRET ",
    b"SERVER_HANDSHAKE_TRAFFIC_SECRET ",
    b"CLIENT_TRAFFIC_SECRET_0 ",
    b"SERVER_TRAFFIC_SECRET_0 ",
    b"EXPORTER_SECRET ",
    b"EARLY_EXPORTER_SECRET ",
    b"RSA ",
)


def set_keylog(context: ssl.SSLContext, path: str) -> None:
    """Make ``context`` append its TLS secrets to ``path`` (absolute: the keeper's working
    directory is not the caller's)."""
    fd = open_keylog(path)
    try:
        context.keylog_filename = f"/proc/self/fd/{fd}"
    except OSError as error:
        raise FdkeeperError(
            f"fdkeeper: {OPTION} cannot write the TLS key log {escape_controls(path)}: {error.strerror}", "badrequest"
        ) from None
    finally:
        os.close(fd)


def open_keylog(path: str) -> int:
    """A descriptor for appending to ``path``: created 0600; an existing file is taken only if
    it is a regular file of ours, private, with one name, and empty or a key log already."""
    if not os.path.isabs(path):
        raise FdkeeperError(f"fdkeeper: {OPTION} {escape_controls(path)} must be an absolute path", "badrequest")
    fd, info = open_named_file(path, _FLAGS, OPTION)
    try:
        problem = _unfit_for_secrets(fd, info)
    except OSError as error:
        problem = f"cannot be read ({error.strerror})"
    if problem:
        os.close(fd)
        raise FdkeeperError(
            f"fdkeeper: {OPTION} {escape_controls(path)} {problem}; a key log holds TLS secrets: name a new file",
            "badrequest",
        )
    return fd


def _unfit_for_secrets(fd: int, info: os.stat_result) -> str:
    """Why an opened key log must not be appended to, or "" (a new file is always fit)."""
    if info.st_uid != os.geteuid():
        return "belongs to another user"
    if info.st_mode & 0o077:
        return f"is open to other users (mode {info.st_mode & 0o777:04o}; chmod 600 it if it is a key log)"
    if info.st_nlink != 1:
        return f"has {info.st_nlink} names (hard links)"
    head = os.pread(fd, 64, 0)
    if head and not head.startswith(_KEYLOG_STARTS):
        return "is not empty and not a TLS key log"
    return ""
