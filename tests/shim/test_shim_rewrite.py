"""A per-call fd sends the kept connection's address, not its placeholder's (issue 16, item 8).

sipp -t tn reads [local_port] from the socket it bound before connect(), which the shim replaced
by a placeholder; the shim rewrites that "IP:PORT" in the header part of what the fd sends to the
kept connection's (helpers/shim/rewrite.c, same length only). Unit tests of the rewrite through
tests/shim/rewrite_test.c (linked with rewrite.c alone), then the shim preloaded into
tests/shim/shimprog.c with a fake keeper and a send buffer so small that every message goes
out in pieces, sipp's way (the untaken tail sent again from its offset).
"""

from __future__ import annotations

import random
import re
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from fdkeeper.testbed import free_port
from tests.support.fake_keeper import FakeKeeper
from tests.support.paths import HELPERS, TESTS
from tests.support.shim import EXTRA_CFLAGS, Sut, compile_program, parse, run, shim_env

SHIM_SOURCES = HELPERS / "shim"
REWRITE_TEST_SRC = TESTS / "shim" / "rewrite_test.c"
PH, KEPT = "127.0.0.1:46883", "127.0.0.1:33697"


@pytest.fixture(scope="session")
def rewrite_test(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("rewrite-build") / "rewrite_test"
    compile_program(
        REWRITE_TEST_SRC, out, [*EXTRA_CFLAGS, "-Wextra", f"-I{SHIM_SOURCES}", str(SHIM_SOURCES / "rewrite.c")]
    )
    return str(out)


def apply(rewrite_test: str, message: bytes, old: str = PH, new: str = KEPT) -> tuple[str, bytes]:
    result = subprocess.run([rewrite_test, "apply", old, new], input=message, capture_output=True, timeout=10)
    assert result.returncode == 0, result.stderr
    first, _, rest = result.stdout.partition(b"\n")
    return first.decode(), rest


def reference(message: bytes, old: str = PH, new: str = KEPT) -> bytes:
    """What the SuT must get: old replaced at address boundaries in the header part only."""
    blank = message.find(b"\r\n\r\n")
    split = blank + 4 if blank >= 0 else len(message)
    token = re.compile(rb"(?<![0-9A-Za-z.:_-])" + re.escape(old.encode()) + rb"(?![0-9])")
    return token.sub(new.encode(), message[:split]) + message[split:]


def sip_message(via: str, body: bytes = b"", extra: str = "") -> bytes:
    head = (
        f"INVITE sip:service@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP {via};branch=z9hG4bK-1\r\n"
        f"From: <sip:alice@fdkeeper.test>;tag=1\r\nTo: <sip:service@127.0.0.1:5060>\r\n"
        f"Call-ID: 1-42@127.0.0.1\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:alice@{via};transport=tcp>\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# --------------------------------------------------------------------------- the rewrite alone


def test_via_and_contact_rewritten_body_untouched(rewrite_test):
    message = sip_message(PH, body=f"v=0\r\nc=IN IP4 {PH}\r\n".encode())
    counts, out = apply(rewrite_test, message)
    assert counts == f"end={message.index(b';transport')} count=2"
    assert out == reference(message)
    assert out.count(KEPT.encode()) == 2 and out.count(PH.encode()) == 1  # the body's
    assert len(out) == len(message)


@pytest.mark.parametrize(
    "text",
    [
        f"{PH}0",  # a longer port
        f"1{PH}",  # a longer address
        f"a{PH}",
        f"x.{PH}",
        f":{PH}",
        f"-{PH}",
        "127.0.0.1:4688",  # a prefix
    ],
)
def test_only_whole_addresses(rewrite_test, text):
    message = sip_message("127.0.0.1:5060", extra=f"X-Test: {text};x\r\n")
    counts, out = apply(rewrite_test, message)
    assert counts == "end=0 count=0" and out == message


def test_ipv6_and_no_blank_line(rewrite_test):
    old, new = "[::1]:46883", "[::1]:33697"
    message = sip_message(old)[:-4]  # a header part the buffer ends inside
    counts, out = apply(rewrite_test, message, old, new)
    assert counts.endswith("count=2") and out == reference(message, old, new)


def test_lengths_must_match(rewrite_test):
    result = subprocess.run([rewrite_test, "apply", PH, "127.0.0.1:5060"], input=b"x", capture_output=True)
    assert result.stdout == b"pair=refused\n"


def test_message_without_the_address_passes(rewrite_test):
    message = sip_message("127.0.0.1:5060", body=PH.encode())
    assert apply(rewrite_test, message) == ("end=0 count=0", message)


@pytest.mark.parametrize("seed", range(12))
def test_partial_sends_never_send_half_old(rewrite_test, seed):
    """Messages sent sipp's way into a kernel taking random pieces: every byte arrives once, in
    order, rewritten as a whole (tokens split across sends included); messages without the
    address and bodies naming it pass as they are."""
    rng = random.Random(seed)
    messages = []
    for i in range(40):
        fillers = "".join(f"X-F{j}: {PH} {PH}0\r\n" for j in range(rng.randrange(0, 30)))
        via = PH if i % 4 else "127.0.0.1:5060"
        body = f"{PH} in the body {i}\r\n".encode() * rng.randrange(0, 3)
        messages.append(sip_message(via, body, fillers))
    result = subprocess.run(
        [rewrite_test, "stream", PH, KEPT, str(seed)], input=b"\0".join(messages), capture_output=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"".join(reference(m) for m in messages)
    sends, partial = (int(v) for v in re.findall(rb"=(\d+)", result.stderr))
    assert partial > 20 and sends > len(messages)


# --------------------------------------------------------------------------- in the shim


class SlowSut:
    """Reads each kept connection slowly (so sends are partial), answers each whole message
    with "ok:<Call-ID>", and keeps what it got."""

    def __init__(self, keeper: FakeKeeper):
        self.keeper, self.got, self._stop = keeper, [], False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        done = 0
        while not self._stop:
            if len(self.keeper.sut_side) <= done:
                threading.Event().wait(0.01)
                continue
            sock, buf = self.keeper.sut_side[done], b""
            sock.settimeout(10)
            while not self._stop:
                if b"\r\n\r\n" in buf:
                    head, rest = buf.split(b"\r\n\r\n", 1)
                    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                    if len(rest) >= length:
                        message, buf = head + b"\r\n\r\n" + rest[:length], rest[length:]
                        self.got.append(message)
                        call_id = re.search(rb"Call-ID: (\S+)", head).group(1)
                        sock.sendall(b"ok:" + call_id + b"\r\n")
                        continue
                try:
                    chunk = sock.recv(1500)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                threading.Event().wait(0.0005)

    def stop(self):
        self._stop = True
        for sock in list(self.keeper.sut_side):  # wakes the thread's recv (a close would not)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(5)


def run_percallvia(build, transport: str, per_call: bool, sndbuf: int, fillers: int, calls: int):
    """shimprog percallvia against a fake keeper (TCP connections to a SuT reading slowly, or
    for tls socketpair ends named 127.0.0.1:40999): (its output, the SuT's messages, the kept
    connection's local address, how many connections the keeper opened)."""
    sut = Sut()
    sut.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the kept one
    remote = sut.addr if transport == "tcp" else f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="fdk-via-") as tmp:
        keeper = FakeKeeper(
            Path(tmp) / "control.sock", sut, pairs=transport == "tls", peer_addr=remote, local_addr="127.0.0.1:40999"
        )
        slow = SlowSut(keeper)
        try:
            extra = {"FDKEEPER_PER_CALL": "1"} if per_call else {}
            env = shim_env(build, keeper.path, remote=remote, FDKEEPER_TRANSPORT=transport, **extra)
            r = run(
                build,
                [
                    "percallvia",
                    *remote.split(":"),
                    "127.0.0.1",
                    "From: <sip:alice@fdkeeper.test>;tag=1",
                    str(sndbuf),
                    str(fillers),
                    str(calls),
                ],
                env,
                timeout=60,
            )
        finally:
            slow.stop()
            keeper.close()
            sut.close()
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    return parse(r.stdout), slow.got, keeper.kept_addrs[0][1], len(keeper.kept)


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_shim_rewrites_split_sends_of_one_user(build, transport):
    """Three calls of one user, three placeholders: the SuT gets every message whole, its Via,
    Contact and header names of the placeholder as the kept connection's address, the body and
    look-alikes untouched; over TCP the send buffer is so small that each message goes in pieces
    (over tls the keeper's socketpair end gets the same rewrite)."""
    kv, got, kept, opened = run_percallvia(build, transport, True, 4096, 400, 3)
    assert opened == 1, "one user, one kept connection"
    assert len(got) == 3
    for c, message in enumerate(got):
        placeholder = kv[f"c{c}_placeholder"]
        assert placeholder != kept and len(placeholder) == len(kept)
        assert kv[f"c{c}_got"] == f"ok:via-{c}"
        if transport == "tcp":
            assert int(kv[f"c{c}_partial"]) > 0, "the message must have gone in pieces"
        assert len(message) == int(kv[f"c{c}_len"])
        original = message.replace(kept.encode(), placeholder.encode())
        assert message == reference(original, placeholder, kept)
        head, body = message.split(b"\r\n\r\n", 1)
        assert f"Via: SIP/2.0/TCP {kept};".encode() in head
        assert f"<sip:u@{kept};transport=tcp>".encode() in head
        assert head.count(kept.encode()) == 2 + 400 and placeholder.encode() in body
        assert f"X-Filler-7: {kept} {placeholder}0 9{placeholder}\r\n".encode() in head  # look-alikes stay


def test_without_per_call_nothing_is_rewritten(build):
    """-t t1: the program's getsockname already names the kept connection; what it sends passes."""
    kv, got, kept, _ = run_percallvia(build, "tcp", False, 65535, 2, 1)
    assert kv["c0_placeholder"] == kept
    assert got and got[0].count(kept.encode()) == 2 + 3 * 2 + 1


@pytest.mark.parametrize("extra", [f"X-Test: {PH}0 1{PH} a{PH} {PH}\r\n", "", f"X-Six: {PH}{PH};{PH}\r\n"])
def test_ptrace_twin_rewrites_as_the_shim(rewrite_test, extra):
    """fdkeeper/modes/ptrace/viarewrite.py (the ptrace mode's) and helpers/shim/rewrite.c agree."""
    from fdkeeper.modes.ptrace.viarewrite import Rewrite, rewrite_for

    message = sip_message(PH, body=f"{PH}\r\n".encode(), extra=extra)
    assert Rewrite(PH.encode(), KEPT.encode()).apply(message) == apply(rewrite_test, message)[1] == reference(message)
    assert rewrite_for(("0.0.0.0", 46883), ("127.0.0.1", 33697)).old == PH.encode()  # a wildcard bind
    assert rewrite_for(("127.0.0.1", 46883), ("127.0.0.1", 5060)) is None  # lengths differ
    assert rewrite_for(("127.0.0.1", 0), ("127.0.0.1", 33697)) is None  # no port of its own
