"""Armed signals, on real servers: what a poll arms, what a firing signals (and spares), and the
daemon arming, re-arming and cancelling its timers (docs/semantics.md, "Armed signals")."""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from datetime import UTC, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from reaper.daemon.armed import ArmedSignals
from reaper.daemon.balance import member_id, preferred
from reaper.daemon.ha import LeaderState
from reaper.daemon.scheduler import Scheduler
from reaper.demo.programs import free_port
from reaper.observe.log import get_logger
from reaper.observe.metrics import Metrics
from reaper.policy import Result
from reaper.settings import Settings
from reaper.sweep import Memory, connect, sweep
from reaper.sweep.armed import Armed, arming, fire
from tests.servers import Sessions, TestServer, usable, wait_for
from tests.test_daemon import (
    RunningDaemon,
    daemon_config,
    policy,
    port,
    server_name,
    start_daemon,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from reaper.pg.activity import ServerConnection
    from reaper.settings import ServerConfig
    from reaper.sweep import SweepReport

__all__ = ["port", "start_daemon"]  # fixtures

pytestmark = pytest.mark.integration


def _settings(pg: TestServer, policies: list[dict[str, Any]], **reaper: Any) -> Settings:
    return Settings(servers=[{"name": "s", "dsn": pg.dsn()}], policies=policies, reaper=reaper)


def _kill(*apps: str) -> dict[str, Any]:
    """Terminate these applications' sessions (only theirs: tests may share a server) idle 2 s."""
    return {"name": "kill", "max_idle": "2s", "applications": [f"^{app}$" for app in apps]}


def _poll(conn: ServerConnection, settings: Settings) -> tuple[ServerConfig, SweepReport]:
    (server,) = settings.servers
    return server, sweep(conn, server=server, settings=settings)


def _armed(pg: TestServer, sessions: Sessions, *apps: str) -> tuple[Settings, list[Armed], Any]:
    """Sessions idle under `apps`, polled once and armed by `_kill`."""
    opened = {app: sessions.idle(application=app) for app in apps}
    settings = _settings(pg, [_kill(*apps)])
    conn = connect(settings.servers[0], settings)
    server, report = _poll(conn, settings)
    armed = arming(report, server=server, settings=settings)
    assert sorted(a.decision.session.application for a in armed.victims) == sorted(apps)
    return settings, list(armed.victims), (conn, opened)


def _sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.monotonic()))


def _fire(
    conn: ServerConnection, settings: Settings, victims: Sequence[Armed]
) -> dict[str, Result]:
    report = fire(conn, victims, server="s", settings=settings, lock_key=None, memory=None)
    return {o.decision.session.application: o.result for o in report.outcomes}


def test_a_poll_arms_only_the_crossings_within_its_horizon(
    pg: TestServer, sessions: Sessions
) -> None:
    sessions.idle(application="arm-horizon")
    settings = _settings(pg, [_kill("arm-horizon")])
    conn = connect(settings.servers[0], settings)
    server, report = _poll(conn, settings)
    # Its crossing is under 2 s away: past a 0.5 s horizon, inside a 10 s one.
    beyond = arming(report, server=server, settings=settings, horizon=0.5)
    assert beyond.victims == ()
    assert beyond.eligible_in == report.eligible_in  # a later poll, within the horizon, arms it
    assert report.eligible_in is not None
    assert 0.5 < report.eligible_in <= 2.0
    within = arming(report, server=server, settings=settings, horizon=10.0)
    assert [a.decision.session.application for a in within.victims] == ["arm-horizon"]
    assert 0.0 < within.victims[0].at - time.monotonic() <= 2.0
    conn.close()


# --- the firing: race-safe, and never before the server says the age is past ------------------


def test_an_armed_signal_reaps_the_unchanged_and_spares_what_moved_ms_before_its_timer(
    pg: TestServer, sessions: Sessions
) -> None:
    settings, victims, (conn, opened) = _armed(pg, sessions, "arm-stays", "arm-ran", "arm-reused")
    by_app = {v.decision.session.application: v for v in victims}
    # Another backend on the same pid: same pid and state, another backend_start.
    reused = by_app["arm-reused"]
    session = reused.decision.session
    assert session.backend_start is not None
    by_app["arm-reused"] = dataclasses.replace(
        reused,
        decision=dataclasses.replace(
            reused.decision,
            session=dataclasses.replace(
                session, backend_start=session.backend_start - timedelta(minutes=5)
            ),
        ),
    )
    latest = max(v.at for v in victims)
    _sleep_until(latest - 0.01)  # a few milliseconds before the timer
    opened["arm-ran"].execute("SELECT 1")
    _sleep_until(latest + 0.005)
    with conn:
        results = _fire(conn, settings, list(by_app.values()))

    assert results["arm-stays"] is Result.TERMINATED
    assert results["arm-ran"] is Result.CHANGED
    assert results["arm-reused"] is Result.CHANGED
    assert pg.wait_gone(opened["arm-stays"].info.backend_pid)
    assert usable(opened["arm-ran"])
    assert usable(opened["arm-reused"])


def test_an_armed_session_that_became_active_is_not_signalled(
    pg: TestServer, sessions: Sessions
) -> None:
    settings, victims, (conn, opened) = _armed(pg, sessions, "arm-busy")
    (victim,) = victims
    busy = opened["arm-busy"]
    pid = busy.info.backend_pid
    _sleep_until(victim.at - 0.05)
    # Its own long statement, started before its moment, still running when the timer fires.
    done: list[Any] = []
    thread = threading.Thread(
        target=lambda: done.append(busy.execute("SELECT pg_sleep(1.5)").fetchone()), daemon=True
    )
    thread.start()
    pg.wait_state(pid, "active")
    _sleep_until(victim.at + 0.005)
    with conn:
        results = _fire(conn, settings, victims)
    thread.join(10)

    assert results == {"arm-busy": Result.CHANGED}
    assert done == [("",)], "its statement was cut short"
    assert usable(busy)


def test_a_timer_that_fires_early_signals_nothing_the_server_says_not_due(
    pg: TestServer, sessions: Sessions
) -> None:
    settings, victims, (conn, opened) = _armed(pg, sessions, "arm-early-1", "arm-early-2")
    # Fired now, well before their moment (2 s of max_idle, polled just after SELECT 1).
    with conn:
        results = _fire(conn, settings, victims)

    assert set(results.values()) == {Result.NOT_DUE}
    for conn_ in opened.values():
        assert pg.state_of(conn_.info.backend_pid) == "idle"
        assert usable(conn_)


def test_an_armed_signal_under_ha_acts_only_for_the_holder_of_the_lock(
    pg: TestServer, sessions: Sessions
) -> None:
    settings, victims, (conn, opened) = _armed(pg, sessions, "arm-ha")
    (victim,) = victims
    _sleep_until(victim.at + 0.005)
    with conn:  # this session holds no advisory lock: another instance leads
        report = fire(conn, victims, server="s", settings=settings, lock_key=4242, memory=None)

    assert [o.result for o in report.outcomes] == [Result.NOT_LEADER]
    assert not report.leader
    assert usable(opened["arm-ha"])


# --- what a poll arms ------------------------------------------------------------------------


def test_a_poll_arms_by_the_policy_the_session_will_meet_and_leaves_the_rest_to_polls(
    pg: TestServer, sessions: Sessions
) -> None:
    sessions.idle(application="arm-kill")
    sessions.idle(application="arm-watch")
    policies = [
        # First in file order: a `log` policy takes arm-watch (a poll reports it, nothing to arm).
        {"name": "watch", "action": "log", "max_idle": "4s", "applications": ["^arm-watch$"]},
        # Matches arm-kill first, but only at 5 s: at 2 s the next policy has it.
        {"name": "later", "max_idle": "5s", "applications": ["^arm-kill$"]},
        _kill("arm-kill"),
    ]
    live = _settings(pg, policies)
    with connect(live.servers[0], live) as conn:
        server, report = _poll(conn, live)
        armed = arming(report, server=server, settings=live)
        dry = _settings(pg, policies, dry_run=True)
        dry_report = sweep(conn, server=dry.servers[0], settings=dry)

    (victim,) = armed.victims
    assert victim.decision.session.application == "arm-kill"
    assert victim.decision.policy is not None
    assert victim.decision.policy.name == "kill"
    assert "(armed)" in victim.decision.reason
    # The armed crossing (2 s) needs no poll; the log policy's (4 s) is still a poll's.
    assert report.eligible_in is not None
    assert report.eligible_in <= 2
    assert armed.eligible_in is not None
    assert 3 < armed.eligible_in <= 4
    assert report.polled is not None
    assert victim.due > report.polled[0]
    # A dry run arms nothing: its polls come at each crossing, as before.
    dry_armed = arming(dry_report, server=dry.servers[0], settings=dry)
    assert dry_armed.victims == ()
    assert dry_armed.eligible_in == dry_report.eligible_in


# --- the daemon ----------------------------------------------------------------------------------


TICK = policy("tick", "^ta-nobody$", max_idle="1s")


def _daemon(
    start: Callable[..., RunningDaemon],
    pg: TestServer,
    path: Path,
    *,
    max_idle: str = "2s",
    apps: str,
    args: Sequence[str] = (),
    extra: str = "",
) -> RunningDaemon:
    port_ = free_port()
    config = daemon_config(
        path,
        servers={server_name(pg): pg.dsn()},
        # A policy that matches nothing, with the smallest threshold: a poll every second, so
        # that each session is seen (and armed) well before its moment, whatever the jitter.
        policies=extra + policy("idle", apps, max_idle=max_idle) + TICK,
        port=port_,
        interval="30s",
        min_interval="1s",
    )
    daemon = start(config, port=port_, args=args)
    daemon.wait_ready()
    return daemon


def test_the_daemon_reaps_by_an_armed_signal_audited_and_counted_as_a_cycles(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    server = server_name(pg)
    daemon = _daemon(start_daemon, pg, tmp_path / "c.toml", max_idle="3s", apps="^ta-armed$")
    daemon.wait_event("poll_completed", server=server)
    victim = sessions.idle(application="ta-armed")
    pid = victim.info.backend_pid

    event = daemon.wait_event("session_reaped", pid=pid, timeout=15)

    assert event["result"] == "terminated"
    assert event["reason"].endswith("(armed)")
    assert pg.wait_gone(pid)
    fired = daemon.wait_event("armed_signals_fired", server=server)
    assert fired["reaped"] >= 1
    daemon.wait_value("pg_reaper_armed_firings_total", lambda v: (v or 0) >= 1, server=server)
    reaped = daemon.value(
        "pg_reaper_sessions_reaped_total", server=server, policy="idle", action="terminate"
    )
    assert reaped is not None
    assert reaped >= 1


def test_a_dry_run_arms_nothing_and_signals_nothing(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    server = server_name(pg)
    daemon = _daemon(start_daemon, pg, tmp_path / "c.toml", apps="^ta-dry$", args=["--dry-run"])
    victim = sessions.idle(application="ta-dry")
    pid = victim.info.backend_pid

    daemon.wait_event("session_reaped", pid=pid, result="dry_run", timeout=15)
    polls = len(daemon.events("poll_completed"))
    daemon.wait_until(
        lambda: len(daemon.events("poll_completed")) > polls + 1, timeout=10, what="two polls"
    )

    assert daemon.events("armed_signals_fired") == []
    assert daemon.value("pg_reaper_armed_sessions", server=server) == 0
    assert daemon.value("pg_reaper_armed_firings_total", server=server) == 0
    assert pg.is_alive(pid)
    assert usable(victim)


def test_under_ha_only_the_leaders_armed_signals_act(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    server = server_name(pg)
    ha = '[ha]\nenabled = true\ninstance_id = "{}"\n'
    # The instance that should lead the server starts first and takes it; the other one then
    # stays a follower (balanced leadership would otherwise hand the server over meanwhile).
    members = {member_id(name): name for name in ("pod-a", "pod-b")}
    first = members[preferred(server, (server,), frozenset(members)) or 0]
    daemons = []
    for name in sorted(members.values(), key=lambda n: n != first):
        daemon = _daemon(
            start_daemon, pg, tmp_path / f"{name}.toml", apps="^ta-ha-", extra=ha.format(name)
        )
        daemon.wait_value("pg_reaper_leader", lambda v: v is not None, server=server)
        daemons.append(daemon)
    assert daemons[0].value("pg_reaper_leader", server=server) == 1
    victims = [sessions.idle(application=f"ta-ha-{i}") for i in range(6)]
    pids = {v.info.backend_pid for v in victims}

    for pid in pids:
        assert pg.wait_gone(pid, timeout=15)
    wait_for(
        lambda: {e["pid"] for d in daemons for e in d.events("session_reaped")} >= pids,
        timeout=5,
        what="the audit events",
    )

    events = [e for d in daemons for e in d.events("session_reaped") if e["pid"] in pids]
    assert sorted(e["pid"] for e in events) == sorted(pids)  # each once, by one instance
    leaders = [d for d in daemons if d.value("pg_reaper_leader", server=server) == 1]
    assert len(leaders) == 1
    (follower,) = [d for d in daemons if d is not leaders[0]]
    assert follower.events("armed_signals_fired") == []
    assert follower.value("pg_reaper_armed_sessions", server=server) == 0
    assert follower.value("pg_reaper_armed_firings_total", server=server) == 0
    # Reaped by the leader's timers; a victim whose moment fell while the leader's poll ran (a
    # poll replaces the armed set) is reaped by that poll instead, so not every one need be.
    assert any(e["reason"].endswith("(armed)") for e in events)
    assert (leaders[0].value("pg_reaper_armed_firings_total", server=server) or 0) >= 1


def test_sighup_with_a_changed_threshold_re_arms(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    server = server_name(pg)
    path = tmp_path / "c.toml"
    daemon = _daemon(start_daemon, pg, path, max_idle="1h", apps="^ta-hup$")
    victim = sessions.idle(application="ta-hup")
    pid = victim.info.backend_pid
    polls = len(daemon.events("poll_completed"))
    daemon.send(signal.SIGHUP)  # the same rules: a poll now, which sees the new session
    daemon.wait_event("config_reloaded")
    daemon.wait_until(
        lambda: len(daemon.events("poll_completed")) > polls + 1, timeout=10, what="two polls"
    )
    # An hour away is past the horizon (two polls of 1 s): a later poll arms it, none now.
    assert daemon.value("pg_reaper_armed_sessions", server=server) == 0

    _daemon_rewrite(path, max_idle="3s")
    daemon.send(signal.SIGHUP)

    event = daemon.wait_event("session_reaped", pid=pid, timeout=15)
    assert event["reason"].endswith("(armed)")
    assert event["idle_seconds"] < 5  # armed for the new threshold, not the old one
    assert pg.wait_gone(pid)


def _daemon_rewrite(path: Path, *, max_idle: str) -> None:
    text = path.read_text(encoding="utf-8").replace('max_idle = "1h"', f'max_idle = "{max_idle}"')
    path.write_text(text, encoding="utf-8")


def test_sigterm_cancels_every_armed_timer_and_exits_0_within_10_s(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    server = server_name(pg)
    daemon = _daemon(start_daemon, pg, tmp_path / "c.toml", max_idle="4s", apps="^ta-term$")
    victim = sessions.idle(application="ta-term")
    pid = victim.info.backend_pid
    daemon.send(signal.SIGHUP)  # poll now: it arms the session, 4 s ahead
    daemon.wait_value("pg_reaper_armed_sessions", lambda v: v == 1, server=server)

    started = time.monotonic()
    daemon.send(signal.SIGTERM)
    code = daemon.wait_exit(timeout=15)
    took = time.monotonic() - started
    time.sleep(max(0.0, 4.5 - took))  # past the armed moment: nothing fires

    assert code == 0, daemon.stderr_text()
    assert took < 10, f"took {took:.1f} s to stop"
    assert daemon.events("armed_signals_fired") == []
    assert daemon.events("session_reaped") == []
    assert pg.is_alive(pid)
    assert usable(victim)


# --- the scheduler's own timer -------------------------------------------------------------------


def test_the_schedulers_timer_spares_a_session_that_ran_a_statement_ms_before_it(
    pg: TestServer, sessions: Sessions
) -> None:
    settings = _settings(pg, [{**_kill("arm-sched"), "max_idle": "3s"}], interval="30s")
    metrics = Metrics()
    scheduler = Scheduler(settings, metrics=metrics)

    def fired() -> float:
        value = metrics.registry.get_sample_value("pg_reaper_armed_firings_total", {"server": "s"})
        return value or 0.0

    victim = sessions.idle(application="arm-sched")
    scheduler.start()
    try:
        for _ in range(5):  # again if a poll came between the statement and the timer
            wait_for(lambda: scheduler.armed("s")[0] == 1, timeout=10, what="the session armed")
            _, at = scheduler.armed("s")
            assert at is not None
            polls, firings = scheduler.polls("s"), fired()
            _sleep_until(at - 0.03)
            victim.execute("SELECT 1")  # a few milliseconds before its timer: a new episode
            wait_for(
                lambda: fired() > firings or scheduler.polls("s") > polls,  # noqa: B023
                timeout=5,
                what="the timer",
            )
            if scheduler.polls("s") == polls:
                break
        else:
            pytest.fail("a poll came between the statement and the timer five times")
        assert usable(victim), "the armed timer signalled a session that had moved"
        reaped = metrics.registry.get_sample_value(
            "pg_reaper_sessions_reaped_total",
            {"server": "s", "policy": "kill", "action": "terminate"},
        )
        assert reaped == 0
        # Its new episode is armed again by the next poll, and reaped at its own moment.
        assert pg.wait_gone(victim.info.backend_pid, timeout=10)
    finally:
        scheduler.stop(timeout=5)


@dataclasses.dataclass
class _Worker:
    """What a firing needs of a scheduler's worker (reaper.daemon.armed.Worker)."""

    name: str
    settings: Settings
    conn: ServerConnection | None
    leadership: LeaderState
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    memory: Memory = dataclasses.field(default_factory=Memory)
    removed: bool = False


def test_a_victim_the_server_finds_not_yet_due_is_armed_again_and_reaped_once_due(
    pg: TestServer, sessions: Sessions
) -> None:
    victim = sessions.idle(application="arm-again")
    settings = _settings(pg, [_kill("arm-again")])
    (server,) = settings.servers
    metrics = Metrics()
    polls: list[str] = []
    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.start()
    signals = ArmedSignals(
        scheduler,
        metrics=metrics,
        audit=None,
        notifications=None,
        poll_within=lambda name, _: polls.append(name),
    )
    with connect(server, settings) as conn:
        report = sweep(conn, server=server, settings=settings)
        assert report.polled is not None
        # A daemon whose clock runs 0.3 s ahead of the server's: its timer fires that early.
        now, sent = report.polled
        skewed = dataclasses.replace(report, polled=(now, sent - 0.3))
        worker = _Worker(
            name="s",
            settings=settings,
            conn=conn,
            leadership=LeaderState(server="s", metrics=metrics, log=get_logger()),
        )
        try:
            signals.arm(worker, skewed, settings=settings, server=server)
            assert signals.armed("s")[0] == 1
            assert pg.wait_gone(victim.info.backend_pid, timeout=10)
        finally:
            scheduler.shutdown(wait=True)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"server": "s", **labels})

    firings = sample("pg_reaper_armed_firings_total")
    assert firings is not None
    assert firings >= 2  # not_due at least once, then signalled
    assert sample("pg_reaper_sessions_reaped_total", policy="kill", action="terminate") == 1
    assert signals.armed("s") == (0, None)
    assert polls == []  # never left to a poll: re-armed until due


def test_a_server_removed_while_its_cycle_runs_arms_nothing(
    pg: TestServer, sessions: Sessions
) -> None:
    """A reload that removes a server during its cycle: the cycle's end must not arm a timer
    that would signal on a server no longer configured."""
    victim = sessions.idle(application="arm-removed")
    settings = _settings(pg, [_kill("arm-removed")])
    metrics = Metrics()
    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.start()
    signals = ArmedSignals(
        scheduler, metrics=metrics, audit=None, notifications=None, poll_within=lambda *_: None
    )
    try:
        with connect(settings.servers[0], settings) as conn:
            server, report = _poll(conn, settings)
            worker = _Worker(
                name="s",
                settings=settings,
                conn=conn,
                leadership=LeaderState(server="s", metrics=metrics, log=get_logger()),
            )
            # The cycle of a server still configured arms it (so the test can fail)...
            signals.arm(worker, report, settings=settings, server=server)
            assert signals.armed("s")[0] == 1
            signals.cancel("s")  # well before its 2 s
            # ... and of a server removed meanwhile, nothing.
            worker.removed = True
            signals.arm(worker, report, settings=settings, server=server)
            assert signals.armed("s") == (0, None)
            # Had it armed, the timer would have fired 2 s after the session went idle.
            time.sleep(2.5)
            assert usable(victim), "a removed server's cycle armed a signal"
    finally:
        scheduler.shutdown(wait=True)
