"""The daemon's glue to APScheduler 3: job ids, triggers, due times, first runs spread over a
fleet, and APScheduler's own log lines turned into pg-reaper's events."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apscheduler.executors.base import run_job
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.triggers.interval import IntervalTrigger

from reaper.observe.log import get_logger
from reaper.pg import deadlines

if TYPE_CHECKING:
    from reaper.settings import ServerConfig, Settings

__all__ = ["GroupExecutor", "job_id", "now", "quiet_apscheduler", "spread", "trigger"]

# The first runs (and the runs a reload asks for) of many servers are spread this far apart at
# most, over one interval at most: all due at once, each would take a thread of its own
# (threads are kept once made, a few hundred kB each) and they would stay bunched. They go in
# small groups, each due at one moment: one wake-up of the scheduler dispatches a whole group,
# and a quiet server's job keeps its phase, so the groups stay.
_FIRST_RUN_SPACING = 0.01
_GROUP = 10


def trigger(settings: Settings, server: ServerConfig) -> IntervalTrigger:
    return IntervalTrigger(seconds=settings.interval_for(server).total_seconds(), timezone=UTC)


def job_id(name: str) -> str:
    return f"server:{name}"


def now(after: float = 0.0) -> datetime:
    return datetime.fromtimestamp(time.time() + after, tz=UTC)


def spread(settings: Settings) -> dict[str, float]:
    """Seconds from now to each server's first run, in groups of _GROUP: _FIRST_RUN_SPACING
    apart on average, or closer so that the last is due within the shortest interval."""
    servers = settings.servers
    if not servers:
        return {}
    shortest = min(settings.interval_for(s).total_seconds() for s in servers)
    step = min(_FIRST_RUN_SPACING, shortest / len(servers))
    return {server.name: (i // _GROUP) * _GROUP * step for i, server in enumerate(servers)}


# A job of a group that runs longer than this (a slow or hung server) hands the jobs queued
# behind it to another thread: it delays them by this much at most.
HANDOFF = 0.1


class GroupExecutor(ThreadPoolExecutor):  # type: ignore[misc]  # APScheduler is untyped
    """APScheduler's pool of threads, except that the jobs submitted together (a group of
    servers due at one moment, `spread`) run one after the other on one pool thread: one thread
    wakes for the group instead of one per job, and the GIL is not handed around between them
    (each wake-up costs as much CPU as a small poll on a virtual machine). A job that runs longer
    than HANDOFF hands the rest to another pool thread, so a slow or hung server delays the
    others by HANDOFF at most; a job never overlaps itself, as with the stock executor."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers)
        self._queued: deque[tuple[Any, list[datetime]]] = deque()
        self._queue_lock = threading.Lock()
        self._draining = 0  # pool threads running queued jobs now

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:  # noqa: ANN401 - APScheduler's Job
        with self._queue_lock:
            self._queued.append((job, run_times))
            if self._draining:
                return  # a thread runs the queue: this job waits for the one before it
            self._draining += 1
        self._start_draining()

    def _start_draining(self) -> None:
        try:
            self._pool.submit(self._drain)
        except RuntimeError:  # the pool is shut down: nothing runs any more
            with self._queue_lock:
                self._draining -= 1

    def _drain(self) -> None:
        while True:
            with self._queue_lock:
                if not self._queued:
                    self._draining -= 1
                    return
                job, run_times = self._queued.popleft()
            events: list[Any] | None = None
            error: BaseException | None = None
            handoff = deadlines.arm(HANDOFF, self._hand_off)
            try:
                events = run_job(job, job._jobstore_alias, run_times, self._logger.name)  # noqa: SLF001 - as APScheduler's own executors call it
            except BaseException as exc:  # noqa: BLE001 - APScheduler's own executors report it so
                error = exc
            finally:
                handoff.cancel()
            # The job's end is told once the scheduler has set the job's next run (it does so
            # right after submitting it, under this lock): the daemon's listeners set a run of
            # their own after that (scheduler.py), which APScheduler's would otherwise overwrite.
            with self._scheduler._jobstores_lock:  # noqa: SLF001 - APScheduler's own lock
                pass
            if error is not None:
                self._run_job_error(job.id, error, error.__traceback__)
            else:
                self._run_job_success(job.id, events)

    def _hand_off(self) -> None:
        """The job running now is slow: another thread takes the queue."""
        with self._queue_lock:
            if not self._queued:
                return
            self._draining += 1
        self._start_draining()


def quiet_apscheduler() -> None:
    """APScheduler logs every run at INFO, and every run skipped because the previous one is
    still busy at WARNING: both are the scheduler doing its job (overruns and failures are
    reported as pg-reaper's own events). Keep only its errors, as events."""
    logger = logging.getLogger("apscheduler")
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    if not any(isinstance(h, _ToStructlog) for h in logger.handlers):
        logger.addHandler(_ToStructlog())


class _ToStructlog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        get_logger().error("scheduler", message=record.getMessage())
