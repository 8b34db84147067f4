"""One cycle for one server: poll, decide, signal, and report every decision."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from reaper import audit
from reaper.activity import PostgresError, ServerConnection
from reaper.identifiers import quote_identifier
from reaper.log import get_logger
from reaper.policy import (
    Decision,
    Plan,
    Result,
    ServerFacts,
    Session,
    plan,
    pressure_held,
    seconds_until_eligible,
)

if TYPE_CHECKING:
    from reaper.settings import PolicyConfig, ServerConfig, Settings

__all__ = ["Outcome", "SweepReport", "audit_event", "connect", "sweep", "visibility_warnings"]

Mode = Literal["reap", "preview"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What became of one matched session this cycle."""

    decision: Decision
    result: Result
    detail: str | None = None

    @property
    def policy(self) -> str:
        return self.decision.policy.name if self.decision.policy else ""

    @property
    def action(self) -> str:
        return self.decision.policy.action if self.decision.policy else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepReport:
    server: str
    dry_run: bool
    duration_ms: float
    error: str | None = None
    facts: ServerFacts | None = None
    sessions: tuple[Session, ...] = ()
    outcomes: tuple[Outcome, ...] = ()
    warnings: tuple[str, ...] = ()
    # Seconds from the poll until the next session would become eligible (0: victims were
    # deferred by the cap); None when no session is on its way to any threshold.
    eligible_in: float | None = None
    # (policy, whether its connection-pressure condition held), for the policies that have one.
    pressure: tuple[tuple[str, bool], ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def failed(self) -> bool:
        """A poll failed or a signal failed: the exit code 1 of `once`."""
        return not self.ok or any(o.result.is_failure for o in self.outcomes)

    @property
    def candidates(self) -> int:
        return len(self.outcomes)

    @property
    def reaped(self) -> int:
        return sum(o.result in {Result.TERMINATED, Result.CANCELLED} for o in self.outcomes)


def connect(server: ServerConfig, settings: Settings) -> ServerConnection:
    return ServerConnection(
        dsn=server.dsn.get_secret_value(),
        password_file=server.password_file,
        connect_timeout=settings.reaper.connect_timeout,
        statement_timeout=settings.reaper.statement_timeout,
    )


def sweep(
    conn: ServerConnection,
    *,
    server: ServerConfig,
    settings: Settings,
    mode: Mode = "reap",
) -> SweepReport:
    """Run one cycle on `server`. In preview mode nothing is signalled and nothing is audited.

    A failed poll is returned as a report with `error` set, not logged here.
    """
    dry_run = settings.reaper.dry_run or mode == "preview"
    log = get_logger(server=server.name)
    started = time.perf_counter()

    def elapsed() -> float:
        return round((time.perf_counter() - started) * 1000, 1)

    try:
        snapshot = conn.poll(include_query=settings.log.include_query)
    except PostgresError as exc:  # reported by the caller: `once` per run, the daemon per change
        return SweepReport(
            server=server.name, dry_run=dry_run, duration_ms=elapsed(), error=str(exc)
        )

    warnings = visibility_warnings(snapshot.facts, snapshot.sessions)
    for warning in warnings:
        log.warning("privileges_insufficient", detail=warning)
    policies = settings.policies_for(server)
    decided = plan(snapshot.sessions, policies, reaper=settings.reaper, facts=snapshot.facts)
    outcomes = _execute(conn, decided, dry_run=dry_run)
    report = SweepReport(
        server=server.name,
        dry_run=dry_run,
        duration_ms=elapsed(),
        facts=snapshot.facts,
        sessions=snapshot.sessions,
        outcomes=outcomes,
        warnings=warnings,
        eligible_in=_eligible_in(decided, policies, settings=settings, facts=snapshot.facts),
        pressure=tuple(
            (p.name, held)
            for p in policies
            if (held := pressure_held(p, snapshot.facts)) is not None
        ),
    )
    if mode == "reap":
        for outcome in outcomes:
            audit_event(
                log,
                outcome,
                server=server.name,
                dry_run=dry_run,
                include_query=settings.log.include_query,
            )
        log.info(
            "poll_completed",
            sessions=len(report.sessions),
            candidates=report.candidates,
            reaped=report.reaped,
            deferred=len(decided.deferred),
            duration_ms=report.duration_ms,
        )
    return report


def _execute(conn: ServerConnection, decided: Plan, *, dry_run: bool) -> tuple[Outcome, ...]:
    results: dict[int, tuple[Result, str | None]] = {}
    for decision in decided.log:
        results[decision.session.pid] = (Result.LOGGED, None)
    for decision in decided.deferred:
        results[decision.session.pid] = (Result.DEFERRED, None)
    for decision in decided.denied:
        results[decision.session.pid] = (
            Result.DENIED,
            "the reaper's role may not signal this session (superuser, or no pg_signal_backend)",
        )
    if dry_run:
        results.update({d.session.pid: (Result.DRY_RUN, None) for d in decided.signal})
    else:
        for action in ("terminate", "cancel"):
            victims = [d.session for d in decided.signal if d.policy and d.policy.action == action]
            try:
                results.update(conn.signal(victims, action=action))
            except PostgresError as exc:
                results.update({v.pid: (Result.ERROR, str(exc)) for v in victims})
    return tuple(
        Outcome(decision=d, result=results[d.session.pid][0], detail=results[d.session.pid][1])
        for d in decided.candidates
    )


def _eligible_in(
    decided: Plan,
    policies: tuple[PolicyConfig, ...],
    *,
    settings: Settings,
    facts: ServerFacts,
) -> float | None:
    if decided.deferred:
        return 0.0
    times = (
        seconds_until_eligible(d.session, policies, reaper=settings.reaper, facts=facts)
        for d in decided.spared
    )
    return min((t for t in times if t is not None), default=None)


def visibility_warnings(facts: ServerFacts, sessions: tuple[Session, ...]) -> tuple[str, ...]:
    """Say plainly when the reaper's role cannot see or signal what it should."""
    warnings = []
    if not facts.superuser and not facts.read_all_stats:
        hidden = sum(s.state is None and s.user != facts.role for s in sessions)
        warnings.append(
            f"role {facts.role!r} lacks pg_read_all_stats: it cannot see the state of other "
            f"roles' sessions ({hidden} hidden now) and will never reap them; "
            f"GRANT pg_read_all_stats TO {quote_identifier(facts.role)}"
        )
    if not facts.superuser and not facts.signal_backend:
        warnings.append(
            f"role {facts.role!r} lacks pg_signal_backend: it can signal only sessions of roles "
            f"it is a member of; GRANT pg_signal_backend TO {quote_identifier(facts.role)}"
        )
    return tuple(warnings)


def audit_fields(outcome: Outcome, *, include_query: bool) -> dict[str, Any]:
    s = outcome.decision.session
    fields: dict[str, Any] = {
        "policy": outcome.policy,
        "action": outcome.action,
        "result": outcome.result.value,
        "pid": s.pid,
        "backend_start": s.backend_start.isoformat() if s.backend_start else None,
        "database": s.database,
        "user": s.user,
        "application": s.application,
        "client_addr": s.client_addr or "local",
        "state": s.state,
        "idle_seconds": _round(s.idle_seconds),
        "transaction_seconds": _round(s.transaction_seconds),
        "connection_seconds": _round(s.connection_seconds),
        "reason": outcome.decision.reason,
    }
    if outcome.detail:
        fields["detail"] = outcome.detail
    if include_query:
        fields["query"] = s.query
    return fields


def audit_event(
    log: Any,  # noqa: ANN401 - structlog's bound loggers are untyped proxies
    outcome: Outcome,
    *,
    server: str,
    dry_run: bool,
    include_query: bool,
) -> None:
    """One decision as an audit event: a log line, and a row of the audit table if there is one."""
    if outcome.result is Result.DEFERRED:
        return  # counted in poll_completed; decided again next cycle
    event = "session_reap_failed" if outcome.result in _FAILED else "session_reaped"
    level = log.warning if outcome.result.is_failure else log.info
    fields = audit_fields(outcome, include_query=include_query)
    level(event, dry_run=dry_run, **fields)
    # The same event as a row of the audit table, if there is one: only queued here.
    audit.submit(event, server=server, dry_run=dry_run, fields=fields)


_FAILED = frozenset({Result.GONE, Result.CHANGED, Result.DENIED, Result.ERROR})


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
