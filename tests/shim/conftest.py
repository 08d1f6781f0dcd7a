"""Fixtures the shim's test modules share: the shim and its C test program built once per
session, and a TCP listener standing in for the SuT (the helpers are in tests/support/shim.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.shim import Sut, build_shim_and_program


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The shim library ("lib") and shimprog ("prog"), compiled as the package build does."""
    return build_shim_and_program(tmp_path_factory.mktemp("shim-build"))


@pytest.fixture
def sut() -> Iterator[Sut]:
    """A TCP listener on 127.0.0.1 standing in for the SIP server; closed after the test."""
    s = Sut()
    yield s
    s.close()
