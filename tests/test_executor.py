"""The executor of the servers' cycles (reaper/daemon/executor.py), on a real APScheduler: jobs due
together run one after the other on one thread; a slow one hands every job behind it to threads
of their own after HANDOFF, once however many are slow; then the queue runs on one thread again."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler

from reaper.daemon import executor
from reaper.daemon.executor import CycleExecutor
from reaper.pg import deadlines
from tests.servers import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator


class Runs:
    """What each job saw: its thread, its start and its end (time.monotonic())."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[str, tuple[int, float, float]] = {}
        self.told: dict[str, bool] = {}  # job id: whether APScheduler was told it failed
        self.started: set[str] = set()

    def job(self, name: str, seconds: float) -> None:
        started = time.monotonic()
        with self.lock:
            self.started.add(name)
        time.sleep(seconds)
        with self.lock:
            self.seen[name] = (threading.get_ident(), started, time.monotonic())
        if name.startswith("fail"):
            raise RuntimeError(name)

    def ended(self, event: JobExecutionEvent) -> None:
        with self.lock:
            self.told[str(event.job_id)] = event.exception is not None

    def threads(self, names: list[str]) -> set[int]:
        return {self.seen[name][0] for name in names}


# Longer than the real HANDOFF, so that a loaded test machine never makes a 10 ms job slow.
HANDOFF = 0.5


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[BackgroundScheduler, Runs]]:
    monkeypatch.setattr(executor, "HANDOFF", HANDOFF)
    runs = Runs()
    scheduler = BackgroundScheduler(
        executors={"default": CycleExecutor(max_workers=16)}, timezone=UTC
    )
    scheduler.add_listener(runs.ended, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    scheduler.start()
    yield scheduler, runs
    scheduler.shutdown(wait=True)


def due_together(scheduler: BackgroundScheduler, runs: Runs, durations: dict[str, float]) -> None:
    """Every job of `durations` due at one moment (they run in the order of their ids), and
    wait until APScheduler was told each one's end."""
    at = datetime.now(UTC) + timedelta(seconds=0.3)
    for name, seconds in durations.items():
        scheduler.add_job(runs.job, "date", run_date=at, args=[name, seconds], id=name)
    wait_for(lambda: set(durations) <= set(runs.told), timeout=30, what="every job told")


def test_jobs_due_together_run_one_after_the_other_on_one_thread(
    scheduler: tuple[BackgroundScheduler, Runs],
) -> None:
    sched, runs = scheduler
    names = [f"j{i}" for i in range(8)]
    due_together(sched, runs, dict.fromkeys(names, 0.01))
    assert len(runs.threads(names)) == 1
    spans = sorted(runs.seen[name][1:] for name in names)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert not any(runs.told.values())


def test_slow_jobs_hand_the_jobs_behind_them_to_threads_of_their_own_once(
    scheduler: tuple[BackgroundScheduler, Runs],
) -> None:
    sched, runs = scheduler
    slow = [f"a-slow{i}" for i in range(6)]
    quick = ["b", "c", "d"]
    due_together(sched, runs, {**dict.fromkeys(slow, 4.0), **dict.fromkeys(quick, 0.01)})
    first_start = min(runs.seen[name][1] for name in slow)
    first_end = min(runs.seen[name][2] for name in slow)
    # Handed on at the first one's HANDOFF: the other slow ones ran beside it, each on its
    # own thread, and the quick ones did not wait for six HANDOFFs (3 s), let alone 24 s.
    assert len(runs.threads(slow)) == len(slow)
    for name in slow + quick:
        assert runs.seen[name][1] < first_end, name
    for name in quick:
        assert runs.seen[name][1] - first_start < HANDOFF + 1.0, name
    # No job is slow any more: jobs due together share one thread again.
    again = [f"e{i}" for i in range(5)]
    due_together(sched, runs, dict.fromkeys(again, 0.01))
    assert len(runs.threads(again)) == 1


def test_a_failed_job_is_told_as_failed_and_the_queue_goes_on(
    scheduler: tuple[BackgroundScheduler, Runs],
) -> None:
    sched, runs = scheduler
    due_together(sched, runs, {"a": 0.01, "fail-b": 0.01, "c": 0.01})
    assert runs.told == {"a": False, "fail-b": True, "c": False}
    assert len(runs.threads(["a", "fail-b", "c"])) == 1


def test_nothing_queued_runs_after_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "HANDOFF", HANDOFF)
    runs = Runs()
    sched = BackgroundScheduler(executors={"default": CycleExecutor(max_workers=4)}, timezone=UTC)
    sched.start()
    at = datetime.now(UTC) + timedelta(seconds=0.3)
    for name in ("a", "b", "c"):  # a runs 0.2 s (not slow), b and c wait behind it
        sched.add_job(runs.job, "date", run_date=at, args=[name, 0.2], id=name)
    wait_for(lambda: "a" in runs.started, timeout=10, what="the first job running")
    sched.shutdown(wait=False)
    time.sleep(1.0)
    assert set(runs.seen) == {"a"}, "it finished, and nothing behind it ran"


def test_a_job_alone_arms_no_watch_and_one_submitted_behind_a_slow_job_is_handed_on(
    scheduler: tuple[BackgroundScheduler, Runs], monkeypatch: pytest.MonkeyPatch
) -> None:
    sched, runs = scheduler
    armed: list[float] = []
    arm = deadlines.arm

    def counted(seconds: float, action: Any) -> Any:
        armed.append(seconds)
        return arm(seconds, action)

    monkeypatch.setattr(deadlines, "arm", counted)
    due_together(sched, runs, {"alone": 0.01})
    assert [s for s in armed if s <= HANDOFF] == [], "nobody waited behind it"
    # A slow job alone, then one due while it runs: handed on at the slow one's HANDOFF, not
    # kept waiting for its end.
    at = datetime.now(UTC) + timedelta(seconds=0.3)
    sched.add_job(runs.job, "date", run_date=at, args=["a-slow", 4.0], id="a-slow")
    sched.add_job(runs.job, "date", run_date=at + timedelta(seconds=0.2), args=["b", 0.01], id="b")
    wait_for(lambda: "b" in runs.told, timeout=30, what="b told")
    assert "a-slow" not in runs.told, "b ran before the slow job ended"
    assert [s for s in armed if s <= HANDOFF], "a watch once b waited behind it"
    wait_for(lambda: "a-slow" in runs.told, timeout=30, what="a-slow told")
    assert runs.seen["b"][1] - runs.seen["a-slow"][1] < HANDOFF + 1.0
