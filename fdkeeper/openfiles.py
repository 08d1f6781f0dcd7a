"""The process's own open-file limit: every kept connection is a descriptor (in the keeper, and
in sipp for each call socket and each connection a server run is handed)."""

from __future__ import annotations

import resource


def raise_open_file_limit() -> tuple[int, int]:
    """The soft RLIMIT_NOFILE raised to the hard one (a child started next inherits it); (soft, hard).
    Where the kernel refuses (a hard limit above its nr_open), the soft limit stays and is returned."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, hard
    return hard, hard
