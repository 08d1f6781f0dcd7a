"""sipp's own descriptor limits on a -t tn/ln run, said before sipp starts (issue 20).

sipp (3.6 and 3.7) opens one socket per call with -t tn/ln, at most -max_socket of them
(default 50,000); past that it sends new calls over the sockets of calls still open. At
start-up, unless -skip_rlimit, it stops when -max_socket exceeds its soft open-file limit; it
never raises that limit itself. So the run raises the soft limit to the hard one (sipp inherits
it, as the keeper raises its own) and says here, in one line, what would still stop sipp or
mix users: the keeper's own limit is the keeper's to say (keeper/pool.py), from what each kept
connection costs it: a tcp user 1 descriptor; a tls, ws or wss user 1 while idle (the SuT's
socket) and 3 while a run holds it (the socketpair the run is handed, both ends), so a per-user
run of N relayed users needs 3N in the keeper until it exits, and a server run handed N kept
ones 2N more while it runs (10,000 TLS users kept: 10,000; handed to one server run: 30,000,
past a 20,000 limit). Both are said, with the limit and the fix, before sipp starts.
"""

from __future__ import annotations

from fdkeeper.address import format_address
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes import HandoffRequest
from fdkeeper.sipp.args import SippInvocation
from fdkeeper.tcp import SUT_AT_ITS_LIMIT

SIPP_MAX_SOCKET = 50000  # sipp's DEFAULT_MAX_MULTI_SOCKET: -max_socket when not given
SIPP_OWN_FILES = 64  # sipp's descriptors besides call sockets: stdio, logs, its main socket, the shim's


def check_sipp_sockets(invocation: SippInvocation, soft: int, hard: int) -> str | None:
    """For a -t tn/ln run: FdkeeperError ("limit") where sipp would stop or run out of
    descriptors under the open-file limit ``soft``; a notice where past -max_socket calls of
    different users would share one user's socket; else None."""
    if not invocation.per_call_sockets:
        return None
    given = _number(invocation, "max_socket")
    max_socket = given if given is not None else SIPP_MAX_SOCKET
    what = f"-max_socket {max_socket}" + ("" if given is not None else " (sipp's default)")
    room = max(soft - SIPP_OWN_FILES, 1)
    fix = f"pass -max_socket {room} or less, or raise the open-file limit (ulimit -n; hard limit {hard})"
    if max_socket > soft and "skip_rlimit" not in invocation.options:
        raise FdkeeperError(
            f"fdkeeper: sipp -t {invocation.transport_option} would stop at start-up: {what} is above its "
            f"open-file limit {soft}; {fix}",
            "limit",
        )
    open_calls = _number(invocation, "l")
    users = invocation.user_count() if invocation.per_call_client else None
    known = [(n, f"-l {n}" if n == open_calls else f"{n} users") for n in (open_calls, users) if n is not None]
    if known:
        calls, bound = min(known)
        if min(calls, max_socket) > room:
            raise FdkeeperError(
                f"fdkeeper: sipp may hold {min(calls, max_socket)} call sockets at once ({bound}, {what}) but its "
                f"open-file limit {soft} leaves room for {room}; {fix}",
                "limit",
            )
    if invocation.per_call_client and open_calls is not None and max_socket < open_calls:
        return (
            f"{what} is below -l {open_calls}: past {max_socket} open calls sipp sends new calls over the sockets "
            "of calls still open, that is over other users' kept connections; pass -max_socket "
            f"{open_calls} or more"
        )
    return None


def _number(invocation: SippInvocation, option: str) -> int | None:
    values = invocation.options.get(option)
    return int(values[-1]) if values and values[-1].isdigit() else None


def check_handed_connections(count: int, soft: int, hard: int) -> None:
    """A server run is handed ``count`` kept connections, each a descriptor in sipp: FdkeeperError
    ("limit") when they would not fit under its open-file limit ``soft``."""
    room = max(soft - SIPP_OWN_FILES, 0)
    if count > room:
        raise FdkeeperError(
            f"fdkeeper: this server run would be handed {count} kept connections, but sipp's open-file limit "
            f"{soft} leaves room for {room}; raise the limit (ulimit -n; hard limit {hard}) before the run",
            "limit",
        )


def sut_limit_notice(closed_after: int | None, closed_before: int, request: HandoffRequest) -> str | None:
    """After a per-user run: the line naming the SuT's connection limit when the SuT closed some
    of the run's kept connections (a SuT at its limit accepts and at once closes or resets)."""
    if closed_after is None or closed_after <= closed_before or request.remote is None:
        return None
    return (
        f"the SuT at {format_address(request.remote)}/{request.transport} closed {closed_after - closed_before} "
        "kept connection(s) during this run ('fdkeeper status --state closed' lists them): a SuT that ends "
        "new connections mid-run " + SUT_AT_ITS_LIMIT
    )
