"""The `fdkeeper` command: a thin click layer over the library.

Each command turns its options into the library's option objects and calls one library
function; errors are one line and exit status 2 (group.py). One module per family of commands:
runs.py (sipp, exec, fdkeeper-sipp), keeping.py (keeper, status, stop, convert), tools.py
(demo, sut, doctor); `run` is testrun/command.py's, imported only when named (group.py); options.py holds the options they share.
`fdkeeper.cli:main` and `fdkeeper.cli:sipp_main` are the console scripts' entry points.
"""

from __future__ import annotations

from fdkeeper.cli import keeping, runs, tools  # each registers its commands on main
from fdkeeper.cli.group import main
from fdkeeper.cli.options import make_tls_options
from fdkeeper.cli.runs import sipp_main

# `fdkeeper run TEST...` (testrun/command.py; its exit status 0/1/2 is its own) is added when
# named: group.LAZY_COMMANDS.

__all__ = ["keeping", "main", "make_tls_options", "runs", "sipp_main", "tools"]
