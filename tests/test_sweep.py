"""One cycle for one server (reaper/sweep/): its report, its outcomes as audit events, what the
daemon remembers between cycles, and one real cycle."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from reaper.audit_event import COLUMNS, AuditEvent
from reaper.observe.audit import AuditSink
from reaper.observe.log import get_logger
from reaper.policy import Decision, Result, Rule, Session
from reaper.settings import PolicyConfig, Settings
from reaper.sweep import (
    Cancels,
    LoggedEpisodes,
    Memory,
    Outcome,
    SweepReport,
    audit_event,
    audit_fields,
    audit_record,
    connect,
    sweep,
)
from tests.servers import usable
from tests.test_audit import UNREACHABLE, log_to
from tests.test_policy import EPOCH, make_policy, make_session

if TYPE_CHECKING:
    from tests.servers import Sessions, TestServer

AUDIT_CREATE_SQL = Path(__file__).parent.parent / "reaper" / "pg" / "sql" / "audit_create.sql"


def _outcome(
    result: Result = Result.TERMINATED,
    *,
    action: str = "terminate",
    escalated: bool = False,
    detail: str | None = None,
    session: Session | None = None,
) -> Outcome:
    if action == "cancel":
        policy = make_policy("idle", states=["active"], max_runtime="1s", action=action)
    else:
        policy = make_policy("idle", max_idle="1s", action=action)
    decision = Decision(
        session=session or make_session(), policy=Rule.of(policy), reason="idle for 10s"
    )
    return Outcome(decision=decision, result=result, detail=detail, escalated=escalated)


# --- the outcomes and the report ---------------------------------------------------------------


def test_an_outcome_says_its_policy_and_action_and_an_escalation_terminates() -> None:
    cancelled = _outcome(Result.CANCELLED, action="cancel")
    assert (cancelled.policy, cancelled.action) == ("idle", "cancel")
    escalated = _outcome(Result.TERMINATED, action="cancel", escalated=True)
    assert (escalated.policy, escalated.action) == ("idle", "terminate")
    spared = Outcome(
        decision=Decision(session=make_session(), policy=None, reason="spared"),
        result=Result.DRY_RUN,
    )
    assert (spared.policy, spared.action) == ("", "")


def test_a_report_counts_candidates_and_reaps_and_fails_only_on_a_failed_poll_or_signal() -> None:
    outcomes = (
        _outcome(Result.TERMINATED),
        _outcome(Result.CANCELLED, action="cancel"),
        _outcome(Result.DENIED),
        _outcome(Result.DEFERRED),
    )
    report = SweepReport(server="s", dry_run=False, duration_ms=1.0, outcomes=outcomes)
    assert (report.candidates, report.reaped) == (4, 2)
    assert report.ok
    assert report.failed, "a denied signal fails the cycle"
    # A dry run signals nothing, so a predicted `denied` fails nothing; a failed poll does.
    assert not replace(report, dry_run=True).failed
    assert replace(report, dry_run=True, error="refused").failed
    assert not replace(report, outcomes=outcomes[:2]).failed


# --- an outcome as an audit event --------------------------------------------------------------


def test_the_audit_fields_say_escalated_and_detail_only_when_set_and_the_query_when_asked() -> None:
    plain = audit_fields(_outcome(session=make_session(client_addr=None)), include_query=False)
    assert list(plain) == [
        "policy",
        "action",
        "result",
        "pid",
        "backend_start",
        "database",
        "user",
        "application",
        "client_addr",
        "state",
        "idle_seconds",
        "transaction_seconds",
        "connection_seconds",
        "reason",
    ]
    assert plain["client_addr"] == "local"
    assert plain["backend_start"] == EPOCH.isoformat()

    failed = _outcome(Result.ERROR, escalated=True, detail="lost")
    fields = audit_fields(failed, include_query=True)
    assert (fields["escalated"], fields["detail"], fields["query"]) == (True, "lost", None)


def test_an_audit_events_row_has_every_column_with_the_log_lines_values() -> None:
    outcome = _outcome(Result.TERMINATED, detail="why")
    record = audit_record(outcome, include_query=False)
    event = AuditEvent(
        event="session_reaped", server="s", dry_run=False, instance="pod-a", record=record
    )
    row = event.row()

    assert list(row) == [name for name, _type in COLUMNS]
    for key, value in record.fields(include_query=False).items():
        if key == "backend_start":
            assert row[key] == datetime.fromisoformat(value)
        else:
            assert row[key] == value
    assert (row["event"], row["server"], row["instance"], row["query"]) == (
        "session_reaped",
        "s",
        "pod-a",
        None,
    )
    assert "escalated" not in row, "in the log line only"


def test_the_audit_columns_are_those_audit_create_sql_makes() -> None:
    body = AUDIT_CREATE_SQL.read_text(encoding="utf-8").split("(", 1)[1].split(");", 1)[0]
    made = {}
    for line in body.splitlines():
        found = re.match(r'\s*"?(\w+)"?\s+([a-z ]+?)(?: NOT NULL)?,?$', line)
        if found and found[1] != "id":
            made[found[1]] = found[2]
    assert made == dict(COLUMNS)


def test_an_audit_event_is_logged_and_queued_unless_it_is_decided_again_next_cycle(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logged = log_to(capsys)
    settings = Settings(
        servers=[{"name": "s", "dsn": UNREACHABLE}],
        policies=[{"name": "idle", "max_idle": "1s"}],
        audit={"dsn": UNREACHABLE},
        ha={"instance_id": "pod-a"},
    )
    sink = AuditSink()
    writer = sink.start(settings)
    assert writer is not None
    try:
        log = get_logger(server="s")
        for result in (Result.TERMINATED, Result.GONE, Result.DEFERRED, Result.NOT_LEADER):
            audit_event(
                log, _outcome(result), server="s", dry_run=False, include_query=False, sink=sink
            )
        assert writer.queued == 2
    finally:
        sink.stop(timeout=0.5)
    events = [e for e in logged() if e.get("pid") == 1000]
    assert [(e["event"], e["level"], e["result"]) for e in events] == [
        ("session_reaped", "info", "terminated"),
        ("session_reap_failed", "info", "gone"),  # it left on its own: no failure
    ]
    assert {e["instance"] for e in events} == {"pod-a"}


# --- what the daemon remembers between cycles --------------------------------------------------


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


def test_a_log_policy_reports_each_episode_of_a_session_once() -> None:
    logged = LoggedEpisodes()
    assert logged.first(_session(7), policy="watch")
    assert not logged.first(_session(7), policy="watch"), "the same episode"
    assert logged.first(_session(7), policy="other"), "another policy"
    assert logged.first(_session(7, changed=5), policy="other"), "it left its state and came back"
    assert logged.first(_session(7, started=1), policy="other"), "another backend on the pid"


def test_the_memory_forgets_the_backends_gone_at_each_poll() -> None:
    memory = Memory()
    memory.cancels.remember(_session(1), policy="runaway")
    memory.logged.first(_session(2), policy="watch")
    memory.keep_only([_session(2)])
    assert (len(memory.cancels), len(memory.logged)) == (0, 1)


# --- one real cycle ----------------------------------------------------------------------------


@pytest.mark.integration
def test_a_daemon_cycle_logs_a_sessions_episode_once_and_signals_nothing(
    pg: TestServer, sessions: Sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    logged = log_to(capsys)
    watched = sessions.idle(application="sweep-watched")
    settings = Settings(
        servers=[{"name": "s", "dsn": pg.dsn()}],
        policies=[
            {
                "name": "watch",
                "action": "log",
                "max_idle": "1s",
                "applications": ["^sweep-watched$"],
            }
        ],
    )
    (server,) = settings.servers
    memory = Memory()
    time.sleep(1.3)
    with connect(server, settings) as conn:
        first = sweep(conn, server=server, settings=settings, memory=memory)
        second = sweep(conn, server=server, settings=settings, memory=memory)

    pid = watched.info.backend_pid
    assert [(o.decision.session.pid, o.result) for o in first.outcomes] == [(pid, Result.LOGGED)]
    assert [o.result for o in second.outcomes] == [Result.ALREADY_LOGGED]
    assert (first.reaped, second.reaped) == (0, 0)
    assert usable(watched)
    events = logged()
    assert [e["result"] for e in events if e["event"] == "session_reaped"] == ["logged"]
    assert len([e for e in events if e["event"] == "poll_completed"]) == 2
