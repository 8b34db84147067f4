"""Who should lead which server under [ha] (docs/ha.md, "Balanced leadership").

Every instance computes the same table from the same two inputs: the names of the servers in
its configuration, and the members present on a server (the ids of the instances whose mark
that server's lock manager shows). The table is exactly balanced, each member getting
floor(M/N) or ceil(M/N) of the M servers, and stable: each server goes to the member it ranks
first (rendezvous hashing of server and member) unless that member is full already, so a member
that comes or goes moves few servers besides its own.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING

from reaper.pg.ha import act, lead

if TYPE_CHECKING:
    from reaper.pg.connection import Connection
    from reaper.pg.ha import Leadership, Membership

__all__ = ["Balance", "member_id", "preferred", "table"]


def member_id(instance: str) -> int:
    """An instance's id on the servers: 32 bits of SHA-256 of its instance id, unsigned."""
    return int.from_bytes(hashlib.sha256(instance.encode()).digest()[:4], "big")


def _weight(server: str, member: int) -> bytes:
    return hashlib.sha256(f"{server}\x00{member}".encode()).digest()[:8]


def _rank(server: str) -> bytes:
    return hashlib.sha256(server.encode()).digest()[:8]


@lru_cache(maxsize=256)
def table(servers: tuple[str, ...], members: frozenset[int]) -> dict[str, int]:
    """The member that should lead each of `servers` (sorted, without duplicates), out of
    `members` (not empty). Servers are dealt in the order of their hash; each goes to the first
    member in its rendezvous order that still has room: the first M mod N members to reach
    ceil(M/N) fill those places, every other member stops at floor(M/N)."""
    if not members:
        return {}
    base, extra = divmod(len(servers), len(members))
    load = dict.fromkeys(members, 0)
    full = 0  # members that hold base + 1 servers
    assigned: dict[str, int] = {}
    for server in sorted(servers, key=lambda s: (_rank(s), s)):
        order = sorted(members, key=lambda m: (_weight(server, m), m), reverse=True)
        for member in order:
            if load[member] < base or (load[member] == base and full < extra):
                if load[member] == base:
                    full += 1
                load[member] += 1
                assigned[server] = member
                break
    return assigned


def preferred(server: str, servers: tuple[str, ...], members: frozenset[int]) -> int | None:
    """The member that should lead `server`, from the table of `servers` (sorted, without
    duplicates) and `members`."""
    names = servers if server in servers else tuple(sorted({*servers, server}))
    return table(names, members).get(server)


# --- one server's side of it ---------------------------------------------------------------------

# A member that did not take a server handed to it (or left free for it) within the grace is
# not offered that server again for this many intervals; nor does an instance that lost a server
# (not by handing it over) ask for it again before as many intervals: the server stays where it
# moved, and balance returns at the next change of members or after that time.
SKIP_INTERVALS = 30

# A steady follower probes a server once every this many of its intervals. The member that
# should lead a server whose lock falls free sees it within 1.5 intervals, inside the two that
# failover is held to, for two thirds of the probes of one per interval: a follower's probes are
# most of what an [ha] instance spends beyond its own share of the polls (bench/ha.py).
FOLLOW_INTERVALS = 1.5


@dataclass(kw_only=True)
class Balance:
    """A server's balanced leadership between cycles: what this instance asks for and waits
    for on it. Only the server's own job touches it."""

    server: str
    membership: Membership
    servers: tuple[str, ...]  # the names of the servers of this instance's configuration
    interval: float  # the server's, in seconds
    free_since: float | None = None  # time.monotonic() when the lock was first seen free
    want_since: float | None = None  # since when this instance asks to lead the server
    skipped: dict[int, float] = field(default_factory=dict)  # member: not offered until
    retired_until: float = 0.0  # after losing the server: it does not ask for it until then
    handed_to: int | None = None  # the member this cycle handed the lock to, if it did
    settling: bool = False  # a change is under way: look again sooner (`cadence`)

    def decide(
        self, conn: Connection, seen: Leadership, *, may_ask: bool, may_take: bool
    ) -> Leadership:
        """From what the probe saw, hand the lock over, ask for it, or take it; the leadership
        this session has after that. Not `may_ask` during the hold-off after losing the lock;
        not `may_take` either in a cycle whose session was reopened."""
        now, me = time.monotonic(), self.membership.member
        self.skipped = {m: t for m, t in self.skipped.items() if t > now}
        self.handed_to = None
        best = preferred(self.server, self.servers, frozenset(seen.members) | {me})
        if seen.leader:
            return self._lead(conn, seen, best=best)
        mine = best == me and now >= self.retired_until and may_ask
        if (me in seen.wanting) != mine:
            act(conn, self.membership, release=False, want=mine)
        self.want_since = (self.want_since or now) if mine else None
        if seen.holder is not None or seen.other is not None:
            self.free_since = None
            self.settling = (
                self.want_since is not None and now - self.want_since < 2 * self.interval
            )
            return seen
        self.settling = True
        self.free_since = self.free_since or now
        if not may_take or not (mine or now - self.free_since >= self._grace(now)):
            return seen
        taken = lead(conn, self.membership.lock_key, acquire=True, membership=self.membership)
        if taken.leader:
            self.free_since, self.settling = None, False
            if best is not None and best != me:  # the one that should lead did not take it
                self.skipped[best] = now + SKIP_INTERVALS * self.interval
        return taken

    def _lead(self, conn: Connection, seen: Leadership, *, best: int | None) -> Leadership:
        """This session holds the lock: hand it to the member that should lead the server once
        that member has asked for it and its session has lasted half an interval."""
        me = self.membership.member
        asking = me in seen.wanting
        self.free_since = self.want_since = None
        self.settling = best is not None and best != me and best in seen.wanting
        self.settling = self.settling and best not in self.skipped
        if best is not None and self.settling and seen.members.get(best, 0.0) >= self.interval / 2:
            act(conn, self.membership, release=True, want=False if asking else None)
            self.handed_to, self.settling = best, False
            return replace(seen, leader=False, holder=None)
        if asking:
            act(conn, self.membership, release=False, want=False)
        return seen

    @property
    def follow_every(self) -> float:
        """Seconds between a steady follower's probes of the server."""
        return self.interval * FOLLOW_INTERVALS

    def _grace(self, now: float) -> float:
        """How long a free lock waits for the member that should lead the server before this
        instance takes it: one follower's probe period, in which the preferred member probes
        and takes it; three while this instance leaves the server it lost to the others, so that
        the instance that lost it does not race them for it: they see the free lock within a
        period and take it one period later."""
        return self.follow_every * (3 if now < self.retired_until else 1)

    def lost(self) -> None:
        """The server's lock was taken from this instance: it leaves the server where it goes."""
        self.retired_until = time.monotonic() + SKIP_INTERVALS * self.interval

    def cadence(self, delay: float, *, leader: bool, min_interval: float) -> float:
        """Seconds to the next cycle: a follower only probes, once every `FOLLOW_INTERVALS`
        intervals; while a change is under way, every quarter interval (a handover, a free
        lock, an ask)."""
        if not leader:
            delay = self.follow_every
        if self.settling:
            delay = min(delay, self.interval / 4)
        return max(delay, min(min_interval, self.interval))
