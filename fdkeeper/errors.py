"""The one exception type users see: a line that names the thing and the fix; and which
OSErrors mean a process ran out of descriptors (each caller names that limit in its own words)."""

from __future__ import annotations

import errno

# A socket, pipe or pidfd could not be made for want of descriptors (or the kernel memory behind them).
DESCRIPTOR_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class FdkeeperError(Exception):
    """A failure the user can act on.

    ``code`` is a one-word machine-readable reason (the control protocol's ERR codes);
    ``str(error)`` is one line for a human, starting with ``fdkeeper:``.
    """

    exit_status = 2

    def __init__(self, text: str, code: str = "error") -> None:
        if not text.startswith("fdkeeper:"):
            text = f"fdkeeper: {text}"
        super().__init__(text)
        self.code = code


def out_of_descriptors(error: OSError) -> bool:
    """Whether ``error`` means no descriptor could be made (a limit to raise), not a fault of the call."""
    return error.errno in DESCRIPTOR_ERRORS
