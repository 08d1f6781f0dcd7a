"""How a pytester run loads fdkeeper's pytest plugin: by its entry point when the package is
installed, else by -p (one place for every test module that runs the plugin)."""

from __future__ import annotations

import importlib.metadata

PLUGIN = "fdkeeper.pytest_plugin"


def plugin_options() -> list[str]:
    """-p for the plugin unless its entry point already loads it (installed package)."""
    installed = any(ep.value == PLUGIN for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", PLUGIN]
