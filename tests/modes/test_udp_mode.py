"""`--mode udp`: the converter serves only attached runs (issue 10 item 4) and loses nothing on
the UDP hop (issue 11 item 4): requests in the gap between runs wait for the next run, and a
request UDP dropped is resent until sipp answers it.

Unit level: the Converter fed directly. End to end: Debian's sipp, the converter process, Kamailio.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

from fdkeeper import testbed
from fdkeeper.convert import Converter, Link, control_request
from fdkeeper.convert.delivery import T1, TIMEOUT
from fdkeeper.modes.udp import stop_converters
from tests.support.converter import USER, FakeSock, answer_calls

SIPP = ("127.0.0.1", 6100)
SUT_INVITE = (
    b"INVITE sip:alice@127.0.0.1:6100 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKsut1\r\n"
    b"Max-Forwards: 70\r\nFrom: <sip:b@example.test>;tag=9\r\nTo: <sip:alice@example.test>\r\n"
    b"Call-ID: gap1@x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)
RINGING = (
    b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKfdksut1\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKsut1\r\nFrom: <sip:b@example.test>;tag=9\r\n"
    b"To: <sip:alice@example.test>;tag=3\r\nCall-ID: gap1@x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)
REGISTER = (
    b"REGISTER sip:example.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:7777;branch=z9hG4bK-r1\r\n"
    b"Max-Forwards: 70\r\nFrom: <sip:mallory@example.test>;tag=1\r\nTo: <sip:mallory@example.test>\r\n"
    b"Call-ID: r1@x\r\nCSeq: 1 REGISTER\r\nContact: <sip:mallory@127.0.0.1:7777>\r\nContent-Length: 0\r\n\r\n"
)


def attached_only_converter() -> tuple[Converter, Link, list]:
    sent: list = []
    converter = Converter(
        ("127.0.0.1", 5999),
        ("127.0.0.1", 5060, "tcp"),
        None,
        False,
        lambda data, address: sent.append((data, address)),
        lambda key: None,
        attached_only=True,
    )
    link = converter.add_link(Link(("127.0.0.1", 5060, "tcp"), FakeSock(), ("127.0.0.1", 40000), converter.listen_hp))
    return converter, link, sent


# --------------------------------------------------------------------------
# unit
# --------------------------------------------------------------------------


def test_unit_datagrams_from_unattached_addresses_are_dropped_and_counted():
    converter, link, _ = attached_only_converter()
    converter.from_sipp(REGISTER, ("127.0.0.1", 7777))
    assert not link.out and converter.counters["udp_dropped_unattached"] == 1
    converter.attach(("127.0.0.1", 7777), None)
    converter.from_sipp(REGISTER, ("127.0.0.1", 7777))
    assert link.out.startswith(b"REGISTER ")
    converter.detach(("127.0.0.1", 7777))
    link.out.clear()
    converter.from_sipp(REGISTER, ("127.0.0.1", 7777))
    assert not link.out and converter.counters["udp_dropped_unattached"] == 2


def test_unit_request_in_the_gap_waits_for_the_next_run_and_is_resent_until_answered():
    converter, link, sent = attached_only_converter()
    converter.from_stream(link, SUT_INVITE)
    assert not sent and converter.counters["queued_requests"] == 1
    converter.attach(SIPP, None)
    assert [address for _, address in sent] == [SIPP] and sent[0][0].startswith(b"INVITE ")
    start = converter.now
    for elapsed, copies in ((T1 - 0.01, 1), (T1, 2), (T1 + 2 * T1 - 0.01, 2), (3 * T1, 3), (7 * T1, 4)):
        converter.delivery.tick(start + elapsed)  # timer A: T1, 2*T1, 4*T1 ... after the first copy
        assert len(sent) == copies, elapsed
    converter.from_sipp(RINGING, SIPP)  # any response with our branch ends the resending
    converter.delivery.tick(start + 60 * T1)
    assert len(sent) == 4 and converter.counters["udp_retransmissions"] == 3 and not converter.delivery.pending


def test_unit_resending_gives_up_after_64_t1_and_the_queue_expires():
    converter, link, sent = attached_only_converter()
    converter.from_stream(link, SUT_INVITE)
    converter.delivery.tick(converter.now + TIMEOUT + 1)
    assert converter.counters["queue_expired"] == 1 and not converter.delivery.queue
    converter.attach(SIPP, None)
    assert not sent
    converter.from_stream(link, SUT_INVITE)
    converter.delivery.tick(converter.now + TIMEOUT)
    assert converter.counters["retransmit_timeouts"] == 1 and not converter.delivery.pending


def test_unit_a_dead_runs_attachment_is_dropped():
    converter, _, _ = attached_only_converter()
    child = subprocess.Popen(["true"])
    child.wait()
    converter.attach(SIPP, child.pid)
    converter.detach_dead()
    assert not converter.delivery.attached and converter.sipp_address is None


# --------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------

SEND_DATAGRAM = "import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(sys.stdin.buffer.read(), ('127.0.0.1', int(sys.argv[1])))"


def test_converter_is_no_open_relay(sipp_path, kamailio, tmp_path, converters):
    """Another local socket, and another uid, cannot reach the SuT; the attached run still works."""
    converter = converters(tmp_path / "conv", kamailio.address, "tcp", testbed.free_port(), "--attached-only")
    port = int(converter.listen.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder:
        intruder.sendto(REGISTER, ("127.0.0.1", port))
    subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-c",
            SEND_DATAGRAM,
            str(port),
        ],
        input=REGISTER,
        check=True,
    )
    testbed.wait_until(lambda: converter.status()["counters"].get("udp_dropped_unattached") == 2, 5, what="two drops")
    assert converter.status()["links"][0]["messages_out"] == 0 and not kamailio.location()

    assert control_request(converter.control, f"ATTACH 127.0.0.1:{converter.sipp_port}")["ok"]
    users = testbed.write_users_csv(tmp_path / "register.csv", [USER], kamailio.domain)
    result = testbed.run_sipp(
        sipp_path,
        "uac-register.xml",
        converter.listen,
        log_dir=tmp_path / "logs",
        name="register",
        transport="u1",
        local_port=converter.sipp_port,
        calls=1,
        timeout=10,
        extra=["-inf", str(users)],
    )
    assert result.ok, result.summary()
    answer_calls(sipp_path, converter, kamailio, tmp_path, count=1)
    assert converter.status()["counters"]["udp_dropped_unattached"] == 2


def fdkeeper_sipp(directory: Path, sipp_path: str, logs: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fdkeeper",
            "sipp",
            "--mode",
            "udp",
            "--dir",
            str(directory),
            "--sipp",
            sipp_path,
            "--",
            *args,
            "-nostdin",
            "-timeout",
            "20s",
            "-timeout_error",
            "-trace_msg",
        ],
        cwd=logs,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(logs / "fdkeeper.err", "ab"),
    )


def test_mode_udp_call_in_the_gap_is_answered_by_the_next_run(sipp_path, kamailio, tmp_path):
    directory, logs = tmp_path / "state", tmp_path / "logs"
    directory.mkdir(mode=0o700)
    logs.mkdir()
    users = testbed.write_users_csv(tmp_path / "users.csv", [USER], kamailio.domain)
    port = str(testbed.free_port())
    try:
        register = fdkeeper_sipp(
            directory,
            sipp_path,
            logs,
            "-sf",
            str(testbed.SCENARIOS_DIR / "uac-register.xml"),
            "-inf",
            str(users),
            "-m",
            "1",
            "-t",
            "t1",
            "-p",
            port,
            kamailio.address,
        )
        assert register.wait(30) == 0, (logs / "fdkeeper.err").read_text()
        control = next(directory.glob("convert-*.sock"))
        assert control_request(control, "STATUS")["attached"] == []  # the run detached

        calls: list = []
        caller = threading.Thread(
            target=lambda: calls.append(
                testbed.place_calls(kamailio, USER, 1, sipp=sipp_path, timeout=20, log_dir=logs)
            )
        )
        caller.start()
        testbed.wait_until(lambda: control_request(control, "STATUS")["queued"] == 1, 10, what="the INVITE queued")
        listen = control_request(control, "STATUS")["listen"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(REGISTER, ("127.0.0.1", int(listen.rsplit(":", 1)[1])))
        testbed.wait_until(
            lambda: control_request(control, "STATUS")["counters"].get("udp_dropped_unattached"),
            5,
            what="the stranger's datagram dropped",
        )
        shown = subprocess.run(
            [sys.executable, "-m", "fdkeeper", "status", "--dir", str(directory)],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert shown.returncode == 0 and "queued 1;" in shown.stdout and "dropped from strangers 1" in shown.stdout, (
            shown
        )
        answer = fdkeeper_sipp(
            directory,
            sipp_path,
            logs,
            "-sf",
            str(testbed.SCENARIOS_DIR / "uas-answer.xml"),
            "-m",
            "1",
            "-t",
            "t1",
            "-p",
            port,
            kamailio.address,
        )
        assert answer.wait(30) == 0, (logs / "fdkeeper.err").read_text()
        caller.join(30)
        assert calls and calls[0].ok, calls and calls[0].summary()
        status = control_request(control, "STATUS")
        assert status["counters"]["queue_delivered"] >= 1 and status["queued"] == 0
    finally:
        stop_converters(directory)


class DroppingProxy:
    """A UDP relay between the converter and sipp that drops the first INVITE it sees. sipp
    answers where a request came from, so its responses come back through here too."""

    def __init__(self, converter: int, target: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.converter, self.target, self.dropped, self.running = converter, target, 0, True
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        while self.running:
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if source[1] == self.target:
                self.sock.sendto(data, ("127.0.0.1", self.converter))
            elif data.startswith(b"INVITE ") and not self.dropped:
                self.dropped += 1
            else:
                self.sock.sendto(data, ("127.0.0.1", self.target))

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


def test_a_dropped_invite_is_resent_and_the_call_succeeds(sipp_path, kamailio, tmp_path, converters):
    converter = converters(tmp_path / "conv", kamailio.address, "tcp", testbed.free_port(), "--attached-only")
    assert control_request(converter.control, f"ATTACH 127.0.0.1:{converter.sipp_port}")["ok"]
    users = testbed.write_users_csv(tmp_path / "register.csv", [USER], kamailio.domain)
    assert testbed.run_sipp(
        sipp_path,
        "uac-register.xml",
        converter.listen,
        log_dir=tmp_path / "logs",
        name="register",
        transport="u1",
        local_port=converter.sipp_port,
        calls=1,
        timeout=10,
        extra=["-inf", str(users)],
    ).ok
    proxy = DroppingProxy(int(converter.listen.rsplit(":", 1)[1]), converter.sipp_port)
    try:
        # sipp's own address stays attached (its own requests come from there); the SuT's
        # initial requests go to the address attached last: the proxy.
        assert control_request(converter.control, f"ATTACH 127.0.0.1:{proxy.port}")["ok"]
        answer_calls(sipp_path, converter, kamailio, tmp_path, count=1)
    finally:
        proxy.close()
    assert proxy.dropped == 1 and converter.status()["counters"]["udp_retransmissions"] >= 1
