"""`pg-reaper run` as a real process: what it reaps, when, and what it tells Prometheus, the audit
log and systemd about it; how it takes SIGHUP, SIGTERM, SIGINT and a server that goes away."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reaper.daemon.process import WATCH_INTERVAL
from reaper.demo.embedded import EmbeddedPostgres
from reaper.demo.programs import free_port
from tests.servers import ADMIN_APPLICATION, Sessions, TestServer, usable, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    import psycopg
    from prometheus_client.metrics_core import Metric

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parent.parent
REAPER_APPLICATION = "pg-reaper"

# Every metric of DESIGN.md's table: its type and exactly its labels.
DOCUMENTED_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "pg_reaper_sessions_reaped_total": ("counter", frozenset({"server", "policy", "action"})),
    "pg_reaper_reap_failures_total": ("counter", frozenset({"server", "policy", "reason"})),
    "pg_reaper_candidates": ("gauge", frozenset({"server", "policy"})),
    "pg_reaper_deferred_total": ("counter", frozenset({"server"})),
    "pg_reaper_sessions": ("gauge", frozenset({"server", "state"})),
    "pg_reaper_max_connections": ("gauge", frozenset({"server"})),
    "pg_reaper_poll_duration_seconds": ("histogram", frozenset({"server"})),
    "pg_reaper_poll_errors_total": ("counter", frozenset({"server"})),
    "pg_reaper_server_up": ("gauge", frozenset({"server"})),
    "pg_reaper_last_poll_timestamp_seconds": ("gauge", frozenset({"server"})),
    "pg_reaper_dry_run": ("gauge", frozenset()),
    "pg_reaper_config_last_reload_successful": ("gauge", frozenset()),
    "pg_reaper_build_info": ("gauge", frozenset({"version"})),
}
# The values pg_stat_activity.state can take.
SESSION_STATES = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
)
# DESIGN.md, "Audit log".
AUDIT_FIELDS = frozenset(
    {"server", "policy", "action", "dry_run", "result", "pid", "backend_start", "database"}
    | {"user", "application", "client_addr", "state", "idle_seconds", "transaction_seconds"}
    | {"connection_seconds"}
)
POLL_COMPLETED_FIELDS = frozenset({"server", "sessions", "candidates", "reaped", "duration_ms"})


# --- the daemon as a process ------------------------------------------------------------------


class RunningDaemon:
    """`pg-reaper run` in a subprocess; its stderr parsed line by line into JSON events."""

    def __init__(
        self,
        config: Path,
        *,
        port: int | None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.upper().startswith(("PG_REAPER_", "NOTIFY_SOCKET", "WATCHDOG_"))
        }
        environment["PYTHONUNBUFFERED"] = "1"
        environment.update(env or {})
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._other_lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reaper", "run", "-c", str(config), *args],
            cwd=ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self._reader = threading.Thread(target=self._read, name="daemon-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            with self._lock:
                if isinstance(event, dict):
                    self._events.append(event)
                elif line.strip():
                    self._other_lines.append(line.rstrip("\n"))

    # what it said

    def events(self, name: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        with self._lock:
            events = list(self._events)
        return [
            e
            for e in events
            if (name is None or e.get("event") == name)
            and all(e.get(k) == v for k, v in fields.items())
        ]

    @property
    def other_lines(self) -> list[str]:
        with self._lock:
            return list(self._other_lines)

    def stderr_text(self) -> str:
        with self._lock:
            lines = [json.dumps(e) for e in self._events] + self._other_lines
        return "\n".join(lines[-60:])

    def wait_event(self, name: str, *, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        self.wait_until(lambda: bool(self.events(name, **fields)), timeout=timeout, what=name)
        return self.events(name, **fields)[0]

    def wait_until(self, predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Like `wait_for`, but fails at once, with the daemon's output, should the daemon die."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.process.poll() is not None:
                self._reader.join(timeout=2)
                raise AssertionError(
                    f"the daemon exited ({self.process.returncode}) while waiting for {what}:\n"
                    + self.stderr_text()
                )
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; daemon output:\n{self.stderr_text()}")

    # its HTTP endpoints

    def get(self, path: str) -> tuple[int, str]:
        assert self.port is not None
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            with contextlib.closing(exc):
                return exc.code, exc.read().decode()

    def status(self, path: str) -> int | None:
        """The HTTP status of `path`, None while nothing listens."""
        try:
            return self.get(path)[0]
        except (urllib.error.URLError, ConnectionError):
            return None

    def families(self) -> dict[str, Metric]:
        _, body = self.get("/metrics")
        return {f.name: f for f in text_string_to_metric_families(body)}

    def value(self, sample: str, **labels: str) -> float | None:
        """The value of the one series of `sample` with these labels (a subset), if there is one."""
        found = [
            s.value
            for family in self.families().values()
            for s in family.samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) <= 1, f"{sample}{labels} names several series: {found}"
        return found[0] if found else None

    def wait_value(
        self,
        sample: str,
        predicate: Callable[[float | None], bool],
        *,
        timeout: float = 10.0,
        **labels: str,
    ) -> float | None:
        self.wait_until(
            lambda: predicate(self.value(sample, **labels)),
            timeout=timeout,
            what=f"{sample}{labels}",
        )
        return self.value(sample, **labels)

    def wait_ready(self, *, timeout: float = 20.0) -> None:
        self.wait_until(lambda: self.status("/readyz") == 200, timeout=timeout, what="/readyz 200")

    # its life

    def send(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, *, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        """Kill it if it still runs; always bounded."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., RunningDaemon]]:
    started: list[RunningDaemon] = []

    def start(
        config: Path,
        *,
        port: int | None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> RunningDaemon:
        daemon = RunningDaemon(config, port=port, args=args, env=env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def port() -> int:
    return free_port()


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def policy(name: str, applications: str, *, max_idle: str = "1s", extra: str = "") -> str:
    """A policy that can only ever match this test's own sessions (by application_name)."""
    return textwrap.dedent(
        f"""
        [[policies]]
        name = "{name}"
        max_idle = "{max_idle}"
        applications = [{toml_string(applications)}]
        {extra}
        """
    )


def daemon_config(
    path: Path,
    *,
    servers: Mapping[str, str],
    policies: str,
    port: int | None,
    interval: str = "30s",
    min_interval: str = "1s",
    reaper: str = "",
) -> Path:
    listen = f"127.0.0.1:{port}" if port is not None else ""
    text = textwrap.dedent(
        f"""\
        [reaper]
        interval = "{interval}"
        min_interval = "{min_interval}"
        protect_applications = ["^{ADMIN_APPLICATION}$"]
        {reaper}

        [metrics]
        listen = "{listen}"

        [log]
        format = "json"
        """
    )
    for name, dsn in servers.items():
        text += f"\n[[servers]]\nname = {toml_string(name)}\ndsn = {toml_string(dsn)}\n"
    path.write_text(text + policies, encoding="utf-8")
    return path


def server_name(pg: TestServer) -> str:
    return f"pg{pg.major}"


def reaper_backends(pg: TestServer) -> set[int]:
    rows = pg.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [REAPER_APPLICATION]
    )
    return {row[0] for row in rows}


def check_audit_event(
    event: dict[str, Any], *, server: str, conn: psycopg.Connection[Any], in_transaction: bool
) -> None:
    """A session_reaped event of the idle policy, as DESIGN.md's "Audit log" lists it."""
    assert set(event) >= AUDIT_FIELDS, f"missing {AUDIT_FIELDS - set(event)}"
    assert "query" not in event
    assert event["level"] == "info"
    assert event["server"] == server
    assert event["policy"] == "idle"
    assert event["action"] == "terminate"
    assert event["dry_run"] is False
    assert event["result"] == "terminated"
    assert event["pid"] == conn.info.backend_pid
    assert event["database"] == "postgres"
    assert event["user"] == conn.info.user
    assert event["application"].startswith("t1-")
    assert event["state"] == ("idle in transaction" if in_transaction else "idle")
    assert event["idle_seconds"] > 1
    assert event["connection_seconds"] >= event["idle_seconds"]
    assert (event["transaction_seconds"] is not None) == in_transaction
    assert isinstance(event["backend_start"], str)


def check_documented_metrics(families: dict[str, Metric], *, server: str) -> None:
    """Every metric of DESIGN.md's table, of its type, with exactly its labels."""
    for name, (kind, documented) in DOCUMENTED_METRICS.items():
        family_name = name.removesuffix("_total") if kind == "counter" else name
        assert family_name in families, f"{name} is not in /metrics"
        family = families[family_name]
        assert family.type == kind, f"{name} is a {family.type}, not a {kind}"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == documented, f"{sample} has other labels"
    states = {
        s.labels["state"]
        for s in families["pg_reaper_sessions"].samples
        if s.labels["server"] == server
    }
    assert states >= set(SESSION_STATES), f"no series for {set(SESSION_STATES) - states}"


# --- 1. what was reaped shows in the metrics and the audit log --------------------------------


def test_reaped_sessions_are_counted_in_metrics_and_audited_one_event_each(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
) -> None:
    idle = [sessions.idle(application=f"t1-idle-{i}") for i in range(2)]
    in_tx = sessions.idle_in_transaction(application="t1-in-tx")
    victims = {c.info.backend_pid: c for c in [*idle, in_tx]}
    server = server_name(pg)
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server: pg.dsn()},
        policies=policy("idle", "^t1-"),
        port=port,
    )

    daemon = start_daemon(config, port=port)

    for pid in victims:
        assert pg.wait_gone(pid), f"pid {pid} still on the server"
    daemon.wait_until(
        lambda: {e["pid"] for e in daemon.events("session_reaped")} >= set(victims),
        timeout=5,
        what="one session_reaped event per victim",
    )
    daemon.wait_ready()
    reaped = daemon.events("session_reaped")
    assert sorted(e["pid"] for e in reaped) == sorted(victims), "one event per pid, no more"
    for event in reaped:
        conn = victims[event["pid"]]
        check_audit_event(event, server=server, conn=conn, in_transaction=conn is in_tx)
        if pg.has_socket:
            assert event["client_addr"] == "local"
    assert not any(usable(c) for c in victims.values())

    polls = daemon.events("poll_completed", server=server)
    assert polls
    for poll in polls:
        assert set(poll) >= POLL_COMPLETED_FIELDS, f"missing {POLL_COMPLETED_FIELDS - set(poll)}"
        assert poll["duration_ms"] >= 0
        assert poll["sessions"] >= poll["candidates"] >= poll["reaped"] >= 0
    # Each by a poll, or by the armed timer of a poll that saw it just under max_idle.
    fired = daemon.events("armed_signals_fired", server=server)
    assert sum(p["reaped"] for p in polls) + sum(f["reaped"] for f in fired) == len(victims)

    labels = {"server": server, "policy": "idle", "action": "terminate"}
    assert daemon.value("pg_reaper_sessions_reaped_total", **labels) == len(victims)
    check_documented_metrics(daemon.families(), server=server)
    assert daemon.value("pg_reaper_server_up", server=server) == 1
    assert daemon.value("pg_reaper_dry_run") == 0
    assert daemon.value("pg_reaper_config_last_reload_successful") == 1
    assert daemon.value("pg_reaper_max_connections", server=server) == int(
        pg.execute("SHOW max_connections")[0][0]
    )
    last_poll = daemon.value("pg_reaper_last_poll_timestamp_seconds", server=server)
    assert last_poll is not None
    assert abs(last_poll - time.time()) < 60
    assert daemon.status("/healthz") == 200
    assert daemon.status("/readyz") == 200
    assert daemon.other_lines == [], "stderr holds lines that are not JSON"


# --- 2. deadline scheduling -------------------------------------------------------------------


def test_a_session_is_reaped_about_a_second_after_it_becomes_eligible_not_at_the_interval(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
) -> None:
    server = server_name(pg)
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server: pg.dsn()},
        policies=policy("idle", "^t2-", max_idle="3s"),
        port=port,
        interval="30s",
        min_interval="1s",
    )
    daemon = start_daemon(config, port=port)
    daemon.wait_ready()
    daemon.wait_event("poll_completed", server=server)
    # Not in step with the daemon's polls.
    time.sleep(0.7)

    conn = sessions.open(application="t2-deadline")
    pid = conn.info.backend_pid
    conn.execute("SELECT 1")  # its last statement: idle from now on (state_change)
    eligible_at = time.monotonic() + 3.0

    assert pg.wait_gone(pid, timeout=15)
    late = time.monotonic() - eligible_at

    assert late < 2.5, f"terminated {late:.2f} s after it became eligible"
    event = daemon.wait_event("session_reaped", pid=pid, timeout=5)
    assert 3.0 < event["idle_seconds"] < 5.5


# --- 3. dry run -------------------------------------------------------------------------------


def test_dry_run_signals_nothing_but_audits_and_counts_candidates(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
) -> None:
    victims = [sessions.idle(application=f"t3-idle-{i}") for i in range(2)]
    pids = {c.info.backend_pid for c in victims}
    server = server_name(pg)
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server: pg.dsn()},
        policies=policy("idle", "^t3-"),
        port=port,
    )

    daemon = start_daemon(config, port=port, args=["--dry-run"])

    daemon.wait_until(
        lambda: {e["pid"] for e in daemon.events("session_reaped")} >= pids,
        timeout=10,
        what="session_reaped events of the dry run",
    )
    daemon.wait_ready()
    for event in daemon.events("session_reaped"):
        assert event["dry_run"] is True
        assert event["result"] == "dry_run"
        assert event["policy"] == "idle"
    assert daemon.events("daemon_started")[0]["dry_run"] is True
    assert daemon.value("pg_reaper_dry_run") == 1
    candidates = daemon.value("pg_reaper_candidates", server=server, policy="idle")
    assert candidates is not None
    assert candidates >= len(pids)
    assert daemon.value("pg_reaper_sessions_reaped_total") in {None, 0}
    assert all(p["reaped"] == 0 for p in daemon.events("poll_completed"))
    for conn in victims:
        assert pg.is_alive(conn.info.backend_pid)
        assert usable(conn)

    # --dry-run outlives a reload of a file that does not ask for a dry run.
    daemon.send(signal.SIGHUP)
    assert daemon.wait_event("config_reloaded")["dry_run"] is True
    polls = len(daemon.events("poll_completed"))
    daemon.wait_until(
        lambda: len(daemon.events("poll_completed")) > polls, timeout=5, what="a poll"
    )
    assert daemon.value("pg_reaper_dry_run") == 1
    assert daemon.value("pg_reaper_sessions_reaped_total") in {None, 0}
    for conn in victims:
        assert pg.is_alive(conn.info.backend_pid)


@pytest.mark.parametrize("dry_run", [False, True], ids=["live", "dry-run"])
def test_a_log_policy_reports_each_idle_episode_once_not_every_poll(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
    dry_run: bool,  # noqa: FBT001 - a parameter
) -> None:
    watched = sessions.idle(application="t3-log-watched")
    server = server_name(pg)
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server: pg.dsn()},
        policies=policy("watch", "^t3-log-", extra='action = "log"'),
        port=port,
        interval="1s",
    )
    daemon = start_daemon(config, port=port, args=["--dry-run"] if dry_run else [])
    pid = watched.info.backend_pid

    daemon.wait_event("session_reaped", pid=pid)
    polls = len(daemon.events("poll_completed"))
    daemon.wait_until(
        lambda: len(daemon.events("poll_completed")) >= polls + 3, timeout=10, what="3 polls"
    )
    # One event for the episode, whatever the polls in between; still a candidate each poll.
    (event,) = daemon.events("session_reaped", pid=pid)
    assert (event["result"], event["action"], event["dry_run"]) == ("logged", "log", dry_run)
    assert daemon.value("pg_reaper_candidates", server=server, policy="watch") == 1
    counted = daemon.value("pg_reaper_sessions_reaped_total", server=server, policy="watch")
    assert (counted or 0) == (0 if dry_run else 1)  # counted once, never in dry run
    assert pg.is_alive(pid)

    # A new episode (the session ran a statement and is idle again) is reported again.
    watched.execute("SELECT 1")
    daemon.wait_until(
        lambda: len(daemon.events("session_reaped", pid=pid)) == 2,
        timeout=10,
        what="the second episode's event",
    )


# --- 4. a server that goes away and comes back -------------------------------------------------


@pytest.fixture(scope="module")
def second_embedded(pg: TestServer) -> Iterator[EmbeddedPostgres]:
    """Another throwaway server of the same major, which a test may stop and start."""
    if pg.embedded is None:
        pytest.skip("needs embedded servers (one that the test can stop and start)")
    with EmbeddedPostgres(major=pg.major) as embedded:
        yield embedded


@pytest.fixture
def second_server(second_embedded: EmbeddedPostgres) -> Iterator[TestServer]:
    second_embedded.start()  # an earlier test may have left it stopped
    server = TestServer(
        major=second_embedded.major,
        admin_conninfo=second_embedded.dsn(),
        has_socket=True,
        embedded=second_embedded,
    )
    try:
        yield server
    finally:
        server.close()


def test_a_stopped_server_is_reported_down_without_delaying_the_other_and_recovers(
    pg: TestServer,
    sessions: Sessions,
    second_server: TestServer,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
) -> None:
    first, second = server_name(pg), "second"
    embedded = second_server.embedded
    assert embedded is not None
    config = daemon_config(
        tmp_path / "config.toml",
        servers={first: pg.dsn(), second: second_server.dsn()},
        policies=policy("idle", "^t4-", max_idle="2s"),
        port=port,
    )
    daemon = start_daemon(config, port=port)
    daemon.wait_ready()
    daemon.wait_value("pg_reaper_server_up", lambda v: v == 1, server=second)

    second_server.close()
    embedded.stop(mode="immediate")

    daemon.wait_value("pg_reaper_server_up", lambda v: v == 0, server=second, timeout=10)
    errors = daemon.value("pg_reaper_poll_errors_total", server=second)
    assert errors is not None
    assert errors >= 1
    # The other server is reaped on time meanwhile.
    conn = sessions.open(application="t4-first")
    conn.execute("SELECT 1")
    eligible_at = time.monotonic() + 2.0
    assert pg.wait_gone(conn.info.backend_pid, timeout=10)
    assert time.monotonic() - eligible_at < 2.5
    assert daemon.value("pg_reaper_server_up", server=first) == 1
    errors = daemon.wait_value(
        "pg_reaper_poll_errors_total", lambda v: (v or 0) >= 3, server=second, timeout=10
    )
    assert errors is not None
    failed = daemon.events("poll_failed", server=second)
    assert failed
    assert failed[0]["level"] == "error"
    assert failed[0]["error"]
    assert len(failed) < errors, "a failure repeated is not printed at the info level"
    assert not [e for e in daemon.events() if e.get("level") == "debug"]

    embedded.start()

    daemon.wait_event("server_recovered", server=second, timeout=20)
    assert daemon.value("pg_reaper_server_up", server=second) == 1
    on_second = Sessions(second_server)
    try:
        idle = on_second.idle(application="t4-second")
        assert second_server.wait_gone(idle.info.backend_pid, timeout=10)
    finally:
        on_second.close()
    daemon.wait_event("session_reaped", server=second, application="t4-second", timeout=5)


def test_an_outage_is_reported_at_error_level_once_and_each_retry_at_debug_level(
    second_server: TestServer,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
) -> None:
    embedded = second_server.embedded
    assert embedded is not None
    config = daemon_config(
        tmp_path / "config.toml",
        servers={"second": second_server.dsn()},
        policies=policy("idle", "^t4-", max_idle="2s"),
        port=port,
    )
    config.write_text(
        config.read_text().replace('format = "json"', 'format = "json"\nlevel = "debug"')
    )
    daemon = start_daemon(config, port=port)
    daemon.wait_ready()
    daemon.wait_value("pg_reaper_server_up", lambda v: v == 1, server="second")
    second_server.close()

    embedded.stop(mode="immediate")

    errors = daemon.wait_value(
        "pg_reaper_poll_errors_total", lambda v: (v or 0) >= 3, server="second", timeout=15
    )
    levels = [e["level"] for e in daemon.events("poll_failed", server="second")]
    assert len(levels) == errors
    assert levels == ["error"] + ["debug"] * (len(levels) - 1), levels


# --- 5. SIGHUP --------------------------------------------------------------------------------


def test_sighup_applies_a_valid_file_and_keeps_the_running_rules_when_the_file_is_broken(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
) -> None:
    server = server_name(pg)
    path = tmp_path / "config.toml"

    def write(policies: str) -> None:
        # Only SIGHUP reloads here: the events are counted exactly.
        daemon_config(
            path,
            servers={server: pg.dsn()},
            policies=policies,
            port=port,
            reaper="watch_config = false",
        )

    write(policy("a", "^t5-a$"))
    daemon = start_daemon(path, port=port)
    daemon.wait_ready()
    spared = sessions.idle(application="t5-b")
    time.sleep(1.5)
    daemon.wait_event("poll_completed", server=server)
    assert pg.is_alive(spared.info.backend_pid), "no policy matches it yet"

    write(policy("a", "^t5-a$") + policy("b", "^t5-b$"))
    daemon.send(signal.SIGHUP)

    reloaded = daemon.wait_event("config_reloaded")
    assert reloaded["policies"] == ["a", "b"]
    assert pg.wait_gone(spared.info.backend_pid)
    daemon.wait_event("session_reaped", pid=spared.info.backend_pid, policy="b", timeout=5)
    assert daemon.value("pg_reaper_config_last_reload_successful") == 1

    # A syntax error, then an unknown key: each is refused with the problem named.
    path.write_text("[[policies]\nname = 'a'\n", encoding="utf-8")
    daemon.send(signal.SIGHUP)
    failed = daemon.wait_event("config_reload_failed")
    assert failed["level"] == "error"
    assert any("TOML" in problem for problem in failed["problems"]), failed
    assert daemon.value("pg_reaper_config_last_reload_successful") == 0

    write(policy("a", "^t5-a$") + policy("c", "^t5-c$", extra='max_idel = "1s"'))
    daemon.send(signal.SIGHUP)
    daemon.wait_until(
        lambda: len(daemon.events("config_reload_failed")) == 2, timeout=10, what="second failure"
    )
    problems = daemon.events("config_reload_failed")[1]["problems"]
    assert any("policies[1].max_idel" in problem for problem in problems), problems
    assert daemon.value("pg_reaper_config_last_reload_successful") == 0
    assert len(daemon.events("config_reloaded")) == 1

    # The rules still in force are those of the last valid file: policy "b" reaps.
    again = sessions.idle(application="t5-b")
    assert pg.wait_gone(again.info.backend_pid)
    daemon.wait_event("session_reaped", pid=again.info.backend_pid, policy="b", timeout=5)
    assert daemon.process.poll() is None


def test_a_changed_config_file_is_reloaded_without_sighup_and_a_broken_one_is_kept_out(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
) -> None:
    # Laid out as the kubelet mounts a ConfigMap: config.toml -> ..data/config.toml, and an
    # update swaps the ..data link to a new directory in one rename.
    server = server_name(pg)
    mount = tmp_path / "mount"
    mount.mkdir()
    path = mount / "config.toml"
    path.symlink_to("..data/config.toml")

    def publish(version: int, policies: str) -> None:
        directory = mount / f"..v{version}"
        directory.mkdir()
        daemon_config(
            directory / "config.toml", servers={server: pg.dsn()}, policies=policies, port=port
        )
        link = mount / "..data_tmp"
        link.symlink_to(directory.name)
        link.replace(mount / "..data")

    publish(1, policy("a", "^t6-a$"))
    daemon = start_daemon(path, port=port)
    daemon.wait_ready()
    spared = sessions.idle(application="t6-b")

    publish(2, policy("a", "^t6-a$") + policy("b", "^t6-b$"))

    daemon.wait_event("config_changed", timeout=15)
    assert daemon.wait_event("config_reloaded")["policies"] == ["a", "b"]
    assert pg.wait_gone(spared.info.backend_pid)
    assert daemon.value("pg_reaper_config_last_reload_successful") == 1

    # A broken edit is refused once, not at every look, and the running rules stay.
    publish(3, "[[policies]\nname = 'a'\n")
    daemon.wait_event("config_reload_failed", timeout=15)
    assert daemon.value("pg_reaper_config_last_reload_successful") == 0
    looks = WATCH_INTERVAL * 2 + 1
    time.sleep(looks)
    assert len(daemon.events("config_reload_failed")) == 1
    again = sessions.idle(application="t6-b")
    assert pg.wait_gone(again.info.backend_pid)
    assert daemon.process.poll() is None


def test_a_reload_applies_new_thresholds_at_once_not_at_the_next_interval(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
) -> None:
    server = server_name(pg)
    path = tmp_path / "config.toml"

    def write(policies: str) -> None:
        daemon_config(path, servers={server: pg.dsn()}, policies=policies, port=port)

    write(policy("hourly", "^t5-late$", max_idle="1h"))  # next poll due in `interval`, 30 s
    daemon = start_daemon(path, port=port)
    daemon.wait_ready()
    daemon.wait_event("poll_completed", server=server)
    late = sessions.idle(application="t5-late")
    time.sleep(1.2)
    write(policy("hourly", "^t5-late$", max_idle="1s"))

    daemon.send(signal.SIGHUP)
    daemon.wait_event("config_reloaded")

    assert pg.wait_gone(late.info.backend_pid, timeout=4), "still there 4 s after the reload"


# --- 6. SIGTERM and SIGINT --------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_0_within_10_s_and_closes_the_reapers_session(
    pg: TestServer,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
    signum: signal.Signals,
) -> None:
    before = reaper_backends(pg)
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server_name(pg): pg.dsn()},
        policies=policy("idle", "^t6-"),
        port=port,
    )
    daemon = start_daemon(config, port=port)
    daemon.wait_ready()
    wait_for(lambda: bool(reaper_backends(pg) - before), timeout=5, what="the reaper's session")
    own = reaper_backends(pg) - before
    assert len(own) == 1, own

    started = time.monotonic()
    daemon.send(signum)
    code = daemon.wait_exit(timeout=15)
    took = time.monotonic() - started

    assert code == 0, daemon.stderr_text()
    assert took < 10, f"took {took:.1f} s to stop"
    stopping = daemon.events("daemon_stopping")
    assert len(stopping) == 1
    assert stopping[0]["signal"] == signum.name
    assert daemon.events("daemon_stopped")
    names = [e["event"] for e in daemon.events()]
    assert names.index("daemon_stopping") < names.index("daemon_stopped")
    assert names[-1] == "daemon_stopped"
    (pid,) = own
    assert pg.wait_gone(pid, timeout=5), "the daemon left its session on the server"


def test_sigterm_while_a_cycle_waits_on_a_hung_server_still_exits_0_within_10_s(
    pg: TestServer,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
) -> None:
    if pg.embedded is None:
        pytest.skip("needs a local server whose backends the test may SIGSTOP")
    before = reaper_backends(pg)
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server_name(pg): pg.dsn()},
        policies=policy("idle", "^t6-", max_idle="2s"),  # a poll at least every 2 s
        port=port,
    )
    daemon = start_daemon(config, port=port)
    daemon.wait_ready()
    wait_for(lambda: bool(reaper_backends(pg) - before), timeout=5, what="the reaper's session")
    (pid,) = reaper_backends(pg) - before
    os.kill(pid, signal.SIGSTOP)  # the reaper's backend answers nothing from now on
    try:
        time.sleep(2.5)  # the next poll is under way and waits for an answer

        started = time.monotonic()
        daemon.send(signal.SIGTERM)
        code = daemon.wait_exit(timeout=15)
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)

    assert code == 0, daemon.stderr_text()
    assert took < 10, f"took {took:.1f} s to stop"
    assert daemon.events("daemon_stopping")
    assert daemon.events("daemon_stopped")
    assert pg.wait_gone(pid, timeout=5)


# --- 7. promtool ------------------------------------------------------------------------------


def test_metrics_pass_promtool_check_metrics(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/test installs it)")
    victim = sessions.idle(application="t7-idle")
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server_name(pg): pg.dsn()},
        policies=policy("idle", "^t7-"),
        port=port,
    )
    daemon = start_daemon(config, port=port)
    assert pg.wait_gone(victim.info.backend_pid)
    daemon.wait_ready()
    daemon.wait_value("pg_reaper_sessions_reaped_total", lambda v: v == 1, timeout=5)
    _, body = daemon.get("/metrics")

    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=body,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    output = (checked.stdout + checked.stderr).strip()
    assert checked.returncode == 0, output
    assert output == "", output


# --- 8. systemd notifications -----------------------------------------------------------------


class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET, as systemd holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[tuple[float, str]] = []

    def receive_until(self, predicate: Callable[[str], bool], *, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            message = data.decode()
            self.received.append((time.monotonic(), message))
            if predicate(message):
                return message
        raise AssertionError(f"no such notification within {timeout} s: {self.received}")

    def drain(self, *, seconds: float) -> None:
        with contextlib.suppress(AssertionError):
            self.receive_until(lambda _m: False, timeout=seconds)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    assert len(str(path)) < 100, "sun_path is 108 bytes"
    receiver = NotifySocket(path)
    yield receiver
    receiver.close()


def lines_of(message: str) -> list[str]:
    return message.split("\n")


def test_systemd_is_told_ready_watchdog_reloading_and_stopping_in_order(
    pg: TestServer,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    port: int,
    notify_socket: NotifySocket,
) -> None:
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server_name(pg): pg.dsn()},
        policies=policy("idle", "^t8-"),
        port=port,
    )
    daemon = start_daemon(
        config,
        port=port,
        env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "2000000"},
    )

    notify_socket.receive_until(lambda m: "READY=1" in lines_of(m), timeout=20)
    notify_socket.drain(seconds=3.2)
    daemon.send(signal.SIGHUP)
    notify_socket.receive_until(lambda m: "RELOADING=1" in lines_of(m), timeout=10)
    notify_socket.receive_until(lambda m: "READY=1" in lines_of(m), timeout=10)
    notify_socket.drain(seconds=1.5)
    daemon.send(signal.SIGTERM)
    notify_socket.receive_until(lambda m: "STOPPING=1" in lines_of(m), timeout=10)
    assert daemon.wait_exit(timeout=15) == 0, daemon.stderr_text()
    notify_socket.drain(seconds=0.3)

    messages = [m for _, m in notify_socket.received]
    kinds = [lines_of(m)[0] for m in messages]
    assert kinds[0] == "READY=1", messages
    assert kinds[-1] == "STOPPING=1", messages
    assert kinds.count("STOPPING=1") == 1
    reloading = kinds.index("RELOADING=1")
    assert kinds.count("RELOADING=1") == 1
    after_reload = [k for k in kinds[reloading + 1 :] if k != "WATCHDOG=1"]
    assert after_reload[0] == "READY=1", messages
    monotonic = [
        line for line in lines_of(messages[reloading]) if line.startswith("MONOTONIC_USEC=")
    ]
    assert len(monotonic) == 1, messages[reloading]
    usec = int(monotonic[0].removeprefix("MONOTONIC_USEC="))
    assert 0 < usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert set(kinds) == {"READY=1", "WATCHDOG=1", "RELOADING=1", "STOPPING=1"}, messages
    pings = [t for t, m in notify_socket.received if lines_of(m)[0] == "WATCHDOG=1"]
    # WATCHDOG_USEC=2 s: a ping every second (half of it), from READY to STOPPING.
    assert len(pings) >= 4, messages
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(0.5 < gap < 1.6 for gap in gaps), gaps


# --- 9. configuration errors at start ---------------------------------------------------------


def run_to_exit(config: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.upper().startswith("PG_REAPER_")}
    return subprocess.run(
        [sys.executable, "-m", "reaper", "run", "-c", str(config)],
        cwd=ROOT,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_run_with_an_invalid_file_exits_2_naming_the_key_path(
    pg: TestServer, tmp_path: Path, port: int
) -> None:
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server_name(pg): pg.dsn()},
        policies=policy("idle", "^t9-", max_idle="15 mins"),
        port=port,
        reaper='intervall = "10s"',
    )

    done = run_to_exit(config)

    assert done.returncode == 2, done.stderr
    assert "reaper.intervall" in done.stderr
    assert "policies[0].max_idle" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_with_the_metrics_port_in_use_exits_2_with_a_clear_message(
    pg: TestServer, tmp_path: Path, port: int
) -> None:
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server_name(pg): pg.dsn()},
        policies=policy("idle", "^t9-"),
        port=port,
    )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()

        done = run_to_exit(config)

    assert done.returncode == 2, done.stderr
    assert "metrics.listen" in done.stderr
    assert f"127.0.0.1:{port}" in done.stderr
    assert "in use" in done.stderr
    assert "Traceback" not in done.stderr
