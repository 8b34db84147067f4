"""The one thread that fires statement deadlines (reaper.pg.deadlines)."""

from __future__ import annotations

import threading
import time
from functools import partial

from reaper.pg import deadlines


def test_a_deadline_fires_once_its_time_has_come() -> None:
    fired = threading.Event()
    armed_at = time.monotonic()
    deadlines.arm(0.05, fired.set)
    assert fired.wait(timeout=10)
    assert time.monotonic() - armed_at >= 0.05


def test_a_cancelled_deadline_never_fires() -> None:
    fired = threading.Event()
    later = threading.Event()
    deadlines.arm(0.05, fired.set).cancel()
    deadlines.arm(0.1, later.set)  # fires after the cancelled one would have
    assert later.wait(timeout=10)
    assert not fired.is_set()


def test_an_earlier_deadline_armed_after_a_later_one_fires_first() -> None:
    order: list[str] = []
    done = threading.Event()

    def note(name: str) -> None:
        order.append(name)
        if len(order) == 2:
            done.set()

    late = deadlines.arm(0.6, lambda: note("late"))
    deadlines.arm(0.05, lambda: note("early"))  # must wake the thread waiting for `late`
    assert done.wait(timeout=10)
    assert order == ["early", "late"]
    assert late.cancelled  # taken when it fired: a later cancel() is a no-op


def test_many_statements_in_flight_each_get_their_own_deadline() -> None:
    fired: list[int] = []
    lock = threading.Lock()
    all_fired = threading.Event()
    keep = set(range(0, 200, 2))

    def note(i: int) -> None:
        with lock:
            fired.append(i)
            if len(fired) == len(keep):
                all_fired.set()

    armed = [deadlines.arm(0.05 + i / 2000, partial(note, i)) for i in range(200)]
    for i, deadline in enumerate(armed):
        if i not in keep:
            deadline.cancel()
    assert all_fired.wait(timeout=10)
    time.sleep(0.2)  # the last cancelled one was due 0.1 s ago: it must not have fired
    assert sorted(fired) == sorted(keep)


def test_the_watcher_sleeps_until_the_last_answered_deadline_which_never_fires() -> None:
    watch = deadlines._Watch()  # its own: no other test's statements in its heap
    fired = threading.Event()
    later = threading.Event()
    answered = watch.arm(0.3, fired.set)
    answered.cancel()  # the statement answered
    # Kept as the last entry: the watcher sleeps until its time, not until notified, so that
    # a statement sent meanwhile (a later deadline) does not wake it.
    for _ in range(100):
        if watch._until == answered.at:
            break
        time.sleep(0.01)
    assert watch._until == answered.at
    watch.arm(0.5, later.set)
    assert later.wait(timeout=10)
    assert not fired.is_set()
