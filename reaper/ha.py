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

import hashlib
import os
import socket
from dataclasses import dataclass

__all__ = ["DEFAULT_LOCK_KEY", "LockHolder", "default_instance_id", "lock_key_halves"]

# The advisory lock's key: the first 8 bytes of SHA-256("pg-reaper"), a signed bigint.
# -2719498840538813096; pg_locks shows it as classid 3661784630, objid 2325278040, objsubid 1.
DEFAULT_LOCK_KEY = int.from_bytes(hashlib.sha256(b"pg-reaper").digest()[:8], "big", signed=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class LockHolder:
    """A backend holding a server's lock that is not a pg-reaper instance. Its names come from
    the server, set by whoever holds the lock: printed (escaped), never trusted."""

    pid: int | None  # None: a prepared transaction holds it (pg_prepared_xacts)
    application: str | None
    role: str | None  # None for a prepared transaction, or a role dropped since it logged in


def default_instance_id() -> str:
    """``hostname:pid``: what tells one instance's audit events from another's."""
    return f"{socket.gethostname()}:{os.getpid()}"


def lock_key_halves(key: int) -> tuple[int, int]:
    """(classid, objid) as pg_locks shows a bigint advisory key: its high and low 32 bits."""
    return (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
