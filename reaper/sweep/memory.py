"""What the daemon remembers of one server's backends from one cycle to the next: the cancels
that may need escalating (cancel-then-terminate), and the episodes a `log` policy reported."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from datetime import datetime

    from reaper.policy import Rule, Session

__all__ = ["Cancels", "LoggedEpisodes", "Memory"]


@dataclass(frozen=True, slots=True)
class _Cancelled:
    policy: str
    state_change: datetime | None  # the cancelled query's: a new query is a new story
    at: float  # time.monotonic() of the cancel


_V = TypeVar("_V")


class _PerBackend(Generic[_V]):
    """Something remembered per backend of one server between cycles. Keyed by (pid,
    backend_start): a reused pid is another session. Bounded: backends that are gone are
    forgotten at every poll, and beyond `capacity` the oldest entries are."""

    def __init__(self, *, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, datetime | None], _V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keep_only(self, sessions: Iterable[Session]) -> None:
        """Forget the backends that are no longer there."""
        present = {(s.pid, s.backend_start) for s in sessions}
        for key in [k for k in self._entries if k not in present]:
            del self._entries[key]

    def _get(self, session: Session) -> _V | None:
        return self._entries.get((session.pid, session.backend_start))

    def _put(self, session: Session, value: _V) -> None:
        """Note `value` for `session`, as the newest entry."""
        key = (session.pid, session.backend_start)
        self._entries.pop(key, None)
        self._entries[key] = value
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def forget(self, session: Session) -> None:
        self._entries.pop((session.pid, session.backend_start), None)


class Cancels(_PerBackend[_Cancelled]):
    """The sessions of one server cancelled by a policy with `escalate_after`, for the daemon to
    terminate those still running the same query that long after (cancel-then-terminate)."""

    def __init__(
        self, *, capacity: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(capacity=capacity)
        self.clock = clock

    def remember(self, session: Session, *, policy: str) -> None:
        self._put(session, _Cancelled(policy, session.state_change, self.clock()))

    def due_in(self, session: Session, policy: Rule) -> float | None:
        """Seconds until `session`, cancelled by `policy` and still running the same query,
        is to be terminated (0 or less: now); None if it was not cancelled for this query."""
        entry = self._get(session)
        if (
            entry is None
            or policy.escalate_after is None
            or entry.policy != policy.name
            or entry.state_change != session.state_change
        ):
            return None
        return policy.escalate_after.total_seconds() - (self.clock() - entry.at)


class LoggedEpisodes(_PerBackend[tuple[str, "datetime | None"]]):
    """The sessions a `log` policy has reported on one server, so that the daemon reports each
    episode once: the same backend, in its state since the same state_change, matched by the
    same policy. A session that leaves its state and comes back is a new episode."""

    def __init__(self, *, capacity: int = 10_000) -> None:
        super().__init__(capacity=capacity)

    def first(self, session: Session, *, policy: str) -> bool:
        """Whether this is the first report of `session`'s episode by `policy` (and note it)."""
        episode = (policy, session.state_change)
        if self._get(session) == episode:
            return False
        self._put(session, episode)
        return True


@dataclass(frozen=True, slots=True)
class Memory:
    """What the daemon keeps of one server from one cycle to the next."""

    cancels: Cancels = field(default_factory=Cancels)
    logged: LoggedEpisodes = field(default_factory=LoggedEpisodes)

    def keep_only(self, sessions: Iterable[Session]) -> None:
        """Forget the backends that are no longer there."""
        self.cancels.keep_only(sessions)
        self.logged.keep_only(sessions)
