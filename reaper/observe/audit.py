"""The audit table: every audit event, also written as a row to a PostgreSQL table.

Off the reaping path. A sweep hands each `session_reaped` / `session_reap_failed` event to
`AuditSink.submit`, which only appends it to a bounded in-memory queue (the newest rows are
dropped, and counted, when it is full) and returns at once. One background thread per process
writes the queue in batches over its own connection; a slow, hung or stopped audit database
delays nothing but that thread. A failed batch stays queued and is written again, with backoff,
once the database answers. At least once: a batch whose acknowledgement is lost may be written
twice.

An `AuditSink` holds the writer of one process (`start`, `reconfigure`, `stop`): the daemon,
`pg-reaper once` and `pg-reaper kill` make one and pass it to what audits.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from reaper.identifiers import quote_identifier
from reaper.observe.log import get_logger
from reaper.observe.queue import Row, RowQueue
from reaper.pg.audit import AuditConnection
from reaper.pg.connection import PostgresError
from reaper.settings import default_instance_id

if TYPE_CHECKING:
    from collections.abc import Sequence

    from reaper.audit_event import AuditEvent
    from reaper.observe.metrics import Metrics
    from reaper.settings import Settings

__all__ = ["CAPACITY", "AuditSink", "AuditTableUnusable", "AuditWriter"]

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

# --- the writer --------------------------------------------------------------------------------


class AuditWriter:
    """A bounded queue of audit rows and the thread that writes it to the audit table."""

    def __init__(
        self,
        conn: AuditConnection,
        *,
        metrics: Metrics | None = None,
        capacity: int = CAPACITY,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self._conn = conn  # the writer's own: only its thread uses it once started
        self.table = ".".join(quote_identifier(part) for part in conn.table)  # as SQL writes it
        self._metrics = metrics
        self._queue = RowQueue(capacity)
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

    def preflight(self) -> str | None:
        """Before `start`, on the writer's own connection: why the table cannot be written, or
        None (also when the audit database does not answer now: rows wait and are retried)."""
        return self._conn.preflight()

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
        elif self._thread.ident is None:  # never started: only a preflight used the connection
            self._conn.close()
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


# --- the sink ----------------------------------------------------------------------------------


class AuditTableUnusable(Exception):  # noqa: N818 - a reason, said as it is
    """The configured audit table cannot be written (a missing privilege, an untrusted owner)."""


class AuditSink:
    """Where audit events go besides their log line: the audit table's writer while `[audit]`
    names a table, nowhere otherwise. Made by whoever audits (the daemon, `once`, `kill`) and
    passed to the sweeps, as `Metrics` is. `submit` is called from every job thread; `start`,
    `reconfigure` and `stop` from one."""

    def __init__(self, *, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._writer: AuditWriter | None = None
        self._key: tuple[Any, ...] | None = None
        self._instance: str | None = None

    @property
    def instance(self) -> str:
        """The id of this pg-reaper instance, as its audit events carry it ([ha] instance_id,
        else hostname:pid)."""
        return self._instance or default_instance_id()

    @property
    def writer(self) -> AuditWriter | None:
        return self._writer

    def submit(self, event: AuditEvent) -> None:
        """Queue `event` as a row of the audit table. Never waits, never raises: called on the
        reaping path. Nothing happens without a writer."""
        row = event.row()
        while (writer := self._writer) is not None:
            if writer.submit(row) is not None:
                return
            # That writer was stopped by a reload just now: its successor takes the row.
            if self._writer is writer:
                return

    def start(self, settings: Settings, *, check: bool = False) -> AuditWriter | None:
        """Start the writer `settings` ask for (None when `[audit]` is disabled); from now on
        every event submitted goes to it. With `check`, the writer's own connection first asks
        the audit database whether the table can be written: `AuditTableUnusable` says why not
        (and nothing is started)."""
        with self._lock:
            self._instance = settings.ha.instance
            writer = _open(settings, metrics=self._metrics)
            if writer is not None and check and (unusable := writer.preflight()) is not None:
                writer.stop(timeout=0)
                raise AuditTableUnusable(unusable)
            if writer is not None:
                _start(writer)
            self._writer, self._key = writer, _key(settings)
            return writer

    def reconfigure(self, settings: Settings, *, timeout: float) -> AuditWriter | None:
        """Replace the writer when `settings` change it. The old one gets `timeout` seconds to
        write what it holds; what it cannot write passes to the new one."""
        with self._lock:
            self._instance = settings.ha.instance
            if _key(settings) == self._key:
                return self._writer
            old, new = self._writer, _open(settings, metrics=self._metrics)
            if new is not None:
                _start(new)
            self._writer, self._key = new, _key(settings)
        if old is not None:
            left = old.stop(timeout=timeout)
            if new is not None:
                new.adopt(left)
            else:
                _report_unwritten(old, left)
        return new

    def stop(self, *, timeout: float) -> None:
        """Stop the writer: what it cannot write within `timeout` seconds is reported, then
        lost."""
        with self._lock:
            writer, self._writer, self._key = self._writer, None, None
        if writer is not None:
            _report_unwritten(writer, writer.stop(timeout=timeout))


def _open(settings: Settings, *, metrics: Metrics | None) -> AuditWriter | None:
    """The writer `settings` ask for, not started yet."""
    section = settings.audit
    if not section.enabled:
        return None
    conn = AuditConnection(
        dsn=section.dsn.get_secret_value(),
        table=section.table_name,
        password_file=section.password_file,
        connect_timeout=settings.reaper.connect_timeout,
        statement_timeout=settings.reaper.statement_timeout,
    )
    return AuditWriter(conn, metrics=metrics)


def _start(writer: AuditWriter) -> None:
    writer.start()
    get_logger().info("audit_started", table=writer.table, target=writer.target)


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
