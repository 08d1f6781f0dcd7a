"""The embedded SuT (fdkeeper.sut.Kamailio) behaves as the project needs.

With the real sipp and no fdkeeper at all:
- a user registered over TCP gets its calls (INVITE, ACK, BYE) over the very
  connection it registered on, as long as that connection is open;
- once the registering sipp run has exited, calls to the user fail, even with
  a sipp listening on the Contact's port: the SuT never dials a user. This is
  the problem fdkeeper solves;
- restart() keeps the port; location() and tcp_connections() tell tests which
  connection a user is bound to.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import psutil
import pytest

from fdkeeper import sut


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def contacts_of(kamailio: sut.Kamailio, user: str) -> list[dict]:
    return [c for c in kamailio.location() if c["aor"] == user]


def tcp_listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port (TCP)? (sipp's readiness)"""
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.net_connections("tcp4"))


def start_register_then_answer(kamailio, sipp_path, tmp_path: Path, user: str):
    """A plain sipp (-t t1) that registers `user` and waits for one call.

    Returns (process, call_id): the caller must use the same Call-ID, see
    scenarios/uac-register-then-answer.xml.
    """
    call_id = f"fdk-validate-{user}-{uuid.uuid4().hex[:8]}@{kamailio.domain}"
    users = sut.write_users_csv(tmp_path / f"{user}.csv", [user], kamailio.domain)
    proc = sut.start_sipp(sipp_path, "uac-register-then-answer.xml", kamailio.address,
                          log_dir=tmp_path / "sipp", name=f"register-answer-{user}",
                          transport="t1", calls=1, timeout=20,
                          extra=["-inf", str(users), "-cid_str", call_id])
    try:
        sut.wait_until(lambda: contacts_of(kamailio, user), timeout=5,
                       what=f"{user} in the location table")
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
        assert contact["source"] == {"host": "127.0.0.1", "port": conn["remote_port"],
                                     "transport": "tcp"}

        call = sut.place_calls(kamailio, "alice", sipp=sipp_path, call_id=call_id,
                               timeout=15, log_dir=tmp_path / "sipp")
        assert call.ok, call.summary()
    finally:
        answered = registrant.wait(10)
    # The registrant's run passes only if INVITE, ACK and BYE all reached it;
    # it has one TCP connection only, the one it registered on.
    assert answered.ok, answered.summary()
    received = answered.text("messages")
    for method in ("INVITE", "ACK", "BYE"):
        assert re.search(rf"TCP message received \[\d+\] bytes :\s+{method} sip:", received), \
            f"{method} not received over TCP; see {answered.file('messages')}"
    assert f"via sip:127.0.0.1:{conn['remote_port']};transport=tcp" in kamailio.log_text()


def register_then_call_in_separate_runs(kamailio, sipp_path, tmp_path: Path, user: str):
    """Register `user` in one sipp run (-t t1 -p P) that exits, start a sipp
    answering run listening on the same P, and call the user.

    sipp 3.6.1 with -t t1 -p P binds its connection to P as well, so both the
    Contact and the received address name the port the answering run listens
    on: a SuT that dialled users would reach it and the call would succeed.
    Returns (caller result, answerer result, P).
    """
    port = sut.free_port()
    users = sut.write_users_csv(tmp_path / f"{user}.csv", [user], kamailio.domain)
    register = sut.run_sipp(sipp_path, "uac-register.xml", kamailio.address,
                            log_dir=tmp_path / "sipp", name=f"register-{user}",
                            transport="t1", local_port=port, calls=1, timeout=10,
                            extra=["-inf", str(users)])
    assert register.ok, register.summary()
    [contact] = contacts_of(kamailio, user)
    assert contact["source"]["port"] == port
    assert f":{port};" in contact["contact"]

    answerer = sut.start_sipp(sipp_path, "uas-answer.xml", kamailio.address,
                              log_dir=tmp_path / "sipp", name=f"answer-{user}",
                              transport="t1", local_port=port, calls=1)
    try:
        sut.wait_until(lambda: tcp_listening(port) or not answerer.running(), timeout=5,
                       what=f"sipp listening on {port}")
        assert answerer.running(), answerer.terminate().summary()
        call = sut.place_calls(kamailio, user, sipp=sipp_path, timeout=10,
                               log_dir=tmp_path / "sipp")
        # No connection was opened towards the user.
        assert all(c["remote_port"] != port for c in kamailio.tcp_connections())
    finally:
        answered = answerer.terminate()
    assert call.returncode == sut.SIPP_EXIT_FAILED and call.failed == 1, call.summary()
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
    sut.wait_until(lambda: not contacts_of(kamailio, "bob"), timeout=kamailio.ul_timer + 3,
                   what="bob's contact to be dropped")


def test_a_dead_contact_is_never_dialled(sipp_path, tmp_path):
    """Even when lookup() returns the dead contact (handle_lost_tcp off), the
    SuT refuses to open a connection to it (set_forward_no_connect): 480."""
    with sut.Kamailio(tmp_path / "kamailio", handle_lost_tcp=False) as kamailio:
        call, _, port = register_then_call_in_separate_runs(
            kamailio, sipp_path, tmp_path, "dave")
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
        assert int(conn["lifetime"]) >= 3600   # outlives any test run

        kamailio.restart()
        assert kamailio.port == port and kamailio.running
        assert kamailio.options_ping()
        # usrloc is in memory and the restart closed every connection.
        assert kamailio.location() == []
        assert kamailio.tcp_connections() == []
    finally:
        registrant.terminate()

    users = sut.write_users_csv(tmp_path / "again.csv", ["carol"], kamailio.domain)
    again = sut.run_sipp(sipp_path, "uac-register.xml", kamailio.address,
                         log_dir=tmp_path / "sipp", name="register-again", transport="t1",
                         calls=1, timeout=10, extra=["-inf", str(users)])
    assert again.ok, again.summary()
    # One log across restarts, each start marked.
    assert kamailio.log_text().count("===== fdkeeper.sut:") == 2


def test_stop_is_idempotent_and_frees_the_port(tmp_path):
    instance = sut.Kamailio(tmp_path / "k")
    with instance:
        assert instance.options_ping()
    instance.stop()
    assert not instance.running
    # Same port again at once: nothing of the old instance is left behind.
    with sut.Kamailio(tmp_path / "k2", port=instance.port) as again:
        assert again.options_ping()


def test_missing_kamailio_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sut, "_SBIN_DIRS", ())
    with pytest.raises(RuntimeError, match="Debian package 'kamailio'"):
        sut.Kamailio(tmp_path / "k").start()


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
    [tree] = sut.parse_kamcmd(text)
    infos = tree["Domains"]["Domain"]["AoRs"]["Info"]
    assert [i["AoR"] for i in infos] == ["a", "b"]
    contacts = [sut._contact_dict(i["AoR"], c)
                for i in infos for c in sut._as_list(i["Contacts"]["Contact"])]
    assert [c["source"] for c in contacts] == [
        {"host": "127.0.0.1", "port": 4000, "transport": "tcp"},
        {"host": "127.0.0.1", "port": 5070, "transport": "udp"},
        {"host": "::1", "port": 5080, "transport": "tcp"},
    ]
