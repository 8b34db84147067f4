"""High availability: several pg-reaper instances share servers through PostgreSQL's own lock
manager (docs/ha.md).

Before it signals anything on a server, an instance takes a session-level advisory lock there,
`pg_try_advisory_lock(lock_key)`, on the very connection that polls and signals. Only the
holder signals, and every signalling statement checks in `pg_locks` that its own backend still
holds the lock: a leader whose connection was lost (and silently reopened) cannot act.

The key is no secret, and any role that can connect to the lock database can take the lock and
keep every instance standing by (lock squatting): each cycle reports a holder that is not a
pg-reaper instance as a `LockHolder` (ha_lead.sql says what counts as one).

Balanced leadership: each daemon's session also holds a shared advisory lock that marks it as a
member, and one more on the servers it asks to lead; `lead` reports the marks of every instance
on the server, `act` hands the lock over and sets this instance's own ask (reaper/daemon/ha.py
decides).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from reaper import APPLICATION_NAME
from reaper.pg.connection import Prepared, query

if TYPE_CHECKING:
    from typing import Any

    from reaper.pg.connection import Connection, RawRow

__all__ = [
    "Leadership",
    "LockHolder",
    "Membership",
    "Probe",
    "act",
    "lead",
    "lock_key_halves",
    "probe",
]


def _compact(text: str) -> str:
    """A statement of `query()` with its runs of white space made one space (no string literal
    in these statements holds any), its naming comment line kept: a follower runs ha_lead.sql at
    every cycle, and psycopg keeps the parsed form of a statement only when its text is under
    4 kB."""
    name, _, body = text.partition("\n")
    if "--" in body:  # a comment at the end of a line would swallow the rest of the statement
        msg = "a statement made one line must have no comment after its code"
        raise ValueError(msg)
    return f"{name}\n{' '.join(body.split())}"


HA_LEAD_SQL = _compact(query("ha_lead"))
HA_ACT_SQL = _compact(query("ha_act"))
# A steady follower's probe: the same statement, prepared on its session (`probe`).
HA_PROBE = Prepared.of("pg_reaper_ha_lead", HA_LEAD_SQL)


@dataclass(frozen=True, slots=True, kw_only=True)
class Membership:
    """This instance's marks on a server: the two-int4 advisory keys (class, member) that say
    it takes part, and that it asks to lead. `member` is an unsigned 32-bit id."""

    lock_key: int
    member: int

    @property
    def member_class(self) -> int:
        return _int4(lock_key_halves(self.lock_key)[0])

    @property
    def want_class(self) -> int:
        return _int4(lock_key_halves(self.lock_key)[1])

    def params(self) -> dict[str, int]:
        return {
            "member": _int4(self.member),
            "member_class": self.member_class,
            "want_class": self.want_class,
        }


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
    # With a Membership: the members on this server (id: seconds their session has lasted),
    # those that ask to lead it, and whether this session holds its own member mark.
    members: dict[int, float] = field(default_factory=dict)
    wanting: frozenset[int] = frozenset()
    joined: bool = False


def lead(
    conn: Connection, lock_key: int, *, acquire: bool, membership: Membership | None = None
) -> Leadership:
    """Whether `conn`'s session holds the advisory lock `lock_key` (checked in pg_locks), taking
    it first if it is free and `acquire`. A lost connection loses the lock with it: the session
    reopened by the next call holds nothing until it takes the lock again."""
    (row,) = conn.run(HA_LEAD_SQL, _params(lock_key, acquire=acquire, membership=membership))
    return _leadership(row)


@dataclass(frozen=True, slots=True)
class Probe:
    """A follower's look at a server's lock (ha_lead.sql, without acquiring), as the server
    answered: `same` tells an answer equal to an earlier one, save the members' ages, without
    reading it; `leadership` reads it."""

    row: RawRow
    fingerprint: tuple[bytes | None, ...]  # every column but member_ages (the last), as sent

    def same(self, other: Probe | None) -> bool:
        return other is not None and self.fingerprint == other.fingerprint

    def leadership(self) -> Leadership:
        return _leadership(self.row.load())


def probe(conn: Connection, lock_key: int, *, membership: Membership) -> Probe | None:
    """`lead(conn, lock_key, acquire=False, membership=membership)` as a `Probe`, on the open
    session; None when there is none or the statement fails (then `lead` says why)."""
    row = conn.run_prepared(HA_PROBE, _probe_params(lock_key, membership))
    if row is None:
        return None
    return Probe(row=row, fingerprint=row.values[:-1])


@lru_cache(maxsize=64)
def _probe_params(lock_key: int, membership: Membership) -> tuple[bytes, ...]:
    return HA_PROBE.encode(_params(lock_key, acquire=False, membership=membership))


def _params(lock_key: int, *, acquire: bool, membership: Membership | None) -> dict[str, object]:
    params: dict[str, object] = {
        "lock_key": lock_key,
        "acquire": acquire,
        "application": APPLICATION_NAME,
        "member": None,
        "member_class": None,
        "want_class": None,
    }
    if membership is not None:
        params |= membership.params()
    return params


def _leadership(row: dict[str, Any]) -> Leadership:
    other = None
    if row["held_by_other"]:
        other = LockHolder(
            pid=row["other_pid"], application=row["other_application"], role=row["other_role"]
        )
    ids, ages = row["members"] or [], row["member_ages"] or []
    return Leadership(
        leader=bool(row["leader"]),
        holder=row["holder"],
        other=other,
        members={int(i): float(a or 0.0) for i, a in zip(ids, ages, strict=False)},
        wanting=frozenset(int(i) for i in row["wanting"] or []),
        joined=bool(row["joined"]),
    )


def act(conn: Connection, membership: Membership, *, release: bool, want: bool | None) -> None:
    """Hand the lock over (`release`, only by the session that holds it), and ask to lead this
    server or stop asking (`want`; None: as it is)."""
    params = {"lock_key": membership.lock_key, "release": release, "want": want}
    conn.run(HA_ACT_SQL, params | membership.params())


def _int4(value: int) -> int:
    """An unsigned 32-bit value as the signed int4 that PostgreSQL's functions take."""
    return value - (1 << 32) if value >= 1 << 31 else value


def lock_key_halves(key: int) -> tuple[int, int]:
    """(classid, objid) as pg_locks shows a bigint advisory key: its high and low 32 bits."""
    return (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
