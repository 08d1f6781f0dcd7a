"""PREPARE tells a client run whether it was given a connection an earlier run leased
(``reused=ID``): its TLS handshake options (server name, key log) were that run's, which
`fdkeeper sipp` says when the run asked for others (tests/e2e/test_tls_reuse_notice.py)."""

from __future__ import annotations

import os
import socket

from fdkeeper.client import KeeperClient
from tests.support.keeper import remote_of


def test_a_client_run_is_told_its_connection_is_reused(keeper: KeeperClient, peer: socket.socket) -> None:
    remote = remote_of(peer)
    opened = keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    assert opened.fields == {"ids": "1"}  # opened for this run
    sut_side, _ = peer.accept()
    [(_, fd)] = keeper.lease(role="client", transport="tcp", remote=remote, local="-")  # a run used it
    os.close(fd)
    again = keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    assert again.fields == {"ids": "1", "reused": "1"}
    server = keeper.prepare(role="server", transport="tcp", remote=remote)
    assert "reused" not in server.fields  # a server run is handed what is kept: nothing to say
    sut_side.close()
