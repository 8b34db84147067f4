"""The deadline rule: when a server is polled next; what the daemon remembers of its cancels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from reaper.daemon.scheduler import next_delay
from reaper.policy import Rule, Session
from reaper.settings import PolicyConfig
from reaper.sweep import Cancels, SweepReport


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


# --- the memory of cancels (cancel-then-terminate) ----------------------------------------------


def _session(pid: int, *, started: int = 0, changed: int = 0) -> Session:
    epoch = datetime(2026, 1, 1, tzinfo=UTC)
    return Session(
        pid=pid,
        backend_type="client backend",
        database="app",
        user="app",
        application="web",
        client_addr=None,
        state="active",
        backend_start=epoch + timedelta(seconds=started),
        state_change=epoch + timedelta(seconds=changed),
        idle_seconds=None,
        transaction_seconds=None,
        runtime_seconds=100.0,
        connection_seconds=100.0,
    )


def _policy(name: str = "runaway") -> Rule:
    policy = PolicyConfig(
        name=name,
        states=("active",),
        max_runtime=timedelta(seconds=60),
        action="cancel",
        escalate_after=timedelta(seconds=30),
    )
    return Rule.of(policy)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_cancelled_session_is_due_escalate_after_later_only_for_the_same_query() -> None:
    clock = _Clock()
    cancels = Cancels(clock=clock)
    session = _session(7)
    assert cancels.due_in(session, _policy()) is None
    cancels.remember(session, policy="runaway")
    clock.now += 10
    assert cancels.due_in(session, _policy()) == 20
    clock.now += 25
    assert cancels.due_in(session, _policy()) == -5
    # Another query of the same session, another backend on the same pid, another policy.
    assert cancels.due_in(_session(7, changed=50), _policy()) is None
    assert cancels.due_in(_session(7, started=1), _policy()) is None
    assert cancels.due_in(session, _policy("other")) is None
    cancels.forget(session)
    assert cancels.due_in(session, _policy()) is None


def test_the_memory_of_cancels_forgets_gone_backends_and_is_bounded() -> None:
    cancels = Cancels(capacity=3)
    for pid in range(1, 6):
        cancels.remember(_session(pid), policy="runaway")
    assert len(cancels) == 3
    assert cancels.due_in(_session(1), _policy()) is None  # the oldest went first
    assert cancels.due_in(_session(5), _policy()) is not None
    cancels.keep_only([_session(4), _session(9)])
    assert len(cancels) == 1
    assert cancels.due_in(_session(4), _policy()) is not None
