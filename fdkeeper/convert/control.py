"""The converter's control socket: one request a connection, one JSON line back.

Requests: STATUS, SIPP IP:PORT (where the SuT's initial requests go from now on), ATTACH IP:PORT
[PID] (a run's UDP address: accepted, where initial and queued requests go, until DETACH IP:PORT
or until PID is gone), RECONNECT (fresh connections in place of closed ones), STOP. Only
processes of the converter's uid or root are answered (SO_PEERCRED). `control_request` is the
client side.
"""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from fdkeeper.address import Address, is_ip, split_host_port
from fdkeeper.errors import FdkeeperError
from fdkeeper.loop import Reactor, Timer
from fdkeeper.protocol import JsonObject, ReceivedJson
from fdkeeper.sip.uri import SIP_PORT
from fdkeeper.statedir import peer_credentials, trusted_uid, verify_peer


class Controlled(Protocol):
    """What the control requests act on (the converter server)."""

    def stats(self) -> JsonObject: ...

    def set_sipp_address(self, address: Address) -> None: ...

    def attach(self, address: Address, pid: int | None) -> int: ...

    def detach(self, address: Address) -> None: ...

    def reconnect(self) -> list[str]: ...

    def stop(self) -> None: ...


def answer(target: Controlled, request: str) -> JsonObject:
    """The reply to one control request."""
    word, _, argument = request.partition(" ")
    try:
        if word == "STATUS":
            return {"ok": True, **target.stats()}
        if word == "SIPP":
            return _with_address(argument, target.set_sipp_address)
        if word == "ATTACH":
            return _attach(target, argument)
        if word == "DETACH":
            return _with_address(argument, target.detach)
        if word == "RECONNECT":
            return {"ok": True, "reconnected": target.reconnect()}
        if word == "STOP":
            target.stop()
            return {"ok": True}
    except FdkeeperError as error:
        return {"ok": False, "error": str(error)}
    return {"ok": False, "error": f"fdkeeper: unknown control request {word!r}"}


def _with_address(argument: str, action: Callable[[Address], None]) -> JsonObject:
    """Call ``action`` with the sipp address ``argument`` names (IP:PORT)."""
    try:
        host, port = split_host_port(argument, SIP_PORT)
    except ValueError:
        host, port = "", 0
    if not is_ip(host):
        return {"ok": False, "error": f"fdkeeper: bad sipp address {argument!r}; give IP:PORT"}
    action((host, port))
    return {"ok": True}


def _attach(target: Controlled, argument: str) -> JsonObject:
    address, _, pid = argument.partition(" ")
    if pid and not pid.isdigit():
        return {"ok": False, "error": f"fdkeeper: bad pid {pid!r} in ATTACH; give ATTACH IP:PORT [PID]"}
    sent: list[int] = []
    reply = _with_address(address, lambda found: sent.append(target.attach(found, int(pid) if pid else None)))
    return {**reply, "delivered": sent[0]} if sent else reply


# A control client has this long to send its one request line; the converter's loop never waits
# on it (it is watched like any other descriptor), and at most MAX_PENDING are heard at once.
REQUEST_SECONDS = 2.0
MAX_REQUEST = 4096
MAX_PENDING = 16


class ControlSocket:
    """The listening Unix socket, watched on the converter's reactor: each client's request is
    read as it arrives, never waited for, so a silent client costs its own slot, not the loop."""

    def __init__(self, path: Path, reactor: Reactor, target: Controlled) -> None:
        self.path, self.reactor, self.target = path, reactor, target
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(os.fspath(path))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self._pending: dict[int, _Pending] = {}
        reactor.watch(self.sock.fileno(), select.EPOLLIN, self._accept, on_fault=lambda _error: None)

    def _accept(self, _mask: int) -> None:
        try:
            connection, _ = self.sock.accept()
        except OSError:  # BlockingIOError, or out of descriptors: the next event tries again
            return
        connection.setblocking(False)
        if not _peer_is_ours(connection) or len(self._pending) >= MAX_PENDING:
            connection.close()  # only our uid or root may steer the converter; and a bounded few at once
            return
        pending = _Pending(connection, self.reactor.call_later(REQUEST_SECONDS, lambda: self._end(connection)))
        self._pending[connection.fileno()] = pending
        self.reactor.watch(
            connection.fileno(),
            select.EPOLLIN,
            lambda _mask: self._read(pending),
            on_fault=lambda _error: self._end(connection),
        )

    def _read(self, pending: _Pending) -> None:
        try:
            chunk = pending.connection.recv(MAX_REQUEST - len(pending.request))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        pending.request += chunk
        if chunk and b"\n" not in pending.request and len(pending.request) < MAX_REQUEST:
            return  # more of the line to come
        if pending.request:
            reply = answer(self.target, pending.request.decode(errors="replace").strip())
            try:  # a small reply into an empty socket buffer: never waits
                pending.connection.send(json.dumps(reply).encode() + b"\n", socket.MSG_DONTWAIT)
            except OSError:
                pass
        self._end(pending.connection)

    def _end(self, connection: socket.socket) -> None:
        pending = self._pending.pop(connection.fileno(), None)
        if pending is None:
            return
        pending.timer.cancel()
        self.reactor.unwatch(connection.fileno())
        connection.close()

    def close(self) -> None:
        for pending in list(self._pending.values()):
            self._end(pending.connection)
        self.reactor.unwatch(self.sock.fileno())
        self.sock.close()
        self.path.unlink(missing_ok=True)


class _Pending:
    """A control client whose request line is still being read."""

    __slots__ = ("connection", "request", "timer")

    def __init__(self, connection: socket.socket, timer: Timer) -> None:
        self.connection = connection
        self.timer = timer
        self.request = b""


def _peer_is_ours(connection: socket.socket) -> bool:
    _pid, uid, _gid = peer_credentials(connection)
    return trusted_uid(uid)


def control_request(path: Path, request: str, timeout: float = 5.0) -> ReceivedJson:
    """Send one control request to a running converter; its JSON reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        verify_peer(sock, path)  # only a converter of ours or root's gets the request
        sock.sendall(request.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: ReceivedJson = json.loads(data)
    return reply
