"""High availability: several pg-reaper instances share servers through PostgreSQL's own lock
manager (docs/ha.md).

Before it signals anything on a server, an instance takes a session-level advisory lock there,
`pg_try_advisory_lock(lock_key)`, on the very connection that polls and signals. Only the
holder signals, and every signalling statement checks in `pg_locks` that its own backend still
holds the lock: a leader whose connection was lost (and silently reopened) cannot act.

The key is no secret, and any role that can connect to the lock database can take the lock and
keep every instance standing by (lock squatting): each cycle reports a holder that is not a
pg-reaper instance as a `LockHolder` (ha_lead.sql says what counts as one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from reaper import APPLICATION_NAME
from reaper.pg.connection import query

if TYPE_CHECKING:
    from reaper.pg.connection import Connection

__all__ = ["Leadership", "LockHolder", "lead", "lock_key_halves"]

HA_LEAD_SQL = query("ha_lead")


@dataclass(frozen=True, slots=True, kw_only=True)
class LockHolder:
    """A backend holding a server's lock that is not a pg-reaper instance. Its names come from
    the server, set by whoever holds the lock: printed (escaped), never trusted."""

    pid: int | None  # None: a prepared transaction holds it (pg_prepared_xacts)
    application: str | None
    role: str | None  # None for a prepared transaction, or a role dropped since it logged in


@dataclass(frozen=True, slots=True, kw_only=True)
class Leadership:
    """Whether this session holds a server's advisory lock ([ha]), and which backend does."""

    leader: bool
    holder: int | None  # the pid of the backend holding the lock, None when it is free
    other: LockHolder | None = None  # a holder that is not a pg-reaper instance (squatting)


def lead(conn: Connection, lock_key: int, *, acquire: bool) -> Leadership:
    """Whether `conn`'s session holds the advisory lock `lock_key` (checked in pg_locks), taking
    it first if it is free and `acquire`. A lost connection loses the lock with it: the session
    reopened by the next call holds nothing until it takes the lock again."""
    params = {"lock_key": lock_key, "acquire": acquire, "application": APPLICATION_NAME}
    (row,) = conn.run(HA_LEAD_SQL, params)
    other = None
    if row["held_by_other"]:
        other = LockHolder(
            pid=row["other_pid"], application=row["other_application"], role=row["other_role"]
        )
    return Leadership(leader=bool(row["leader"]), holder=row["holder"], other=other)


def lock_key_halves(key: int) -> tuple[int, int]:
    """(classid, objid) as pg_locks shows a bigint advisory key: its high and low 32 bits."""
    return (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
