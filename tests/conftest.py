"""Shared pytest fixtures.

Sections: SuT (Kamailio), sipp. Reusable logic lives in fdkeeper/sut.py;
fixtures here only wire it to pytest. Add new sections below, one per topic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from fdkeeper import sut


# --------------------------------------------------------------------------
# SuT: a fresh Kamailio per test
# --------------------------------------------------------------------------

@pytest.fixture
def kamailio(tmp_path: Path) -> Iterator[sut.Kamailio]:
    """A started Kamailio on a free loopback port, in tmp_path/kamailio.

    Its log is printed on failure (pytest shows captured output), so a broken
    test says what the SuT saw.
    """
    try:
        instance = sut.Kamailio(tmp_path / "kamailio")
        instance.start()
    except RuntimeError as exc:
        pytest.fail(f"cannot start the Kamailio SuT: {exc}", pytrace=False)
    try:
        yield instance
    finally:
        instance.stop()
        print(f"--- kamailio log tail ({instance.log_path}) ---\n{instance.log_tail(60)}")


# --------------------------------------------------------------------------
# sipp
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sipp_path() -> str:
    """The sipp binary ($SIPP or PATH); fails the test with how to get it."""
    try:
        return sut.find_sipp()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
