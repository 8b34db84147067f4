"""One job per server on an APScheduler 3 scheduler, each due when its next session would be.

After a poll, a server's next poll is due when the next of its sessions would cross a threshold,
bounded below by `min_interval` and above by `interval` and by the server's smallest threshold
(a session that turns idle just after a poll is then seen before it can be eligible). A lost
server is retried with exponential backoff from `min_interval` up to `interval`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_SUBMITTED,
    JobEvent,
    JobExecutionEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from reaper import clusters
from reaper.observe import audit
from reaper.observe.log import get_logger
from reaper.pg.connection import PostgresError
from reaper.sweep import Lock, Memory, SweepReport, connect, sweep

if TYPE_CHECKING:
    from reaper.observe.metrics import Metrics
    from reaper.pg.activity import ServerConnection
    from reaper.pg.ha import LockHolder
    from reaper.settings import ServerConfig, Settings

__all__ = ["Scheduler", "next_delay"]

# Poll a little after the computed crossing: eligibility is "age > threshold", strictly.
_PAST_THRESHOLD = 0.05
# Job threads are created on demand, so a generous bound costs nothing while idle; it must
# exceed the number of servers so that a hung server never holds up another's job.
_MIN_WORKERS = 64


def next_delay(
    report: SweepReport | None,
    *,
    interval: float,
    min_interval: float,
    smallest_threshold: float | None,
    failures: int = 0,
) -> float:
    """Seconds from the start of this poll to the next one."""
    if report is None or not report.ok:
        # The first retry after min_interval, then twice as long each time, up to interval.
        return min(interval, min_interval * 2.0 ** (min(max(failures, 1), 31) - 1))
    delay = interval
    if smallest_threshold is not None:
        delay = min(delay, smallest_threshold)
    if report.eligible_in is not None:
        delay = min(delay, report.eligible_in + _PAST_THRESHOLD)
    return max(delay, min_interval)


@dataclass
class _Worker:
    """A server's state between cycles. Only its own job touches it while it runs."""

    name: str
    settings: Settings
    conn: ServerConnection | None = None
    conn_key: tuple[Any, ...] = ()
    failures: int = 0
    state: str = "unknown"  # unknown | up | down
    last_error: str | None = None
    tried: bool = False
    polls: int = 0
    next_due: datetime | None = None  # set by a cycle, applied once the job has finished
    cycle_thread: int | None = None  # the pool thread running (or last running) the cycle
    generation: int = 0  # bumped by every reload that touches this server
    lock: threading.Lock = field(default_factory=threading.Lock)
    # [ha]: whether this instance holds the server's lock (None: not known, or no [ha]); after
    # losing it, it leaves the lock to the other instances until `lock_retry_at` (monotonic).
    leader: bool | None = None
    leader_session: int | None = None  # the connection's session that holds the lock
    lock_retry_at: float = 0.0
    lock_other: LockHolder | None = None  # the lock's holder that is not a pg-reaper instance
    # The sessions it cancelled by a policy with escalate_after (cancel-then-terminate), and the
    # episodes its `log` policies reported (each once, not at every poll).
    memory: Memory = field(default_factory=Memory)
    # One entry per cluster: the cluster its session is on, read on each new session (the
    # connection and its session count); why it is refused, if it is, and whether this cycle was.
    cluster: clusters.ClusterIdentity | None = None
    identified: tuple[object, int] | None = None
    refused: str | None = None
    refused_this_cycle: bool = False
    # Set once its first session's identity has been read (or could not be): see _identified.
    first_identity: threading.Event = field(default_factory=threading.Event)

    @property
    def server(self) -> ServerConfig:
        return next(s for s in self.settings.servers if s.name == self.name)


class Scheduler:
    """The daemon's reaping machinery: workers, their jobs, and their metrics."""

    def __init__(self, settings: Settings, *, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        # The one entry that acts on each cluster (see _one_per_cluster); under self._lock.
        self._acting: dict[clusters.ClusterIdentity, _Worker] = {}
        workers = max(_MIN_WORKERS, 2 * len(settings.servers))
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=workers)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        # The next run is set once APScheduler counts the run as finished: set from inside the
        # run, a due time already past would be refused as a second concurrent instance
        # (max_instances = 1) and the job would fall back to its interval. And it must be set
        # after APScheduler has moved the job to its trigger's next fire time: a run that ends
        # before the pool has even returned from submitting it (a refused connection takes well
        # under a millisecond) has its done-event dispatched at once, in the scheduler's thread,
        # before that update, which would overwrite the deadline with now + interval. Such a
        # run's deadline is applied on its EVENT_JOB_SUBMITTED, which comes after the update.
        self._scheduler.add_listener(self._on_job_done, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        self._scheduler.add_listener(self._on_job_submitted, EVENT_JOB_SUBMITTED)
        _quiet_apscheduler()
        self._log = get_logger()

    # lifecycle

    def start(self) -> None:
        self._metrics.configure(self._settings)
        if self._settings.ha.enabled:
            self._log.info(
                "ha_enabled",
                instance=audit.instance(),
                lock_key=self._settings.ha.lock_key,
                lock_database=self._settings.ha.lock_database,
            )
        for server in self._settings.servers:
            self._add(server)
        self._scheduler.start()

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    @property
    def ready(self) -> bool:
        """Every configured server has been tried at least once."""
        with self._lock:
            return all(w.tried for w in self._workers.values())

    def stop(self, *, timeout: float) -> int:
        """Let the cycles in flight finish (up to `timeout`), then close every connection.

        Returns how many cycles were still running (on a server that stopped answering).
        """
        self._scheduler.shutdown(wait=False)
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers.values())
        abandoned = 0
        for worker in workers:
            if worker.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    _close(worker)
                finally:
                    worker.lock.release()
            else:
                abandoned += 1
                self._log.warning("cycle_abandoned", server=worker.name, reason="shutting down")
        return abandoned

    # configuration

    def apply(self, settings: Settings) -> None:
        """Take a new, validated configuration; it applies from each server's next cycle."""
        old = self._settings
        old_names = {s.name for s in old.servers}
        new_names = {s.name for s in settings.servers}
        self._settings = settings
        self._metrics.configure(settings)
        for name in old_names - new_names:
            self._remove(name, policies=[p.name for p in old.policies_for(_find(old, name))])
        for server in settings.servers:
            if server.name not in old_names:
                self._add(server)
                continue
            with self._lock:
                worker = self._workers[server.name]
                worker.settings = settings
                worker.generation += 1
            before = _find(old, server.name)
            for policy in {p.name for p in old.policies_for(before)} - {
                p.name for p in settings.policies_for(server)
            }:
                self._metrics.forget_policy(server.name, policy)
            if old.interval_for(before) != settings.interval_for(server):
                self._scheduler.reschedule_job(
                    _job_id(server.name), trigger=_trigger(settings, server)
                )
            # New thresholds move every deadline: poll now (or, if a cycle is running, as soon
            # as it ends: see _cycle).
            self._scheduler.modify_job(_job_id(server.name), next_run_time=_now())

    def _add(self, server: ServerConfig) -> None:
        worker = _Worker(name=server.name, settings=self._settings)
        with self._lock:
            self._workers[server.name] = worker
        self._scheduler.add_job(
            self._cycle,
            trigger=_trigger(self._settings, server),
            args=[worker],
            id=_job_id(server.name),
            name=server.name,
            next_run_time=_now(),
        )

    def _remove(self, name: str, *, policies: list[str]) -> None:
        self._scheduler.remove_job(_job_id(name))
        with self._lock:
            worker = self._workers.pop(name)
        self._metrics.forget_server(name, policies=policies)

        def close_when_idle() -> None:
            with worker.lock:
                _close(worker)

        threading.Thread(target=close_when_idle, name=f"close-{name}", daemon=True).start()

    # one cycle

    def _cycle(self, worker: _Worker) -> None:
        started_wall, started = time.time(), time.monotonic()
        worker.cycle_thread = threading.get_ident()
        with worker.lock:
            settings, generation = worker.settings, worker.generation
            if worker.name not in {s.name for s in settings.servers}:
                return  # removed by a reload while this run was queued
            server = worker.server
            report = self._sweep(worker, server=server, settings=settings)
            self._cluster_cycle_ended(worker, report)
            worker.tried = True
            worker.polls += 1
        policies = settings.policies_for(server)
        if report.ok:
            self._metrics.record(
                report, policies=[p.name for p in policies], finished_at=time.time()
            )
        else:
            self._metrics.record_poll_failure(worker.name)
        self._transition(worker, report)
        self._leadership(worker, report, settings=settings, server=server)
        # A pressure policy cannot match before pressure appears, which `interval` bounds; its
        # (often short) thresholds must not make a quiet server be polled every min_interval.
        thresholds = [
            t.total_seconds() for p in policies if not p.pressure for t in p.thresholds.values()
        ]
        delay = next_delay(
            report,
            interval=settings.interval_for(server).total_seconds(),
            min_interval=settings.reaper.min_interval.total_seconds(),
            smallest_threshold=min(thresholds, default=None),
            failures=worker.failures,
        )
        due = datetime.fromtimestamp(started_wall + delay, tz=UTC)
        elapsed = time.monotonic() - started
        if elapsed > delay and report.ok:  # a failing server's timeouts are reported already
            self._log.warning(
                "cycle_overran", server=worker.name, seconds=round(elapsed, 3), due_every=delay
            )
        # A reload during this cycle made its deadline stale: poll again under the new rules.
        worker.next_due = due if worker.generation == generation else _now()

    def _on_job_done(self, event: JobExecutionEvent) -> None:
        worker = self._worker_of(event)
        # Dispatched by the pool thread that ran the cycle, after APScheduler's own update of the
        # job; from any other thread (the scheduler's), before it: see __init__.
        if worker is not None and worker.cycle_thread == threading.get_ident():
            self._apply_next_due(worker, event)

    def _on_job_submitted(self, event: JobEvent) -> None:
        worker = self._worker_of(event)
        if worker is not None:
            self._apply_next_due(worker, event)

    def _worker_of(self, event: JobEvent) -> _Worker | None:
        name = str(event.job_id).removeprefix("server:")
        with self._lock:
            return self._workers.get(name)

    def _apply_next_due(self, worker: _Worker, event: JobEvent) -> None:
        with self._lock:
            due, worker.next_due = worker.next_due, None
        if due is None:
            return
        try:
            self._scheduler.modify_job(event.job_id, next_run_time=max(due, _now()))
        except Exception:  # noqa: BLE001 - the job was removed by a reload or shutdown meanwhile
            return

    def _sweep(self, worker: _Worker, *, server: ServerConfig, settings: Settings) -> SweepReport:
        ha = settings.ha
        key = (
            server.dsn.get_secret_value(),
            server.password_file,
            settings.reaper.connect_timeout,
            settings.reaper.statement_timeout,
            # A new lock, or none: a new session (closing the old one releases its lock).
            (ha.enabled, ha.lock_key, ha.lock_database),
        )
        if worker.conn is None or worker.conn_key != key:
            _close(worker)
            worker.conn, worker.conn_key = connect(server, settings, ha=True), key
            worker.leader_session = None  # sessions are counted per connection object
        if (refused := self._one_per_cluster(worker, settings=settings)) is not None:
            return refused
        lock = None
        if ha.enabled:
            lock = Lock(
                key=ha.lock_key,
                acquire=time.monotonic() >= worker.lock_retry_at,
                held_by=worker.leader_session if worker.leader else None,
            )
        try:
            return sweep(
                worker.conn,
                server=server,
                settings=settings,
                lock=lock,
                memory=worker.memory,
            )
        except Exception as exc:  # noqa: BLE001 - a bug must not stop this server's schedule
            self._log.exception("cycle_crashed", server=worker.name)
            return SweepReport(
                server=worker.name,
                dry_run=settings.reaper.dry_run,
                duration_ms=0.0,
                error=f"internal error: {type(exc).__name__}: {exc}",
            )

    # one entry per cluster

    def _one_per_cluster(self, worker: _Worker, *, settings: Settings) -> SweepReport | None:
        """None when `worker` may act on its cluster this cycle; else its failed poll.

        Only one entry acts on a cluster (docs/configuration.md): the first in config order
        among the entries whose session is on it. An entry that acts keeps acting until its
        own next cycle, when it hands the cluster to an earlier entry that has come up on it
        meanwhile; an entry whose poll fails lets the cluster go. At start a later entry lets
        the earlier ones read their identity first. So two entries never act on one cluster in
        the same cycle, however their cycles overlap. The identity is read on every new
        session: at start, after a reconnection, and after a reload.
        """
        worker.refused_this_cycle = False
        if len(settings.servers) < 2:  # one entry is one cluster
            self._say_refused(worker, None, acting=worker.name)
            return None
        conn = worker.conn
        assert conn is not None  # noqa: S101 - _sweep opens it first
        started = time.perf_counter()
        identity = worker.cluster
        try:
            conn.connect()
            if worker.identified != (conn, conn.sessions_opened) or identity is None:
                identity = clusters.identify(conn)
                worker.identified = (conn, conn.sessions_opened)
        except PostgresError as exc:
            worker.first_identity.set()
            return self._refusal(worker, settings=settings, started=started, error=str(exc))
        order = {server.name: index for index, server in enumerate(settings.servers)}
        with self._lock:
            worker.cluster = identity
        worker.first_identity.set()
        self._wait_for_earlier_entries(worker, settings=settings)
        with self._lock:
            for key in [k for k, w in self._acting.items() if w is worker and k != identity]:
                del self._acting[key]  # its session is now on another cluster
            acting = self._acting.get(identity)
            if acting is None or acting is worker or self._workers.get(acting.name) is not acting:
                # Free, or this entry's to keep or to hand to an earlier one on the cluster.
                acting = min(
                    (
                        w
                        for w in self._workers.values()
                        if w.cluster == identity and w.name in order
                    ),
                    key=lambda w: order[w.name],
                    default=worker,
                )
                self._acting[identity] = acting
        if acting is worker:
            self._say_refused(worker, None, acting=worker.name)
            return None
        first, second = sorted((worker.name, acting.name), key=order.__getitem__)
        duplicate = clusters.Duplicate(
            first=first,
            first_index=order[first],
            second=second,
            second_index=order[second],
            identity=identity,
        )
        self._say_refused(worker, duplicate, acting=acting.name)
        worker.refused_this_cycle = True
        error = f"{duplicate.message}; only {acting.name!r} acts on it"
        return self._refusal(worker, settings=settings, started=started, error=error)

    def _wait_for_earlier_entries(self, worker: _Worker, *, settings: Settings) -> None:
        """At start (or when a reload adds several entries), all first cycles run at once: let
        the entries before this one read their identity first (bounded by the time a dead or
        hung server takes), so that a later entry never acts on a cluster before an earlier
        one could say it is on it too."""
        reaper = settings.reaper
        deadline = time.monotonic() + (
            reaper.connect_timeout.total_seconds() + reaper.statement_timeout.total_seconds() + 3
        )
        with self._lock:
            earlier = [
                w
                for s in settings.servers[: [s.name for s in settings.servers].index(worker.name)]
                if (w := self._workers.get(s.name)) is not None
            ]
        for other in earlier:
            other.first_identity.wait(max(0.0, deadline - time.monotonic()))

    def _refusal(
        self, worker: _Worker, *, settings: Settings, started: float, error: str
    ) -> SweepReport:
        """A failed poll that polled and signalled nothing."""
        return SweepReport(
            server=worker.name,
            dry_run=settings.reaper.dry_run,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
            error=error,
            leader=not settings.ha.enabled,
        )

    def _say_refused(
        self, worker: _Worker, duplicate: clusters.Duplicate | None, *, acting: str
    ) -> None:
        """One log line when an entry starts or stops being refused, not one per cycle."""
        message = None if duplicate is None else duplicate.message
        if message == worker.refused:
            return
        if duplicate is not None:
            self._log.error(
                "duplicate_cluster",
                server=worker.name,
                acting=acting,
                system_identifier=duplicate.identity.system_identifier,
                error=f"{message}; only {acting!r} acts on it, {worker.name!r} signals nothing",
            )
        elif worker.refused is not None:
            self._log.info("duplicate_cluster_resolved", server=worker.name)
        worker.refused = message

    def _cluster_cycle_ended(self, worker: _Worker, report: SweepReport) -> None:
        """An entry whose poll failed (not for being refused) lets its cluster go: the next
        entry on it takes over, and this one's identity is read again on its next session."""
        if report.ok or worker.refused_this_cycle:
            return
        with self._lock:
            for key in [k for k, w in self._acting.items() if w is worker]:
                del self._acting[key]
            worker.cluster = worker.identified = worker.refused = None

    def _transition(self, worker: _Worker, report: SweepReport) -> None:
        """One log line per change of a server's state, not one per failed cycle: the retries
        of an outage, whatever their error, are at debug level."""
        if report.ok:
            if worker.state == "down":
                self._log.info("server_recovered", server=worker.name, failures=worker.failures)
            worker.state, worker.failures, worker.last_error = "up", 0, None
            return
        worker.failures += 1
        level = self._log.debug if worker.state == "down" else self._log.error
        level("poll_failed", server=worker.name, error=report.error, failures=worker.failures)
        worker.state, worker.last_error = "down", report.error

    def _leadership(
        self, worker: _Worker, report: SweepReport, *, settings: Settings, server: ServerConfig
    ) -> None:
        """pg_reaper_leader, and one log line per change of leadership ([ha]), not per cycle.

        An instance that loses the lock (its session was lost: a DBA terminated it, the network
        or the server went away) leaves it to the others for two intervals, so that leadership
        moves rather than returning to where it failed."""
        if not settings.ha.enabled:
            worker.leader, worker.lock_other = None, None
            self._metrics.leader.labels(server=worker.name).set(1)
            return
        if report.ok:  # while the server cannot be polled, who holds its lock is not known
            self._lock_squatting(worker, report.lock_held_by_other)
        leader = report.ok and report.leader
        self._metrics.leader.labels(server=worker.name).set(1 if leader else 0)
        was = worker.leader
        fields = {"server": worker.name, "instance": audit.instance()}
        if leader and was is not True:
            self._log.info("leadership_acquired", **fields)
        elif not leader and was is True:
            hold_off = 2 * settings.interval_for(server).total_seconds()
            worker.lock_retry_at = time.monotonic() + hold_off
            reason = report.error or "the lock is no longer held by this session"
            self._log.warning(
                "leadership_lost", **fields, reason=reason, retry_in=round(hold_off, 3)
            )
        elif not leader and was is None and report.ok:
            self._log.info("leadership_standby", **fields, holder_pid=report.lock_holder)
        worker.leader = leader if report.ok or leader else None
        worker.leader_session = report.session if leader else None

    def _lock_squatting(self, worker: _Worker, other: LockHolder | None) -> None:
        """pg_reaper_lock_held_by_other, and one log line per change of the backend that holds
        the server's lock without being a pg-reaper instance ([ha], docs/ha.md), not per cycle.
        Its application and role are the server's data, chosen by whoever holds the lock: they
        are logged as fields (escaped by the renderer), never matched against anything."""
        self._metrics.lock_held_by_other.labels(server=worker.name).set(0 if other is None else 1)
        was, worker.lock_other = worker.lock_other, other
        if other == was:
            return
        fields = {"server": worker.name, "instance": audit.instance()}
        if other is not None:
            self._log.warning(
                "lock_held_by_other",
                **fields,
                holder_pid=other.pid,
                application=other.application,
                role=other.role,
            )
        elif was is not None:
            self._log.info("lock_held_by_other_ended", **fields, holder_pid=was.pid)

    # for tests and benchmarks

    def polls(self, name: str) -> int:
        with self._lock:
            worker = self._workers.get(name)
        return worker.polls if worker else 0


def _trigger(settings: Settings, server: ServerConfig) -> IntervalTrigger:
    return IntervalTrigger(seconds=settings.interval_for(server).total_seconds(), timezone=UTC)


def _job_id(name: str) -> str:
    return f"server:{name}"


def _find(settings: Settings, name: str) -> ServerConfig:
    return next(s for s in settings.servers if s.name == name)


def _now() -> datetime:
    return datetime.now(UTC)


def _close(worker: _Worker) -> None:
    if worker.conn is not None:
        worker.conn.close()
    worker.conn = None


def _quiet_apscheduler() -> None:
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
