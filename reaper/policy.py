"""The policy engine: a pure function from session snapshots and rules to decisions.

No database and no clock of its own: every age was computed by the server's clock when the
snapshot was taken. `evaluate` decides one session; `plan` orders and caps one server's cycle.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
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
    "DROPPED_ROLE",
    "PRESSURE_UNKNOWN",
    "Decision",
    "Plan",
    "Result",
    "RoleConnections",
    "ServerFacts",
    "Session",
    "can_signal",
    "evaluate",
    "in_networks",
    "plan",
    "pressure_held",
    "seconds_until_eligible",
]

CLIENT_BACKEND = "client backend"
# The user of a session whose role was dropped while it was connected (pg_stat_activity shows
# NULL): policies, protect_users and the audit name it so.
DROPPED_ROLE = "(dropped)"
_RUNNING_STATES = frozenset({"active", "fastpath function call"})
PRESSURE_UNKNOWN = (
    "connections cannot be counted: the reaper's role lacks pg_read_all_stats, so other roles' "
    "parallel workers, background workers and walsenders are indistinguishable from clients"
)


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
    # Not signalled because this instance does not hold the server's lock ([ha], docs/ha.md):
    # another instance reaps it. Neither a reap nor a failure, never audited.
    NOT_LEADER = "not_leader"
    # Cancelled by a policy with escalate_after, still running that query: it is terminated
    # once escalate_after has passed; until then it is not signalled again, nor audited.
    ESCALATION_PENDING = "escalation_pending"
    # Matched by a `log` policy that the daemon already reported for this episode (same backend,
    # same state since the same state_change, same policy): reported once, not every poll.
    ALREADY_LOGGED = "already_logged"

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
    query: str | None = None

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
    """Decide one session: the first policy (in file order) that matches names it.

    A policy with a connection-pressure condition matches only while the condition holds at the
    poll; how many of its matches become victims is `plan`'s business (its allowance).
    """
    return _evaluate(session, policies, reaper=reaper, facts=facts, allowance=None)


def _evaluate(
    session: Session,
    policies: Sequence[PolicyConfig],
    *,
    reaper: ReaperSection,
    facts: ServerFacts,
    allowance: _Allowance | None,
) -> Decision:
    reason = _hard_exclusion(session, reaper=reaper, facts=facts)
    if reason is not None:
        return Decision(session=session, policy=None, reason=reason)
    misses = []
    for policy in policies:
        matches, why = _match(session, policy, facts)
        if matches and allowance is not None:
            # Beyond its allowance a pressure policy lets the next policies decide.
            matches, why = allowance.take(session, policy, why)
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
    """Decide every session of one poll, then order and cap the victims.

    Sessions are decided oldest idle first, the order in which pressure policies spend their
    allowance: they reap only down to their level (docs/pressure.md).
    """
    ordered = sorted(sessions, key=_age_order)
    allowance = None
    if any(p.pressure for p in policies):
        allowance = _Allowance(ordered, policies, reaper=reaper, facts=facts)
    matched: list[Decision] = []
    spared: list[Decision] = []
    for session in ordered:
        decision = _evaluate(session, policies, reaper=reaper, facts=facts, allowance=allowance)
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
        # A pressure policy can match only once its pressure appears: no early poll for it
        # until then (the interval bounds the wait).
        if policy.pressure and not _pressure(session, policy, facts)[0]:
            continue
        for key, limit in policy.limits:
            age = _age(session, key)
            if age is None:
                continue
            if policy.pressure and age > limit:
                continue  # past it, spared only by the policy's allowance: nothing to wait for
            left = max(0.0, limit - age)
            soonest = left if soonest is None else min(soonest, left)
    return soonest


def pressure_held(policy: PolicyConfig, facts: ServerFacts) -> bool | None:
    """Whether `policy`'s connection-pressure condition held at the poll; None if it has none.

    The role condition holds when a role in the policy's scope (`users`, less `exclude_users`)
    is above its share of its connection limit.
    """
    if not policy.pressure:
        return None
    if not facts.sees_every_backend:
        return False
    percent = policy.when_connections_above
    usable = facts.usable_connections
    if percent is not None and not (usable > 0 and facts.client_sessions > _level(usable, percent)):
        return False
    percent = policy.when_role_connections_above
    if percent is not None:
        return any(
            r.sessions > _level(r.limit, percent)
            for r in facts.roles
            if (not policy.users or r.role in policy.users) and r.role not in policy.exclude_users
        )
    return True


def _level(slots: int, percent: int) -> int:
    """How many sessions `percent` of `slots` is: pressure means more sessions than that."""
    return slots * percent // 100


def _role(facts: ServerFacts, name: str | None) -> RoleConnections | None:
    return next((r for r in facts.roles if r.role == name), None)


def _pressure(  # noqa: PLR0911 - one return per condition reads best
    session: Session, policy: PolicyConfig, facts: ServerFacts
) -> tuple[bool, str]:
    """Whether every pressure condition of `policy` holds for `session` at the poll, and why."""
    if not facts.sees_every_backend:
        return False, PRESSURE_UNKNOWN
    said = []
    percent = policy.when_connections_above
    if percent is not None:
        usable, used = facts.usable_connections, facts.client_sessions
        if usable <= 0:
            return False, "connection slots unknown"
        level = _level(usable, percent)
        counted = f"connections {used}/{usable}"
        if used <= level:
            return False, f"{counted} not above when_connections_above {percent}% ({level})"
        said.append(f"{counted} > when_connections_above {percent}% ({level})")
    percent = policy.when_role_connections_above
    if percent is not None:
        role = _role(facts, session.user)
        if session.superuser:
            return False, f"role {session.user!r} is a superuser: no connection limit applies"
        if role is None:
            return False, f"role {session.user!r} has no connection limit"
        level = _level(role.limit, percent)
        counted = f"role {role.role!r} connections {role.sessions}/{role.limit}"
        if role.sessions <= level:
            return False, f"{counted} not above when_role_connections_above {percent}% ({level})"
        said.append(f"{counted} > when_role_connections_above {percent}% ({level})")
    return True, ", ".join(said)


class _Allowance:
    """How many victims the pressure policies may still take this cycle, spent oldest first.

    The counts start from the poll's, less the sessions that a policy without pressure
    terminates this cycle anyway. Every victim a pressure policy takes brings the count of the
    server and of the victim's role down by one; a policy takes none once the counts its
    conditions look at are down to its level. A `log` policy counts its own victims as if it
    terminated them (it shows what it would do) but lowers no count for the other policies.
    Victims the reaper may not signal free no slot and cost nothing (they are reported denied).
    """

    def __init__(
        self,
        sessions: Sequence[Session],
        policies: Sequence[PolicyConfig],
        *,
        reaper: ReaperSection,
        facts: ServerFacts,
    ) -> None:
        self._facts = facts
        plain = [p for p in policies if not p.pressure]
        self._relieving = {
            s.pid: s
            for s in sessions
            if (d := evaluate(s, plain, reaper=reaper, facts=facts)).policy is not None
            and d.policy.action == "terminate"
            and can_signal(s, facts)
        }
        self._server = facts.client_sessions - len(self._relieving)
        self._roles: Counter[str | None] = Counter({r.role: r.sessions for r in facts.roles})
        self._roles.subtract(s.user for s in self._relieving.values())
        # What each `log` policy has taken: of the server's count, and of each role's.
        self._logged: Counter[str] = Counter()
        self._logged_roles: dict[str, Counter[str | None]] = {}

    def take(self, session: Session, policy: PolicyConfig, why: str) -> tuple[bool, str]:
        """Whether `policy`, which matches `session`, may take it as a victim, and why."""
        if not policy.pressure:
            return True, why
        user = session.user
        logs = policy.action == "log"
        if not logs and (session.pid in self._relieving or not can_signal(session, self._facts)):
            return True, why  # terminated by a later policy anyway, or frees no slot
        own = self._logged_roles.setdefault(policy.name, Counter()) if logs else Counter()
        # A session a later policy would terminate keeps its slot if this one only logs it.
        back = int(logs and session.pid in self._relieving)
        short = self._short(
            policy,
            user=user,
            server=self._server + back - (self._logged[policy.name] if logs else 0),
            role=self._roles[user] + back - own[user],
        )
        if short is not None:
            return False, short
        if logs:
            self._logged[policy.name] += 1
            own[user] += 1
            if back:
                del self._relieving[session.pid]
                self._server += 1
                self._roles[user] += 1
        else:
            self._server -= 1
            self._roles[user] -= 1
        return True, why

    def _short(
        self, policy: PolicyConfig, *, user: str | None, server: int, role: int
    ) -> str | None:
        """Why `policy` may take no more victims (of `user`), given the counts left; None if
        it may."""
        percent = policy.when_connections_above
        if percent is not None:
            level = _level(self._facts.usable_connections, percent)
            if server <= level:
                return (
                    "other victims this cycle already bring connections down to "
                    f"when_connections_above {percent}% ({level})"
                )
        percent = policy.when_role_connections_above
        limits = _role(self._facts, user)
        if percent is not None and limits is not None:
            level = _level(limits.limit, percent)
            if role <= level:
                return (
                    f"other victims this cycle already bring role {user!r} down to "
                    f"when_role_connections_above {percent}% ({level})"
                )
        return None


_AGE_LABELS = {
    "max_idle": "idle",
    "max_runtime": "running",
    "max_transaction_age": "in transaction",
    "max_connection_age": "connected",
}


def _age(session: Session, key: str) -> float | None:
    """The session's age that threshold `key` limits (None: not known, or does not apply)."""
    if key == "max_idle":
        return session.idle_seconds
    if key == "max_runtime":
        # A query runs only while the session is active: for an idle one, now() - query_start
        # is the age of its last query, the very mistake that makes idle scripts kill the
        # wrong ones.
        return session.runtime_seconds if session.state in _RUNNING_STATES else None
    if key == "max_transaction_age":
        return session.transaction_seconds
    return session.connection_seconds


def _oldest_first(decisions: Iterable[Decision]) -> tuple[Decision, ...]:
    return tuple(sorted(decisions, key=lambda d: _age_order(d.session)))


def _age_order(session: Session) -> tuple[float, int]:
    return (-session.age_in_state, session.pid)


def _hard_exclusion(  # noqa: PLR0911 - one return per rule reads best
    session: Session, *, reaper: ReaperSection, facts: ServerFacts
) -> str | None:
    """The rules no policy can override."""
    if session.backend_type != CLIENT_BACKEND:
        return f"not a client backend ({session.backend_type})"
    if session.pid == facts.own_pid:
        return "the reaper's own session"
    if session.application == APPLICATION_NAME and session.signaller:
        return "another pg-reaper session"
    if session.state is None:
        return "state not visible (the reaper's role lacks pg_read_all_stats?)"
    if session.user is not None and session.user in reaper.protect_users:
        return f"protected user {session.user!r}"
    for pattern in reaper.protect_applications:
        if pattern.search(session.application):
            return f"protected application (matches {pattern.pattern!r})"
    return None


def _match(session: Session, policy: PolicyConfig, facts: ServerFacts) -> tuple[bool, str]:
    """Whether `policy` matches `session`, and why (the thresholds exceeded and the pressure
    that holds) or why not."""
    why_not = _filtered_out(session, policy)
    if why_not is not None:
        return False, why_not
    exceeded = [
        f"{_AGE_LABELS[key]} {_seconds(age)} > {key} {_seconds(limit)}"
        for key, limit in policy.limits
        if (age := _age(session, key)) is not None and age > limit
    ]
    if not exceeded:
        return False, "under every threshold"
    if policy.pressure:
        holds, why = _pressure(session, policy, facts)
        if not holds:
            return False, why
        exceeded.append(why)
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
    if policy.client_addrs and not in_networks(session.client_addr, policy.client_addrs):
        return "client address not listed"
    if in_networks(session.client_addr, policy.exclude_client_addrs):
        return "client address excluded"
    return None


def in_networks(addr: str | None, networks: Sequence[ClientNetwork]) -> bool:
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
