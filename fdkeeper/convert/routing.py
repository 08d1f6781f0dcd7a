"""The converter's routing: where each message goes and what changes on the way. No I/O of its own
(testable): UDP goes out through a ``send_udp`` callback, stream bytes into ``Link.out``.

Routing (RFC 3261 §16.11, stateless proxy):
- requests from sipp go over the stream: to `X-Outbound-Proxy` (removed) when present, else to
  the connection a remaining Route names, else to --sut. Own Route entries are removed (loose
  routing); dialog-creating requests (INVITE, SUBSCRIBE, REFER without a To tag) get two
  Record-Route entries, the one facing the next hop on top (transport=tcp/tls towards the SuT,
  transport=udp towards sipp); our Via goes on top, its branch derived from the incoming one so
  a CANCEL or a non-2xx ACK matches its INVITE at the SuT.
- requests from the SuT go to sipp over UDP: in-dialog ones (a To tag) to their Request-URI
  when it is an IP address, initial ones to --sipp-address (changed at run time by the control
  requests SIPP and ATTACH); our Via on top. With nowhere to go they wait, and a request sent
  is resent until sipp answers it (fdkeeper.convert.delivery). With --attached-only, datagrams
  from addresses no run of ours attached are dropped and counted (`udp_dropped_unattached`).
- responses pop our Via and follow the next one (received/rport honoured).
- --hide-topology: no Via and no Record-Route of ours on either side. A transaction map keyed
  by the top Via branch (bounded, entries expire after 64*T1) says where each response goes,
  and a dialog map (Call-ID, bounded, expiring) keeps in-dialog requests of a dialog that went
  to an X-Outbound-Proxy destination on that destination.

CRLFCRLF pings from the SuT are answered with a CRLF pong, pongs are consumed, neither reaches
sipp. Messages over 1300 bytes cannot move to a stream towards sipp (it listens on UDP only): up
to 65,507 bytes they are sent anyway and counted (`udp_oversize_sent`); larger requests are
answered 513, larger responses dropped. Malformed SIP is counted by kind, logged once per kind,
dropped, and never fatal.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from fdkeeper.address import Address, format_address
from fdkeeper.convert.delivery import UdpDelivery
from fdkeeper.convert.links import OWN_BRANCH, Link, LinkKey
from fdkeeper.errors import FdkeeperError
from fdkeeper.sip.framing import FramingError
from fdkeeper.sip.message import (
    OUTBOUND,
    ROUTE,
    Edits,
    Malformed,
    Message,
    Span,
    count_hop,
    end_of_element,
    make_reply,
    next_element,
    remove_element,
)
from fdkeeper.sip.uri import HostPort, UriTarget, uri_hostport, uri_ip_address, via_param, via_parts, via_reply_address

log = logging.getLogger("fdkeeper.converter")

UDP_SOFT_LIMIT = 1300  # RFC 3261 §18.1.1: MTU 1500 - 200
UDP_MAX = 65507  # the largest UDP payload over IPv4
TRANSACTION_TTL = 32.0  # 64 * T1: the longest a non-INVITE transaction lives (Timer F)
DIALOG_TTL = 3600.0
MAP_LIMIT = 200_000
DIALOG_CREATING = frozenset({b"INVITE", b"SUBSCRIBE", b"REFER"})


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringMap(Generic[K, V]):
    """key -> value with a time to live and a size bound; oldest entries go first."""

    def __init__(self, ttl: float, limit: int = MAP_LIMIT) -> None:
        self.ttl, self.limit = ttl, limit
        self.entries: dict[K, tuple[float, V]] = {}  # key -> (expiry, value), oldest first
        self.evicted = 0

    def put(self, key: K, value: V, now: float) -> None:
        entries = self.entries
        if key in entries:
            del entries[key]  # move to the young end
        elif len(entries) >= self.limit:
            del entries[next(iter(entries))]
            self.evicted += 1
        entries[key] = (now + self.ttl, value)

    def get(self, key: K) -> V | None:
        found = self.entries.get(key)
        return found[1] if found else None

    def expire(self, now: float) -> None:
        entries = self.entries
        while entries:
            key = next(iter(entries))
            if entries[key][0] > now:
                return
            del entries[key]

    def __len__(self) -> int:
        return len(self.entries)


class _Answered(Exception):
    """The converter answered the request itself (483): nothing to forward."""


def own_branch_tail(branch: bytes | None, data: bytes, via_span: Span) -> bytes:
    """What follows our branch prefix: the incoming RFC 3261 branch's own tail (so a CANCEL or
    a non-2xx ACK gets the branch of its INVITE), else a hash of the incoming Via line."""
    if branch and branch.startswith(b"z9hG4bK"):
        return branch[7:]
    return hashlib.md5(data[via_span[1] : via_span[2]]).hexdigest().encode()


def strip_own_routes(message: Message, edits: Edits, own: set[HostPort]) -> UriTarget | None:
    """Remove our own entries from the top of the route set (loose routing); return the next
    hop left (uri_hostport), None when none is."""
    data, start = message.data, 0
    while True:
        span = message.header(ROUTE, start)
        if span is None:
            return None
        at = span[1]
        while at < span[2]:
            end = end_of_element(data, at, span[2])
            target = uri_hostport(data[at:end])
            if target is None:
                raise Malformed("bad Route")
            if (target[0], target[1]) not in own:
                if at != span[1]:
                    edits.append((span[1], at, b""))
                return target
            at = next_element(data, end)
        edits.append((span[0], span[2] + 2, b""))  # every entry of this line was ours
        start = span[2]


def outbound_proxy_key(message: Message, outbound: Span, edits: Edits, default_transport: str) -> LinkKey:
    """The destination the X-Outbound-Proxy header at ``outbound`` names; the header removed."""
    target = uri_hostport(message.value(outbound))
    if target is None or target[2] not in (b"", b"tcp", b"tls"):
        raise Malformed("bad X-Outbound-Proxy")
    edits.append((outbound[0], outbound[2] + 2, b""))
    return target[0].decode().strip("[]"), target[1], target[2].decode() or default_transport


def _own_key(address: Address) -> HostPort:
    return address[0].lower().encode(), address[1]


class Converter:
    """Routes messages between sipp (UDP) and the stream links. I/O goes through
    ``send_udp(data, address)`` and ``Link.out`` (links with output are in ``dirty``);
    ``connect(key)`` opens a link."""

    def __init__(
        self,
        listen: Address,
        default_key: LinkKey,
        sipp_address: Address | None,
        hide_topology: bool,
        send_udp: Callable[[bytes, Address], None],
        connect: Callable[[LinkKey], Link],
        attached_only: bool = False,
    ) -> None:
        self.listen = listen
        self.listen_hp = format_address(listen).encode()
        self.default_key = default_key
        self.sipp_address = sipp_address
        self.hide = hide_topology
        self.send_udp = send_udp
        self.connect = connect
        self.links: dict[LinkKey, Link] = {}
        self.by_hostport: dict[HostPort, Link] = {}
        self.own: set[HostPort] = {_own_key(listen)}
        self.dirty: set[Link] = set()
        # hidden topology: a forwarded request's branch -> where its responses go back to
        self.transactions: ExpiringMap[bytes, Address | Link] = ExpiringMap(TRANSACTION_TTL)
        self.dialogs: ExpiringMap[bytes, LinkKey] = ExpiringMap(DIALOG_TTL)  # Call-ID -> its link
        self.counters: collections.Counter[str] = collections.Counter()
        self.malformed: collections.Counter[str] = collections.Counter()
        self.warned: set[str] = set()
        self.now = time.monotonic()
        self.attached_only = attached_only
        self.delivery = UdpDelivery(send_udp, self.counters)

    # -- attached runs

    def attach(self, address: Address, pid: int | None) -> int:
        """A run's UDP address: accepted from now on, where initial requests go; the queued
        requests go to it. Returns how many did."""
        self.sipp_address = address
        return self.delivery.attach(address, pid, self.now)

    def detach(self, address: Address) -> None:
        self.delivery.detach(address)
        if self.sipp_address == address:
            self.sipp_address = self.delivery.latest() if self.attached_only else address

    def detach_dead(self) -> None:
        for address in self.delivery.dead_attachments():
            self.counters["detached_dead_runs"] += 1
            self.detach(address)

    def add_link(self, link: Link) -> Link:
        old = self.links.get(link.key)
        if old is not None:
            self.own.discard(_own_key(old.local))
        self.links[link.key] = link
        self.by_hostport[(link.host.lower().encode(), link.port)] = link
        self.own.add(_own_key(link.local))
        return link

    def link_for(self, key: LinkKey) -> Link | None:
        link = self.links.get(key)
        if link is None:
            try:
                link = self.add_link(self.connect(key))
            except FdkeeperError as error:
                self.warn_once(f"connect {key}", f"{error}")
                self.counters["connect_failures"] += 1
                return None
        return link

    # -- bookkeeping

    def drop(self, kind: str, data: bytes = b"") -> None:
        self.malformed[kind] += 1
        self.warn_once(kind, f"dropped malformed SIP ({kind}), first seen: {data[:120]!r}")

    def warn_once(self, kind: str, text: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            log.warning("%s (logged once; counted in the status)", text)

    def expire(self) -> None:
        self.delivery.tick(self.now)
        self.transactions.expire(self.now)
        self.dialogs.expire(self.now)

    # -- the two entry points

    def from_sipp(self, data: bytes, source: Address) -> None:
        self.counters["udp_in"] += 1
        if self.attached_only and not self.delivery.is_attached(source):
            self.counters["udp_dropped_unattached"] += 1
            self.warn_once(
                "unattached",
                f"dropped a datagram from {format_address(source)}: no run of ours is "
                "attached there (counted as udp_dropped_unattached)",
            )
            return
        # A CRLF keep-alive (or nothing but padding): the first byte tells without a stripped copy.
        if data[:1] in b"\r\n\x00 " and not data.strip(b"\r\n\x00 "):
            self.counters["udp_keepalives"] += 1
            return
        self._handle(data, source)

    def from_stream(self, link: Link, data: bytes) -> None:
        try:
            messages = link.receive(data, self.now)
        except FramingError as error:
            self.drop("unframeable stream data", link.framer.discard())
            log.debug("framing: %s", error)
            messages = error.messages  # the whole ones before the bad part still go through
        if link.out:  # pongs to the SuT's pings
            self.dirty.add(link)
        for raw in messages:
            link.messages_in += 1
            self.counters["stream_in"] += 1
            self._handle(raw, link)

    def _handle(self, raw: bytes, peer: Address | Link) -> None:
        """One message from sipp (a datagram, ``peer`` its address) or from a link (the
        ``peer``): whatever it holds, it is forwarded, answered, or counted and dropped; never
        an exception."""
        try:
            if isinstance(peer, Link):
                message = Message(raw, datagram=False)
                if message.is_request:
                    self._request_from_stream(peer, message)
                else:
                    self._response_from_stream(peer, message)
            else:
                message = Message(raw, datagram=True)
                if message.is_request:
                    self._request_from_sipp(message, peer)
                else:
                    self._response_from_sipp(message)
        except Malformed as error:
            self.drop(error.kind, raw)
        except UnicodeDecodeError:  # a host or address that is not text: malformed, never fatal
            self.drop("bad encoding", raw)
        except _Answered:
            pass

    # -- from sipp (UDP) to a link

    def _request_from_sipp(self, message: Message, source: Address) -> None:
        edits = Edits()
        if not count_hop(message, edits):
            self._too_many_hops(message, source)
        outbound = message.header(OUTBOUND)
        key = outbound_proxy_key(message, outbound, edits, self.default_key[2]) if outbound else None
        remaining = strip_own_routes(message, edits, self.own)
        creating = message.method in DIALOG_CREATING
        # The To tag matters only to dialog-creating methods and to the dialog map.
        in_dialog = message.has_to_tag() if creating or self.dialogs.entries else True
        if key is None and remaining is not None:
            link = self.by_hostport.get((remaining[0], remaining[1]))
            key = link.key if link is not None else None
        if key is None and in_dialog and self.dialogs.entries:
            key = self.dialogs.get(message.call_id())
        if key is None:
            key = self.default_key
        link = self.links.get(key) or self.link_for(key)
        if link is None or link.closed:
            self.counters["requests_refused"] += 1
            self._reply(message, source, 503, "Converter Connection Closed")
            return
        if key != self.default_key and not in_dialog and creating:
            self.dialogs.put(message.call_id(), key, self.now)
        record_route = link.rr_to_stream if creating and not in_dialog else b""
        via_end, host, params, _ = self._own_via(message, edits, source, link.via, record_route)
        if not self.hide and host.decode(errors="replace") != source[0] and via_param(params, b"received") is None:
            edits.append((via_end, via_end, b";received=" + source[0].encode()))
        self._to_stream(link, message, edits, "requests_to_stream")

    def _response_from_sipp(self, message: Message) -> None:
        data, edits = message.data, Edits()
        via_span, via_end = message.top_via()
        _protocol, host, port, params = via_parts(data[via_span[1] : via_end])
        self.delivery.answered(via_param(params, b"branch"))
        if self.hide:
            link = self.transactions.get(via_param(params, b"branch") or b"")
            if not isinstance(link, Link):
                link = self.by_hostport.get((host, port)) or self.links.get(self.default_key)
        else:
            if (host, port) not in self.own:
                raise Malformed("response not via us")
            remove_element(message, via_span, via_end, edits)
            nxt = via_parts(message.next_via(via_span, via_end))
            link = self.by_hostport.get((nxt[1], nxt[2])) or self.links.get(self.default_key)
        if link is None or link.closed:
            self.counters["responses_dropped_closed"] += 1
            return
        self._to_stream(link, message, edits, "responses_to_stream")

    def _to_stream(self, link: Link, message: Message, edits: Edits, counter: str) -> None:
        if not message.has_length:
            edits.append((message.head_end + 2, message.head_end + 2, b"Content-Length: %d\r\n" % message.body_length))
        link.out += edits.apply(message.data)
        link.messages_out += 1
        self.dirty.add(link)
        self.counters[counter] += 1

    # -- from a link (the SuT) to sipp over UDP

    def _request_from_stream(self, link: Link, message: Message) -> None:
        edits = Edits()
        if not count_hop(message, edits):
            self._too_many_hops(message, link)
        strip_own_routes(message, edits, self.own)
        in_dialog = message.has_to_tag()
        destination = uri_ip_address(message.request_uri()) if in_dialog else None
        if destination is None:
            # No run attached: it waits for the next one (an attached-only converter never
            # guesses from the Request-URI, which names a run that is gone).
            destination = self.sipp_address or (None if self.attached_only else uri_ip_address(message.request_uri()))
            if destination is None and not self.attached_only:
                raise Malformed("no destination for a request from the SuT")
        record_route = link.rr_to_udp if message.method in DIALOG_CREATING and not in_dialog else b""
        branch = self._own_via(message, edits, link, link.via_udp, record_route)[3]
        self._to_udp(message, edits, destination, link, "requests_to_udp", branch)

    def _response_from_stream(self, link: Link, message: Message) -> None:
        data, edits = message.data, Edits()
        via_span, via_end = message.top_via()
        if self.hide:
            _, host, port, params = via_parts(data[via_span[1] : via_end])
            destination = self.transactions.get(via_param(params, b"branch") or b"")
            if not isinstance(destination, tuple):
                destination = (host.decode().strip("[]"), port)  # sipp's own Via (not the SuT's rport)
        else:
            if data.startswith(link.via_value, via_span[1]):
                host, port = link.local_host, link.local[1]  # our own Via, as we wrote it: no parsing
            else:
                _, host, port, _ = via_parts(data[via_span[1] : via_end])
            if (host, port) not in self.own:
                raise Malformed("response not via us")
            remove_element(message, via_span, via_end, edits)
            destination = via_reply_address(message.next_via(via_span, via_end))
        self._to_udp(message, edits, destination, None, "responses_to_udp")

    def _to_udp(
        self,
        message: Message,
        edits: Edits,
        destination: Address | None,
        link: Link | None,
        counter: str,
        branch: bytes | None = None,
    ) -> None:
        """Send to sipp: over 1300 bytes counted and warned of once, over 65,507 not sent
        (a request from ``link`` answered 513). A request from a link goes through the delivery
        (queued while ``destination`` is None, resent until answered, by ``branch``)."""
        out = edits.apply(message.data)
        size = len(out)
        if size > UDP_SOFT_LIMIT:
            if size > UDP_MAX:
                self.counters["udp_too_large"] += 1
                if message.is_request and link is not None:
                    self._reply(message, link, 513, "Message Too Large")
                return
            # RFC 3261 §18.1.1 would switch a request to TCP; sipp listens on UDP only.
            self.counters["udp_oversize_sent"] += 1
            self.warn_once(
                "oversize",
                f"sent a {size}-byte message to sipp over UDP (over the {UDP_SOFT_LIMIT}-byte "
                "limit of RFC 3261 §18.1.1; sipp listens on UDP only); counted as udp_oversize_sent",
            )
        if link is not None and message.is_request:
            self.delivery.send_request(out, branch, message.method == b"INVITE", destination, self.now)
        else:
            assert destination is not None, "only a request from a link waits for a run (the delivery queues it)"
            self.send_udp(out, destination)
        self.counters[counter] += 1

    # -- shared

    def _own_via(
        self, message: Message, edits: Edits, back: Address | Link, via: bytes, record_route: bytes
    ) -> tuple[int, bytes, bytes, bytes | None]:
        """Put our ``via`` on top (``record_route`` above it), its branch following the
        incoming one; with hidden topology remember instead where responses go ``back`` to.
        Returns the incoming top Via element's end, sent-by host and parameters, and the branch
        the next hop sees on top."""
        data = message.data
        via_span, via_end = message.top_via()
        _, host, _, params = via_parts(data[via_span[1] : via_end])
        branch = via_param(params, b"branch")
        if self.hide:
            if branch:
                self.transactions.put(branch, back, self.now)
            return via_end, host, params, branch
        tail = own_branch_tail(branch, data, via_span)
        top = b"".join((record_route, via, tail, b"\r\n"))
        edits.append((message.start_end + 2, message.start_end + 2, top))
        return via_end, host, params, OWN_BRANCH + tail

    def _too_many_hops(self, message: Message, peer: Address | Link) -> None:
        """Max-Forwards was 0: answer 483 to ``peer`` instead of forwarding."""
        self.counters["too_many_hops"] += 1
        self._reply(message, peer, 483, "Too Many Hops")
        raise _Answered()

    def _reply(self, message: Message, peer: Address | Link, code: int, reason: str) -> None:
        """Answer a request ourselves (never an ACK), back where it came from."""
        if message.method == b"ACK":
            return
        reply = make_reply(message, code, reason)
        if isinstance(peer, Link):
            self._queue(peer, reply)
        else:
            self.send_udp(reply, peer)

    def _queue(self, link: Link, data: bytes) -> None:
        link.out += data
        self.dirty.add(link)
