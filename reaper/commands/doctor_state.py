"""What `pg-reaper doctor` learns about one server: the facts, and `read_state`, which builds them
from the rows of its read-only queries (reaper/pg/sql/doctor_*.sql). Pure: no I/O.

Each fact's fields are named as the columns of the query it comes from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from reaper.commands.connections import Connections, percent_of
from reaper.output import safe_text
from reaper.pg.connection import PostgresError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "TIMEOUTS",
    "Limit",
    "Privileges",
    "ServerState",
    "Setting",
    "escaped",
    "pg_milliseconds",
    "read_state",
]

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
            return f"in database {escaped(self.database)}"
        where = f" in database {escaped(self.database)}" if self.database is not None else ""
        return f"for role {escaped(self.role)}{where}"


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


def read_state(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> ServerState:
    """The rows of the doctor queries (reaper/pg/sql/doctor_*.sql) as one `ServerState`."""
    if not rows["server"] or not rows["connections"]:
        raise PostgresError("the reaper's role is not in pg_roles")
    server = rows["server"][0]
    overrides = [_override(row) for row in rows["overrides"]]
    server_wide = [
        _server_wide(row)
        for row in sorted(rows["timeouts"], key=lambda r: TIMEOUTS.index(r["name"]))
    ]
    limit = server["connection_limit"]
    return ServerState(
        server_version=server["server_version"],
        server_version_num=server["server_version_num"],
        in_recovery=server["in_recovery"],
        privileges=Privileges(
            **_columns(
                Privileges,
                server,
                connection_limit=None if limit is None or limit < 0 else limit,
            )
        ),
        track_activities=server["track_activities"],
        connections=Connections(**_columns(Connections, rows["connections"][0])),
        timeouts=(*server_wide, *(o for o in overrides if o.name in TIMEOUTS)),
        untracked=tuple(
            o for o in overrides if o.name == "track_activities" and o.value.strip().lower() in _OFF
        ),
        limits=tuple(Limit(**_columns(Limit, row)) for row in rows["limits"]),
    )


def _columns(cls: type, row: Mapping[str, Any], **computed: object) -> dict[str, Any]:
    """The fields of dataclass `cls` from the columns of `row` named alike, but for `computed`."""
    return {f.name: row[f.name] for f in fields(cls) if f.name not in computed} | computed


def _override(row: Mapping[str, Any]) -> Setting:
    """A setting of pg_db_role_setting (ALTER ROLE/DATABASE ... SET), as written there."""
    timeout = row["name"] in TIMEOUTS
    return Setting(
        name=row["name"],
        value=_pg_setting(row["value"], "ms") if timeout else row["value"],
        milliseconds=pg_milliseconds(row["value"]) if timeout else None,
        source=_override_source(role=row["role"], database=row["database"]),
        override=True,
        role=row["role"],
        database=row["database"],
    )


def _server_wide(row: Mapping[str, Any]) -> Setting:
    """A timeout of pg_settings, as a client of the reaper's role and database gets it."""
    return Setting(
        name=row["name"],
        value=_pg_setting(row["setting"], row["unit"]),
        milliseconds=pg_milliseconds(row["setting"], unit=row["unit"] or "ms"),
        source=row["source"],
    )


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


def escaped(value: object) -> str:
    """A name (or a target, a command) as doctor prints it: control characters escaped."""
    return safe_text(value, width=_WIDTH)
