"""One session against the rules: the hard exclusions no policy overrides, then each policy's
state and scope filters, thresholds and pressure, first match wins."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from reaper import APPLICATION_NAME
from reaper.policy._pressure import session_pressure
from reaper.policy._values import CLIENT_BACKEND, Decision, Rule

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from reaper.policy._values import ServerFacts, Session
    from reaper.settings import ClientNetwork, PolicyConfig, ReaperSection

    # Whether a policy that matches a session may take it as a victim, and why: a pressure
    # policy's allowance for the cycle (`plan`).
    Take = Callable[[Session, PolicyConfig, str], tuple[bool, str]]

_RUNNING_STATES = frozenset({"active", "fastpath function call"})
# What pg_stat_activity.query holds for a session whose text the reaper's role may not read.
INSUFFICIENT_PRIVILEGE = "<insufficient privilege>"
# How many blocked pids a reason names (the rest are counted).
_PIDS_SHOWN = 10
_AGE_LABELS = {
    "max_idle": "idle",
    "max_runtime": "running",
    "max_transaction_age": "in transaction",
    "max_connection_age": "connected",
}


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
    return decide(session, policies, reaper=reaper, facts=facts, take=None)


def decide(
    session: Session,
    policies: Sequence[PolicyConfig],
    *,
    reaper: ReaperSection,
    facts: ServerFacts,
    take: Take | None,
) -> Decision:
    """`evaluate`, with a policy's match subject to `take` (None: every match is taken)."""
    reason = hard_exclusion(session, reaper=reaper, facts=facts)
    if reason is not None:
        return Decision(session=session, policy=None, reason=reason)
    misses = []
    for policy in policies:
        matches, why = _match(session, policy, facts)
        if matches and take is not None:
            # Beyond its allowance a pressure policy lets the next policies decide.
            matches, why = take(session, policy, why)
        if matches:
            return Decision(session=session, policy=Rule.of(policy), reason=why)
        misses.append(f"{policy.name}: {why}")
    return Decision(session=session, policy=None, reason="; ".join(misses) or "no policy")


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
    if hard_exclusion(session, reaper=reaper, facts=facts) is not None:
        return None
    soonest: float | None = None
    for policy in policies:
        if _filtered_out(session, policy) is not None:
            continue
        # A pressure policy can match only once its pressure appears: no early poll for it
        # until then (the interval bounds the wait).
        if policy.pressure and not session_pressure(session, policy, facts)[0]:
            continue
        left = _time_left(session, policy)
        if left is not None:
            soonest = left if soonest is None else min(soonest, left)
    return soonest


def _time_left(session: Session, policy: PolicyConfig) -> float | None:
    """How long until `session` meets `policy`'s thresholds, staying as it is; None if it
    cannot (no age known, or it blocks no backend for when_blocking)."""
    lefts = []
    for key, limit in policy.limits:
        age = _age(session, key)
        if age is None:
            continue
        if policy.pressure and age > limit:
            continue  # past it, spared only by the policy's allowance: nothing to wait for
        lefts.append(max(0.0, limit - age))
    if policy.limits and not lefts:
        return None
    left = min(lefts, default=0.0)
    threshold = policy.blocking_seconds
    if threshold is not None:
        # A lock wait grows with the clock while the waiter waits; a session that blocks no
        # backend now may start to at any time, which the interval bounds.
        if not session.blocking:
            return None
        wait = session.lock_wait_seconds or 0.0
        if policy.pressure and wait >= threshold:
            return None  # met, spared only by the policy's allowance
        left = max(left, threshold - wait, 0.0)
    return left


def hard_exclusion(  # noqa: PLR0911 - one return per rule reads best
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
    if policy.limits and not exceeded:
        return False, "under every threshold"
    # when_blocking is a condition of its own: with age thresholds, one of them exceeded AND
    # a lock wait it blocks long enough (docs/configuration.md).
    threshold = policy.blocking_seconds
    if threshold is not None:
        blocks, why = blocking(session, threshold)
        if not blocks:
            return False, why
        exceeded.append(why)
    if policy.pressure:
        holds, why = session_pressure(session, policy, facts)
        if not holds:
            return False, why
        exceeded.append(why)
    return True, ", ".join(exceeded)


def blocking(session: Session, threshold: float) -> tuple[bool, str]:
    """Whether `session` blocks a backend whose lock wait began at least `threshold` seconds
    ago (when_blocking), and why: the pids it blocks and the longest wait among them."""
    if not session.blocking:
        return False, "blocks no backend"
    wait = max(session.lock_wait_seconds or 0.0, 0.0)
    shown = ", ".join(str(pid) for pid in session.blocking[:_PIDS_SHOWN])
    more = len(session.blocking) - _PIDS_SHOWN
    if more > 0:
        shown += f" and {more} more"
    said = (
        f"blocks pid{'s' if len(session.blocking) > 1 else ''} {shown}; "
        # Whole seconds cut, not rounded: a wait of 29.6 s is not shown as 30s < 30s.
        f"longest lock wait {f'{int(wait)}s' if wait >= 10 else _seconds(wait)}"
    )
    if wait >= threshold:
        return True, f"{said} >= when_blocking {_seconds(threshold)}"
    return False, f"{said} < when_blocking {_seconds(threshold)}"


def query_text(session: Session) -> str | None:
    """The session's last query, if the reaper's role could read it (None otherwise)."""
    if session.query is None or session.query == INSUFFICIENT_PRIVILEGE:
        return None
    return session.query


def _filtered_out(session: Session, policy: PolicyConfig) -> str | None:
    """Why the policy's state, scope and query filters leave `session` out, or None."""
    return _scope_filtered_out(session, policy) or _query_filtered_out(session, policy)


def _query_filtered_out(session: Session, policy: PolicyConfig) -> str | None:
    """Why the policy's last-query filters leave `session` out, or None. A text the reaper
    cannot read matches no `queries` and is spared by `exclude_queries`: never a kill by
    mistake."""
    if not policy.reads_queries:
        return None
    text = query_text(session)
    if text is None:
        return "last query not visible to the reaper's role (pg_read_all_stats?)"
    if policy.queries and not any(p.search(text) for p in policy.queries):
        return "last query not listed"
    if any(p.search(text) for p in policy.exclude_queries):
        return "last query excluded"
    return None


def _scope_filtered_out(session: Session, policy: PolicyConfig) -> str | None:  # noqa: PLR0911
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


def _seconds(value: float) -> str:
    """Seconds as a reason shows them: whole above 10 s, else enough digits to tell an age
    from the threshold it just passed (3.01s > 3s)."""
    if value >= 10 or value == int(value):
        return f"{value:.0f}s"
    return f"{value:.2f}s"
