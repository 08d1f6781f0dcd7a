"""`fdkeeper convert`: a stateless UDP <-> TCP/TLS SIP converter with a kept stream connection.

sipp speaks UDP to the converter's --listen address; the converter holds one TCP or TLS
connection per destination (the SuT, and whatever an `X-Outbound-Proxy` header names) for as
long as it runs, whatever the sipp runs do. A connection the SuT closes is reported and stays
closed until an explicit reconnect (control request RECONNECT), like the keeper's --reconnect:
registrations made over it are gone with it. Where messages go is fdkeeper.convert.routing;
this module is the process: sockets on the shared fdkeeper.loop.Reactor, keep-alives, status.

Status: the control socket's STATUS (JSON), a stats line on SIGUSR1, and --stats-file
(JSON, rewritten every second). Run it with `fdkeeper convert ...`; `serve()` is the library entry.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from types import FrameType

from fdkeeper.address import Address, family_of, format_address
from fdkeeper.convert.control import ControlSocket
from fdkeeper.convert.links import SOCKET_BUFFER, Link, LinkKey, open_link
from fdkeeper.convert.routing import Converter, log
from fdkeeper.errors import FdkeeperError
from fdkeeper.loop import Reactor
from fdkeeper.protocol import JsonObject
from fdkeeper.sip.framing import PING
from fdkeeper.textsafe import configure_logging
from fdkeeper.tls import TlsOptions

READ_CHUNK = 256 * 1024
UDP_BATCH = 512  # datagrams read per wake-up before the streams are flushed
TICK = 1.0  # seconds between expiry, keep-alive and stats-file rounds
RESEND_TICK = 0.1  # seconds between retransmission rounds (T1 is 0.5 s)
LINK_EVENTS = select.EPOLLIN | select.EPOLLRDHUP
_SO_RCVBUFFORCE, _SO_SNDBUFFORCE = 33, 32  # Linux; not in the socket module


def bind_udp(listen: Address) -> socket.socket:
    """sipp's side: a non-blocking UDP socket with large buffers (forced past the sysctl limit
    where allowed: bursts of a high call rate must not be dropped)."""
    sock = socket.socket(family_of(listen[0]), socket.SOCK_DGRAM)
    for option, force in ((socket.SO_RCVBUF, _SO_RCVBUFFORCE), (socket.SO_SNDBUF, _SO_SNDBUFFORCE)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    try:
        sock.bind(listen)
    except OSError as error:
        sock.close()
        raise FdkeeperError(
            f"fdkeeper: cannot listen on udp:{format_address(listen)}: {error.strerror}; pick another --listen"
        ) from None
    sock.setblocking(False)
    return sock


class ConverterServer:
    """The converter process: sipp's UDP socket, the links and the control socket on one
    reactor. What goes where is the Converter's (routing.py); this moves the bytes."""

    def __init__(
        self,
        listen: Address,
        sut: Address,
        transport: str,
        sipp_address: Address | None,
        *,
        hide_topology: bool = False,
        tls: TlsOptions | None = None,
        connect_timeout: float = 5.0,
        keepalive: float | None = None,
        control: Path | None = None,
        stats_file: Path | None = None,
        attached_only: bool = False,
        local: Address | None = None,
    ) -> None:
        self.tls = tls
        self.local = local  # --local: the SuT's connection comes from here (sipp's own -i/-p)
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.stats_file = stats_file
        self.udp = bind_udp(listen)
        self.reactor = Reactor()
        self.converter = Converter(
            self.udp.getsockname()[:2],
            (sut[0], sut[1], transport),
            sipp_address,
            hide_topology,
            self._send_udp,
            self._connect,
            attached_only,
        )
        try:
            self.converter.add_link(self._connect(self.converter.default_key))
        except FdkeeperError:
            self.udp.close()
            self.reactor.close()
            raise
        # A fault while handling one datagram costs that datagram (it was read before it was
        # handled): the UDP socket stays watched for the next ones.
        self.reactor.watch(self.udp.fileno(), select.EPOLLIN, self._on_udp, on_fault=self._datagram_fault)
        self.control = ControlSocket(control, self.reactor, self) if control is not None else None
        self.reactor.call_every(TICK, self._tick)
        self.reactor.call_every(RESEND_TICK, self._resend)

    # -- I/O for the converter

    def _send_udp(self, data: bytes, address: Address) -> None:
        try:
            self.udp.sendto(data, address)
        except OSError as error:
            self.converter.counters["udp_send_errors"] += 1
            self.converter.warn_once(
                f"udp send {error.errno}", f"UDP send to {format_address(address)} failed: {error.strerror}"
            )

    def _connect(self, key: LinkKey) -> Link:
        local = self.local if key == self.converter.default_key else None
        link = open_link(key, self.converter.listen_hp, self.tls, self.connect_timeout, local)
        self.reactor.watch(
            link.fd,
            LINK_EVENTS,
            lambda mask: self._on_link(link, mask),
            on_fault=lambda error: self._closed(link, f"internal error: {error!r}; see the converter log"),
        )
        log.info("connected to %s", link.label())
        if link.early:
            self.converter.from_stream(link, link.early)
        return link

    # -- the loop

    def serve_forever(self) -> None:
        reactor, converter = self.reactor, self.converter
        reactor.running = True
        while reactor.running:
            reactor.run_once()
            if converter.dirty:  # one flush per link per wake-up, whatever filled it
                dirty = list(converter.dirty)
                converter.dirty.clear()
                for link in dirty:
                    self._flush(link)
        self.close()

    def stop(self) -> None:
        self.reactor.stop()

    def _on_udp(self, _mask: int) -> None:
        self.converter.now = time.monotonic()
        recvfrom = self.udp.recvfrom
        from_sipp = self.converter.from_sipp
        for _ in range(UDP_BATCH):
            try:
                data, source = recvfrom(65535)
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error queued on the socket
            from_sipp(data, source)

    def _datagram_fault(self, _error: Exception) -> None:
        self.converter.counters["internal_errors"] += 1

    def _on_link(self, link: Link, mask: int) -> None:
        self.converter.now = time.monotonic()
        if mask & select.EPOLLOUT:
            self._flush(link)
        if mask & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
            self._read(link)

    def _read(self, link: Link) -> None:
        converter = self.converter
        while not link.closed:
            try:
                data = link.sock.recv(READ_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLError, OSError) as error:
                self._closed(link, f"the connection failed: {error}")
                return
            if not data:
                self._closed(link, "the SuT closed it" + (": TLS close_notify or FIN" if link.is_tls else ": FIN"))
                return
            converter.from_stream(link, data)
            if not link.is_tls and len(data) < READ_CHUNK:
                return

    def _flush(self, link: Link) -> None:
        while link.out and not link.closed:
            try:
                sent = link.sock.send(link.out if not link.is_tls else link.out[:READ_CHUNK])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except (ssl.SSLError, OSError) as error:
                self._closed(link, f"the connection failed: {error}")
                return
            del link.out[:sent]
        if not link.closed and link.want_out != bool(link.out):
            link.want_out = bool(link.out)
            self.reactor.rewatch(link.fd, LINK_EVENTS | (select.EPOLLOUT if link.out else 0))

    def _closed(self, link: Link, reason: str) -> None:
        link.closed_reason = reason
        link.closed_at = time.time()
        self.converter.counters["connections_closed"] += 1
        log.warning(
            "connection %s closed: %s; requests to it are refused (503) until a reconnect", link.label(), reason
        )
        self._close_socket(link)
        link.out.clear()

    def _close_socket(self, link: Link) -> None:
        self.reactor.unwatch(link.fd)  # before the close: epoll forgets a closed descriptor itself
        try:
            link.sock.close()
        except OSError:
            pass

    def _resend(self) -> None:
        if self.converter.delivery.pending:
            self.converter.now = time.monotonic()
            self.converter.delivery.tick(self.converter.now)

    def _tick(self) -> None:
        self.converter.now = now = time.monotonic()
        self.converter.detach_dead()
        self.converter.expire()
        if self.keepalive:
            for link in self.converter.links.values():
                if (
                    not link.closed
                    and link.ping_sent_at is None
                    and now - link.last_activity >= self.keepalive
                    and not link.out
                ):
                    link.out += PING
                    link.ping_sent_at = now
                    self._flush(link)
        self.write_stats()

    # -- control requests (fdkeeper.convert.control)

    def reconnect(self) -> list[str]:
        """Open fresh connections in place of the closed ones (the control request RECONNECT)."""
        done = []
        for key, link in list(self.converter.links.items()):
            if link.closed:
                self.converter.add_link(self._connect(key))
                done.append(f"{key[0]}:{key[1]}/{key[2]}")
        return done

    def set_sipp_address(self, address: Address) -> None:
        self.converter.sipp_address = address

    def attach(self, address: Address, pid: int | None) -> int:
        self.converter.now = time.monotonic()
        sent = self.converter.attach(address, pid)
        log.info(
            "run attached at udp:%s (pid %s)%s",
            format_address(address),
            pid,
            f"; {sent} queued request(s) sent to it" if sent else "",
        )
        return sent

    def detach(self, address: Address) -> None:
        self.converter.detach(address)
        log.info("run detached from udp:%s", format_address(address))

    def stats(self) -> JsonObject:
        converter = self.converter
        sipp_address = converter.sipp_address
        return {
            "pid": os.getpid(),
            "listen": converter.listen_hp.decode(),
            "sipp_address": format_address(sipp_address) if sipp_address else None,
            "hide_topology": converter.hide,
            "attached_only": converter.attached_only,
            **converter.delivery.as_dict(),
            "counters": dict(converter.counters),
            "malformed": dict(converter.malformed),
            "transactions": len(converter.transactions),
            "dialogs": len(converter.dialogs),
            "evicted": converter.transactions.evicted + converter.dialogs.evicted,
            "links": [link.as_dict() for link in converter.links.values()],
        }

    # -- status

    def stats_line(self) -> str:
        converter = self.converter
        counters = " ".join(f"{k}={v}" for k, v in sorted(converter.counters.items()))
        malformed = sum(converter.malformed.values())
        links = ", ".join(f"{link.label()} {link.state}" for link in converter.links.values())
        return (
            f"fdkeeper convert: {counters} malformed={malformed} transactions={len(converter.transactions)} "
            f"dialogs={len(converter.dialogs)} links: {links}"
        )

    def write_stats(self) -> None:
        if self.stats_file is None:
            return
        temporary = self.stats_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.stats()))
        temporary.replace(self.stats_file)

    def install_signal_handlers(self) -> None:
        def report(_signum: int, _frame: FrameType | None) -> None:
            print(self.stats_line(), file=sys.stderr, flush=True)
            self.write_stats()

        signal.signal(signal.SIGTERM, self.reactor.stop)
        signal.signal(signal.SIGINT, self.reactor.stop)
        signal.signal(signal.SIGUSR1, report)

    def close(self) -> None:
        self.write_stats()
        for link in self.converter.links.values():
            if not link.closed:
                self._close_socket(link)
        self.udp.close()
        if self.control is not None:
            self.control.close()
        self.reactor.close()


def serve(
    listen: Address,
    sut: Address,
    transport: str,
    sipp_address: Address | None,
    *,
    hide_topology: bool = False,
    tls: TlsOptions | None = None,
    connect_timeout: float = 5.0,
    keepalive: float | None = None,
    control: Path | None = None,
    stats_file: Path | None = None,
    log_level: str = "info",
    attached_only: bool = False,
    local: Address | None = None,
) -> int:
    """Run a converter in the foreground until STOP or SIGTERM; the exit status."""
    configure_logging(log_level, "fdkeeper-convert")
    try:
        server = ConverterServer(
            listen,
            sut,
            transport,
            sipp_address,
            hide_topology=hide_topology,
            tls=tls or TlsOptions(),
            connect_timeout=connect_timeout,
            keepalive=keepalive,
            control=control,
            stats_file=stats_file,
            attached_only=attached_only,
            local=local,
        )
    except FdkeeperError as error:
        print(str(error), file=sys.stderr, flush=True)
        return error.exit_status
    server.install_signal_handlers()
    default = server.converter.links[server.converter.default_key]
    log.info(
        "listening on udp:%s, SuT over %s; sipp address %s%s",
        server.converter.listen_hp.decode(),
        default.label(),
        sipp_address and format_address(sipp_address),
        ", topology hidden" if hide_topology else "",
    )
    server.write_stats()
    server.serve_forever()
    return 0
