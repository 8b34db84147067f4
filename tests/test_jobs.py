"""The daemon's APScheduler glue (reaper/daemon/jobs.py): jobs due together run one after the
other on one thread, and a slow one hands the rest to another thread after HANDOFF."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime, timedelta

from apscheduler.events import EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler

from reaper.daemon.jobs import HANDOFF, GroupExecutor
from tests.servers import wait_for


class Runs:
    """What each job saw: its thread, its start and its end (time.monotonic())."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[str, tuple[int, float, float]] = {}
        self.told: list[str] = []  # EVENT_JOB_EXECUTED, in order

    def job(self, name: str, seconds: float) -> None:
        started = time.monotonic()
        time.sleep(seconds)
        with self.lock:
            self.seen[name] = (threading.get_ident(), started, time.monotonic())

    def executed(self, event: JobExecutionEvent) -> None:
        with self.lock:
            self.told.append(str(event.job_id))


def run_group(durations: dict[str, float]) -> Runs:
    """Every job of `durations` due at one moment, on a GroupExecutor."""
    runs = Runs()
    scheduler = BackgroundScheduler(
        executors={"default": GroupExecutor(max_workers=8)}, timezone=UTC
    )
    scheduler.add_listener(runs.executed, EVENT_JOB_EXECUTED)
    at = datetime.now(UTC) + timedelta(seconds=0.3)
    for name, seconds in durations.items():
        scheduler.add_job(runs.job, "date", run_date=at, args=[name, seconds], id=name)
    scheduler.start()
    try:
        wait_for(lambda: len(runs.told) == len(durations), timeout=10, what="every job run")
    finally:
        scheduler.shutdown(wait=True)
    return runs


def test_jobs_due_together_run_one_after_the_other_on_one_thread() -> None:
    runs = run_group({f"j{i}": 0.01 for i in range(6)})
    threads = {thread for thread, _, _ in runs.seen.values()}
    assert len(threads) == 1
    spans = sorted((start, end) for _, start, end in runs.seen.values())
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans))
    assert sorted(runs.told) == sorted(runs.seen)


def test_a_slow_job_hands_the_jobs_behind_it_to_another_thread_after_the_handoff() -> None:
    # Jobs due at one moment run in the order of their ids: the slow one first.
    runs = run_group({"a-slow": 1.0, "b": 0.01, "c": 0.01, "d": 0.01})
    slow_thread, slow_start, slow_end = runs.seen["a-slow"]
    for name in ("b", "c", "d"):
        thread, start, _ = runs.seen[name]
        assert start > slow_start, name
        assert thread != slow_thread, name
        assert start - slow_start < HANDOFF + 0.3, name  # not after the slow job's second
        assert start < slow_end, name
