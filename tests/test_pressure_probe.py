"""The pressure fast path (docs/pressure.md): the probe's counts against the server's own view,
the daemon polling at once when a probe sees a level crossed, no probe without pressure
policies, reloads that start and stop the probe, and the probe's configuration key.

Against a throwaway server of 20 connections (17 usable) that this module starts for itself, so
that its connection counts are known exactly.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from psycopg import sql

from reaper.daemon.ha import LeaderState
from reaper.daemon.probe import Probes
from reaper.demo.embedded import EmbeddedPostgres
from reaper.demo.programs import free_port
from reaper.observe.log import get_logger
from reaper.observe.metrics import Metrics
from reaper.pg.activity import PROBE_SQL, ServerConnection
from reaper.pg.connection import PostgresError
from reaper.policy import RoleConnections
from reaper.settings import ConfigError, ServerConfig, Settings, load_settings
from reaper.sweep import connect, sweep
from tests.servers import Sessions, TestServer, wait_for
from tests.test_daemon import RunningDaemon, daemon_config
from tests.test_pressure import client_backends, open_in_order, parallel_query

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

SERVER = "small"
# The probe's statement as pg_stat_activity shows it while it is the reaper's last one.
PROBE_HEAD = PROBE_SQL.splitlines()[0]
HOSTILE_ROLE = "x'); DROP ROLE keeper; --"


@pytest.fixture(scope="module")
def small(pg_major: int) -> Iterator[TestServer]:
    with EmbeddedPostgres(major=pg_major, settings={"max_connections": "20"}) as embedded:
        server = TestServer(
            major=pg_major, admin_conninfo=embedded.dsn(), has_socket=True, embedded=embedded
        )
        for statement in (
            "CREATE ROLE reaper_lp LOGIN IN ROLE pg_signal_backend, pg_read_all_stats",
            "CREATE ROLE reaper_blind LOGIN IN ROLE pg_signal_backend",
            "CREATE ROLE limited LOGIN CONNECTION LIMIT 5",
            "CREATE ROLE unlimited LOGIN",
            sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 3").format(sql.Identifier(HOSTILE_ROLE)),
        ):
            server.execute(statement)
        try:
            yield server
        finally:
            server.close()


@pytest.fixture
def crowd(small: TestServer) -> Iterator[Sessions]:
    wait_for(lambda: client_backends(small) == 1, what="the server to be empty but for us")
    opened = Sessions(small)
    yield opened
    opened.close()


def session_of(server: TestServer, user: str) -> ServerConnection:
    return ServerConnection(
        dsn=server.dsn(user=user),
        connect_timeout=timedelta(seconds=5),
        statement_timeout=timedelta(seconds=10),
    )


def role_counts(server: TestServer) -> dict[str, int]:
    """The server's own count of client backends per role whose connection limit applies."""
    rows = server.execute(
        "SELECT r.rolname, count(*) FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid"
        " WHERE a.backend_type = 'client backend' AND r.rolconnlimit >= 0 AND NOT r.rolsuper"
        " GROUP BY r.rolname"
    )
    return dict(rows)


# --- the probe's counts ------------------------------------------------------------------------


@pytest.mark.integration
def test_the_probe_counts_client_sessions_and_roles_as_the_server_does(
    pg_major: int, small: TestServer, crowd: Sessions
) -> None:
    parallel_query(crowd, pg_major)  # a superuser's: its parallel worker holds no client slot
    open_in_order(crowd, 3, user="limited")
    open_in_order(crowd, 2, user="unlimited")
    open_in_order(crowd, 2, user=HOSTILE_ROLE)
    open_in_order(crowd, 2, application="superuser")
    # Walsenders have slots of their own: a logical one (with a database) and a physical one.
    for replication in ("database", "true"):
        crowd.open(application="walsender", extra=f"replication={replication}")
    wait_for(
        lambda: bool(
            small.execute("SELECT 1 FROM pg_stat_activity WHERE backend_type = 'walsender'")
        ),
        what="walsenders",
    )
    with session_of(small, "reaper_lp") as reaper:
        reaper.connect()  # a probe never connects: the daemon's cycle has
        facts = reaper.probe(per_role=True)
        on_server, per_role = client_backends(small), role_counts(small)
        polled = reaper.poll().facts
        without_roles = reaper.probe(per_role=False)
    assert facts is not None
    assert without_roles is not None

    # The parallel query's leader, 3 + 2 + 2 + 2 sessions, the admin session, the reaper's own.
    assert facts.client_sessions == on_server == polled.client_sessions == 12
    assert {r.role: r.sessions for r in facts.roles} == per_role
    assert sorted(facts.roles, key=lambda r: r.role) == sorted(
        [
            RoleConnections(role="limited", limit=5, sessions=3),
            RoleConnections(role=HOSTILE_ROLE, limit=3, sessions=2),
        ],
        key=lambda r: r.role,
    )
    assert set(facts.roles) == set(polled.roles)
    assert (without_roles.client_sessions, without_roles.roles) == (12, ())
    assert facts.sees_every_backend
    assert small.execute("SELECT 1 FROM pg_roles WHERE rolname = 'keeper'") == []  # never made


@pytest.mark.integration
def test_without_pg_read_all_stats_the_probe_says_pressure_cannot_be_counted(
    small: TestServer, crowd: Sessions
) -> None:
    open_in_order(crowd, 3, user="limited")
    with session_of(small, "reaper_blind") as reaper:
        reaper.poll()
        facts = reaper.probe(per_role=True)
    assert facts is not None
    # Other roles' rows have no client_port for it: it counts only its own session, and says
    # that it cannot count (the daemon does not probe such a server; policies do not act).
    assert not facts.sees_every_backend
    assert facts.client_sessions == 1


@pytest.mark.integration
def test_a_probe_never_connects(small: TestServer) -> None:
    with session_of(small, "reaper_lp") as reaper:
        assert reaper.probe(per_role=False) is None
        assert not reaper.connected
        reaper.poll()
        small.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
            "'pg-reaper' AND usename = 'reaper_lp'"
        )
        wait_for(
            lambda: not small.execute("SELECT 1 FROM pg_stat_activity WHERE usename = 'reaper_lp'"),
            what="the reaper's backend to exit",
        )
        # The first statement on the lost session fails as every statement does; the next
        # probe does not reconnect (the cycle does).
        with pytest.raises(PostgresError):
            reaper.probe(per_role=False)
        assert reaper.probe(per_role=False) is None
        assert not small.execute("SELECT 1 FROM pg_stat_activity WHERE usename = 'reaper_lp'")


# --- the daemon --------------------------------------------------------------------------------

CROWDED = """
[[policies]]
name = "crowded"
max_idle = "1s"
applications = ["^filler$"]
when_connections_above = "80%"
"""
PLAIN = """
[[policies]]
name = "plain"
max_idle = "1h"
applications = ["^filler$"]
"""


def start(tmp_path: Path, small: TestServer, policies: str, *, reaper: str = "") -> RunningDaemon:
    port = free_port()
    config = daemon_config(
        tmp_path / "config.toml",
        servers={SERVER: small.admin_conninfo},
        policies=policies,
        port=port,
        interval="30s",
        reaper=reaper,
    )
    return RunningDaemon(config, port=port)


def reaper_statement(server: TestServer) -> str:
    """The first line of the last statement of the daemon's session, as the server shows it."""
    rows = server.execute(
        "SELECT query FROM pg_stat_activity WHERE application_name = 'pg-reaper'"
        " AND backend_type = 'client backend'"
    )
    assert len(rows) == 1, rows
    return str(rows[0][0]).lstrip().splitlines()[0]


@pytest.mark.integration
def test_a_burst_past_the_level_is_reaped_on_the_probes_word_not_at_the_interval(
    small: TestServer, crowd: Sessions, tmp_path: Path
) -> None:
    daemon = start(tmp_path, small, CROWDED)
    try:
        old = open_in_order(crowd, 6, application="filler")  # idle past max_idle: not crowded
        daemon.wait_ready()
        daemon.wait_event("poll_completed", server=SERVER)
        daemon.wait_value("pg_reaper_pressure_probes_total", bool, server=SERVER, outcome="calm")
        polls_before = len(daemon.events("poll_completed"))

        # 6 + 8 fillers, the admin session, the reaper's: 16 of 17 (level 13), 3 over.
        for _ in range(8):
            crowd.idle(application="filler")
        event = daemon.wait_event("pressure_probed", server=SERVER, timeout=20)
        wait_for(lambda: client_backends(small) <= 13, timeout=20, what="back under the level")

        assert event["policies"] == ["crowded"]
        assert event["connections"] > 13
        # The server's view changes before the daemon has logged what it did: wait for its cycle.
        daemon.wait_until(
            lambda: sum(p["reaped"] for p in daemon.events("poll_completed")[polls_before:]) >= 3,
            timeout=10,
            what="the cycle that reaped",
        )
        reaped = daemon.events("session_reaped", policy="crowded")
        assert sorted(e["pid"] for e in reaped) == sorted(old[:3]), "the three oldest"
        # Polls brought forward by the probe (one, or two should a probe have seen the burst
        # half-way): the interval (30s) had not come, and no deadline was due.
        polls = daemon.events("poll_completed")[polls_before:]
        assert sum(p["reaped"] for p in polls) == 3
        probed = daemon.value("pg_reaper_pressure_probes_total", server=SERVER, outcome="poll")
        assert probed is not None
        assert 1 <= probed == len([p for p in polls if p["reaped"]]) <= 2
        assert len(daemon.events("pressure_probed")) == 1  # once for the episode
        # SIGTERM stops the probe with the cycles, within the daemon's bound.
        daemon.send(signal.SIGTERM)
        assert daemon.wait_exit(timeout=10) == 0
    finally:
        daemon.stop()
    # 11 fillers and the admin session, once the reaper's own backend has exited.
    wait_for(lambda: client_backends(small) == 12, what="the reaper to leave")


@pytest.mark.integration
@pytest.mark.usefixtures("crowd")  # the server as the test found it
def test_no_probe_without_pressure_policies_and_a_reload_starts_and_stops_it(
    small: TestServer, tmp_path: Path
) -> None:
    fast = 'pressure_probe_interval = "100ms"'
    daemon = start(tmp_path, small, PLAIN, reaper=fast)
    config = tmp_path / "config.toml"
    try:
        daemon.wait_ready()
        daemon.wait_event("poll_completed", server=SERVER)
        time.sleep(0.5)  # five probe intervals
        assert reaper_statement(small) == "-- pg-reaper: poll"
        assert daemon.value("pg_reaper_pressure_probes_total", server=SERVER) is None

        config.write_text(config.read_text(encoding="utf-8") + CROWDED, encoding="utf-8")
        daemon.send(signal.SIGHUP)
        daemon.wait_value(
            "pg_reaper_pressure_probes_total",
            lambda v: (v or 0) >= 3,
            server=SERVER,
            outcome="calm",
        )
        assert reaper_statement(small) == PROBE_HEAD

        config.write_text(config.read_text(encoding="utf-8").replace(CROWDED, ""), encoding="utf-8")
        daemon.send(signal.SIGHUP)
        daemon.wait_event("config_reloaded", policies=["plain"])
        daemon.wait_value(
            "pg_reaper_pressure_probes_total", lambda v: v is None, server=SERVER, outcome="calm"
        )
        # A probe may have run just after the reload's poll, before its job was removed: one
        # more reload polls again, and no probe follows it.
        polls = len(daemon.events("poll_completed"))
        daemon.send(signal.SIGHUP)
        daemon.wait_until(
            lambda: len(daemon.events("poll_completed")) > polls, timeout=10, what="a poll"
        )
        time.sleep(0.5)
        assert reaper_statement(small) == "-- pg-reaper: poll"
        daemon.send(signal.SIGTERM)
        assert daemon.wait_exit(timeout=10) == 0
    finally:
        daemon.stop()


# --- the key -----------------------------------------------------------------------------------

CONFIG = """
[reaper]
interval = "30s"
{reaper}

[[servers]]
name = "primary"
dsn = "host=/tmp dbname=postgres"
{server}

[[policies]]
name = "crowded"
max_idle = "1s"
when_connections_above = "80%"
"""


def _load(tmp_path: Path, *, reaper: str = "", server: str = "") -> Any:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(reaper=reaper, server=server), encoding="utf-8")
    return load_settings(path)


def test_the_probe_runs_every_second_by_default_and_a_server_may_say_otherwise(
    tmp_path: Path,
) -> None:
    settings = _load(tmp_path)
    assert settings.probe_interval_for(settings.servers[0]).total_seconds() == 1.0
    settings = _load(tmp_path, server='pressure_probe_interval = "250ms"')
    assert settings.probe_interval_for(settings.servers[0]).total_seconds() == 0.25
    settings = _load(tmp_path, reaper='pressure_probe_interval = "0s"')  # off
    assert settings.probe_interval_for(settings.servers[0]).total_seconds() == 0.0
    assert settings.redacted()["reaper"]["pressure_probe_interval"] == "0s"


@pytest.mark.parametrize(
    ("reaper", "server", "problem"),
    [
        (
            'pressure_probe_interval = "1m"',
            "",
            (
                "reaper.pressure_probe_interval: 1m is longer than reaper.interval (30s): "
                "the polls would come first"
            ),
        ),
        (
            "",
            'interval = "5s"\npressure_probe_interval = "10s"',
            "servers[0].pressure_probe_interval: 10s is longer than servers[0].interval (5s)",
        ),
        (
            'pressure_probe_interval = "10s"',
            'interval = "5s"',
            "reaper.pressure_probe_interval: 10s is longer than servers[0].interval (5s)",
        ),
        (
            'pressure_probe_interval = "50ms"',
            "",
            (
                "reaper.pressure_probe_interval: 50ms is shorter than 100ms (use '0s' to turn the "
                "probe off)"
            ),
        ),
        (
            'pressure_probe_interval = "-1s"',
            "",
            ("reaper.pressure_probe_interval: invalid duration '-1s': must not be negative"),
        ),
        (
            'pressure_probe_interval = "soon"',
            "",
            "reaper.pressure_probe_interval: invalid duration 'soon'",
        ),
    ],
)
def test_a_bad_probe_interval_is_an_error_naming_the_key(
    tmp_path: Path, reaper: str, server: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, reaper=reaper, server=server)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


# --- when a probe runs: the daemon's rules, on a real session ----------------------------------


@dataclass(kw_only=True)
class _Target:
    """A server's worker as the probe sees it (reaper/daemon/worker.py `Worker`)."""

    name: str
    settings: Settings
    conn: ServerConnection | None
    leadership: LeaderState
    state: str = "up"
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def server(self) -> ServerConfig:
        return self.settings.servers[0]

    @property
    def config(self) -> ServerConfig | None:
        return next((s for s in self.settings.servers if s.name == self.name), None)


@pytest.fixture
def probing(
    small: TestServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Probes, _Target, Any, Metrics]]:
    """Probes on a paused scheduler whose server's cycle job is due in an hour, for `small` as
    the least-privilege reaper sees it, [ha] on (this session leads unless a test says not).
    The policy's pressure key: `when_connections_above = "80%"`, or the test's parameter."""
    path = tmp_path / "config.toml"
    text = CONFIG.format(reaper="[ha]\nenabled = true", server="").replace(
        "host=/tmp dbname=postgres", small.dsn(user="reaper_lp")
    )
    key = getattr(request, "param", None)
    if key is not None:
        text = text.replace('when_connections_above = "80%"', key)
    path.write_text(text, encoding="utf-8")
    settings = load_settings(path)
    metrics = Metrics()
    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.start(paused=True)
    later = datetime.now(UTC) + timedelta(hours=1)
    scheduler.add_job(print, "interval", hours=1, id="server:primary", next_run_time=later)
    log = get_logger()
    probes = Probes(scheduler, metrics=metrics, log=log, cycle_job=lambda n: f"server:{n}")
    leadership = LeaderState(server="primary", metrics=metrics, log=log)
    leadership.leader = True
    conn = connect(settings.servers[0], settings)
    target = _Target(name="primary", settings=settings, conn=conn, leadership=leadership)
    try:
        probes.sync(settings, [target])
        report = sweep(conn, server=target.server, settings=settings)  # the first cycle
        probes.polled("primary", report)
        yield probes, target, scheduler, metrics
    finally:
        scheduler.shutdown(wait=False)
        conn.close()


def _probed(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "pg_reaper_pressure_probes_total", {"server": "primary", "outcome": outcome}
    )
    return value or 0.0


def _due(scheduler: Any) -> datetime:
    due: datetime = scheduler.get_job("server:primary").next_run_time
    return due


@pytest.mark.integration
def test_a_probe_runs_only_on_the_leader_of_an_up_server_between_its_cycles(
    crowd: Sessions, probing: tuple[Probes, _Target, Any, Metrics]
) -> None:
    probes, target, scheduler, metrics = probing
    later = _due(scheduler)
    open_in_order(crowd, 13, application="filler")  # + admin + reaper: 15 of 17 (level 13)

    target.leadership.leader = False  # an [ha] follower could not act
    probes._probe(target)
    target.leadership.leader, target.state = True, "down"  # the cycle's retries own it
    probes._probe(target)
    target.state = "up"
    with target.lock:  # the cycle runs: skipped, not waited for
        probes._probe(target)
    assert sum(_probed(metrics, o) for o in ("calm", "pressure", "poll", "error")) == 0
    assert _due(scheduler) == later

    probes._probe(target)  # the leader, up, between cycles: the level is crossed
    assert _probed(metrics, "poll") == 1
    assert _due(scheduler) < later


@pytest.mark.integration
@pytest.mark.parametrize(
    "probing", ['when_role_connections_above = "50%"\nusers = ["limited"]'], indirect=True
)
def test_a_role_past_its_share_of_its_limit_brings_the_poll_forward(
    crowd: Sessions, probing: tuple[Probes, _Target, Any, Metrics]
) -> None:
    probes, target, scheduler, metrics = probing
    later = _due(scheduler)
    open_in_order(crowd, 2, user="limited")  # 2 of 5: not above 50% (2)
    open_in_order(crowd, 3, user=HOSTILE_ROLE)  # 3 of 3, but not in `users`
    probes._probe(target)
    assert (_probed(metrics, "calm"), _due(scheduler)) == (1, later)

    open_in_order(crowd, 1, user="limited")  # 3 of 5
    probes._probe(target)
    assert _probed(metrics, "poll") == 1
    assert _due(scheduler) < later


@pytest.mark.integration
def test_a_failed_probe_is_counted_and_is_not_a_failed_poll(
    small: TestServer, crowd: Sessions, probing: tuple[Probes, _Target, Any, Metrics]
) -> None:
    probes, target, scheduler, metrics = probing
    later = _due(scheduler)
    assert target.conn is not None
    small.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'reaper_lp'"
    )
    wait_for(
        lambda: not small.execute("SELECT 1 FROM pg_stat_activity WHERE usename = 'reaper_lp'"),
        what="the reaper's backend to exit",
    )
    open_in_order(crowd, 14, application="filler")  # pressure the probe cannot see
    probes._probe(target)  # the lost session: an error, counted
    probes._probe(target)  # not connected: no statement, no reconnection, nothing counted
    assert _probed(metrics, "error") == 1
    assert sum(_probed(metrics, o) for o in ("calm", "pressure", "poll")) == 0
    assert not target.conn.connected
    # The server's state is the cycle's to say: the probe neither marks it down nor polls.
    assert metrics.registry.get_sample_value("pg_reaper_server_up", {"server": "primary"}) is None
    assert metrics.registry.get_sample_value(
        "pg_reaper_poll_errors_total", {"server": "primary"}
    ) in (None, 0)
    assert _due(scheduler) == later
