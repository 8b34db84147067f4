"""A server's state in the daemon between its cycles (reaper/daemon/scheduler.py runs them)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reaper.sweep import Memory

if TYPE_CHECKING:
    from datetime import datetime

    from reaper.daemon import ha
    from reaper.daemon.arbiter import Seat
    from reaper.pg.activity import ServerConnection
    from reaper.pg.ha import Probe
    from reaper.settings import ServerConfig, Settings

__all__ = ["Worker"]


@dataclass(kw_only=True)
class Worker:
    """A server's state between cycles. Only its own job touches it while it runs."""

    name: str
    settings: Settings
    seat: Seat  # its standing among the entries on its cluster (one acts on each)
    leadership: ha.LeaderState  # [ha]: whether it holds the server's lock
    conn: ServerConnection | None = None
    conn_key: tuple[Any, ...] = ()
    failures: int = 0
    state: str = "unknown"  # unknown | up | down
    last_error: str | None = None
    tried: bool = False
    polls: int = 0
    next_due: datetime | None = None  # set by a cycle, applied once the job has finished
    # [ha]: time.monotonic() of the next probe if the last cycle left this instance a steady
    # follower of the server (follow.py: its probes go in the rounds, its own job is paused).
    park_at: float | None = None
    # [ha], while parked: the last probe judged steady (and its session), and until when
    # (time.monotonic()) that judgement holds for the same answer (scheduler._run_parked).
    steady: tuple[int, Probe] | None = None
    steady_until: float = 0.0
    poll_by: datetime | None = None  # asked for by an armed signal (escalation, cap, lost lock)
    cycle_thread: int | None = None  # the pool thread running (or last running) the cycle
    generation: int = 0  # bumped by every reload that touches this server
    removed: bool = False  # by a reload: a cycle still running arms nothing any more
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The sessions it cancelled by a policy with escalate_after (cancel-then-terminate), and the
    # episodes its `log` policies reported (each once, not at every poll).
    memory: Memory = field(default_factory=Memory)
    # Its entry in `settings` (None: not there), looked up once per settings object: a search
    # of every entry at every cycle costs a fleet of N servers N^2 steps per interval.
    _found: tuple[Settings, ServerConfig | None] | None = None

    @property
    def config(self) -> ServerConfig | None:
        settings = self.settings
        if self._found is None or self._found[0] is not settings:
            found = next((s for s in settings.servers if s.name == self.name), None)
            self._found = (settings, found)
        return self._found[1]

    @property
    def server(self) -> ServerConfig:
        server = self.config
        if server is None:
            raise KeyError(self.name)
        return server

    def close(self) -> None:
        """Close the server's connection, if it has one (its [ha] lock goes with it)."""
        if self.conn is not None:
            self.conn.close()
        self.conn = None
