"""One cycle for one server: poll, decide, signal, and report every decision."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from reaper.identifiers import quote_identifier
from reaper.observe import audit
from reaper.observe.log import get_logger
from reaper.pg.activity import ServerConnection
from reaper.pg.connection import PostgresError
from reaper.pg.ha import lead
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
    from collections.abc import Callable, Iterable
    from datetime import datetime

    from reaper.pg.ha import LockHolder
    from reaper.policy import Rule
    from reaper.settings import PolicyConfig, ServerConfig, Settings

__all__ = [
    "Cancels",
    "Lock",
    "LoggedEpisodes",
    "Memory",
    "Outcome",
    "SweepReport",
    "audit_event",
    "connect",
    "sweep",
    "visibility_warnings",
]

Mode = Literal["reap", "preview"]


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
class Lock:
    """[ha] for one cycle: the advisory lock to hold before signalling (docs/ha.md)."""

    key: int
    acquire: bool  # False while this instance lets another one take over
    # The session (ServerConnection.sessions_opened) that held the lock at the last cycle, if
    # one did: should the poll have opened another, the lock was lost with the old one, and
    # this cycle leaves it to the others.
    held_by: int | None = None


@dataclass(frozen=True, slots=True)
class _Cancelled:
    policy: str
    state_change: datetime | None  # the cancelled query's: a new query is a new story
    at: float  # time.monotonic() of the cancel


_V = TypeVar("_V")


class _PerBackend(Generic[_V]):
    """Something remembered per backend of one server between cycles. Keyed by (pid,
    backend_start): a reused pid is another session. Bounded: backends that are gone are
    forgotten at every poll, and beyond `capacity` the oldest entries are."""

    def __init__(self, *, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, datetime | None], _V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keep_only(self, sessions: Iterable[Session]) -> None:
        """Forget the backends that are no longer there."""
        present = {(s.pid, s.backend_start) for s in sessions}
        for key in [k for k in self._entries if k not in present]:
            del self._entries[key]

    def _get(self, session: Session) -> _V | None:
        return self._entries.get((session.pid, session.backend_start))

    def _put(self, session: Session, value: _V) -> None:
        """Note `value` for `session`, as the newest entry."""
        key = (session.pid, session.backend_start)
        self._entries.pop(key, None)
        self._entries[key] = value
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def forget(self, session: Session) -> None:
        self._entries.pop((session.pid, session.backend_start), None)


class Cancels(_PerBackend[_Cancelled]):
    """The sessions of one server cancelled by a policy with `escalate_after`, for the daemon to
    terminate those still running the same query that long after (cancel-then-terminate)."""

    def __init__(
        self, *, capacity: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(capacity=capacity)
        self.clock = clock

    def remember(self, session: Session, *, policy: str) -> None:
        self._put(session, _Cancelled(policy, session.state_change, self.clock()))

    def due_in(self, session: Session, policy: Rule) -> float | None:
        """Seconds until `session`, cancelled by `policy` and still running the same query,
        is to be terminated (0 or less: now); None if it was not cancelled for this query."""
        entry = self._get(session)
        if (
            entry is None
            or policy.escalate_after is None
            or entry.policy != policy.name
            or entry.state_change != session.state_change
        ):
            return None
        return policy.escalate_after.total_seconds() - (self.clock() - entry.at)


class LoggedEpisodes(_PerBackend[tuple[str, "datetime | None"]]):
    """The sessions a `log` policy has reported on one server, so that the daemon reports each
    episode once: the same backend, in its state since the same state_change, matched by the
    same policy. A session that leaves its state and comes back is a new episode."""

    def __init__(self, *, capacity: int = 10_000) -> None:
        super().__init__(capacity=capacity)

    def first(self, session: Session, *, policy: str) -> bool:
        """Whether this is the first report of `session`'s episode by `policy` (and note it)."""
        episode = (policy, session.state_change)
        if self._get(session) == episode:
            return False
        self._put(session, episode)
        return True


@dataclass(frozen=True, slots=True)
class Memory:
    """What the daemon keeps of one server from one cycle to the next."""

    cancels: Cancels = field(default_factory=Cancels)
    logged: LoggedEpisodes = field(default_factory=LoggedEpisodes)


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
    # [ha]: whether this instance held the server's lock at the end of the cycle (always True
    # without [ha]), and the pid of the backend that holds it.
    leader: bool = True
    lock_holder: int | None = None
    # [ha]: the holder of the lock when it is not a pg-reaper instance (lock squatting).
    lock_held_by_other: LockHolder | None = None
    session: int = 0  # the ServerConnection session of the cycle (sessions_opened)

    @property
    def ok(self) -> bool:
        return self.error is None

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


def sweep(
    conn: ServerConnection,
    *,
    server: ServerConfig,
    settings: Settings,
    mode: Mode = "reap",
    lock: Lock | None = None,
    memory: Memory | None = None,
) -> SweepReport:
    """Run one cycle on `server`. In preview mode nothing is signalled and nothing is audited.

    With `lock` ([ha]) only the holder of the server's advisory lock signals and audits; the
    others decide (for metrics) and report every candidate `not_leader`. With `memory` (the
    daemon) victims of a policy with `escalate_after` are terminated if a cancel did not stop
    them, and a `log` policy reports each session's episode once (`already_logged` after). A
    failed poll is returned as a report with `error` set, not logged here.
    """
    dry_run = settings.reaper.dry_run or mode == "preview"
    log = get_logger(server=server.name)
    started = time.perf_counter()

    def elapsed() -> float:
        return round((time.perf_counter() - started) * 1000, 1)

    try:
        snapshot = conn.poll(include_query=settings.log.include_query)
        leadership = None
        if lock is not None:
            lost = lock.held_by is not None and lock.held_by != conn.sessions_opened
            leadership = lead(conn, lock.key, acquire=lock.acquire and not lost)
    except PostgresError as exc:  # reported by the caller: `once` per run, the daemon per change
        return SweepReport(
            server=server.name,
            dry_run=dry_run,
            duration_ms=elapsed(),
            error=str(exc),
            leader=lock is None,
        )
    leader = leadership is None or leadership.leader
    cancels = None if memory is None else memory.cancels
    logged = None if memory is None else memory.logged

    warnings = visibility_warnings(snapshot.facts, snapshot.sessions)
    for warning in warnings:
        log.warning("privileges_insufficient", detail=warning)
    policies = settings.policies_for(server)
    decided = plan(snapshot.sessions, policies, reaper=settings.reaper, facts=snapshot.facts)
    if cancels is not None:
        cancels.keep_only(snapshot.sessions)
    if logged is not None:
        logged.keep_only(snapshot.sessions)
    if leader:
        outcomes = _execute(
            conn,
            decided,
            dry_run=dry_run,
            lock_key=None if lock is None else lock.key,
            cancels=cancels,
            logged=logged,
        )
        # The signalling statement found the lock gone (the session was lost and reopened).
        leader = not any(o.result is Result.NOT_LEADER for o in outcomes)
    else:
        outcomes = tuple(Outcome(decision=d, result=Result.NOT_LEADER) for d in decided.candidates)
    report = SweepReport(
        server=server.name,
        dry_run=dry_run,
        duration_ms=elapsed(),
        facts=snapshot.facts,
        sessions=snapshot.sessions,
        outcomes=outcomes,
        warnings=warnings,
        eligible_in=_eligible_in(
            decided,
            policies,
            settings=settings,
            facts=snapshot.facts,
            leader=leader,
            escalations=_escalations_due(outcomes, cancels),
        ),
        pressure=tuple(
            (p.name, held)
            for p in policies
            if (held := pressure_held(p, snapshot.facts)) is not None
        ),
        leader=leader,
        lock_holder=None if leadership is None else leadership.holder,
        lock_held_by_other=None if leadership is None else leadership.other,
        session=conn.sessions_opened,
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
        extra = {} if lock is None else {"leader": leader}
        log.info(
            "poll_completed",
            sessions=len(report.sessions),
            candidates=report.candidates,
            reaped=report.reaped,
            deferred=len(decided.deferred) if leader else 0,
            duration_ms=report.duration_ms,
            **extra,
        )
    return report


def _execute(
    conn: ServerConnection,
    decided: Plan,
    *,
    dry_run: bool,
    lock_key: int | None,
    cancels: Cancels | None,
    logged: LoggedEpisodes | None,
) -> tuple[Outcome, ...]:
    results: dict[int, tuple[Result, str | None]] = {}
    escalated: set[int] = set()
    for decision in decided.log:
        name = decision.policy.name if decision.policy else ""
        first = logged is None or logged.first(decision.session, policy=name)
        results[decision.session.pid] = (Result.LOGGED if first else Result.ALREADY_LOGGED, None)
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
        escalated = _signal(conn, decided.signal, results, lock_key=lock_key, cancels=cancels)
    return tuple(
        Outcome(
            decision=d,
            result=results[d.session.pid][0],
            detail=results[d.session.pid][1],
            escalated=d.session.pid in escalated,
        )
        for d in decided.candidates
    )


def _signal(
    conn: ServerConnection,
    victims: Iterable[Decision],
    results: dict[int, tuple[Result, str | None]],
    *,
    lock_key: int | None,
    cancels: Cancels | None,
) -> set[int]:
    """Signal `victims` by their policy's action, a cancel that did not stop its session
    escalated to terminate; the results go in `results`. The pids escalated."""
    actions: dict[str, list[Decision]] = {"terminate": [], "cancel": []}
    escalated: set[int] = set()
    for d in victims:
        assert d.policy is not None  # noqa: S101 - victims carry their policy
        due = None if cancels is None else cancels.due_in(d.session, d.policy)
        if due is None:
            actions[d.policy.action].append(d)
        elif due <= 0:
            actions["terminate"].append(d)  # the cancel did not stop it: escalate
            escalated.add(d.session.pid)
        else:
            results[d.session.pid] = (Result.ESCALATION_PENDING, None)
    for action in ("terminate", "cancel"):
        sessions = [d.session for d in actions[action]]
        try:
            results.update(conn.signal(sessions, action=action, lock_key=lock_key))
        except PostgresError as exc:
            results.update({s.pid: (Result.ERROR, str(exc)) for s in sessions})
    if cancels is not None:
        _remember(cancels, actions, results, escalated)
    return escalated


def _remember(
    cancels: Cancels,
    actions: dict[str, list[Decision]],
    results: dict[int, tuple[Result, str | None]],
    escalated: set[int],
) -> None:
    """Note the cancels that may need escalating; forget the sessions escalated."""
    for d in actions["cancel"]:
        cancelled = results[d.session.pid][0] is Result.CANCELLED
        if cancelled and d.policy and d.policy.escalate_after is not None:
            cancels.remember(d.session, policy=d.policy.name)
    for d in actions["terminate"]:
        if d.session.pid in escalated and results[d.session.pid][0] in _FINAL:
            cancels.forget(d.session)


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
    policies: tuple[PolicyConfig, ...],
    *,
    settings: Settings,
    facts: ServerFacts,
    leader: bool,
    escalations: float | None,
) -> float | None:
    if decided.deferred and leader:
        return 0.0
    times = [
        seconds_until_eligible(d.session, policies, reaper=settings.reaper, facts=facts)
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
    if outcome.escalated:
        fields["escalated"] = True
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
    if outcome.result in _UNAUDITED:
        return  # counted in poll_completed; decided again next cycle (or by the leader)
    event = "session_reap_failed" if outcome.result in _FAILED else "session_reaped"
    level = log.warning if outcome.result.is_failure else log.info
    fields = {**audit_fields(outcome, include_query=include_query), "instance": audit.instance()}
    level(event, dry_run=dry_run, **fields)
    # The same event as a row of the audit table, if there is one: only queued here.
    audit.submit(event, server=server, dry_run=dry_run, fields=fields)


_FAILED = frozenset({Result.GONE, Result.CHANGED, Result.DENIED, Result.ERROR})
_UNAUDITED = frozenset(
    {Result.DEFERRED, Result.NOT_LEADER, Result.ESCALATION_PENDING, Result.ALREADY_LOGGED}
)
# What ends the story of an escalated session: signalled, or found gone or changed.
_FINAL = frozenset({Result.TERMINATED, Result.GONE, Result.CHANGED})


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
