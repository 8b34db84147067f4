"""One `[[servers]]` entry acts on a cluster, in the daemon (docs/configuration.md).

Only the first entry in config order among those whose session is on a cluster acts on it. An
entry that acts keeps acting until its own next cycle, when it hands the cluster to an earlier
entry that has come up on it meanwhile; an entry whose poll fails lets the cluster go. At start a
later entry lets the earlier ones read their identity first. So two entries never act on one
cluster in the same cycle, however their cycles overlap. The identity is read on every new
session: at start, after a reconnection, and after a reload (reaper/clusters.py reads it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reaper import clusters
from reaper.pg.connection import PostgresError

if TYPE_CHECKING:
    from reaper.pg.activity import ServerConnection
    from reaper.settings import Settings

__all__ = ["ClusterArbiter", "Seat"]


@dataclass
class Seat:
    """One entry's standing: the cluster its session is on, read on each new session (the
    connection and its session count); why it is refused, if it is, and whether this cycle was.
    Only the entry's own job changes it, the cluster under the arbiter's lock."""

    name: str
    cluster: clusters.ClusterIdentity | None = None
    identified: tuple[object, int] | None = None
    refused: str | None = None
    refused_this_cycle: bool = False
    # The clusters it acts on by the arbiter's table (one, or none), under the arbiter's lock:
    # a seat's entries are dropped without a scan of every cluster's.
    acts_on: set[clusters.ClusterIdentity] = field(default_factory=set)
    # Set once its first session's identity has been read (or could not be).
    first_identity: threading.Event = field(default_factory=threading.Event)


class ClusterArbiter:
    """Which entry acts on each cluster, among the daemon's entries (`seat`, `unseat`)."""

    def __init__(self, *, log: Any) -> None:  # noqa: ANN401 - structlog's bound loggers are untyped proxies
        self._log = log
        self._lock = threading.Lock()
        self._seats: dict[str, Seat] = {}
        self._acting: dict[clusters.ClusterIdentity, Seat] = {}  # under self._lock
        # Under self._lock too: the seats on each cluster (by their `cluster`), and how many
        # seats have not had their first identity read. With them a cycle costs the same for
        # 1 entry or 1,000; a scan of every entry at every cycle of each would not.
        self._members: dict[clusters.ClusterIdentity, dict[str, Seat]] = {}
        self._pending = 0
        self._order: tuple[object, dict[str, int]] | None = None  # (settings, name -> index)

    def seat(self, name: str) -> Seat:
        seat = Seat(name=name)
        with self._lock:
            self._seats[name] = seat
            self._pending += 1
        return seat

    def unseat(self, name: str) -> None:
        with self._lock:
            seat = self._seats.pop(name, None)
            if seat is not None:
                self._place(seat, None)
                if not seat.first_identity.is_set():
                    seat.first_identity.set()
                    self._pending -= 1

    def admit(self, seat: Seat, conn: ServerConnection, *, settings: Settings) -> str | None:
        """None when `seat`'s entry may act on its cluster this cycle; else why not, which
        makes its poll a failed one."""
        seat.refused_this_cycle = False
        if len(settings.servers) < 2:  # one entry is one cluster
            self._say_refused(seat, None, acting=seat.name)
            return None
        if self._alone(seat, conn):
            return None
        try:
            identity = self._identify(seat, conn)
        except PostgresError as exc:
            return str(exc)
        finally:
            if not seat.first_identity.is_set():
                with self._lock:
                    if not seat.first_identity.is_set():
                        seat.first_identity.set()
                        self._pending -= 1
        self._wait_for_earlier_entries(seat, settings=settings)
        order = self._order_of(settings)
        acting = self._choose(seat, identity, order)
        if acting is seat:
            self._say_refused(seat, None, acting=seat.name)
            return None
        first, second = sorted((seat.name, acting.name), key=order.__getitem__)
        duplicate = clusters.Duplicate(
            first=first,
            first_index=order[first],
            second=second,
            second_index=order[second],
            identity=identity,
        )
        self._say_refused(seat, duplicate, acting=acting.name)
        seat.refused_this_cycle = True
        return f"{duplicate.message}; only {acting.name!r} acts on it"

    def cycle_ended(self, seat: Seat, *, ok: bool) -> None:
        """An entry whose poll failed (not for being refused) lets its cluster go: the next
        entry on it takes over, and this one's identity is read again on its next session."""
        if ok or seat.refused_this_cycle:
            return
        with self._lock:
            self._stop_acting(seat)
            self._place(seat, None)
            seat.identified = seat.refused = None

    def _alone(self, seat: Seat, conn: ServerConnection) -> bool:
        """Whether `seat` acts on its cluster, as its last cycle found, and is the only entry
        seen on it: the same session (so the same cluster), nothing to hand over, nothing to
        say. A fleet's entries are each alone on their cluster: the whole check is then this."""
        if seat.refused is not None or not seat.first_identity.is_set():
            return False
        if not conn.connected or seat.identified != (conn, conn.sessions_opened):
            return False  # a new session: read its cluster again (the slow path connects)
        with self._lock:
            cluster = seat.cluster
            return (
                cluster is not None
                and self._acting.get(cluster) is seat
                and len(self._members.get(cluster, ())) == 1
                and self._seats.get(seat.name) is seat
            )

    def _identify(self, seat: Seat, conn: ServerConnection) -> clusters.ClusterIdentity:
        """The cluster `conn`'s session is on, read again on a new session."""
        identity = seat.cluster
        conn.connect()
        if seat.identified != (conn, conn.sessions_opened) or identity is None:
            identity = clusters.identify(conn)
            seat.identified = (conn, conn.sessions_opened)
        with self._lock:
            self._place(seat, identity)
        return identity

    def _place(self, seat: Seat, identity: clusters.ClusterIdentity | None) -> None:
        """Set `seat.cluster`, and the index of the seats on each cluster. Under the lock."""
        if seat.cluster is not None:
            members = self._members.get(seat.cluster)
            if members is not None and members.get(seat.name) is seat:
                del members[seat.name]
                if not members:
                    del self._members[seat.cluster]
        seat.cluster = identity
        if identity is not None:
            self._members.setdefault(identity, {})[seat.name] = seat

    def _order_of(self, settings: Settings) -> dict[str, int]:
        """Each entry's place in the configuration, computed once per settings object."""
        known = self._order
        if known is None or known[0] is not settings:
            order = {server.name: index for index, server in enumerate(settings.servers)}
            self._order = known = (settings, order)
        return known[1]

    def _choose(
        self, seat: Seat, identity: clusters.ClusterIdentity, order: dict[str, int]
    ) -> Seat:
        """The entry that acts on `identity` this cycle."""
        with self._lock:
            self._stop_acting(seat, keep=identity)  # its session is now on another cluster
            acting = self._acting.get(identity)
            if acting is None or acting is seat or self._seats.get(acting.name) is not acting:
                # Free, or this entry's to keep or to hand to an earlier one on the cluster.
                members = self._members.get(identity, {}).values()
                acting = min(
                    (s for s in members if s.cluster == identity and s.name in order),
                    key=lambda s: order[s.name],
                    default=seat,
                )
                previous = self._acting.get(identity)
                if previous is not None:
                    previous.acts_on.discard(identity)
                self._acting[identity] = acting
                acting.acts_on.add(identity)
            return acting

    def _stop_acting(self, seat: Seat, *, keep: clusters.ClusterIdentity | None = None) -> None:
        """Drop `seat` from the table of acting entries, except on `keep`. Under the lock."""
        for key in [k for k in seat.acts_on if k != keep]:
            seat.acts_on.discard(key)
            if self._acting.get(key) is seat:
                del self._acting[key]

    def _wait_for_earlier_entries(self, seat: Seat, *, settings: Settings) -> None:
        """At start (or when a reload adds several entries), all first cycles run at once: let
        the entries before this one read their identity first (bounded by the time a dead or
        hung server takes), so that a later entry never acts on a cluster before an earlier
        one could say it is on it too."""
        if not self._pending:  # every entry's first identity is read: none to wait for
            return
        reaper = settings.reaper
        deadline = time.monotonic() + (
            reaper.connect_timeout.total_seconds() + reaper.statement_timeout.total_seconds() + 3
        )
        names = [s.name for s in settings.servers]
        with self._lock:
            earlier = [
                s
                for name in names[: names.index(seat.name)]
                if (s := self._seats.get(name)) is not None
            ]
        for other in earlier:
            other.first_identity.wait(max(0.0, deadline - time.monotonic()))

    def _say_refused(
        self, seat: Seat, duplicate: clusters.Duplicate | None, *, acting: str
    ) -> None:
        """One log line when an entry starts or stops being refused, not one per cycle."""
        message = None if duplicate is None else duplicate.message
        if message == seat.refused:
            return
        if duplicate is not None:
            self._log.error(
                "duplicate_cluster",
                server=seat.name,
                acting=acting,
                system_identifier=duplicate.identity.system_identifier,
                error=f"{message}; only {acting!r} acts on it, {seat.name!r} signals nothing",
            )
        elif seat.refused is not None:
            self._log.info("duplicate_cluster_resolved", server=seat.name)
        seat.refused = message
