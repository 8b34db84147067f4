"""Connection pressure (docs/pressure.md): whether a policy's `when_connections_above` and
`when_role_connections_above` hold at the poll, for the server and for one session's role."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reaper.policy._values import RoleConnections, ServerFacts, Session
    from reaper.settings import PolicyConfig

PRESSURE_UNKNOWN = (
    "connections cannot be counted: the reaper's role lacks pg_read_all_stats, so other roles' "
    "parallel workers, background workers and walsenders are indistinguishable from clients"
)


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
    if percent is not None and not (usable > 0 and facts.client_sessions > level(usable, percent)):
        return False
    percent = policy.when_role_connections_above
    if percent is not None:
        return any(
            r.sessions > level(r.limit, percent)
            for r in facts.roles
            if (not policy.users or r.role in policy.users) and r.role not in policy.exclude_users
        )
    return True


def level(slots: int, percent: int) -> int:
    """How many sessions `percent` of `slots` is: pressure means more sessions than that."""
    return slots * percent // 100


def role_connections(facts: ServerFacts, name: str | None) -> RoleConnections | None:
    return next((r for r in facts.roles if r.role == name), None)


def session_pressure(
    session: Session, policy: PolicyConfig, facts: ServerFacts
) -> tuple[bool, str]:
    """Whether every pressure condition of `policy` holds for `session` at the poll, and why."""
    if not facts.sees_every_backend:
        return False, PRESSURE_UNKNOWN
    said = []
    for holds, why in (_server_pressure(policy, facts), _role_pressure(session, policy, facts)):
        if not holds:
            return False, why
        if why:
            said.append(why)
    return True, ", ".join(said)


def _server_pressure(policy: PolicyConfig, facts: ServerFacts) -> tuple[bool, str]:
    """`when_connections_above`: whether it holds and why ("" when the policy has none)."""
    percent = policy.when_connections_above
    if percent is None:
        return True, ""
    usable, used = facts.usable_connections, facts.client_sessions
    if usable <= 0:
        return False, "connection slots unknown"
    mark = level(usable, percent)
    counted = f"connections {used}/{usable}"
    if used <= mark:
        return False, f"{counted} not above when_connections_above {percent}% ({mark})"
    return True, f"{counted} > when_connections_above {percent}% ({mark})"


def _role_pressure(session: Session, policy: PolicyConfig, facts: ServerFacts) -> tuple[bool, str]:
    """`when_role_connections_above` for the session's role: whether it holds and why ("" when
    the policy has none)."""
    percent = policy.when_role_connections_above
    if percent is None:
        return True, ""
    role = role_connections(facts, session.user)
    if session.superuser:
        return False, f"role {session.user!r} is a superuser: no connection limit applies"
    if role is None:
        return False, f"role {session.user!r} has no connection limit"
    mark = level(role.limit, percent)
    counted = f"role {role.role!r} connections {role.sessions}/{role.limit}"
    if role.sessions <= mark:
        return False, f"{counted} not above when_role_connections_above {percent}% ({mark})"
    return True, f"{counted} > when_role_connections_above {percent}% ({mark})"
