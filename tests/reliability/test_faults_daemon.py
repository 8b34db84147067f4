"""Faults under the daemon: one of two servers fails in four ways, and the daemon reports it once,
counts it, keeps reaping the other server on time, comes back by itself, and kills nothing by
mistake afterwards.

Each test runs `pg-reaper run` on two throwaway servers of its own, `healthy` and `faulted`:
(a) `faulted` is down when the daemon starts and is started later; (b) it is stopped with
`pg_ctl stop -m immediate` mid-run and started again; (c) its postmaster and backends are
SIGSTOPped, then SIGCONTed; (d) a DBA terminates the reaper's own session on it.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import TYPE_CHECKING, Any

import pytest

from reaper.demo.embedded import EmbeddedPostgres
from tests.reliability.support import (
    admin_execute,
    daemon_config,
    error_events,
    free_port,
    is_alive,
    running_daemon,
    wait_gone,
)
from tests.servers import Sessions, TestServer, usable
from tests.test_daemon import REAPER_APPLICATION, policy
from tests.test_faults import _freeze

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import psycopg

    from tests.reliability.support import RunningDaemon

pytestmark = [pytest.mark.integration, pytest.mark.serial]

HEALTHY, FAULTED = "healthy", "faulted"
MAX_IDLE = 2.0
# From a session's last statement to its backend gone: max_idle, a poll at most min_interval
# later, and room for a loaded machine.
ON_TIME = MAX_IDLE + 2.5
# statement_timeout 2s: a server that stops answering is given up on after 2 s + 2 s of grace.
REAPER_SETTINGS = 'statement_timeout = "2s"\nconnect_timeout = "2s"'


@pytest.fixture(scope="module")
def pair(pg_major: int) -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    with (
        EmbeddedPostgres(major=pg_major) as healthy,
        EmbeddedPostgres(major=pg_major) as faulted,
    ):
        yield healthy, faulted


@pytest.fixture
def servers(
    pair: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    """Both servers running; whatever a test did to `faulted` is undone after it."""
    healthy, faulted = pair
    for server in pair:
        _thaw(server)
        server.start()
    yield healthy, faulted
    _thaw(faulted)
    faulted.start()


def _thaw(server: EmbeddedPostgres) -> None:
    if server.pid is not None:
        with contextlib.suppress(OSError):
            _freeze(server, signal.SIGCONT)


@pytest.fixture
def clients() -> Iterator[dict[str, Sessions]]:
    """Client sessions per server (`Sessions` of tests/servers.py), closed after the test."""
    opened: dict[str, Sessions] = {}
    yield opened
    for sessions in opened.values():
        sessions.close()
        sessions.server.close()


def sessions_on(clients: dict[str, Sessions], server: EmbeddedPostgres, *, key: str) -> Sessions:
    if key not in clients:
        test_server = TestServer(
            major=server.major, admin_conninfo=server.dsn(), has_socket=True, embedded=server
        )
        clients[key] = Sessions(test_server)
    return clients[key]


def start(
    tmp_path: Path, healthy: EmbeddedPostgres, faulted: EmbeddedPostgres
) -> contextlib.AbstractContextManager[RunningDaemon]:
    port = free_port()
    config = daemon_config(
        tmp_path / "config.toml",
        servers={HEALTHY: healthy.dsn(), FAULTED: faulted.dsn()},
        # f-fresh-* sessions are in no danger for a minute; f-idle-* ones are after 2 s idle.
        policies=policy("fresh", "^f-fresh", max_idle="1m")
        + policy("idle", "^f-idle", max_idle="2s"),
        port=port,
        interval="5s",
        min_interval="1s",
        reaper=REAPER_SETTINGS,
    )
    return running_daemon(config, port=port)


def reaped_on_time(
    sessions: Sessions, server: EmbeddedPostgres, *, application: str
) -> psycopg.Connection[Any]:
    """An idle session: it is gone max_idle after its last statement, give or take a poll."""
    conn = sessions.idle(application=application)
    last_activity = time.monotonic()
    gone = wait_gone(server, conn.info.backend_pid, timeout=ON_TIME + 5)
    took = time.monotonic() - last_activity
    assert gone is not None, f"{application} still there {ON_TIME + 5:.1f} s after going idle"
    assert MAX_IDLE < took < ON_TIME, f"{application} reaped {took:.2f} s after going idle"
    return conn


def outage_reported(daemon: RunningDaemon) -> None:
    """While `faulted` is out: it is down in the metrics, its failures counted."""
    daemon.wait_value("pg_reaper_server_up", lambda v: v == 0, server=FAULTED, timeout=15)
    errors = daemon.value("pg_reaper_poll_errors_total", server=FAULTED)
    assert errors is not None
    assert errors >= 1
    assert daemon.value("pg_reaper_server_up", server=HEALTHY) == 1


def recovered_without_mistakes(
    daemon: RunningDaemon,
    clients: dict[str, Sessions],
    faulted: EmbeddedPostgres,
    *,
    timeout: float = 20,
) -> None:
    """`faulted` answers again: reaped again, and nothing killed that should not be."""
    daemon.wait_event("server_recovered", server=FAULTED, timeout=timeout)
    assert daemon.value("pg_reaper_server_up", server=FAULTED) == 1
    after = sessions_on(clients, faulted, key="after")
    active = after.active(application="f-idle-active", seconds=60)
    fresh = after.idle(application="f-fresh")
    reaped_on_time(after, faulted, application="f-idle-after")
    polls = len(daemon.events("poll_completed", server=FAULTED))
    daemon.wait_until(
        lambda: len(daemon.events("poll_completed", server=FAULTED)) >= polls + 2,
        timeout=10,
        what="two more polls of the recovered server",
    )
    assert is_alive(faulted, active.info.backend_pid), "an active session was killed"
    assert admin_execute(
        faulted, "SELECT state FROM pg_stat_activity WHERE pid = %s", [active.info.backend_pid]
    ) == [("active",)]
    assert is_alive(faulted, fresh.info.backend_pid), "a fresh idle session was killed"
    assert usable(fresh)


def told_once(daemon: RunningDaemon, *, error_contains: str = "") -> dict[str, Any]:
    """One log line per change of state, and metrics that agree with them: the outage's first
    failure at error level, its retries (counted) at debug level, one line when it is over."""
    failed = daemon.events("poll_failed", server=FAULTED)
    assert len(failed) == 1, failed  # the retries are at debug level, not shown at info
    assert failed[0]["level"] == "error"
    assert error_contains in failed[0]["error"], failed[0]
    recovered = daemon.events("server_recovered", server=FAULTED)
    assert len(recovered) == 1, recovered
    assert recovered[0]["failures"] >= 1
    assert daemon.value("pg_reaper_poll_errors_total", server=FAULTED) == recovered[0]["failures"]
    nothing_wrong_on_the_other(daemon)
    return failed[0]


def nothing_wrong_on_the_other(daemon: RunningDaemon) -> None:
    assert daemon.events("poll_failed", server=HEALTHY) == []
    assert daemon.events("server_recovered", server=HEALTHY) == []
    assert daemon.value("pg_reaper_poll_errors_total", server=HEALTHY) == 0
    assert daemon.value("pg_reaper_server_up", server=HEALTHY) == 1
    assert daemon.value("pg_reaper_server_up", server=FAULTED) == 1
    for event in daemon.events("session_reaped"):
        assert event["policy"] == "idle", event
        assert event["application"].startswith("f-idle-"), event
        assert event["application"] != "f-idle-active", event
        assert event["state"] == "idle", event
        assert event["idle_seconds"] >= MAX_IDLE, event  # rounded to the millisecond
    assert daemon.events("session_reap_failed") == []
    assert error_events(daemon, allowed={"poll_failed": 1}) == []
    assert daemon.other_lines == [], daemon.other_lines[:20]


# --- (a) down at start ----------------------------------------------------------------------


def test_a_server_down_when_the_daemon_starts_is_reported_down_then_reaped_once_started(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
    clients: dict[str, Sessions],
    tmp_path: Path,
) -> None:
    healthy, faulted = servers
    faulted.stop()
    with start(tmp_path, healthy, faulted) as daemon:
        daemon.wait_ready()  # tried once, failed: ready all the same
        outage_reported(daemon)
        on_healthy = sessions_on(clients, healthy, key="healthy")
        reaped_on_time(on_healthy, healthy, application="f-idle-healthy-1")

        faulted.start()

        recovered_without_mistakes(daemon, clients, faulted)
        reaped_on_time(on_healthy, healthy, application="f-idle-healthy-2")
        told_once(daemon, error_contains="cannot connect")


# --- (b) immediate shutdown mid-run ---------------------------------------------------------


def test_an_immediate_shutdown_mid_run_is_survived_and_the_server_reaped_after_its_restart(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
    clients: dict[str, Sessions],
    tmp_path: Path,
) -> None:
    healthy, faulted = servers
    with start(tmp_path, healthy, faulted) as daemon:
        daemon.wait_ready()
        daemon.wait_value("pg_reaper_server_up", lambda v: v == 1, server=FAULTED)
        before = sessions_on(clients, faulted, key="before")
        reaped_on_time(before, faulted, application="f-idle-before")

        faulted.stop(mode="immediate")

        outage_reported(daemon)
        on_healthy = sessions_on(clients, healthy, key="healthy")
        reaped_on_time(on_healthy, healthy, application="f-idle-healthy")
        faulted.start()
        recovered_without_mistakes(daemon, clients, faulted)
        told_once(daemon)


# --- (c) a server that stops answering --------------------------------------------------------


def test_a_frozen_server_is_given_up_on_after_statement_timeout_and_recovers_when_thawed(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
    clients: dict[str, Sessions],
    tmp_path: Path,
) -> None:
    healthy, faulted = servers
    with start(tmp_path, healthy, faulted) as daemon:
        daemon.wait_ready()
        daemon.wait_value("pg_reaper_server_up", lambda v: v == 1, server=FAULTED)
        # Idle when the server freezes, eligible while it is frozen: reaped once it thaws.
        before = sessions_on(clients, faulted, key="before")
        stale = before.idle(application="f-idle-stale")

        _freeze(faulted, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            outage_reported(daemon)
            given_up_after = time.monotonic() - frozen_at
            on_healthy = sessions_on(clients, healthy, key="healthy")
            reaped_on_time(on_healthy, healthy, application="f-idle-healthy")
            # Frozen long enough for a reconnection to time out as well (a second, different
            # error of the same outage): the first poll gives up by 2 + 4 s, its retry by 9 s.
            time.sleep(max(0.0, 10 - (time.monotonic() - frozen_at)))
        finally:
            _freeze(faulted, signal.SIGCONT)
        thawed_at = time.monotonic()

        assert wait_gone(faulted, stale.info.backend_pid, timeout=15) is not None
        reaped = daemon.wait_event("session_reaped", pid=stale.info.backend_pid, timeout=5)
        assert reaped["idle_seconds"] > 10
        recovered_without_mistakes(daemon, clients, faulted)
        told_once(daemon, error_contains="no answer within 4s")
        assert daemon.events("server_recovered")[0]["failures"] >= 2, "only one failed poll"
        assert given_up_after < 4 + MAX_IDLE + 2, f"given up on after {given_up_after:.1f} s"
        assert time.monotonic() - thawed_at < 30


# --- (d) the reaper's own session terminated by a DBA -----------------------------------------


def test_the_reapers_own_session_terminated_by_a_dba_is_reconnected_and_reaping_goes_on(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
    clients: dict[str, Sessions],
    tmp_path: Path,
) -> None:
    healthy, faulted = servers
    with start(tmp_path, healthy, faulted) as daemon:
        daemon.wait_ready()
        daemon.wait_value("pg_reaper_server_up", lambda v: v == 1, server=FAULTED)
        own = reaper_pids(faulted)
        assert len(own) == 1, own

        terminated = admin_execute(
            faulted,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [REAPER_APPLICATION],
        )
        assert terminated == [(True,)]

        after = sessions_on(clients, faulted, key="after")
        reaped_on_time(after, faulted, application="f-idle-after-dba")
        new = reaper_pids(faulted)
        assert len(new) == 1, new
        assert new != own
        on_healthy = sessions_on(clients, healthy, key="healthy")
        reaped_on_time(on_healthy, healthy, application="f-idle-healthy")
        active = after.active(application="f-idle-active", seconds=60)
        fresh = after.idle(application="f-fresh")
        polls = len(daemon.events("poll_completed", server=FAULTED))
        daemon.wait_until(
            lambda: len(daemon.events("poll_completed", server=FAULTED)) >= polls + 2,
            timeout=10,
            what="two more polls",
        )
        assert is_alive(faulted, active.info.backend_pid)
        assert is_alive(faulted, fresh.info.backend_pid)
        # At most one failed poll (the one that finds the session gone; the next retry, after
        # min_interval, reconnects), told once.
        failed = daemon.events("poll_failed", server=FAULTED)
        recovered = daemon.events("server_recovered", server=FAULTED)
        errors = daemon.value("pg_reaper_poll_errors_total", server=FAULTED)
        assert len(failed) == len(recovered) == errors, (failed, recovered, errors)
        assert len(failed) <= 1
        if failed:
            assert failed[0]["level"] == "error"
            assert recovered[0]["failures"] == 1
        nothing_wrong_on_the_other(daemon)


def reaper_pids(server: EmbeddedPostgres) -> set[int]:
    rows = admin_execute(
        server,
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
        [REAPER_APPLICATION],
    )
    return {row[0] for row in rows}


# --- a failure faster than the scheduler --------------------------------------------------------

UNREACHABLE_SERVERS = 30


def test_every_server_that_refuses_connections_is_retried_after_min_interval(
    tmp_path: Path,
) -> None:
    servers = {
        f"refusing-{i}": f"host=127.0.0.1 port={free_port()} user=nobody dbname=postgres"
        for i in range(UNREACHABLE_SERVERS)
    }
    config = daemon_config(
        tmp_path / "config.toml",
        servers=servers,
        policies=policy("idle", "^nothing$", max_idle="1h"),
        port=None,
        interval="60s",
        min_interval="1s",
    )
    config.write_text(
        config.read_text().replace('format = "json"', 'format = "json"\nlevel = "debug"')
    )
    with running_daemon(config, port=None) as daemon:
        time.sleep(4.5)  # the first try, then a retry after 1 s, another 2 s later
        tries = {name: len(daemon.events("poll_failed", server=name)) for name in servers}
    once = sorted(name for name, count in tries.items() if count < 2)
    assert once == [], f"tried once in 4.5 s, next try due in 60 s: {once}"
