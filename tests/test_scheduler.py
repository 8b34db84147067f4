"""The deadline rule (reaper/daemon/cadence.py): when a server is polled next. What the daemon
remembers of its cancels is pinned in test_sweep.py."""

from __future__ import annotations

import pytest

from reaper.daemon.cadence import next_delay, poll_bound
from reaper.daemon.jobs import first_runs, spread
from reaper.settings import Settings
from reaper.sweep import SweepReport


def report(eligible_in: float | None, *, error: str | None = None) -> SweepReport:
    return SweepReport(
        server="s", dry_run=False, duration_ms=1.0, eligible_in=eligible_in, error=error
    )


def test_quiet_server_is_polled_every_interval() -> None:
    assert next_delay(report(None), interval=30, min_interval=1, smallest_threshold=900) == 30


def test_next_poll_comes_just_after_the_next_session_crosses_its_threshold() -> None:
    delay = next_delay(report(12.0), interval=30, min_interval=1, smallest_threshold=900)
    assert 12.0 < delay < 12.2


def test_never_sooner_than_min_interval() -> None:
    assert next_delay(report(0.2), interval=30, min_interval=1, smallest_threshold=900) == 1
    assert next_delay(report(0.0), interval=30, min_interval=2, smallest_threshold=900) == 2


def test_never_later_than_the_smallest_threshold() -> None:
    # A session that turns idle right after this poll must be seen before it is eligible.
    assert next_delay(report(None), interval=30, min_interval=1, smallest_threshold=5) == 5
    assert next_delay(report(20.0), interval=30, min_interval=1, smallest_threshold=5) == 5


@pytest.mark.parametrize(
    ("failures", "expected"), [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 30), (60, 30)]
)
def test_lost_server_is_retried_with_backoff_up_to_interval(failures: int, expected: int) -> None:
    failed = report(None, error="connection refused")
    delay = next_delay(failed, interval=30, min_interval=1, smallest_threshold=5, failures=failures)
    assert delay == expected


def _fleet(count: int, *, interval: str, **policy: str) -> Settings:
    return Settings(
        servers=[{"name": f"s{i}", "dsn": f"host=h{i}"} for i in range(count)],
        policies=[{"name": "idle", "max_idle": "1h", **policy}],
        reaper={"interval": interval},
    )


def test_first_runs_come_in_groups_of_ten_spread_within_the_shortest_interval() -> None:
    offsets = spread(_fleet(25, interval="10s"))
    assert [offsets[f"s{i}"] for i in (0, 9, 10, 19, 20, 24)] == pytest.approx(
        [0.0, 0.0, 0.1, 0.1, 0.2, 0.2]
    )
    crowded = spread(_fleet(1000, interval="1s"))
    assert len(set(crowded.values())) == 100  # a hundred groups
    assert max(crowded.values()) < 1.0


def test_the_servers_of_a_group_run_first_at_the_very_same_moment() -> None:
    settings = _fleet(25, interval="10s")
    offsets = spread(settings)
    first = first_runs(settings)
    # One reading of the clock: due microseconds apart, a group would take wake-ups of its own.
    groups = [{first[f"s{i}"] for i in range(start, min(start + 10, 25))} for start in (0, 10, 20)]
    assert [len(group) for group in groups] == [1, 1, 1]
    (one,), (two,), (three,) = groups
    assert [(two - one).total_seconds(), (three - one).total_seconds()] == pytest.approx(
        [offsets["s10"], offsets["s20"]], abs=1e-5
    )


def test_the_poll_bound_is_the_interval_or_the_smallest_threshold_if_shorter() -> None:
    quiet = _fleet(1, interval="10s")
    assert poll_bound(quiet, quiet.servers[0]) == 10.0
    short = _fleet(1, interval="10s", max_idle="3s")
    assert poll_bound(short, short.servers[0]) == 3.0
