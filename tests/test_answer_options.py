"""--answer-options with Debian's sipp and a real Kamailio, over TCP and TLS.

Kamailio pings the registered user the way an SBC does (an OPTIONS to the user's AoR, relayed
over the user's own connection: testbed Kamailio.ping_user) while no run holds it. The keeper
answers every ping, and the next run, an answer run with a scenario that expects only the
INVITE, sees none of them. Byte-level cases (a run holding the connection gets the OPTIONS
itself) are in test_keeper_datapath.py.
"""

from __future__ import annotations

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper

USER = "alice"
PINGS = 3


def through_fdkeeper(sipp_path, kamailio, transport, keeper_dir, tmp_path, name, scenario, options, **sipp_options):
    remote = kamailio.tls_address if transport == "l1" else kamailio.address
    return start_through_fdkeeper(
        sipp_path, scenario, remote, directory=keeper_dir, log_dir=tmp_path / "logs", name=name,
        options=options, transport=transport, **sipp_options,
    )


@pytest.mark.parametrize("transport", ["t1", "l1"])
def test_the_keeper_answers_the_sut_pings_between_runs(sipp_path, kamailio_tls, test_pki, keeper_dir, tmp_path, transport):
    options = ("--tls-ca", str(test_pki.ca_cert)) if transport == "l1" else ()
    users = testbed.write_users_csv(tmp_path / "users.csv", [USER], kamailio_tls.domain)
    # The register run starts the keeper, and passes --answer-options on to it.
    registered = through_fdkeeper(
        sipp_path, kamailio_tls, transport, keeper_dir, tmp_path, "register", "uac-register.xml",
        ("--answer-options", *options), calls=1, timeout=15, extra=["-inf", str(users)],
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
        sipp_path, kamailio_tls, transport, keeper_dir, tmp_path, "answer", "uas-answer.xml", options,
        calls=1, timeout=30, local_port=testbed.free_port(),
    )
    caller = testbed.place_calls(kamailio_tls, USER, 1, sipp=sipp_path, timeout=15, log_dir=tmp_path / "logs")
    answered = answer.wait(30)
    # A queued OPTIONS would have reached uas-answer.xml as an unexpected message first.
    assert caller.ok, caller.summary()
    assert answered.ok and answered.successful == 1, answered.summary()
