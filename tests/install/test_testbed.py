"""The embedded SuT (fdkeeper.testbed.Kamailio) behaves as the project needs.

With the real sipp and no fdkeeper at all:
- a user registered over TCP gets its calls (INVITE, ACK, BYE) over the very
  connection it registered on, as long as that connection is open;
- once the registering sipp run has exited, calls to the user fail, even with
  a sipp listening on the Contact's port: the SuT never dials a user. This is
  the problem fdkeeper solves;
- restart() keeps the port; location() and tcp_connections() tell tests which
  connection a user is bound to;
- with TLS (certificates from fdkeeper.testbed.pki) a plain `ssl` client verifying
  against the test CA gets 200 to OPTIONS; mutual TLS refuses a client
  without a (good) certificate; close_connections() closes TCP with a FIN
  and TLS with a close_notify first;
- KamailioConverter turns sipp's UDP into TCP/TLS towards the SuT, and a
  call reaches a UDP sipp registered through it over one TLS connection;
- with WebSocket listeners a client registered over WS (or WSS) is reached over
  that connection only (a second client's request comes through it, none once it
  closed), and the Upgrade is refused without the subprotocol sip, off the
  path, and on the SIP port.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import socket
import ssl
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from fdkeeper import testbed
from fdkeeper.address import format_address
from fdkeeper.testbed import kamcmd, process
from fdkeeper.testbed.pki import CLIENT_COMMON_NAME, SERVER_DNS_NAME
from tests.support.wsclient import WsClient, register_request, reply_to, status_of

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def contacts_of(kamailio: testbed.Kamailio, user: str) -> list[dict]:
    return [c for c in kamailio.location() if c["aor"] == user]


def tcp_listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port (TCP)? (sipp's readiness)"""
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.net_connections("tcp4"))


def start_register_then_answer(kamailio, sipp_path, tmp_path: Path, user: str):
    """A plain sipp (-t t1) that registers `user` and waits for one call.

    Returns (process, call_id): the caller must use the same Call-ID, see
    scenarios/uac-register-then-answer.xml.
    """
    call_id = f"fdk-validate-{user}-{uuid.uuid4().hex[:8]}@{kamailio.domain}"
    users = testbed.write_users_csv(tmp_path / f"{user}.csv", [user], kamailio.domain)
    proc = testbed.start_sipp(
        sipp_path,
        "uac-register-then-answer.xml",
        kamailio.address,
        log_dir=tmp_path / "sipp",
        name=f"register-answer-{user}",
        transport="t1",
        calls=1,
        timeout=20,
        extra=["-inf", str(users), "-cid_str", call_id],
    )
    try:
        testbed.wait_until(lambda: contacts_of(kamailio, user), timeout=5, what=f"{user} in the location table")
    except TimeoutError:
        pytest.fail(proc.terminate().summary(), pytrace=False)
    return proc, call_id


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


def test_registered_user_gets_the_call_over_its_connection(kamailio, sipp_path, tmp_path):
    registrant, call_id = start_register_then_answer(kamailio, sipp_path, tmp_path, "alice")
    try:
        [contact] = contacts_of(kamailio, "alice")
        # The SuT remembers the connection's source port, not the Contact's.
        [conn] = kamailio.tcp_connections()
        assert contact["source"] == {"host": "127.0.0.1", "port": conn["remote_port"], "transport": "tcp"}

        call = testbed.place_calls(
            kamailio, "alice", sipp=sipp_path, call_id=call_id, timeout=15, log_dir=tmp_path / "sipp"
        )
        assert call.ok, call.summary()
    finally:
        answered = registrant.wait(10)
    # The registrant's run passes only if INVITE, ACK and BYE all reached it;
    # it has one TCP connection only, the one it registered on.
    assert_answered_over(answered, "TCP")
    assert f"via sip:127.0.0.1:{conn['remote_port']};transport=tcp" in kamailio.log_text()


def assert_answered_over(answered: testbed.SippResult, transport: str) -> None:
    """The answering sipp run passed, and INVITE, ACK and BYE reached it over `transport`."""
    assert answered.ok, answered.summary()
    received = answered.text("messages")
    for method in ("INVITE", "ACK", "BYE"):
        assert re.search(rf"{transport} message received \[\d+\] bytes :\s+{method} sip:", received), (
            f"{method} not received over {transport}; see {answered.file('messages')}"
        )


def register_then_call_in_separate_runs(kamailio, sipp_path, tmp_path: Path, user: str):
    """Register `user` in one sipp run (-t t1 -p P) that exits, start a sipp
    answering run listening on the same P, and call the user.

    sipp 3.6.1 with -t t1 -p P binds its connection to P as well, so both the
    Contact and the received address name the port the answering run listens
    on: a SuT that dialled users would reach it and the call would succeed.
    Returns (caller result, answerer result, P).
    """
    port = testbed.free_port()
    users = testbed.write_users_csv(tmp_path / f"{user}.csv", [user], kamailio.domain)
    register = testbed.run_sipp(
        sipp_path,
        "uac-register.xml",
        kamailio.address,
        log_dir=tmp_path / "sipp",
        name=f"register-{user}",
        transport="t1",
        local_port=port,
        calls=1,
        timeout=10,
        extra=["-inf", str(users)],
    )
    assert register.ok, register.summary()
    [contact] = contacts_of(kamailio, user)
    assert contact["source"]["port"] == port
    assert f":{port};" in contact["contact"]

    answerer = testbed.start_sipp(
        sipp_path,
        "uas-answer.xml",
        kamailio.address,
        log_dir=tmp_path / "sipp",
        name=f"answer-{user}",
        transport="t1",
        local_port=port,
        calls=1,
    )
    try:
        testbed.wait_until(
            lambda: tcp_listening(port) or not answerer.running(), timeout=5, what=f"sipp listening on {port}"
        )
        assert answerer.running(), answerer.terminate().summary()
        call = testbed.place_calls(kamailio, user, sipp=sipp_path, timeout=10, log_dir=tmp_path / "sipp")
        # No connection was opened towards the user.
        assert all(c["remote_port"] != port for c in kamailio.tcp_connections())
    finally:
        answered = answerer.terminate()
    assert call.returncode == testbed.SIPP_EXIT_FAILED and call.failed == 1, call.summary()
    assert call.successful == 0
    assert answered.count("IncomingCall(C)") == 0, answered.summary()
    return call, answered, port


def test_calls_fail_once_the_register_run_has_exited(kamailio, sipp_path, tmp_path):
    """The problem fdkeeper solves: register in one sipp run, answer in another.

    Default SuT: lookup() skips the contact of the lost connection (404), and
    the usrloc timer then drops it from the location table.
    """
    call, _, _ = register_then_call_in_separate_runs(kamailio, sipp_path, tmp_path, "bob")
    assert "SIP/2.0 404" in call.text("errors"), call.summary()
    assert "fdkeeper-sut: no contact for bob" in kamailio.log_text(), kamailio.log_tail()
    testbed.wait_until(
        lambda: not contacts_of(kamailio, "bob"), timeout=kamailio.ul_timer + 3, what="bob's contact to be dropped"
    )


def test_a_dead_contact_is_never_dialled(sipp_path, tmp_path):
    """Even when lookup() returns the dead contact (handle_lost_tcp off), the
    SuT refuses to open a connection to it (set_forward_no_connect): 480."""
    with testbed.Kamailio(tmp_path / "kamailio", handle_lost_tcp=False) as kamailio:
        call, _, port = register_then_call_in_separate_runs(kamailio, sipp_path, tmp_path, "dave")
        assert "SIP/2.0 480" in call.text("errors"), call.summary()
        assert "no open connection to the user" in kamailio.log_text(), kamailio.log_tail()
        [contact] = contacts_of(kamailio, "dave")
        assert contact["source"]["port"] == port


def test_restart_keeps_the_port_and_rpc_reports_state(kamailio, sipp_path, tmp_path):
    port = kamailio.port
    registrant, _ = start_register_then_answer(kamailio, sipp_path, tmp_path, "carol")
    try:
        [contact] = contacts_of(kamailio, "carol")
        assert contact["contact"].startswith("sip:carol@127.0.0.1:")
        assert contact["socket"] == f"tcp:127.0.0.1:{port}"
        assert int(contact["expires"]) > 3000

        [conn] = kamailio.tcp_connections()
        assert conn["type"] == "TCP" and conn["state"] == "CONN_OK"
        assert conn["local"] == f"127.0.0.1:{port}"
        assert conn["remote_port"] == contact["source"]["port"]
        assert int(conn["lifetime"]) >= 3600  # outlives any test run

        kamailio.restart()
        assert kamailio.port == port and kamailio.running
        assert kamailio.options_ping()
        # usrloc is in memory and the restart closed every connection.
        assert kamailio.location() == []
        assert kamailio.tcp_connections() == []
    finally:
        registrant.terminate()

    users = testbed.write_users_csv(tmp_path / "again.csv", ["carol"], kamailio.domain)
    again = testbed.run_sipp(
        sipp_path,
        "uac-register.xml",
        kamailio.address,
        log_dir=tmp_path / "sipp",
        name="register-again",
        transport="t1",
        calls=1,
        timeout=10,
        extra=["-inf", str(users)],
    )
    assert again.ok, again.summary()
    # One log across restarts, each start marked.
    assert kamailio.log_text().count("===== fdkeeper.sut:") == 2


def test_stop_is_idempotent_and_frees_the_port(tmp_path):
    instance = testbed.Kamailio(tmp_path / "k")
    with instance:
        assert instance.options_ping()
    instance.stop()
    assert not instance.running
    # Same port again at once: nothing of the old instance is left behind.
    with testbed.Kamailio(tmp_path / "k2", port=instance.port) as again:
        assert again.options_ping()


def test_missing_kamailio_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(process, "_SBIN_DIRS", ())
    with pytest.raises(RuntimeError, match="Debian package 'kamailio'"):
        testbed.Kamailio(tmp_path / "k").start()


def test_missing_websocket_module_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "module_path", lambda: f"{tmp_path}/")
    with pytest.raises(RuntimeError, match="Debian package 'kamailio-websocket-modules'"):
        testbed.Kamailio(tmp_path / "k", websocket=True).start()
    assert not (tmp_path / "k" / "kamailio.pid").exists()  # refused before Kamailio ran


def test_no_two_test_servers_of_a_run_share_a_port(monkeypatch):
    """A module's keeper lists a closed connection under its SuT's address: a later test server on
    that port would take it for its own. Even a kernel that offers only used ports is turned down."""
    servers = [socket.socket() for _ in range(40)]
    try:
        ports = [testbed.bind_fresh_port(server) for server in servers[:20]] + [testbed.free_port()]
        for server in servers[:20]:
            server.close()  # free again in the kernel, yet not to be handed out again
        offers = itertools.cycle(ports)
        monkeypatch.setattr(testbed.net, "random", types.SimpleNamespace(randint=lambda low, high: next(offers)))
        with pytest.raises(RuntimeError, match="earlier test server"):
            testbed.bind_fresh_port(servers[20])
        monkeypatch.undo()
        later = [testbed.bind_fresh_port(server) for server in servers[21:]]
        assert len(set(ports + later)) == len(ports + later)
    finally:
        for server in servers:
            server.close()


def test_parse_kamcmd_keeps_repeated_members():
    text = """{
\tDomains: {
\t\tDomain: {
\t\t\tDomain: location
\t\t\tAoRs: {
\t\t\t\tInfo: {
\t\t\t\t\tAoR: a
\t\t\t\t\tContacts: {
\t\t\t\t\t\tContact: {
\t\t\t\t\t\t\tAddress: sip:a@127.0.0.1:5060;transport=TCP
\t\t\t\t\t\t\tReceived: sip:127.0.0.1:4000;transport=tcp
\t\t\t\t\t\t}
\t\t\t\t\t\tContact: {
\t\t\t\t\t\t\tAddress: sip:a@127.0.0.1:5070
\t\t\t\t\t\t\tReceived: [not set]
\t\t\t\t\t\t}
\t\t\t\t\t}
\t\t\t\t}
\t\t\t\tInfo: {
\t\t\t\t\tAoR: b
\t\t\t\t\tContacts: {
\t\t\t\t\t\tContact: {
\t\t\t\t\t\t\tAddress: sip:b@[::1]:5080;transport=TCP
\t\t\t\t\t\t}
\t\t\t\t\t}
\t\t\t\t}
\t\t\t}
\t\t}
\t}
}
"""
    [tree] = testbed.parse_kamcmd(text)
    infos = tree["Domains"]["Domain"]["AoRs"]["Info"]
    assert [i["AoR"] for i in infos] == ["a", "b"]
    contacts = [kamcmd.contact_dict(i["AoR"], c) for i in infos for c in kamcmd.as_list(i["Contacts"]["Contact"])]
    assert [c["source"] for c in contacts] == [
        {"host": "127.0.0.1", "port": 4000, "transport": "tcp"},
        {"host": "127.0.0.1", "port": 5070, "transport": "udp"},
        {"host": "::1", "port": 5080, "transport": "tcp"},
    ]


# --------------------------------------------------------------------------
# TLS, close_connections(), the converter
# --------------------------------------------------------------------------


def tls_context(
    pki: testbed.TestPki, *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client context verifying the server against `ca` (the test CA)."""
    context = ssl.create_default_context(cafile=str(ca or pki.ca_cert))
    # Debian's Python sets this by default; the tests tell close_notify from a bare close.
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def tls_connect(
    kamailio: testbed.Kamailio, context: ssl.SSLContext, server_hostname: str = SERVER_DNS_NAME
) -> ssl.SSLSocket:
    """A TLS connection to the SuT. suppress_ragged_eofs=False: a close
    without close_notify raises SSLEOFError instead of reading as b''."""
    raw = socket.create_connection((kamailio.host, kamailio.tls_port), timeout=5)
    return context.wrap_socket(raw, server_hostname=server_hostname, suppress_ragged_eofs=False)


def options_over(sock: socket.socket, target: str, proto: str) -> bytes:
    """OPTIONS sip:TARGET over a connected TCP/TLS socket; return the reply."""
    via = f"SIP/2.0/{proto} {format_address(sock.getsockname()[:2])}"
    sock.sendall(testbed.options_request(f"sip:{target}", via))
    return testbed.read_sip_message(sock)


def udp_exchange(port: int, message_for) -> bytes:
    """Send message_for(local "ip:port") over UDP to 127.0.0.1:port; one reply."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        sock.sendto(message_for(f"127.0.0.1:{sock.getsockname()[1]}"), ("127.0.0.1", port))
        return sock.recvfrom(65535)[0]


def handshake_in_memory(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str) -> None:
    """A full TLS handshake between two contexts through memory BIOs (no
    sockets); raises the ssl error of whichever side fails."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server judges the client certificate after the
            # client has finished; one read on the server side surfaces it.
            try:
                server_side.read(1)
            except ssl.SSLWantReadError:
                pass
            return
    raise AssertionError(f"handshake did not finish: {done}")


def test_pki_certificates_verify_as_documented(test_pki):
    def server_context(cert: Path, key: Path) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        return context

    good = server_context(test_pki.server_cert, test_pki.server_key)
    for name in ("sut.test", "127.0.0.1", "::1"):
        handshake_in_memory(good, tls_context(test_pki), name)
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        handshake_in_memory(
            server_context(test_pki.expired_server_cert, test_pki.expired_server_key), tls_context(test_pki), "sut.test"
        )
    wrong = server_context(test_pki.wrong_name_server_cert, test_pki.wrong_name_server_key)
    handshake_in_memory(wrong, tls_context(test_pki), "other.test")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake_in_memory(wrong, tls_context(test_pki), "sut.test")
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        handshake_in_memory(wrong, tls_context(test_pki), "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake_in_memory(good, tls_context(test_pki, ca=test_pki.other_ca_cert), "sut.test")
    # Mutual TLS: the test CA accepts its client, not the unrelated CA's.
    mutual = server_context(test_pki.server_cert, test_pki.server_key)
    mutual.verify_mode = ssl.CERT_REQUIRED
    mutual.load_verify_locations(str(test_pki.ca_cert))
    handshake_in_memory(mutual, tls_context(test_pki, cert=test_pki.client_cert, key=test_pki.client_key), "sut.test")
    with pytest.raises(ssl.SSLError):
        handshake_in_memory(
            mutual,
            tls_context(test_pki, cert=test_pki.other_ca_client_cert, key=test_pki.other_ca_client_key),
            "sut.test",
        )


def test_tls_options_answered_over_a_verified_connection(kamailio_tls, test_pki):
    assert kamailio_tls.tls_address == f"127.0.0.1:{kamailio_tls.tls_port}"
    assert kamailio_tls.tls_port != kamailio_tls.port
    for name in ("sut.test", "127.0.0.1"):
        with tls_connect(kamailio_tls, tls_context(test_pki), name) as conn:
            assert conn.version() in ("TLSv1.2", "TLSv1.3")
            reply = options_over(conn, kamailio_tls.tls_address, "TLS")
            assert reply.startswith(b"SIP/2.0 200"), reply
            assert b"SIP/2.0/TLS" in reply
            [listed] = kamailio_tls.tcp_connections()
            assert listed["type"] == "TLS" and listed["state"] == "CONN_OK"
            assert listed["remote_port"] == conn.getsockname()[1]
            assert listed["local"] == kamailio_tls.tls_address
            # The tls module's own idle timeout is raised with tcp_lifetime.
            assert int(listed["lifetime"]) >= 3600
            assert [c["id"] for c in kamailio_tls.tls_connections()] == [listed["id"]]
        testbed.wait_until(lambda: not kamailio_tls.tcp_connections(), what="connection gone")
    handshakes = kamailio_tls.tls_handshakes()
    assert [h["direction"] for h in handshakes] == ["in", "in"]
    assert handshakes[0]["client_cert"] is False and handshakes[0]["version"].startswith("TLS")
    # A client that trusts another CA refuses the SuT's certificate.
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_connect(kamailio_tls, tls_context(test_pki, ca=test_pki.other_ca_cert))


def test_mutual_tls_requires_a_client_certificate_of_the_ca(tmp_path, test_pki):
    tls = testbed.KamailioTls.server(test_pki, require_client_cert=True)
    assert "require_certificate = yes" in tls.config_text()
    with testbed.Kamailio(tmp_path / "kamailio", tls=tls) as kamailio:

        def attempt(context: ssl.SSLContext) -> bytes:
            with tls_connect(kamailio, context) as conn:
                return options_over(conn, kamailio.tls_address, "TLS")

        # TLS 1.3 reports the refusal on the first read, 1.2 in the handshake.
        with pytest.raises(ssl.SSLError, match=r"CERTIFICATE_REQUIRED|HANDSHAKE_FAILURE"):
            attempt(tls_context(test_pki))
        with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
            attempt(tls_context(test_pki, cert=test_pki.other_ca_client_cert, key=test_pki.other_ca_client_key))
        reply = attempt(tls_context(test_pki, cert=test_pki.client_cert, key=test_pki.client_key))
        assert reply.startswith(b"SIP/2.0 200"), reply
        [handshake] = kamailio.tls_handshakes()
        assert handshake["client_cert"] is True
        assert handshake["peer_subject"].endswith(f"CN={CLIENT_COMMON_NAME}")
        assert any("peer did not return a certificate" in e for e in kamailio.tls_errors())


def test_close_connections_sends_fin_and_close_notify(kamailio_tls, test_pki):
    tcp = socket.create_connection((kamailio_tls.host, kamailio_tls.port), timeout=5)
    tls = tls_connect(kamailio_tls, tls_context(test_pki))
    with tcp, tls:
        assert options_over(tcp, kamailio_tls.address, "TCP").startswith(b"SIP/2.0 200")
        assert options_over(tls, kamailio_tls.tls_address, "TLS").startswith(b"SIP/2.0 200")
        assert sorted(c["type"] for c in kamailio_tls.tcp_connections()) == ["TCP", "TLS"]

        [closed] = kamailio_tls.close_connections(remote_port=tcp.getsockname()[1])
        assert closed["type"] == "TCP"
        assert tcp.recv(100) == b""  # a FIN: EOF, not a reset
        # The TLS connection is untouched.
        assert options_over(tls, kamailio_tls.tls_address, "TLS").startswith(b"SIP/2.0 200")

        [closed] = kamailio_tls.close_connections()
        assert closed["type"] == "TLS"
        # b"" with suppress_ragged_eofs=False: a close_notify came first.
        assert tls.recv(100) == b""
    assert kamailio_tls.tcp_connections() == []
    assert kamailio_tls.close_connections() == []
    assert "fdkeeper-sut: closing connection" in kamailio_tls.log_text()

    # Without send_close_notify Kamailio just closes the socket.
    kamailio_tls.tls = dataclasses.replace(kamailio_tls.tls, send_close_notify=False)
    kamailio_tls.restart()
    with tls_connect(kamailio_tls, tls_context(test_pki)) as tls:
        assert options_over(tls, kamailio_tls.tls_address, "TLS").startswith(b"SIP/2.0 200")
        kamailio_tls.close_connections()
        with pytest.raises(ssl.SSLError) as raised:
            tls.recv(100)
        # An unexpected EOF, not a clean close: SSLEOFError, or on OpenSSL 3 with some
        # Python builds an SSLError whose reason says the same.
        assert isinstance(raised.value, ssl.SSLEOFError) or raised.value.reason == "UNEXPECTED_EOF_WHILE_READING"


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_converter_forwards_udp_options_to_the_sut(kamailio_tls, test_pki, tmp_path, transport):
    tls = testbed.KamailioTls.client(test_pki) if transport == "tls" else None
    with testbed.KamailioConverter.for_sut(tmp_path / "converter", kamailio_tls, transport, tls=tls) as converter:
        assert converter.options_ping()  # answered by the converter itself
        for _ in range(3):
            reply = udp_exchange(
                converter.port, lambda me: testbed.options_request(f"sip:{kamailio_tls.address}", f"SIP/2.0/UDP {me}")
            )
            assert reply.startswith(b"SIP/2.0 200"), reply
            assert b"Server: fdkeeper-sut" in reply
        # One connection, from the converter's own listen socket.
        [conn] = kamailio_tls.tcp_connections()
        assert conn["type"] == transport.upper()
        assert f"{transport}:{conn['remote']}" == converter.send_socket
        if transport == "tls":
            [out] = converter.tls_handshakes()
            assert out["direction"] == "out" and out["peer"] == kamailio_tls.tls_address
            assert out["peer_subject"].endswith("CN=sut.test")


def test_call_reaches_a_udp_sipp_registered_through_the_tls_converter(tmp_path, test_pki, sipp_path):
    """sipp (UDP) -> converter -> SuT over mutual TLS: REGISTER, then a third
    party's call (INVITE, ACK, BYE) reaches sipp over that one TLS connection."""
    sipp_port = testbed.free_port()
    server_tls = testbed.KamailioTls.server(test_pki, require_client_cert=True)
    with (
        testbed.Kamailio(tmp_path / "kamailio", tls=server_tls) as kamailio,
        testbed.KamailioConverter.for_sut(
            tmp_path / "converter",
            kamailio,
            "tls",
            tls=testbed.KamailioTls.client(test_pki),
            sipp_address=f"127.0.0.1:{sipp_port}",
        ) as converter,
    ):
        call_id = f"fdk-conv-{uuid.uuid4().hex[:8]}@{kamailio.domain}"
        users = testbed.write_users_csv(tmp_path / "alice.csv", ["alice"], kamailio.domain)
        registrant = testbed.start_sipp(
            sipp_path,
            "uac-register-then-answer.xml",
            converter.address,
            log_dir=tmp_path / "sipp",
            name="register-answer-via-converter",
            transport="u1",
            local_port=sipp_port,
            calls=1,
            timeout=20,
            extra=["-inf", str(users), "-cid_str", call_id],
        )
        try:
            try:
                [contact] = testbed.wait_until(
                    lambda: contacts_of(kamailio, "alice"), timeout=5, what="alice in the location table"
                )
            except TimeoutError:
                pytest.fail(registrant.terminate().summary(), pytrace=False)
            [conn] = kamailio.tcp_connections()
            assert conn["type"] == "TLS"
            assert f"tls:{conn['remote']}" == converter.send_socket
            assert contact["source"] == {"host": "127.0.0.1", "port": converter.tls_port, "transport": "tls"}
            assert contact["contact"].startswith(f"sip:alice@127.0.0.1:{sipp_port}")

            call = testbed.place_calls(
                kamailio, "alice", sipp=sipp_path, call_id=call_id, timeout=15, log_dir=tmp_path / "sipp"
            )
            assert call.ok, call.summary()
        finally:
            answered = registrant.wait(10)
        assert_answered_over(answered, "UDP")
        # One TLS connection (one handshake, with the client certificate) for it all.
        assert [c["id"] for c in kamailio.tcp_connections()] == [conn["id"]]
        [handshake] = kamailio.tls_handshakes()
        assert handshake["client_cert"] is True


# --------------------------------------------------------------------------
# WebSocket: WS and WSS listeners (Kamailio's xhttp + websocket modules)
# --------------------------------------------------------------------------

WS_PATH = "/sip"


@pytest.fixture(scope="module")
def kamailio_ws(tmp_path_factory, pki):
    """One SuT with WS and WSS listeners (Upgrade on WS_PATH only) for the WebSocket tests."""
    instance = testbed.Kamailio(
        tmp_path_factory.mktemp("ws") / "kamailio", tls=testbed.KamailioTls.server(pki), websocket=True, ws_path=WS_PATH
    )
    instance.start()
    yield instance
    instance.stop()
    print(f"--- kamailio log tail ---\n{instance.log_tail(40)}")


def ws_client(kamailio: testbed.Kamailio, pki=None, path: str = WS_PATH) -> WsClient:
    """A WebSocket client of the SuT: WSS verified against the test CA when `pki` is given."""
    if pki is None:
        return WsClient.connect(kamailio.host, kamailio.ws_port, path=path)
    return WsClient.connect(
        kamailio.host, kamailio.wss_port, path=path, tls=tls_context(pki), server_hostname=SERVER_DNS_NAME
    )


def ws_register(client: WsClient, kamailio: testbed.Kamailio, user: str, transport: str = "WS") -> str:
    client.send(register_request(user, kamailio.domain, client, transport=transport))
    return status_of(client.receive())


def test_websocket_user_is_reached_only_over_the_connection_it_registered_on(kamailio_ws):
    alice = ws_client(kamailio_ws)
    assert ws_register(alice, kamailio_ws, "ws-alice") == "SIP/2.0 200 OK"
    [contact] = contacts_of(kamailio_ws, "ws-alice")
    assert contact["source"] == {"host": "127.0.0.1", "port": alice.local_port, "transport": "ws"}
    assert alice.local_port in [c["remote_port"] for c in kamailio_ws.websocket_connections() if c["type"] == "WS"]
    [register] = [r for r in kamailio_ws.websocket_requests() if r["user"] == "ws-alice"]
    assert register["transport"] == "ws" and register["via"].startswith("SIP/2.0/WS ")

    # A second WebSocket client calls alice: the request comes over alice's connection.
    with ws_client(kamailio_ws) as bob:
        target = f"sip:ws-alice@{kamailio_ws.domain}"
        bob.send(testbed.options_request(target, "SIP/2.0/WS bob.invalid"))
        request = alice.receive()
        assert status_of(request).startswith("OPTIONS sip:ws-alice@") and b"SIP/2.0/WS" in request
        alice.send(reply_to(request))
        assert status_of(bob.receive()) == "SIP/2.0 200 OK"

        # Once alice's connection is gone, nobody reaches her: the SuT opens none.
        alice.close()
        testbed.wait_until(
            lambda: not contacts_of(kamailio_ws, "ws-alice"), timeout=10, what="ws-alice's contact to be dropped"
        )
        bob.send(testbed.options_request(target, "SIP/2.0/WS bob.invalid"))
        assert status_of(bob.receive()).startswith(("SIP/2.0 404", "SIP/2.0 480"))


def test_wss_register_over_a_verified_connection(kamailio_ws, pki):
    with ws_client(kamailio_ws, pki) as carol:
        assert carol.handshake.protocol.lower() == "sip"
        assert ws_register(carol, kamailio_ws, "wss-carol", transport="WSS") == "SIP/2.0 200 OK"
        [contact] = contacts_of(kamailio_ws, "wss-carol")
        # RFC 7118: the URI parameter is transport=ws for WS and WSS alike.
        assert contact["source"] == {"host": "127.0.0.1", "port": carol.local_port, "transport": "ws"}
        assert carol.local_port in [c["remote_port"] for c in kamailio_ws.websocket_connections() if c["type"] == "WSS"]
        # A request to carol (an SBC-style ping over UDP) comes over her WSS connection.
        with ThreadPoolExecutor(1) as pool:
            ping = pool.submit(kamailio_ws.ping_user, "wss-carol", 5.0)
            request = carol.receive()
            assert status_of(request).startswith("OPTIONS sip:wss-carol@") and b"SIP/2.0/WSS" in request
            carol.send(reply_to(request))
            assert (ping.result() or b"").startswith(b"SIP/2.0 200")


def raw_upgrade(port: int, path: str = WS_PATH, protocol: str = "sip") -> str:
    """The status line of the SuT's answer to a hand-made Upgrade request."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
        )
        sock.sendall(request.encode())
        return sock.recv(4096).split(b"\r\n", 1)[0].decode()


def test_the_upgrade_is_refused_without_sip_off_the_path_and_on_the_sip_port(kamailio_ws):
    assert raw_upgrade(kamailio_ws.ws_port).startswith("HTTP/1.1 101")
    assert raw_upgrade(kamailio_ws.ws_port, protocol="chat").startswith("HTTP/1.1 400")
    assert raw_upgrade(kamailio_ws.ws_port, path="/other").startswith("HTTP/1.1 404")
    assert raw_upgrade(kamailio_ws.port).startswith("HTTP/1.1 403")  # the SIP port takes no WebSocket
