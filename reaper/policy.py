"""The policy engine: a pure function from session snapshots and rules to decisions.

No database and no clock of its own: every age was computed by the server's clock when the
snapshot was taken. `evaluate` decides one session; `plan` orders and caps one server's cycle.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from reaper import APPLICATION_NAME

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from datetime import datetime

    from reaper.settings import ClientNetwork, PolicyConfig, ReaperSection

__all__ = [
    "CLIENT_BACKEND",
    "Decision",
    "Plan",
    "Result",
    "ServerFacts",
    "Session",
    "can_signal",
    "evaluate",
    "plan",
    "seconds_until_eligible",
]

CLIENT_BACKEND = "client backend"
_RUNNING_STATES = frozenset({"active", "fastpath function call"})


class Result(StrEnum):
    """What happened to one victim. The first four are successes of the reaper."""

    TERMINATED = "terminated"
    CANCELLED = "cancelled"
    LOGGED = "logged"
    DRY_RUN = "dry_run"
    GONE = "gone"  # the backend exited before the signal
    CHANGED = "changed"  # it became active, or its pid now belongs to another backend
    DENIED = "denied"  # the reaper's role may not signal it
    ERROR = "error"
    DEFERRED = "deferred"  # held back by max_terminations_per_cycle

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
    query: str | None = None

    @property
    def age_in_state(self) -> float:
        """How long it has been in its current state: the "oldest idle first" order."""
        for age in (self.idle_seconds, self.connection_seconds):
            if age is not None:
                return age
        return 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerFacts:
    """What the reaper knows about its own session on one server."""

    own_pid: int
    role: str
    superuser: bool
    signal_backend: bool  # member of pg_signal_backend
    read_all_stats: bool  # member of pg_read_all_stats (or pg_monitor)
    server_version_num: int
    max_connections: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Why a session is a victim (policy set) or is spared (policy None)."""

    session: Session
    policy: PolicyConfig | None
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
        return _oldest_first((*self.signal, *self.log, *self.deferred, *self.denied))


def can_signal(session: Session, facts: ServerFacts) -> bool:
    """PostgreSQL's own rule (signalfuncs.c): superusers signal anyone; others never signal a
    superuser's backend, and otherwise need the session role's privileges or pg_signal_backend."""
    if facts.superuser:
        return True
    if session.superuser:
        return False
    return session.member or facts.signal_backend


def evaluate(
    session: Session,
    policies: Sequence[PolicyConfig],
    *,
    reaper: ReaperSection,
    facts: ServerFacts,
) -> Decision:
    """Decide one session: the first policy (in file order) that matches names it."""
    reason = _hard_exclusion(session, reaper=reaper, facts=facts)
    if reason is not None:
        return Decision(session=session, policy=None, reason=reason)
    misses = []
    for policy in policies:
        matches, why = _match(session, policy)
        if matches:
            return Decision(session=session, policy=policy, reason=why)
        misses.append(f"{policy.name}: {why}")
    return Decision(session=session, policy=None, reason="; ".join(misses) or "no policy")


def plan(
    sessions: Iterable[Session],
    policies: Sequence[PolicyConfig],
    *,
    reaper: ReaperSection,
    facts: ServerFacts,
) -> Plan:
    """Decide every session of one poll, then order and cap the victims."""
    matched: list[Decision] = []
    spared: list[Decision] = []
    for session in sessions:
        decision = evaluate(session, policies, reaper=reaper, facts=facts)
        (matched if decision.matched else spared).append(decision)
    signal: list[Decision] = []
    log: list[Decision] = []
    deferred: list[Decision] = []
    denied: list[Decision] = []
    for decision in _oldest_first(matched):
        assert decision.policy is not None  # noqa: S101 - matched decisions carry a policy
        if decision.policy.action == "log":
            log.append(decision)
        elif not can_signal(decision.session, facts):
            denied.append(decision)
        elif len(signal) < reaper.max_terminations_per_cycle:
            signal.append(decision)
        else:
            deferred.append(decision)
    return Plan(
        signal=tuple(signal),
        log=tuple(log),
        deferred=tuple(deferred),
        denied=tuple(denied),
        spared=tuple(spared),
    )


def seconds_until_eligible(
    session: Session,
    policies: Sequence[PolicyConfig],
    *,
    reaper: ReaperSection,
    facts: ServerFacts,
) -> float | None:
    """How long until `session`, staying in its state, exceeds a threshold of some policy.

    None when no policy can ever match it as it is (protected, out of scope, no age known).
    Every age grows at the rate of the clock while the state does not change, so the time
    left is the threshold minus the age; the daemon polls again then.
    """
    if _hard_exclusion(session, reaper=reaper, facts=facts) is not None:
        return None
    soonest: float | None = None
    for policy in policies:
        if _filtered_out(session, policy) is not None:
            continue
        for key, _label, age in _ages(session):
            limit = policy.thresholds.get(key)
            if limit is None or age is None:
                continue
            left = max(0.0, limit.total_seconds() - age)
            soonest = left if soonest is None else min(soonest, left)
    return soonest


def _ages(session: Session) -> tuple[tuple[str, str, float | None], ...]:
    # A query runs only while the session is active: for an idle one, now() - query_start is
    # the age of its last query, the very mistake that makes idle scripts kill the wrong ones.
    running = session.runtime_seconds if session.state in _RUNNING_STATES else None
    return (
        ("max_idle", "idle", session.idle_seconds),
        ("max_runtime", "running", running),
        ("max_transaction_age", "in transaction", session.transaction_seconds),
        ("max_connection_age", "connected", session.connection_seconds),
    )


def _oldest_first(decisions: Iterable[Decision]) -> tuple[Decision, ...]:
    return tuple(sorted(decisions, key=lambda d: (-d.session.age_in_state, d.session.pid)))


def _hard_exclusion(  # noqa: PLR0911 - one return per rule reads best
    session: Session, *, reaper: ReaperSection, facts: ServerFacts
) -> str | None:
    """The rules no policy can override."""
    if session.backend_type != CLIENT_BACKEND:
        return f"not a client backend ({session.backend_type})"
    if session.pid == facts.own_pid:
        return "the reaper's own session"
    if session.application == APPLICATION_NAME:
        return "another pg-reaper session"
    if session.state is None:
        return "state not visible (the reaper's role lacks pg_read_all_stats?)"
    if session.user is not None and session.user in reaper.protect_users:
        return f"protected user {session.user!r}"
    for pattern in reaper.protect_applications:
        if pattern.search(session.application):
            return f"protected application (matches {pattern.pattern!r})"
    return None


def _match(session: Session, policy: PolicyConfig) -> tuple[bool, str]:
    """Whether `policy` matches `session`, and why (the thresholds exceeded) or why not."""
    why_not = _filtered_out(session, policy)
    if why_not is not None:
        return False, why_not
    exceeded = [
        f"{label} {_seconds(age)} > {key} {_seconds(limit.total_seconds())}"
        for key, label, age in _ages(session)
        if (limit := policy.thresholds.get(key)) is not None
        and age is not None
        and age > limit.total_seconds()
    ]
    if not exceeded:
        return False, "under every threshold"
    return True, ", ".join(exceeded)


def _filtered_out(session: Session, policy: PolicyConfig) -> str | None:  # noqa: PLR0911
    """Why the policy's state and scope filters leave `session` out, or None if they do not."""
    if session.state not in policy.states:
        return f"state {session.state!r} not in states"
    if policy.databases and session.database not in policy.databases:
        return "database not listed"
    if session.database in policy.exclude_databases:
        return "database excluded"
    if policy.users and session.user not in policy.users:
        return "user not listed"
    if session.user in policy.exclude_users:
        return "user excluded"
    if policy.applications and not any(p.search(session.application) for p in policy.applications):
        return "application not listed"
    if any(p.search(session.application) for p in policy.exclude_applications):
        return "application excluded"
    if policy.client_addrs and not _in_networks(session.client_addr, policy.client_addrs):
        return "client address not listed"
    if _in_networks(session.client_addr, policy.exclude_client_addrs):
        return "client address excluded"
    return None


def _in_networks(addr: str | None, networks: Sequence[ClientNetwork]) -> bool:
    if addr is None:
        return "local" in networks
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 client on an IPv6 socket: match it as the IPv4 it is
    return any(net != "local" and ip.version == net.version and ip in net for net in networks)


def _seconds(value: float) -> str:
    """Seconds as a reason shows them: whole above 10 s, else enough digits to tell an age
    from the threshold it just passed (3.01s > 3s)."""
    if value >= 10 or value == int(value):
        return f"{value:.0f}s"
    return f"{value:.2f}s"
