"""One job per server on an APScheduler 3 scheduler, each due when its next session would be
(reaper/daemon/cadence.py says when). A job's cycle sweeps its server, if its entry may act on
the server's cluster (arbiter.py), under the server's [ha] lock (ha.py); the job then accounts
for the cycle (metrics, the server's state) and sets its next run.
"""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_SUBMITTED,
    JobEvent,
    JobExecutionEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from reaper.daemon import ha
from reaper.daemon.arbiter import ClusterArbiter
from reaper.daemon.armed import ArmedSignals
from reaper.daemon.cadence import delay_for
from reaper.daemon.executor import CycleExecutor
from reaper.daemon.follow import FollowerRound
from reaper.daemon.jobs import first_runs, job_id, now, quiet_apscheduler, trigger
from reaper.daemon.probe import Probes
from reaper.daemon.worker import Worker
from reaper.observe.log import get_logger
from reaper.pg.connection import PostgresError
from reaper.pg.ha import probe as ha_probe
from reaper.sweep import SweepReport, connect, sweep

if TYPE_CHECKING:
    from reaper.daemon.balance import Balance
    from reaper.observe.audit import AuditSink
    from reaper.observe.metrics import Metrics
    from reaper.observe.notifications import Notifications
    from reaper.pg.activity import ServerConnection
    from reaper.settings import ServerConfig, Settings

__all__ = ["Scheduler"]

# Job threads are created on demand, so a generous bound costs nothing while idle; it must
# exceed the number of servers so that a hung server never holds up another's job.
_MIN_WORKERS = 64
# A next run this close to the one its job's trigger has set already is left as it is (most
# cycles of a quiet server end due one interval after they started, which is the trigger's).
_SAME_DUE = 0.005
_CYCLES = "cycles"  # the executor of the servers' cycle jobs


class Scheduler:
    """The daemon's reaping machinery: workers, their jobs, and their metrics."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics,
        audit: AuditSink | None = None,
        notifications: Notifications | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._audit = audit
        self._notifications = notifications
        self._workers: dict[str, Worker] = {}
        self._lock = threading.Lock()
        # The servers' cycles, one after the other while they are quick (executor.py); and
        # per server its armed timer's firing (which waits for the cycle) and its pressure
        # probe, with the [ha] rounds.
        servers = len(settings.servers)
        self._scheduler = BackgroundScheduler(
            executors={
                "default": ThreadPoolExecutor(max_workers=max(_MIN_WORKERS, 2 * servers)),
                _CYCLES: CycleExecutor(max_workers=max(_MIN_WORKERS, servers)),
            },
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
        quiet_apscheduler()
        self._log = get_logger()
        self._arbiter = ClusterArbiter(log=self._log)
        # The pressure fast path: a probe job beside the cycle job of each server with pressure
        # policies (probe.py).
        self._probes = Probes(self._scheduler, metrics=metrics, log=self._log, cycle_job=job_id)
        # [ha]: the servers this instance steadily follows, probed in rounds (follow.py).
        self._round = FollowerRound(run=self._run_parked, wake=self._wake)
        self._armed = ArmedSignals(
            self._scheduler,
            metrics=metrics,
            audit=audit,
            notifications=notifications,
            poll_within=self._poll_within,
        )

    # lifecycle

    def start(self) -> None:
        self._metrics.configure(self._settings)
        ha.announce(self._settings, log=self._log)
        first = first_runs(self._settings)
        for server in self._settings.servers:
            self._add(server, at=first[server.name])
        self._probes.sync(self._settings, self._targets())
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
        self._round.cancel()
        self._armed.cancel_all()
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers.values())
        abandoned = 0
        for worker in workers:
            if worker.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    worker.close()
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
        first = first_runs(settings)
        for server in settings.servers:
            if server.name not in old_names:
                self._add(server, at=first[server.name])
                continue
            with self._lock:
                worker = self._workers[server.name]
                worker.settings = settings
                worker.generation += 1
                worker.park_at = None
            self._round.unpark(server.name)  # its own job resumes below
            before = _find(old, server.name)
            for policy in {p.name for p in old.policies_for(before)} - {
                p.name for p in settings.policies_for(server)
            }:
                self._metrics.forget_policy(server.name, policy)
            if old.interval_for(before) != settings.interval_for(server):
                self._scheduler.reschedule_job(
                    job_id(server.name), trigger=trigger(settings, server)
                )
            # New thresholds move every deadline: poll now (or, if a cycle is running, as soon
            # as it ends: see _cycle), which arms anew; the servers of a fleet a few
            # milliseconds apart.
            self._armed.cancel(server.name)
            self._scheduler.modify_job(job_id(server.name), next_run_time=first[server.name])
        self._probes.sync(settings, self._targets())

    def _add(self, server: ServerConfig, *, at: datetime) -> None:
        worker = Worker(
            name=server.name,
            settings=self._settings,
            seat=self._arbiter.seat(server.name),
            leadership=ha.LeaderState(server=server.name, metrics=self._metrics, log=self._log),
        )
        with self._lock:
            self._workers[server.name] = worker
        self._scheduler.add_job(
            self._cycle,
            trigger=trigger(self._settings, server),
            args=[worker],
            id=job_id(server.name),
            name=server.name,
            executor=_CYCLES,
            next_run_time=at,
        )

    def _remove(self, name: str, *, policies: list[str]) -> None:
        self._scheduler.remove_job(job_id(name))
        self._round.unpark(name)
        with self._lock:
            worker = self._workers.pop(name)
        worker.removed = True  # before the cancel, which waits for an arming in progress
        self._armed.cancel(name)
        self._arbiter.unseat(name)
        self._metrics.forget_server(name, policies=policies)
        self._probes.forget(name)

        def close_when_idle() -> None:
            with worker.lock:
                worker.close()

        threading.Thread(target=close_when_idle, name=f"close-{name}", daemon=True).start()

    # one cycle

    def _cycle(self, worker: Worker) -> None:
        started_wall, started = time.time(), time.monotonic()
        worker.cycle_thread = threading.get_ident()
        with worker.lock:
            settings, generation = worker.settings, worker.generation
            if worker.config is None:
                return  # removed by a reload while this run was queued
            server = worker.server
            worker.poll_by = None
            report = self._sweep(worker, server=server, settings=settings)
            # Armed signals: this poll's set replaces the last one's (none unless it may signal).
            report = self._armed.arm(worker, report, settings=settings, server=server)
            self._probes.polled(worker.name, report)
            self._arbiter.cycle_ended(worker.seat, ok=report.ok)
            worker.tried = True
            worker.polls += 1
        policies = settings.policies_for(server)
        if report.probe_only:  # [ha]: a follower's probe
            self._metrics.record_probe(worker.name, finished_at=time.time())
        elif report.ok:
            self._metrics.record(
                report, policies=[p.name for p in policies], finished_at=time.time()
            )
            if self._notifications is not None:
                self._notifications.submit(report)  # only queued: never waits
        else:
            self._metrics.record_poll_failure(worker.name)
        self._transition(worker, report)
        worker.leadership.cycle_ended(report, settings=settings, server=server)
        delay = delay_for(report, settings=settings, server=server, failures=worker.failures)
        delay = worker.leadership.cadence(delay, report, settings=settings)
        due = datetime.fromtimestamp(started_wall + delay, tz=UTC)
        elapsed = time.monotonic() - started
        if elapsed > delay and report.ok:  # a failing server's timeouts are reported already
            self._log.warning(
                "cycle_overran", server=worker.name, seconds=round(elapsed, 3), due_every=delay
            )
        # A reload during this cycle made its deadline stale: poll again under the new rules.
        # A full interval (an [ha] follower's probe, a quiet server) is the job's own trigger:
        # no rescheduling; a steady follower's next probe goes in the rounds (follow.py).
        current = worker.generation == generation
        steady = current and delay >= settings.interval_for(server).total_seconds()
        worker.next_due = None if steady else (due if current else now())
        follows = steady and report.probe_only and settings.ha.enabled and not worker.removed
        worker.park_at = started + delay if follows else None

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

    def _worker_of(self, event: JobEvent) -> Worker | None:
        name = str(event.job_id).removeprefix("server:")
        with self._lock:
            return self._workers.get(name)

    def _apply_next_due(self, worker: Worker, event: JobEvent) -> None:
        with self._lock:
            due, worker.next_due = worker.next_due, None
            park_at, worker.park_at = worker.park_at, None
            if due is not None and worker.poll_by is not None:
                due = min(due, worker.poll_by)
        if park_at is not None:
            self._park(worker, at=park_at)
            return
        if due is None:
            return
        job = self._scheduler.get_job(event.job_id)
        if job is None:
            return  # removed by a reload or shutdown meanwhile
        planned = job.next_run_time
        if planned is not None and abs((due - planned).total_seconds()) <= _SAME_DUE:
            return  # its trigger's next run already: a change would only wake the scheduler
        try:
            self._scheduler.modify_job(event.job_id, next_run_time=max(due, now()))
        except Exception:  # noqa: BLE001 - the job was removed by a reload or shutdown meanwhile
            return

    # [ha] followers in rounds (follow.py)

    def _park(self, worker: Worker, *, at: float) -> None:
        """Pause the server's own job and probe it in the rounds from `at` on."""
        try:
            self._scheduler.pause_job(job_id(worker.name))
        except JobLookupError:
            return  # removed by a reload or shutdown meanwhile
        balance = worker.leadership.balance
        if balance is None:
            return
        worker.steady = None  # its first probe in the rounds is judged as a cycle would
        self._round.park(worker, due=at, every=balance.follow_every)

    def _run_parked(self, worker: Worker) -> float | None:
        """A parked server's probe, run by a round: its cycle's first statement, the lock probe,
        and nothing else while it finds the server as the last cycle left it (this instance
        follows, nothing changing hands). Returns the seconds in which the next is due (a
        follower's probe period, balance.py); None, for anything else (a failure, a new
        session, leadership moving), resumes the server's own job, whose cycle looks again and
        accounts for it."""
        with worker.lock:
            balance = worker.leadership.balance
            if balance is None or not self._still_steady(worker, balance):
                return None
            worker.polls += 1
        self._metrics.record_probe(worker.name, finished_at=time.time())
        return balance.follow_every

    def _still_steady(self, worker: Worker, balance: Balance) -> bool:
        """Whether a probe finds `worker`'s server as a steady follower left it. An answer
        equal to the last one judged steady (on the same session, save the members' ages) is
        judged the same without being read, until a hold-off or a retirement ends; any other is
        read and judged as a cycle would. Under the worker's lock."""
        conn, settings = worker.conn, worker.settings
        if conn is None or worker.config is None or worker.removed or not settings.ha.enabled:
            return False
        session = conn.sessions_opened
        seen = ha_probe(conn, settings.ha.lock_key, membership=balance.membership)
        if seen is None:
            return False  # no session, or a failure: its own cycle says which
        probed_at = time.monotonic()
        steady = worker.steady
        if steady is not None and steady[0] == session and seen.same(steady[1]):
            return probed_at < worker.steady_until
        worker.steady = None
        lock = worker.leadership.lock(settings)
        try:
            judged = None if lock is None else lock.judge(conn, seen.leadership())
        except PostgresError:
            judged = None
        if (
            judged is None
            or judged.leader
            or judged.holder is None
            or balance.settling
            or judged.other != worker.leadership.other
            or conn.sessions_opened != session
        ):
            return False
        worker.steady = (session, seen)
        worker.steady_until = worker.leadership.decided_until(probed_at)
        return True

    def _wake(self, worker: Worker) -> None:
        """Resume a server's own job at once: its probe in a round found something for its
        cycle to look at. (A parked server has no due time of its own to apply: the cycle that
        parked it handed its next one to the round, and whatever asks for a poll unparks it.)"""
        with contextlib.suppress(JobLookupError):
            self._scheduler.modify_job(job_id(worker.name), next_run_time=now())

    def _targets(self) -> list[Worker]:
        with self._lock:
            return list(self._workers.values())

    def _poll_within(self, name: str, seconds: float) -> None:
        """Poll `name` within `seconds` (for an armed signal that needs a poll to judge)."""
        when = now() + timedelta(seconds=seconds)
        with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                return
            worker.poll_by = when if worker.poll_by is None else min(worker.poll_by, when)
        if self._round.unpark(name):  # its own job is paused: resume it by then
            with contextlib.suppress(JobLookupError):
                self._scheduler.modify_job(job_id(name), next_run_time=when)
            return
        job = self._scheduler.get_job(job_id(name))
        if job is not None and job.next_run_time is not None and job.next_run_time > when:
            try:
                self._scheduler.modify_job(job_id(name), next_run_time=when)
            except Exception:  # noqa: BLE001 - removed by a reload or shutdown meanwhile
                return

    def _sweep(self, worker: Worker, *, server: ServerConfig, settings: Settings) -> SweepReport:
        conn = self._connection(worker, server=server, settings=settings)
        started = time.perf_counter()
        if (refused := self._arbiter.admit(worker.seat, conn, settings=settings)) is not None:
            # A failed poll that polled and signalled nothing.
            return SweepReport(
                server=worker.name,
                dry_run=settings.reaper.dry_run,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                error=refused,
                leader=not settings.ha.enabled,
            )
        try:
            return sweep(
                conn,
                server=server,
                settings=settings,
                lock=worker.leadership.lock(settings),
                memory=worker.memory,
                audit=self._audit,
            )
        except Exception as exc:  # noqa: BLE001 - a bug must not stop this server's schedule
            self._log.exception("cycle_crashed", server=worker.name)
            return SweepReport(
                server=worker.name,
                dry_run=settings.reaper.dry_run,
                duration_ms=0.0,
                error=f"internal error: {type(exc).__name__}: {exc}",
            )

    def _connection(
        self, worker: Worker, *, server: ServerConfig, settings: Settings
    ) -> ServerConnection:
        """The server's connection, made anew when its settings changed."""
        lock = settings.ha
        key = (
            server.dsn.get_secret_value(),
            server.password_file,
            settings.reaper.connect_timeout,
            settings.reaper.statement_timeout,
            # A new lock, or none: a new session (closing the old one releases its lock).
            (lock.enabled, lock.lock_key, lock.lock_database),
        )
        if worker.conn is None or worker.conn_key != key:
            worker.close()
            worker.conn, worker.conn_key = connect(server, settings, ha=True), key
            worker.leadership.new_connection()
        return worker.conn

    def _transition(self, worker: Worker, report: SweepReport) -> None:
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

    # for tests and benchmarks

    def polls(self, name: str) -> int:
        with self._lock:
            worker = self._workers.get(name)
        return worker.polls if worker else 0

    def parked(self) -> set[str]:
        """[ha]: the servers this instance follows and probes in rounds now."""
        return self._round.parked()

    def armed(self, name: str) -> tuple[int, float | None]:
        """How many sessions of `name` are armed now, and when the earliest is due
        (time.monotonic())."""
        return self._armed.armed(name)


def _find(settings: Settings, name: str) -> ServerConfig:
    return next(s for s in settings.servers if s.name == name)
