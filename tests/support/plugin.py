"""How a pytester run loads fdkeeper's pytest plugin: by its entry point when the package is
installed, else by -p (one place for every test module that runs the plugin); and the plugin's
documented example, as a user would copy it."""

from __future__ import annotations

import importlib.metadata
import re

from fdkeeper import pytest_plugin

PLUGIN = "fdkeeper.pytest_plugin"


def plugin_options() -> list[str]:
    """-p for the plugin unless its entry point already loads it (installed package)."""
    installed = any(ep.value == PLUGIN for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", PLUGIN]


def documented_example() -> str:
    """The example in the plugin's docstring: its indented block, dedented."""
    doc = pytest_plugin.__doc__ or ""
    block = re.search(r"\n(    .*\n(?:    .*\n|\n)*)", doc)
    assert block, "the plugin's docstring has no example"
    return "\n".join(line[4:] for line in block.group(1).splitlines()) + "\n"
