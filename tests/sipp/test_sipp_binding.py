"""Where each sipp release binds (fdkeeper/sipp/binding.py), and a PREPARE that opens nothing
when the identity is known only once sipp binds (issue 16, item 7).

The end-to-end proof with the real sipps is tests/keeper/test_sut_connections.py; here the rule and
the keeper's side of it, with plain TCP peers on loopback.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp.args import parse_sipp_args
from fdkeeper.sipp.binding import Binding, likely_main_port, sipp_binding
from fdkeeper.sipp.tables import SIPP_3_6, SIPP_3_7_5
from fdkeeper.testbed import wait_until

V361, V377 = (3, 6, 1), (3, 7, 7)


# ---------------------------------------------------------------- the rule, release by release


def test_sipp_3_6_binds_its_client_connection_to_p_else_an_ephemeral_port():
    assert sipp_binding(V361, None, None) == Binding(None)  # the shared connection
    assert sipp_binding(V361, "127.0.0.1", None) == Binding(("127.0.0.1", 0))  # ephemeral all the same
    assert sipp_binding(V361, None, 5070) == Binding(("0.0.0.0", 5070))
    assert sipp_binding(V361, "127.0.0.1", 5070) == Binding(("127.0.0.1", 5070))


def test_sipp_3_7_binds_its_client_connection_to_its_main_sockets_port():
    assert sipp_binding(V377, "127.0.0.1", 5070) == Binding(("127.0.0.1", 5070))
    unknown = sipp_binding(V377, "127.0.0.1", None)
    assert not unknown.known  # the first free of 5060-5119 when sipp binds, not now
    assert unknown.local[0] == "127.0.0.1" and (unknown.local[1] == 0 or 5060 <= unknown.local[1] < 5120)
    assert not sipp_binding((3, 7, 0), None, None).known


def test_the_likely_port_skips_one_another_process_listens_on():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert likely_main_port("127.0.0.1", range(port, port + 1)) == ("127.0.0.1", 0)  # none free: the system's
        # sipp's SO_REUSEADDR bind shares a port with sockets that only connect (a kept connection).
    with socket.socket() as bound:
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        assert likely_main_port("127.0.0.1", range(port, port + 1)) == ("127.0.0.1", port)


def test_the_invocation_reads_the_binding_with_its_own_release():
    args, sut = ["-sn", "uac", "-t", "t1", "-i", "127.0.0.1", "127.0.0.1:5060"], ("127.0.0.1", 5060)
    assert parse_sipp_args(args, SIPP_3_6).binding(sut) == Binding(("127.0.0.1", 0))
    assert not parse_sipp_args(args, SIPP_3_7_5).binding(sut).known
    assert parse_sipp_args([*args, "-p", "5071"], SIPP_3_7_5).binding(sut) == Binding(("127.0.0.1", 5071))
    server = ["-sn", "uas", "-t", "t1", "-p", "5072"]
    assert parse_sipp_args(server, SIPP_3_6).binding(None) == Binding(("0.0.0.0", 5072))
    assert parse_sipp_args(server, SIPP_3_6).binding(("::1", 5060)) == Binding(("::", 5072))


# ---------------------------------------------------------------- the keeper opens nothing early


@pytest.fixture
def peer():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.3)
    yield listener
    listener.close()


def lease_in_child(keeper, remote, local) -> int:
    """A child process leases the client connection of ``local`` (as sipp would) and exits; its status."""
    pid = os.fork()
    if pid == 0:  # never return into pytest
        try:
            keeper.lease(role="client", transport="tcp", remote=remote, local=local)
            os._exit(0)
        except BaseException as error:
            os.write(2, f"child: {error}\n".encode())
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _no_connection(listener: socket.socket) -> bool:
    try:
        listener.accept()[0].close()
    except TimeoutError:
        return True
    return False


def test_prepare_open_at_lease_opens_nothing_and_the_lease_opens_from_sipps_port(keeper, peer):
    remote = peer.getsockname()[:2]
    with socket.socket() as sipps_own:  # what sipp binds (as 3.7 does its client connection)
        sipps_own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sipps_own.bind(("127.0.0.1", 0))
        local = sipps_own.getsockname()[:2]
        reply = keeper.prepare(role="client", transport="tcp", remote=remote, local=local, open_at_lease=True)
        assert "ids" not in reply.fields and _no_connection(peer)
        assert keeper.status()["connections"] == []

        assert lease_in_child(keeper, remote, local) == 0
        sut_side, source = peer.accept()
        assert source == local  # from the port sipp bound: the one identity
    # Once kept, the same PREPARE names it (and checks it) without opening another.
    wait_until(lambda: keeper.status()["connections"][0]["state"] == "idle")
    reply = keeper.prepare(role="client", transport="tcp", remote=remote, local=local, open_at_lease=True)
    assert reply.fields["ids"] == str(keeper.status()["connections"][0]["id"]) and _no_connection(peer)
    sut_side.close()


def test_prepare_open_at_lease_reports_a_closed_kept_connection(keeper, peer):
    remote = peer.getsockname()[:2]
    assert lease_in_child(keeper, remote, ("127.0.0.1", 0)) == 0
    sut_side, _ = peer.accept()
    sut_side.close()  # the SuT ends it
    wait_until(lambda: keeper.status()["connections"][0]["state"] == "closed", timeout=10)
    with pytest.raises(FdkeeperError) as closed:
        keeper.prepare(role="client", transport="tcp", remote=remote, local="-", open_at_lease=True)
    assert closed.value.code == "closed"
    # --reconnect: the lease replaces it; PREPARE still opens nothing.
    reply = keeper.prepare(role="client", transport="tcp", remote=remote, local="-", open_at_lease=True, reconnect=True)
    assert "ids" not in reply.fields and _no_connection(peer)


def test_a_converter_per_identity_named_to_fit_a_unix_socket():
    from fdkeeper.modes.udp import converter_files
    from fdkeeper.statedir import MAX_SOCKET_PATH

    sut, directory = ("127.0.0.1", 5060), Path("/run/user/1000/fdkeeper")  # names only: nothing is created
    shared = converter_files(directory, sut, "tcp")[0]
    own = converter_files(directory, sut, "tcp", ("127.0.0.1", 5063))[0]
    assert (
        shared.name == "convert-127.0.0.1_5060_tcp.sock"
        and own.name == "convert-127.0.0.1_5060_tcp-from-127.0.0.1_5063.sock"
    )
    deep = directory / ("d" * 40)
    short = converter_files(deep, sut, "tcp", ("127.0.0.1", 5063))[0]
    assert len(bytes(short)) <= MAX_SOCKET_PATH and short == converter_files(deep, sut, "tcp", ("127.0.0.1", 5063))[0]
    assert short != converter_files(deep, sut, "tcp", ("127.0.0.1", 5064))[0] and short.name.startswith("convert-")
    deeper = directory / ("d" * 80)  # too deep for even the short name: one line naming the fix
    with pytest.raises(FdkeeperError, match=r"longer than 107 bytes; pass a shorter --dir"):
        converter_files(deeper, sut, "tcp")


def test_without_i_the_wildcard_is_of_the_suts_family():
    assert sipp_binding(V361, None, 5070, ("::1", 5060)) == Binding(("::", 5070))
    assert sipp_binding(V377, None, 5070, ("127.0.0.1", 5060)) == Binding(("0.0.0.0", 5070))
    assert likely_main_port("::1", range(0)) == ("::1", 0)
