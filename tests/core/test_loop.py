"""The Reactor on its own: timers in order, cancelling, unwatching during dispatch, stopping."""

from __future__ import annotations

import contextlib
import os
import select
import time
import weakref

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
    (_read_end, write_end), _ = pipes
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
    reactor.unwatch(-1)  # a closed socket's fileno()
    assert not reactor.watching(read_end) and not reactor.watching(-1) and reactor.watched_count() == 0
    os.close(write_end)


def test_a_descriptor_number_closed_unwatched_can_be_watched_again(reactor):
    first: list[int] = []
    second: list[int] = []
    read_end, write_end = os.pipe()
    reactor.watch(read_end, select.EPOLLIN, first.append)
    os.close(read_end)  # its owner forgot to unwatch: epoll forgot it itself
    os.close(write_end)
    again, write_end = os.pipe()
    assert again == read_end  # the kernel hands the lowest free number out again
    reactor.watch(again, select.EPOLLIN, second.append)
    os.write(write_end, b"x")
    run_until(reactor, lambda: second)
    assert not first and reactor.watched_count() == 1
    reactor.unwatch(again)
    os.close(again)
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


def test_a_cancelled_timer_lets_go_of_its_callback_at_once(reactor):
    class Opening:
        def timed_out(self) -> None:
            raise AssertionError("a cancelled timer ran")

    opening = Opening()
    gone = weakref.ref(opening)
    reactor.call_later(60, opening.timed_out, on_fault=lambda _error: None).cancel()
    del opening
    assert gone() is None and reactor.pending_timers() == 1  # still in the heap, holding nothing


def test_a_timer_cancelled_after_it_ran_is_not_counted_again(reactor):
    ran: list[int] = []
    fired = [reactor.call_later(0, lambda i=i: ran.append(i)) for i in range(300)]
    reactor.run_once(max_wait=0)
    for timer in fired:
        timer.cancel()  # harmless once run: must not make the heap drop live timers
    live = reactor.call_later(0, lambda: ran.append(-1))
    reactor.run_once(max_wait=0)
    assert ran[-1] == -1 and len(ran) == 301 and live is not None


# ---------------------------------------------------------------- fault isolation


def boom(*_: object) -> None:
    raise RuntimeError("a defect in a handler")


def test_a_raising_handler_is_logged_counted_unwatched_and_the_loop_goes_on(reactor, pipes, caplog):
    (read_end, write_end), (other_read, other_write) = pipes
    served: list[int] = []
    reactor.watch(read_end, select.EPOLLIN, boom)
    reactor.watch(other_read, select.EPOLLIN, served.append)
    os.write(write_end, b"x")
    os.write(other_write, b"x")
    with caplog.at_level("ERROR", logger="fdkeeper.loop"):
        run_until(reactor, lambda: served and reactor.internal_errors)
        reactor.run_once(max_wait=0.01)  # still readable: it must not fault again
    assert reactor.internal_errors == 1
    assert not reactor.watching(read_end)
    assert reactor.watching(other_read)
    faults = [record for record in caplog.records if record.name == "fdkeeper.loop"]
    assert len(faults) == 1 and faults[0].exc_info and "a defect in a handler" in faults[0].getMessage()


def test_on_fault_gets_the_error_and_ends_what_its_owner_owns(reactor, pipes):
    (read_end, write_end), _ = pipes
    faults: list[Exception] = []

    def end_client(error: Exception) -> None:
        faults.append(error)
        reactor.unwatch(read_end)

    reactor.watch(read_end, select.EPOLLIN, boom, on_fault=end_client)
    os.write(write_end, b"x")
    run_until(reactor, lambda: faults)
    assert isinstance(faults[0], RuntimeError) and reactor.internal_errors == 1
    assert not reactor.watching(read_end)


def test_an_owner_may_keep_watching_after_a_fault(reactor, pipes):
    # a datagram socket, say: one bad datagram is lost, the socket is served on
    (read_end, write_end), _ = pipes
    calls: list[int] = []

    def fails_once(_mask: int) -> None:
        calls.append(len(os.read(read_end, 1)))
        if len(calls) == 1:
            raise RuntimeError("one bad datagram")

    reactor.watch(read_end, select.EPOLLIN, fails_once, on_fault=lambda _error: None)
    os.write(write_end, b"xy")
    run_until(reactor, lambda: len(calls) == 2)
    assert reactor.watching(read_end) and reactor.internal_errors == 1


class Owner:
    """A Watcher (loop.py) that is its own handler: events and faults go to its methods."""

    def __init__(self, fail: bool) -> None:
        self.fail, self.masks, self.faults = fail, [], []

    def on_event(self, mask: int) -> None:
        self.masks.append(mask)
        if self.fail:
            raise RuntimeError("a defect in an owner's handler")

    def on_fault(self, error: Exception) -> None:
        self.faults.append(error)


@pytest.mark.parametrize("fail", [False, True])
def test_an_object_watching_a_descriptor_gets_its_events_and_its_faults(reactor, pipes, fail):
    (read_end, write_end), _ = pipes
    owner = Owner(fail)
    reactor.watch_by(read_end, select.EPOLLIN, owner)
    os.write(write_end, b"x")
    run_until(reactor, lambda: owner.masks)
    assert owner.masks[0] & select.EPOLLIN and reactor._handlers[read_end] is owner  # nothing else kept
    assert reactor.watched_count() == 1
    assert [str(error) for error in owner.faults] == (["a defect in an owner's handler"] if fail else [])
    assert reactor.internal_errors == int(fail) and reactor.watching(read_end)  # its on_fault decided


def test_a_raising_on_fault_is_counted_too_and_the_descriptor_unwatched(reactor, pipes):
    (read_end, write_end), _ = pipes
    reactor.watch(read_end, select.EPOLLIN, boom, on_fault=boom)
    os.write(write_end, b"x")
    run_until(reactor, lambda: reactor.internal_errors)
    reactor.run_once(max_wait=0.01)
    assert reactor.internal_errors == 2
    assert not reactor.watching(read_end)


def test_a_raising_timer_is_dropped_and_later_timers_still_run(reactor):
    faults: list[Exception] = []
    ran: list[str] = []
    reactor.call_later(0.0, boom, on_fault=faults.append)
    reactor.call_later(0.0, boom)
    reactor.call_later(0.0, lambda: ran.append("after"))
    run_until(reactor, lambda: ran)
    assert reactor.internal_errors == 2 and len(faults) == 1


def test_call_every_keeps_its_schedule_when_a_call_raises(reactor):
    calls: list[int] = []

    def tick() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the first tick fails")

    reactor.call_every(0.01, tick)
    run_until(reactor, lambda: len(calls) >= 3)
    assert reactor.internal_errors == 1


def test_run_never_leaves_because_of_a_handler(reactor, pipes):
    (read_end, write_end), _ = pipes
    reactor.watch(read_end, select.EPOLLIN, boom)
    reactor.call_later(0.0, boom)
    reactor.call_later(0.1, reactor.stop)
    os.write(write_end, b"x")
    reactor.run()  # returns through stop(), not through an exception
    assert reactor.internal_errors == 2
