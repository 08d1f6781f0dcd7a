"""Fixtures the keeper's test modules share (the fakes they drive are in tests/support)."""

from __future__ import annotations

import pytest

from fdkeeper.testbed.pki import TestPki, make_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """A test PKI per module (CA, server and client certificates): see fdkeeper.testbed.pki."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))
