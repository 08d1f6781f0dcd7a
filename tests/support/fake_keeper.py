"""Fake keepers for the shim's tests: ControlServer, a SEQPACKET control socket served on a
thread; on it FakeKeeper, which answers LEASE as docs/protocol.md says, with TCP connections it
opens to the test's SuT or with socketpair ends (standing in for the keeper's TLS relay), and
records every request and FDS packet; and ReusingKeeper, which answers every request of a
control connection, as the keeper does."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tests.support.shim import Sut


def fmt_addr(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """A socket address as the protocol writes it: host:port, [v6]:port."""
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ControlServer:
    """A SEQPACKET control socket at ``path``, served on a thread: each accepted connection has
    its first request answered by ``_one``, then is closed. A subclass sets its own state before
    it calls this ``__init__``: serving starts in it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._serve_connection(conn)

    def _serve_connection(self, conn: socket.socket) -> None:
        """One accepted control connection: its first request answered, then closed."""
        with conn:
            try:
                self._one(conn)
            except OSError:
                pass

    def _one(self, conn: socket.socket) -> None:
        """Reads one request from ``conn`` and answers it."""
        raise NotImplementedError

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


class FakeKeeper(ControlServer):
    """SEQPACKET control socket answering LEASE the way docs/protocol.md says.

    pairs=True: client leases hand one end of a fresh socketpair (the keeper keeps
    a copy of it, like it keeps a TCP socket; the test plays the SuT on the other
    end) with peers=/locals= set to peer_addr/local_addr. addrs=True: TCP FDS
    packets carry peers=/locals= too (the real addresses). fds_extra replaces the
    peers=/locals= part of every FDS packet. keep=True: a client LEASE asked with
    cache=1 gets keep=1 in its OK (the process may keep a copy). inline=True: one
    asked with inline=1 is answered in one packet, `OK count=1 ids=...` carrying
    the descriptor. The keeper does both; the shim takes either answer."""

    def __init__(
        self,
        path: Path,
        sut: Sut,
        error: str | None = None,
        pairs: bool = False,
        addrs: bool = False,
        peer_addr: str | None = None,
        local_addr: str = "192.0.2.55:40312",
        fds_extra: str | None = None,
        keep: bool = False,
        inline: bool = False,
    ) -> None:
        self.sut = sut
        self.error = error  # "code text" -> ERR reply
        self.pairs = pairs
        self.addrs = addrs or pairs
        self.peer_addr = peer_addr or sut.addr
        self.local_addr = local_addr
        self.fds_extra = fds_extra  # replaces peers=/locals= when set
        self.keep = keep
        self.inline = inline
        self.server_conns: list[socket.socket] = []  # kept for server leases
        self.server_addrs: list[tuple[str, str]] = []  # their (peer, local)
        self.kept: list[socket.socket] = []  # keeper's copies handed out
        self.kept_addrs: list[tuple[str, str]] = []
        self.by_aor: dict[str, int] = {}  # aor= -> index in kept (one connection per user)
        self.leased: list[int] = []  # index in kept of each client lease
        self.sut_side: list[socket.socket] = []  # the SuT's end of each kept copy
        self.requests: list[str] = []
        self.packets: list[str] = []  # FDS packets sent (an inline answer's OK packet too)
        self.peer_pids: list[int] = []
        self.pair_ends: list[socket.socket] = []  # the test's ends of socketpairs
        super().__init__(path)

    def open_server_conns(self, n: int) -> None:
        """Kept connections for a server lease (keeper end + SuT end)."""
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", self.sut.port))
            self.server_conns.append(c)
            self.server_addrs.append((fmt_addr(c.getpeername()), fmt_addr(c.getsockname())))
            self.sut_side.append(self.sut.accept())

    def open_server_pairs(self, addrs: list[tuple[str, str]]) -> None:
        """TLS-style kept connections: socketpair ends with (peer, local) addresses."""
        for peer, local in addrs:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            b.settimeout(10)
            self.pair_ends.append(b)
            self.server_conns.append(a)
            self.server_addrs.append((peer, local))
            self.sut_side.append(b)

    def _send_fds(
        self,
        conn: socket.socket,
        first_id: int,
        socks: list[socket.socket],
        addrs: list[tuple[str, str]],
        opening: str = "FDS",
    ) -> None:
        """FDS packets of at most 250 descriptors and 4096 bytes each; ``opening`` takes the
        place of the first one's FDS (an OK answered inline)."""

        def message(start: int, end: int) -> str:
            msg = ("FDS" if start else opening) + " ids=" + ",".join(str(first_id + i) for i in range(start, end))
            if self.fds_extra is not None:
                msg += self.fds_extra
            elif self.addrs:
                msg += " peers=" + ",".join(a[0] for a in addrs[start:end])
                msg += " locals=" + ",".join(a[1] for a in addrs[start:end])
            return msg

        start = 0
        while start < len(socks):
            end = start + 1
            while end < len(socks) and end - start < 250 and len(message(start, end + 1)) <= 4096:
                end += 1
            msg = message(start, end)
            assert len(msg) <= 4096
            self.packets.append(msg)
            socket.send_fds(conn, [msg.encode()], [c.fileno() for c in socks[start:end]])
            start = end

    def _one(self, conn: socket.socket) -> None:
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        self.peer_pids.append(int.from_bytes(cred[:4], "little"))
        req = conn.recv(4097).decode()
        self.requests.append(req)
        words = req.split()
        if self.error:
            conn.send(f"ERR {self.error}".encode())
            return
        if words[:2] == ["LEASE", "role=client"]:
            aor = next((unquote(w[4:]) for w in words if w.startswith("aor=")), None)
            i = self.by_aor[aor] if aor in self.by_aor else self._open_client_connection(aor)
            self.leased.append(i)
            self._answer_client_lease(conn, words, i)
        elif words[:2] == ["LEASE", "role=server"]:
            conns = self.server_conns
            conn.send(f"OK count={len(conns)}".encode())
            self._send_fds(conn, 1, conns, self.server_addrs)
        else:
            conn.send(b"ERR badrequest fdkeeper: unknown request")

    def _open_client_connection(self, aor: str | None) -> int:
        """A new kept connection (TCP to the SuT, or a socketpair), the user's of ``aor`` from
        now on; its index in kept."""
        if self.pairs:
            s, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            other.settimeout(10)
            self.pair_ends.append(other)
            self.sut_side.append(other)
            addrs = (self.peer_addr, self.local_addr)
        else:
            s = socket.create_connection(("127.0.0.1", self.sut.port))
            self.sut_side.append(self.sut.accept())
            addrs = (fmt_addr(s.getpeername()), fmt_addr(s.getsockname()))
        self.kept.append(s)
        self.kept_addrs.append(addrs)
        if aor is not None:
            self.by_aor[aor] = len(self.kept) - 1
        return len(self.kept) - 1

    def _answer_client_lease(self, conn: socket.socket, words: list[str], i: int) -> None:
        """Hands kept[i]: the OK (with keep=1 where cache=1 was asked and keep is on), then its
        FDS packet; the two as one packet where inline=1 was asked and inline is on."""
        ok = "OK count=1" + (" keep=1" if self.keep and "cache=1" in words else "")
        if self.inline and "inline=1" in words:
            self._send_fds(conn, i + 1, [self.kept[i]], [self.kept_addrs[i]], opening=ok)
            return
        conn.send(ok.encode())
        self._send_fds(conn, i + 1, [self.kept[i]], [self.kept_addrs[i]])

    def close(self) -> None:
        super().close()
        for s in self.kept + self.server_conns + self.pair_ends:
            s.close()


class ReusingKeeper(FakeKeeper):
    """Answers every request a control connection sends, as the keeper does (FakeKeeper closes
    it after one), and closes it itself after ``close_after`` requests (the keeper's idle drop)."""

    def __init__(self, *args: Any, close_after: int = 1000, **kwargs: Any) -> None:
        self.close_after = close_after
        self.accepted = 0
        super().__init__(*args, **kwargs)

    def _serve_connection(self, conn: socket.socket) -> None:
        self.accepted += 1
        conn.settimeout(5)
        with conn:
            for _ in range(self.close_after):
                try:
                    if not conn.recv(1, socket.MSG_PEEK):
                        break
                    self._one(conn)
                except OSError:
                    break
