"""`pg-reaper doctor`'s judgement, pure: a `ServerState` and the server's policies become problems
(the reaper cannot do its job, or the server is about to refuse connections: exit 1), warnings
and notes, with the thresholds below.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from reaper.commands.doctor_state import escaped
from reaper.identifiers import quote_identifier
from reaper.settings import format_duration

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from datetime import timedelta

    from reaper.commands.connections import Connections
    from reaper.commands.doctor_state import Limit, ServerState, Setting
    from reaper.settings import PolicyConfig

__all__ = [
    "PROBLEM_PERCENT",
    "WARNING_PERCENT",
    "Diagnosis",
    "Finding",
    "ServerReport",
    "diagnose",
    "failed",
    "timeout_notes",
]

# Share of the usable slots (or of a role's or database's limit) in use.
WARNING_PERCENT = 80
PROBLEM_PERCENT = 90


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    message: str
    fix: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnosis:
    problems: tuple[Finding, ...] = ()
    warnings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerReport:
    server: str
    target: str  # host:port, never a secret
    state: ServerState | None  # None: the server could not be examined
    error: str | None = None
    diagnosis: Diagnosis = field(default_factory=Diagnosis)

    @property
    def ok(self) -> bool:
        return not self.diagnosis.problems


def failed(error: str) -> Diagnosis:
    """The diagnosis of a server that could not be examined at all."""
    return Diagnosis(
        problems=(
            Finding(
                message=f"server could not be examined: {error}",
                fix="check that it is running and reachable, and the dsn (host, port, user), "
                "the password and pg_hba.conf",
            ),
        )
    )


def diagnose(state: ServerState, *, policies: Sequence[PolicyConfig] = ()) -> Diagnosis:
    """Problems (the reaper cannot do its job, or the server is about to refuse connections),
    warnings and notes, from what `doctor` learnt about one server.
    """
    problems: list[Finding] = []
    warnings: list[Finding] = []
    notes: list[str] = []
    _privileges(state, problems, warnings, notes)
    _query_filters(state, policies, warnings)
    _visibility(state, problems, warnings)
    _connections(state.connections, problems, warnings)
    for limit in state.limits:
        _limit(limit, problems, warnings)
    notes.extend(timeout_notes(state.timeouts, policies))
    return Diagnosis(problems=tuple(problems), warnings=tuple(warnings), notes=tuple(notes))


def _privileges(
    state: ServerState, problems: list[Finding], warnings: list[Finding], notes: list[str]
) -> None:
    priv = state.privileges
    role = quote_identifier(priv.role)
    if priv.superuser:
        warnings.append(
            Finding(
                message=f"role {escaped(priv.role)} is a superuser: more than the reaper needs",
                fix='connect as a role with only what it needs: CREATE ROLE "pg-reaper" LOGIN; '
                'GRANT pg_signal_backend, pg_read_all_stats TO "pg-reaper" '
                "(deploy/sql/pg_reaper_role.sql)",
            )
        )
        return
    if not priv.read_all_stats:
        hidden = state.connections.hidden_sessions
        problems.append(
            Finding(
                message=f"ROLE {escaped(priv.role)} LACKS pg_read_all_stats: the state of other "
                f"roles' sessions is hidden from it ({hidden} hidden now), SO THE REAPER WOULD "
                "SILENTLY MATCH NONE OF THEM",
                fix=f"GRANT pg_read_all_stats TO {role}",
            )
        )
    if not priv.signal_backend:
        problems.append(
            Finding(
                message=f"role {escaped(priv.role)} lacks pg_signal_backend: it may signal only "
                "sessions of roles whose privileges it has",
                fix=f"GRANT pg_signal_backend TO {role}",
            )
        )
    if (note := _reserved_connections(state)) is not None:
        notes.append(note)


def _query_filters(
    state: ServerState, policies: Sequence[PolicyConfig], warnings: list[Finding]
) -> None:
    """Policies that filter on the last query, which other roles' sessions hide without
    pg_read_all_stats: `queries` then matches none of them and `exclude_queries` spares all."""
    priv = state.privileges
    if priv.superuser or priv.read_all_stats:
        return
    named = [repr(p.name) for p in policies if p.reads_queries]
    if named:
        warnings.append(
            Finding(
                message=f"{'policies' if len(named) > 1 else 'policy'} {', '.join(named)} "
                f"filter{'' if len(named) > 1 else 's'} on the last query (queries, "
                "exclude_queries), which role "
                f"{escaped(priv.role)} cannot read for other roles' sessions: 'queries' matches "
                "none of them and 'exclude_queries' spares them all",
                fix=f"GRANT pg_read_all_stats TO {quote_identifier(priv.role)}",
            )
        )


def _reserved_connections(state: ServerState) -> str | None:
    """Whether the reaper can get back into a full server (PostgreSQL 16+)."""
    priv = state.privileges
    reserved = state.connections.reserved_connections
    if priv.use_reserved_connections is None or reserved is None:
        return None  # before PostgreSQL 16
    if not priv.use_reserved_connections:
        return (
            f"role {escaped(priv.role)} does not have pg_use_reserved_connections: should its "
            "connection be lost while the server is full, the reaper cannot get back in to free "
            f"it. GRANT pg_use_reserved_connections TO {quote_identifier(priv.role)}"
            + ("" if reserved else " and set reserved_connections (e.g. 2)")
        )
    if reserved == 0:
        return (
            f"role {escaped(priv.role)} has pg_use_reserved_connections but reserved_connections "
            "is 0: no slot is kept for it when the server is full; set reserved_connections "
            "(e.g. 2)"
        )
    return None


def _visibility(state: ServerState, problems: list[Finding], warnings: list[Finding]) -> None:
    if not state.track_activities:
        problems.append(
            Finding(
                message="track_activities is off: sessions show as 'disabled', without state or "
                "timestamps, so no policy can see how long they have been idle",
                fix="ALTER SYSTEM SET track_activities = on; SELECT pg_reload_conf()",
            )
        )
    for setting in state.untracked:
        alter = _alter(setting, "RESET track_activities")
        warnings.append(
            Finding(
                message=f"track_activities is off {setting.scope}: those sessions show as "
                "'disabled' and only a policy listing 'disabled' can match them",
                fix=alter,
            )
        )
    if state.connections.disabled_sessions and state.track_activities:
        count = state.connections.disabled_sessions
        warnings.append(
            Finding(
                message=f"{count} session{'s' if count != 1 else ''} run with track_activities = "
                "off (state 'disabled'): policies skip them unless they list 'disabled', and "
                "then only max_connection_age can match them",
            )
        )


def _connections(conns: Connections, problems: list[Finding], warnings: list[Finding]) -> None:
    usage = (
        f"{conns.client_sessions} client sessions of {conns.usable} usable slots "
        f"({conns.percent:.0f}%; max_connections {conns.max_connections} - "
        f"superuser_reserved_connections {conns.superuser_reserved_connections}"
        + (
            f" - reserved_connections {conns.reserved_connections})"
            if conns.reserved_connections is not None
            else ")"
        )
    )
    fix = "reap idle sessions (a policy with max_idle), pool connections, or raise max_connections"
    if _at_least(conns.client_sessions, conns.usable, PROBLEM_PERCENT):
        problems.append(Finding(message=f"server near its connection limit: {usage}", fix=fix))
    elif _at_least(conns.client_sessions, conns.usable, WARNING_PERCENT):
        warnings.append(Finding(message=f"server connection usage high: {usage}", fix=fix))


def _limit(limit: Limit, problems: list[Finding], warnings: list[Finding]) -> None:
    name = quote_identifier(limit.name)
    what = f"{limit.kind} {escaped(limit.name)}"
    alter = f"ALTER {limit.kind.upper()} {name} CONNECTION LIMIT"
    if limit.connection_limit == 0:
        warnings.append(
            Finding(
                message=f"{what} has CONNECTION LIMIT 0: no new session may log in",
                fix=f"{alter} -1 (or the limit it should have)",
            )
        )
        return
    usage = f"{limit.sessions} of {limit.connection_limit} sessions ({limit.percent:.0f}%)"
    kill = "--user" if limit.kind == "role" else "--database"
    command = shlex.join(["pg-reaper", "kill", kill, limit.name])
    fix = f"end its idle sessions ({escaped(command)}), or {alter} <higher>"
    if _at_least(limit.sessions, limit.connection_limit, PROBLEM_PERCENT):
        problems.append(Finding(message=f"{what} near its connection limit: {usage}", fix=fix))
    elif _at_least(limit.sessions, limit.connection_limit, WARNING_PERCENT):
        warnings.append(Finding(message=f"{what} close to its connection limit: {usage}", fix=fix))


# What each server-side timeout does, and which policy threshold it races with.
_TIMEOUT_RULES: dict[str, tuple[str, frozenset[str] | None, str]] = {
    "idle_session_timeout": (
        "ends sessions idle outside a transaction for longer than",
        frozenset({"idle"}),
        "max_idle",
    ),
    "idle_in_transaction_session_timeout": (
        "ends sessions idle inside a transaction for longer than",
        frozenset({"idle in transaction", "idle in transaction (aborted)"}),
        "max_idle",
    ),
    "transaction_timeout": (
        "ends sessions whose transaction has lasted longer than",
        None,
        "max_transaction_age",
    ),
    "statement_timeout": (
        "cancels statements running longer than",
        frozenset({"active"}),
        "max_runtime",
    ),
}


def timeout_notes(timeouts: Iterable[Setting], policies: Sequence[PolicyConfig]) -> list[str]:
    """How each server-side timeout in force meets the server's policies (informational)."""
    notes = []
    for setting in timeouts:
        if not setting.milliseconds or setting.name not in _TIMEOUT_RULES:
            continue
        does, states, threshold = _TIMEOUT_RULES[setting.name]
        later, first = [], []
        for policy in policies:
            value: timedelta | None = getattr(policy, threshold)
            if value is None or (states is not None and not states & set(policy.states)):
                continue
            described = f"{policy.name!r} ({threshold} {format_duration(value)})"
            if value.total_seconds() * 1000 >= setting.milliseconds:
                later.append(described)
            else:
                first.append(described)
        note = (
            f"{setting.name} = {setting.value} {setting.scope}: the server itself {does} "
            f"{setting.value}, for every application (psql and poolers included) unless a "
            "session sets it to 0 for itself"
        )
        if later:
            note += (
                f"; it acts before policy {', '.join(later)}, which will meet only such sessions"
            )
        if first:
            note += f"; policy {', '.join(first)} acts first"
        notes.append(note)
    return notes


def _alter(setting: Setting, action: str) -> str:
    if setting.role is not None:
        where = f" IN DATABASE {quote_identifier(setting.database)}" if setting.database else ""
        return f"ALTER ROLE {quote_identifier(setting.role)}{where} {action}"
    if setting.database is not None:
        return f"ALTER DATABASE {quote_identifier(setting.database)} {action}"
    return f"ALTER ROLE ALL {action}"


def _at_least(part: int, whole: int, percent: int) -> bool:
    """part / whole >= percent %, in integers (no rounding at the threshold)."""
    return part * 100 >= whole * percent
