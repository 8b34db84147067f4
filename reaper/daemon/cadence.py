"""When a server is polled next (the deadline rule).

After a poll, a server's next poll is due when the next of its sessions would cross a threshold,
bounded below by `min_interval` and above by `interval` and by the server's smallest threshold
(a session that turns idle just after a poll is then seen before it can be eligible). The
crossings of armed sessions (reaper/daemon/armed.py) are left out of the report's `eligible_in`:
their timers signal them, and the polls need only see each session once before it is due. A lost
server is retried with exponential backoff from `min_interval` up to `interval`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reaper.settings import ServerConfig, Settings
    from reaper.sweep import SweepReport

__all__ = ["delay_for", "next_delay", "poll_bound"]

# Poll a little after the computed crossing: eligibility is "age > threshold", strictly.
_PAST_THRESHOLD = 0.05


def delay_for(
    report: SweepReport, *, settings: Settings, server: ServerConfig, failures: int
) -> float:
    """Seconds from the start of this cycle of `server` to its next one."""
    return next_delay(
        report,
        interval=settings.interval_for(server).total_seconds(),
        min_interval=settings.reaper.min_interval.total_seconds(),
        smallest_threshold=_smallest_threshold(settings, server),
        failures=failures,
    )


def poll_bound(settings: Settings, server: ServerConfig) -> float:
    """The longest time from one successful poll of `server` to the next (the rule's upper
    bound): a crossing further away is seen again by a poll before it comes."""
    bound = settings.interval_for(server).total_seconds()
    if (smallest := _smallest_threshold(settings, server)) is not None:
        bound = min(bound, smallest)
    return max(bound, settings.reaper.min_interval.total_seconds())


def _smallest_threshold(settings: Settings, server: ServerConfig) -> float | None:
    # A pressure policy cannot match before pressure appears, which `interval` bounds; its
    # (often short) thresholds must not make a quiet server be polled every min_interval.
    # when_blocking too: a lock wait that begins just after a poll is seen before it is due.
    thresholds = [
        t.total_seconds()
        for p in settings.policies_for(server)
        if not p.pressure
        for t in (*p.thresholds.values(), *filter(None, [p.when_blocking]))
    ]
    return min(thresholds, default=None)


def next_delay(
    report: SweepReport | None,
    *,
    interval: float,
    min_interval: float,
    smallest_threshold: float | None,
    failures: int = 0,
) -> float:
    """Seconds from the start of this poll to the next one, from the numbers of the rule."""
    if report is None or not report.ok:
        # The first retry after min_interval, then twice as long each time, up to interval.
        return min(interval, min_interval * 2.0 ** (min(max(failures, 1), 31) - 1))
    delay = interval
    if smallest_threshold is not None:
        delay = min(delay, smallest_threshold)
    if report.eligible_in is not None:
        delay = min(delay, report.eligible_in + _PAST_THRESHOLD)
    return max(delay, min_interval)
