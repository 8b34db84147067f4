"""The threads of the servers' cycles: made on demand, gone once idle a while.

A cycle needs a thread of its own only while a server is slow (executor.py): at start, when a
fleet's first cycles connect, and whenever a server hangs. Threads kept once made (as
`concurrent.futures.ThreadPoolExecutor` keeps them) would hold the memory of the busiest moment
for good: 518 threads for 1,000 servers after their first cycles, 149 MB. Here a thread idle
for `idle_exit` seconds exits. The thread idle the shortest time takes the next job (a stack of
idle threads), so the threads a burst made and no longer needs are the ones left idle, and go.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ThreadPool"]

_Job = tuple["Future[Any]", "Callable[..., Any]", tuple[Any, ...], dict[str, Any]]


class _Thread:
    """One thread of the pool, idle on its own lock until it is given a job (or None: exit)."""

    __slots__ = ("job", "wake")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job: _Job | None = None

    def give(self, job: _Job | None) -> None:
        self.job = job
        self.wake.release()


class ThreadPool(Executor):
    """An executor with up to `max_workers` threads, made on demand; the most recently idle
    thread runs the next job, and a thread idle for `idle_exit` seconds exits. Jobs beyond
    `max_workers` in flight wait in order. The threads are daemon threads: one blocked on a
    server that stopped answering never holds the process's exit."""

    def __init__(self, max_workers: int, *, name: str, idle_exit: float = 10.0) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max = max_workers
        self._name = name
        self._idle_exit = idle_exit
        self._lock = threading.Lock()
        self._idle: list[_Thread] = []  # a stack: the last one is the hottest
        self._threads: set[threading.Thread] = set()
        self._backlog: deque[_Job] = deque()
        self._made = 0
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:  # noqa: ANN401 - Executor's signature
        future: Future[Any] = Future()
        job: _Job = (future, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            if self._idle:
                self._idle.pop().give(job)
            elif len(self._threads) < self._max:
                self._start(job)
            else:
                self._backlog.append(job)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:  # noqa: FBT001, FBT002 - Executor's signature
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._backlog:
                    self._backlog.popleft()[0].cancel()
            while self._idle:
                self._idle.pop().give(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()

    @property
    def threads(self) -> int:
        """How many threads the pool has now."""
        with self._lock:
            return len(self._threads)

    def _start(self, job: _Job) -> None:
        self._made += 1
        slot = _Thread()
        slot.job = job
        thread = threading.Thread(
            target=self._serve, args=(slot,), name=f"{self._name}_{self._made}", daemon=True
        )
        self._threads.add(thread)
        thread.start()

    def _serve(self, slot: _Thread) -> None:
        job = slot.job
        while job is not None:
            _run(job)
            job = None
            with self._lock:
                if self._backlog:
                    job = self._backlog.popleft()
                    continue
                if self._shutdown:
                    break
                self._idle.append(slot)
            if not slot.wake.acquire(timeout=self._idle_exit):
                with self._lock:
                    if slot in self._idle:  # not given a job meanwhile: exit
                        self._idle.remove(slot)
                        break
                slot.wake.acquire()  # given one just as the wait ended: it is there
            job = slot.job
        with self._lock:
            self._threads.discard(threading.current_thread())


def _run(job: _Job) -> None:
    future, fn, args, kwargs = job
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - handed to the future, as concurrent.futures does
        future.set_exception(exc)
    else:
        future.set_result(result)
