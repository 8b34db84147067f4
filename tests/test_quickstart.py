"""The README's quick-start, followed literally: the role from deploy/sql, config.example.toml as
it ships, against a server with idle superuser and application sessions. It reaps nothing and
gives no alert a reason to fire until the operator switches dry run off."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from reaper.demo.programs import free_port
from tests.test_daemon import start_daemon  # noqa: F401 - a fixture

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.servers import Sessions, TestServer
    from tests.test_daemon import RunningDaemon

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


def _as_shipped(pg: TestServer, tmp_path: Path, port: int) -> Path:
    """config.example.toml with only what ties it to this machine changed: the server's DSN,
    the metrics port, JSON logs, and max_idle of the idle policy (1s, not 15m)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    for old, new in (
        (
            '"host=/var/run/postgresql dbname=postgres user=pg-reaper"',
            f'"{pg.dsn(user="pg-reaper")}"',
        ),
        ('listen = "127.0.0.1:9188"', f'listen = "127.0.0.1:{port}"'),
        ('format = "auto"', 'format = "json"'),
        ('max_idle = "15m"', 'max_idle = "1s"'),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _total(daemon: RunningDaemon, family: str) -> float:
    """The sum of every series of a counter family on the daemon's /metrics."""
    metric = daemon.families()[family]  # every counter is there from the first cycle on
    return sum(s.value for s in metric.samples if s.name.endswith("_total"))


def test_the_quick_start_reaps_nothing_and_fails_nothing_until_dry_run_is_switched_off(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute((ROOT / "deploy" / "sql" / "pg_reaper_role.sql").read_text().encode())
    superuser = sessions.idle(application="quickstart-admin")
    application = sessions.idle(application="quickstart-app", user="appuser", password="appuser")
    time.sleep(1.5)
    port = free_port()

    daemon = start_daemon(_as_shipped(pg, tmp_path, port), port=port)

    daemon.wait_ready()
    pid = application.info.backend_pid
    event = daemon.wait_event("session_reaped", pid=pid)
    assert (event["result"], event["dry_run"]) == ("dry_run", True)
    polls = len(daemon.events("poll_completed"))
    daemon.wait_until(
        lambda: len(daemon.events("poll_completed")) > polls, timeout=40, what="another poll"
    )
    # The superuser's session is protected, so it is not even a candidate to be denied.
    assert daemon.events(pid=superuser.info.backend_pid) == []
    assert daemon.events("session_reap_failed") == []
    # Nothing an alert looks at moves: no reap, no failure (PgReaperSignalFailures).
    assert _total(daemon, "pg_reaper_sessions_reaped") == 0
    assert _total(daemon, "pg_reaper_reap_failures") == 0
    assert daemon.value("pg_reaper_dry_run") == 1
    assert pg.is_alive(pid)
    assert pg.is_alive(superuser.info.backend_pid)
