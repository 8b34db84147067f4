"""[ha] followers probed in rounds (docs/ha.md, "What a follower costs").

A server this instance follows, steadily (no change of leadership under way), needs one probe
of its lock per interval and nothing else. Dispatched as its own job, that probe costs the
daemon more than the statement: the scheduler's wake-up, a hand-off to a pool thread and back,
the job's bookkeeping. So such a server is *parked*: its own job is paused, and a job of the
instance, the round, probes every parked server that is due (or due within half of its
interval: a probe early only makes failover sooner), one after the other, in one thread. The
servers probed together are due together after that, one interval after the round, so an
instance's rounds merge into one: it wakes once per interval for all the servers it follows.
A parked server's probe (`run`) is its cycle's first statement, the lock probe, with the same
leadership decisions; the rest of a follower's cycle changes nothing while the probe finds what
the last one found.

A probe that finds anything else (the lock taken or free, a change under way, a failure, a new
session) unparks its server: its own job resumes at once, and its cycle looks again and
accounts for it; a cycle that ends as a steady follower's parks it again. A reload that touches
the server, its removal, and an armed signal's request for a poll unpark it too. A server that stops
answering holds up the round's later servers once, for at most its connect or statement
timeout, and is unparked by that failure.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from apscheduler.jobstores.base import JobLookupError
from apscheduler.triggers.date import DateTrigger

if TYPE_CHECKING:
    from collections.abc import Callable

    from apscheduler.schedulers.base import BaseScheduler

    from reaper.daemon.worker import Worker

__all__ = ["FollowerRound"]

# A parked server due within this share of its interval goes in the round that runs now: two
# rounds less than half an interval apart become one (once, a probe that early), and the
# servers of a round are due again together, so an instance's rounds soon become one.
_EARLY = 0.5
# A round planned this close to the one already planned is that one.
_SAME = 0.001


@dataclass(kw_only=True)
class _Parked:
    worker: Worker
    due: float  # time.monotonic()
    early: float  # seconds: how early it may be probed (a share of its interval)
    running: bool = False  # its probe runs in a round now


class FollowerRound:
    """The parked servers of this instance, and the round jobs that probe them."""

    def __init__(
        self,
        scheduler: BaseScheduler,
        *,
        run: Callable[[Worker], float | None],
        wake: Callable[[Worker], None],
    ) -> None:
        # run(worker): the server's probe; returns in how many seconds from the round's start
        # it is due next if it stays parked, else None. wake(worker): resume its own job.
        self._scheduler = scheduler
        self._run, self._wake = run, wake
        self._parked: dict[str, _Parked] = {}
        self._lock = threading.Lock()
        # The round planned next: when (time.monotonic()) and its job's id. Each round is a
        # one-shot job of its own, set by the round before it or by a park: a job's next run
        # set while it runs would be overwritten by APScheduler's own update after the run.
        self._next: tuple[float, str] | None = None
        self._ids = itertools.count(1)

    def park(self, worker: Worker, *, due: float, interval: float) -> None:
        """Take `worker`'s probes into the rounds (its own job is paused by the caller)."""
        with self._lock:
            self._parked[worker.name] = _Parked(worker=worker, due=due, early=_EARLY * interval)
            self._plan()

    def unpark(self, name: str) -> bool:
        """Stop probing `name` in the rounds; whether it was parked."""
        with self._lock:
            return self._parked.pop(name, None) is not None

    def parked(self) -> set[str]:
        with self._lock:
            return set(self._parked)

    def cancel(self) -> None:
        """Shutdown: no round any more."""
        with self._lock:
            self._parked.clear()
            self._drop_planned()

    # the rounds

    def _round(self, job: str) -> None:
        now = time.monotonic()
        with self._lock:
            if self._next is not None and self._next[1] == job:
                self._next = None
            due = sorted(
                (p for p in self._parked.values() if not p.running and p.due - p.early <= now),
                key=lambda p: p.due,
            )
            for parked in due:
                parked.running = True
        for parked in due:
            try:
                again = self._run(parked.worker)
            except Exception:  # noqa: BLE001 - a bug: its own job runs the cycle, and reports it
                again = None
            with self._lock:
                parked.running = False
                if self._parked.get(parked.worker.name) is not parked:
                    continue  # unparked meanwhile (a reload, a removal, a poll asked for)
                if again is not None:
                    parked.due = now + again
                    continue
                del self._parked[parked.worker.name]
            self._wake(parked.worker)
        with self._lock:
            self._plan()

    def _plan(self) -> None:
        """A round at the earliest parked server's time, unless one is planned by then (the
        servers due soon after go in it: after one round, a follower's servers are due together).
        Under the lock."""
        waiting = [p.due for p in self._parked.values() if not p.running]
        if not waiting:
            return
        at = min(waiting)
        if self._next is not None and self._next[0] <= at + _SAME:
            return
        if not self._scheduler.running:
            return  # stopping
        self._drop_planned()
        job = f"ha:followers:{next(self._ids)}"
        self._next = (at, job)
        when = datetime.now(UTC) + timedelta(seconds=max(0.0, at - time.monotonic()))
        self._scheduler.add_job(
            self._round,
            trigger=DateTrigger(run_date=when, timezone=UTC),
            args=[job],
            id=job,
            name="ha:followers",
            misfire_grace_time=None,
        )

    def _drop_planned(self) -> None:
        if self._next is not None:
            with contextlib.suppress(JobLookupError):
                self._scheduler.remove_job(self._next[1])
            self._next = None
