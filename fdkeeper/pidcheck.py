"""Whether a process still exists, for state left by runs that may have been killed."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """True while ``pid`` names a process (of any uid); False once it is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another uid's: it exists
    return True
