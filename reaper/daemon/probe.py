"""The pressure fast path (docs/pressure.md): between polls, a server with pressure policies has
its connection count probed every `pressure_probe_interval` (one small statement,
reaper/pg/sql/probe.sql), and is polled at once when a policy's level is crossed that its last
poll did not see crossed. The probe never reaps: the poll it brings forward decides, on its own
counts, as at any poll.

A probe runs on the server's own connection, under the server's lock, so never beside its cycle
(a probe that finds the cycle running is skipped: the cycle sees the same). It does not run while
the server is down or not yet polled (the cycle's retries and backoff own that), nor while its
role cannot count connections (no pg_read_all_stats: pressure policies do not act), nor on an
[ha] follower (it could not act). A probe that fails changes nothing of the server's state: the
next cycle tells whether the server is down.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from apscheduler.jobstores.base import JobLookupError
from apscheduler.triggers.interval import IntervalTrigger

from reaper.pg.connection import PostgresError
from reaper.policy import Result, pressure_held

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Iterable

    from apscheduler.schedulers.base import BaseScheduler

    from reaper.daemon.ha import LeaderState
    from reaper.observe.metrics import Metrics
    from reaper.pg.activity import ServerConnection
    from reaper.settings import PolicyConfig, ServerConfig, Settings
    from reaper.sweep import SweepReport

__all__ = ["Probes"]


class Target(Protocol):
    """What a probe reads of a server's worker (reaper/daemon/worker.py `Worker`)."""

    @property
    def name(self) -> str: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def config(self) -> ServerConfig | None: ...
    @property
    def server(self) -> ServerConfig: ...
    @property
    def conn(self) -> ServerConnection | None: ...
    @property
    def state(self) -> str: ...
    @property
    def leadership(self) -> LeaderState: ...
    @property
    def lock(self) -> threading.Lock: ...


@dataclass(kw_only=True)
class _Seen:
    """What is known of one server's pressure: which policies' conditions held at the last poll
    (less those a probe has since seen calm), how many client sessions that poll left, when it
    ended, and whether the probe has already said, in this episode, that it saw pressure."""

    held: frozenset[str] = frozenset()
    # The client sessions the last poll left: those it counted less those it terminated.
    left: int | None = None
    # Whether the last poll could count connections (pg_read_all_stats): if not, pressure
    # policies do not act and there is nothing to probe for.
    countable: bool = False
    polled_at: float = 0.0  # time.monotonic()
    episode: bool = False


def pressure_policies(settings: Settings, server: ServerConfig) -> tuple[PolicyConfig, ...]:
    return tuple(p for p in settings.policies_for(server) if p.pressure)


def probes(settings: Settings, server: ServerConfig) -> bool:
    """Whether `server` is probed: it has pressure policies and its probe is not off."""
    return bool(pressure_policies(settings, server)) and bool(settings.probe_interval_for(server))


class Probes:
    """The pressure probes of the daemon's servers: one job each, beside the server's cycle job."""

    def __init__(
        self,
        scheduler: BaseScheduler,
        *,
        metrics: Metrics,
        log: Any,  # noqa: ANN401 - structlog's bound loggers are untyped proxies
        cycle_job: Callable[[str], str],
    ) -> None:
        self._scheduler = scheduler
        self._metrics = metrics
        self._log = log
        self._cycle_job = cycle_job  # the id of a server's cycle job
        self._seen: dict[str, _Seen] = {}
        self._cadence: dict[str, float] = {}  # the probe jobs there are: seconds, by server

    # the jobs

    def sync(self, settings: Settings, targets: Iterable[Target]) -> None:
        """Start, stop or reschedule each server's probe job as `settings` say; at start and
        after every reload (a reload that adds or removes pressure policies starts or stops it)."""
        wanted = {t.name: t for t in targets if probes(settings, t.server)}
        for name in set(self._cadence) - set(wanted):
            with contextlib.suppress(JobLookupError):
                self._scheduler.remove_job(_job_id(name))
            del self._cadence[name]
            self._metrics.forget_pressure_probes(name)
        for name, target in wanted.items():
            seconds = settings.probe_interval_for(target.server).total_seconds()
            self._metrics.show_pressure_probes(name)
            if self._cadence.get(name) == seconds:
                continue
            # Each server's probes at a moment of their own within the cadence: a fleet's
            # probes are spread over the second, not all started at once.
            offset = timedelta(seconds=random.uniform(0.0, seconds))  # noqa: S311 - not a secret
            trigger = IntervalTrigger(
                seconds=seconds, start_date=datetime.now(UTC) + offset, timezone=UTC
            )
            if name in self._cadence:
                self._scheduler.reschedule_job(_job_id(name), trigger=trigger)
            else:
                self._scheduler.add_job(
                    self._probe, trigger=trigger, args=[target], id=_job_id(name), name=name
                )
            self._cadence[name] = seconds
        for name in set(self._seen) - set(wanted):
            del self._seen[name]

    def forget(self, name: str) -> None:
        """The server was removed (its probe job is removed by `sync`)."""
        self._seen.pop(name, None)

    # the cycle's hook

    def polled(self, name: str, report: SweepReport) -> None:
        """What the server's cycle saw; called under the server's lock."""
        seen = self._seen.setdefault(name, _Seen())
        seen.polled_at = time.monotonic()
        if report.ok:
            seen.held = frozenset(policy for policy, held in report.pressure if held)
            if report.facts is not None:
                freed = sum(1 for o in report.outcomes if o.result is Result.TERMINATED)
                seen.left = report.facts.client_sessions - freed
                seen.countable = report.facts.sees_every_backend

    # one probe

    def _probe(self, target: Target) -> None:
        if not target.lock.acquire(blocking=False):
            return  # the server's cycle is running: it sees what the probe would
        try:
            self._probe_locked(target)
        finally:
            target.lock.release()

    def _probe_locked(self, target: Target) -> None:
        settings, conn = target.settings, target.conn
        if target.config is None or conn is None:
            return  # removed by a reload, or never connected
        if target.state != "up" or (settings.ha.enabled and target.leadership.leader is not True):
            return  # down (the cycle retries), or an [ha] follower (it could not act)
        policies = pressure_policies(settings, target.server)
        seen = self._seen.setdefault(target.name, _Seen())
        if not policies or not seen.countable:
            return  # no pressure policy; or it cannot act (docs/pressure.md), or no poll yet
        try:
            facts = conn.probe(per_role=any(p.when_role_connections_above for p in policies))
        except PostgresError as exc:
            self._metrics.pressure_probes.labels(server=target.name, outcome="error").inc()
            self._log.debug("pressure_probe_failed", server=target.name, error=str(exc))
            return
        if facts is None:
            return  # not connected: the next cycle connects
        held = frozenset(p.name for p in policies if pressure_held(p, facts))
        # A level the last poll did not see crossed; or, under pressure it saw, more sessions
        # than it left (clients keep coming: its victims did not bring the count down).
        crossed = held - seen.held
        grew = bool(held) and seen.left is not None and facts.client_sessions > seen.left
        if not crossed and not grew:
            # Nothing the last poll did not see: that poll's schedule stands. A level that is
            # no longer crossed is forgotten, so that crossing it again brings a poll.
            seen.held &= held
            seen.episode = seen.episode and bool(held)
            outcome = "pressure" if held else "calm"
            self._metrics.pressure_probes.labels(server=target.name, outcome=outcome).inc()
            return
        self._metrics.pressure_probes.labels(server=target.name, outcome="poll").inc()
        # No sooner than min_interval after the last poll: a count that hovers at a level
        # brings at most a poll per min_interval, as deadlines do.
        wait = settings.reaper.min_interval.total_seconds() - (time.monotonic() - seen.polled_at)
        self._poll_no_later_than(target.name, datetime.now(UTC) + timedelta(seconds=wait))
        if not seen.episode:  # once per episode, not at every probe until the poll
            seen.episode = True
            self._log.info(
                "pressure_probed",
                server=target.name,
                policies=sorted(crossed or held),
                connections=facts.client_sessions,
                usable=facts.usable_connections,
            )

    def _poll_no_later_than(self, name: str, due: datetime) -> None:
        """Bring the server's next cycle forward to `due` (or now, if that has passed), as a
        reload does; a cycle due sooner stays as it is."""
        job_id = self._cycle_job(name)
        job = self._scheduler.get_job(job_id)
        if job is None or (job.next_run_time is not None and job.next_run_time <= due):
            return
        with contextlib.suppress(JobLookupError):  # removed by a reload meanwhile
            self._scheduler.modify_job(job_id, next_run_time=max(due, datetime.now(UTC)))


def _job_id(name: str) -> str:
    return f"probe:{name}"
