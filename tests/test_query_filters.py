"""`queries` / `exclude_queries` against real servers: a LISTEN consumer is spared while a plain
idle session is reaped, `queries` matches only the sessions whose last query matches, and the
text itself is shown nowhere unless `[log] include_query` is set.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pytest

from reaper.audit_event import AuditEvent
from reaper.cli import main
from reaper.policy import Decision, Result, Rule, Session
from reaper.sweep import Outcome, audit_fields, audit_record
from tests.servers import Sessions, TestServer, usable

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


def test_an_audit_record_holds_the_query_only_with_include_query() -> None:
    # Read for a query filter, the text is in the session; the audit (log line, table row and
    # --json) takes it only with include_query.
    session = Session(
        pid=7,
        backend_type="client backend",
        database="app",
        user="app",
        application="web",
        client_addr=None,
        state="idle",
        backend_start=None,
        state_change=None,
        idle_seconds=61.0,
        transaction_seconds=None,
        runtime_seconds=None,
        connection_seconds=None,
        query="SELECT 'card-4111'",
    )
    decision = Decision(session=session, policy=Rule(name="q", action="terminate"), reason="r")
    outcome = Outcome(decision=decision, result=Result.TERMINATED)
    hidden = audit_record(outcome, include_query=False)
    assert hidden.query is None
    assert "query" not in audit_fields(outcome, include_query=False)
    row = AuditEvent(event="session_reaped", server="s", dry_run=False, instance="i", record=hidden)
    assert row.row()["query"] is None
    assert audit_fields(outcome, include_query=True)["query"] == "SELECT 'card-4111'"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def decisions(out: str) -> dict[int, dict[str, Any]]:
    document = json.loads(out)
    return {d["pid"]: d for server in document["servers"] for d in server["decisions"]}


@pytest.mark.integration
def test_a_listen_consumer_is_spared_by_exclude_queries_while_a_plain_idle_one_is_reaped(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    listener = sessions.open(application="listener")
    listener.execute("LISTEN jobs")
    shouting = sessions.open(application="listener-2")
    shouting.execute("  listen jobs")  # SQL keywords in any case: (?i) in the regex
    plain = sessions.idle(application="plain")
    time.sleep(1.3)
    config = write_config(
        """
        [[policies]]
        name = "idle"
        max_idle = "1s"
        exclude_queries = ['(?i)^\\s*LISTEN\\b']
        """
    )

    code, out, _err = run(capsys, "once", "-c", str(config), "--json")

    assert code == 0
    decided = decisions(out)
    assert decided[plain.info.backend_pid]["result"] == "terminated"
    assert pg.wait_gone(plain.info.backend_pid)
    for spared in (listener, shouting):
        assert spared.info.backend_pid not in decided
        assert pg.state_of(spared.info.backend_pid) == "idle"
        assert usable(spared)
    # The listener still gets its notifications.
    pg.execute("NOTIFY jobs, 'still here'")
    assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["still here"]


@pytest.mark.integration
def test_queries_matches_only_sessions_whose_last_query_matches(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = sessions.open(application="reporting")
    report.execute("SELECT 'quarterly' AS report_kind")
    other = sessions.idle(application="other")  # SELECT 1
    in_tx = sessions.open(application="in-tx", autocommit=False)
    in_tx.execute("SELECT 'quarterly' AS report_kind")  # matches, but not in a listed state
    time.sleep(1.3)
    config = write_config(
        """
        [[policies]]
        name = "reports"
        states = ["idle"]
        max_idle = "1s"
        queries = ["report_kind$"]
        """
    )

    code, out, _err = run(capsys, "once", "-c", str(config), "--json")

    assert code == 0
    decided = decisions(out)
    assert decided[report.info.backend_pid]["result"] == "terminated"
    assert decided[report.info.backend_pid]["policy"] == "reports"
    assert pg.wait_gone(report.info.backend_pid)
    assert other.info.backend_pid not in decided
    assert in_tx.info.backend_pid not in decided
    assert usable(other)


SECRET_POLICY = """
[[policies]]
name = "secrets"
max_idle = "1s"
queries = ["card-[0-9]+"]
"""


@pytest.mark.integration
@pytest.mark.parametrize("command", ["once", "preview"])
def test_the_query_text_is_shown_nowhere_without_include_query(
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    secret = "card-4111111111111111"
    holder = sessions.open(application="payments")
    holder.execute(f"SELECT '{secret}'")
    time.sleep(1.3)
    config = write_config(SECRET_POLICY)

    code, out, err = run(capsys, command, "-c", str(config), "--json")
    assert code == 0
    decided = decisions(out)[holder.info.backend_pid]
    assert decided["policy"] == "secrets"  # matched on the text it read
    assert "query" not in decided
    assert secret not in out
    assert secret not in err
    code, out, err = run(capsys, command, "-c", str(config))  # the table
    assert secret not in out
    assert secret not in err


@pytest.mark.integration
def test_the_query_text_is_in_the_audit_event_and_json_with_include_query(
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = "card-4111111111111111"
    holder = sessions.open(application="payments")
    holder.execute(f"SELECT '{secret}'")
    time.sleep(1.3)
    config = write_config(SECRET_POLICY, log='format = "json"\ninclude_query = true')

    code, out, err = run(capsys, "once", "-c", str(config), "--json")

    assert code == 0
    assert decisions(out)[holder.info.backend_pid]["query"] == f"SELECT '{secret}'"
    (event,) = [json.loads(line) for line in err.splitlines() if '"session_reaped"' in line]
    assert event["query"] == f"SELECT '{secret}'"
