"""The matrix of issue 11: every sipp people run x every kept transport, through `fdkeeper sipp`
with `--mode auto`, against one real Kamailio (TCP and TLS) shared by the module.

Sipps: Debian's 3.6.1 (no TLS of its own), 3.7.7 built with TLS (dynamic), 3.7.7 static (as
sipp's own release binary: LD_PRELOAD cannot reach it). Transports: t1, l1 (one user, one kept
connection) and tn, ln (five users, one kept connection each). Each cell tells the whole story
of tests/support/matrix.py: a register run; a call arriving in the gap between runs (it waits in
the kept connection); the answer run; a call arriving during it. The keeper's status names the
mode that held each connection (preload for a dynamic sipp, ptrace for a static one).
"""

from __future__ import annotations

import pytest

from fdkeeper import testbed
from tests.support.matrix import SIPPS, Cell, tell_the_story

USERS = {"t1": 1, "l1": 1, "tn": 5, "ln": 5}
TLS_TRANSPORTS = ("l1", "ln")


@pytest.fixture(scope="module")
def sut(tmp_path_factory, test_pki):
    """One Kamailio for the whole matrix (each cell has users of its own), TCP and TLS."""
    kamailio = testbed.Kamailio(
        tmp_path_factory.mktemp("matrix") / "kamailio", tls=testbed.KamailioTls.server(test_pki)
    )
    kamailio.start()
    yield kamailio
    kamailio.stop()
    print(f"--- kamailio log tail ({kamailio.log_path}) ---\n{kamailio.log_tail(60)}")


@pytest.fixture(params=list(USERS))
def transport(request) -> str:
    return request.param


@pytest.fixture(params=list(SIPPS))
def cell(request, transport, sut, test_pki, keeper_dir, tmp_path) -> Cell:
    tls = transport in TLS_TRANSPORTS
    return Cell.of_sipp(
        request.param,
        transport,
        "tls" if tls else "tcp",
        USERS[transport],
        remote=sut.tls_address if tls else sut.address,
        options=("--tls-ca", str(test_pki.ca_cert), "--tls-sni", test_pki.server_name) if tls else (),
        keeper_dir=keeper_dir,
        log_dir=tmp_path / "logs",
    )


def test_register_a_call_in_the_gap_answer_a_call_during(cell, sut, tmp_path):
    tell_the_story(cell, sut, tmp_path)  # its checks: mode, transport, none lost or added
