"""[ha] leadership as the daemon keeps it, one server at a time (docs/ha.md).

Each cycle of a server first looks at the server's advisory lock and at the members present
there, on the session that polls and signals (`CycleLock.lead`, the SQL in reaper/pg/ha.py),
hands the lock over, asks for it or takes it as balance.py decides, and polls only if it leads:
a follower's cycle is that one probe. Only the holder signals, and every signalling statement
checks that it still holds the lock. Between cycles a `LeaderState`
remembers whether this instance held the lock and on which session: a session that was lost and
reopened holds nothing, and an instance that lost the lock leaves it to the others for two
intervals, so that leadership moves rather than returning to where it failed. It also says, once
per change, who holds the lock when it is not a pg-reaper instance (lock squatting).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reaper.daemon.balance import Balance, member_id
from reaper.pg.ha import Membership, lead

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
    balance: Balance | None = None  # the daemon's: balanced leadership among the members

    def lead(self, conn: ServerConnection) -> Leadership:
        # The probe opens a new session if the old one was lost: only then can it be told.
        membership = None if self.balance is None else self.balance.membership
        return self.judge(conn, lead(conn, self.key, acquire=False, membership=membership))

    def judge(self, conn: ServerConnection, seen: Leadership) -> Leadership:
        """From what a probe of the lock saw (without acquiring), on `conn`'s session: hand it
        over, ask for it or take it; the leadership this session has after that."""
        lost = self.held_by is not None and self.held_by != conn.sessions_opened
        if self.balance is None:  # no balancing: take the lock whenever it is free
            if seen.leader or not self.acquire or lost or seen.holder is not None:
                return seen
            return lead(conn, self.key, acquire=True)
        return self.balance.decide(
            conn, seen, may_ask=self.acquire, may_take=self.acquire and not lost
        )


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
    balance: Balance | None = None
    balanced_for: Settings | None = None  # the settings `balance` was last fitted to

    def lock(self, settings: Settings) -> CycleLock | None:
        """The lock of the coming cycle (None without [ha])."""
        ha = settings.ha
        if not ha.enabled:
            return None
        if self.balance is None or self.balanced_for is not settings:
            # Once per configuration, not per cycle: a fleet's N servers would cost each cycle
            # a search and a sort of N names.
            self._fit_balance(settings)
        return CycleLock(
            key=ha.lock_key,
            acquire=time.monotonic() >= self.retry_at,
            held_by=self.session if self.leader else None,
            balance=self.balance,
        )

    def _fit_balance(self, settings: Settings) -> None:
        ha = settings.ha
        server = next(s for s in settings.servers if s.name == self.server)
        membership = Membership(lock_key=ha.lock_key, member=member_id(ha.instance))
        servers = tuple(sorted(s.name for s in settings.servers))
        interval = settings.interval_for(server).total_seconds()
        if self.balance is None or self.balance.membership != membership:
            self.balance = Balance(
                server=self.server, membership=membership, servers=servers, interval=interval
            )
        self.balance.servers, self.balance.interval = servers, interval
        self.balanced_for = settings

    def decided_until(self, now: float) -> float:
        """Until when (time.monotonic()) a follower's decision stands for the same answer of
        its probe: the end of a hold-off or of a retirement (balance.py) changes what it asks."""
        ends = (self.retry_at, 0.0 if self.balance is None else self.balance.retired_until)
        return min((end for end in ends if end > now), default=math.inf)

    def cadence(self, delay: float, report: SweepReport, *, settings: Settings) -> float:
        """Seconds to the next cycle: `delay` (the deadline rule), but a follower only probes,
        once every 1.5 intervals, and more often while leadership is changing hands
        (balance.py)."""
        if not settings.ha.enabled or self.balance is None or not report.ok:
            return delay
        min_interval = settings.reaper.min_interval.total_seconds()
        return self.balance.cadence(delay, leader=report.leader, min_interval=min_interval)

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
        handed_to = None if self.balance is None else self.balance.handed_to
        if not leader and was is not False:  # what only the leader measures is the leader's
            metrics.forget_leader_gauges(
                self.server, policies=[p.name for p in settings.policies_for(server)]
            )
        if leader and was is not True:
            log.info("leadership_acquired", **fields)
        elif not leader and was is True and handed_to is not None:
            log.info("leadership_handed_over", **fields, to_member=handed_to)
        elif not leader and was is True:
            if self.balance is not None:
                self.balance.lost()
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
