"""The leak report's reads of the audit table (report_table.sql, report.sql): which application,
role, database, client, policy or server the reaped sessions came from, over a window of time.
reaper/commands/report.py parses the command line and renders what this returns.

Read-only; the table is never made here (the writer, reaper/pg/audit.py, does that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg import sql

from reaper.audit_event import COLUMNS
from reaper.identifiers import quote_identifier
from reaper.pg.connection import query

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

    from reaper.pg.connection import Connection

__all__ = [
    "GROUP_COLUMNS",
    "AuditTableUnreadable",
    "LeakGroup",
    "LeakReport",
    "read_leaks",
]

REPORT_TABLE_SQL = query("report_table")
REPORT_SQL = query("report")
# `--by` -> the audit table's column it groups by: the only names that reach the SQL, each as an
# identifier.
GROUP_COLUMNS: dict[str, str] = {
    "application": "application",
    "user": "user",
    "database": "database",
    "client": "client_addr",
    "policy": "policy",
    "server": "server",
}
# The columns report.sql reads, with the types pg-reaper writes them with.
_READ = ("logged_at", "event", "server", "dry_run", "result", "pid", "backend_start")
_TYPES = dict(COLUMNS)
READ_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (name, _TYPES[name])
    for name in dict.fromkeys((*_READ, "idle_seconds", *GROUP_COLUMNS.values()))
)


class AuditTableUnreadable(Exception):  # noqa: N818 - a reason, said as it is
    """The audit table is missing, or the report may not (or should not) read it: a matter of
    configuration or privileges, said with the fix."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LeakGroup:
    """The sessions reaped of one application (user, database, ...) in the window."""

    name: str | None  # NULL in the table: not known when the session was reaped
    sessions: int  # reaped: terminated or cancelled, not in a dry run; each session once
    idle_seconds: float  # the idle time they held when reaped, summed
    longest_idle_seconds: float | None
    dry_run_sessions: int  # would have been reaped (dry run), and were not in the window
    first_reaped: datetime | None
    last_reaped: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class LeakReport:
    """The top groups, and the totals over every group in the window."""

    groups: tuple[LeakGroup, ...]
    total_groups: int = 0
    total_sessions: int = 0
    total_idle_seconds: float = 0.0
    total_dry_run_sessions: int = 0


def read_leaks(  # noqa: PLR0913 - keyword-only: one report's window, grouping and filter
    conn: Connection,
    *,
    table: tuple[str, str],
    by: str,
    start: datetime,
    end: datetime,
    top: int,
    server: str | None = None,
) -> LeakReport:
    """The report, after checking that `table` (schema, name) can be read safely.
    `AuditTableUnreadable` when it cannot (missing, no privilege, not pg-reaper's table);
    `PostgresError` when the audit database cannot be reached or the query fails."""
    _check_table(conn, table)
    statement = sql.SQL(REPORT_SQL).format(
        table=sql.Identifier(*table), group=sql.Identifier("a", GROUP_COLUMNS[by])
    )
    rows = conn.run(
        statement,
        {"start": start, "end": end, "top": min(top, 2**62), "server": server},
        doing="reading the audit table",
    )
    groups = tuple(_group(row) for row in rows)
    if not rows:
        return LeakReport(groups=())
    first = rows[0]
    return LeakReport(
        groups=groups,
        total_groups=first["total_groups"],
        total_sessions=first["total_sessions"],
        total_idle_seconds=first["total_idle_seconds"],
        total_dry_run_sessions=first["total_dry_run_sessions"],
    )


def _group(row: Mapping[str, Any]) -> LeakGroup:
    return LeakGroup(
        name=row["name"],
        sessions=row["sessions"],
        idle_seconds=row["idle_seconds"],
        longest_idle_seconds=row["longest_idle_seconds"],
        dry_run_sessions=row["dry_run_sessions"],
        first_reaped=row["first_reaped"],
        last_reaped=row["last_reaped"],
    )


def _check_table(conn: Connection, table: tuple[str, str]) -> None:
    """Say why `table` cannot be read, with the fix: no schema, no table, no privilege, not a
    table, row security of an untrusted owner, columns not of pg-reaper's types."""
    schema, name = table
    shown = f"{quote_identifier(schema)}.{quote_identifier(name)}"
    rows = conn.run(
        REPORT_TABLE_SQL,
        {
            "schema": schema,
            "name": name,
            "columns": [c for c, _ in READ_COLUMNS],
            "types": [t for _, t in READ_COLUMNS],
        },
        doing="looking up the audit table",
    )
    where = f"{conn.target}: the audit table {shown}"
    if not rows or not rows[0]["present"]:
        raise AuditTableUnreadable(
            f"{where} does not exist: pg-reaper makes it when run, once or kill first "
            "start with this [audit] section; check [audit] dsn and table (docs/audit.md)"
        )
    found = rows[0]
    reader = quote_identifier(found["reader"])
    elsewhere = "or run the report as a role that has it (PG_REAPER_AUDIT__DSN, docs/report.md)"
    if not found["schema_usage"]:
        raise AuditTableUnreadable(
            f"{where} cannot be read: role {reader} lacks USAGE on schema "
            f"{quote_identifier(schema)}: GRANT USAGE ON SCHEMA {quote_identifier(schema)} TO "
            f"{reader}, {elsewhere}"
        )
    if not found["table_select"]:
        raise AuditTableUnreadable(
            f"{where} cannot be read: role {reader} lacks SELECT on it: "
            f"GRANT SELECT ON {shown} TO {reader}, {elsewhere}"
        )
    if not found["is_table"]:
        raise AuditTableUnreadable(f"{where} is not a table (a view?): not read")
    if not found["table_trusted"]:
        raise AuditTableUnreadable(
            f"{where} has row-level security and is owned by role "
            f"{quote_identifier(found['table_owner'])}, neither {reader} nor a superuser: its "
            "policies would run that role's code as the reader, so it is not read (docs/report.md)"
        )
    if found["mistyped"]:
        raise AuditTableUnreadable(
            f"{where} is not pg-reaper's: these columns are missing or of another type: "
            f"{', '.join(found['mistyped'])} (docs/audit.md lists them)"
        )
