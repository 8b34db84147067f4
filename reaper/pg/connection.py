"""pg-reaper's session on a server: opened with its settings pinned in the startup packet, every
statement bounded in time, every driver failure turned into one `PostgresError` that names the
server and never holds a secret. Every module of `reaper.pg` runs its SQL through it.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from dataclasses import dataclass
from functools import partial
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Self

import psycopg
from psycopg import sql
from psycopg.adapt import Buffer, Loader, Transformer
from psycopg.errors import error_from_result
from psycopg.pq import DiagnosticField, ExecStatus, Format
from psycopg.rows import dict_row

from reaper import APPLICATION_NAME
from reaper.conninfo import parse_conninfo
from reaper.pg import deadlines

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from datetime import timedelta
    from pathlib import Path

    from psycopg.pq.abc import PGresult

__all__ = ["Connection", "PostgresError", "Prepared", "RawRow", "pinned_options", "query"]

Rows = list[dict[str, Any]]
# How long past statement_timeout the reaper waits for an answer before it gives up on the
# connection itself: a stopped or unreachable server cannot enforce its statement_timeout.
_ANSWER_GRACE_SECONDS = 2.0


# The backend that refused a startup packet holds its connection slot until it has exited, a
# moment after the client reads the refusal: on a server with one slot left, the next attempt
# can find none. pg-reaper retries for that long, no longer.
_SLOT_RETRY_SECONDS = 0.05
_SLOT_RELEASE_SECONDS = 2.0
_NO_SLOT = ("too many clients", "remaining connection slots are reserved")


def _own_slot_not_free(exc: psycopg.Error, *, since: float) -> bool:
    """Whether `exc` refuses a connection for want of a slot, within the moment the reaper's
    own refused backend takes to give its slot back."""
    return time.monotonic() - since < _SLOT_RELEASE_SECONDS and any(
        words in str(exc) for words in _NO_SLOT
    )


def query(name: str) -> str:
    """The statement of `reaper/pg/sql/<name>.sql`, without its whole-line comments: psycopg
    caches the conversion of a statement's %(name)s placeholders only up to 4 kB, and the poll
    with its comments is longer (its conversion would cost every poll more than its rows). One
    comment line is kept, naming the statement, for a DBA who sees it in pg_stat_activity."""
    text = files("reaper.pg.sql").joinpath(f"{name}.sql").read_text(encoding="utf-8")
    return f"-- pg-reaper: {name}\n" + "".join(
        line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("--")
    )


# The reaper's own session, pinned in the startup packet (libpq's `options`): PostgreSQL ranks
# these above ALTER DATABASE/ROLE ... SET and postgresql.conf, so a database owner, a role
# setting or an odd server default can neither run code as the reaper (search_path: every
# function and relation in reaper/pg/sql is schema-qualified too), nor skew how it reads values
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
SESSION_SETTINGS_SQL = query("session_settings")
HA_SESSION_SQL = query("ha_session")


class PostgresError(Exception):
    """A server could not be reached or queried. The message never holds a secret.

    `sqlstate` is the server's error code when it refused a statement (None when the connection
    failed); `lost` says that the session is gone (the next statement reconnects)."""

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        lost: bool = False,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.lost = lost
        self.reason = reason or message  # the server's own words, without the server's name


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


def _text_param(value: object) -> bytes:
    """A parameter of `Connection.run_prepared` in PostgreSQL's text form: a bool, an int or
    a str (the statement's casts give the types)."""
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int | str):
        return str(value).encode()
    msg = f"no text form for a parameter of type {type(value).__name__}"
    raise TypeError(msg)


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


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_DUPLICATE_PREPARED = b"42P05"  # duplicate_prepared_statement
_NO_SUCH_PREPARED = b"26000"  # invalid_sql_statement_name


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement that runs often on one session, prepared there once per session under
    `name` (pg-reaper's own; psycopg names its own `_pg3_N`): `text` is a `query()` with its
    `%(name)s` parameters numbered in the order of `params`."""

    name: bytes
    text: bytes
    params: tuple[str, ...]

    @classmethod
    def of(cls, name: str, text: str) -> Prepared:
        params = tuple(dict.fromkeys(_PLACEHOLDER.findall(text)))
        numbered = _PLACEHOLDER.sub(lambda m: f"${params.index(m.group(1)) + 1}", text)
        if "%" in numbered:  # psycopg's escaping (%%) would go to the server as it is
            msg = f"statement {name!r}: a % that is not a parameter"
            raise ValueError(msg)
        return cls(name=name.encode(), text=numbered.encode(), params=params)

    def encode(self, params: Mapping[str, object]) -> tuple[bytes, ...]:
        """`params` for `Connection.run_prepared` and `fetch`, in order and in PostgreSQL's text
        form."""
        return tuple(_text_param(params[name]) for name in self.params)


class RawRow:
    """The one row of a `Prepared` statement as the server sent it (text), column by column:
    compared as it is, loaded into Python values only when asked."""

    __slots__ = ("_conn", "_result", "values")

    def __init__(self, conn: psycopg.Connection[Any], result: PGresult) -> None:
        self._conn, self._result = conn, result
        self.values: tuple[bytes | None, ...] = tuple(
            result.get_value(0, column) for column in range(result.nfields)
        )

    def columns(self) -> Iterator[tuple[str, bytes | None]]:
        return zip(_names(self._result), self.values, strict=True)

    def load(self) -> dict[str, Any]:
        """The row as `run` returns it: psycopg's loaders, with this session's adapters."""
        return _loaded(self._conn, self._result)[0]


def _loaded(conn: psycopg.Connection[Any], result: PGresult) -> Rows:
    """The rows of `result` as `run` returns them (`dict_row`), loaded by psycopg's loaders with
    `conn`'s adapters."""
    transformer = Transformer(conn)
    transformer.set_pgresult(result)
    names = _names(result)
    return [
        dict(zip(names, values, strict=True))
        for values in transformer.load_rows(0, result.ntuples, tuple)
    ]


def _names(result: PGresult) -> list[str]:
    """The names of `result`'s columns, in order."""
    return [(result.fname(column) or b"").decode() for column in range(result.nfields)]


class Connection:
    """pg-reaper's one persistent autocommit session on one server; reconnects when lost."""

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
        self._prepared: dict[bytes, int] = {}  # Prepared.name: the session it was prepared in
        params = parse_conninfo(dsn)
        self.target = _describe(params)
        self._dsn_options = params.get("options")  # libpq's `options` as the DSN gives them
        self._opened()

    def sibling(self, *, pin_timeouts: bool) -> Connection:
        """A new, unconnected session to the same server with the same settings."""
        connect_timeout, statement_timeout = self._timeouts
        return Connection(
            dsn=self._dsn,
            password_file=self._password_file,
            connect_timeout=connect_timeout,
            statement_timeout=statement_timeout,
            dbname=self._dbname,
            pin_timeouts=pin_timeouts,
        )

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
        self.sessions_opened += 1
        self._opened()

    def _opened(self) -> None:
        """Called at first and on every new or closed session: forget what the old one
        learned."""

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
        dsn_options = self._dsn_options or os.environ.get("PGOPTIONS")
        refused_at: float | None = None  # when a server refused transaction_timeout
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
                    self._v17, refused_at = False, time.monotonic()
                    continue
                if refused_at is not None and _own_slot_not_free(exc, since=refused_at):
                    time.sleep(_SLOT_RETRY_SECONDS)
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

    @property
    def connected(self) -> bool:
        """Whether the session is open (as far as the client knows): `run` would not connect."""
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._opened()

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

    def run(
        self,
        query: str | sql.Composed,
        params: Mapping[str, Any] | None = None,
        *,
        hints: Mapping[str, str] | None = None,
        doing: str | None = None,
        keep_open: bool = False,
    ) -> Rows:
        """Run one statement (connecting first) and return its rows; `_failure` says how it
        fails. `hints` add a fix to the message by SQLSTATE; `doing` says what failed."""
        conn = self._session()
        try:
            return self._answered(conn, query, params)
        except psycopg.Error as exc:
            raise self._failure(exc, conn, hints=hints, doing=doing, keep_open=keep_open) from None

    def fetch(
        self, statement: Prepared, params: Mapping[str, object], *, doing: str | None = None
    ) -> Rows:
        """`run` for a statement that runs at every cycle (the poll): the same rows and the same
        failures, for about half of the client's time. Prepared once per session and sent
        through psycopg's pq layer (no cursor, no parameter adaptation: `Prepared.encode`), its
        rows loaded by psycopg's loaders with this session's adapters."""
        conn = self._session()
        values = statement.encode(params)
        deadline = self._watch(conn)
        try:
            result = self._execute(conn, statement, values)
            if result.error_field(DiagnosticField.SQLSTATE) == _NO_SUCH_PREPARED:
                result = self._execute(conn, statement, values)  # prepared again
            if result.status != ExecStatus.TUPLES_OK:
                if result.error_field(DiagnosticField.SQLSTATE) is None:
                    # libpq's own words, not the server's: the connection is lost (libpq may
                    # not have marked it so yet), as psycopg says it.
                    message = result.get_error_message(conn.info.encoding)
                    raise psycopg.OperationalError(message)
                raise error_from_result(result, encoding=conn.info.encoding)
        except psycopg.Error as exc:
            raise self._failure(exc, conn, doing=doing) from None
        finally:
            deadline.cancel()
        return _loaded(conn, result)

    def run_prepared(self, statement: Prepared, params: Sequence[bytes]) -> RawRow | None:
        """Run `statement` on the open session (preparing it there first) with `params`
        (`statement.encode(...)`); its one row as the server sent it. None when no session is
        open, or on any failure or other answer: the caller then goes the usual way (`run`),
        which connects, reports what fails, and reconnects. A statement costs far less of the
        client's time this way (no cursor, no parameter adaptation, no row built): for one that
        runs every few seconds on every server, and mostly answers as it did the last time."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return None
        deadline = self._watch(conn)
        try:
            result = self._execute(conn, statement, params)
        except psycopg.Error:
            return None
        finally:
            deadline.cancel()
        if result.status != ExecStatus.TUPLES_OK or result.ntuples != 1:
            return None
        return RawRow(conn, result)

    def _execute(
        self, conn: psycopg.Connection[Any], statement: Prepared, values: Sequence[bytes]
    ) -> PGresult:
        """The server's result for `statement` with `values` on `conn`, prepared there first
        if it is not yet (or the result of preparing it, if that failed): the caller reads its
        status. A statement the server no longer knows (DISCARD ALL, a pooler) is forgotten, to
        be prepared again by the next call."""
        pgconn = conn.pgconn
        if self._prepared.get(statement.name) != self.sessions_opened:
            prepared = pgconn.prepare(statement.name, statement.text)
            state = prepared.error_field(DiagnosticField.SQLSTATE)
            if prepared.status != ExecStatus.COMMAND_OK and state != _DUPLICATE_PREPARED:
                return prepared
            self._prepared[statement.name] = self.sessions_opened
        result = pgconn.exec_prepared(statement.name, values)
        if result.error_field(DiagnosticField.SQLSTATE) == _NO_SUCH_PREPARED:
            self._prepared.pop(statement.name, None)
        return result

    def run_together(self, queries: Mapping[str, str]) -> dict[str, Rows]:
        """Run read-only `queries` in one transaction, rolled back (one snapshot of the server's
        statistics for all of them, nothing written); their rows by name."""
        conn = self._session()
        try:
            with conn.transaction(force_rollback=True):
                return {name: self._answered(conn, q, None) for name, q in queries.items()}
        except psycopg.Error as exc:
            raise self._failure(exc, conn) from None

    def _session(self) -> psycopg.Connection[dict[str, Any]]:
        self.connect()
        assert self._conn is not None  # noqa: S101 - connect() either sets it or raises
        return self._conn

    def _failure(
        self,
        exc: psycopg.Error,
        conn: psycopg.Connection[dict[str, Any]],
        *,
        hints: Mapping[str, str] | None = None,
        doing: str | None = None,
        keep_open: bool = False,
    ) -> PostgresError:
        """The one translation of a driver error: a `PostgresError` naming the server, with the
        server's SQLSTATE and own words. A lost connection, or a statement cut short (timeout,
        a severed socket), closes the session (unless `keep_open` and it still works): the next
        statement reconnects."""
        lost = conn.broken or (not keep_open and isinstance(exc, psycopg.OperationalError))
        if lost:
            self.close()
        if self._severed:
            message = (
                f"{self.target}: no answer within {self._answer_deadline:g}s "
                "(server stopped or unreachable?)"
            )
        else:
            message = f"{self.target}: {f'{doing}: ' if doing else ''}{_clean_error(exc, None)}"
            hint = (hints or {}).get(exc.sqlstate or "")
            if hint:
                message = f"{message} ({hint})"
        reason = exc.diag.message_primary or _clean_error(exc, None)
        if exc.diag.message_detail:
            reason = f"{reason} ({exc.diag.message_detail})"
        return PostgresError(message, sqlstate=exc.sqlstate, lost=lost, reason=reason)

    def _answered(
        self,
        conn: psycopg.Connection[dict[str, Any]],
        query: str | sql.Composed,
        params: Mapping[str, Any] | None,
    ) -> Rows:
        """Run one statement, severing the connection if no answer comes in time."""
        # The session's encoding is SQL_ASCII (CLIENT_ENCODING): identifiers and the statement go
        # as UTF-8, as psycopg sends parameters.
        text = query.as_bytes(None) if isinstance(query, sql.Composable) else query.encode()
        deadline = self._watch(conn)
        try:
            cursor = conn.execute(text, params)
            # Rows only from a statement that returns some (not DDL, INSERT); the result's status
            # tells, where cursor.description would build a Column object per column first.
            result = cursor.pgresult
            return cursor.fetchall() if result is not None and result.nfields else []
        finally:
            deadline.cancel()

    def _watch(self, conn: psycopg.Connection[dict[str, Any]]) -> deadlines.Deadline:
        """Sever `conn` unless the statement about to be sent answers in time: cancel the
        returned deadline once it has."""
        self._severed = False
        return deadlines.arm(self._answer_deadline, partial(self._sever, conn))

    def _sever(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        # Shutting the socket down (through a duplicate of libpq's descriptor) wakes the
        # blocked read with an error: libpq then reports the connection lost.
        self._severed = True
        with (
            contextlib.suppress(OSError, psycopg.Error),
            socket.socket(fileno=os.dup(conn.fileno())) as sock,
        ):
            sock.shutdown(socket.SHUT_RDWR)
