"""The keeper's bounded tables of shared values (keeper/sharing.py) and the two that use one."""

from __future__ import annotations

import sys

from fdkeeper.keeper import connection, transports
from fdkeeper.keeper.sharing import SharedValues


def test_equal_values_get_one_object_and_past_the_bound_their_own():
    table: SharedValues[str, list[str]] = SharedValues(bound=2)
    first = table.one("a", lambda: ["a"])
    assert table.one("a", lambda: ["a, again"]) is first  # kept: not made again
    table.one("b", lambda: ["b"])
    assert len(table) == 2

    past, again = table.one("c", lambda: ["c"]), table.one("c", lambda: ["c"])
    assert past == again == ["c"] and past is not again  # past the bound: the value itself, unshared
    assert len(table) == 2
    assert table.one("a", lambda: ["a, again"]) is first  # what was shared stays shared


def test_the_suts_addresses_and_tls_descriptions_are_shared_under_their_bounds():
    host = "".join(["127.0.0.", "9"])  # a new string, as a request's
    address = connection.shared_address((host, 5061))
    assert connection.shared_address(("127.0.0.9", 5061)) is address and address[0] is sys.intern(host)
    assert connection._SHARED_ADDRESSES.bound == connection.MAX_SHARED_ADDRESSES == 1024

    info = {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}
    assert transports._shared(info) is transports._shared(dict(info))  # type: ignore[arg-type]
    assert transports._SHARED_INFO.bound == transports.MAX_SHARED_INFO == 256
