"""A lease's descriptors go out as a stream made while the client reads (keeper/control.py
ReplyStream with DescriptorPackets): packets the client's queue cannot take yet wait without a
copy of their descriptors (19,000 copies beside the 19,000 kept ones would not fit under the
keeper's open-file limit, issue 20), and a packet whose connection closed meanwhile ends the reply."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest

from fdkeeper.keeper.control import ControlClient
from fdkeeper.loop import Reactor
from fdkeeper.protocol import receive_packet

PACKETS = 40  # well past what the keeper's end takes at once with the smallest send buffer


@pytest.fixture
def stream() -> Iterator[tuple[ControlClient, socket.socket, Reactor]]:
    reactor = Reactor()
    keeper_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    keeper_end.setblocking(False)
    keeper_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum: a few packets
    reactor.watch(keeper_end.fileno(), select.EPOLLIN, lambda _mask: None)
    client = ControlClient(keeper_end, os.getpid(), os.getuid(), reactor)
    yield client, client_end, reactor
    reactor.unwatch(keeper_end.fileno())
    client.close()
    client_end.close()
    reactor.close()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def packet_of(sock: socket.socket):
    return lambda: (b"FDS", [sock.fileno()]) if sock.fileno() >= 0 else None


def test_packets_the_client_cannot_take_yet_wait_without_copies_of_their_descriptors(stream):
    client, reader, _ = stream
    kept = [socket.socket() for _ in range(PACKETS)]
    before = open_descriptors()
    client.send_stream(packet_of(sock) for sock in kept)
    assert client._queue, "the client's socket took every packet at once: nothing waited"
    assert open_descriptors() == before  # those in flight are not ours; the rest wait as packets, not copies
    received = []
    while len(received) < PACKETS:
        data, fds = receive_packet(reader, 1)
        assert data == b"FDS" and len(fds) == 1
        received += fds
        client.flush()  # what EPOLLOUT does
    assert [os.fstat(fd).st_ino for fd in received] == [os.fstat(s.fileno()).st_ino for s in kept]
    for fd in received:
        os.close(fd)
    for sock in kept:
        sock.close()


def test_a_connection_closed_before_its_packet_went_out_ends_the_reply(stream):
    client, reader, _ = stream
    kept = [socket.socket() for _ in range(PACKETS)]
    client.send_stream(packet_of(sock) for sock in kept)
    kept[-1].close()  # not sent yet: the client's queue is full
    while not client.overflowed:
        _, fds = receive_packet(reader, 1)
        for fd in fds:
            os.close(fd)
        client.flush()
    for sock in kept:
        sock.close()
