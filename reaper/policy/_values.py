"""The engine's values: a session as polled, the server's facts, and the decisions about them."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import datetime, timedelta

    from reaper.settings import PolicyConfig

CLIENT_BACKEND = "client backend"
# The backend_type of a row whose kind the reaper's role may not see (NULL in pg_stat_activity
# without pg_read_all_stats).
HIDDEN_BACKEND = "unknown"
# The user of a session whose role was dropped while it was connected (pg_stat_activity shows
# NULL): policies, protect_users and the audit name it so.
DROPPED_ROLE = "(dropped)"

Action = Literal["terminate", "cancel", "log"]


class Result(StrEnum):
    """What happened to one victim. The first four are successes of the reaper."""

    TERMINATED = "terminated"
    CANCELLED = "cancelled"
    LOGGED = "logged"
    DRY_RUN = "dry_run"
    GONE = "gone"  # the backend exited before the signal
    # It became active, or its pid now belongs to another backend, or (when_blocking) it no
    # longer blocks a backend that has waited long enough.
    CHANGED = "changed"
    DENIED = "denied"  # the reaper's role may not signal it
    ERROR = "error"
    DEFERRED = "deferred"  # held back by max_terminations_per_cycle
    # Not signalled because this instance does not hold the server's lock ([ha], docs/ha.md):
    # another instance reaps it. Neither a reap nor a failure, never audited.
    NOT_LEADER = "not_leader"
    # Cancelled by a policy with escalate_after, still running that query: it is terminated
    # once escalate_after has passed; until then it is not signalled again, nor audited.
    ESCALATION_PENDING = "escalation_pending"
    # Matched by a `log` policy that the daemon already reported for this episode (same backend,
    # same state since the same state_change, same policy): reported once, not every poll.
    ALREADY_LOGGED = "already_logged"
    # An armed signal (docs/semantics.md) that reached the server before the victim's age passed
    # its threshold by the server's clock: not signalled, armed again. Never audited.
    NOT_DUE = "not_due"

    @property
    def is_failure(self) -> bool:
        return self in {Result.DENIED, Result.ERROR}


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """One row of pg_stat_activity, with ages in seconds computed by the server's clock."""

    pid: int
    backend_type: str
    database: str | None
    user: str | None
    application: str
    client_addr: str | None  # None for a Unix-socket session
    state: str | None  # None: track_activities hides it, or the reaper lacks pg_read_all_stats
    backend_start: datetime | None
    state_change: datetime | None
    idle_seconds: float | None  # now() - state_change
    transaction_seconds: float | None  # now() - xact_start
    runtime_seconds: float | None  # now() - query_start
    connection_seconds: float | None  # now() - backend_start
    superuser: bool = False  # the session's role is a superuser
    member: bool = False  # the reaper's role has the privileges of the session's role
    # The session's role could be a pg-reaper's (pg_signal_backend's privileges, or the reaper's
    # own role): only then does application_name 'pg-reaper' spare it.
    signaller: bool = False
    # The last query's text: read only when a policy filters on it (queries, exclude_queries) or
    # [log] include_query is set; shown only with include_query. Kept out of repr: it may hold
    # personal data. "<insufficient privilege>" when the reaper's role may not read it.
    query: str | None = field(default=None, repr=False)
    # Read only when a policy has when_blocking: the backends whose lock waits it blocks
    # (pg_blocking_pids), in pid order, and how long the longest of them has waited, by the
    # server's clock (now() - pg_locks.waitstart; None when it blocks none).
    blocking: tuple[int, ...] = ()
    lock_wait_seconds: float | None = None

    @property
    def age_in_state(self) -> float:
        """How long it has been in its current state: the "oldest idle first" order."""
        for age in (self.idle_seconds, self.connection_seconds):
            if age is not None:
                return age
        return 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RoleConnections:
    """A role whose connection limit applies (rolconnlimit >= 0, not a superuser) and that has
    client sessions at the poll (one without cannot be above any share of its limit): how many."""

    role: str
    limit: int
    sessions: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerFacts:
    """What the reaper knows about its own session on one server, and how full the server is."""

    own_pid: int
    role: str
    superuser: bool
    signal_backend: bool  # member of pg_signal_backend
    read_all_stats: bool  # member of pg_read_all_stats (or pg_monitor)
    server_version_num: int
    max_connections: int = 0
    superuser_reserved_connections: int = 0
    reserved_connections: int = 0  # PostgreSQL 16+ (pg_use_reserved_connections); 0 before
    # Measured at every poll, for connection pressure (the fields above are read once):
    client_sessions: int = 0  # client backends, the reaper's own session included
    roles: tuple[RoleConnections, ...] = ()

    @property
    def sees_every_backend(self) -> bool:
        """Whether the reaper's role sees the backend type of every session: without it other
        roles' parallel workers, background workers and walsenders look like client sessions,
        and connections cannot be counted."""
        return self.superuser or self.read_all_stats

    @property
    def usable_connections(self) -> int:
        """The slots an ordinary role can fill: the rest are reserved for superusers (and, 16+,
        for roles with pg_use_reserved_connections)."""
        reserved = self.superuser_reserved_connections + self.reserved_connections
        return max(0, self.max_connections - reserved)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """The policy behind a decision, as much of it as acting on the decision needs: its name
    (the audit's and the metrics'), its action, how long a cancelled query may go on running
    before the session is terminated (escalate_after), and how long a lock wait the session
    must still be blocking when it is signalled (when_blocking)."""

    name: str
    action: Action
    escalate_after: timedelta | None = None
    when_blocking: timedelta | None = None

    @classmethod
    def of(cls, policy: PolicyConfig) -> Rule:
        return cls(
            name=policy.name,
            action=policy.action,
            escalate_after=policy.escalate_after,
            when_blocking=policy.when_blocking,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Why a session is a victim (policy set) or is spared (policy None)."""

    session: Session
    policy: Rule | None
    reason: str

    @property
    def matched(self) -> bool:
        return self.policy is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """One server's cycle: what to signal, what to only log, what waits, what cannot be signalled.

    Every list is ordered oldest idle first.
    """

    signal: tuple[Decision, ...] = ()
    log: tuple[Decision, ...] = ()
    deferred: tuple[Decision, ...] = ()
    denied: tuple[Decision, ...] = ()
    spared: tuple[Decision, ...] = field(default=(), repr=False)

    @property
    def candidates(self) -> tuple[Decision, ...]:
        """Every matched session, whatever becomes of it this cycle, oldest idle first."""
        return oldest_first((*self.signal, *self.log, *self.deferred, *self.denied))


def oldest_first(decisions: Iterable[Decision]) -> tuple[Decision, ...]:
    return tuple(sorted(decisions, key=lambda d: age_order(d.session)))


def age_order(session: Session) -> tuple[float, int]:
    return (-session.age_in_state, session.pid)
