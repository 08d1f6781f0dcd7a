"""TLS key log (the SSLKEYLOGFILE format) so Wireshark can decrypt fdkeeper's TLS to the SuT.

A key log holds the secrets of every session written to it: the file is created 0600,
never opened through a symbolic link, and must be a regular file of ours. Python's ssl
module opens the key log by name itself (and would follow a link), so the file is opened
here first and handed to it as /proc/self/fd/N: what ssl opens is what was checked.
"""

from __future__ import annotations

import errno
import os
import ssl
import stat

from fdkeeper.errors import FdkeeperError

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def set_keylog(context: ssl.SSLContext, path: str) -> None:
    """Make ``context`` append its TLS secrets to ``path`` (absolute: the keeper's working
    directory is not the caller's)."""
    if not os.path.isabs(path):
        raise FdkeeperError(f"fdkeeper: --tls-keylog {path} must be an absolute path", "badrequest")
    fd = open_keylog(path)
    try:
        context.keylog_filename = f"/proc/self/fd/{fd}"
    except OSError as error:
        raise FdkeeperError(f"fdkeeper: cannot write the TLS key log {path}: {error.strerror}", "badrequest") from None
    finally:
        os.close(fd)


def open_keylog(path: str) -> int:
    """A descriptor for appending to ``path``: created 0600, refused if it is a link or not a
    regular file of ours; an existing file readable by others is made 0600."""
    try:
        fd = os.open(path, _FLAGS, 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FdkeeperError(
                f"fdkeeper: the TLS key log {path} is a symbolic link, which fdkeeper does not follow "
                "(key logs are secrets); remove it or name another file", "badrequest",
            ) from None
        raise FdkeeperError(f"fdkeeper: cannot open the TLS key log {path}: {error.strerror}", "badrequest") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        raise FdkeeperError(
            f"fdkeeper: the TLS key log {path} is not a regular file of yours; remove it or name another file",
            "badrequest",
        )
    if info.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd
