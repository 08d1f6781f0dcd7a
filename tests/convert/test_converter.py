"""The UDP <-> TCP/TLS converter (fdkeeper/convert/) and `--mode udp` (fdkeeper/modes/udp.py).

End to end: Debian's sipp on UDP, the converter as its own process, real Kamailio SuTs.
Unit level: the converter's message processing fed directly, fuzzed with hypothesis.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdkeeper import testbed
from fdkeeper.convert import Converter, ExpiringMap, Link, control_request
from fdkeeper.convert.control import answer
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.udp import UdpMode, stop_converters
from fdkeeper.sipp.args import parse_sipp_args
from fdkeeper.sipp.request import converter_arguments, sipp_request
from fdkeeper.sipp.tables import SIPP_3_6, OptionTable
from tests.support.converter import USER, FakeSock, answer_calls, register

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def messages(log: str) -> list[tuple[str, str]]:
    """sipp -trace_msg: [(direction 'received'/'sent', message text)]."""
    parts = re.split(r"^-{20,} [^\n]*\n(?:UDP|TCP|TLS) message (received|sent)[^\n]*\n\n", log, flags=re.M)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def headers(message: str, name: str) -> list[str]:
    """Every value of a header (comma lists split) in a message's text."""
    values = []
    for line in message.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in (name.lower(), {"via": "v", "record-route": "record-route"}.get(name.lower(), "")):
            values += [v.strip() for v in re.split(r",(?![^<]*>)", value)]
    return values


def first(log: str, direction: str, start: str) -> str:
    return next(text for d, text in messages(log) if d == direction and text.startswith(start))


# --------------------------------------------------------------------------
# end to end: TCP and TLS
# --------------------------------------------------------------------------


def test_register_then_answer_over_the_kept_tcp_connection(sipp_path, kamailio, tmp_path, converters):
    converter = converters(tmp_path / "conv", kamailio.address, "tcp", testbed.free_port())
    register(sipp_path, converter, kamailio, tmp_path)
    [link] = converter.status()["links"]
    [contact] = kamailio.location()
    assert contact["source"] == {"host": "127.0.0.1", "port": int(link["local"].rsplit(":", 1)[1]), "transport": "tcp"}

    caller, answered = answer_calls(sipp_path, converter, kamailio, tmp_path, count=2)
    assert len(kamailio.tcp_connections()) == 1 and converter.status()["links"][0]["state"] == "open"
    listen, local = converter.listen, link["local"]
    # sipp's side: our Via (UDP) on top, two Record-Route entries, the UDP one (facing sipp) first.
    invite = first(answered.text("messages"), "received", "INVITE")
    assert headers(invite, "Via")[0].startswith(f"SIP/2.0/UDP {listen};branch=z9hG4bKfdk")
    assert headers(invite, "Record-Route")[:2] == [
        f"<sip:{listen};transport=udp;lr>",
        f"<sip:{local};transport=tcp;lr>",
    ]
    # ACK and BYE followed the route set back through the converter, our entries removed on the way.
    for method in ("ACK", "BYE"):
        request = first(answered.text("messages"), "received", method)
        assert headers(request, "Via")[0].startswith(f"SIP/2.0/UDP {listen};"), request
        assert not [r for r in headers(request, "Route") if listen in r or local in r], request
    # The caller (through Kamailio) routes ACK/BYE via our stream-side entry, then ours for sipp.
    caller_ack = first(caller.text("messages"), "sent", "ACK")
    routes = headers(caller_ack, "Route")
    assert routes[-2:] == [f"<sip:{local};transport=tcp;lr>", f"<sip:{listen};transport=udp;lr>"], caller_ack
    counters = converter.status()["counters"]
    assert counters["requests_to_udp"] >= 6 and not converter.status()["malformed"]


def test_register_then_answer_over_tls(sipp_path, kamailio_tls, test_pki, tmp_path, converters):
    converter = converters(
        tmp_path / "conv", kamailio_tls.tls_address, "tls", testbed.free_port(), "--tls-ca", str(test_pki.ca_cert)
    )
    register(sipp_path, converter, kamailio_tls, tmp_path)
    assert kamailio_tls.location()[0]["source"]["transport"] == "tls"
    _caller, answered = answer_calls(sipp_path, converter, kamailio_tls, tmp_path, count=2)
    [connection] = kamailio_tls.tls_connections()
    [link] = converter.status()["links"]
    assert connection["remote"] == link["local"] and link["transport"] == "tls"
    invite = first(answered.text("messages"), "received", "INVITE")
    assert f"<sip:{link['local']};transport=tls;lr>" in headers(invite, "Record-Route")


def test_closed_connection_is_reported_and_refused_until_reconnect(sipp_path, kamailio, tmp_path, converters):
    converter = converters(tmp_path / "conv", kamailio.address, "tcp", testbed.free_port())
    register(sipp_path, converter, kamailio, tmp_path)
    kamailio.close_connections()
    testbed.wait_until(lambda: converter.status()["links"][0]["state"] == "closed", 5, what="the closed link")
    assert "FIN" in converter.status()["links"][0]["closed_reason"]
    refused = testbed.run_sipp(
        sipp_path,
        "uac-register.xml",
        converter.listen,
        log_dir=tmp_path / "logs",
        name="refused",
        transport="u1",
        calls=1,
        timeout=5,
        extra=["-inf", str(testbed.write_users_csv(tmp_path / "u.csv", [USER], kamailio.domain))],
    )
    assert not refused.ok and "503" in refused.text("messages")
    assert control_request(converter.control, "RECONNECT")["reconnected"]
    register(sipp_path, converter, kamailio, tmp_path, name="again")


# --------------------------------------------------------------------------
# X-Outbound-Proxy and --hide-topology
# --------------------------------------------------------------------------


OPTIONS_TO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="options with X-Outbound-Proxy">
  <send retrans="500"><![CDATA[

      OPTIONS sip:[target] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      Max-Forwards: 70
      From: <sip:probe@[local_ip]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[target]>
      Call-ID: [call_id]
      CSeq: 1 OPTIONS
      X-Outbound-Proxy: <sip:[target];transport=tcp>
      Content-Length: 0

  ]]></send>
  <recv response="200"/>
</scenario>
"""


def test_x_outbound_proxy_goes_to_a_second_sut(sipp_path, kamailio, tmp_path, converters):
    second = testbed.Kamailio(tmp_path / "second")
    second.start()
    try:
        converter = converters(tmp_path / "conv", kamailio.address, "tcp", testbed.free_port())
        scenario = tmp_path / "options-xop.xml"
        scenario.write_text(OPTIONS_TO)
        result = testbed.run_sipp(
            sipp_path,
            scenario,
            converter.listen,
            log_dir=tmp_path / "logs",
            name="xop",
            transport="u1",
            calls=3,
            timeout=10,
            extra=["-key", "target", second.address],
        )
        assert result.ok and result.successful == 3, result.summary()
        links = {link["remote"]: link for link in converter.status()["links"]}
        assert links[second.address]["messages_out"] == 3 and links[kamailio.address]["messages_out"] == 0
        assert [c["remote"] for c in second.tcp_connections()] == [links[second.address]["local"]]
    finally:
        second.stop()


def test_hide_topology_header_by_header(sipp_path, kamailio, tmp_path, converters):
    converter = converters(tmp_path / "conv", kamailio.address, "tcp", testbed.free_port(), "--hide-topology")
    register(sipp_path, converter, kamailio, tmp_path)
    caller, answered = answer_calls(sipp_path, converter, kamailio, tmp_path, count=1)
    local = converter.status()["links"][0]["local"]
    ours = (converter.listen, local, "fdk")
    # sipp's view (the answer run) and Kamailio's view (what it relayed to and from the caller).
    for log in (answered.text("messages"), caller.text("messages")):
        for direction, text in messages(log):
            for name in ("Via", "Record-Route", "Route"):
                leaked = [value for value in headers(text, name) if any(mark in value for mark in ours)]
                assert not leaked, f"{name} of the converter in {direction}:\n{text}"
    # Requests from sipp reach the SuT with sipp's own Via on top: a call from sipp through the
    # converter to bob, registered at Kamailio directly over UDP, shows what Kamailio got.
    bob_port = testbed.free_port()
    users = testbed.write_users_csv(tmp_path / "bob.csv", ["bob"], kamailio.domain)
    assert testbed.run_sipp(
        sipp_path,
        "uac-register.xml",
        kamailio.address,
        log_dir=tmp_path / "logs",
        name="reg-bob",
        transport="u1",
        local_port=bob_port,
        calls=1,
        timeout=10,
        extra=["-inf", str(users)],
    ).ok
    bob = testbed.start_sipp(
        sipp_path,
        "uas-answer.xml",
        kamailio.address,
        log_dir=tmp_path / "logs",
        name="bob",
        transport="u1",
        local_port=bob_port,
        calls=1,
        timeout=15,
    )
    call = testbed.run_sipp(
        sipp_path,
        "uac-call.xml",
        converter.listen,
        log_dir=tmp_path / "logs",
        name="to-bob",
        transport="u1",
        calls=1,
        timeout=10,
        extra=["-s", "bob", "-key", "domain", kamailio.domain],
    )
    bobs = bob.wait(15)
    assert call.ok and bobs.ok, call.summary() + bobs.summary()
    invite = first(bobs.text("messages"), "received", "INVITE")
    vias = headers(invite, "Via")
    assert len(vias) == 2 and vias[1].startswith("SIP/2.0/UDP 127.0.0.1:") and not any(m in invite for m in ours[:2])
    assert converter.status()["transactions"] > 0


# --------------------------------------------------------------------------
# fuzzed and truncated SIP: unit level, and garbage at a live converter
# --------------------------------------------------------------------------


def unit_converter(hide: bool = False) -> tuple[Converter, Link, list]:
    sent: list = []
    converter = Converter(
        ("127.0.0.1", 5999),
        ("127.0.0.1", 5060, "tcp"),
        ("127.0.0.1", 6000),
        hide,
        lambda data, address: sent.append((data, address)),
        lambda key: (_ for _ in ()).throw(AssertionError(key)),
    )
    link = converter.add_link(Link(("127.0.0.1", 5060, "tcp"), FakeSock(), ("127.0.0.1", 40000), converter.listen_hp))
    return converter, link, sent


INVITE = (
    b"INVITE sip:bob@example.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:6000;branch=z9hG4bK-1-1-0\r\n"
    b"Max-Forwards: 70\r\nFrom: <sip:a@example.test>;tag=1\r\nTo: <sip:bob@example.test>\r\nCall-ID: c1@x\r\n"
    b"CSeq: 1 INVITE\r\nContact: <sip:a@127.0.0.1:6000>\r\nContent-Type: application/sdp\r\nContent-Length: 10\r\n\r\n0123456789"
)
RESPONSE = (
    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 127.0.0.1:40000;branch=z9hG4bKfdk-1-1-0;rport=40000;received=127.0.0.1\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:6000;branch=z9hG4bK-1-1-0\r\nFrom: <sip:a@example.test>;tag=1\r\n"
    b"To: <sip:bob@example.test>;tag=2\r\nCall-ID: c1@x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)


def test_unit_forwarding_and_x_outbound_proxy_removed():
    converter, link, sent = unit_converter()
    opened = []
    converter.connect = lambda key: (
        opened.append(key) or Link(key, FakeSock(), ("127.0.0.1", 40001), converter.listen_hp)
    )
    converter.from_sipp(
        INVITE.replace(b"Max-Forwards", b"X-Outbound-Proxy: sip:10.0.0.9:5070;transport=tcp\r\nMax-Forwards"),
        ("127.0.0.1", 6000),
    )
    assert opened == [("10.0.0.9", 5070, "tcp")]
    out = bytes(converter.links[opened[0]].out)
    assert b"X-Outbound-Proxy" not in out and b"Max-Forwards: 69" in out
    assert out.startswith(
        b"INVITE sip:bob@example.test SIP/2.0\r\nRecord-Route: <sip:127.0.0.1:40001;transport=tcp;lr>, "
        b"<sip:127.0.0.1:5999;transport=udp;lr>\r\nVia: SIP/2.0/TCP 127.0.0.1:40001;branch=z9hG4bKfdk-1-1-0\r\n"
    )
    converter.from_stream(link, RESPONSE + b"\r\n\r\n")  # a response and a CRLFCRLF ping
    assert sent[-1][1] == ("127.0.0.1", 6000) and sent[-1][0].count(b"Via:") == 1
    assert bytes(link.out) == b"\r\n" and link.pings_answered == 1


SIP_ALPHABET = st.sampled_from(
    [
        b"\r\n",
        b"\r\n\r\n",
        b" ",
        b":",
        b";",
        b",",
        b"<",
        b">",
        b"Via",
        b"v",
        b"To",
        b"t",
        b"Route",
        b"Content-Length",
        b"l",
        b"Max-Forwards",
        b"X-Outbound-Proxy",
        b"SIP/2.0",
        b"SIP/2.0/UDP",
        b"INVITE",
        b"sip:",
        b"127.0.0.1",
        b":5060",
        b"branch=z9hG4bK",
        b"tag=",
        b"0",
        b"99999999",
        b"\x00",
        b"\xff",
        b"[::1]",
        b"=",
        b"@",
    ]
)
FUZZ = st.one_of(
    st.binary(max_size=400),
    st.lists(SIP_ALPHABET, max_size=60).map(b"".join),
    st.builds(lambda m, cut: m[:cut], st.sampled_from([INVITE, RESPONSE]), st.integers(0, 400)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datagrams=st.lists(FUZZ, max_size=8), hide=st.booleans())
def test_fuzzed_datagrams_never_crash_and_every_one_is_counted(datagrams, hide):
    converter, _link, _sent = unit_converter(hide)
    for data in datagrams:
        converter.from_sipp(data, ("127.0.0.1", 6000))
    counters = converter.counters
    handled = (
        counters["requests_to_stream"]
        + counters["responses_to_stream"]
        + counters["udp_keepalives"]
        + counters["requests_refused"]
        + counters["too_many_hops"]
        + counters["responses_dropped_closed"]
    )
    assert counters["udp_in"] == len(datagrams) == handled + sum(converter.malformed.values())


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, len(INVITE) - 1))
def test_truncated_datagram_is_dropped_and_counted(cut):
    converter, link, _sent = unit_converter()
    converter.from_sipp(INVITE[:cut], ("127.0.0.1", 6000))
    assert not link.out and sum(converter.malformed.values()) + converter.counters["udp_keepalives"] == 1


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.integers(1, 80), max_size=20), garbage=FUZZ, hide=st.booleans())
def test_stream_split_anywhere_and_garbage(chunks, garbage, hide):
    converter, link, sent = unit_converter(hide)
    stream = RESPONSE + RESPONSE
    at = 0
    for size in [*chunks, len(stream)]:
        converter.from_stream(link, stream[at : at + size])
        at += size
    assert converter.counters["responses_to_udp"] == 2 and len(sent) == 2 and not converter.malformed
    converter.from_stream(link, garbage)  # whatever it is: no exception, counted if it was a message
    handled = sum(converter.counters[k] for k in ("responses_to_udp", "requests_to_udp", "too_many_hops"))
    assert (
        converter.counters["stream_in"]
        == handled + sum(converter.malformed.values()) + converter.counters["udp_too_large"]
    )


def test_oversize_towards_sipp_is_sent_and_counted():
    converter, link, sent = unit_converter()
    big = RESPONSE.replace(b"Content-Length: 0\r\n\r\n", b"Content-Length: 2000\r\n\r\n" + b"x" * 2000)
    converter.from_stream(link, big)
    assert len(sent) == 1 and converter.counters["udp_oversize_sent"] == 1


def test_garbage_at_a_live_converter_is_counted_and_calls_still_work(sipp_path, kamailio, tmp_path, converters):
    converter = converters(tmp_path / "conv", kamailio.address, "tcp", testbed.free_port())
    host, port = converter.listen.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for junk in (b"\x00\xff garbage", INVITE[:50], b"SIP/2.0 200 OK\r\n\r\n", b"\r\n\r\n"):
            sock.sendto(junk, (host, int(port)))
    testbed.wait_until(lambda: converter.status()["counters"].get("udp_in", 0) == 4, 5, what="the junk")
    status = converter.status()
    assert sum(status["malformed"].values()) == 3 and status["counters"]["udp_keepalives"] == 1
    register(sipp_path, converter, kamailio, tmp_path)
    # Logged once per kind (two junk datagrams had no end of headers).
    assert converter.log.read_text().count("logged once") == len(status["malformed"]) == 2


# --------------------------------------------------------------------------
# --mode udp
# --------------------------------------------------------------------------


def test_udp_arguments_rewrite():
    invocation = parse_sipp_args(["-sf", "x.xml", "-t", "l1", "-key", "a", "b", "-m", "1", "sut.test:5061"])
    arguments = converter_arguments(invocation)
    assert (arguments.local_ip, arguments.local_port) == ("127.0.0.1", 0)  # the mode picks the port
    args = arguments.filled("127.0.0.1:4000", 5072)
    assert args == [
        "-p",
        "5072",
        "-i",
        "127.0.0.1",
        "-sf",
        "x.xml",
        "-t",
        "u1",
        "-key",
        "a",
        "b",
        "-m",
        "1",
        "127.0.0.1:4000",
    ]


def test_udp_arguments_follow_the_option_table_of_the_sipp_run():
    """The remote host is found as the sipp being run reads its arguments, not as the newest does:
    here an option only this (made-up) release has, taking a value the newest would read as the host."""
    release = OptionTable(SIPP_3_6.release, SIPP_3_6.flags, SIPP_3_6.valued | {"only_here"}, SIPP_3_6.pairs)
    invocation = parse_sipp_args(["-sn", "uac", "-t", "t1", "-only_here", "x", "-p", "5072", "sut.test"], release)
    assert converter_arguments(invocation).filled("127.0.0.1:4000", 5072) == [
        "-i",
        "127.0.0.1",
        "-sn",
        "uac",
        "-t",
        "u1",
        "-only_here",
        "x",
        "-p",
        "5072",
        "127.0.0.1:4000",
    ]
    server = parse_sipp_args(["-sn", "uas", "-t", "t1", "-i", "127.0.0.2"])  # no remote host: none is added
    assert converter_arguments(server).filled("127.0.0.1:4000", 5073) == [
        "-p",
        "5073",
        "-sn",
        "uas",
        "-t",
        "u1",
        "-i",
        "127.0.0.2",
    ]


def test_mode_udp_register_then_answer_with_one_converter(sipp_path, kamailio, tmp_path):
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    users = testbed.write_users_csv(tmp_path / "users.csv", [USER], kamailio.domain)
    mode = UdpMode()
    logs = tmp_path / "logs"
    logs.mkdir()

    def run(args):
        request = sipp_request(
            sipp=Path(sipp_path),
            invocation=parse_sipp_args(args),
            control_socket=directory / "control.sock",
            remote=parse_sipp_args(args).remote_address(),
            transport="tcp",
        )
        handoff = mode.prepare(request)
        return subprocess.Popen(
            handoff.argv, cwd=logs, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    try:
        common = ["-t", "t1", "-i", "127.0.0.1", "-nostdin", "-timeout", "20s", "-timeout_error"]
        assert (
            run(
                [
                    "-sf",
                    str(testbed.SCENARIOS_DIR / "uac-register.xml"),
                    "-inf",
                    str(users),
                    "-m",
                    "1",
                    *common,
                    kamailio.address,
                ]
            ).wait(20)
            == 0
        )
        first_pid = control_request(next(directory.glob("convert-*.sock")), "STATUS")["pid"]
        answer = run(
            [
                "-sf",
                str(testbed.SCENARIOS_DIR / "uas-answer.xml"),
                "-m",
                "1",
                "-p",
                str(testbed.free_port()),
                *common,
                kamailio.address,
            ]
        )
        caller = testbed.place_calls(kamailio, USER, 1, sipp=sipp_path, timeout=15, log_dir=logs)
        assert caller.ok, caller.summary()
        assert answer.wait(20) == 0
        status = control_request(next(directory.glob("convert-*.sock")), "STATUS")
        assert status["pid"] == first_pid and len(kamailio.tcp_connections()) == 1
    finally:
        stop_converters(directory)


def test_a_via_host_that_is_not_text_is_dropped_not_fatal():
    """A response from the SuT whose Via names a host in bytes that are not UTF-8."""
    import fdkeeper.convert as cv

    class Sock:
        def fileno(self) -> int:
            return 99

    link = cv.Link(("127.0.0.1", 5060, "tcp"), Sock(), ("127.0.0.1", 40000), b"127.0.0.1:5070")
    conv = cv.Converter(
        ("127.0.0.1", 5070), ("127.0.0.1", 5060, "tcp"), ("127.0.0.1", 5080), False, lambda d, a: None, lambda k: link
    )
    conv.add_link(link)
    response = (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 127.0.0.1:40000;branch=z9hG4bKx\r\n"
        b"Via: SIP/2.0/UDP \xff\xfe.invalid:5080;branch=z9hG4bKy\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    conv.from_stream(link, response)
    assert conv.malformed["bad encoding"] == 1


# --------------------------------------------------------------------------
# pieces: the expiring map and the control requests
# --------------------------------------------------------------------------


def test_expiring_map_bounds_and_expiry():
    entries = ExpiringMap(ttl=10.0, limit=2)
    entries.put("a", 1, now=0.0)
    entries.put("b", 2, now=1.0)
    entries.put("a", 3, now=2.0)  # refreshed: now the youngest
    entries.put("c", 4, now=3.0)  # over the limit: the oldest ("b") goes
    assert (entries.get("a"), entries.get("b"), entries.get("c"), entries.evicted) == (3, None, 4, 1)
    entries.expire(now=12.5)
    assert len(entries) == 1 and entries.get("c") == 4


def test_control_requests_answered():
    class Target:
        sipp_address = None
        stopped = False

        def stats(self):
            return {"pid": 1}

        def set_sipp_address(self, address):
            self.sipp_address = address

        def reconnect(self):
            raise FdkeeperError("fdkeeper: cannot connect")

        def stop(self):
            self.stopped = True

    target = Target()
    assert answer(target, "STATUS") == {"ok": True, "pid": 1}
    assert answer(target, "SIPP [::1]:5080") == {"ok": True} and target.sipp_address == ("::1", 5080)
    assert answer(target, "SIPP 10.0.0.1") == {"ok": True} and target.sipp_address == ("10.0.0.1", 5060)
    for bad in ("SIPP example.test:5080", "SIPP 10.0.0.1:70000", "SIPP"):
        assert not answer(target, bad)["ok"] and target.sipp_address == ("10.0.0.1", 5060)
    assert answer(target, "RECONNECT") == {"ok": False, "error": "fdkeeper: cannot connect"}
    assert answer(target, "STOP") == {"ok": True} and target.stopped
    assert not answer(target, "NOPE")["ok"]


def test_a_fault_handling_one_datagram_costs_that_datagram_not_the_converter():
    """The loop's fault guard (fdkeeper/loop.py): a defect met while handling one datagram is
    counted, and the converter goes on forwarding the next ones over the same link."""
    from fdkeeper.convert.server import ConverterServer

    sut = socket.create_server(("127.0.0.1", 0))
    server = ConverterServer(("127.0.0.1", 0), sut.getsockname()[:2], "tcp", None)
    accepted, _ = sut.accept()
    real_from_sipp = server.converter.from_sipp
    calls = []

    def fails_once(data: bytes, source) -> None:
        calls.append(data)
        if len(calls) == 1:
            raise RuntimeError("a defect met by one datagram")
        real_from_sipp(data, source)

    server.converter.from_sipp = fails_once
    request = (
        b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK1\r\n"
        b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: fault-1\r\n"
        b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(2):
            sender.sendto(request, server.udp.getsockname())
            testbed.wait_until(
                lambda n=len(calls) + 1: server.reactor.run_once(0.05) or len(calls) >= n,  # noqa: B008 - bound now
                5,
                what="the converter to read the datagram",
            )
        for _ in range(20):
            server.reactor.run_once(0.05)
            for link in list(server.converter.dirty):
                server._flush(link)
            server.converter.dirty.clear()
        accepted.settimeout(5)
        assert b"Call-ID: fault-1" in accepted.recv(65536)
        assert server.converter.counters["internal_errors"] == 1
        assert server.reactor.internal_errors == 1
    finally:
        sender.close()
        accepted.close()
        server.close()
        sut.close()


def test_a_silent_control_client_never_holds_the_converters_loop(tmp_path):
    """The converter reads control requests as they arrive: a client of ours that connects and
    says nothing costs its own slot (dropped after REQUEST_SECONDS), never anyone else's answer."""
    import threading
    import time

    from fdkeeper.convert.server import ConverterServer

    sut = socket.create_server(("127.0.0.1", 0))
    control = tmp_path / "convert.sock"
    server = ConverterServer(("127.0.0.1", 0), sut.getsockname()[:2], "tcp", None, control=control)
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for client in silent:
            client.connect(str(control))
        started = time.monotonic()
        assert control_request(control, "STATUS")["ok"]
        assert time.monotonic() - started < 1.0  # the silent ones are not waited for
        silent[0].settimeout(5)
        assert silent[0].recv(10) == b""  # dropped once its time to speak is up
    finally:
        control_request(control, "STOP")
        loop.join(10)
        for client in silent:
            client.close()
        sut.close()
