"""[ha] leadership as the daemon keeps it, one server at a time (docs/ha.md).

Each cycle of a server first polls it, then takes (or checks) the server's advisory lock on the
same session (`CycleLock.lead`, the SQL in reaper/pg/ha.py); only the holder signals, and every
signalling statement checks that it still holds the lock. Between cycles a `LeaderState`
remembers whether this instance held the lock and on which session: a session that was lost and
reopened holds nothing, and an instance that lost the lock leaves it to the others for two
intervals, so that leadership moves rather than returning to where it failed. It also says, once
per change, who holds the lock when it is not a pg-reaper instance (lock squatting).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reaper.pg.ha import lead

if TYPE_CHECKING:
    from reaper.observe.metrics import Metrics
    from reaper.pg.activity import ServerConnection
    from reaper.pg.ha import Leadership, LockHolder
    from reaper.settings import ServerConfig, Settings
    from reaper.sweep import SweepReport

__all__ = ["CycleLock", "LeaderState", "announce"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CycleLock:
    """[ha] for one cycle: the advisory lock to hold before signalling (reaper.sweep.HaLock)."""

    key: int
    acquire: bool  # False while this instance lets another one take over
    # The session (ServerConnection.sessions_opened) that held the lock at the last cycle, if
    # one did: should the poll have opened another, the lock was lost with the old one, and
    # this cycle leaves it to the others.
    held_by: int | None = None

    def lead(self, conn: ServerConnection) -> Leadership:
        lost = self.held_by is not None and self.held_by != conn.sessions_opened
        return lead(conn, self.key, acquire=self.acquire and not lost)


def announce(settings: Settings, *, log: Any) -> None:  # noqa: ANN401 - structlog's bound loggers are untyped proxies
    """One line at start when [ha] is on: who this instance is, and which lock it competes for."""
    ha = settings.ha
    if ha.enabled:
        log.info(
            "ha_enabled",
            instance=ha.instance,
            lock_key=ha.lock_key,
            lock_database=ha.lock_database,
        )


@dataclass(kw_only=True)
class LeaderState:
    """A server's [ha] leadership between cycles; only the server's own job touches it."""

    server: str
    metrics: Metrics
    log: Any  # structlog's bound logger
    # Whether this instance holds the server's lock (None: not known, or no [ha]); after losing
    # it, it leaves the lock to the other instances until `retry_at` (time.monotonic()).
    leader: bool | None = None
    session: int | None = None  # the connection's session that holds the lock
    retry_at: float = 0.0
    other: LockHolder | None = None  # the lock's holder that is not a pg-reaper instance

    def lock(self, settings: Settings) -> CycleLock | None:
        """The lock of the coming cycle (None without [ha])."""
        ha = settings.ha
        if not ha.enabled:
            return None
        return CycleLock(
            key=ha.lock_key,
            acquire=time.monotonic() >= self.retry_at,
            held_by=self.session if self.leader else None,
        )

    def new_connection(self) -> None:
        """The server's connection was replaced: sessions are counted per connection object."""
        self.session = None

    def cycle_ended(self, report: SweepReport, *, settings: Settings, server: ServerConfig) -> None:
        """pg_reaper_leader, and one log line per change of leadership ([ha]), not per cycle."""
        metrics, log = self.metrics, self.log
        if not settings.ha.enabled:
            self.leader, self.other = None, None
            metrics.leader.labels(server=self.server).set(1)
            return
        if report.ok:  # while the server cannot be polled, who holds its lock is not known
            self._squatting(report.lock_held_by_other, instance=settings.ha.instance)
        leader = report.ok and report.leader
        metrics.leader.labels(server=self.server).set(1 if leader else 0)
        was = self.leader
        fields = {"server": self.server, "instance": settings.ha.instance}
        if leader and was is not True:
            log.info("leadership_acquired", **fields)
        elif not leader and was is True:
            hold_off = 2 * settings.interval_for(server).total_seconds()
            self.retry_at = time.monotonic() + hold_off
            reason = report.error or "the lock is no longer held by this session"
            log.warning("leadership_lost", **fields, reason=reason, retry_in=round(hold_off, 3))
        elif not leader and was is None and report.ok:
            log.info("leadership_standby", **fields, holder_pid=report.lock_holder)
        self.leader = leader if report.ok or leader else None
        self.session = report.session if leader else None

    def _squatting(self, other: LockHolder | None, *, instance: str) -> None:
        """pg_reaper_lock_held_by_other, and one log line per change of the backend that holds
        the server's lock without being a pg-reaper instance, not per cycle. Its application and
        role are the server's data, chosen by whoever holds the lock: they are logged as fields
        (escaped by the renderer), never matched against anything."""
        self.metrics.lock_held_by_other.labels(server=self.server).set(0 if other is None else 1)
        was, self.other = self.other, other
        if other == was:
            return
        fields = {"server": self.server, "instance": instance}
        if other is not None:
            self.log.warning(
                "lock_held_by_other",
                **fields,
                holder_pid=other.pid,
                application=other.application,
                role=other.role,
            )
        elif was is not None:
            self.log.info("lock_held_by_other_ended", **fields, holder_pid=was.pid)
