"""`pg-reaper doctor`: what each server and the reaper's role on it look like, and what is wrong.

A thin I/O shell (`examine`: one read-only round of queries through `ServerConnection`) around a
pure core: `read_state` turns the rows into a `ServerState`, `diagnose` turns that and the
server's policies into problems (exit 1), warnings and notes, with the thresholds below.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from reaper.commands.connections import Connections, percent_of
from reaper.identifiers import quote_identifier
from reaper.output import safe_text
from reaper.pg.connection import PostgresError
from reaper.pg.doctor import doctor_rows
from reaper.settings import format_duration

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from datetime import timedelta

    from reaper.pg.activity import ServerConnection
    from reaper.settings import PolicyConfig

__all__ = [
    "Connections",
    "Diagnosis",
    "Finding",
    "Limit",
    "Privileges",
    "ServerReport",
    "ServerState",
    "Setting",
    "diagnose",
    "examine",
    "read_state",
    "render_json",
    "render_text",
    "unreachable",
]

# Share of the usable slots (or of a role's or database's limit) in use.
WARNING_PERCENT = 80
PROBLEM_PERCENT = 90

TIMEOUTS = (
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    "transaction_timeout",
    "statement_timeout",
)
_UNIT_MS = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_PG_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\s*", re.ASCII)
_OFF = frozenset({"off", "of", "false", "fals", "fal", "fa", "f", "no", "n", "0"})
_SERVER_WIDE_SOURCES = frozenset(
    {"default", "configuration file", "command line", "environment variable", "override"}
)
_WIDTH = 200  # role and database names are at most 63 bytes; this only escapes them


# --- the facts ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Privileges:
    """The reaper's role on one server."""

    role: str
    superuser: bool
    signal_backend: bool  # has the privileges of pg_signal_backend
    read_all_stats: bool  # of pg_read_all_stats (pg_monitor includes it)
    monitor: bool
    use_reserved_connections: bool | None  # PostgreSQL 16+; None before
    connection_limit: int | None  # the role's rolconnlimit; None: no limit


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """A timeout (or track_activities) in force server-wide or set for a role and/or database."""

    name: str
    value: str  # as PostgreSQL shows it ("0", "5min") or as written in ALTER ROLE/DATABASE
    milliseconds: int | None = None  # timeouts only; None when not understood
    source: str  # pg_settings.source: default, configuration file, ..., user, database
    role: str | None = None  # set by ALTER ROLE (None: every role)
    database: str | None = None  # set by ALTER DATABASE or ALTER ROLE ... IN DATABASE

    override: bool = False  # from pg_db_role_setting, not from pg_settings

    @property
    def scope(self) -> str:
        if not self.override:
            if self.source in _SERVER_WIDE_SOURCES:
                return f"server-wide ({self.source})"
            # The reaper's own role, database or DSN options mask the server-wide value.
            return f"as the reaper's session gets it ({self.source})"
        if self.role is None and self.database is None:
            return "for every role (ALTER ROLE ALL)"
        if self.role is None:
            return f"in database {_text(self.database)}"
        where = f" in database {_text(self.database)}" if self.database is not None else ""
        return f"for role {_text(self.role)}{where}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """A role's or a database's CONNECTION LIMIT and its client sessions now."""

    kind: Literal["role", "database"]
    name: str
    connection_limit: int
    sessions: int

    @property
    def percent(self) -> float:
        return percent_of(self.sessions, self.connection_limit)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerState:
    """Everything `doctor` learnt about one server."""

    server_version: str
    server_version_num: int
    in_recovery: bool
    privileges: Privileges
    track_activities: bool
    connections: Connections
    timeouts: tuple[Setting, ...]  # server-wide first, then per role/database
    untracked: tuple[Setting, ...] = ()  # track_activities = off for a role or database
    limits: tuple[Limit, ...] = ()


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


# --- the shell ---------------------------------------------------------------------------------


def examine(
    conn: ServerConnection, *, server: str, policies: Sequence[PolicyConfig]
) -> ServerReport:
    """Query one server (read-only) and diagnose it; an unreachable server is a problem too."""
    try:
        state = read_state(doctor_rows(conn))
    except PostgresError as exc:
        return unreachable(server=server, target=conn.target, error=str(exc))
    return ServerReport(
        server=server,
        target=conn.target,
        state=state,
        diagnosis=diagnose(state, policies=policies),
    )


def unreachable(*, server: str, target: str, error: str) -> ServerReport:
    """The report of a server that could not be examined: its error is its problem."""
    return ServerReport(
        server=server, target=target, state=None, error=error, diagnosis=failed(error)
    )


# --- the pure core -----------------------------------------------------------------------------


def read_state(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> ServerState:
    """The rows of the doctor queries (reaper/pg/sql/doctor_*.sql) as one `ServerState`."""
    if not rows["server"] or not rows["connections"]:
        raise PostgresError("the reaper's role is not in pg_roles")
    server = rows["server"][0]
    conns = rows["connections"][0]
    overrides = [
        Setting(
            name=row["name"],
            value=_pg_setting(row["value"], "ms") if row["name"] in TIMEOUTS else row["value"],
            milliseconds=pg_milliseconds(row["value"]) if row["name"] in TIMEOUTS else None,
            source=_override_source(role=row["role"], database=row["database"]),
            override=True,
            role=row["role"],
            database=row["database"],
        )
        for row in rows["overrides"]
    ]
    server_wide = [
        Setting(
            name=row["name"],
            value=_pg_setting(row["setting"], row["unit"]),
            milliseconds=pg_milliseconds(row["setting"], unit=row["unit"] or "ms"),
            source=row["source"],
        )
        for row in sorted(rows["timeouts"], key=lambda r: TIMEOUTS.index(r["name"]))
    ]
    limit = server["connection_limit"]
    return ServerState(
        server_version=server["server_version"],
        server_version_num=server["server_version_num"],
        in_recovery=server["in_recovery"],
        privileges=Privileges(
            role=server["role"],
            superuser=server["superuser"],
            signal_backend=server["signal_backend"],
            read_all_stats=server["read_all_stats"],
            monitor=server["monitor"],
            use_reserved_connections=server["use_reserved_connections"],
            connection_limit=None if limit is None or limit < 0 else limit,
        ),
        track_activities=server["track_activities"],
        connections=Connections(
            client_sessions=conns["client_sessions"],
            hidden_sessions=conns["hidden_sessions"],
            disabled_sessions=conns["disabled_sessions"],
            max_connections=conns["max_connections"],
            superuser_reserved_connections=conns["superuser_reserved_connections"],
            reserved_connections=conns["reserved_connections"],
        ),
        timeouts=(*server_wide, *(o for o in overrides if o.name in TIMEOUTS)),
        untracked=tuple(
            o for o in overrides if o.name == "track_activities" and o.value.strip().lower() in _OFF
        ),
        limits=tuple(
            Limit(
                kind=row["kind"],
                name=row["name"],
                connection_limit=row["connection_limit"],
                sessions=row["sessions"],
            )
            for row in rows["limits"]
        ),
    )


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
                message=f"role {_text(priv.role)} is a superuser: more than the reaper needs",
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
                message=f"ROLE {_text(priv.role)} LACKS pg_read_all_stats: the state of other "
                f"roles' sessions is hidden from it ({hidden} hidden now), SO THE REAPER WOULD "
                "SILENTLY MATCH NONE OF THEM",
                fix=f"GRANT pg_read_all_stats TO {role}",
            )
        )
    if not priv.signal_backend:
        problems.append(
            Finding(
                message=f"role {_text(priv.role)} lacks pg_signal_backend: it may signal only "
                "sessions of roles whose privileges it has",
                fix=f"GRANT pg_signal_backend TO {role}",
            )
        )
    reserved = state.connections.reserved_connections
    if priv.use_reserved_connections is None or reserved is None:
        return  # before PostgreSQL 16
    if not priv.use_reserved_connections:
        notes.append(
            f"role {_text(priv.role)} does not have pg_use_reserved_connections: should its "
            "connection be lost while the server is full, the reaper cannot get back in to free "
            f"it. GRANT pg_use_reserved_connections TO {role}"
            + ("" if reserved else " and set reserved_connections (e.g. 2)")
        )
    elif reserved == 0:
        notes.append(
            f"role {_text(priv.role)} has pg_use_reserved_connections but reserved_connections "
            "is 0: no slot is kept for it when the server is full; set reserved_connections "
            "(e.g. 2)"
        )


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
    what = f"{limit.kind} {_text(limit.name)}"
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
    fix = f"end its idle sessions ({_text(command)}), or {alter} <higher>"
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


# --- helpers -----------------------------------------------------------------------------------


def pg_milliseconds(value: str, *, unit: str = "ms") -> int | None:
    """A time setting as PostgreSQL reads it ('5min', '5 min', '300000', '1.5s') in ms."""
    match = _PG_DURATION.fullmatch(value)
    if match is None:
        return None
    amount, written_unit = match.groups()
    factor = _UNIT_MS.get(written_unit or unit)
    return None if factor is None else round(float(amount) * factor)


def _pg_setting(setting: str, unit: str | None) -> str:
    """A time setting as PostgreSQL prints it: 300000 (unit ms) or '5 min' is '5min'."""
    ms = pg_milliseconds(setting, unit=unit or "ms")
    if ms is None:
        return setting.strip()
    if ms == 0:
        return "0"
    for name in ("d", "h", "min", "s"):
        size = int(_UNIT_MS[name])
        if ms % size == 0:
            return f"{ms // size}{name}"
    return f"{ms}ms"


def _override_source(*, role: str | None, database: str | None) -> str:
    """pg_settings.source a session gets from pg_db_role_setting."""
    if role is None:
        return "global" if database is None else "database"
    return "user" if database is None else "database user"


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


def _text(value: object) -> str:
    return safe_text(value, width=_WIDTH)


# --- output ------------------------------------------------------------------------------------

_LABEL = 13


def render_text(reports: Sequence[ServerReport]) -> str:
    """A few aligned lines per server, then one line per problem, warning and note."""
    return "\n\n".join(_render_server(report) for report in reports)


def _render_server(report: ServerReport) -> str:
    diagnosis = report.diagnosis
    counts = [
        _plural(len(diagnosis.problems), "problem"),
        _plural(len(diagnosis.warnings), "warning"),
    ]
    status = ", ".join(c for c in counts if c) or "ok"
    lines = [f"{safe_text(report.server, width=63)} ({_text(report.target)}): {status}"]
    if report.state is not None:
        lines.extend(_facts_lines(report.state))
    lines.extend(f"  PROBLEM: {_finding(f)}" for f in diagnosis.problems)
    lines.extend(f"  warning: {_finding(f)}" for f in diagnosis.warnings)
    lines.extend(f"  note: {n}" for n in diagnosis.notes)
    return "\n".join(lines)


def _facts_lines(state: ServerState) -> list[str]:
    priv = state.privileges
    conns = state.connections
    if priv.superuser:
        grants = "superuser"
    else:
        grants = ", ".join(
            f"{name} {'yes' if has else 'no'}"
            for name, has in (
                ("pg_signal_backend", priv.signal_backend),
                ("pg_read_all_stats", priv.read_all_stats),
                ("pg_monitor", priv.monitor),
                ("pg_use_reserved_connections", priv.use_reserved_connections),
            )
            if has is not None
        )
    own_limit = "none" if priv.connection_limit is None else str(priv.connection_limit)
    kind = "standby (in recovery)" if state.in_recovery else "primary"
    usage = conns.usage()
    rows: list[tuple[str, str]] = [
        ("version", f"PostgreSQL {state.server_version}, {kind}"),
        ("role", f"{_text(priv.role)}: {grants}; connection limit {own_limit}"),
        ("connections", usage),
    ]
    unset = [t.name for t in state.timeouts if t.milliseconds == 0 and not t.override]
    timeouts = [
        f"{t.name} = {t.value} {t.scope}"
        for t in state.timeouts
        if t.name not in unset or t.override
    ]
    if unset:
        timeouts.append(f"0 (off): {', '.join(unset)}")
    rows.extend(("timeouts" if i == 0 else "", line) for i, line in enumerate(timeouts))
    rows.extend(
        ("limits" if i == 0 else "", _limit_usage(limit)) for i, limit in enumerate(state.limits)
    )
    return [f"  {label.ljust(_LABEL)}{value}" for label, value in rows]


def _limit_usage(limit: Limit) -> str:
    return (
        f"{limit.kind} {_text(limit.name)}: {limit.sessions} of {limit.connection_limit} "
        f"sessions ({limit.percent:.0f}%)"
    )


def _finding(finding: Finding) -> str:
    return f"{finding.message} — fix: {finding.fix}" if finding.fix else finding.message


def _plural(count: int, noun: str) -> str:
    return "" if count == 0 else f"{count} {noun}{'s' if count != 1 else ''}"


def render_json(reports: Sequence[ServerReport]) -> dict[str, Any]:
    return {
        "servers": [_server_json(report) for report in reports],
        "ok": all(report.ok for report in reports),
    }


def _server_json(report: ServerReport) -> dict[str, Any]:
    state = report.state
    document: dict[str, Any] = {
        "server": report.server,
        "target": report.target,
        "ok": report.ok,
        "error": report.error,
        "version": state.server_version if state else None,
        "version_num": state.server_version_num if state else None,
        "in_recovery": state.in_recovery if state else None,
        "role": state.privileges.role if state else None,
        "privileges": None,
        "track_activities": state.track_activities if state else None,
        "timeouts": [],
        "connections": None,
        "limits": [],
    }
    if state is not None:
        priv = state.privileges
        conns = state.connections
        document["privileges"] = {
            "superuser": priv.superuser,
            "pg_signal_backend": priv.signal_backend,
            "pg_read_all_stats": priv.read_all_stats,
            "pg_monitor": priv.monitor,
            "pg_use_reserved_connections": priv.use_reserved_connections,
            "connection_limit": priv.connection_limit,
        }
        document["timeouts"] = [
            {
                "name": t.name,
                "value": t.value,
                "milliseconds": t.milliseconds,
                "source": t.source,
                "role": t.role,
                "database": t.database,
            }
            for t in state.timeouts
        ]
        document["connections"] = conns.as_json()
        document["limits"] = [
            {
                "kind": limit.kind,
                "name": limit.name,
                "connection_limit": limit.connection_limit,
                "sessions": limit.sessions,
                "percent": round(limit.percent, 1),
            }
            for limit in state.limits
        ]
    diagnosis = report.diagnosis
    document["problems"] = [{"message": f.message, "fix": f.fix} for f in diagnosis.problems]
    document["warnings"] = [{"message": f.message, "fix": f.fix} for f in diagnosis.warnings]
    document["notes"] = list(diagnosis.notes)
    return document
