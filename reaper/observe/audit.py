"""The audit table: every audit event, also written as a row to a PostgreSQL table.

Off the reaping path. A sweep hands each `session_reaped` / `session_reap_failed` event to
`submit`, which only appends it to a bounded in-memory queue (the newest rows are dropped, and
counted, when it is full) and returns at once. One background thread per process writes the queue
in batches over its own connection; a slow, hung or stopped audit database delays nothing but
that thread. A failed batch stays queued and is written again, with backoff, once the database
answers. At least once: a batch whose acknowledgement is lost may be written twice.

One writer per process (`start`, `reconfigure`, `stop`): the daemon and `pg-reaper once` run it.
"""

from __future__ import annotations

import collections
import itertools
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from reaper.identifiers import quote_identifier
from reaper.observe.log import get_logger
from reaper.pg.audit import AUDIT_COLUMNS, AuditConnection
from reaper.pg.connection import PostgresError
from reaper.settings import default_instance_id

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from datetime import timedelta
    from pathlib import Path

    from reaper.observe.metrics import Metrics
    from reaper.settings import Settings

__all__ = [
    "CAPACITY",
    "AuditWriter",
    "instance",
    "preflight",
    "reconfigure",
    "start",
    "stop",
    "submit",
]

Row = dict[str, Any]

CAPACITY = 10_000  # rows queued at most; beyond it the newest are dropped and counted
BATCH_SIZE = 500  # rows per INSERT
# A failed write is retried after 1 s, then twice as long each time, up to this.
_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 10.0
# The `reason` label of pg_reaper_audit_errors_total: a failed write (connect, create, insert;
# each attempt counts), or a row dropped because the queue was full (each row counts).
REASON_WRITE = "write"
REASON_DROPPED = "dropped"
ERROR_REASONS = (REASON_WRITE, REASON_DROPPED)

# The columns of the table (reaper/pg/audit.py writes them); every row has them all.
COLUMNS = tuple(column for column, _type in AUDIT_COLUMNS)


# --- the queue ---------------------------------------------------------------------------------


class _RowQueue:
    """Rows waiting to be written, oldest first, at most `capacity`. One consumer (the writer)
    reads a batch with `peek` and removes it with `pop` once it is written."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rows: collections.deque[Row] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._closed = False
        self.dropped = 0  # rows refused because the queue was full, since it was created

    def __len__(self) -> int:
        with self._ready:
            return len(self._rows)

    def put(self, row: Row) -> bool | None:
        """Append `row`; False when the queue is full (the row is dropped and counted), None when
        it is closed (the row is not taken)."""
        with self._ready:
            if self._closed:
                return None
            if len(self._rows) >= self.capacity:
                self.dropped += 1
                return False
            self._rows.append(row)
            self._ready.notify()
            return True

    def extend(self, rows: Sequence[Row]) -> int:
        """Append what fits of `rows` (oldest first); the number dropped."""
        with self._ready:
            room = max(0, self.capacity - len(self._rows))
            self._rows.extend(rows[:room])
            dropped = max(0, len(rows) - room)
            self.dropped += dropped
            self._ready.notify()
            return dropped

    def peek(self, limit: int, *, until: threading.Event) -> list[Row]:
        """The oldest rows, up to `limit`, waiting for one to come unless `until` is set."""
        with self._ready:
            while not self._rows and not until.is_set():
                self._ready.wait()
            return list(itertools.islice(self._rows, limit))

    def pop(self, count: int) -> None:
        """Remove the `count` oldest rows (a batch just written); nothing once closed."""
        with self._ready:
            if not self._closed:
                for _ in range(min(count, len(self._rows))):
                    self._rows.popleft()

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def close(self) -> list[Row]:
        """Refuse rows from now on; the rows still queued."""
        with self._ready:
            self._closed = True
            rows, self._rows = list(self._rows), collections.deque()
            self._ready.notify_all()
            return rows


# --- the writer --------------------------------------------------------------------------------


class AuditWriter:
    """A bounded queue of audit rows and the thread that writes it to the audit table."""

    def __init__(  # noqa: PLR0913 - keyword-only, each one a setting of the writer
        self,
        *,
        dsn: str,
        table: tuple[str, str],
        password_file: Path | None = None,
        connect_timeout: timedelta,
        statement_timeout: timedelta,
        metrics: Metrics | None = None,
        capacity: int = CAPACITY,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self._conn = AuditConnection(
            dsn=dsn,
            password_file=password_file,
            table=table,
            connect_timeout=connect_timeout,
            statement_timeout=statement_timeout,
        )
        self.table = ".".join(quote_identifier(part) for part in table)  # as SQL writes it
        self._metrics = metrics
        self._queue = _RowQueue(capacity)
        self._batch_size = batch_size
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._log = get_logger()
        self._full = False  # dropping rows since the last successful write
        self._failing = False
        self._outdated_said = False
        self.written = 0
        self.failures = 0  # failed writes since the last success

    @property
    def target(self) -> str:
        """Where the table is (host and port only: no secret)."""
        return self._conn.target

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def dropped(self) -> int:
        return self._queue.dropped

    @property
    def failing(self) -> bool:
        return self._failing

    def start(self) -> None:
        self._thread.start()

    def submit(self, row: Row) -> bool | None:
        """Queue `row` without waiting: True when queued, False when dropped (the queue is full),
        None when this writer is stopped."""
        taken = self._queue.put(row)
        if taken is False:
            if self._metrics is not None:
                self._metrics.audit_errors.labels(reason=REASON_DROPPED).inc()
            if not self._full:
                self._full = True
                self._log.warning(
                    "audit_queue_full",
                    table=self.table,
                    capacity=self._queue.capacity,
                    detail="rows are dropped until the audit database catches up",
                )
        return taken

    def adopt(self, rows: Sequence[Row]) -> None:
        """Take over rows another writer could not write (a reload changed the table)."""
        if rows and (dropped := self._queue.extend(rows)) and self._metrics is not None:
            self._metrics.audit_errors.labels(reason=REASON_DROPPED).inc(dropped)

    def stop(self, *, timeout: float) -> list[Row]:
        """Write what can be written within `timeout` seconds, then give up; the rows left.

        A write blocked on a hung database is cut short (its connection severed); the thread,
        a daemon thread, is then left to end on its own.
        """
        self._stopping.set()
        self._queue.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            self._conn.interrupt()
        return self._queue.close()

    # the thread

    def _run(self) -> None:
        try:
            while batch := self._queue.peek(self._batch_size, until=self._stopping):
                try:
                    self._conn.insert(batch)
                except PostgresError as exc:
                    error = str(exc)
                except Exception as exc:  # noqa: BLE001 - a bug must not end the thread silently
                    error = f"internal error: {type(exc).__name__}: {exc}"
                else:
                    self._queue.pop(len(batch))
                    self.written += len(batch)
                    self._succeeded()
                    self._say_outdated()
                    continue
                self._failed(error)
                if self._stopping.is_set():
                    break  # shutting down: no retry; the rows are reported unwritten
                self._stopping.wait(self._backoff())
        finally:
            self._conn.close()

    def _say_outdated(self) -> None:
        """Once: the table has no instance column and the reaper's role could not add it."""
        if self._conn.outdated is not None and not self._outdated_said:
            self._outdated_said = True
            self._log.warning(
                "audit_table_outdated",
                table=self.table,
                error=self._conn.outdated,
                detail="rows are written without the instance column: as the table's owner, "
                f"ALTER TABLE {self.table} ADD COLUMN instance text",
            )

    def _backoff(self) -> float:
        return min(_MAX_BACKOFF, _FIRST_BACKOFF * 2.0 ** (min(self.failures, 31) - 1))

    def _failed(self, error: str) -> None:
        """One log line when writing starts failing; the retries at debug level."""
        self.failures += 1
        if self._metrics is not None:
            self._metrics.audit_errors.labels(reason=REASON_WRITE).inc()
        level = self._log.debug if self._failing else self._log.error
        level(
            "audit_failed",
            table=self.table,
            error=error,
            failures=self.failures,
            queued=self.queued,
        )
        self._failing = True

    def _succeeded(self) -> None:
        if self._failing:
            self._log.info(
                "audit_recovered",
                table=self.table,
                failures=self.failures,
                queued=self.queued,
                dropped=self.dropped,
            )
        self._failing, self.failures, self._full = False, 0, False


# --- the process's writer ----------------------------------------------------------------------

# One writer per process: `submit` is called from every job thread, the rest from the main one.
_lock = threading.Lock()
_current: AuditWriter | None = None
_current_key: tuple[Any, ...] | None = None
# This instance's id ([ha] instance_id, else hostname:pid), in every audit event.
_identity: dict[str, str] = {}


def instance() -> str:
    """The id of this pg-reaper instance, as its audit events carry it."""
    return _identity.get("instance") or default_instance_id()


def submit(event: str, *, server: str, dry_run: bool, fields: Mapping[str, Any]) -> None:
    """Queue one audit event (the fields of `reaper.sweep.audit_fields`) as a row of the table.

    Never waits, never raises: called on the reaping path. Nothing happens without a writer.
    """
    row = _row(event, server=server, dry_run=dry_run, fields=fields)
    while (writer := _current) is not None:
        if writer.submit(row) is not None:
            return
        # That writer was stopped by a reload just now: its successor takes the row.
        if _current is writer:
            return


def preflight(settings: Settings) -> str | None:
    """Why the configured audit table cannot be written (a missing privilege, an untrusted
    owner), asked of the audit database before the first cycle; None when it can be, when there
    is no [audit] table, or when the database does not answer now (rows wait and are retried)."""
    section = settings.audit
    if not section.enabled:
        return None
    with AuditConnection(
        dsn=section.dsn.get_secret_value(),
        table=section.table_name,
        password_file=section.password_file,
        connect_timeout=settings.reaper.connect_timeout,
        statement_timeout=settings.reaper.statement_timeout,
    ) as conn:
        return conn.preflight()


def start(settings: Settings, *, metrics: Metrics | None = None) -> AuditWriter | None:
    """Start the writer `settings` asks for (None when `[audit]` is disabled); from now on
    every audit event goes to it."""
    global _current, _current_key
    with _lock:
        _identity["instance"] = settings.ha.instance
        _current, _current_key = _open(settings, metrics=metrics), _key(settings)
        return _current


def reconfigure(
    settings: Settings, *, metrics: Metrics | None = None, timeout: float
) -> AuditWriter | None:
    """Replace the writer when `settings` change it. The old one gets `timeout` seconds to
    write what it holds; what it cannot write passes to the new one."""
    global _current, _current_key
    with _lock:
        _identity["instance"] = settings.ha.instance
        if _key(settings) == _current_key:
            return _current
        old = _current
        _current, _current_key = _open(settings, metrics=metrics), _key(settings)
        new = _current
    if old is not None:
        left = old.stop(timeout=timeout)
        if new is not None:
            new.adopt(left)
        else:
            _report_unwritten(old, left)
    return new


def stop(*, timeout: float) -> None:
    """Stop the writer: what it cannot write within `timeout` seconds is reported, then lost."""
    global _current, _current_key
    with _lock:
        writer, _current, _current_key = _current, None, None
    if writer is not None:
        _report_unwritten(writer, writer.stop(timeout=timeout))


def _open(settings: Settings, *, metrics: Metrics | None) -> AuditWriter | None:
    section = settings.audit
    if not section.enabled:
        return None
    writer = AuditWriter(
        dsn=section.dsn.get_secret_value(),
        table=section.table_name,
        password_file=section.password_file,
        connect_timeout=settings.reaper.connect_timeout,
        statement_timeout=settings.reaper.statement_timeout,
        metrics=metrics,
    )
    writer.start()
    get_logger().info("audit_started", table=writer.table, target=writer.target)
    return writer


def _key(settings: Settings) -> tuple[Any, ...]:
    return (settings.audit, settings.reaper.connect_timeout, settings.reaper.statement_timeout)


def _report_unwritten(writer: AuditWriter, rows: Sequence[Row]) -> None:
    if rows:
        get_logger().error(
            "audit_rows_lost",
            table=writer.table,
            rows=len(rows),
            detail="the audit database did not take them in time",
        )


def _row(event: str, *, server: str, dry_run: bool, fields: Mapping[str, Any]) -> Row:
    row: Row = dict.fromkeys(COLUMNS)
    row.update((key, value) for key, value in fields.items() if key in row)
    row.update(logged_at=datetime.now(UTC), event=event, server=server, dry_run=dry_run)
    backend_start = row["backend_start"]
    if isinstance(backend_start, str):  # ISO 8601 in the log line; a timestamptz in the table
        row["backend_start"] = datetime.fromisoformat(backend_start)
    return row
