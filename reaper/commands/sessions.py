"""`pg-reaper sessions`: one server's client sessions by state, database, role or application,
against the server's usable slots and each role's and database's connection limit.

A pure core (`count_states`, `count_groups`) behind a thin shell (`census`) that talks to the
server only through `ServerConnection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from reaper.commands.connections import Connections, percent_of
from reaper.output import safe_text, table_lines
from reaper.pg.connection import PostgresError
from reaper.pg.doctor import connection_limits
from reaper.policy import HIDDEN_BACKEND
from reaper.settings import ALL_STATES

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from reaper.pg.activity import ServerConnection
    from reaper.policy import Session

__all__ = [
    "GROUPINGS",
    "Count",
    "SessionCounts",
    "census",
    "count_groups",
    "count_states",
    "render_counts_json",
    "render_counts_text",
]

Grouping = Literal["state", "database", "user", "application"]
GROUPINGS: tuple[Grouping, ...] = ("state", "database", "user", "application")
# The state of a row the reaper's role may not see (NULL in pg_stat_activity): the metrics'
# `state="unknown"` too.
UNKNOWN_STATE = "unknown"
_GROUP_HEADERS = {"state": "STATE", "database": "DATABASE", "user": "USER", "application": "APP"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Count:
    """Client sessions of one state, database, role or application."""

    name: str | None  # None: not visible to the reaper's role (no pg_read_all_stats)
    sessions: int
    connection_limit: int | None = None  # rolconnlimit / datconnlimit when >= 0

    @property
    def percent(self) -> float | None:
        if self.connection_limit is None:
            return None
        return percent_of(self.sessions, self.connection_limit)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionCounts:
    """`pg-reaper sessions` for one server."""

    server: str
    target: str  # host:port, never a secret
    by: Grouping
    error: str | None = None
    connections: Connections | None = None
    states: tuple[Count, ...] = ()
    groups: tuple[Count, ...] = ()  # by `by`; the states again for "state"

    @property
    def ok(self) -> bool:
        return self.error is None


# --- the pure core ----------------------------------------------------------------------------


def count_states(sessions: Iterable[Session]) -> tuple[Count, ...]:
    """Client sessions by state: every state PostgreSQL reports, 0 included, then `unknown`
    (a row the reaper's role may not see); a state unknown to pg-reaper is listed by its name."""
    counts = dict.fromkeys((*ALL_STATES, UNKNOWN_STATE), 0)
    for session in sessions:
        state = UNKNOWN_STATE if session.state is None else session.state
        counts[state] = counts.get(state, 0) + 1
    return tuple(Count(name=name, sessions=n) for name, n in counts.items())


def count_groups(
    sessions: Iterable[Session], *, by: Grouping, limits: Sequence[Mapping[str, Any]] = ()
) -> tuple[Count, ...]:
    """Client sessions per database, role or application, most first. A role or database with
    a connection limit (`limits`: doctor_limits.sql rows) is listed with it, even without
    sessions."""
    if by == "state":
        return count_states(sessions)
    kind = {"database": "database", "user": "role"}.get(by)
    limit_of: dict[str | None, int] = {
        row["name"]: row["connection_limit"] for row in limits if row["kind"] == kind
    }
    counts: dict[str | None, int] = dict.fromkeys(limit_of, 0)
    for session in sessions:
        key = _group_key(session, by)
        counts[key] = counts.get(key, 0) + 1
    groups = [
        Count(name=k, sessions=n, connection_limit=limit_of.get(k)) for k, n in counts.items()
    ]
    return tuple(sorted(groups, key=lambda c: (-c.sessions, c.name is None, c.name or "")))


def _group_key(session: Session, by: Grouping) -> str | None:
    if by == "database":
        return session.database
    if by == "user":
        return session.user
    # The application of a hidden row is NULL, not an empty application_name.
    return None if session.backend_type == HIDDEN_BACKEND else session.application


def _connections(row: Mapping[str, Any], sessions: Sequence[Session]) -> Connections:
    """The server's slots (doctor_connections.sql), with the sessions counted from the poll so
    that every number shown comes from one snapshot."""
    return Connections(
        client_sessions=len(sessions),
        hidden_sessions=sum(s.backend_type == HIDDEN_BACKEND for s in sessions),
        disabled_sessions=sum(s.state == "disabled" for s in sessions),
        max_connections=row["max_connections"],
        superuser_reserved_connections=row["superuser_reserved_connections"],
        reserved_connections=row["reserved_connections"],
    )


# --- the shell --------------------------------------------------------------------------------


def census(conn: ServerConnection, *, server: str, by: Grouping) -> SessionCounts:
    """Count one server's client sessions; an unreachable server is reported, not raised."""
    try:
        snapshot = conn.poll()
        rows = connection_limits(conn)
    except PostgresError as exc:
        return SessionCounts(server=server, target=conn.target, by=by, error=str(exc))
    if not rows["connections"]:
        return SessionCounts(server=server, target=conn.target, by=by, error="no answer")
    sessions = snapshot.sessions
    return SessionCounts(
        server=server,
        target=conn.target,
        by=by,
        connections=_connections(rows["connections"][0], sessions),
        states=count_states(sessions),
        groups=count_groups(sessions, by=by, limits=rows["limits"]),
    )


# --- the output -------------------------------------------------------------------------------


def render_counts_text(reports: Sequence[SessionCounts]) -> str:
    """Per server: one line of connection usage, then a table of the counts."""
    return "\n\n".join(_counts_text(report) for report in reports)


def _counts_text(report: SessionCounts) -> str:
    title = f"{safe_text(report.server, width=63)} ({safe_text(report.target, width=200)})"
    if report.connections is None:
        return f"{title}: cannot be reached: {report.error}"
    conns = report.connections
    lines = [f"{title}: {conns.usage()}", *_counts_table(report)]
    if conns.hidden_sessions:
        lines.append(
            f"  warning: {conns.hidden_sessions} sessions are hidden from the reaper's role "
            "(no pg_read_all_stats): their state, kind and application are unknown"
        )
    return "\n".join(lines)


def _counts_table(report: SessionCounts) -> list[str]:
    header = _GROUP_HEADERS[report.by]
    if report.by == "state":
        rows = [(c.name or UNKNOWN_STATE, str(c.sessions)) for c in report.groups]
        return table_lines((header, "SESSIONS"), rows, right_from=1, indent="  ")
    if not report.groups:
        return ["  (no client session)"]
    limited = [
        (_group_name(c.name), str(c.sessions), _limit_text(c), _percent_text(c))
        for c in report.groups
    ]
    return table_lines((header, "SESSIONS", "LIMIT", "USE"), limited, right_from=1, indent="  ")


def _group_name(name: str | None) -> str:
    if name is None:
        return "(not visible)"
    return safe_text(name, width=63) if name else "(empty)"


def _limit_text(count: Count) -> str:
    return "-" if count.connection_limit is None else str(count.connection_limit)


def _percent_text(count: Count) -> str:
    percent = count.percent
    return "-" if percent is None else f"{percent:.0f}%"


# The connection usage in each server's JSON: its `Connections`, less disabled_sessions.
_CONNECTION_KEYS = (
    "client_sessions",
    "hidden_sessions",
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "usable",
    "percent",
)


def render_counts_json(reports: Sequence[SessionCounts]) -> dict[str, Any]:
    return {
        "servers": [_counts_json(report) for report in reports],
        "ok": all(r.ok for r in reports),
    }


def _counts_json(report: SessionCounts) -> dict[str, Any]:
    conns = report.connections.as_json() if report.connections else {}
    return {
        "server": report.server,
        "target": report.target,
        "ok": report.ok,
        "error": report.error,
        **{key: conns.get(key) for key in _CONNECTION_KEYS},
        "states": {c.name: c.sessions for c in report.states},
        "by": report.by,
        "groups": [
            {
                "name": c.name,
                "sessions": c.sessions,
                "connection_limit": c.connection_limit,
                "percent": None if c.percent is None else round(c.percent, 1),
            }
            for c in report.groups
        ],
    }
