"""The converter's control socket: one request a connection, one JSON line back.

Requests: STATUS, SIPP IP:PORT (where the SuT's initial requests go from now on), RECONNECT
(fresh connections in place of closed ones), STOP. `control_request` is the client side.
"""

from __future__ import annotations

import json
import os
import select
import socket
from pathlib import Path
from typing import Protocol

from fdkeeper.address import Address, is_ip, split_host_port
from fdkeeper.errors import FdkeeperError
from fdkeeper.statedir import verify_peer
from fdkeeper.loop import Reactor
from fdkeeper.sip.uri import SIP_PORT


class Controlled(Protocol):
    """What the control requests act on (the converter server)."""

    def stats(self) -> dict: ...

    def set_sipp_address(self, address: Address) -> None: ...

    def reconnect(self) -> list[str]: ...

    def stop(self) -> None: ...


def answer(target: Controlled, request: str) -> dict:
    """The reply to one control request."""
    word, _, argument = request.partition(" ")
    try:
        if word == "STATUS":
            return {"ok": True, **target.stats()}
        if word == "SIPP":
            return _set_sipp_address(target, argument)
        if word == "RECONNECT":
            return {"ok": True, "reconnected": target.reconnect()}
        if word == "STOP":
            target.stop()
            return {"ok": True}
    except FdkeeperError as error:
        return {"ok": False, "error": str(error)}
    return {"ok": False, "error": f"fdkeeper: unknown control request {word!r}"}


def _set_sipp_address(target: Controlled, argument: str) -> dict:
    try:
        host, port = split_host_port(argument, SIP_PORT)
    except ValueError:
        host, port = "", 0
    if not is_ip(host):
        return {"ok": False, "error": f"fdkeeper: bad sipp address {argument!r}; give IP:PORT"}
    target.set_sipp_address((host, port))
    return {"ok": True}


class ControlSocket:
    """The listening Unix socket, watched on the converter's reactor."""

    def __init__(self, path: Path, reactor: Reactor, target: Controlled) -> None:
        self.path, self.reactor, self.target = path, reactor, target
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(os.fspath(path))
        self.sock.listen(8)
        self.sock.setblocking(False)
        reactor.watch(self.sock.fileno(), select.EPOLLIN, self._accept)

    def _accept(self, _mask: int) -> None:
        try:
            connection, _ = self.sock.accept()
        except BlockingIOError:
            return
        with connection:
            connection.settimeout(2.0)
            try:
                request = connection.recv(4096).decode(errors="replace").strip()
                reply = answer(self.target, request)
                connection.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                return

    def close(self) -> None:
        self.reactor.unwatch(self.sock.fileno())
        self.sock.close()
        self.path.unlink(missing_ok=True)


def control_request(path: Path, request: str, timeout: float = 5.0) -> dict:
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
    return json.loads(data)
