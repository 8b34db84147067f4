"""The threads of the cycles (reaper/daemon/pool.py): the most recently idle thread takes the next
job, a blocked job never holds up another, threads idle a while exit, and the pool keeps
concurrent.futures' contract (results, exceptions, shutdown)."""

from __future__ import annotations

import threading

import pytest

from reaper.daemon.pool import ThreadPool
from tests.servers import wait_for


def ident() -> int:
    return threading.get_ident()


def test_jobs_one_after_the_other_run_on_the_thread_idle_the_shortest_time() -> None:
    pool = ThreadPool(8, name="t")
    try:
        release = threading.Event()
        started = threading.Barrier(5)

        def burst() -> int:
            started.wait(timeout=10)
            release.wait(timeout=10)
            return ident()

        # five jobs at once make five threads
        futures = [pool.submit(burst) for _ in range(5)]
        release.set()
        burst_threads = {f.result(timeout=10) for f in futures}
        assert len(burst_threads) == 5
        wait_for(lambda: len(pool._idle) == 5, timeout=10, what="all five idle")
        hottest = pool._idle[-1]  # the thread that went idle last
        ran_on = []
        for _ in range(20):
            ran_on.append(pool.submit(ident).result(timeout=10))
            # back on the stack (it goes there just after it gives the result)
            wait_for(lambda: len(pool._idle) == 5, timeout=10, what="all five idle")
        assert len(set(ran_on)) == 1, "one thread ran every job"
        assert pool._idle[-1] is hottest  # and it is the same one
        assert pool.threads == 5
    finally:
        pool.shutdown()


def test_a_blocked_job_never_holds_up_another() -> None:
    pool = ThreadPool(4, name="t")
    blocked = threading.Event()
    try:
        stuck = pool.submit(blocked.wait, 30)
        assert pool.submit(lambda: 42).result(timeout=10) == 42
        assert not stuck.done()
    finally:
        blocked.set()
        pool.shutdown()
    assert stuck.result(timeout=10) is True


def test_jobs_beyond_the_bound_wait_in_order() -> None:
    pool = ThreadPool(2, name="t")
    gate = threading.Event()
    order: list[int] = []
    try:
        first = [pool.submit(gate.wait, 30) for _ in range(2)]
        later = [pool.submit(order.append, n) for n in range(5)]
        assert pool.threads == 2
        assert not any(f.done() for f in later)
        gate.set()
        for future in [*first, *later]:
            future.result(timeout=10)
        assert order == [0, 1, 2, 3, 4]
        assert pool.threads == 2
    finally:
        gate.set()
        pool.shutdown()


def test_threads_idle_a_while_exit_and_come_back_on_demand() -> None:
    pool = ThreadPool(8, name="t", idle_exit=0.05)
    try:
        gate = threading.Barrier(3)
        futures = [pool.submit(gate.wait, 10) for _ in range(3)]
        for future in futures:
            future.result(timeout=10)
        wait_for(lambda: pool.threads == 0, timeout=10, what="idle threads gone")
        assert pool.submit(lambda: "again").result(timeout=10) == "again"
    finally:
        pool.shutdown()


def test_results_exceptions_and_shutdown_follow_concurrent_futures() -> None:
    pool = ThreadPool(1, name="t")
    gate = threading.Event()

    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        pool.submit(fail).result(timeout=10)
    started = threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(30)

    running = pool.submit(hold)
    assert started.wait(10)
    queued = pool.submit(lambda: "never")  # waits: the one thread runs `hold`
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: None)
    gate.set()
    assert running.result(timeout=10) is True
    pool.shutdown(wait=True)
    assert pool.threads == 0


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        ThreadPool(0, name="t")
