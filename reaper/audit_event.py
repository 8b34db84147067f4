"""An audit event, defined once: one decision about one session, as the `session_reaped` and
`session_reap_failed` log lines carry it (flat fields), as `once --json` prints it, and as a
row of the audit table (reaper/pg/audit.py derives its columns, with their SQL types, from the
Python types here; sql/audit_create.sql makes the same table).

Pure: no I/O, so that every layer that audits, prints or writes audit events can import it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import NoneType, UnionType
from typing import Any

__all__ = ["COLUMNS", "AuditEvent", "AuditRecord"]

# The SQL type of a column holding a field of this Python type (None allowed: every column
# but the envelope's may be NULL).
_SQL_TYPES: dict[type, str] = {
    datetime: "timestamptz",
    str: "text",
    bool: "boolean",
    int: "integer",
    float: "double precision",
}
# A field with this metadata is in the log line only, not a column of the table.
_LOG_ONLY = {"column": False}


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """What was decided about one session and what became of it: the fields of the log line,
    in its order."""

    policy: str
    action: str
    result: str
    pid: int
    backend_start: datetime | None = None
    database: str | None = None
    user: str | None = None
    application: str | None = None
    client_addr: str | None = None  # "local" for a Unix-socket session
    state: str | None = None
    idle_seconds: float | None = None
    transaction_seconds: float | None = None
    connection_seconds: float | None = None
    reason: str | None = None
    # Terminated because a cancel (escalate_after) did not stop it: in the log line when set.
    escalated: bool = field(default=False, metadata=_LOG_ONLY)
    detail: str | None = None  # in the log line when set
    query: str | None = None  # in the log line with [log] include_query only

    def fields(self, *, include_query: bool) -> dict[str, Any]:
        """The log line's fields (and `once --json`'s decision): `backend_start` in ISO 8601,
        `escalated` and `detail` only when set, `query` only with `include_query`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.backend_start is not None:
            out["backend_start"] = self.backend_start.isoformat()
        if not self.escalated:
            del out["escalated"]
        if not self.detail:
            del out["detail"]
        if not include_query:
            del out["query"]
        return out


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEvent:
    """One audit event: a record, with where and when it happened and who decided it."""

    event: str  # session_reaped | session_reap_failed
    server: str
    dry_run: bool
    instance: str  # [ha] instance_id, else hostname:pid
    record: AuditRecord = field(metadata=_LOG_ONLY)
    logged_at: datetime = field(default_factory=_now)

    def row(self) -> dict[str, Any]:
        """The event as a row of the audit table: a value for every one of `COLUMNS`."""
        values = {**_values(self), **_values(self.record)}
        return {name: values[name] for name, _type in COLUMNS}


def _values(instance: AuditEvent | AuditRecord) -> dict[str, Any]:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


def _columns(cls: type) -> list[tuple[str, str]]:
    """The columns of `cls`'s fields: (name, SQL type), in field order."""
    hints = typing.get_type_hints(cls)
    columns = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("column", True):
            kind = hints[f.name]
            if isinstance(kind, UnionType):  # X | None
                (kind,) = (arg for arg in typing.get_args(kind) if arg is not NoneType)
            columns.append((f.name, _SQL_TYPES[kind]))
    return columns


# The audit table's columns as pg-reaper writes them: (name, SQL type).
COLUMNS: tuple[tuple[str, str], ...] = (*_columns(AuditEvent), *_columns(AuditRecord))
