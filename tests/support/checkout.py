"""A copy of the checkout as the next commit would have it, and a stock machine's PATH: what the
install tests (tests/install/) build from and run under, so that nothing leaks from this tree."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support.paths import REPO

# What a stock machine's login shell has, without pyenv, ~/.local/bin or /usr/local/bin.
STOCK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def copy_of_what_would_be_committed(destination: Path) -> None:
    """The checkout's tracked and not-ignored files as they are in the working tree: what a
    clone of the next commit holds, without waiting for that commit."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if not os.path.lexists(source):  # deleted in the working tree, not yet in the index
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
