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
from functools import cache, partial
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal, Self

import psycopg
from psycopg import sql
from psycopg.adapt import Buffer, Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import Format
from psycopg.rows import dict_row

from reaper import APPLICATION_NAME, deadlines
from reaper.ha import LockHolder
from reaper.identifiers import quote_identifier
from reaper.policy import (
    CLIENT_BACKEND,
    DROPPED_ROLE,
    Result,
    RoleConnections,
    ServerFacts,
    Session,
)

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
_SIGNAL_FUNCTIONS: dict[Action, sql.Identifier] = {
    "terminate": sql.Identifier("pg_catalog", "pg_terminate_backend"),
    "cancel": sql.Identifier("pg_catalog", "pg_cancel_backend"),
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


# The reaper's own session, pinned in the startup packet (libpq's `options`): PostgreSQL ranks
# these above ALTER DATABASE/ROLE ... SET and postgresql.conf, so a database owner, a role
# setting or an odd server default can neither run code as the reaper (search_path: every
# function and relation in reaper/sql is schema-qualified too), nor skew how it reads values
# (DateStyle, IntervalStyle, TimeZone), nor cancel, kill or slow its session (the timeouts,
# parallel query and JIT), nor make its writes fail (read-only default). Every one of these exists
# on PostgreSQL 14-18; transaction_timeout (17+) is pinned where the server knows it.
PINNED_SETTINGS: tuple[tuple[str, str], ...] = (
    ("search_path", "pg_catalog, pg_temp"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("idle_session_timeout", "0"),
    ("default_transaction_isolation", "read committed"),
    ("default_transaction_read_only", "off"),
    ("default_tablespace", ""),
    ("max_parallel_workers_per_gather", "0"),
    ("jit", "off"),
    ("standard_conforming_strings", "on"),
)
PINNED_SETTINGS_17 = (("transaction_timeout", "0"),)
# Text comes back as the server stores it: no conversion, hence no server error for a name made
# in a SQL_ASCII database that is not valid in the client's encoding; pg-reaper decodes it.
CLIENT_ENCODING = "SQL_ASCII"
# The settings the server reports (GUC_REPORT) that the environment could still change: libpq
# sends PGDATESTYLE and PGTZ as startup parameters of their own, which outrank `options`.
_REPORTED = {"DateStyle": "ISO, MDY", "IntervalStyle": "postgres", "TimeZone": "UTC"}
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
    if "\x00" in dsn:  # libpq would silently stop reading there, dropping what follows
        raise ValueError("invalid connection string: it contains a NUL character")
    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except psycopg.ProgrammingError as exc:
        if '"' in dsn:  # libpq's quoting of the offending word cannot be undone safely
            raise ValueError(
                "invalid connection string: not key=value pairs or a postgresql:// URI"
            ) from None
        # libpq quotes the offending word (a password, a whole URI, a punctuation-only
        # password such as %%-!): drop every quoted word, keeping only libpq's own words.
        message = " ".join(str(exc).split())
        for literal, plain in _CONNINFO_LITERALS:
            message = message.replace(literal, plain)
        message = re.sub(r'"[^"]*"', "…", message)
        raise ValueError(f"invalid connection string: {message}") from None


# The quoted punctuation of libpq's own conninfo messages (fe-connect.c), not the caller's.
_CONNINFO_LITERALS = (
    ('missing "=" after', "missing = after"),
    ('matching "]" in', "matching ] in"),
    ('key/value separator "=" in', "key/value separator = in"),
    ('(expected ":" or "/")', "(expected : or /)"),
)


@cache  # libpq's keyword table does not change while the process runs
def _secret_keywords() -> frozenset[str]:
    """The conninfo keywords libpq itself hides (dispchar "*": password, sslpassword,
    oauth_client_secret in libpq 18, ...), and the ones known whatever libpq this is."""
    defaults = psycopg.pq.Conninfo.get_defaults()
    hidden = {o.keyword.decode() for o in defaults if o.dispchar == b"*"}
    return frozenset(hidden | _SECRET_KEYS | {"oauth_client_secret"})


def redact_conninfo(dsn: str) -> str:
    """The DSN in keyword form with every secret replaced: safe to print and log."""
    try:
        params = parse_conninfo(dsn)
    except ValueError:
        return "<invalid connection string>"
    secret = _secret_keywords()
    return make_conninfo(**{k: "********" if k in secret else v for k, v in params.items()})


def _describe(params: dict[str, str]) -> str:
    host = params.get("host") or params.get("hostaddr") or "default socket"
    port = params.get("port")
    return f"{host}:{port}" if port else host


def _clean_error(exc: BaseException, password: str | None) -> str:
    """A driver error on one line, without the password read from a password_file nor the one
    libpq may take from PGPASSWORD (libpq does not echo them; this makes sure)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    for secret in (password, os.environ.get("PGPASSWORD")):
        if secret:
            message = message.replace(secret, "********")
    return message


def _options_word(text: str) -> str:
    """One word of libpq's `options`, which splits at white space and takes a backslash as an
    escape."""
    return re.sub(r"([\\\s])", r"\\\1", text)


def pinned_options(
    dsn_options: str | None, *, statement_timeout_ms: int, pin_timeouts: bool, v17: bool
) -> str:
    """libpq's `options` for the reaper's session: the DSN's own (or $PGOPTIONS) first, then
    pg-reaper's pins, which come later and so win. Without `pin_timeouts` the session keeps the
    timeouts a client of its role and database gets (what `doctor` reports)."""
    pins = [(k, v) for k, v in PINNED_SETTINGS if pin_timeouts or not k.endswith("_timeout")]
    if pin_timeouts:
        pins.append(("statement_timeout", str(statement_timeout_ms)))
        if v17:
            pins.extend(PINNED_SETTINGS_17)
    words = [f"-c {_options_word(f'{name}={value}')}" for name, value in pins]
    return " ".join([*([dsn_options] if dsn_options else []), *words])


class _Utf8Loader(Loader):
    """Text read as UTF-8 whatever the session's encoding; bytes that are not UTF-8 (a role or
    database named in a SQL_ASCII database, say) come out as ``\\xNN`` escapes instead of failing
    the poll."""

    def load(self, data: Buffer) -> str:
        return bytes(data).decode("utf-8", "backslashreplace")


class _Utf8BinaryLoader(_Utf8Loader):
    format = Format.BINARY


def _read_text_as_utf8(conn: psycopg.Connection[Any]) -> None:
    for loader in (_Utf8Loader, _Utf8BinaryLoader):
        for name in ("text", "varchar", "bpchar", "name", '"char"'):
            conn.adapters.register_loader(name, loader)
    conn.adapters.register_loader(0, _Utf8Loader)  # unknown: a literal without a type


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
    user = None if role is None else role["name"]
    if role is None and row["role_oid"] is not None:
        user = DROPPED_ROLE  # its role was dropped while it stayed connected
    return Session(
        pid=row["pid"],
        backend_type=row["backend_type"] or "unknown",
        database=database,
        user=user,
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
        signaller=False if role is None else role["signaller"],
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
    other: LockHolder | None = None  # a holder that is not a pg-reaper instance (squatting)


class ServerConnection:
    """The reaper's one persistent autocommit session on one server; reconnects when lost."""

    def __init__(  # noqa: PLR0913 - keyword-only settings of one session
        self,
        *,
        dsn: str,
        password_file: Path | None = None,
        connect_timeout: timedelta,
        statement_timeout: timedelta,
        dbname: str | None = None,
        ha: bool = False,
        pin_timeouts: bool = True,
    ) -> None:
        self._dsn = dsn
        self._dbname = dbname  # overrides the DSN's: [ha] lock_database
        self._ha = ha  # server-side TCP keepalives, so that a vanished leader frees its lock
        self._pin_timeouts = pin_timeouts
        # Whether the server knows the settings of PostgreSQL 17+: tried first, learned from a
        # refusal (an unknown setting in the startup packet is fatal) or from server_version.
        self._v17 = True
        self._password_file = password_file
        self._timeouts = (connect_timeout, statement_timeout)
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
        conn = self._open(password)
        conn.add_notice_handler(lambda _notice: None)  # "PID n is not a PostgreSQL backend"
        _read_text_as_utf8(conn)
        try:
            self._settle(conn)
        except psycopg.Error as exc:
            conn.close()
            message = f"cannot set up session on {self.target}: {_clean_error(exc, None)}"
            raise PostgresError(message) from None
        self._conn = conn
        self._facts = None
        self.sessions_opened += 1
        self._roles_seen = None
        self._every_role = True

    def _open(self, password: str | None) -> psycopg.Connection[dict[str, Any]]:
        """A new session with pg-reaper's settings pinned in its startup packet."""
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "row_factory": dict_row,
            # Forced over whatever the DSN says: other pg-reapers recognise and spare it.
            "application_name": APPLICATION_NAME,
            "connect_timeout": self._connect_timeout,
            "client_encoding": CLIENT_ENCODING,
        }
        if password is not None:
            kwargs["password"] = password
        if self._dbname is not None:
            kwargs["dbname"] = self._dbname
        dsn_options = parse_conninfo(self._dsn).get("options") or os.environ.get("PGOPTIONS")
        while True:
            kwargs["options"] = pinned_options(
                dsn_options,
                statement_timeout_ms=self._statement_timeout_ms,
                pin_timeouts=self._pin_timeouts,
                v17=self._v17,
            )
            try:
                return psycopg.Connection.connect(self._dsn, **kwargs)
            except psycopg.Error as exc:
                # PostgreSQL 14-16 refuse a setting they do not know: try once without it.
                if self._v17 and self._pin_timeouts and '"transaction_timeout"' in str(exc):
                    self._v17 = False
                    continue
                message = f"cannot connect to {self.target}: {_clean_error(exc, password)}"
                raise PostgresError(message) from None

    def _settle(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        """What the startup packet could not settle: a setting the environment overrode
        (PGDATESTYLE, PGTZ), transaction_timeout on a server upgraded to 17+ since the first
        session, and [ha]'s keepalives."""
        settings = {
            name: value
            for name, value in _REPORTED.items()
            if conn.info.parameter_status(name) != value
        }
        v17 = conn.info.server_version >= 170000
        if v17 and not self._v17 and self._pin_timeouts:
            self._v17 = True
            settings.update(PINNED_SETTINGS_17)
        if settings:
            self._answered(
                conn,
                SESSION_SETTINGS_SQL,
                {"names": list(settings), "values": list(settings.values())},
            )
        if self._ha:
            self._answered(conn, HA_SESSION_SQL, None)

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
        # The session's encoding is SQL_ASCII (CLIENT_ENCODING): identifiers and the statement go
        # as UTF-8, as psycopg sends parameters.
        text = query.as_bytes(None) if isinstance(query, sql.Composable) else query.encode()
        deadline = deadlines.arm(self._answer_deadline, partial(self._sever, conn))
        try:
            cursor = conn.execute(text, params)
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
        # reaper's session included), so that the counts and the sessions agree. Client backends
        # only: a hidden row (no pg_read_all_stats) may be a parallel worker, a background worker
        # or a walsender, and pressure policies do not act on such counts (ServerFacts). Only
        # roles with sessions (whichever role rows the poll read): a role without is below any
        # share.
        clients = [s for s in sessions if s.backend_type == CLIENT_BACKEND]
        per_role = Counter(s.user for s in clients)
        limited = tuple(
            RoleConnections(
                role=role["name"],
                limit=role["connection_limit"],
                sessions=per_role[role["name"]],
            )
            for role in roles.values()
            if role["connection_limit"] is not None and per_role[role["name"]]
        )
        facts = replace(facts, client_sessions=len(clients), roles=limited)
        return Snapshot(facts=facts, sessions=sessions)

    def lead(self, lock_key: int, *, acquire: bool) -> Leadership:
        """Whether this session holds the advisory lock `lock_key` (checked in pg_locks), taking
        it first if it is free and `acquire`. A lost connection loses the lock with it: the
        session reopened by the next call holds nothing until it takes the lock again."""
        params = {"lock_key": lock_key, "acquire": acquire, "application": APPLICATION_NAME}
        (row,) = self._execute(HA_LEAD_SQL, params)
        other = None
        if row["held_by_other"]:
            other = LockHolder(
                pid=row["other_pid"], application=row["other_application"], role=row["other_role"]
            )
        return Leadership(leader=bool(row["leader"]), holder=row["holder"], other=other)

    def doctor_rows(self) -> dict[str, list[dict[str, Any]]]:
        """The rows of every doctor query, by name (`server`, `connections`, `limits`,
        `overrides`, `timeouts`), from one snapshot of the server. Changes nothing.
        """
        self.connect()
        assert self._conn is not None  # noqa: S101 - connect() either sets it or raises
        conn = self._conn
        try:
            # One transaction: one pg_stat_activity snapshot for every query (rolled back:
            # nothing is written).
            with conn.transaction(force_rollback=True):
                rows = {name: self._answered(conn, sql_, None) for name, sql_ in DOCTOR_SQL.items()}
        except psycopg.OperationalError as exc:
            self.close()
            raise PostgresError(self._lost(exc)) from None
        except psycopg.Error as exc:
            raise PostgresError(f"{self.target}: {_clean_error(exc, None)}") from None
        rows["timeouts"] = self._client_timeouts()
        return rows

    def _client_timeouts(self) -> list[dict[str, Any]]:
        """doctor_timeouts.sql in a session of its own that pins everything but the timeouts:
        the timeouts a client of the reaper's role and database gets, and where each comes
        from (the reaper's own session shows its pins). None readable (a tiny per-role
        idle_session_timeout, say): no rows, and doctor says what it could read."""
        connect_timeout, statement_timeout = self._timeouts
        probe = ServerConnection(
            dsn=self._dsn,
            password_file=self._password_file,
            connect_timeout=connect_timeout,
            statement_timeout=statement_timeout,
            dbname=self._dbname,
            pin_timeouts=False,
        )
        with probe:
            try:
                return probe._execute(DOCTOR_TIMEOUTS_SQL)
            except (PostgresError, psycopg.Error):
                return []

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
        query = sql.SQL(SIGNAL_SQL).format(signal=_SIGNAL_FUNCTIONS[action])
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
