"""A TLS open at the keeper's descriptor limit (issue 16, item 6): one `ERR limit` line, never
`ERR internal`, and the keeper opens it once descriptors are free again.

A TLS connection needs three descriptors (the TCP socket and the socketpair runs are leased
one end of); each comes from the one place that turns EMFILE into the protocol's limit error.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from fdkeeper.errors import FdkeeperError
from tests.support.fake_sut import FakeSut
from tests.support.keeper import keeper_process, limit_with_free_slots


@pytest.mark.parametrize("free", [2, 3])  # room for the control client and the TCP socket, not the pair
def test_a_tls_open_without_descriptors_for_its_socketpair_is_err_limit(keeper, pki, free):
    sut = FakeSut(pki)
    try:
        process = keeper_process(keeper)
        time.sleep(0.3)  # the keeper closes its starter's PING connection: count without it
        limit = limit_with_free_slots(process, free)
        subprocess.run(["prlimit", f"--pid={process.pid}", f"--nofile={limit}:"], check=True)
        with pytest.raises(FdkeeperError) as refused:
            keeper.prepare(role="client", transport="tls", remote=sut.address, local="-", tls_insecure=True)
        assert refused.value.code == "limit" and "open files" in str(refused.value), refused.value
        subprocess.run(["prlimit", f"--pid={process.pid}", f"--nofile={limit + 50}:"], check=True)
        assert keeper.status()["connections"] == []  # nothing half-kept
        keeper.prepare(role="client", transport="tls", remote=sut.address, local="-", tls_insecure=True)
        [connection] = keeper.status()["connections"]
        assert connection["state"] == "idle" and connection["tls"]
        log = (keeper.directory / "keeper.log").read_text()
        assert "Traceback" not in log and "internal error" not in log
    finally:
        sut.close()
