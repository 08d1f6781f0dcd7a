"""The `fdkeeper` command: a thin click layer over the library.

Each command turns its options into the library's option objects and calls one library
function; errors are one line and exit status 2 (group.py). One module per family of commands:
runs.py (sipp, exec, fdkeeper-sipp), keeping.py (keeper, status, stop, convert), tools.py
(demo, sut, doctor); options.py holds the options they share. runs.py and `run`
(testrun/command.py) are imported only when one of their commands is named (group.LAZY_COMMANDS),
so that `fdkeeper status` starts without sipp's, the modes' and the testbed's modules.
`fdkeeper.cli:main` and `fdkeeper.cli:sipp_main` are the console scripts' entry points.
"""

from __future__ import annotations

from typing import NoReturn

from fdkeeper.cli import keeping, tools  # each registers its commands on main
from fdkeeper.cli.group import main
from fdkeeper.cli.options import make_tls_options


def sipp_main() -> NoReturn:
    """The `fdkeeper-sipp` console script (cli/runs.py), its module imported only when run."""
    from fdkeeper.cli.runs import sipp_main as run_sipp_main

    run_sipp_main()


__all__ = ["keeping", "main", "make_tls_options", "sipp_main", "tools"]
