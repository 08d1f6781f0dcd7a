"""The Reactor on its own: timers in order, cancelling, unwatching during dispatch, stopping."""

from __future__ import annotations

import contextlib
import os
import select
import time

import pytest

from fdkeeper.loop import Reactor


@pytest.fixture
def reactor():
    with contextlib.closing(Reactor()) as loop:
        yield loop


@pytest.fixture
def pipes():
    opened = [os.pipe() for _ in range(2)]
    yield opened
    for read_end, write_end in opened:
        os.close(read_end)
        os.close(write_end)


def run_until(reactor: Reactor, done, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the reactor did not get there in time"
        reactor.run_once(max_wait=0.05)


def test_timers_run_in_due_order_and_equal_times_in_call_order(reactor):
    ran: list[str] = []
    reactor.call_later(0.03, lambda: ran.append("late"))
    reactor.call_later(0.0, lambda: ran.append("first now"))
    reactor.call_later(0.0, lambda: ran.append("second now"))
    reactor.call_later(0.01, lambda: ran.append("soon"))
    run_until(reactor, lambda: len(ran) == 4)
    assert ran == ["first now", "second now", "soon", "late"]


def test_a_timer_does_not_run_early(reactor):
    ran: list[float] = []
    start = time.monotonic()
    reactor.call_later(0.05, lambda: ran.append(time.monotonic() - start))
    run_until(reactor, lambda: ran)
    assert ran[0] >= 0.05


def test_a_cancelled_timer_never_runs(reactor):
    ran: list[str] = []
    cancelled = reactor.call_later(0.0, lambda: ran.append("cancelled"))
    reactor.call_later(0.01, lambda: ran.append("kept"))
    cancelled.cancel()
    run_until(reactor, lambda: ran)
    reactor.run_once(max_wait=0.02)
    assert ran == ["kept"]


def test_a_timer_cancelled_by_an_earlier_one_in_the_same_batch_never_runs(reactor):
    ran: list[str] = []
    later = reactor.call_later(0.0, lambda: ran.append("later"))
    reactor.call_later(-1.0, later.cancel)  # due first, cancels the other before it runs
    time.sleep(0.01)
    reactor.run_once(max_wait=0)
    assert ran == []


def test_call_every_repeats(reactor):
    ticks: list[float] = []
    reactor.call_every(0.01, lambda: ticks.append(time.monotonic()))
    run_until(reactor, lambda: len(ticks) >= 3)
    assert ticks == sorted(ticks)


def test_run_once_waits_no_longer_than_max_wait(reactor):
    reactor.call_later(10.0, lambda: None)
    start = time.monotonic()
    reactor.run_once(max_wait=0.02)
    assert time.monotonic() - start < 1.0


def test_a_watched_descriptor_calls_its_handler_with_the_mask(reactor, pipes):
    (read_end, write_end), _ = pipes
    masks: list[int] = []
    reactor.watch(read_end, select.EPOLLIN, masks.append)
    assert reactor.watching(read_end)
    os.write(write_end, b"x")
    run_until(reactor, lambda: masks)
    assert masks[0] & select.EPOLLIN


def test_rewatch_changes_the_events(reactor, pipes):
    (read_end, write_end), _ = pipes
    masks: list[int] = []
    reactor.watch(write_end, 0, masks.append)
    reactor.run_once(max_wait=0)
    assert masks == []
    reactor.rewatch(write_end, select.EPOLLOUT)
    run_until(reactor, lambda: masks)
    assert masks[0] & select.EPOLLOUT


def test_a_handler_that_unwatches_another_ready_descriptor_stops_its_dispatch(reactor, pipes):
    (first_read, first_write), (second_read, second_write) = pipes
    called: list[int] = []

    def handle(fd: int, other: int):
        def handler(_mask: int) -> None:
            called.append(fd)
            reactor.unwatch(other)

        return handler

    reactor.watch(first_read, select.EPOLLIN, handle(first_read, second_read))
    reactor.watch(second_read, select.EPOLLIN, handle(second_read, first_read))
    os.write(first_write, b"x")
    os.write(second_write, b"x")
    time.sleep(0.01)
    reactor.run_once(max_wait=0)
    assert len(called) == 1  # both were ready in one batch; the first handler unwatched the other
    other = second_read if called == [first_read] else first_read
    assert not reactor.watching(other)


def test_unwatch_of_an_unknown_or_closed_descriptor_is_harmless(reactor):
    read_end, write_end = os.pipe()
    reactor.watch(read_end, select.EPOLLIN, lambda _mask: None)
    os.close(read_end)  # closed before unwatch: epoll already forgot it
    reactor.unwatch(read_end)
    reactor.unwatch(12345)
    assert not reactor.watching(read_end)
    os.close(write_end)


def test_stop_from_a_timer_ends_run(reactor):
    ran: list[str] = []
    reactor.call_later(0.01, lambda: ran.append("before stop"))
    reactor.call_later(0.02, reactor.stop)
    reactor.call_later(5.0, lambda: ran.append("never"))
    start = time.monotonic()
    reactor.run()
    assert ran == ["before stop"]
    assert not reactor.running
    assert time.monotonic() - start < 2.0


def test_stop_from_a_handler_ends_run_after_that_iteration(reactor, pipes):
    (read_end, write_end), _ = pipes
    reactor.watch(read_end, select.EPOLLIN, lambda _mask: reactor.stop())
    reactor.call_later(5.0, lambda: pytest.fail("run() went on after stop()"))
    os.write(write_end, b"x")
    reactor.run()
    assert not reactor.running


def test_cancelled_timers_do_not_pile_up_in_the_heap(reactor):
    # A keeper cancels a connect or pong timer for every open or lease that succeeds; with
    # lazy dropping alone each stayed in the heap until its (seconds away) due time.
    survivor = reactor.call_later(60, lambda: None)
    for _ in range(10_000):
        reactor.call_later(60, lambda: None).cancel()
    assert reactor.pending_timers() <= 200
    assert reactor.pending_timers() >= 1 and not survivor.cancelled


def test_a_timer_cancelled_after_it_ran_is_not_counted_again(reactor):
    ran: list[int] = []
    fired = [reactor.call_later(0, lambda i=i: ran.append(i)) for i in range(300)]
    reactor.run_once(max_wait=0)
    for timer in fired:
        timer.cancel()  # harmless once run: must not make the heap drop live timers
    live = reactor.call_later(0, lambda: ran.append(-1))
    reactor.run_once(max_wait=0)
    assert ran[-1] == -1 and len(ran) == 301 and live is not None
