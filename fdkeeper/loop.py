"""One event loop for the keeper and the converter: epoll for descriptors, a heap for timers.

Single-threaded and level-triggered. Handlers run to completion, so none of them may block:
anything that waits (a connect, a TLS handshake, a pong) is a descriptor to watch or a timer.

Fault isolation (asyncio's Handle._run is the model): a handler or timer callback that raises
is logged once with its traceback, counted in ``internal_errors`` and handed to its owner's
``on_fault(error)``, which ends what it owns (that control client, that connection). Without an
``on_fault`` a faulting descriptor is unwatched (level-triggered, it would fault again at once)
and a faulting timer is dropped. ``run()`` never ends because of a handler, so one defect costs
one client or one connection, never the keeper.

Each watched descriptor is one object in the Reactor (a Watcher): the owner itself where it has
``on_event`` and ``on_fault`` methods (``watch_by``: an idle kept connection's transport), else
a small pair of the callables ``watch`` was given. No tuple and no bound method is kept per
descriptor: with 10,000 idle connections they were about 120 bytes each (bench/keeper_scale.py).
The watchers are a list indexed by descriptor number, not a dict: descriptors are small numbers
the kernel hands out lowest first, so the list is as long as the highest one watched (8 bytes a
number, bounded by the open-file limit), where a dict of 10,000 descriptors watched and
unwatched over and over (each connection's open, each control client) took about 70 bytes each.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import time
from collections.abc import Callable
from typing import Protocol

EventHandler = Callable[[int], None]
FaultHandler = Callable[[Exception], None]

log = logging.getLogger("fdkeeper.loop")


# The heap is rebuilt without its cancelled timers once they are more than half of it (and
# at least this many): a timer cancelled long before it is due (a connect timeout once the
# connect succeeded) must not stay in memory until then. asyncio does the same.
COMPACT_AT_CANCELLED = 100


def _never_called() -> None:
    """The callback of a cancelled timer (which never runs)."""


class Timer:
    """A scheduled callback; ``cancel()`` keeps it from running (it is dropped lazily)."""

    __slots__ = ("_on_cancel", "callback", "cancelled", "on_fault", "when")

    def __init__(
        self,
        when: float,
        callback: Callable[[], None],
        on_cancel: Callable[[], None],
        on_fault: FaultHandler | None = None,
    ) -> None:
        self.when = when
        self.callback = callback
        self.on_fault = on_fault
        self.cancelled = False
        self._on_cancel: Callable[[], None] | None = on_cancel  # None once out of the heap

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        # What the callback holds (an opening connection, its request) is let go now, not when
        # the heap drops the timer: up to half the heap is cancelled timers (COMPACT_AT_CANCELLED).
        self.callback, self.on_fault = _never_called, None
        if self._on_cancel is not None:
            self._on_cancel()

    def left_heap(self) -> None:
        self._on_cancel = None


class Watcher(Protocol):
    """What the Reactor holds for a watched descriptor: ``on_event(mask)`` for its events, and
    ``on_fault(error)`` (or None) for when that raised (module docstring)."""

    def on_event(self, mask: int, /) -> None: ...

    @property
    def on_fault(self) -> FaultHandler | None: ...


class _Callbacks:
    """The Watcher of a descriptor watched with two callables (``Reactor.watch``)."""

    __slots__ = ("on_event", "on_fault")

    def __init__(self, on_event: EventHandler, on_fault: FaultHandler | None) -> None:
        self.on_event = on_event
        self.on_fault = on_fault


class Reactor:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: list[Watcher | None] = []  # by descriptor number (module docstring)
        self._watched = 0
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled_in_heap = 0
        self._sequence = itertools.count()
        self.running = False
        self.internal_errors = 0  # handler and timer exceptions caught by the loop (see _fault)

    # ------------------------------------------------------------ descriptors

    def watch(self, fd: int, events: int, handler: EventHandler, on_fault: FaultHandler | None = None) -> None:
        """Call ``handler(mask)`` whenever ``fd`` has one of ``events``.

        If ``handler`` raises, ``on_fault(error)`` is called: the owner ends what it owns (or
        keeps watching, its choice). Without one, or if it raises too, ``fd`` is unwatched.
        """
        self.watch_by(fd, events, _Callbacks(handler, on_fault))

    def watch_by(self, fd: int, events: int, watcher: Watcher) -> None:
        """Call ``watcher.on_event(mask)`` whenever ``fd`` has one of ``events``, and its
        ``on_fault(error)`` if that raised (as ``watch``): the object itself is all the Reactor
        keeps for ``fd``."""
        self._epoll.register(fd, events)  # raises for a descriptor watched already, as for a closed one
        handlers = self._handlers
        if fd >= len(handlers):
            handlers.extend([None] * (fd + 1 - len(handlers)))
        if handlers[fd] is None:  # else its owner closed it unwatched and the number came back
            self._watched += 1
        handlers[fd] = watcher

    def rewatch(self, fd: int, events: int) -> None:
        """Change the events of a watched descriptor."""
        self._epoll.modify(fd, events)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (a no-op if it was not watched). Call before closing it."""
        if self.watching(fd):
            self._handlers[fd] = None
            self._watched -= 1
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):  # already closed by its owner: epoll forgot it itself
                pass

    def watching(self, fd: int) -> bool:
        return 0 <= fd < len(self._handlers) and self._handlers[fd] is not None

    def watched_count(self) -> int:
        """How many descriptors are watched now."""
        return self._watched

    # ------------------------------------------------------------ timers

    def call_later(self, delay: float, callback: Callable[[], None], on_fault: FaultHandler | None = None) -> Timer:
        """Run ``callback`` once after ``delay`` s; if it raises, ``on_fault(error)`` is called."""
        timer = Timer(time.monotonic() + delay, callback, self._timer_cancelled, on_fault)
        heapq.heappush(self._timers, (timer.when, next(self._sequence), timer))
        return timer

    def pending_timers(self) -> int:
        """Timers in the heap, cancelled ones not yet dropped included (bounded: see COMPACT_AT_CANCELLED)."""
        return len(self._timers)

    def _timer_cancelled(self) -> None:
        self._cancelled_in_heap += 1
        if self._cancelled_in_heap >= COMPACT_AT_CANCELLED and 2 * self._cancelled_in_heap > len(self._timers):
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled_in_heap = 0

    def _pop_timer(self) -> Timer:
        _, _, timer = heapq.heappop(self._timers)
        timer.left_heap()
        if timer.cancelled:
            self._cancelled_in_heap -= 1
        return timer

    def call_every(self, interval: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` every ``interval`` seconds for as long as the loop runs.

        The next call is scheduled before this one runs, so a call that raises (logged and
        counted like any other fault) does not end the schedule.
        """

        def again() -> None:
            self.call_later(interval, again)
            callback()

        self.call_later(interval, again)

    # ------------------------------------------------------------ running

    def run_once(self, max_wait: float | None = None) -> None:
        """Wait for events or the next timer (at most ``max_wait`` s), then dispatch both."""
        timeout = self._next_timeout(max_wait)
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            events = []
        handlers = self._handlers
        for fd, mask in events:
            # An earlier handler in this batch may have unwatched it (or closed the Reactor).
            watcher = handlers[fd] if fd < len(handlers) else None
            if watcher is not None:
                self._run_handler(fd, mask, watcher)
        self._run_due_timers()

    def run(self) -> None:
        """Run until ``stop()``."""
        self.running = True
        while self.running:
            self.run_once()

    def stop(self, *_: object) -> None:
        """Make ``run()`` return after the current iteration; safe from a signal handler."""
        self.running = False

    def close(self) -> None:
        self._handlers.clear()
        self._watched = 0
        self._timers.clear()
        self._cancelled_in_heap = 0
        self._epoll.close()

    def _next_timeout(self, max_wait: float | None) -> float | None:
        while self._timers and self._timers[0][2].cancelled:
            self._pop_timer()
        if not self._timers:
            return max_wait
        until_timer = max(0.0, self._timers[0][0] - time.monotonic())
        return until_timer if max_wait is None else min(until_timer, max_wait)

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = self._pop_timer()
            if not timer.cancelled:
                self._run_timer(timer)

    # ------------------------------------------------------------ fault isolation

    def _run_handler(self, fd: int, mask: int, watcher: Watcher) -> None:
        try:
            watcher.on_event(mask)
        except Exception as error:
            # No owner to end it (no on_fault, or on_fault failed too): level-triggered, it
            # would fault again on the next poll, so the loop stops watching it. An owner whose
            # on_fault returned decided itself (ended it, or kept it: a datagram socket).
            ended_by_owner = self._fault(f"handler of descriptor {fd}", error, watcher.on_fault)
            if not ended_by_owner and fd < len(self._handlers) and self._handlers[fd] is watcher:
                self.unwatch(fd)

    def _run_timer(self, timer: Timer) -> None:
        try:
            timer.callback()
        except Exception as error:
            self._fault(f"timer {timer.callback!r}", error, timer.on_fault)

    def _fault(self, where: str, error: Exception, on_fault: FaultHandler | None) -> bool:
        """Log and count one fault, then let its owner end what it owns; True if it did."""
        self.internal_errors += 1
        log.exception("internal error in %s: %s", where, error)  # called inside the except
        if on_fault is None:
            return False
        try:
            on_fault(error)
        except Exception as second:
            self.internal_errors += 1
            log.exception("internal error in the on_fault of %s: %s", where, second)
            return False
        return True
