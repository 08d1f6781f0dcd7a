"""TLS key log (the SSLKEYLOGFILE format) so Wireshark can decrypt fdkeeper's TLS to the SuT.

A key log holds the secrets of every session written to it: the file is created 0600,
opened without blocking and never through a symbolic link (statedir.open_named_file: a FIFO
another user planted would hold the keeper's loop in open()), and must be a regular file of
ours. Python's ssl module opens the key log by name itself (and would follow a link, or wait
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
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT


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
    """A descriptor for appending to ``path``: created 0600, refused if it is a link or not a
    regular file of ours; an existing file readable by others is made 0600."""
    if not os.path.isabs(path):
        raise FdkeeperError(f"fdkeeper: {OPTION} {escape_controls(path)} must be an absolute path", "badrequest")
    fd, info = open_named_file(path, _FLAGS, OPTION)
    if info.st_uid != os.geteuid():
        os.close(fd)
        raise FdkeeperError(
            f"fdkeeper: {OPTION} {escape_controls(path)} belongs to another user, and a key log holds secrets; "
            "remove it or name another file",
            "badrequest",
        )
    if info.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd
