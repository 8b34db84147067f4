"""The audit table (docs/audit.md): pg-reaper's session on the audit database, which checks who
owns the table and what the reaper may do there, makes the table when it is missing and inserts
rows in batches (audit_*.sql)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import sql

from reaper.audit_event import COLUMNS
from reaper.identifiers import quote_identifier
from reaper.pg.connection import Connection, PostgresError, query

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from datetime import timedelta
    from pathlib import Path

__all__ = ["AUDIT_COLUMNS", "AuditConnection"]

# {table} and {index} are filled in as identifiers.
AUDIT_EXISTS_SQL = query("audit_exists")
AUDIT_CREATE_SQL = query("audit_create")
AUDIT_INSERT_SQL = query("audit_insert")
# The audit table's columns as the reaper writes them, each with the type of its array parameter:
# derived from the one definition of an audit event.
AUDIT_COLUMNS = COLUMNS
AUDIT_ADD_INSTANCE_SQL = query("audit_add_instance")


class AuditConnection(Connection):
    """pg-reaper's session on the audit database, with the discipline of a server's (autocommit,
    application_name, connect_timeout, statement_timeout, bounded waits, password_file): makes
    the audit table if it is missing and inserts rows into it in batches."""

    def __init__(
        self,
        *,
        dsn: str,
        table: tuple[str, str],
        password_file: Path | None = None,
        connect_timeout: timedelta,
        statement_timeout: timedelta,
    ) -> None:
        super().__init__(
            dsn=dsn,
            password_file=password_file,
            connect_timeout=connect_timeout,
            statement_timeout=statement_timeout,
        )
        self.table = table  # (schema, name)
        self._table = sql.Identifier(*table)
        self._schema, self._name = table
        self._index = sql.Identifier(_index_name(table[-1]))
        self._checked: object = None  # the connection on which the table was found or made
        self._insert_sql = _audit_insert(self._table, with_instance=True)
        # Set when an older table lacks the instance column and it could not be added.
        self.outdated: str | None = None

    def insert(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write `rows` (dicts with the same keys, the columns) in one statement: all or none."""
        if not rows:
            return
        self._ensure_table()
        params = {column: [row[column] for row in rows] for column in rows[0]}
        self._run(self._insert_sql, params)

    def interrupt(self) -> None:
        """From another thread: cut short a statement waiting on a hung server."""
        conn = self._conn
        if conn is not None:
            self._sever(conn)

    def _ensure_table(self) -> None:
        self.connect()
        conn = self._conn
        if conn is None or conn is self._checked:
            return
        rows = self._run(AUDIT_EXISTS_SQL, {"schema": self._schema, "name": self._name})
        if not rows:
            raise PostgresError(f"{self.target}: schema {self._schema!r} does not exist")
        found = rows[0]
        for kind in ("schema", "table"):
            if not found[f"{kind}_trusted"]:
                raise PostgresError(
                    f"{self.target}: the audit table's {kind} is owned by role "
                    f"{found[f'{kind}_owner']!r}, neither the reaper's role nor a superuser: "
                    "its owner could make the reaper's INSERT run code (triggers, defaults), "
                    "so no rows are written there (docs/audit.md)"
                )
        self._check_privileges(found)
        self._insert_sql = _audit_insert(self._table, with_instance=True)
        self.outdated = None
        if not found["present"]:
            self._run(sql.SQL(AUDIT_CREATE_SQL).format(table=self._table, index=self._index))
        elif not found["has_instance"]:
            # Made by an earlier pg-reaper: add the column if the reaper's role owns the table,
            # else keep writing the other columns.
            try:
                self._run(sql.SQL(AUDIT_ADD_INSTANCE_SQL).format(table=self._table))
            except PostgresError as exc:
                if self._conn is None:
                    raise  # the connection was lost: try again later
                self._insert_sql = _audit_insert(self._table, with_instance=False)
                self.outdated = str(exc)
        self._checked = conn

    def _check_privileges(self, found: Mapping[str, Any]) -> None:
        """Say which privilege the reaper's role lacks on the audit table, and how to fix it."""
        schema = quote_identifier(self._schema)
        table = f"{schema}.{quote_identifier(self._name)}"
        role = "the reaper's role"
        if not found["schema_usage"]:
            missing = f"USAGE on schema {schema}: GRANT USAGE ON SCHEMA {schema} TO <{role}>"
        elif found["present"] and not found["table_insert"]:
            missing = f"INSERT on table {table}: GRANT INSERT ON {table} TO <{role}>"
        elif not found["present"] and not found["schema_create"]:
            missing = (
                f"CREATE on schema {schema} to make the table {table}: make it beforehand with "
                "deploy/sql/pg_reaper_audit.sql (then only INSERT is needed), or "
                f"GRANT CREATE ON SCHEMA {schema} TO <{role}>"
            )
        else:
            return
        raise PostgresError(f"{self.target}: {role} lacks {missing} (docs/audit.md)")

    def preflight(self) -> str | None:
        """Why the audit table cannot be written, checked at start; None when it can, or when
        the audit database does not answer (the writer keeps rows and retries meanwhile)."""
        try:
            self._ensure_table()
        except PostgresError as exc:
            return None if self._conn is None else str(exc)
        return None

    def _run(
        self, statement: str | sql.Composed, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        try:
            return self.run(statement, params)
        except PostgresError:  # refused by the server (no privilege, no schema, ...) or lost
            self._checked = None  # the table may have been dropped: look again next time
            raise


def _audit_insert(table: sql.Identifier, *, with_instance: bool) -> sql.Composed:
    """audit_insert.sql for `table`, with or without the `instance` column."""
    columns = [(c, t) for c, t in AUDIT_COLUMNS if with_instance or c != "instance"]
    return sql.SQL(AUDIT_INSERT_SQL).format(
        table=table,
        columns=sql.SQL(", ").join(sql.Identifier(c) for c, _ in columns),
        arrays=sql.SQL(", ").join(
            sql.SQL("pg_catalog.unnest({}::{}[])").format(sql.Placeholder(c), sql.SQL(t))
            for c, t in columns
        ),
    )


def _index_name(table: str) -> str:
    """``<table>_logged_at_idx``, the table part shortened to keep within 63 bytes (PostgreSQL
    would cut the whole name, which could then be the table's own)."""
    suffix = "_logged_at_idx"
    room = 63 - len(suffix)
    return table.encode()[:room].decode(errors="ignore") + suffix
