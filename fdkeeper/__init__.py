"""fdkeeper: keep sipp's TCP connections to the System under Test alive across sipp runs.

A long-lived keeper process (keeper.py) opens and holds the connections (connections.py);
each sipp run is handed them by a handoff mode (modes/), today the LD_PRELOAD shim built from
helpers/. The CLI (cli.py) is a thin layer over this library.
"""

__version__ = "0.1.0"
