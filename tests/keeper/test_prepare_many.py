"""A server run's PREPARE handed many kept connections: its reply names at most LISTED ids and
counts them all (ids_count=); 19,000 ids did not fit in one 4 kB control message and the keeper
answered ERR internal (issue 20). The runner reads the count (sipp/runner.listed_count)."""

from __future__ import annotations

from fdkeeper.keeper.server import LISTED
from fdkeeper.sipp.runner import listed_count

USERS = LISTED + 10


def test_a_server_prepare_handed_more_than_it_lists_says_how_many(keeper, peer):
    remote = peer.getsockname()
    for index in range(USERS):
        keeper.prepare(role="client", transport="tcp", remote=remote, local="-", aor=f"sip:u{index}@example.test")
    reply = keeper.prepare(role="server", transport="tcp", remote=remote, local="-")
    assert len(reply.fields["ids"].split(",")) == LISTED and reply.fields["ids_count"] == str(USERS), reply.fields
    assert listed_count(reply.fields, "ids") == USERS


def test_a_short_list_is_its_own_count():
    assert listed_count({"ids": "1,2,3"}, "ids") == 3 and listed_count({}, "closed") == 0
