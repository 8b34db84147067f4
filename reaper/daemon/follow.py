"""[ha] followers probed in rounds (docs/ha.md, "What a follower costs").

A server this instance follows, steadily (no change of leadership under way), needs one probe
of its lock per probe period (1.5 intervals, balance.py) and nothing else. Dispatched as a job of
the scheduler, that probe costs the daemon more than the statement: the scheduler's wake-up, a
hand-off to a pool thread and back, the job's bookkeeping, and planning its next run. So such a
server is *parked*: its own job is paused, and the instance's round, a thread of its own that
sleeps until the earliest parked server is due, probes every parked server that is due (or due
within half of its period: a probe early only makes failover sooner), one after the other. The
servers probed together are due together after that, one period after the round, so an
instance's rounds merge into one: it wakes once per period for all the servers it follows. A
parked server's probe (`run`) is its cycle's first statement, the lock probe, with the same
leadership decisions; the rest of a follower's cycle changes nothing while the probe finds what
the last one found.

A probe that finds anything else (the lock taken or free, a change under way, a failure, a new
session) unparks its server: its own job resumes at once, and its cycle looks again and
accounts for it; a cycle that ends as a steady follower's parks it again. A reload that touches
the server, its removal, and an armed signal's request for a poll unpark it too. A server that
stops answering holds up the round's later servers once, for at most its statement timeout and
the grace after it (a probe never connects), and is unparked by that failure.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reaper.observe.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable

    from reaper.daemon.worker import Worker

__all__ = ["FollowerRound"]

# A parked server due within this share of its period goes in the round that runs now: two
# rounds less than half a period apart become one (once, a probe that early), and the
# servers of a round are due again together, so an instance's rounds soon become one.
_EARLY = 0.5
# A park due this little before the round the thread sleeps until does not wake it.
_SAME = 0.001


@dataclass(kw_only=True)
class _Parked:
    worker: Worker
    due: float  # time.monotonic()
    early: float  # seconds: how early it may be probed (a share of its period)


class FollowerRound:
    """The parked servers of this instance, and the thread that probes them in rounds."""

    def __init__(
        self,
        *,
        run: Callable[[Worker], float | None],
        wake: Callable[[Worker], None],
    ) -> None:
        # run(worker): the server's probe; returns in how many seconds from the round's start
        # it is due next if it stays parked, else None. wake(worker): resume its own job.
        self._run, self._wake = run, wake
        self._parked: dict[str, _Parked] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # The rounds' thread, started at the first park: an instance that follows nothing, or
        # runs without [ha], has none. It sleeps until the earliest parked server is due
        # (`_until`, time.monotonic(); None: until woken), and is woken only by a park due
        # before that, or by the shutdown.
        self._thread: threading.Thread | None = None
        self._until: float | None = None
        self._stopped = False

    def park(self, worker: Worker, *, due: float, every: float) -> None:
        """Take `worker`'s probes into the rounds, one every `every` seconds (its own job is
        paused by the caller)."""
        with self._lock:
            if self._stopped:
                return
            self._parked[worker.name] = _Parked(worker=worker, due=due, early=_EARLY * every)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="pg-reaper-followers", daemon=True
                )
                self._thread.start()
            elif self._until is None or due < self._until - _SAME:
                self._changed.notify()

    def unpark(self, name: str) -> bool:
        """Stop probing `name` in the rounds; whether it was parked."""
        with self._lock:
            return self._parked.pop(name, None) is not None

    def parked(self) -> set[str]:
        with self._lock:
            return set(self._parked)

    def cancel(self) -> None:
        """Shutdown: no round any more (one under way stops after its current probe)."""
        with self._lock:
            self._stopped = True
            self._parked.clear()
            self._changed.notify()

    # the rounds

    def _serve(self) -> None:
        """The rounds, one at a time: no server is chosen for a round while it is in one."""
        while True:
            with self._lock:
                while True:
                    if self._stopped:
                        return
                    self._until = min((p.due for p in self._parked.values()), default=None)
                    now = time.monotonic()
                    if self._until is not None and self._until <= now:
                        break
                    self._changed.wait(None if self._until is None else self._until - now)
                self._until = None
                due = sorted(
                    (p for p in self._parked.values() if p.due - p.early <= now),
                    key=lambda p: p.due,
                )
            self._round(due, started=now)

    def _round(self, due: list[_Parked], *, started: float) -> None:
        """Probe `due`, one after the other; each due again its period after `started`, or
        back to its own job."""
        for parked in due:
            if self._stopped:
                return
            try:
                again = self._run(parked.worker)
            except Exception:  # noqa: BLE001 - a bug: its own job runs the cycle, and reports it
                again = None
            with self._lock:
                if self._parked.get(parked.worker.name) is not parked:
                    continue  # unparked meanwhile (a reload, a removal, a poll asked for)
                if again is not None:
                    parked.due = started + again
                    continue
                del self._parked[parked.worker.name]
            try:
                self._wake(parked.worker)
            except Exception as exc:  # noqa: BLE001 - a bug: said, and the round goes on
                get_logger().error(
                    "scheduler", message=f"resuming {parked.worker.name!r} failed: {exc!r}"
                )
