"""The one exception type users see: a line that names the thing and the fix."""

from __future__ import annotations


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
