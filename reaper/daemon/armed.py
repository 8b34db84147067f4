"""Armed signals (docs/semantics.md): after each cycle of a leader that may signal, one timer
per server at the moment its next armed session becomes eligible, which signals every armed
session due within a few milliseconds of it in one statement (reaper/sweep/armed.py), under the
server's worker lock and on its connection. A new poll of the server replaces its armed set; a
reload, a removed server and shutdown cancel it.

The timers are one-shot jobs on the daemon's APScheduler scheduler, each with an id of its own
(a re-armed server never waits for its previous timer's run to end).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from apscheduler.jobstores.base import JobLookupError
from apscheduler.triggers.date import DateTrigger

from reaper.daemon.cadence import poll_bound
from reaper.observe.log import get_logger
from reaper.policy import Result
from reaper.sweep import audit_event
from reaper.sweep.armed import Armed, arming, fire, reported

if TYPE_CHECKING:
    from collections.abc import Callable

    from apscheduler.schedulers.base import BaseScheduler

    from reaper.daemon.ha import LeaderState
    from reaper.observe.audit import AuditSink
    from reaper.observe.metrics import Metrics
    from reaper.observe.notifications import Notifications
    from reaper.pg.activity import ServerConnection
    from reaper.settings import ServerConfig, Settings
    from reaper.sweep import Memory, SweepReport

__all__ = ["ArmedSignals"]

# A timer fires this long after the local moment of the crossing (the server checks the age
# itself, so that early costs a re-arm, never a wrong signal); victims due within WINDOW of the
# firing go in the same statement.
MARGIN = 0.002
WINDOW = 0.005
# A victim the server found not yet due is armed again after RETRY, doubled at each try, and
# left to the polls after RETRIES tries (clocks that disagree by more than a second).
RETRY = 0.005
RETRIES = 8
# How long a firing waits for the server's cycle to end: a cycle replaces the armed set anyway.
LOCK_WAIT = 1.0
# A poll arms the sessions that cross within this many of the server's longest poll gaps (its
# `interval`, or its smallest threshold if shorter): a later crossing is armed by a later poll,
# so a fleet whose thresholds are far longer than its interval arms (and schedules) nothing.
# Two gaps, not one: a next poll that runs late never makes a crossing just after it late.
HORIZON_POLLS = 2


class Worker(Protocol):
    """What a firing needs of the scheduler's per-server worker."""

    name: str
    settings: Settings
    conn: ServerConnection | None
    lock: threading.Lock
    memory: Memory
    leadership: LeaderState
    removed: bool  # from the configuration by a reload


@dataclass(kw_only=True)
class _Set:
    """One server's armed sessions, and the timer of the earliest."""

    worker: Worker
    victims: list[Armed]
    token: int
    job: str | None = None
    tries: dict[int, int] = field(default_factory=dict)  # pid -> not_due answers so far


class ArmedSignals:
    """Every server's armed set (see the module's docstring)."""

    def __init__(
        self,
        scheduler: BaseScheduler,
        *,
        metrics: Metrics,
        audit: AuditSink | None,
        notifications: Notifications | None,
        poll_within: Callable[[str, float], None],
    ) -> None:
        self._scheduler = scheduler
        self._metrics = metrics
        self._audit = audit
        self._notifications = notifications
        self._poll_within = poll_within  # (server, seconds): poll it no later than that
        self._sets: dict[str, _Set] = {}
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._log = get_logger()

    def arm(
        self, worker: Worker, report: SweepReport, *, settings: Settings, server: ServerConfig
    ) -> SweepReport:
        """Replace `worker`'s armed set by what the cycle of `report` arms (nothing, unless it
        was the leader's and not a dry run). Called under the worker's lock. Returns `report`
        with the crossings left for the polls as its `eligible_in`."""
        horizon = HORIZON_POLLS * poll_bound(settings, server)
        armed = arming(report, server=server, settings=settings, horizon=horizon)
        with self._lock:
            had = self._sets.get(worker.name) is not None
            self._cancel(worker.name)
            if armed.victims and not worker.removed:
                self._sets[worker.name] = _Set(
                    worker=worker, victims=list(armed.victims), token=next(self._tokens)
                )
                self._schedule(worker.name)
        if had or armed.victims:
            self._metrics.armed_sessions.labels(server=worker.name).set(len(armed.victims))
        if armed.eligible_in == report.eligible_in:
            return report
        return replace(report, eligible_in=armed.eligible_in)

    def cancel(self, name: str) -> None:
        """Forget `name`'s armed set (a reload, a removed server, a lost lock)."""
        with self._lock:
            self._cancel(name)
        self._metrics.armed_sessions.labels(server=name).set(0)

    def cancel_all(self) -> None:
        with self._lock:
            for name in list(self._sets):
                self._cancel(name)

    def armed(self, name: str) -> tuple[int, float | None]:
        """How many sessions of `name` are armed, and the time.monotonic() moment of the
        earliest one's crossing (tests, benchmarks)."""
        with self._lock:
            found = self._sets.get(name)
            if found is None or not found.victims:
                return 0, None
            return len(found.victims), min(v.at for v in found.victims)

    # timers (called with self._lock held)

    def _cancel(self, name: str) -> None:
        found = self._sets.pop(name, None)
        if found is not None and found.job is not None:
            self._unschedule(found.job)

    def _unschedule(self, job: str) -> None:
        # It may have run, or be running (and will find its token stale).
        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(job)

    def _schedule(self, name: str) -> None:
        armed = self._sets[name]
        if armed.job is not None:
            self._unschedule(armed.job)
            armed.job = None
        if not armed.victims:
            del self._sets[name]
            return
        at = min(v.at for v in armed.victims) + MARGIN
        run = datetime.now(UTC) + timedelta(seconds=max(0.0, at - time.monotonic()))
        armed.job = f"armed:{name}:{armed.token}:{at:.6f}"
        if not self._scheduler.running:
            return  # stopping: nothing fires any more
        self._scheduler.add_job(
            self._fire,
            trigger=DateTrigger(run_date=run, timezone=UTC),
            args=[name, armed.token],
            id=armed.job,
            name=f"armed:{name}",
            misfire_grace_time=None,
        )

    # one firing

    def _due(self, name: str, token: int) -> tuple[Worker, list[Armed]] | None:
        """Take the victims of `name` due now out of its set, if `token` is still its set's."""
        with self._lock:
            armed = self._sets.get(name)
            if armed is None or armed.token != token:
                return None
            horizon = time.monotonic() + WINDOW
            due = [v for v in armed.victims if v.at + MARGIN <= horizon]
            armed.victims = [v for v in armed.victims if v.at + MARGIN > horizon]
            armed.job = None
            return armed.worker, due

    def _fire(self, name: str, token: int) -> None:
        with self._lock:
            armed = self._sets.get(name)
            if armed is None or armed.token != token:
                return
            worker = armed.worker
        # Never while the server's cycle runs, nor another firing. A cycle that holds the lock
        # longer arms anew when it ends (a firing's end sets the next timer itself).
        if not worker.lock.acquire(timeout=LOCK_WAIT):
            return
        try:
            taken = self._due(name, token)
            if taken is None:
                return  # a poll, a reload or shutdown came first
            _, due = taken
            report = self._signal(worker, due)
            if report is not None:
                self._account(worker, report)
                self._again(worker, token, due, report)
        finally:
            worker.lock.release()
        with self._lock:
            current = self._sets.get(name)
            if current is None or current.token != token:
                return  # replaced (its gauge set by arm), cancelled, or the server removed
            self._schedule(name)
            count = len(current.victims)
        self._metrics.armed_sessions.labels(server=name).set(count)

    def _signal(self, worker: Worker, due: list[Armed]) -> SweepReport | None:
        conn, settings = worker.conn, worker.settings
        if conn is None:  # closed: the server was removed, or the daemon is stopping
            with self._lock:
                self._cancel(worker.name)
            return None
        if not due:
            return None
        try:
            return fire(
                conn,
                due,
                server=worker.name,
                settings=settings,
                lock_key=settings.ha.lock_key if settings.ha.enabled else None,
                memory=worker.memory,
            )
        except Exception as exc:  # noqa: BLE001 - a lost session, or a bug: let a poll judge
            self._log.warning("armed_signal_failed", server=worker.name, error=str(exc))
            self.cancel(worker.name)
            self._poll_within(worker.name, 0.0)
            return None

    def _account(self, worker: Worker, report: SweepReport) -> None:
        """Audit events and metrics as a cycle's, for what the firing did."""
        log = get_logger(server=worker.name)
        shown = replace(report, outcomes=reported(report.outcomes))
        for outcome in shown.outcomes:
            audit_event(
                log,
                outcome,
                server=worker.name,
                dry_run=False,
                include_query=worker.settings.log.include_query,
                sink=self._audit,
            )
        self._metrics.record_signals(shown)
        if self._notifications is not None:
            self._notifications.submit(shown)
        counts: dict[str, int] = {}
        for outcome in report.outcomes:
            counts[outcome.result.value] = counts.get(outcome.result.value, 0) + 1
        self._metrics.armed_firings.labels(server=worker.name).inc()
        log.info(
            "armed_signals_fired",
            victims=len(report.outcomes),
            reaped=report.reaped,
            results=counts,
            duration_ms=report.duration_ms,
        )

    def _again(self, worker: Worker, token: int, due: list[Armed], report: SweepReport) -> None:
        """Arm again the victims not yet due by the server's clock; ask for a poll where one
        must judge (the cap's deferred, a pending escalation, leadership lost)."""
        results = {o.decision.session.pid: o.result for o in report.outcomes}
        if Result.NOT_LEADER in results.values():
            self.cancel(worker.name)
            self._poll_within(worker.name, 0.0)
            return
        if Result.DEFERRED in results.values():
            self._poll_within(worker.name, 0.0)
        escalation = [
            a.decision.policy.escalate_after.total_seconds()
            for a in due
            if results.get(a.pid) is Result.CANCELLED
            and a.decision.policy is not None
            and a.decision.policy.escalate_after is not None
        ]
        if escalation:
            self._poll_within(worker.name, min(escalation) + MARGIN)
        late = [a for a in due if results.get(a.pid) is Result.NOT_DUE]
        given_up = False
        with self._lock:
            armed = self._sets.get(worker.name)
            if armed is None or armed.token != token:
                return
            now = time.monotonic()
            for victim in late:
                tries = armed.tries.get(victim.pid, 0) + 1
                if tries > RETRIES:
                    given_up = True
                    continue
                armed.tries[victim.pid] = tries
                armed.victims.append(replace(victim, at=now + RETRY * 2 ** (tries - 1)))
        if given_up:
            self._poll_within(worker.name, 0.0)
