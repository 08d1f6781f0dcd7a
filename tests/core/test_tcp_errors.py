"""tcp.py's connect lines: a refusal at the first connect asks whether the SuT runs; a refusal
after the SuT accepted earlier connections, and a new connection it closes at once, say what
most likely changed (the latter: its connection limit, how Kamailio answers past it)."""

from __future__ import annotations

import errno

from fdkeeper.tcp import closed_at_once_error, connect_error

SUT = ("127.0.0.1", 5060)
REFUSED = OSError(errno.ECONNREFUSED, "Connection refused")


def test_a_first_refusal_asks_whether_the_sut_listens() -> None:
    error = connect_error(SUT, None, 5, REFUSED)
    assert str(error) == (
        "fdkeeper: the SuT at 127.0.0.1:5060/tcp refused the connection; is it running and listening on TCP there?"
    )
    assert error.code == "refused"


def test_a_refusal_after_earlier_connections_says_what_changed() -> None:
    error = connect_error(SUT, None, 5, REFUSED, reached=True)
    text = str(error)
    assert text.startswith("fdkeeper: the SuT at 127.0.0.1:5060/tcp refused the connection after accepting earlier")
    assert "stopped listening" in text and "connection limit" in text and "--reconnect" in text
    assert "\n" not in text and error.code == "refused"


def test_other_errors_read_alike_whether_or_not_the_sut_was_reached() -> None:
    for failure in (TimeoutError(), OSError(errno.EHOSTUNREACH, "No route to host")):
        assert str(connect_error(SUT, None, 5, failure, reached=True)) == str(connect_error(SUT, None, 5, failure))


def test_a_new_connection_closed_at_once_names_the_sut_connection_limit() -> None:
    error = closed_at_once_error("127.0.0.1:5061/tls")
    text = str(error)
    assert "127.0.0.1:5061/tls closed the new connection at once" in text
    assert "tcp_max_connections" in text and "tls_max_connections" in text and "\n" not in text
