"""Race safety of the signalling statement, on real servers.

Between the poll and the signal a session may run a statement, start a long one, exit, or exit
and leave its pid to a new backend. The signal re-reads each victim and leaves it alone then.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from reaper.policy import Result, Session
from tests.servers import Sessions, TestServer, usable

if TYPE_CHECKING:
    from reaper.pg.activity import ServerConnection

pytestmark = pytest.mark.integration


def polled(reaper: ServerConnection, pid: int) -> Session:
    return next(s for s in reaper.poll().sessions if s.pid == pid)


def test_session_that_ran_a_statement_since_the_poll_is_not_killed(
    pg: TestServer, sessions: Sessions, reaper: ServerConnection
) -> None:
    victim = sessions.idle(application="app", user="appuser", password="appuser", tcp=True)
    seen = polled(reaper, victim.info.backend_pid)
    time.sleep(0.01)  # state_change has microsecond resolution: make the next one differ
    victim.execute("SELECT 1")  # active, then idle again: a new state_change

    results = reaper.signal([seen], action="terminate")

    assert results[seen.pid] == (Result.CHANGED, None)
    assert usable(victim)
    assert pg.is_alive(seen.pid)


def test_session_that_is_active_at_signal_time_is_not_killed(
    pg: TestServer, sessions: Sessions, reaper: ServerConnection
) -> None:
    victim = sessions.open(application="app", user="appuser", password="appuser", tcp=True)
    seen = polled(reaper, victim.info.backend_pid)
    assert seen.state == "idle"
    sessions.active(seconds=30, application="busy")  # another session, for contrast
    # The victim itself starts a long statement after the poll.
    active_victim = sessions.active(
        seconds=30, application="app2", user="appuser", password="appuser", tcp=True
    )
    seen_active_victim = dataclasses.replace(
        polled(reaper, active_victim.info.backend_pid), state="idle"
    )

    results = reaper.signal([seen, seen_active_victim], action="terminate")

    assert results[seen.pid][0] is Result.TERMINATED  # the untouched one is still reaped
    assert results[seen_active_victim.pid] == (Result.CHANGED, None)
    assert pg.state_of(active_victim.info.backend_pid) == "active"
    assert pg.wait_gone(seen.pid)


def test_pid_reused_by_a_new_backend_is_not_killed(
    sessions: Sessions, reaper: ServerConnection
) -> None:
    # The pid now belongs to a backend that started after the one the poll saw: same pid,
    # same state, even the same state_change, but another backend_start.
    current = sessions.idle(application="app", user="appuser", password="appuser", tcp=True)
    now_seen = polled(reaper, current.info.backend_pid)
    assert now_seen.backend_start is not None
    earlier_backend = dataclasses.replace(
        now_seen, backend_start=now_seen.backend_start - timedelta(minutes=5)
    )

    results = reaper.signal([earlier_backend], action="terminate")

    assert results[now_seen.pid] == (Result.CHANGED, None)
    assert usable(current)


def test_session_gone_since_the_poll_is_reported_gone(
    pg: TestServer, sessions: Sessions, reaper: ServerConnection
) -> None:
    leaving = sessions.idle(application="app", user="appuser", password="appuser", tcp=True)
    seen = polled(reaper, leaving.info.backend_pid)
    leaving.close()
    assert pg.wait_gone(seen.pid)

    assert reaper.signal([seen], action="terminate") == {seen.pid: (Result.GONE, None)}


def test_a_permission_error_in_the_batch_stays_with_its_victim(
    pg: TestServer, sessions: Sessions, reaper: ServerConnection
) -> None:
    # A superuser's session handed to the signal statement (as when a role became superuser
    # after the poll): pg_terminate_backend would raise 42501 and abort the whole statement.
    ordinary = [
        sessions.idle(application=f"app{i}", user="appuser", password="appuser", tcp=True)
        for i in range(3)
    ]
    superuser_session = sessions.idle(application="dba")
    victims = [polled(reaper, c.info.backend_pid) for c in ordinary]
    victims.insert(1, polled(reaper, superuser_session.info.backend_pid))

    results = reaper.signal(victims, action="terminate")

    assert results[superuser_session.info.backend_pid][0] is Result.DENIED
    assert "superuser" in (results[superuser_session.info.backend_pid][1] or "").lower()
    for conn in ordinary:
        assert results[conn.info.backend_pid][0] is Result.TERMINATED
        assert pg.wait_gone(conn.info.backend_pid)
    assert usable(superuser_session)


def test_many_victims_go_in_one_statement_each_with_its_own_result(
    pg: TestServer, sessions: Sessions, reaper: ServerConnection
) -> None:
    conns = [
        sessions.idle(application=f"bulk{i}", user="appuser", password="appuser", tcp=True)
        for i in range(20)
    ]
    victims = [polled(reaper, c.info.backend_pid) for c in conns]
    conns[5].execute("SELECT 1")  # changed
    conns[7].close()  # gone
    assert pg.wait_gone(victims[7].pid)

    results = reaper.signal(victims, action="terminate")

    assert results[victims[5].pid] == (Result.CHANGED, None)
    assert results[victims[7].pid] == (Result.GONE, None)
    terminated = [v.pid for v in victims if results[v.pid][0] is Result.TERMINATED]
    assert len(terminated) == 18
    for pid in terminated:
        assert pg.wait_gone(pid)
    assert usable(conns[5])


def test_a_victim_not_yet_past_its_due_time_is_not_due_and_left_alone(
    pg: TestServer, sessions: Sessions, reaper: ServerConnection
) -> None:
    # Armed signals pass the server time at which each victim crosses its threshold; the
    # statement compares it with the server's own clock, victim by victim.
    early = sessions.idle(application="early", user="appuser", password="appuser", tcp=True)
    due = sessions.idle(application="due", user="appuser", password="appuser", tcp=True)
    (now,) = pg.execute("SELECT clock_timestamp()")[0]
    seen_early = polled(reaper, early.info.backend_pid)
    seen_due = polled(reaper, due.info.backend_pid)

    results = reaper.signal(
        [seen_early, seen_due],
        action="terminate",
        due={seen_early.pid: now + timedelta(hours=1), seen_due.pid: now - timedelta(seconds=1)},
    )

    assert results[seen_early.pid][0] is Result.NOT_DUE
    assert results[seen_due.pid] == (Result.TERMINATED, None)
    assert pg.state_of(seen_early.pid) == "idle"  # in pg_stat_activity, untouched
    assert usable(early)
    assert pg.wait_gone(seen_due.pid)
