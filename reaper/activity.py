"""The PostgreSQL layer: the only module that talks to a server (and imports psycopg).

One persistent autocommit connection per server; a poll of client sessions with ages by the
server's clock; race-safe signalling with one result per victim.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal, Self

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from reaper import APPLICATION_NAME, deadlines
from reaper.policy import Result, RoleConnections, ServerFacts, Session

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from datetime import datetime, timedelta
    from pathlib import Path

__all__ = [
    "AuditConnection",
    "Leadership",
    "PostgresError",
    "ServerConnection",
    "Snapshot",
    "parse_conninfo",
    "poll_reads_every_role",
    "redact_conninfo",
]

Action = Literal["terminate", "cancel"]
_SIGNAL_FUNCTIONS: dict[Action, str] = {
    "terminate": "pg_terminate_backend",
    "cancel": "pg_cancel_backend",
}
_SIGNALLED: dict[Action, Result] = {"terminate": Result.TERMINATED, "cancel": Result.CANCELLED}
_SECRET_KEYS = frozenset({"password", "sslpassword"})
_INSUFFICIENT_PRIVILEGE = "42501"
# How long past statement_timeout the reaper waits for an answer before it gives up on the
# connection itself: a stopped or unreachable server cannot enforce its statement_timeout.
_ANSWER_GRACE_SECONDS = 2.0
_DETAILS = {
    "denied": "permission denied: a superuser's session, or the reaper's role lacks "
    "pg_signal_backend",
}


def _query(name: str) -> str:
    return files("reaper.sql").joinpath(f"{name}.sql").read_text(encoding="utf-8")


SESSION_SETTINGS_SQL = _query("session_settings")
FACTS_SQL = _query("facts")
# One statement: session, role, database and clock rows (see poll.sql), put together by poll();
# with a row for every role, or only for the roles that have a backend (poll_reads_every_role).
_POLL_TEMPLATE = _query("poll")
POLL_SQL = _POLL_TEMPLATE.replace("{every_role}", "true")
POLL_BACKEND_ROLES_SQL = _POLL_TEMPLATE.replace("{every_role}", "false")
SIGNAL_SQL = _query("signal")
HA_LEAD_SQL = _query("ha_lead")
HA_SESSION_SQL = _query("ha_session")
# Which cluster (and which run of it) a session is on: reaper/clusters.py.
CLUSTER_IDENTITY_SQL = _query("cluster_identity")
# `pg-reaper doctor`: read-only, run in one transaction (reaper/doctor.py reads the rows).
DOCTOR_SQL = {
    name: _query(f"doctor_{name}") for name in ("server", "connections", "limits", "overrides")
}
DOCTOR_RESET_TIMEOUTS_SQL = _query("doctor_reset_timeouts")
DOCTOR_TIMEOUTS_SQL = _query("doctor_timeouts")
# `pg-reaper kill --block-connections` and `unblock` (reaper/operate.py): {database} is filled in
# as an identifier, {allow} as the keyword true or false.
KILL_ALLOW_CONNECTIONS_SQL = _query("kill_allow_connections")
KILL_BLOCKERS_SQL = _query("kill_blockers")
# Why PostgreSQL refuses ALTER DATABASE ... ALLOW_CONNECTIONS, said so that it can be fixed.
_ALLOW_CONNECTIONS_HINTS = {
    "42501": "only the database's owner (or a member of the owning role) or a superuser may "
    "change ALLOW_CONNECTIONS; CREATEDB is not enough: connect as the owner, or GRANT the "
    "owning role to the reaper's role",
    "22023": "the reaper's own session is connected to that database: point the server's dsn "
    "at another database (dbname=postgres)",
    "25006": "a standby is read-only: run it against the primary (the change replicates)",
}
# The audit table (reaper/audit.py): {table} and {index} are filled in as identifiers.
AUDIT_EXISTS_SQL = _query("audit_exists")
AUDIT_CREATE_SQL = _query("audit_create")
AUDIT_INSERT_SQL = _query("audit_insert")
# The audit table's columns as the reaper writes them, each with the type of its array parameter.
AUDIT_COLUMNS = (
    ("logged_at", "timestamptz"),
    ("event", "text"),
    ("server", "text"),
    ("policy", "text"),
    ("action", "text"),
    ("dry_run", "boolean"),
    ("result", "text"),
    ("pid", "integer"),
    ("backend_start", "timestamptz"),
    ("database", "text"),
    ("user", "text"),
    ("application", "text"),
    ("client_addr", "text"),
    ("state", "text"),
    ("idle_seconds", "double precision"),
    ("transaction_seconds", "double precision"),
    ("connection_seconds", "double precision"),
    ("reason", "text"),
    ("detail", "text"),
    ("query", "text"),
    ("instance", "text"),
)
AUDIT_ADD_INSTANCE_SQL = _query("audit_add_instance")


class PostgresError(Exception):
    """A server could not be reached or queried. The message never holds a secret."""


# --- connection strings ------------------------------------------------------------------------


def parse_conninfo(dsn: str) -> dict[str, str]:
    """Parse a libpq conninfo string or URI; `ValueError` (secret-free) when it is malformed."""
    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except psycopg.ProgrammingError as exc:
        if '"' in dsn:  # libpq's quoting of the offending word cannot be undone safely
            raise ValueError(
                "invalid connection string: not key=value pairs or a postgresql:// URI"
            ) from None
        # libpq quotes the offending word, which may be a password: drop quoted words.
        message = re.sub(
            r'"([^"]*)"', lambda m: '"…"' if re.search(r"\w", m[1]) else m[0], str(exc).strip()
        )
        raise ValueError(f"invalid connection string: {message}") from None


def redact_conninfo(dsn: str) -> str:
    """The DSN in keyword form with every secret replaced: safe to print and log."""
    try:
        params = parse_conninfo(dsn)
    except ValueError:
        return "<invalid connection string>"
    return make_conninfo(**{k: "********" if k in _SECRET_KEYS else v for k, v in params.items()})


def _describe(params: dict[str, str]) -> str:
    host = params.get("host") or params.get("hostaddr") or "default socket"
    port = params.get("port")
    return f"{host}:{port}" if port else host


def _clean_error(exc: BaseException, password: str | None) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if password:
        message = message.replace(password, "********")
    return message


# --- the poll ----------------------------------------------------------------------------------


def poll_reads_every_role(roles: int | None, sessions: int) -> bool:
    """Whether the next poll should return a row for every role (`POLL_SQL`) rather than only
    for the roles that have a backend (`POLL_BACKEND_ROLES_SQL`), given the roles the last poll
    that read every role saw (None: none yet) and the sessions of the last poll. A role row
    costs the server about what a backend costs the other way: read every role unless there
    are more roles than sessions. Either way the sessions and their values are the same."""
    return roles is None or sessions >= roles


def _age(now: datetime, then: datetime | None) -> float | None:
    """`now - then` in seconds, both read from the server: the age by the server's clock (the
    same float8 as ``extract(epoch FROM now() - then)::float8``)."""
    return None if then is None else (now - then).total_seconds()


def _session(
    row: Mapping[str, Any],
    roles: Mapping[int, Mapping[str, Any]],
    databases: Mapping[int, str],
    now: datetime,
) -> Session | None:
    """A session row of poll.sql with its role's and database's names; None for a hidden row
    (NULL backend_type) whose role or database has no name, as pg_stat_activity would show it."""
    role = roles.get(row["role_oid"])
    database = databases.get(row["database_oid"])
    if row["backend_type"] is None and (role is None or database is None):
        return None
    return Session(
        pid=row["pid"],
        backend_type=row["backend_type"] or "unknown",
        database=database,
        user=None if role is None else role["name"],
        application=row["application_name"] or "",
        client_addr=row["client_addr"],
        state=row["state"],
        backend_start=row["backend_start"],
        state_change=row["state_change"],
        idle_seconds=_age(now, row["state_change"]),
        transaction_seconds=_age(now, row["xact_start"]),
        runtime_seconds=_age(now, row["query_start"]),
        connection_seconds=_age(now, row["backend_start"]),
        superuser=False if role is None else role["superuser"],
        member=False if role is None else role["member"],
        query=row["query"],  # NULL unless include_query
    )


# --- the connection ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """One poll of one server."""

    facts: ServerFacts
    sessions: tuple[Session, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Leadership:
    """Whether this session holds a server's advisory lock ([ha]), and which backend does."""

    leader: bool
    holder: int | None  # the pid of the backend holding the lock, None when it is free


class ServerConnection:
    """The reaper's one persistent autocommit session on one server; reconnects when lost."""

    def __init__(
        self,
        *,
        dsn: str,
        password_file: Path | None = None,
        connect_timeout: timedelta,
        statement_timeout: timedelta,
        dbname: str | None = None,
        ha: bool = False,
    ) -> None:
        self._dsn = dsn
        self._dbname = dbname  # overrides the DSN's: [ha] lock_database
        self._ha = ha  # server-side TCP keepalives, so that a vanished leader frees its lock
        self._password_file = password_file
        self._connect_timeout = max(1, round(connect_timeout.total_seconds()))
        self._statement_timeout_ms = max(1, round(statement_timeout.total_seconds() * 1000))
        self._answer_deadline = statement_timeout.total_seconds() + _ANSWER_GRACE_SECONDS
        self._severed = False
        self.sessions_opened = 0  # a new session holds none of the old one's locks
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self._facts: ServerFacts | None = None
        self._roles_seen: int | None = None  # role rows of the last poll that read every role
        self._every_role = True  # what the next poll reads: see poll_reads_every_role
        self.target = _describe(parse_conninfo(dsn))

    # lifecycle

    def connect(self) -> None:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return
        self.close()
        password = self._read_password()
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "row_factory": dict_row,
            # Forced over whatever the DSN says: other pg-reapers recognise and spare it.
            "application_name": APPLICATION_NAME,
            "connect_timeout": self._connect_timeout,
        }
        if password is not None:
            kwargs["password"] = password
        if self._dbname is not None:
            kwargs["dbname"] = self._dbname
        try:
            conn = psycopg.Connection.connect(self._dsn, **kwargs)
        except psycopg.Error as exc:
            message = f"cannot connect to {self.target}: {_clean_error(exc, password)}"
            raise PostgresError(message) from None
        conn.add_notice_handler(lambda _notice: None)  # "PID n is not a PostgreSQL backend"
        try:
            self._answered(
                conn, SESSION_SETTINGS_SQL, {"statement_timeout": self._statement_timeout_ms}
            )
            if self._ha:
                self._answered(conn, HA_SESSION_SQL, None)
        except psycopg.Error as exc:
            conn.close()
            message = f"cannot set up session on {self.target}: {_clean_error(exc, None)}"
            raise PostgresError(message) from None
        self._conn = conn
        self._facts = None
        self.sessions_opened += 1
        self._roles_seen = None
        self._every_role = True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._facts = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _read_password(self) -> str | None:
        if self._password_file is None:
            return None
        try:
            return self._password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise PostgresError(
                f"cannot read password file '{self._password_file}': {exc.strerror}"
            ) from None

    def _execute(
        self, query: str | sql.Composed, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        self.connect()
        assert self._conn is not None  # noqa: S101 - connect() either sets it or raises
        try:
            return self._answered(self._conn, query, params)
        except psycopg.OperationalError as exc:
            # Lost connection or timeout: drop it, the next call reconnects.
            self.close()
            raise PostgresError(self._lost(exc)) from None

    def _answered(
        self,
        conn: psycopg.Connection[dict[str, Any]],
        query: str | sql.Composed,
        params: dict[str, Any] | None,
    ) -> list[dict[str, Any]]:
        """Run one statement, severing the connection if no answer comes in time."""
        self._severed = False
        deadline = deadlines.arm(self._answer_deadline, partial(self._sever, conn))
        try:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description is not None else []  # DDL, INSERT
        finally:
            deadline.cancel()

    def _sever(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        # Shutting the socket down (through a duplicate of libpq's descriptor) wakes the
        # blocked read with an error: libpq then reports the connection lost.
        self._severed = True
        with (
            contextlib.suppress(OSError, psycopg.Error),
            socket.socket(fileno=os.dup(conn.fileno())) as sock,
        ):
            sock.shutdown(socket.SHUT_RDWR)

    def _lost(self, exc: psycopg.Error) -> str:
        if self._severed:
            return (
                f"{self.target}: no answer within {self._answer_deadline:g}s "
                "(server stopped or unreachable?)"
            )
        return f"{self.target}: {_clean_error(exc, None)}"

    # queries

    def facts(self) -> ServerFacts:
        if self._facts is None or self._conn is None or self._conn.closed:
            rows = self._execute(FACTS_SQL)
            if not rows:
                raise PostgresError(f"{self.target}: the reaper's role is not in pg_roles")
            self._facts = ServerFacts(**rows[0])
        return self._facts

    def poll(self, *, include_query: bool = False) -> Snapshot:
        """Every client backend, as the server sees it now: one statement (poll.sql)."""
        facts = self.facts()
        every_role = self._every_role
        query = POLL_SQL if every_role else POLL_BACKEND_ROLES_SQL
        rows = self._execute(query, {"include_query": include_query})
        session_rows: list[dict[str, Any]] = []
        roles: dict[int, dict[str, Any]] = {}
        databases: dict[int, str] = {}
        now: datetime | None = None
        for row in rows:
            if row["pid"] is not None:
                session_rows.append(row)
            elif row["role_oid"] is not None:
                roles[row["role_oid"]] = row
            elif row["database_oid"] is not None:
                databases[row["database_oid"]] = row["name"]
            else:
                now = row["now"]
        if now is None:  # the clock row is always there
            raise PostgresError(f"{self.target}: the poll returned no clock row")
        if every_role:
            self._roles_seen = len(roles)
        self._every_role = poll_reads_every_role(self._roles_seen, len(session_rows))
        sessions = tuple(
            session
            for row in session_rows
            if (session := _session(row, roles, databases, now)) is not None
        )
        # How full the server is, for connection pressure: counted in the poll's own rows (the
        # reaper's session included), so that the counts and the sessions agree. Only roles with
        # sessions (whichever role rows the poll read): a role without is below any share.
        per_role = Counter(s.user for s in sessions)
        limited = tuple(
            RoleConnections(
                role=role["name"],
                limit=role["connection_limit"],
                sessions=per_role[role["name"]],
            )
            for role in roles.values()
            if role["connection_limit"] is not None and per_role[role["name"]]
        )
        facts = replace(facts, client_sessions=len(sessions), roles=limited)
        return Snapshot(facts=facts, sessions=sessions)

    def lead(self, lock_key: int, *, acquire: bool) -> Leadership:
        """Whether this session holds the advisory lock `lock_key` (checked in pg_locks), taking
        it first if it is free and `acquire`. A lost connection loses the lock with it: the
        session reopened by the next call holds nothing until it takes the lock again."""
        rows = self._execute(HA_LEAD_SQL, {"lock_key": lock_key, "acquire": acquire})
        return Leadership(leader=bool(rows[0]["leader"]), holder=rows[0]["holder"])

    def doctor_rows(self) -> dict[str, list[dict[str, Any]]]:
        """The rows of every doctor query, by name (`server`, `connections`, `limits`,
        `overrides`, `timeouts`), from one snapshot of the server. Changes nothing.
        """
        self.connect()
        assert self._conn is not None  # noqa: S101 - connect() either sets it or raises
        conn = self._conn
        try:
            # One transaction: one pg_stat_activity snapshot for every query, and the local
            # reset of the timeouts below ends with it (rolled back: nothing is written).
            with conn.transaction(force_rollback=True):
                rows = {name: self._answered(conn, sql_, None) for name, sql_ in DOCTOR_SQL.items()}
                # Last: from here on the server's own statement_timeout applies, not ours.
                self._answered(conn, DOCTOR_RESET_TIMEOUTS_SQL, None)
                rows["timeouts"] = self._answered(conn, DOCTOR_TIMEOUTS_SQL, None)
        except psycopg.OperationalError as exc:
            self.close()
            raise PostgresError(self._lost(exc)) from None
        except psycopg.Error as exc:
            raise PostgresError(f"{self.target}: {_clean_error(exc, None)}") from None
        return rows

    def connection_limits(self) -> dict[str, list[dict[str, Any]]]:
        """The doctor's `connections` and `limits` rows, for `pg-reaper sessions`. Read-only."""
        try:
            return {name: self._execute(DOCTOR_SQL[name]) for name in ("connections", "limits")}
        except psycopg.Error as exc:
            raise PostgresError(f"{self.target}: {_clean_error(exc, None)}") from None

    def database_blockers(self, database: str) -> list[dict[str, Any]]:
        """What still keeps `database` in use (`kind`, `pid`, `gid` rows): kill_blockers.sql."""
        try:
            return self._execute(KILL_BLOCKERS_SQL, {"database": database})
        except psycopg.Error as exc:
            raise PostgresError(f"{self.target}: {_clean_error(exc, None)}") from None

    def allow_connections(self, database: str, *, allow: bool) -> None:
        """ALTER DATABASE `database` WITH ALLOW_CONNECTIONS `allow`; a `PostgresError` that says
        why when PostgreSQL refuses (owner or superuser only, never the reaper's own database).
        """
        query = sql.SQL(KILL_ALLOW_CONNECTIONS_SQL).format(
            database=sql.Identifier(database), allow=sql.SQL("true" if allow else "false")
        )
        self.connect()
        assert self._conn is not None  # noqa: S101 - connect() either sets it or raises
        conn = self._conn
        try:
            self._answered(conn, query, None)
        except psycopg.Error as exc:
            if conn.broken:
                self.close()
                raise PostgresError(self._lost(exc)) from None
            message = f"{self.target}: {_clean_error(exc, None)}"
            hint = _ALLOW_CONNECTIONS_HINTS.get(exc.sqlstate or "")
            raise PostgresError(f"{message} ({hint})" if hint else message) from None

    def signal(
        self, victims: Sequence[Session], *, action: Action, lock_key: int | None = None
    ) -> dict[int, tuple[Result, str | None]]:
        """Signal `victims` race-safely; one (result, detail) per pid, whatever befalls the others.

        All victims go in one statement, which checks each one's permission itself. Should it fail
        all the same, each victim is retried in a statement of its own so that one failure stays
        its own (a victim signalled before the failure then reports `gone`). With `lock_key`,
        the statement signals only if this session holds that advisory lock ([ha]); otherwise
        every victim reports `not_leader`.
        """
        if not victims:
            return {}
        try:
            return self._signal_batch(victims, action=action, lock_key=lock_key)
        except psycopg.Error:
            pass
        results: dict[int, tuple[Result, str | None]] = {}
        for victim in victims:
            try:
                results.update(self._signal_batch([victim], action=action, lock_key=lock_key))
            except psycopg.Error as exc:
                denied = exc.sqlstate == _INSUFFICIENT_PRIVILEGE
                detail = exc.diag.message_primary or _clean_error(exc, None)
                if exc.diag.message_detail:
                    detail = f"{detail} ({exc.diag.message_detail})"
                results[victim.pid] = (Result.DENIED if denied else Result.ERROR, detail)
        return results

    def _signal_batch(
        self, victims: Sequence[Session], *, action: Action, lock_key: int | None
    ) -> dict[int, tuple[Result, str | None]]:
        query = sql.SQL(SIGNAL_SQL).format(signal=sql.Identifier(_SIGNAL_FUNCTIONS[action]))
        params = {
            "lock_key": lock_key,
            "pids": [v.pid for v in victims],
            "backend_starts": [v.backend_start for v in victims],
            "state_changes": [v.state_change for v in victims],
            "states": [v.state for v in victims],
        }
        self.connect()
        assert self._conn is not None  # noqa: S101 - connect() either sets it or raises
        try:
            rows = self._answered(self._conn, query, params)
        except psycopg.OperationalError as exc:
            if self._conn.broken:
                self.close()
                raise PostgresError(self._lost(exc)) from None
            raise
        signalled = _SIGNALLED[action]
        return {
            row["pid"]: (signalled, None)
            if row["result"] == "signalled"
            else (Result(row["result"]), _DETAILS.get(row["result"]))
            for row in rows
        }

    def cluster_identity(self) -> dict[str, Any]:
        """The cluster this session is on: its `system_identifier` and the postmaster's start
        time (`started`), read on the current session (connecting first if needed); see
        reaper/clusters.py. Read-only."""
        try:
            return self._execute(CLUSTER_IDENTITY_SQL)[0]
        except psycopg.Error as exc:  # refused: a superuser revoked EXECUTE from PUBLIC
            raise PostgresError(
                f"{self.target}: cannot read the cluster's identity: {_clean_error(exc, None)}"
            ) from None


class AuditConnection(ServerConnection):
    """pg-reaper's session on the audit database, with the discipline of a server's (autocommit,
    application_name, connect_timeout, statement_timeout, bounded waits, password_file): makes
    the audit table if it is missing and inserts rows into it in batches."""

    def __init__(
        self,
        *,
        dsn: str,
        table: Sequence[str],
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
        self._table = sql.Identifier(*table)
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
        qualified = self._table.as_string(conn)
        found = self._run(AUDIT_EXISTS_SQL, {"table": qualified})[0]
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

    def _run(
        self, query: str | sql.Composed, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        try:
            return self._execute(query, params)
        except psycopg.Error as exc:  # refused by the server: no privilege, no schema, ...
            self._checked = None  # the table may have been dropped: look again next time
            raise PostgresError(f"{self.target}: {_clean_error(exc, None)}") from None


def _audit_insert(table: sql.Identifier, *, with_instance: bool) -> sql.Composed:
    """audit_insert.sql for `table`, with or without the `instance` column."""
    columns = [(c, t) for c, t in AUDIT_COLUMNS if with_instance or c != "instance"]
    return sql.SQL(AUDIT_INSERT_SQL).format(
        table=table,
        columns=sql.SQL(", ").join(sql.Identifier(c) for c, _ in columns),
        arrays=sql.SQL(", ").join(
            sql.SQL("{}::{}[]").format(sql.Placeholder(c), sql.SQL(t)) for c, t in columns
        ),
    )


def _index_name(table: str) -> str:
    """``<table>_logged_at_idx``, the table part shortened to keep within 63 bytes (PostgreSQL
    would cut the whole name, which could then be the table's own)."""
    suffix = "_logged_at_idx"
    room = 63 - len(suffix)
    return table.encode()[:room].decode(errors="ignore") + suffix
