"""`when_blocking` against real servers: the blocker of a lock wait is terminated and its waiter
proceeds; a session that blocks nobody, or only a short wait, is spared; and the signal re-checks
on the server that the victim still blocks.

Each blocker is a session idle in transaction after an UPDATE of one row; each waiter runs an
UPDATE of the same row in a thread and waits for the row lock.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import sql

from reaper.cli import main
from reaper.policy import Result, plan
from reaper.settings import PolicyConfig, ReaperSection
from tests.servers import Sessions, TestServer, usable, wait_for
from tests.test_daemon import RunningDaemon, daemon_config

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from reaper.pg.activity import ServerConnection

pytestmark = pytest.mark.integration

APPUSER: dict[str, Any] = {"user": "appuser", "password": "appuser", "tcp": True}


@dataclass
class Waiter:
    """A session waiting, in a thread, for a row lock another session holds."""

    conn: psycopg.Connection[Any]
    pid: int
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    def finished(self, timeout: float = 10.0) -> bool:
        """Whether its UPDATE completed (without error) within `timeout`."""
        self.thread.join(timeout)
        return not self.thread.is_alive() and not self.errors


class Rows:
    """A table of ten rows, and sessions that lock them: closed, then the table dropped, at the
    end of the test (a DROP would wait behind the sessions' locks)."""

    def __init__(self, pg: TestServer) -> None:
        self.pg = pg
        self.table = sql.Identifier(f"locks_{uuid.uuid4().hex[:10]}")
        self.sessions = Sessions(pg)
        self._next_row = 1
        for statement in (
            "CREATE TABLE {} (id int PRIMARY KEY, v int NOT NULL)",
            "INSERT INTO {} SELECT g, 0 FROM generate_series(1, 10) AS g",
            "GRANT SELECT, UPDATE ON {} TO appuser",
        ):
            pg.execute(sql.SQL(statement).format(self.table))

    def holder(self, application: str) -> tuple[psycopg.Connection[Any], int]:
        """A session idle in transaction holding the lock of a row of its own: (it, the row)."""
        row, self._next_row = self._next_row, self._next_row + 1
        conn = self.sessions.open(application=application, autocommit=False, **APPUSER)
        conn.execute(sql.SQL("UPDATE {} SET v = v + 1 WHERE id = %s").format(self.table), [row])
        self.pg.wait_state(conn.info.backend_pid, "idle in transaction")
        return conn, row

    def waiter(self, row: int, application: str) -> Waiter:
        """A session whose UPDATE of `row` waits for its lock (until the holder ends)."""
        conn = self.sessions.open(application=application, **APPUSER)
        waiter = Waiter(conn=conn, pid=conn.info.backend_pid, thread=threading.Thread())
        update = sql.SQL("UPDATE {} SET v = v + 10 WHERE id = %s").format(self.table)

        def run() -> None:
            try:
                conn.execute(update, [row])
            except psycopg.Error as exc:
                waiter.errors.append(exc)

        waiter.thread = threading.Thread(target=run, daemon=True)
        waiter.thread.start()
        wait_for(lambda: self.waiting(waiter.pid), what=f"pid {waiter.pid} to wait for a lock")
        return waiter

    def waiting(self, pid: int) -> bool:
        return bool(self.pg.execute("SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted", [pid]))

    def value(self, row: int) -> int:
        query = sql.SQL("SELECT v FROM {} WHERE id = %s").format(self.table)
        return int(self.pg.execute(query, [row])[0][0])

    def close(self) -> None:
        self.sessions.close()
        self.pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self.table))


@pytest.fixture
def rows(pg: TestServer) -> Iterator[Rows]:
    locks = Rows(pg)
    yield locks
    locks.close()


BLOCKERS = """
[[policies]]
name = "blockers"
states = ["idle in transaction"]
when_blocking = "1s"
"""


def run_once(capsys: pytest.CaptureFixture[str], config: Path) -> tuple[int, Any, str]:
    code = main(["once", "-c", str(config), "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def decisions(document: Any) -> dict[int, dict[str, Any]]:
    return {d["pid"]: d for server in document["servers"] for d in server["decisions"]}


def test_a_blocker_idle_in_transaction_is_terminated_and_its_waiter_proceeds(
    pg: TestServer,
    rows: Rows,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocker, row = rows.holder("blocker")
    first = rows.waiter(row, "waiter-1")
    second = rows.waiter(row, "waiter-2")  # queued behind the first: blocked by both
    bystander, _ = rows.holder("bystander")  # idle in transaction too, but nobody waits for it
    blocker_pid, bystander_pid = blocker.info.backend_pid, bystander.info.backend_pid
    time.sleep(1.3)

    code, document, err = run_once(capsys, write_config(BLOCKERS))

    assert code == 0
    decided = decisions(document)
    assert set(decided) == {blocker_pid}
    victim = decided[blocker_pid]
    assert victim["result"] == "terminated"
    assert victim["policy"] == "blockers"
    assert victim["state"] == "idle in transaction"
    # The first waiter waits for the blocker's transaction; the second, queued on the row
    # behind the first, is the first's to block (pg_blocking_pids), not necessarily the
    # blocker's.
    said = re.fullmatch(
        r"blocks pids? ([\d, ]+); longest lock wait (\d+(?:\.\d+)?)s >= when_blocking 1s",
        victim["reason"],
    )
    assert said is not None, victim["reason"]
    blocked = {int(pid) for pid in said.group(1).split(", ")}
    assert first.pid in blocked
    assert blocked <= {first.pid, second.pid}
    assert 1.0 <= float(said.group(2)) < 30
    # The audit event in the log says the same.
    (event,) = [json.loads(line) for line in err.splitlines() if '"session_reaped"' in line]
    assert (event["pid"], event["reason"]) == (blocker_pid, victim["reason"])
    # The server's view: the blocker is gone, both waiters' UPDATEs went through, the
    # blocker's was rolled back; the bystander is untouched.
    assert pg.wait_gone(blocker_pid)
    assert first.finished()
    assert second.finished()
    assert rows.value(row) == 20
    assert pg.state_of(bystander_pid) == "idle in transaction"
    assert usable(bystander)


def test_an_idle_in_transaction_session_that_blocks_nobody_is_spared(
    pg: TestServer,
    rows: Rows,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    lonely, _ = rows.holder("lonely")
    time.sleep(1.3)  # idle in transaction well past when_blocking, blocking no one
    config = write_config(BLOCKERS)

    code, document, _err = run_once(capsys, config)

    assert code == 0
    assert lonely.info.backend_pid not in decisions(document)
    assert pg.state_of(lonely.info.backend_pid) == "idle in transaction"
    # The same session is reaped once a lock wait behind it has lasted when_blocking.
    waiter = rows.waiter(1, "waiter")
    time.sleep(1.3)
    code, document, _err = run_once(capsys, config)
    assert decisions(document)[lonely.info.backend_pid]["result"] == "terminated"
    assert waiter.finished()


def test_a_lock_wait_shorter_than_when_blocking_does_not_make_its_blocker_match(
    pg: TestServer,
    rows: Rows,
    reaper: ServerConnection,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocker, row = rows.holder("blocker")
    waiter = rows.waiter(row, "waiter")
    config = write_config(BLOCKERS.replace('"1s"', '"30s"'))

    code, document, _err = run_once(capsys, config)

    assert code == 0
    assert blocker.info.backend_pid not in decisions(document)
    assert pg.state_of(blocker.info.backend_pid) == "idle in transaction"
    assert rows.waiting(waiter.pid)
    # It does block: the poll sees the waiter behind it, and for how long it has waited.
    seen = {s.pid: s for s in reaper.poll(include_blocking=True).sessions}
    assert seen[blocker.info.backend_pid].blocking == (waiter.pid,)
    wait = seen[blocker.info.backend_pid].lock_wait_seconds
    assert wait is not None
    assert 0 <= wait < 30
    assert seen[waiter.pid].blocking == ()
    # Without when_blocking the poll does not look.
    plain = {s.pid: s for s in reaper.poll().sessions}
    assert plain[blocker.info.backend_pid].blocking == ()
    assert plain[blocker.info.backend_pid].lock_wait_seconds is None


def _planned_victims(reaper: ServerConnection, policy: PolicyConfig, pids: set[int]) -> list[Any]:
    """Poll and plan, as a cycle does: the decisions to signal among `pids`."""
    snapshot = reaper.poll(include_blocking=True)
    decided = plan(
        [s for s in snapshot.sessions if s.pid in pids],
        [policy],
        reaper=ReaperSection(),
        facts=snapshot.facts,
    )
    return list(decided.signal)


def blockers(seconds: float) -> PolicyConfig:
    return PolicyConfig(
        name="blockers", states=("idle in transaction",), when_blocking=timedelta(seconds=seconds)
    )


SECOND = timedelta(seconds=1)
POLICY = blockers(1)


def test_a_blocker_that_commits_between_poll_and_signal_is_changed_not_killed(
    pg: TestServer, rows: Rows, reaper: ServerConnection
) -> None:
    blocker, row = rows.holder("blocker")
    waiter = rows.waiter(row, "waiter")
    time.sleep(1.3)
    (victim,) = _planned_victims(reaper, POLICY, {blocker.info.backend_pid})
    assert victim.session.blocking == (waiter.pid,)

    blocker.commit()  # between the poll and the signal: the waiter gets the lock
    assert waiter.finished()
    results = reaper.signal(
        [victim.session], action="terminate", blocking={victim.session.pid: SECOND}
    )

    assert results[victim.session.pid][0] is Result.CHANGED
    assert pg.is_alive(victim.session.pid)
    assert usable(blocker)


def test_a_blocker_whose_waiter_gave_up_is_changed_and_the_others_are_still_terminated(
    pg: TestServer, rows: Rows, reaper: ServerConnection
) -> None:
    # Its state and state_change stay the same: only the re-check of the lock wait in the
    # signalling statement can tell that it no longer blocks anyone.
    abandoned, row = rows.holder("abandoned")
    quitter = rows.waiter(row, "quitter")
    still, other_row = rows.holder("still-blocking")
    patient = rows.waiter(other_row, "patient")
    time.sleep(1.3)
    pids = {abandoned.info.backend_pid, still.info.backend_pid}
    victims = _planned_victims(reaper, POLICY, pids)
    assert {v.session.pid for v in victims} == pids

    pg.execute("SELECT pg_cancel_backend(%s)", [quitter.pid])  # it stops waiting
    quitter.thread.join(10)
    assert not quitter.thread.is_alive()
    assert isinstance(quitter.errors[0], psycopg.errors.QueryCanceled)
    results = reaper.signal(
        [v.session for v in victims],
        action="terminate",
        blocking={v.session.pid: SECOND for v in victims},
    )

    result, detail = results[abandoned.info.backend_pid]
    assert result is Result.CHANGED
    assert detail is not None
    assert "no longer blocks" in detail
    assert pg.state_of(abandoned.info.backend_pid) == "idle in transaction"
    assert usable(abandoned)
    assert results[still.info.backend_pid][0] is Result.TERMINATED
    assert pg.wait_gone(still.info.backend_pid)
    assert patient.finished()


def test_a_waiter_replaced_by_a_newer_one_is_not_a_wait_long_enough(
    pg: TestServer, rows: Rows, reaper: ServerConnection
) -> None:
    policy = blockers(3)
    blocker, row = rows.holder("blocker")
    old = rows.waiter(row, "old-waiter")
    time.sleep(3.3)
    (victim,) = _planned_victims(reaper, policy, {blocker.info.backend_pid})
    pg.execute("SELECT pg_cancel_backend(%s)", [old.pid])
    old.thread.join(10)
    rows.waiter(row, "new-waiter")  # waiting for a moment only

    results = reaper.signal(
        [victim.session], action="terminate", blocking={victim.session.pid: 3 * SECOND}
    )

    assert results[victim.session.pid][0] is Result.CHANGED
    assert pg.is_alive(victim.session.pid)
    # Without the threshold the same statement terminates it: the wait was what spared it.
    again = reaper.signal([victim.session], action="terminate")
    assert again[victim.session.pid][0] is Result.TERMINATED
    assert pg.wait_gone(victim.session.pid)


def test_the_daemon_terminates_a_blocker_about_when_its_waiter_has_waited_when_blocking(
    pg: TestServer, rows: Rows, tmp_path: Path
) -> None:
    # The interval is long: the daemon polls at least once per when_blocking, and again when
    # a waiter it has seen reaches it.
    config = daemon_config(
        tmp_path / "config.toml",
        servers={f"pg{pg.major}": pg.dsn()},
        policies=BLOCKERS.replace('"1s"', '"3s"'),
        port=None,
        interval="30s",
        min_interval="1s",
    )
    daemon = RunningDaemon(config, port=None)
    try:
        daemon.wait_event("poll_completed", timeout=20)
        time.sleep(0.7)  # not in step with the daemon's polls
        blocker, row = rows.holder("blocker")
        waiter = rows.waiter(row, "waiter")
        due = time.monotonic() + 3.0

        assert pg.wait_gone(blocker.info.backend_pid, timeout=15)
        late = time.monotonic() - due

        assert late < 2.5, f"terminated {late:.2f} s after its waiter had waited when_blocking"
        assert waiter.finished()
        event = daemon.wait_event("session_reaped", pid=blocker.info.backend_pid, timeout=5)
        assert event["result"] == "terminated"
        assert event["reason"].startswith(f"blocks pid {waiter.pid}; longest lock wait ")
    finally:
        daemon.stop()
