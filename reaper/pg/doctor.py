"""`pg-reaper doctor`'s and `sessions`' read-only queries (doctor_*.sql); reaper/commands/doctor.py
judges the rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reaper.pg.connection import PostgresError, query

if TYPE_CHECKING:
    from reaper.pg.connection import Connection

__all__ = ["connection_limits", "doctor_rows"]

DOCTOR_SQL = {
    name: query(f"doctor_{name}") for name in ("server", "connections", "limits", "overrides")
}
DOCTOR_TIMEOUTS_SQL = query("doctor_timeouts")


def doctor_rows(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """The rows of every doctor query, by name (`server`, `connections`, `limits`, `overrides`,
    `timeouts`), from one snapshot of the server. Changes nothing."""
    rows = conn.run_together(DOCTOR_SQL)
    rows["timeouts"] = _client_timeouts(conn)
    return rows


def _client_timeouts(conn: Connection) -> list[dict[str, Any]]:
    """doctor_timeouts.sql in a session of its own that pins everything but the timeouts: the
    timeouts a client of the reaper's role and database gets, and where each comes from (the
    reaper's own session shows its pins). None readable (a tiny per-role idle_session_timeout,
    say): no rows, and doctor says what it could read."""
    with conn.sibling(pin_timeouts=False) as probe:
        try:
            return probe.run(DOCTOR_TIMEOUTS_SQL)
        except PostgresError:
            return []


def connection_limits(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """The doctor's `connections` and `limits` rows, for `pg-reaper sessions`. Read-only."""
    return {name: conn.run(DOCTOR_SQL[name]) for name in ("connections", "limits")}
