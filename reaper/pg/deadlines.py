"""One thread that fires the deadlines of every statement in flight.

Every statement the reaper sends is watched: a stopped or unreachable server cannot enforce its
own statement_timeout, so the reaper severs the connection itself when no answer comes in time.
A timer thread per statement would cost a thread start and stop for each of them (two per poll,
hundreds per second for a large fleet); one thread and a heap cost a push and a flag. The thread
is woken only for a deadline earlier than the one it sleeps until: answered statements leave
their entries behind, which it drops when it wakes. It keeps the last of them, answered or not,
and sleeps until that one's time: a statement sent meanwhile, whose deadline comes later, then
costs it no wake-up (dropping them all, it would wait for a notification, and the next statement
would wake it: once per cycle).
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Deadline", "arm"]


class Deadline:
    """A pending action; `cancel()` it once the statement has answered."""

    __slots__ = ("_action", "at")

    def __init__(self, at: float, action: Callable[[], None]) -> None:
        self.at = at
        self._action: Callable[[], None] | None = action

    def cancel(self) -> None:
        self._action = None

    @property
    def cancelled(self) -> bool:
        return self._action is None

    def _take(self) -> Callable[[], None] | None:
        action, self._action = self._action, None
        return action


class _Watch:
    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties in `at` never compare two Deadlines
        self._thread: threading.Thread | None = None
        # When the watcher wakes up by itself (inf: it waits for a notification; -inf: it is
        # awake and looks at the heap before it waits again). Waking it for a deadline later
        # than that would cost a thread switch at every statement, for nothing.
        self._until = -math.inf

    def arm(self, seconds: float, action: Callable[[], None]) -> Deadline:
        deadline = Deadline(time.monotonic() + seconds, action)
        with self._wake:
            # Answered statements leave their entries behind; drop those at the top here (but
            # the last, which the watcher may sleep until), so that the heap holds about one
            # entry per statement in flight.
            self._drop_answered()
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pg-reaper-deadlines", daemon=True
                )
                self._thread.start()
            elif deadline.at < self._until:
                self._wake.notify()
        return deadline

    def _drop_answered(self) -> None:
        """Drop the cancelled entries at the top of the heap, but the last. Under the lock."""
        while len(self._heap) > 1 and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)

    def _run(self) -> None:
        while True:
            with self._wake:
                self._drop_answered()
                if not self._heap:
                    self._until = math.inf
                    self._wake.wait()
                    self._until = -math.inf
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left <= 0 and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)  # the last one kept, its time come
                    continue
                if left > 0:
                    self._until = self._heap[0][0]
                    self._wake.wait(left)
                    self._until = -math.inf
                    continue
                action = heapq.heappop(self._heap)[2]._take()  # noqa: SLF001 - its own class
            if action is not None:
                action()


_WATCH = _Watch()


def arm(seconds: float, action: Callable[[], None]) -> Deadline:
    """Run `action` in `seconds` unless the returned deadline is cancelled first."""
    return _WATCH.arm(seconds, action)
