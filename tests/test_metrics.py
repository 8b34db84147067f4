"""What one cycle's report adds to the metrics (reaper/observe/metrics.py), with no server: the
report is anything with the fields of `CycleReport` (the sweep's report has them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from reaper.observe.metrics import Metrics
from reaper.policy import Result, ServerFacts, Session

if TYPE_CHECKING:
    from reaper.observe.cycle import CycleReport

SERVER = "primary"


@dataclass(frozen=True)
class _Outcome:
    policy: str
    result: Result
    action: str = "terminate"
    decision: Any = None  # metrics read only the policy and the result


@dataclass(frozen=True)
class _Report:
    server: str
    dry_run: bool
    duration_ms: float
    outcomes: tuple[_Outcome, ...]
    facts: ServerFacts | None = None
    sessions: tuple[Session, ...] = ()
    pressure: tuple[tuple[str, bool], ...] = ()


def _report(*results: Result, dry_run: bool) -> CycleReport:
    outcomes = tuple(_Outcome(policy="idle", result=result) for result in results)
    return _Report(server=SERVER, dry_run=dry_run, duration_ms=1.0, outcomes=outcomes)


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"server": SERVER, **labels})


@pytest.mark.parametrize("dry_run", [False, True], ids=["live", "dry-run"])
def test_a_cycle_counts_reaps_and_failures_only_when_it_signalled(dry_run: bool) -> None:  # noqa: FBT001
    metrics = Metrics()
    report = _report(Result.TERMINATED, Result.DENIED, Result.GONE, dry_run=dry_run)

    metrics.record(report, policies=["idle"], finished_at=0.0)

    reaped = _sample(metrics, "pg_reaper_sessions_reaped_total", policy="idle", action="terminate")
    denied = _sample(metrics, "pg_reaper_reap_failures_total", policy="idle", reason="denied")
    gone = _sample(metrics, "pg_reaper_reap_failures_total", policy="idle", reason="gone")
    expected = None if dry_run else 1.0
    assert (reaped, denied, gone) == (expected, expected, expected)
    # A match counts as a candidate either way.
    assert _sample(metrics, "pg_reaper_candidates", policy="idle") == 3


def test_a_log_policy_counts_its_first_report_of_an_episode_only() -> None:
    metrics = Metrics()
    report = _report(Result.LOGGED, Result.ALREADY_LOGGED, dry_run=False)

    metrics.record(report, policies=["idle"], finished_at=0.0)

    assert _sample(metrics, "pg_reaper_sessions_reaped_total", policy="idle", action="log") == 1
    assert _sample(metrics, "pg_reaper_candidates", policy="idle") == 2


def test_a_series_dropped_when_leadership_went_comes_back_when_it_returns() -> None:
    """[ha]: a follower drops what only the leader measures; should it lead again, its cycles'
    series are exported again (the cached children of the dropped series are not reused)."""
    metrics = Metrics()
    report = _report(Result.TERMINATED, dry_run=False)
    metrics.record(report, policies=["idle"], finished_at=0.0)
    assert _sample(metrics, "pg_reaper_sessions", state="idle") == 0
    assert _sample(metrics, "pg_reaper_candidates", policy="idle") == 1

    metrics.forget_leader_gauges(SERVER, policies=["idle"])
    assert _sample(metrics, "pg_reaper_sessions", state="idle") is None
    assert _sample(metrics, "pg_reaper_candidates", policy="idle") is None

    metrics.record(report, policies=["idle"], finished_at=0.0)
    assert _sample(metrics, "pg_reaper_sessions", state="idle") == 0
    assert _sample(metrics, "pg_reaper_candidates", policy="idle") == 1


def test_gauges_follow_every_change_across_failed_polls_and_removals() -> None:
    """A gauge is set only when its value changes: a failed poll's 0 and the next cycle's 1 both
    show, and so does a value set again after its series was removed."""
    metrics = Metrics()
    facts = ServerFacts(
        own_pid=1,
        role="reaper",
        superuser=False,
        signal_backend=True,
        read_all_stats=True,
        server_version_num=180000,
        max_connections=100,
        client_sessions=7,
    )
    report = _Report(server=SERVER, dry_run=False, duration_ms=1.0, outcomes=(), facts=facts)
    for _ in range(2):
        metrics.record(report, policies=["idle"], finished_at=0.0)
        assert _sample(metrics, "pg_reaper_server_up") == 1
        assert _sample(metrics, "pg_reaper_connections_used") == 7
        metrics.record_poll_failure(SERVER)
        assert _sample(metrics, "pg_reaper_server_up") == 0
        assert _sample(metrics, "pg_reaper_connections_used") == 7  # a failed poll measures none
    metrics.forget_server(SERVER, policies=["idle"])
    assert _sample(metrics, "pg_reaper_server_up") is None
    metrics.record(report, policies=["idle"], finished_at=0.0)
    assert _sample(metrics, "pg_reaper_server_up") == 1
    assert _sample(metrics, "pg_reaper_connections_used") == 7
    assert _sample(metrics, "pg_reaper_max_connections") == 100
