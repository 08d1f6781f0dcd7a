"""Shared pytest fixtures.

Sections: SuT (Kamailio), sipp. Reusable logic lives in fdkeeper/testbed/;
fixtures here only wire it to pytest. Add new sections below, one per topic.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient, ensure_keeper
from tests.support.converter import RunningConverter
from tests.support.keeper import keeper_process


def _plugin_needs_loading() -> bool:
    """fdkeeper's pytest plugin (fixtures `sipp`, `fdkeeper_keeper`, `kamailio_sut`) is loaded
    by its pytest11 entry point once installed; naming it here too would register the module
    twice (pluggy refuses), so only when no entry point loads it (not installed yet, or
    PYTEST_DISABLE_PLUGIN_AUTOLOAD)."""
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return True
    return not any(entry.value == "fdkeeper.pytest_plugin" for entry in entry_points(group="pytest11"))


if _plugin_needs_loading():
    pytest_plugins = ["fdkeeper.pytest_plugin"]


# --------------------------------------------------------------------------
# SuT: a fresh Kamailio per test
# --------------------------------------------------------------------------


@pytest.fixture
def kamailio(tmp_path: Path) -> Iterator[testbed.Kamailio]:
    """A started Kamailio on a free loopback port, in tmp_path/kamailio.

    Its log is printed on failure (pytest shows captured output), so a broken
    test says what the SuT saw.
    """
    try:
        instance = testbed.Kamailio(tmp_path / "kamailio")
        instance.start()
    except RuntimeError as exc:
        pytest.fail(f"cannot start the Kamailio SuT: {exc}", pytrace=False)
    try:
        yield instance
    finally:
        instance.stop()
        print(f"--- kamailio log tail ({instance.log_path}) ---\n{instance.log_tail(60)}")


# --------------------------------------------------------------------------
# TLS: test certificates and a TLS SuT
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> testbed.TestPki:
    """One test PKI per session (CA, server/client certs, the "bad" ones):
    see fdkeeper.testbed.pki. Read-only for tests: make your own to change it."""
    return testbed.make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> testbed.TestPki:
    """A test PKI per module, like `test_pki` (which is one per session): for modules that
    want certificates of their own."""
    return testbed.make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def kamailio_tls(tmp_path: Path, test_pki: testbed.TestPki) -> Iterator[testbed.Kamailio]:
    """A started Kamailio like `kamailio`, also listening for TLS on
    `.tls_port` with the test PKI's server certificate (no client
    certificate required)."""
    try:
        instance = testbed.Kamailio(tmp_path / "kamailio-tls", tls=testbed.KamailioTls.server(test_pki))
        instance.start()
    except RuntimeError as exc:
        pytest.fail(f"cannot start the Kamailio TLS SuT: {exc}", pytrace=False)
    try:
        yield instance
    finally:
        instance.stop()
        print(f"--- kamailio log tail ({instance.log_path}) ---\n{instance.log_tail(60)}")


# --------------------------------------------------------------------------
# sipp
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sipp_path(fdkeeper_sipp_path: str) -> str:
    """The sipp binary ($FDKEEPER_SIPP or PATH): the plugin's fixture, under the suite's name."""
    return fdkeeper_sipp_path


# --------------------------------------------------------------------------
# keeper
# --------------------------------------------------------------------------


@pytest.fixture
def keeper(tmp_path: Path) -> Iterator[KeeperClient]:
    """A real keeper in tmp_path/state, started for the test (as a run would start it) and
    stopped after; modules that need another kind (a fake, one with a defect) define their own."""
    client = ensure_keeper(tmp_path / "state")
    yield client
    process = keeper_process(client)
    if process is not None:
        process.resume()  # a test may have SIGSTOPped it: a stopped keeper cannot answer STOP
    client.stop()


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    """A TCP listener standing in for the SuT; accept() gives the SuT's side."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    yield listener
    listener.close()


@pytest.fixture
def keeper_dir(tmp_path: Path) -> Iterator[Path]:
    """A state directory for the keeper a test's runs start; the keeper is stopped after."""
    directory = tmp_path / "keeper"
    yield directory
    KeeperClient(directory).stop()


# --------------------------------------------------------------------------
# converter (convert and modes/udp)
# --------------------------------------------------------------------------


@pytest.fixture
def converters() -> Iterator[Callable[..., RunningConverter]]:
    """Start converters with ``converters(workdir, sut_address, transport, sipp_port, *extra)``;
    each is stopped after the test and its log tail printed (shown when the test fails)."""
    started: list[RunningConverter] = []

    def start(workdir: Path, sut_address: str, transport: str, sipp_port: int, *extra: str) -> RunningConverter:
        converter = RunningConverter(workdir, sut_address, transport, sipp_port, *extra)
        started.append(converter)
        return converter

    yield start
    for converter in started:
        converter.stop()
        print(f"--- converter log ---\n{converter.log.read_text()[-3000:]}")
