"""What one cycle found and did: each matched session's outcome, the server's report, and each
outcome as an audit event (reaper/audit_event.py defines its fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reaper.audit_event import AuditEvent, AuditRecord
from reaper.policy import Decision, Result, ServerFacts, Session
from reaper.settings import default_instance_id

if TYPE_CHECKING:
    from datetime import datetime

    from reaper.observe.audit import AuditSink
    from reaper.pg.ha import LockHolder

__all__ = ["Outcome", "SweepReport", "audit_event", "audit_fields", "audit_record"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What became of one matched session this cycle."""

    decision: Decision
    result: Result
    detail: str | None = None
    # Terminated because a cancel of its policy (escalate_after) did not stop it.
    escalated: bool = False

    @property
    def policy(self) -> str:
        return self.decision.policy.name if self.decision.policy else ""

    @property
    def action(self) -> str:
        if self.escalated:
            return "terminate"
        return self.decision.policy.action if self.decision.policy else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerRun:
    """What one run of pg-reaper did on one server: a cycle (`SweepReport`) or a `kill`."""

    server: str
    dry_run: bool
    duration_ms: float
    error: str | None = None
    outcomes: tuple[Outcome, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepReport(ServerRun):
    facts: ServerFacts | None = None
    sessions: tuple[Session, ...] = ()
    warnings: tuple[str, ...] = ()
    # Seconds from the poll until the next session would become eligible (0: victims were
    # deferred by the cap); None when no session is on its way to any threshold.
    eligible_in: float | None = None
    # (policy, whether its connection-pressure condition held), for the policies that have one.
    pressure: tuple[tuple[str, bool], ...] = ()
    # [ha]: whether this instance held the server's lock at the end of the cycle (always True
    # without [ha]), and the pid of the backend that holds it.
    leader: bool = True
    lock_holder: int | None = None
    # [ha]: the holder of the lock when it is not a pg-reaper instance (lock squatting).
    lock_held_by_other: LockHolder | None = None
    session: int = 0  # the ServerConnection session of the cycle (sessions_opened)
    # The server's now() at the poll, and time.monotonic() right before the poll statement was
    # sent: what turns a server time into a local moment (armed signals).
    polled: tuple[datetime, float] | None = None
    # Seconds from the poll until the next escalation (escalate_after) is due, if one is pending.
    escalation_in: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def probe_only(self) -> bool:
        """An [ha] follower's successful cycle: the lock probe only, the server not polled."""
        return self.ok and self.facts is None

    @property
    def failed(self) -> bool:
        """A poll failed or a signal failed: the exit code 1 of `once`. A dry run (and
        `preview`) sends no signal, so none can fail: a victim it predicts `denied` (a
        superuser's session) is shown and audited as such, but fails nothing."""
        if self.dry_run:
            return not self.ok
        return not self.ok or any(o.result.is_failure for o in self.outcomes)

    @property
    def candidates(self) -> int:
        return len(self.outcomes)

    @property
    def reaped(self) -> int:
        return sum(o.result in {Result.TERMINATED, Result.CANCELLED} for o in self.outcomes)


def audit_record(outcome: Outcome, *, include_query: bool) -> AuditRecord:
    """`outcome` as the audit trail records it."""
    s = outcome.decision.session
    return AuditRecord(
        policy=outcome.policy,
        action=outcome.action,
        result=outcome.result.value,
        pid=s.pid,
        backend_start=s.backend_start,
        database=s.database,
        user=s.user,
        application=s.application,
        client_addr=s.client_addr or "local",
        state=s.state,
        idle_seconds=_round(s.idle_seconds),
        transaction_seconds=_round(s.transaction_seconds),
        connection_seconds=_round(s.connection_seconds),
        reason=outcome.decision.reason,
        escalated=outcome.escalated,
        detail=outcome.detail or None,
        query=s.query if include_query else None,
    )


def audit_fields(outcome: Outcome, *, include_query: bool) -> dict[str, Any]:
    """`outcome` as the audit log line (and `once --json`) has it."""
    return audit_record(outcome, include_query=include_query).fields(include_query=include_query)


def audit_event(
    log: Any,  # noqa: ANN401 - structlog's bound loggers are untyped proxies
    outcome: Outcome,
    *,
    server: str,
    dry_run: bool,
    include_query: bool,
    sink: AuditSink | None = None,
) -> None:
    """One decision as an audit event: a log line, and a row of the audit table if `sink` has
    one (only queued here)."""
    if outcome.result in _UNAUDITED:
        return  # counted in poll_completed; decided again next cycle (or by the leader)
    name = "session_reap_failed" if outcome.result in _FAILED else "session_reaped"
    event = AuditEvent(
        event=name,
        server=server,
        dry_run=dry_run,
        instance=default_instance_id() if sink is None else sink.instance,
        record=audit_record(outcome, include_query=include_query),
    )
    level = log.warning if outcome.result.is_failure else log.info
    fields = event.record.fields(include_query=include_query)
    level(name, dry_run=dry_run, **fields, instance=event.instance)
    if sink is not None:
        sink.submit(event)


_FAILED = frozenset({Result.GONE, Result.CHANGED, Result.DENIED, Result.ERROR})
_UNAUDITED = frozenset(
    {
        Result.DEFERRED,
        Result.NOT_LEADER,
        Result.ESCALATION_PENDING,
        Result.ALREADY_LOGGED,
        Result.NOT_DUE,
    }
)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
