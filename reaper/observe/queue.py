"""The audit writer's queue: rows waiting to be written, bounded, safe across threads."""

from __future__ import annotations

import collections
import itertools
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Row", "RowQueue"]

Row = dict[str, Any]


class RowQueue:
    """Rows waiting to be written, oldest first, at most `capacity`. One consumer (the writer)
    reads a batch with `peek` and removes it with `pop` once it is written."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rows: collections.deque[Row] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._closed = False
        self.dropped = 0  # rows refused because the queue was full, since it was created

    def __len__(self) -> int:
        with self._ready:
            return len(self._rows)

    def put(self, row: Row) -> bool | None:
        """Append `row`; False when the queue is full (the row is dropped and counted), None when
        it is closed (the row is not taken)."""
        with self._ready:
            if self._closed:
                return None
            if len(self._rows) >= self.capacity:
                self.dropped += 1
                return False
            self._rows.append(row)
            self._ready.notify()
            return True

    def extend(self, rows: Sequence[Row]) -> int:
        """Append what fits of `rows` (oldest first); the number dropped."""
        with self._ready:
            room = max(0, self.capacity - len(self._rows))
            self._rows.extend(rows[:room])
            dropped = max(0, len(rows) - room)
            self.dropped += dropped
            self._ready.notify()
            return dropped

    def peek(self, limit: int, *, until: threading.Event) -> list[Row]:
        """The oldest rows, up to `limit`, waiting for one to come unless `until` is set."""
        with self._ready:
            while not self._rows and not until.is_set():
                self._ready.wait()
            return list(itertools.islice(self._rows, limit))

    def pop(self, count: int) -> None:
        """Remove the `count` oldest rows (a batch just written); nothing once closed."""
        with self._ready:
            if not self._closed:
                for _ in range(min(count, len(self._rows))):
                    self._rows.popleft()

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def close(self) -> list[Row]:
        """Refuse rows from now on; the rows still queued."""
        with self._ready:
            self._closed = True
            rows, self._rows = list(self._rows), collections.deque()
            self._ready.notify_all()
            return rows
