"""The C side of a TLS or WebSocket link while a run holds it: helpers/tlspump/tlspump.c, loaded with ctypes.

Python's relay (tlslink.py) costs the keeper about 50 us of CPU per SIP message; while a run
holds a link, one C thread with its own epoll moves whole messages between the SuT's wire
and the run's socketpair instead, with the same framing and bounds. A TLS wire (tls, wss) is
the SSL object of the keeper's ``ssl.SSLSocket``: CPython keeps that pointer right after the
object header and the socket weakref of ``_ssl._SSLSocket`` (3.8 to 3.13), and it is used only
once the C side has checked it (its descriptor is the socket's, its handshake is done). A
plain wire (ws) is the TCP socket's descriptor, checked to be a connected TCP socket. With
``websocket`` the pump speaks WebSocket to the SuT (helpers/tlspump/wsframe.c, the twin of
fdkeeper/websocket.py): whole messages to the run, pongs for pings, each SIP message from the
run as one masked frame; the SuT's Close ends the link as END_WS_CLOSE (``end_reason`` is
WsDecoder.closed), a protocol error as END_UNFRAMEABLE (``end_reason`` is the WsProtocolError's
text without "fdkeeper: "), the close frame queued and given to the wire first either way.
Anything unexpected (no library, another Python, a failed check) leaves the link to the
Python relay, logged once; FDKEEPER_TLS_PUMP=0 chooses the Python relay on purpose.

Hand-overs happen only at a clean point: no SSL write in progress ever changes hands (OpenSSL
wants a write that returned WANT_WRITE retried with at least the bytes it took, which only
the caller knows). Python attaches a link only with no write of its own pending; ``release``
gives everything back at once except, while a write of the pump's is pending, the SSL object
and the unsent bytes: the pump completes that one write, then says so on an eventfd the
keeper's loop watches (``wakeup_fd``), and ``take_rest`` gives them back.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import logging
import os
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fdkeeper.tls")

# How the SuT's side ended while pumped (tlspump.c enum end_kind).
END_NONE, END_CLOSE_NOTIFY, END_EOF, END_FAILED, END_UNFRAMEABLE, END_WS_CLOSE = range(6)
_SSL_POINTER_OFFSET = 3 * ctypes.sizeof(ctypes.c_void_p)  # PyObject_HEAD (2 words), Socket
_LAYOUT_KNOWN = (3, 8) <= sys.version_info[:2] <= (3, 13) and ctypes.sizeof(ctypes.c_void_p) == 8
_TO_SUT, _TO_SIPP, _FROM_SUT, _FROM_SIPP = range(4)


class PumpState(ctypes.Structure):
    """tlspump.c struct pump_state: what the pump did while it held the link."""

    _fields_ = [
        ("messages_to_sut", ctypes.c_uint64),
        ("messages_to_sipp", ctypes.c_uint64),
        ("keepalives", ctypes.c_uint64),
        ("dropped_bytes", ctypes.c_uint64),
        ("unframeable_from_sipp", ctypes.c_uint64),
        ("last_activity_ns", ctypes.c_int64),
        ("end_kind", ctypes.c_int32),
        ("end_reason", ctypes.c_char * 640),
        ("pings", ctypes.c_uint64),
    ]


@dataclass
class Handback:
    """The link's state when the pump gives it back to Python."""

    to_sut: bytes  # empty while finishing: the pump sends it first, then take_rest returns the rest
    to_sipp: bytes
    from_sut: bytes  # a partial message (or, after END_UNFRAMEABLE, the unframeable rest)
    from_sipp: bytes
    unread_lengths: list[int]
    messages_to_sut: int
    messages_to_sipp: int
    keepalives: int
    dropped_bytes: int
    unframeable_from_sipp: int
    last_activity: float | None
    end_kind: int
    end_reason: str
    finishing: bool  # the pump keeps the SSL object until its pending write is done (take_rest)
    pings: int = 0  # WebSocket pings the pump answered


class _Library:
    """The loaded C library, or the reason there is none (said once, in the keeper's log)."""

    def __init__(self) -> None:
        self.lib: ctypes.CDLL | None = None
        self.unavailable = ""
        self._warned = False

    def load(self) -> ctypes.CDLL | None:
        if self.lib is not None or self.unavailable:
            return self.lib
        if os.environ.get("FDKEEPER_TLS_PUMP", "1") == "0":
            self.unavailable = "FDKEEPER_TLS_PUMP=0"
        else:
            path = _library_path()
            if path is None:
                self.unavailable = "fdkeeper/_tlspump*.so not built (pip install again with gcc present)"
            else:
                self.lib = _bind(ctypes.CDLL(str(path)))
                atexit.register(self.lib.tlspump_stop)  # before Python frees the SSL objects
        return self.lib

    def say_unavailable(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("TLS and WebSocket links are relayed in Python (more CPU per message): %s", why)


_LIBRARY = _Library()


def _library_path() -> Path | None:
    """Where `pip install .` put the pump (the extension module fdkeeper._tlspump), as shim_path()."""
    spec = importlib.util.find_spec("fdkeeper._tlspump")
    return Path(spec.origin) if spec and spec.origin else None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    size = ctypes.c_size_t
    pointer, buffer = ctypes.c_void_p, ctypes.c_char_p
    lib.tlspump_validate.argtypes, lib.tlspump_validate.restype = [pointer, ctypes.c_int], ctypes.c_int
    lib.tlspump_new.argtypes, lib.tlspump_new.restype = [], pointer
    fd = ctypes.c_int
    # the pump's link, the SSL* (None: plain), websocket, three descriptors, four (bytes, length) states,
    # the unread lengths
    lib.tlspump_attach.argtypes = [pointer, pointer, ctypes.c_int, fd, fd, fd, buffer, size, buffer, size]
    lib.tlspump_attach.argtypes += [buffer, size]
    lib.tlspump_attach.argtypes += [buffer, size, ctypes.POINTER(ctypes.c_uint32), size]
    lib.tlspump_attach.restype = ctypes.c_int
    lib.tlspump_release.argtypes, lib.tlspump_release.restype = [pointer], ctypes.c_int
    lib.tlspump_finished.argtypes, lib.tlspump_finished.restype = [pointer], ctypes.c_int
    lib.tlspump_take_rest.argtypes, lib.tlspump_take_rest.restype = [pointer], ctypes.c_char_p
    lib.tlspump_wakeup_fd.argtypes, lib.tlspump_wakeup_fd.restype = [], ctypes.c_int
    lib.tlspump_buffer.argtypes = [pointer, ctypes.c_int, ctypes.POINTER(size)]
    lib.tlspump_buffer.restype = pointer
    lib.tlspump_lengths.argtypes = [pointer, ctypes.POINTER(size)]
    lib.tlspump_lengths.restype = ctypes.POINTER(ctypes.c_uint32)
    lib.tlspump_free.argtypes, lib.tlspump_free.restype = [pointer], None
    lib.tlspump_stop.argtypes, lib.tlspump_stop.restype = [], None
    lib.tlspump_free_buffers.argtypes, lib.tlspump_free_buffers.restype = [pointer, ctypes.c_int], ctypes.c_int
    return lib


def _free_buffers_safe(version: tuple[int, ...] = ssl.OPENSSL_VERSION_INFO) -> bool:
    """Whether SSL_free_buffers is safe in this OpenSSL: before 3.0.14, 3.1.6, 3.2.2 and 3.3.1 it
    could free a buffer still in use (CVE-2024-4741)."""
    major, minor, _fix, patch = version[:4]
    fixed_in = {(3, 0): 14, (3, 1): 6, (3, 2): 2, (3, 3): 1}
    return major > 3 or (major == 3 and patch >= fixed_in.get((major, minor), 0))


_FREE_BUFFERS = _LAYOUT_KNOWN and _free_buffers_safe()


def free_buffers(tls: ssl.SSLSocket) -> bool:
    """Free the OpenSSL read and write buffers of an idle TLS session Python holds (never one the
    pump holds): about 17 kB per idle kept connection. Whether it did; nothing is freed while
    bytes are in them, nor without the pump's library, a known SSLSocket layout and a safe OpenSSL."""
    lib = _LIBRARY.load() if _FREE_BUFFERS else None
    address = ssl_pointer(tls) if lib is not None else None
    return lib is not None and address is not None and bool(lib.tlspump_free_buffers(address, tls.fileno()))


def _wire_address(lib: ctypes.CDLL, sock: socket.socket) -> int | None:
    """The SSL* of a TLS socket, None for a plain TCP one, 0 where the pump cannot take it (said once)."""
    if not isinstance(sock, ssl.SSLSocket):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and lib.tlspump_validate(None, sock.fileno()):
            return None
        _LIBRARY.say_unavailable("the socket is not a connected TCP socket")
        return 0
    if not _LAYOUT_KNOWN:
        _LIBRARY.say_unavailable(f"Python {sys.version_info[0]}.{sys.version_info[1]}: SSLSocket layout not known")
        return 0
    address = ssl_pointer(sock)
    if not address or not lib.tlspump_validate(address, sock.fileno()):
        _LIBRARY.say_unavailable("the SSL object of Python's ssl module did not check out")
        return 0
    return address


def ssl_pointer(tls: ssl.SSLSocket) -> int | None:
    """The SSL* of ``tls`` as CPython lays out _ssl._SSLSocket; None where the layout is not that."""
    sslobj = getattr(tls, "_sslobj", None)
    if sslobj is None or type(sslobj).__module__ != "_ssl" or type(sslobj).__name__ != "_SSLSocket":
        return None
    return ctypes.c_void_p.from_address(id(sslobj) + _SSL_POINTER_OFFSET).value


class LiveCounter:
    """A TlsLink counter that adds what the pump counted so far while it holds the link.

    Python adds to it only while it relays (the pump's share is merged at hand-back), so the
    setter stores the plain value.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.stored = f"_{name}"

    def __get__(self, link: object, owner: type | None = None) -> int:
        if link is None:
            return self  # type: ignore[return-value]
        pump = link.pump  # type: ignore[attr-defined]
        live = getattr(pump.live_state(), self.name) if pump is not None and pump.attached else 0
        stored: int = getattr(link, self.stored)
        return stored + live

    def __set__(self, link: object, value: int) -> None:
        setattr(link, self.stored, value)


class PumpedLink:
    """One link's handle in the pump: attach with Python's state, detach to get it back."""

    def __init__(self, lib: ctypes.CDLL, handle: int, ssl_address: int | None, websocket: bool) -> None:
        self._lib = lib
        self._handle = handle
        self._ssl = ssl_address  # None: a plain TCP wire
        self.websocket = websocket
        self.attached = False
        self.finishing = False

    @classmethod
    def create(cls, sock: socket.socket, websocket: bool = False) -> PumpedLink | None:
        """A handle for ``sock`` (an ``ssl.SSLSocket``, or a plain connected TCP socket), speaking
        WebSocket to the SuT when ``websocket``; None (logged once) where the pump cannot take it."""
        lib = _LIBRARY.load()
        if lib is None:
            _LIBRARY.say_unavailable(_LIBRARY.unavailable)
            return None
        address = _wire_address(lib, sock)
        if address == 0:
            return None
        handle = lib.tlspump_new()
        return cls(lib, handle, address, websocket) if handle else None

    def attach(
        self,
        fds: tuple[int, int, int],
        to_sut: bytes,
        to_sipp: bytes,
        partials: tuple[bytes, bytes],
        unread_lengths: list[int],
    ) -> bool:
        """Hand the link (the wire's fd, keeper's pair end, sipp's pair end) and Python's state over.

        For a WebSocket link, ``to_sut`` is frames ready to send and ``partials[0]`` the raw bytes of
        WsDecoder.discard() (the pump re-derives the decoder's state from them)."""
        lengths = (ctypes.c_uint32 * len(unread_lengths))(*unread_lengths)
        from_sut, from_sipp = partials
        result = self._lib.tlspump_attach(
            self._handle, self._ssl, self.websocket, *fds,
            to_sut, len(to_sut), to_sipp, len(to_sipp), from_sut, len(from_sut), from_sipp, len(from_sipp),
            lengths, len(unread_lengths),
        )  # fmt: skip
        self.attached = result == 0
        return self.attached

    def live_state(self) -> PumpState:
        """The pump's counters as they are now (word-sized fields, read while it runs)."""
        return PumpState.from_address(self._handle)

    def release(self) -> Handback:
        """Take the link back: all of it, or all but the SSL object and to_sut while ``finishing``."""
        finishing = bool(self._lib.tlspump_release(self._handle))
        self.attached = False
        self.finishing = finishing
        state = self.live_state()  # final: the pump counts nothing more for this link
        count = ctypes.c_size_t()
        lengths = self._lib.tlspump_lengths(self._handle, ctypes.byref(count))
        return Handback(
            to_sut=b"" if finishing else self._buffer(_TO_SUT),
            to_sipp=self._buffer(_TO_SIPP),
            from_sut=self._buffer(_FROM_SUT),
            from_sipp=self._buffer(_FROM_SIPP),
            unread_lengths=list(lengths[: count.value]) if count.value else [],
            messages_to_sut=state.messages_to_sut,
            messages_to_sipp=state.messages_to_sipp,
            keepalives=state.keepalives,
            dropped_bytes=state.dropped_bytes,
            unframeable_from_sipp=state.unframeable_from_sipp,
            last_activity=_seconds(state.last_activity_ns),
            end_kind=state.end_kind,
            end_reason=state.end_reason.decode(errors="replace"),
            finishing=finishing,
            pings=state.pings,
        )

    def finished(self) -> bool:
        """Whether the write the pump was finishing is done: ``take_rest`` may be called."""
        return self.finishing and bool(self._lib.tlspump_finished(self._handle))

    def take_rest(self) -> tuple[bytes, str]:
        """After finishing: the bytes for the SuT the pump did not send, and why its write failed ("")."""
        failure = self._lib.tlspump_take_rest(self._handle).decode(errors="replace")
        self.finishing = False
        return self._buffer(_TO_SUT), failure

    def _buffer(self, which: int) -> bytes:
        length = ctypes.c_size_t()
        address = self._lib.tlspump_buffer(self._handle, which, ctypes.byref(length))
        return ctypes.string_at(address, length.value) if length.value else b""

    def free(self) -> None:
        if self._handle:
            self._lib.tlspump_free(self._handle)
            self._handle = 0
            self.attached = self.finishing = False


def wakeup_fd() -> int:
    """The eventfd that becomes readable when a finishing link has finished (-1: no pump)."""
    lib = _LIBRARY.load()
    return lib.tlspump_wakeup_fd() if lib is not None else -1


def clear_wakeup(fd: int) -> None:
    try:
        os.read(fd, 8)
    except BlockingIOError:
        pass


def _seconds(monotonic_ns: int) -> float | None:
    """CLOCK_MONOTONIC nanoseconds as time.monotonic() seconds (the same clock on Linux)."""
    return monotonic_ns / 1e9 if monotonic_ns else None
