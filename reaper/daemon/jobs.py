"""The daemon's glue to APScheduler 3: job ids, triggers, due times, first runs spread over a
fleet, and APScheduler's own log lines turned into pg-reaper's events."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from apscheduler.triggers.interval import IntervalTrigger

from reaper.observe.log import get_logger

if TYPE_CHECKING:
    from reaper.settings import ServerConfig, Settings

__all__ = ["first_runs", "job_id", "now", "quiet_apscheduler", "spread", "trigger"]

# The first runs (and the runs a reload asks for) of many servers are spread this far apart at
# most, over one interval at most: all due at once, each would take a thread of its own
# (threads are kept once made, a few hundred kB each) and they would stay bunched. They go in
# small groups, each due at one moment: one wake-up of the scheduler dispatches a whole group,
# and a quiet server's job keeps its phase (its next run is its last one's due time plus its
# interval), so the groups stay. One moment exactly (`first_runs`): due even a few
# microseconds apart, its servers would be dispatched by wake-ups of their own, each waking the
# cycles' thread and the deadline thread again.
_FIRST_RUN_SPACING = 0.01
_GROUP = 10


def trigger(settings: Settings, server: ServerConfig) -> IntervalTrigger:
    return IntervalTrigger(seconds=settings.interval_for(server).total_seconds(), timezone=UTC)


def job_id(name: str) -> str:
    return f"server:{name}"


def now(after: float = 0.0) -> datetime:
    return datetime.fromtimestamp(time.time() + after, tz=UTC)


def spread(settings: Settings) -> dict[str, float]:
    """Seconds from now to each server's first run, in groups of _GROUP: _FIRST_RUN_SPACING
    apart on average, or closer so that the last is due within the shortest interval."""
    servers = settings.servers
    if not servers:
        return {}
    shortest = min(settings.interval_for(s).total_seconds() for s in servers)
    step = min(_FIRST_RUN_SPACING, shortest / len(servers))
    return {server.name: (i // _GROUP) * _GROUP * step for i, server in enumerate(servers)}


def first_runs(settings: Settings) -> dict[str, datetime]:
    """When each server runs first (`spread` from one reading of the clock): the servers of a
    group at the very same moment."""
    base = time.time()
    return {
        name: datetime.fromtimestamp(base + offset, tz=UTC)
        for name, offset in spread(settings).items()
    }


def quiet_apscheduler() -> None:
    """APScheduler logs every run at INFO, and every run skipped because the previous one is
    still busy at WARNING: both are the scheduler doing its job (overruns and failures are
    reported as pg-reaper's own events). Keep only its errors, as events."""
    logger = logging.getLogger("apscheduler")
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    if not any(isinstance(h, _ToStructlog) for h in logger.handlers):
        logger.addHandler(_ToStructlog())


class _ToStructlog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        get_logger().error("scheduler", message=record.getMessage())
