"""--answer-options with Debian's sipp and a real Kamailio, over TCP and TLS.

Kamailio pings the registered user the way an SBC does while no run holds the user's connection:
on request (an OPTIONS to the user's AoR, relayed over the user's own connection: testbed
Kamailio.ping_user), and from a timer over an 18 s gap (testbed PingingKamailio: usrloc's
keepalive sends an OPTIONS to every registered contact every few seconds and gives up on a
contact that answered none for three periods: it logs "set expired contact on keepalive" and
removes the contact 10 s later). The gap holds six pings and is twice that timeout: unanswered,
the contact is given up about 11 s after it registered. The keeper answers every ping, Kamailio
never gives up on the contact, and the next run, an answer run with a scenario that expects only
the INVITE, sees none of the pings. Byte-level cases (a run holding the connection gets the
OPTIONS itself) are in test_keeper_datapath.py.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.testbed import wait_until
from fdkeeper.testbed.kamailio import PingingKamailio
from fdkeeper.testbed.sipp import start_calls

USER = "alice"
PINGS = 3


def through_fdkeeper(sipp_path, kamailio, transport, keeper_dir, tmp_path, name, scenario, options, **sipp_options):
    remote = kamailio.tls_address if transport == "l1" else kamailio.address
    return start_through_fdkeeper(
        sipp_path,
        scenario,
        remote,
        directory=keeper_dir,
        log_dir=tmp_path / "logs",
        name=name,
        options=options,
        transport=transport,
        **sipp_options,
    )


@pytest.mark.parametrize("transport", ["t1", "l1"])
def test_the_keeper_answers_the_sut_pings_between_runs(
    sipp_path, kamailio_tls, test_pki, keeper_dir, tmp_path, transport
):
    options = ("--tls-ca", str(test_pki.ca_cert)) if transport == "l1" else ()
    users = testbed.write_users_csv(tmp_path / "users.csv", [USER], kamailio_tls.domain)
    # The register run starts the keeper, and passes --answer-options on to it.
    registered = through_fdkeeper(
        sipp_path,
        kamailio_tls,
        transport,
        keeper_dir,
        tmp_path,
        "register",
        "uac-register.xml",
        ("--answer-options", *options),
        calls=1,
        timeout=15,
        extra=["-inf", str(users)],
    ).wait(30)
    keeper = KeeperClient(keeper_dir)
    assert registered.ok, registered.summary()

    for _ in range(PINGS):
        reply = kamailio_tls.ping_user(USER)
        assert reply is not None and reply.startswith(b"SIP/2.0 200 OK\r\n"), reply
    [connection] = keeper.status()["connections"]
    assert connection["options_answered"] == PINGS and connection["queued_bytes"] == 0
    assert keeper.status()["keeper"]["answer_options"] is True

    answer = through_fdkeeper(
        sipp_path,
        kamailio_tls,
        transport,
        keeper_dir,
        tmp_path,
        "answer",
        "uas-answer.xml",
        options,
        calls=1,
        timeout=30,
        local_port=testbed.free_port(),
    )
    caller = testbed.place_calls(kamailio_tls, USER, 1, sipp=sipp_path, timeout=15, log_dir=tmp_path / "logs")
    answered = answer.wait(30)
    # A queued OPTIONS would have reached uas-answer.xml as an unexpected message first.
    assert caller.ok, caller.summary()
    assert answered.ok and answered.successful == 1, answered.summary()


# The timer's pings: every PING_EVERY s over a GAP of 18 s (SBCs ping every 30-60 s; a shorter
# period here gives many pings in one gap). Kamailio gives up on a contact that answered none for
# EXPIRY s (3 periods) at its next round of pings, and logs it (usrloc at debug level): the gap
# is longer than EXPIRY + PING_EVERY, so the log proves the pings were answered without waiting
# the 10 s more Kamailio takes to remove the contact. PING_EVERY is also how long the answer runs
# have before the next round of pings: 3 s leaves room on a loaded machine.
PING_EVERY = 3
EXPIRY = 3 * PING_EVERY
GAP = 2 * EXPIRY
GIVEN_UP = re.compile(r"set expired contact on keepalive .* - aor: (\S+)")


@pytest.fixture
def pinging_sut(tmp_path, test_pki):
    kamailio = PingingKamailio(
        tmp_path / "kamailio-pings",
        tls=testbed.KamailioTls.server(test_pki),
        ul_timer=PING_EVERY,
        ping_timeout=EXPIRY,
    )
    kamailio.start()
    yield kamailio
    kamailio.stop()
    print(f"--- kamailio log tail ({kamailio.log_path}) ---\n{kamailio.log_tail(60)}")


@dataclass
class Pinged:
    """One registered user over one transport, held by the test's keeper from its own -p."""

    transport: str
    user: str
    port: int
    options: tuple[str, ...]
    pings_seen_by_runs: int = 0  # a ping landing while a run held the connection went to sipp

    def start(self, sipp_path, sut, keeper_dir, tmp_path, name, scenario, options=(), **sipp_options):
        return through_fdkeeper(
            sipp_path,
            sut,
            self.transport,
            keeper_dir,
            tmp_path,
            f"{name}-{self.transport}",
            scenario,
            (*options, *self.options),
            local_port=self.port,
            **sipp_options,
        )

    def register(self, sipp_path, sut, keeper_dir, tmp_path) -> None:
        users = testbed.write_users_csv(tmp_path / f"{self.user}.csv", [self.user], sut.domain)
        registered = self.start(
            sipp_path,
            sut,
            keeper_dir,
            tmp_path,
            "register",
            "uac-register.xml",
            options=("--answer-options",),
            calls=1,
            timeout=10,
            extra=["-inf", str(users)],
        ).wait(30)
        assert registered.ok, registered.summary()
        self.pings_seen_by_runs += registered.text("messages").count("OPTIONS sip:")

    def connection(self, keeper_dir) -> dict:
        [connection] = [
            c for c in KeeperClient(keeper_dir).status()["connections"] if c["identity"] == f"127.0.0.1:{self.port}"
        ]
        return connection


def pings_settled(sut, keeper_dir, pinged: list[Pinged]) -> bool:
    """The keeper answered every ping Kamailio sent while no run held the connection, and
    Kamailio got exactly those answers; nothing waits in the connections."""
    counts = sut.contact_pings()
    for side in pinged:
        kamailio = counts.get(side.user, {"sent": 0, "answered": 0})
        connection = side.connection(keeper_dir)
        if not (
            connection["options_answered"] == kamailio["sent"] - side.pings_seen_by_runs == kamailio["answered"] > 0
            and connection["queued_bytes"] == 0
        ):
            return False
    return True


def answer_right_after_a_round_of_pings(sipp_path, sut, keeper_dir, tmp_path, pinged: list[Pinged]):
    """Each user's answer run and a call to it, started right after a round of pings so that no
    ping arrives while the runs hold the connections; their results, and pings sent meanwhile."""
    before = sut.contact_pings()
    wait_until(
        lambda: (
            all(sut.contact_pings()[side.user]["sent"] > before[side.user]["sent"] for side in pinged)
            and pings_settled(sut, keeper_dir, pinged)
        ),
        timeout=PING_EVERY + 3,
        what="the next round of pings",
    )
    round_done = sut.contact_pings()
    answers = [
        side.start(sipp_path, sut, keeper_dir, tmp_path, "answer", "uas-answer.xml", calls=1, timeout=15)
        for side in pinged
    ]
    wait_until(
        lambda: all(side.connection(keeper_dir)["state"] == "leased" for side in pinged),
        timeout=10,
        what="the answer runs to hold the connections",
    )
    callers = [
        start_calls(
            sut,
            [side.user],
            log_dir=tmp_path / "logs",
            name=f"call-{side.transport}",
            sipp=sipp_path,
            local_port=testbed.free_port(),
            timeout=10,
        )
        for side in pinged
    ]
    results = [(answer.wait(30), caller.wait(30)) for answer, caller in zip(answers, callers, strict=False)]
    meanwhile = {side.user: sut.contact_pings()[side.user]["sent"] - round_done[side.user]["sent"] for side in pinged}
    return results, meanwhile


def test_pings_from_a_timer_over_a_gap_are_answered_tcp_and_tls_at_once(
    sipp_path, pinging_sut, test_pki, keeper_dir, tmp_path
):
    sut = pinging_sut
    pinged = [
        Pinged("t1", "pinged-tcp", testbed.free_port(), ()),
        Pinged("l1", "pinged-tls", testbed.free_port(), ("--tls-ca", str(test_pki.ca_cert))),
    ]
    for side in pinged:
        side.register(sipp_path, sut, keeper_dir, tmp_path)

    time.sleep(GAP)  # the gap itself: no run holds either connection

    wait_until(
        lambda: pings_settled(sut, keeper_dir, pinged),
        timeout=PING_EVERY,
        what=f"every ping answered (kamailio: {sut.contact_pings()})",
    )
    counts = sut.contact_pings()
    assert GIVEN_UP.findall(sut.log_text()) == [], "Kamailio gave up on a contact: a ping went unanswered"
    for side in pinged:
        assert counts[side.user]["sent"] >= GAP // PING_EVERY - 1, counts
        [contact] = sut.location([side.user])  # still registered: the pings were answered
        assert contact["source"]["port"] == side.port

    results, meanwhile = answer_right_after_a_round_of_pings(sipp_path, sut, keeper_dir, tmp_path, pinged)
    assert meanwhile == {side.user: 0 for side in pinged}, f"a ping reached a run: the runs took over {PING_EVERY} s"
    for answered, caller in results:
        assert caller.ok, caller.summary()
        assert answered.ok and answered.successful == 1, answered.summary()
        # None of the gap's pings reached the run: sipp logged no OPTIONS and nothing unexpected.
        assert "OPTIONS" not in answered.text("messages") and "nexpected" not in answered.text("errors")


def test_a_fault_on_one_parked_connection_costs_that_one_once_not_every_sweep():
    """TcpOptionsAnswerer re-arms parked connections in one periodic sweep; a connection whose
    re-arming raises (the loop's guard logs it) must not stop the others, sweep after sweep."""
    from types import SimpleNamespace

    from fdkeeper.keeper.connection import IDLE
    from fdkeeper.keeper.pings import TcpOptionsAnswerer
    from fdkeeper.loop import Reactor

    rewatched: list[int] = []

    class Sweeps(Reactor):
        def rewatch(self, fd: int, events: int) -> None:
            rewatched.append(fd)

    def broken() -> int:
        raise OSError("a descriptor gone under the keeper")

    def parked(fd: int, queued) -> SimpleNamespace:
        return SimpleNamespace(
            id=fd, sock=object(), state=IDLE, ending="", ping_sent_at=None, queued_bytes=queued, fileno=lambda: fd
        )

    reactor = Sweeps()
    answerer = TcpOptionsAnswerer(reactor)
    faulty, healthy = parked(7, broken), parked(8, lambda: 10)
    answerer._parked = {7: (faulty, 0), 8: (healthy, 0)}
    for _ in range(3):  # the sweep the loop runs every REARM_EVERY s, its fault caught by the loop
        try:
            answerer._rearm()
        except OSError:
            pass
    assert rewatched == [8] and answerer._parked == {}
    reactor.close()
