"""What one cycle's report adds to the metrics (reaper/observe/metrics.py), with no server."""

from __future__ import annotations

import pytest

from reaper.observe.metrics import Metrics
from reaper.policy import Decision, Result, Rule
from reaper.sweep import Outcome, SweepReport
from tests.test_policy import make_policy, make_session

SERVER = "primary"


def _report(*results: Result, dry_run: bool, action: str = "terminate") -> SweepReport:
    policy = Rule.of(make_policy("idle", max_idle="1s", action=action))
    outcomes = tuple(
        Outcome(
            decision=Decision(session=make_session(pid=1000 + i), policy=policy, reason="idle"),
            result=result,
        )
        for i, result in enumerate(results)
    )
    return SweepReport(server=SERVER, dry_run=dry_run, duration_ms=1.0, outcomes=outcomes)


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
    report = _report(Result.LOGGED, Result.ALREADY_LOGGED, dry_run=False, action="log")

    metrics.record(report, policies=["idle"], finished_at=0.0)

    assert _sample(metrics, "pg_reaper_sessions_reaped_total", policy="idle", action="log") == 1
    assert _sample(metrics, "pg_reaper_candidates", policy="idle") == 2
