"""Where the repository's parts are, for tests that read its files or build its C sources: one
place, so a test module's depth under tests/ never enters a path."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "helpers"  # the shim's C sources and shimbuild.py
TESTS = REPO / "tests"
