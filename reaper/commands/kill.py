"""`pg-reaper kill` and `unblock`: the workflow.

`kill` terminates every client session that matches the operator's filters (`victims`), in any
state, through the daemon's race-safe path (`ServerConnection.signal`) and with the daemon's
audit events; with `block` it first stops new connections to the database, then waits until
nothing uses it any more, so that DROP DATABASE or ALTER DATABASE ... RENAME succeeds right
after. `unblock` lets connections in again. What the operator sees is `kill_output`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from reaper.commands.victims import hidden_matches, select_victims
from reaper.observe.log import get_logger
from reaper.output import safe_text
from reaper.pg.connection import PostgresError
from reaper.pg.kill import allow_connections, database_blockers
from reaper.policy import CLIENT_BACKEND, HIDDEN_BACKEND, Decision, Result, Rule
from reaper.sweep import Outcome, ServerRun, SweepReport, audit_event, visibility_warnings

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from datetime import datetime, timedelta

    from reaper.commands.victims import KillTarget
    from reaper.observe.audit import AuditSink
    from reaper.pg.activity import ServerConnection, Snapshot
    from reaper.policy import ServerFacts, Session

    _Key = tuple[int, datetime | None]

__all__ = ["KILL_RULE", "KillPlan", "KillReport", "kill", "unblock"]

# Every victim of `kill` is decided by this one rule: the audit events, the table and the JSON
# of `once` then say `policy = "kill"`, `action = "terminate"` with no special case.
KILL_RULE = Rule(name="kill", action="terminate")

# Backends that go away once the client sessions of a database are terminated: a parallel
# worker ends with its leader. Any other kind (walsender, logical replication worker,
# background worker) and prepared transactions stay: kill reports them instead of waiting.
_ENDED_BY_KILL = frozenset({CLIENT_BACKEND, "parallel worker"})
_PAUSE_SECONDS = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class KillPlan:
    """What `kill` is about to do, shown to the operator before anything happens."""

    server: str
    target: KillTarget
    block: bool  # block connections to target.database first, then wait for it to empty
    dry_run: bool
    facts: ServerFacts
    sessions: tuple[Session, ...]
    victims: tuple[Session, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class KillReport(ServerRun):
    """What `kill` did on one server; `error`: the server could not be polled, or refused to
    block."""

    plan: KillPlan | None = None
    confirmed: bool = True
    blocked: bool = False  # connections to the database are blocked (by this run)
    waited_seconds: float = 0.0
    remaining: tuple[str, ...] = ()  # what still keeps the database in use (with block)
    lingering: tuple[int, ...] = ()  # pids terminated that had not exited when the wait ended

    @property
    def failed(self) -> bool:
        """Exit 1: unreachable, refused, not confirmed, a victim not signalled (denied or
        error), or a database to empty still in use."""
        return (
            self.error is not None
            or not self.confirmed
            or bool(self.remaining)
            or any(o.result.is_failure for o in self.outcomes)
        )

    def as_sweep_report(self) -> SweepReport:
        """The same shape as one `once` cycle, for its table."""
        plan = self.plan
        return SweepReport(
            server=self.server,
            dry_run=self.dry_run,
            duration_ms=self.duration_ms,
            error=self.error if plan is None else None,
            facts=plan.facts if plan else None,
            sessions=plan.sessions if plan else (),
            outcomes=self.outcomes,
            warnings=plan.warnings if plan else (),
        )


def kill(  # noqa: PLR0913 - one keyword per option of the command
    conn: ServerConnection,
    *,
    server: str,
    target: KillTarget,
    block: bool = False,
    wait: timedelta,
    dry_run: bool = False,
    include_query: bool = False,
    confirm: Callable[[KillPlan], bool] | None = None,
    audit: AuditSink | None = None,
) -> KillReport:
    """Terminate every client session on `server` that matches `target`.

    Polls, asks `confirm` (unless None or there is nothing to do), then with `block` runs
    ALTER DATABASE ... WITH ALLOW_CONNECTIONS false; signals the victims race-safely, and waits
    (at most `wait`) until they have left the server, re-polling to retry a victim that
    changed state under the signal (kill takes every state) and, with `block`, to terminate
    the stragglers that got in before the block took effect. One audit event per victim.
    """
    log = get_logger(server=server)
    started = time.perf_counter()
    failure: str | None = None
    try:
        snapshot = conn.poll(include_query=include_query)
    except PostgresError as exc:
        failure = str(exc)
    if failure is not None:  # logged outside the except: it is PostgreSQL's word, no traceback
        log.error("poll_failed", error=failure)
        return KillReport(
            server=server, dry_run=dry_run, duration_ms=_ms_since(started), error=failure
        )
    plan = _plan(snapshot, server=server, target=target, block=block, dry_run=dry_run)
    for warning in plan.warnings:
        log.warning("privileges_insufficient", detail=warning)
    if confirm is not None and (plan.victims or block) and not confirm(plan):
        return KillReport(
            server=server,
            dry_run=dry_run,
            duration_ms=_ms_since(started),
            plan=plan,
            confirmed=False,
        )
    if dry_run:
        report = _pretend(plan, log=log, include_query=include_query, sink=audit)
    else:
        report = _terminate(conn, plan, wait=wait, log=log, include_query=include_query, sink=audit)
    report = replace(report, duration_ms=_ms_since(started))
    _log_completed(log, report, plan)
    return report


def unblock(conn: ServerConnection, *, server: str, database: str) -> str | None:
    """ALTER DATABASE ... WITH ALLOW_CONNECTIONS true; the error, or None."""
    log = get_logger(server=server)
    refused = _allow_connections(conn, database, allow=True)
    if refused is not None:
        log.error("unblock_connections_failed", database=database, error=refused)
        return refused
    log.info("connections_unblocked", database=database)
    return None


def _log_completed(
    log: Any,  # noqa: ANN401 - structlog's bound loggers are untyped proxies
    report: KillReport,
    plan: KillPlan,
) -> None:
    log.info(
        "kill_completed",
        database=plan.target.database,
        blocked=report.blocked,
        dry_run=plan.dry_run,
        victims=len(report.outcomes),
        terminated=sum(o.result is Result.TERMINATED for o in report.outcomes),
        failed=sum(o.result.is_failure for o in report.outcomes),
        remaining=len(report.remaining),
        duration_ms=report.duration_ms,
    )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _plan(
    snapshot: Snapshot, *, server: str, target: KillTarget, block: bool, dry_run: bool
) -> KillPlan:
    facts, sessions = snapshot.facts, snapshot.sessions
    warnings = list(visibility_warnings(facts, sessions))
    hidden = hidden_matches(sessions, target)
    if hidden:
        warnings.append(
            f"{hidden} sessions that may match are hidden from role {facts.role!r} (no "
            "pg_read_all_stats): kill cannot terminate them"
        )
    return KillPlan(
        server=server,
        target=target,
        block=block,
        dry_run=dry_run,
        facts=facts,
        sessions=sessions,
        victims=select_victims(sessions, target, own_pid=facts.own_pid),
        warnings=tuple(warnings),
    )


def _pretend(
    plan: KillPlan,
    *,
    log: Any,  # noqa: ANN401 - structlog's bound loggers are untyped proxies
    include_query: bool,
    sink: AuditSink | None,
) -> KillReport:
    """A dry run: every victim audited as `dry_run`, nothing signalled."""
    outcomes = tuple(_outcome(v, plan, Result.DRY_RUN, None) for v in plan.victims)
    for outcome in outcomes:
        audit_event(
            log, outcome, server=plan.server, dry_run=True, include_query=include_query, sink=sink
        )
    return KillReport(server=plan.server, dry_run=True, duration_ms=0, plan=plan, outcomes=outcomes)


def _terminate(
    conn: ServerConnection,
    plan: KillPlan,
    *,
    wait: timedelta,
    log: Any,  # noqa: ANN401 - structlog's bound loggers are untyped proxies
    include_query: bool,
    sink: AuditSink | None,
) -> KillReport:
    """Block the database if asked, then signal, re-poll and wait until the victims are gone,
    nothing is left to wait for, or `wait` has passed."""
    started = time.monotonic()
    deadline = started + wait.total_seconds()
    blocked = False
    database = plan.target.database
    if plan.block and database is not None:
        refused = _allow_connections(conn, database, allow=False)
        if refused is not None:
            log.error("block_connections_failed", database=database, error=refused)
            return KillReport(
                server=plan.server, dry_run=False, duration_ms=0, plan=plan, error=refused
            )
        blocked = True
        log.warning("connections_blocked", database=database)
    audit = partial(
        audit_event,
        log,
        server=plan.server,
        dry_run=False,
        include_query=include_query,
        sink=sink,
    )
    run = _Termination(conn=conn, plan=plan, blocked=blocked, audit=audit)
    todo: Sequence[Session] = plan.victims
    while True:
        run.signal(todo)
        # Re-poll (unless the signal failed): who changed state under it, who got in before
        # the block, who has not exited yet.
        again = None if run.error is not None else run.repoll(include_query=include_query)
        if again is None or run.settled(again) or time.monotonic() >= deadline:
            break
        todo = again
        # Wait: a terminated backend takes a moment to exit, a parallel worker to follow it.
        time.sleep(_PAUSE_SECONDS)
    return run.report(waited_seconds=round(time.monotonic() - started, 3))


@dataclass(slots=True, kw_only=True)
class _Termination:
    """One `kill` while it signals, re-polls and waits: the latest outcome of each backend
    signalled, and what the last poll saw."""

    conn: ServerConnection
    plan: KillPlan
    blocked: bool
    audit: Callable[[Outcome], None]
    latest: dict[_Key, Outcome] = field(default_factory=dict)
    present: set[_Key] = field(default_factory=set)  # the backends on the server at the poll
    blockers: list[dict[str, Any]] = field(default_factory=list)  # kill_blockers.sql rows
    error: str | None = None  # a signal or a poll failed: the run ends

    def signal(self, todo: Sequence[Session]) -> None:
        """Signal `todo` race-safely and note each outcome. A victim that changed state under
        the signal is retried and audited once its outcome is final; the others now."""
        try:
            results = self.conn.signal(todo, action="terminate")
        except PostgresError as exc:
            results = {v.pid: (Result.ERROR, str(exc)) for v in todo}
            self.error = str(exc)
        for victim in todo:
            result, detail = results.get(victim.pid, (Result.ERROR, "no result"))
            outcome = _outcome(victim, self.plan, result, detail)
            self.latest[_key(victim)] = outcome
            if result is not Result.CHANGED:
                self.audit(outcome)

    def repoll(self, *, include_query: bool) -> list[Session] | None:
        """Poll again to see who is left: the sessions to signal next (None: the poll failed).

        A victim that changed state is signalled again with what it looks like now; with
        block, so is any session that got into the database before the block took effect.
        """
        plan, database = self.plan, self.plan.target.database
        try:
            snapshot = self.conn.poll(include_query=include_query)
            current = select_victims(snapshot.sessions, plan.target, own_pid=plan.facts.own_pid)
            self.blockers = (
                database_blockers(self.conn, database) if self.blocked and database else []
            )
        except PostgresError as exc:
            self.error = str(exc)
            return None
        self.present = {_key(s) for s in snapshot.sessions}
        latest = self.latest
        return [
            s
            for s in current
            if (_key(s) not in latest and self.blocked)
            or (_key(s) in latest and latest[_key(s)].result is Result.CHANGED)
        ]

    def settled(self, todo: Sequence[Session]) -> bool:
        """Nothing to signal, no victim signalled still on the server, and nothing left in the
        database that will leave by itself: no use waiting any longer."""
        waiting = [
            k
            for k, o in self.latest.items()
            if k in self.present and o.result in {Result.TERMINATED, Result.CHANGED}
        ]
        # Sessions that could not be signalled (denied, error) will not leave: no use waiting.
        stuck = {o.decision.session.pid for o in self.latest.values() if o.result.is_failure}
        leaving = [
            b for b in self.blockers if b["kind"] in _ENDED_BY_KILL and b["pid"] not in stuck
        ]
        return not todo and not waiting and not leaving

    def report(self, *, waited_seconds: float) -> KillReport:
        """The run's report; the victims still `changed` after the last retry are audited so."""
        for outcome in self.latest.values():
            if outcome.result is Result.CHANGED:
                self.audit(outcome)
        lingering = tuple(
            o.decision.session.pid
            for k, o in self.latest.items()
            if o.result is Result.TERMINATED and k in self.present
        )
        return KillReport(
            server=self.plan.server,
            dry_run=False,
            duration_ms=0,
            plan=self.plan,
            error=self.error,
            outcomes=tuple(self.latest.values()),
            blocked=self.blocked,
            waited_seconds=waited_seconds,
            remaining=_describe_blockers(self.blockers) if self.error is None else (),
            lingering=lingering,
        )


def _describe_blockers(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """What still uses the database, one line per kind, with what to do about it."""
    pids: dict[str, list[str]] = {}
    for row in rows:
        label = row["gid"] if row["kind"] == "prepared transaction" else str(row["pid"])
        pids.setdefault(row["kind"], []).append(label)
    advice = {
        CLIENT_BACKEND: "not terminated in time (see each session's result)",
        "parallel worker": "ends with its leader",
        "prepared transaction": "COMMIT PREPARED or ROLLBACK PREPARED it",
        "walsender": "logical replication from this database: stop its consumer (the "
        "subscriber, pg_recvlogical)",
        "logical replication worker": "ALTER SUBSCRIPTION ... DISABLE on this database first",
        HIDDEN_BACKEND: "hidden from the reaper's role: GRANT pg_read_all_stats to it",
    }
    lines = []
    for kind, labels in pids.items():
        what = "gid" if kind == "prepared transaction" else "pid"
        shown = ", ".join(safe_text(label, width=63) for label in labels[:10])
        more = f" and {len(labels) - 10} more" if len(labels) > 10 else ""
        hint = advice.get(kind, "not a client session: pg-reaper does not terminate it")
        lines.append(f"{len(labels)} {kind} ({what} {shown}{more}): {hint}")
    return tuple(lines)


def _allow_connections(conn: ServerConnection, database: str, *, allow: bool) -> str | None:
    """ALTER DATABASE ... ALLOW_CONNECTIONS; why PostgreSQL refused, or None."""
    try:
        allow_connections(conn, database, allow=allow)
    except PostgresError as exc:
        return str(exc)
    return None


def _outcome(session: Session, plan: KillPlan, result: Result, detail: str | None) -> Outcome:
    block = " --block-connections" if plan.block else ""
    reason = f"pg-reaper kill {plan.target.describe()}{block}"
    decision = Decision(session=session, policy=KILL_RULE, reason=reason)
    return Outcome(decision=decision, result=result, detail=detail)


def _key(session: Session) -> _Key:
    """One backend: a pid may be reused by a newer backend, its backend_start not."""
    return session.pid, session.backend_start
