"""`pg-reaper kill --block-connections` and `unblock`: what keeps a database in use, and
ALTER DATABASE ... ALLOW_CONNECTIONS (kill_*.sql)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import sql

from reaper.pg.connection import query

if TYPE_CHECKING:
    from reaper.pg.connection import Connection

__all__ = ["allow_connections", "database_blockers"]

# {database} is filled in as an identifier, {allow} as the keyword true or false.
KILL_ALLOW_CONNECTIONS_SQL = query("kill_allow_connections")
KILL_BLOCKERS_SQL = query("kill_blockers")
# Why PostgreSQL refuses ALTER DATABASE ... ALLOW_CONNECTIONS, said so that it can be fixed.
_ALLOW_CONNECTIONS_HINTS = {
    "42501": "only the database's owner (or a member of the owning role) or a superuser may "
    "change ALLOW_CONNECTIONS; CREATEDB is not enough: connect as the owner, or GRANT the "
    "owning role to the reaper's role",
    "22023": "the reaper's own session is connected to that database: point the server's dsn "
    "at another database (dbname=postgres)",
    "25006": "a standby is read-only: run it against the primary (the change replicates)",
}


def database_blockers(conn: Connection, database: str) -> list[dict[str, Any]]:
    """What still keeps `database` in use (`kind`, `pid`, `gid` rows): kill_blockers.sql."""
    return conn.run(KILL_BLOCKERS_SQL, {"database": database})


def allow_connections(conn: Connection, database: str, *, allow: bool) -> None:
    """ALTER DATABASE `database` WITH ALLOW_CONNECTIONS `allow`; a `PostgresError` that says why
    when PostgreSQL refuses (owner or superuser only, never the reaper's own database)."""
    statement = sql.SQL(KILL_ALLOW_CONNECTIONS_SQL).format(
        database=sql.Identifier(database), allow=sql.SQL("true" if allow else "false")
    )
    conn.run(statement, hints=_ALLOW_CONNECTIONS_HINTS)
