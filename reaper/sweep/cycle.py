"""One cycle for one server, as a pipeline: observe (poll, and [ha] leadership), decide (the
policy engine), act (signal, or not), report (the report, its audit events and its summary)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from reaper.identifiers import quote_identifier
from reaper.observe.log import get_logger
from reaper.pg.activity import ServerConnection
from reaper.pg.connection import PostgresError
from reaper.policy import (
    Plan,
    Result,
    ServerFacts,
    Session,
    plan,
    pressure_held,
    seconds_until_eligible,
)
from reaper.sweep.act import execute
from reaper.sweep.report import Outcome, SweepReport, audit_event

if TYPE_CHECKING:
    from collections.abc import Iterable

    from reaper.observe.audit import AuditSink
    from reaper.pg.activity import Snapshot
    from reaper.pg.ha import Leadership
    from reaper.settings import PolicyConfig, ServerConfig, Settings
    from reaper.sweep.memory import Cancels, Memory

__all__ = ["HaLock", "Mode", "connect", "sweep", "visibility_warnings"]

Mode = Literal["reap", "preview"]


class HaLock(Protocol):
    """[ha] for one cycle (reaper/daemon/ha.py): the server's advisory lock, which only its
    holder may signal under; every signalling statement checks that it still holds `key`."""

    @property
    def key(self) -> int: ...

    def lead(self, conn: ServerConnection) -> Leadership:
        """Whether `conn`'s session holds the lock (taking it if it should), right after the
        poll on the same session."""
        ...


def connect(server: ServerConfig, settings: Settings, *, ha: bool = False) -> ServerConnection:
    """The reaper's session on `server`; with `ha` (the daemon under [ha] enabled) in the
    database `[ha] lock_database`, where every instance takes the same advisory lock."""
    return ServerConnection(
        dsn=server.dsn.get_secret_value(),
        password_file=server.password_file,
        connect_timeout=settings.reaper.connect_timeout,
        statement_timeout=settings.reaper.statement_timeout,
        dbname=settings.ha.lock_database if ha and settings.ha.enabled else None,
        ha=ha and settings.ha.enabled,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Cycle:
    """One cycle's givens: what every step reads."""

    server: ServerConfig
    settings: Settings
    mode: Mode
    lock: HaLock | None
    memory: Memory | None
    audit: AuditSink | None
    started: float = field(default_factory=time.perf_counter)
    policies: tuple[PolicyConfig, ...] = field(init=False)  # the server's
    log: Any = field(init=False)  # structlog's bound logger, with the server's name

    def __post_init__(self) -> None:
        object.__setattr__(self, "policies", self.settings.policies_for(self.server))
        object.__setattr__(self, "log", get_logger(server=self.server.name))

    @property
    def dry_run(self) -> bool:
        return self.settings.reaper.dry_run or self.mode == "preview"

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)


def sweep(  # noqa: PLR0913 - keyword-only, each one a collaborator of the cycle
    conn: ServerConnection,
    *,
    server: ServerConfig,
    settings: Settings,
    mode: Mode = "reap",
    lock: HaLock | None = None,
    memory: Memory | None = None,
    audit: AuditSink | None = None,
) -> SweepReport:
    """Run one cycle on `server`. In preview mode nothing is signalled and nothing is audited.

    With `lock` ([ha]) the cycle first looks at the server's advisory lock: only its holder
    polls, signals and audits; for the others the cycle ends there (a report without a poll).
    With `memory` (the daemon) victims of a policy with `escalate_after` are terminated if a
    cancel did not stop them, and a `log` policy reports each session's episode once
    (`already_logged` after).
    Audit events go to the log and to `audit`, if given. A failed poll is returned as a report
    with `error` set, not logged here.
    """
    started = time.perf_counter()
    dry_run = settings.reaper.dry_run or mode == "preview"
    try:
        # [ha]: a follower's cycle ends with this one statement, before any other work.
        leadership = None if lock is None else lock.lead(conn)
        if leadership is not None and not leadership.leader:
            return SweepReport(
                server=server.name,
                dry_run=dry_run,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                leader=False,
                lock_holder=leadership.holder,
                lock_held_by_other=leadership.other,
                session=conn.sessions_opened,
            )
        cycle = _Cycle(
            server=server,
            settings=settings,
            mode=mode,
            lock=lock,
            memory=memory,
            audit=audit,
            started=started,
        )
        seen = _observe(conn, cycle, leadership)
    except PostgresError as exc:  # reported by the caller: `once` per run, the daemon per change
        return SweepReport(
            server=server.name,
            dry_run=dry_run,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
            error=str(exc),
            leader=lock is None,
        )
    decided = _decide(seen, cycle)
    outcomes = _act(conn, decided, cycle, leader=seen.leader)
    # The signalling statement found the lock gone (the session was lost and reopened).
    leader = seen.leader and not any(o.result is Result.NOT_LEADER for o in outcomes)
    # The session: reopened, if it was, by a signal.
    report = _report(
        cycle, seen, decided=decided, outcomes=outcomes, leader=leader, session=conn.sessions_opened
    )
    if mode == "reap":
        _tell(report, cycle, deferred=len(decided.deferred) if leader else 0)
    return report


# --- observe -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Seen:
    """What a cycle found on the server."""

    snapshot: Snapshot
    leadership: Leadership | None  # [ha] only
    warnings: tuple[str, ...]  # what the reaper's role cannot see or signal

    @property
    def leader(self) -> bool:
        return self.leadership is None or self.leadership.leader


def _observe(conn: ServerConnection, cycle: _Cycle, leadership: Leadership | None) -> _Seen:
    """Poll the server, which ([ha]) this session leads."""
    # What costs the server more is read only when a policy of this server needs it: the query
    # text (shown only with [log] include_query), and the lock waits each session blocks.
    snapshot = conn.poll(
        include_query=cycle.settings.log.include_query
        or any(p.reads_queries for p in cycle.policies),
        include_blocking=any(p.when_blocking is not None for p in cycle.policies),
    )
    return _Seen(
        snapshot=snapshot,
        leadership=leadership,
        warnings=visibility_warnings(snapshot.facts, snapshot.sessions),
    )


# --- decide ------------------------------------------------------------------------------------


def _decide(seen: _Seen, cycle: _Cycle) -> Plan:
    """Say what the reaper's role cannot see or signal; decide every session's fate."""
    for warning in seen.warnings:
        cycle.log.warning("privileges_insufficient", detail=warning)
    snapshot = seen.snapshot
    decided = plan(
        snapshot.sessions, cycle.policies, reaper=cycle.settings.reaper, facts=snapshot.facts
    )
    if cycle.memory is not None:
        cycle.memory.keep_only(snapshot.sessions)
    return decided


# --- act ---------------------------------------------------------------------------------------


def _act(
    conn: ServerConnection, decided: Plan, cycle: _Cycle, *, leader: bool
) -> tuple[Outcome, ...]:
    """What becomes of every candidate: signalled (or, in a dry run, not) by the leader; left to
    the leader by the others."""
    if not leader:
        return tuple(Outcome(decision=d, result=Result.NOT_LEADER) for d in decided.candidates)
    memory = cycle.memory
    return execute(
        conn,
        decided,
        dry_run=cycle.dry_run,
        lock_key=None if cycle.lock is None else cycle.lock.key,
        cancels=None if memory is None else memory.cancels,
        logged=None if memory is None else memory.logged,
    )


# --- report ------------------------------------------------------------------------------------


def _report(
    cycle: _Cycle,
    seen: _Seen,
    *,
    decided: Plan,
    outcomes: tuple[Outcome, ...],
    leader: bool,
    session: int,
) -> SweepReport:
    facts, leadership = seen.snapshot.facts, seen.leadership
    cancels = None if cycle.memory is None else cycle.memory.cancels
    escalations = _escalations_due(outcomes, cancels)
    return SweepReport(
        server=cycle.server.name,
        dry_run=cycle.dry_run,
        duration_ms=cycle.elapsed_ms(),
        facts=facts,
        sessions=seen.snapshot.sessions,
        outcomes=outcomes,
        warnings=seen.warnings,
        eligible_in=_eligible_in(
            decided, cycle, facts=facts, leader=leader, escalations=escalations
        ),
        pressure=tuple(
            (p.name, held) for p in cycle.policies if (held := pressure_held(p, facts)) is not None
        ),
        leader=leader,
        lock_holder=None if leadership is None else leadership.holder,
        lock_held_by_other=None if leadership is None else leadership.other,
        polled=None if seen.snapshot.now is None else (seen.snapshot.now, seen.snapshot.sent),
        escalation_in=escalations,
        session=session,
    )


def _tell(report: SweepReport, cycle: _Cycle, *, deferred: int) -> None:
    """Each decision as an audit event, then one summary line for the cycle."""
    include_query = cycle.settings.log.include_query
    for outcome in report.outcomes:
        audit_event(
            cycle.log,
            outcome,
            server=report.server,
            dry_run=report.dry_run,
            include_query=include_query,
            sink=cycle.audit,
        )
    extra = {} if cycle.lock is None else {"leader": report.leader}
    cycle.log.info(
        "poll_completed",
        sessions=len(report.sessions),
        candidates=report.candidates,
        reaped=report.reaped,
        deferred=deferred,
        duration_ms=report.duration_ms,
        **extra,
    )


def _escalations_due(outcomes: Iterable[Outcome], cancels: Cancels | None) -> float | None:
    """Seconds until the next escalation of this server is due, if one is pending (a cancel of
    this cycle included)."""
    if cancels is None:
        return None
    due = [
        cancels.due_in(o.decision.session, o.decision.policy)
        for o in outcomes
        if o.result in {Result.ESCALATION_PENDING, Result.CANCELLED}
        and o.decision.policy is not None
    ]
    return min((max(0.0, d) for d in due if d is not None), default=None)


def _eligible_in(
    decided: Plan,
    cycle: _Cycle,
    *,
    facts: ServerFacts,
    leader: bool,
    escalations: float | None,
) -> float | None:
    if decided.deferred and leader:
        return 0.0
    reaper, policies = cycle.settings.reaper, cycle.policies
    times = [
        seconds_until_eligible(d.session, policies, reaper=reaper, facts=facts)
        for d in decided.spared
    ]
    times.append(escalations)
    return min((t for t in times if t is not None), default=None)


def visibility_warnings(facts: ServerFacts, sessions: tuple[Session, ...]) -> tuple[str, ...]:
    """Say plainly when the reaper's role cannot see or signal what it should."""
    warnings = []
    if not facts.superuser and not facts.read_all_stats:
        hidden = sum(s.state is None and s.user != facts.role for s in sessions)
        warnings.append(
            f"role {facts.role!r} lacks pg_read_all_stats: it cannot see the state of other "
            f"roles' sessions ({hidden} hidden now) and will never reap them, nor count "
            "connections for pressure policies; "
            f"GRANT pg_read_all_stats TO {quote_identifier(facts.role)}"
        )
    if not facts.superuser and not facts.signal_backend:
        warnings.append(
            f"role {facts.role!r} lacks pg_signal_backend: it can signal only sessions of roles "
            f"it is a member of; GRANT pg_signal_backend TO {quote_identifier(facts.role)}"
        )
    return tuple(warnings)
