"""The executor of the servers' cycles: one after the other on one thread while they are quick,
each on a thread of its own as soon as one is slow.

Python runs one thread at a time. Cycles started together on threads of their own (a group of
servers is due at one moment, jobs.spread) take turns on the interpreter at every statement,
log line and lock: about ten thread switches per poll, where one after the other they need
about two, and on a virtual machine each switch costs as much CPU as a small part of a poll
(measured in bench/RESULTS.md: 10.5 against 2.0 switches per poll, 6-8 % of the daemon's CPU).

A slow or hung server must not hold up the others. A cycle still running after HANDOFF seconds
hands every cycle queued behind it to a thread of its own, and until it ends every new cycle
gets a thread of its own at once, as with APScheduler's stock pool: a slow server delays the
others by HANDOFF at most, once, however many are slow. Once no cycle is slow, the queue runs
on one thread again. The watch on a cycle's HANDOFF is armed only once another cycle waits
behind it: a cycle alone in the queue (a small instance's servers each due at its own moment)
holds up nobody, and costs no wake-up of the deadline thread (two, otherwise: to take the
watch, and when it expires).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any

from apscheduler.executors.base import run_job
from apscheduler.executors.pool import BasePoolExecutor

from reaper.daemon.pool import ThreadPool
from reaper.pg import deadlines

if TYPE_CHECKING:
    from datetime import datetime

__all__ = ["HANDOFF", "CycleExecutor"]

# How long a cycle may run before the cycles queued behind it go to threads of their own.
HANDOFF = 0.1

_Queued = tuple[Any, list["datetime"]]  # an APScheduler job and its run times


class _Running:
    """The cycle the queue's thread runs now; `slow` once it has run past HANDOFF, `watch`
    once a cycle waits behind it."""

    __slots__ = ("done", "slow", "started", "watch")

    def __init__(self) -> None:
        self.done = False
        self.slow = False
        self.started = time.monotonic()
        self.watch: deadlines.Deadline | None = None


class CycleExecutor(BasePoolExecutor):  # type: ignore[misc] # APScheduler 3 is untyped
    """APScheduler's pool executor on a `ThreadPool` (`max_workers` at most, made on demand,
    gone once idle a while), whose jobs run one after the other on one thread until one runs
    past HANDOFF (see the module). A job never overlaps itself, as with the stock executor
    (APScheduler's `max_instances`)."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(ThreadPool(max_workers, name="pg-reaper-cycle"))
        self._lock = threading.Lock()
        self._queue: deque[_Queued] = deque()
        self._draining = False  # a thread runs the queue
        self._slow = 0  # cycles running past HANDOFF: while any, each job gets its own thread
        self._running: _Running | None = None  # the queue's cycle under way

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:  # noqa: ANN401 - APScheduler's Job
        with self._lock:
            alone = self._slow > 0
            start = not alone and not self._draining
            if not alone:
                self._queue.append((job, run_times))
                self._draining = True
                if self._running is not None:
                    self._watch(self._running)  # this job waits behind it
        if alone:
            self._submit(self._run, job, run_times)
        elif start:
            self._submit(self._drain)

    def _submit(self, fn: Any, *args: Any) -> None:  # noqa: ANN401 - a callable and its arguments
        try:
            self._pool.submit(fn, *args)
        except RuntimeError:  # shut down: nothing runs any more
            with self._lock:
                self._queue.clear()
                self._draining = False

    def _drain(self) -> None:
        """Run the queue, one job after the other, until it is empty or a job was slow."""
        while True:
            with self._lock:
                if not self._queue:
                    self._draining = False
                    return
                job, run_times = self._queue.popleft()
                running = self._running = _Running()
                if self._queue:
                    self._watch(running)
            try:
                self._run(job, run_times)
            finally:
                with self._lock:
                    if running.watch is not None:
                        running.watch.cancel()
                    running.done = True
                    self._running = None
                    if running.slow:
                        self._slow -= 1
            if running.slow:
                return  # the queue went to other threads when this job turned slow

    def _watch(self, running: _Running) -> None:
        """Hand the queue on if `running` runs past HANDOFF: a job waits behind it. Under the
        lock."""
        if running.watch is None:
            left = max(0.0, running.started + HANDOFF - time.monotonic())
            running.watch = deadlines.arm(left, partial(self._hand_off, running))

    def _hand_off(self, running: _Running) -> None:
        """The queue's job has run past HANDOFF: every job queued behind it, and every job
        submitted until it ends, gets a thread of its own."""
        with self._lock:
            if running.done:
                return
            running.slow = True
            self._slow += 1
            queued = list(self._queue)
            self._queue.clear()
            self._draining = False
        for job, run_times in queued:
            self._submit(self._run, job, run_times)

    def _run(self, job: Any, run_times: list[datetime]) -> None:  # noqa: ANN401 - APScheduler's Job
        """Run one job and tell APScheduler how it went, as its pool executors do. A job may end
        before the scheduler has set its next run: the daemon's listeners set theirs through
        APScheduler's calls, which wait for that update under the scheduler's own lock."""
        try:
            events = run_job(job, job._jobstore_alias, run_times, self._logger.name)  # noqa: SLF001 - as APScheduler's own executors call it
        except BaseException as exc:  # noqa: BLE001 - APScheduler's own executors report it so
            self._run_job_error(job.id, exc, exc.__traceback__)
        else:
            self._run_job_success(job.id, events)

    def shutdown(self, wait: bool = True) -> None:  # noqa: FBT001, FBT002 - APScheduler's signature
        """Nothing queued runs after shutdown; the cycles running finish."""
        with self._lock:
            self._queue.clear()
        super().shutdown(wait)
