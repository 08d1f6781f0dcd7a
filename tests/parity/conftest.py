"""Twins tested side by side: a few C files of helpers/ built into a small library, loaded with ctypes.

Only the files under test are compiled (helpers/shimbuild.py's compile_twin), never the whole
shim: its hooks would replace this process's own socket calls.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "helpers"))
from shimbuild import compile_twin  # type: ignore[import-not-found]  # helpers/ is on the path only at run time


@pytest.fixture(scope="session")
def twin_library(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, list[str]], ctypes.CDLL]:
    """twin_library(name, helpers_files): those files compiled once per session, loaded."""
    built: dict[str, ctypes.CDLL] = {}

    def build(name: str, files: list[str]) -> ctypes.CDLL:
        if name not in built:
            output = tmp_path_factory.mktemp("twin") / f"lib{name}.so"
            compile_twin(output, files)
            built[name] = ctypes.CDLL(str(output))
        return built[name]

    return build
