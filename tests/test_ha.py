"""High availability (docs/ha.md): several real daemons share real servers through an advisory
lock on each; exactly one signals per server, and leadership moves when its holder goes.
Cancel-then-terminate (escalate_after) on a real query that ignores its cancel."""

from __future__ import annotations

import contextlib
import textwrap
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from reaper.daemon.ha import CycleLock
from reaper.demo.embedded import EmbeddedPostgres
from reaper.demo.programs import free_port
from reaper.pg.activity import ServerConnection
from reaper.pg.connection import PostgresError
from reaper.pg.ha import LockHolder, lead, lock_key_halves
from reaper.policy import Result
from reaper.settings import DEFAULT_LOCK_KEY, Settings
from reaper.sweep import connect, sweep
from tests.servers import ADMIN_APPLICATION, wait_for
from tests.test_daemon import RunningDaemon, daemon_config, start_daemon

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

pytestmark = pytest.mark.integration

__all__ = ["start_daemon"]  # the fixture, shared with test_daemon.py

INTERVAL = 2.0  # [reaper] interval of every daemon here, in seconds
REAPER = "pg-reaper"
SQUATTER = "squatter"  # a role of its own, not the reaper's, that takes pg-reaper's lock


# --- servers and sessions -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(pg_major: int) -> Iterator[list[EmbeddedPostgres]]:
    """Six throwaway servers of their own: a daemon here may reap any idle session on them."""
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                EmbeddedPostgres(
                    major=pg_major,
                    settings={
                        "max_connections": "40",
                        "shared_buffers": "16MB",
                        "max_prepared_transactions": "2",  # a lock that outlives its session
                    },
                )
            )
            for _ in range(6)
        ]
        yield servers


def admin(server: EmbeddedPostgres, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(
        server.dsn(), autocommit=True, application_name=ADMIN_APPLICATION, connect_timeout=5
    ) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def lock_holders(server: EmbeddedPostgres) -> list[tuple[int, str]]:
    """(pid, application_name) of every backend holding pg-reaper's advisory lock."""
    classid, objid = lock_key_halves(DEFAULT_LOCK_KEY)
    return [
        (pid, app)
        for pid, app in admin(
            server,
            "SELECT l.pid, a.application_name FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::int8::oid "
            "AND l.objid = %s::int8::oid AND l.objsubid = 1",
            [classid, objid],
        )
    ]


def reaper_pids(server: EmbeddedPostgres) -> set[int]:
    rows = admin(server, "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [REAPER])
    return {row[0] for row in rows}


def is_alive(server: EmbeddedPostgres, pid: int) -> bool:
    return bool(admin(server, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]))


class Clients:
    """Client sessions on the fleet, closed at the end of the test."""

    def __init__(self) -> None:
        self.conns: list[psycopg.Connection[Any]] = []
        self.threads: list[threading.Thread] = []

    def idle(self, server: EmbeddedPostgres, application: str) -> int:
        conn = psycopg.connect(server.dsn(), autocommit=True, application_name=application)
        conn.execute("SELECT 1")
        self.conns.append(conn)
        return int(conn.info.backend_pid)

    def running(
        self, server: EmbeddedPostgres, application: str, query: str, *, user: str | None = None
    ) -> int:
        """A session running `query` in a thread until it ends or is killed."""
        conn = psycopg.connect(server.dsn(user=user), autocommit=True, application_name=application)
        self.conns.append(conn)
        pid = int(conn.info.backend_pid)

        def run() -> None:
            with contextlib.suppress(psycopg.Error):
                conn.execute(query)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)
        wait_for(
            lambda: bool(
                admin(
                    server,
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'",
                    [pid],
                )
            ),
            timeout=10,
            what=f"pid {pid} active",
        )
        return pid

    def close(self, servers: Sequence[EmbeddedPostgres]) -> None:
        pids = [c.info.backend_pid for c in self.conns if not c.closed]
        for server in servers:
            with contextlib.suppress(psycopg.Error):
                admin(server, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", [pids])
        for thread in self.threads:
            thread.join(timeout=10)
        for conn in self.conns:
            conn.close()


def squat(
    clients: Clients,
    server: EmbeddedPostgres,
    *,
    application: str,
    role: str = SQUATTER,
    shared: bool = False,
) -> psycopg.Connection[Any]:
    """A plain session of `role` in the lock database that takes pg-reaper's lock and keeps it."""
    admin(
        server,
        f"DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    conn = psycopg.connect(
        server.dsn(user=role), autocommit=True, application_name=application, connect_timeout=5
    )
    clients.conns.append(conn)
    take = "pg_advisory_lock_shared" if shared else "pg_advisory_lock"
    conn.execute(f"SELECT {take}(%s)", [DEFAULT_LOCK_KEY])
    return conn


def release(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_advisory_unlock_all()")


@pytest.fixture
def clients(fleet: list[EmbeddedPostgres]) -> Iterator[Clients]:
    opened = Clients()
    yield opened
    opened.close(fleet)


# --- daemons --------------------------------------------------------------------------------------

IDLE_POLICY = """
[[policies]]
name = "idle"
states = ["idle"]
max_idle = "1s"
"""


def ha_config(
    path: Path,
    servers: Sequence[EmbeddedPostgres],
    *,
    instance: str,
    port: int,
    policies: str = IDLE_POLICY,
) -> Path:
    """A daemon of the fleet with [ha] on. Its idle policy matches every idle session but the
    test's own (protected): pg-reaper's sessions are spared by pg-reaper itself, or not at all."""
    ha = textwrap.dedent(
        f"""
        [ha]
        enabled = true
        instance_id = "{instance}"
        """
    )
    return daemon_config(
        path,
        servers={f"s{i}": server.dsn() for i, server in enumerate(servers)},
        policies=ha + policies,
        port=port,
        interval=f"{INTERVAL:g}s",
    )


def start_ha(
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    servers: Sequence[EmbeddedPostgres],
    instances: Sequence[str],
) -> list[RunningDaemon]:
    """One daemon per instance id, each on every one of `servers`, all ready."""
    daemons = []
    for name in instances:
        port = free_port()
        config = ha_config(tmp_path / f"{name}.toml", servers, instance=name, port=port)
        daemons.append(start_daemon(config, port=port))
    for daemon in daemons:
        daemon.wait_ready()
    return daemons


def leaders(daemons: Sequence[RunningDaemon], server: str) -> list[RunningDaemon]:
    return [d for d in daemons if d.value("pg_reaper_leader", server=server) == 1]


def wait_one_leader(
    daemons: Sequence[RunningDaemon], server: str, *, timeout: float = 15.0
) -> RunningDaemon:
    seen: list[RunningDaemon] = []

    def one() -> bool:
        # The leader as found by the look that saw only one: read again, a handover under way
        # (the first instance to start may take a server, then hand it over) could show none.
        seen[:] = leaders(daemons, server)
        return len(seen) == 1 and all(
            d.value("pg_reaper_leader", server=server) is not None for d in daemons
        )

    daemons[0].wait_until(one, timeout=timeout, what=f"one leader of {server}")
    (leader,) = seen
    return leader


def wait_settled(daemons: Sequence[RunningDaemon], server: str) -> RunningDaemon:
    """The leader of `server` once the instances have settled who leads it: the first one to
    start may take it, and hand it over within an interval to the one that should lead it."""
    wait_one_leader(daemons, server)
    time.sleep(2 * INTERVAL)
    return wait_one_leader(daemons, server)


def reaped(daemon: RunningDaemon, server: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events("session_reaped", server=server) if not e["dry_run"]]


# --- the tests ------------------------------------------------------------------------------------


def test_two_daemons_on_two_servers_signal_every_eligible_session_exactly_once(
    fleet: list[EmbeddedPostgres],
    clients: Clients,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    servers = fleet[:2]
    daemons = start_ha(start_daemon, tmp_path, servers, ["d1", "d2"])
    instance_of = {id(d): name for d, name in zip(daemons, ["d1", "d2"], strict=True)}
    # Balanced: each daemon leads one of the two servers (the first to start may take both,
    # then hands one over to the second).
    daemons[0].wait_until(
        lambda: (
            sorted(len(leaders(daemons, f"s{i}")) for i in range(2)) == [1, 1]
            and leaders(daemons, "s0") != leaders(daemons, "s1")
        ),
        timeout=15,
        what="one server each",
    )
    leader_of = {f"s{i}": wait_one_leader(daemons, f"s{i}") for i in range(2)}

    victims = {
        (f"s{i}", clients.idle(server, f"ha-victim-{i}-{n}"))
        for i, server in enumerate(servers)
        for n in range(3)
    }
    for name, pid in victims:
        wait_for(
            lambda s=servers[int(name[1:])], p=pid: not is_alive(s, p),  # type: ignore[misc]
            timeout=10,
            what=f"{name} pid {pid} reaped",
        )

    events = [e for d in daemons for i in range(2) for e in reaped(d, f"s{i}")]
    assert sorted((e["server"], e["pid"]) for e in events) == sorted(victims), "exactly once"
    for name, leader in leader_of.items():
        instances = {e["instance"] for d in daemons for e in reaped(d, name)}
        assert instances == {instance_of[id(leader)]}, f"{name} audited by {instances}"
        follower = next(d for d in daemons if d is not leader)
        assert reaped(follower, name) == []
        assert follower.value("pg_reaper_leader", server=name) == 0
        labels = {"server": name, "policy": "idle", "action": "terminate"}
        assert follower.value("pg_reaper_sessions_reaped_total", **labels) == 0
        assert leader.value("pg_reaper_sessions_reaped_total", **labels) == 3
        # Followers log their state once, not every cycle: standing by from the start, or
        # since they handed the server over to the instance that should lead it.
        standby = follower.events("leadership_standby", server=name)
        handed = follower.events("leadership_handed_over", server=name)
        assert len(standby) + len(handed) == 1
        assert len(follower.events("leadership_acquired", server=name)) == len(handed)
        assert follower.events("leadership_lost") == []
        # The leader is another pg-reaper instance, not a squatter.
        for daemon in daemons:
            assert daemon.value("pg_reaper_lock_held_by_other", server=name) == 0
            assert daemon.events("lock_held_by_other") == []
    for server in servers:
        # One lock per server, held by a pg-reaper session; every pg-reaper session (two per
        # server: leader and follower) survived an idle policy that matches any idle session.
        ((_, application),) = lock_holders(server)
        assert application == REAPER
        assert len(reaper_pids(server)) == 2
    for daemon in daemons:
        assert not [e for e in daemon.events("session_reaped") if e["application"] == REAPER]


def test_sigkill_of_the_leader_hands_the_server_over_within_two_intervals(
    fleet: list[EmbeddedPostgres],
    clients: Clients,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    server = fleet[2]
    daemons = start_ha(start_daemon, tmp_path, [server], ["k1", "k2"])
    leader = wait_settled(daemons, "s0")
    (survivor,) = [d for d in daemons if d is not leader]

    leader.process.kill()  # SIGKILL: no chance to let go of anything
    killed = time.monotonic()
    survivor.wait_value("pg_reaper_leader", lambda v: v == 1, timeout=4 * INTERVAL, server="s0")
    handed_over = time.monotonic() - killed
    assert handed_over <= 2 * INTERVAL, f"handed over after {handed_over:.2f}s"
    survivor.wait_event("leadership_acquired", server="s0", instance=instance_id(survivor))

    pid = clients.idle(server, "ha-after-kill")
    survivor.wait_until(
        lambda: any(e["pid"] == pid for e in reaped(survivor, "s0")),
        timeout=10,
        what="the survivor reaps",
    )
    assert not is_alive(server, pid)


def instance_id(daemon: RunningDaemon) -> str:
    (started,) = daemon.events("ha_enabled")
    return str(started["instance"])


def test_a_dba_terminating_the_leaders_session_moves_leadership_for_good(
    fleet: list[EmbeddedPostgres],
    clients: Clients,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    server = fleet[3]
    daemons = start_ha(start_daemon, tmp_path, [server], ["t1", "t2"])
    old = wait_settled(daemons, "s0")
    (new,) = [d for d in daemons if d is not old]
    ((holder, _),) = lock_holders(server)

    admin(server, "SELECT pg_terminate_backend(%s)", [holder])

    new.wait_value("pg_reaper_leader", lambda v: v == 1, timeout=4 * INTERVAL, server="s0")
    old.wait_event("leadership_lost", server="s0")
    assert old.value("pg_reaper_leader", server="s0") == 0
    before = len(reaped(old, "s0"))
    # Sessions that become eligible over the next few intervals, past the old leader's
    # hold-off (2 intervals): all of them reaped by the new leader, none by the old.
    pids = []
    for n in range(3):
        pids.append(clients.idle(server, f"ha-after-terminate-{n}"))
        time.sleep(INTERVAL)
    for pid in pids:
        wait_for(
            lambda p=pid: not is_alive(server, p),  # type: ignore[misc]
            timeout=10,
            what=f"{pid} reaped",
        )
    assert sorted(e["pid"] for e in reaped(new, "s0") if e["pid"] in pids) == sorted(pids)
    assert len(reaped(old, "s0")) == before == 0
    assert old.value("pg_reaper_leader", server="s0") == 0
    ((holder_now, _),) = lock_holders(server)
    assert holder_now != holder
    assert len(old.events("leadership_lost", server="s0")) == 1


def test_three_daemons_and_six_servers_each_server_has_exactly_one_leader(
    fleet: list[EmbeddedPostgres],
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    daemons = start_ha(start_daemon, tmp_path, fleet, ["m1", "m2", "m3"])
    names = [f"s{i}" for i in range(len(fleet))]
    for name in names:
        wait_one_leader(daemons, name)
    time.sleep(2 * INTERVAL)  # and it stays so, cycle after cycle
    for name, server in zip(names, fleet, strict=True):
        assert len(leaders(daemons, name)) == 1, name
        ((_, application),) = lock_holders(server)
        assert application == REAPER
        assert len(reaper_pids(server)) == 3
    for daemon in daemons:
        acquired = daemon.events("leadership_acquired")
        assert len(acquired) == len({e["server"] for e in acquired}), "no flapping"
        assert daemon.events("leadership_lost") == []


def test_a_squatter_on_the_lock_is_reported_once_and_reaping_resumes_when_it_lets_go(
    fleet: list[EmbeddedPostgres],
    clients: Clients,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    server = fleet[3]
    squatter = squat(clients, server, application="squatter")
    victim = clients.idle(server, "ha-squatted")
    (daemon,) = start_ha(start_daemon, tmp_path, [server], ["q1"])

    event = daemon.wait_event("lock_held_by_other", server="s0", timeout=4 * INTERVAL)
    assert event["level"] == "warning"
    assert event["holder_pid"] == squatter.info.backend_pid
    assert (event["application"], event["role"]) == ("squatter", SQUATTER)
    assert event["instance"] == "q1"
    # A follower's cycle is a probe of the lock: counted, not logged.
    probes = daemon.value("pg_reaper_ha_probes_total", server="s0") or 0
    daemon.wait_until(
        lambda: (daemon.value("pg_reaper_ha_probes_total", server="s0") or 0) >= probes + 3,
        timeout=5 * INTERVAL,
        what="three more cycles",
    )
    assert daemon.events("poll_completed", server="s0") == []
    assert len(daemon.events("lock_held_by_other")) == 1, "once per change, not per cycle"
    assert daemon.value("pg_reaper_lock_held_by_other", server="s0") == 1
    assert daemon.value("pg_reaper_leader", server="s0") == 0
    assert is_alive(server, victim)  # idle far past max_idle, but nobody may reap
    assert reaped(daemon, "s0") == []

    release(squatter)
    daemon.wait_value("pg_reaper_leader", lambda v: v == 1, timeout=4 * INTERVAL, server="s0")
    assert daemon.value("pg_reaper_lock_held_by_other", server="s0") == 0
    ended = daemon.wait_event("lock_held_by_other_ended", server="s0")
    assert ended["holder_pid"] == squatter.info.backend_pid
    wait_for(lambda: not is_alive(server, victim), timeout=10, what="victim reaped")
    assert victim in {e["pid"] for e in reaped(daemon, "s0")}

    # An impostor of the reaper (its application_name, another role) waits for the lock, and
    # gets it when a DBA terminates the leader's session: reported, as a squatter.
    impostor = clients.running(
        server, REAPER, f"SELECT pg_advisory_lock({DEFAULT_LOCK_KEY})", user=SQUATTER
    )
    ((holder, _),) = lock_holders(server)
    admin(server, "SELECT pg_terminate_backend(%s)", [holder])
    event = daemon.wait_event(
        "lock_held_by_other", server="s0", holder_pid=impostor, timeout=4 * INTERVAL
    )
    assert (event["application"], event["role"]) == (REAPER, SQUATTER)
    assert daemon.value("pg_reaper_lock_held_by_other", server="s0") == 1
    assert daemon.value("pg_reaper_leader", server="s0") == 0
    assert len(daemon.events("lock_held_by_other")) == 2


# --- cancel-then-terminate ------------------------------------------------------------------------

# A runaway query that a cancel does not stop: it catches query_canceled and goes on.
STUBBORN = """
DO $$
BEGIN
    LOOP
        BEGIN
            PERFORM pg_sleep(60);
        EXCEPTION WHEN query_canceled THEN
            NULL;
        END;
    END LOOP;
END
$$
"""

ESCALATE_POLICY = """
[[policies]]
name = "runaway"
states = ["active"]
max_runtime = "5s"
applications = ["^esc-"]
action = "cancel"
escalate_after = "2s"
"""


@pytest.mark.parametrize("ha", [True, False], ids=["ha", "single"])
def test_a_query_that_survives_its_cancel_is_terminated_escalate_after_later(
    fleet: list[EmbeddedPostgres],
    clients: Clients,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    ha: bool,  # noqa: FBT001 - a parameter
) -> None:
    server = fleet[4]
    stubborn = clients.running(server, "esc-stubborn", STUBBORN)
    polite = clients.running(server, "esc-polite", "SELECT pg_sleep(60)")
    port = free_port()
    config = daemon_config(
        tmp_path / "config.toml",
        servers={"s0": server.dsn()},
        policies=("[ha]\nenabled = true\n" if ha else "") + ESCALATE_POLICY,
        port=port,
        interval="30s",
    )
    daemon = start_daemon(config, port=port)

    cancel = daemon.wait_event("session_reaped", pid=stubborn, action="cancel", timeout=15)
    cancelled_at = time.monotonic()
    assert cancel["result"] == "cancelled"
    assert "escalated" not in cancel
    terminate = daemon.wait_event("session_reaped", pid=stubborn, action="terminate", timeout=10)
    waited = time.monotonic() - cancelled_at
    assert terminate["result"] == "terminated"
    assert terminate["escalated"] is True
    assert terminate["policy"] == "runaway"
    assert terminate["backend_start"] == cancel["backend_start"]
    # About escalate_after (2 s) after the cancel: the next poll is due then, not at the 30 s
    # interval nor at the policy's 5 s threshold.
    assert 1.5 <= waited <= 4.0, f"escalated {waited:.2f}s after the cancel"
    wait_for(lambda: not is_alive(server, stubborn), timeout=5, what="stubborn gone")
    # One cancel, not one per cycle while the escalation was pending.
    assert len(daemon.events("session_reaped", pid=stubborn, action="cancel")) == 1

    # The query that obeyed its cancel: cancelled once, its session left alone.
    polite_events = daemon.events("session_reaped", pid=polite)
    assert [(e["action"], e["result"]) for e in polite_events] == [("cancel", "cancelled")]
    assert is_alive(server, polite)
    labels = {"server": "s0", "policy": "runaway"}
    assert daemon.value("pg_reaper_sessions_reaped_total", action="cancel", **labels) == 2
    assert daemon.value("pg_reaper_sessions_reaped_total", action="terminate", **labels) == 1
    for event in daemon.events("session_reaped"):
        assert event["instance"]


# --- the lock, statement by statement -------------------------------------------------------------


def _connection(
    server: EmbeddedPostgres, *, dbname: str | None = None, tcp: bool = False, ha: bool = False
) -> ServerConnection:
    return ServerConnection(
        dsn=server.dsn(tcp=tcp),
        connect_timeout=timedelta(seconds=5),
        statement_timeout=timedelta(seconds=10),
        dbname=dbname,
        ha=ha,
    )


def test_a_leader_whose_session_was_lost_and_reopened_signals_nothing(
    fleet: list[EmbeddedPostgres], clients: Clients
) -> None:
    server = fleet[5]
    victim = clients.idle(server, "ha-guard")
    with _connection(server) as conn:
        assert lead(conn, DEFAULT_LOCK_KEY, acquire=True).leader
        (session,) = [s for s in conn.poll().sessions if s.pid == victim]
        (holder,) = lock_holders(server)
        admin(server, "SELECT pg_terminate_backend(%s, 5000)", [holder[0]])

        # The first statement finds the session gone; the next one reconnects on its own: a
        # new session, which holds no lock.
        with pytest.raises(PostgresError):
            conn.signal([session], action="terminate", lock_key=DEFAULT_LOCK_KEY)
        results = conn.signal([session], action="terminate", lock_key=DEFAULT_LOCK_KEY)

        assert results == {victim: (Result.NOT_LEADER, None)}
        assert is_alive(server, victim)
        assert lock_holders(server) == []
        # Without [ha] the same statement signals.
        assert conn.signal([session], action="terminate") == {victim: (Result.TERMINATED, None)}
    wait_for(lambda: not is_alive(server, victim), timeout=5, what="victim gone")


def test_the_lock_is_taken_once_per_session_checked_in_pg_locks_and_per_database(
    fleet: list[EmbeddedPostgres],
) -> None:
    server = fleet[5]
    admin(server, "DROP DATABASE IF EXISTS otherdb")
    admin(server, "CREATE DATABASE otherdb")
    with (
        _connection(server) as first,
        _connection(server) as second,
        _connection(server, dbname="otherdb") as elsewhere,
    ):
        assert lead(first, DEFAULT_LOCK_KEY, acquire=False).leader is False
        taken = lead(first, DEFAULT_LOCK_KEY, acquire=True)
        assert taken.leader
        assert lead(first, DEFAULT_LOCK_KEY, acquire=True).leader  # held: not taken twice
        other = lead(second, DEFAULT_LOCK_KEY, acquire=True)
        assert other.leader is False
        assert other.holder == taken.holder == first.facts().own_pid
        # Advisory locks are per database: the reason for [ha] lock_database.
        assert lead(elsewhere, DEFAULT_LOCK_KEY, acquire=True).leader
        counts = admin(
            server,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s",
            [taken.holder],
        )
        assert counts == [(1,)]
        # Another key is another lock.
        assert lead(second, DEFAULT_LOCK_KEY + 1, acquire=True).leader


def test_a_leader_whose_session_was_reopened_between_cycles_leaves_the_lock_that_cycle(
    fleet: list[EmbeddedPostgres], clients: Clients
) -> None:
    server = fleet[5]
    settings = Settings(
        servers=[{"name": "s0", "dsn": server.dsn()}],
        policies=[
            {"name": "idle", "states": ["idle"], "max_idle": "1s", "applications": ["^ha-re"]}
        ],
        ha={"enabled": True},
    )
    (config,) = settings.servers
    victim = clients.idle(server, "ha-reopened")
    time.sleep(1.2)
    with connect(config, settings, ha=True) as conn:
        first = sweep(
            conn,
            server=config,
            settings=settings,
            mode="preview",
            lock=CycleLock(key=DEFAULT_LOCK_KEY, acquire=True),
        )
        assert first.leader
        assert [o.result for o in first.outcomes] == [Result.DRY_RUN]
        ((holder, _),) = lock_holders(server)
        admin(server, "SELECT pg_terminate_backend(%s, 5000)", [holder])
        with pytest.raises(PostgresError):  # a failed statement: the next one reconnects
            lead(conn, DEFAULT_LOCK_KEY, acquire=False)

        lock = CycleLock(key=DEFAULT_LOCK_KEY, acquire=True, held_by=first.session)
        second = sweep(conn, server=config, settings=settings, mode="preview", lock=lock)

        assert second.ok
        assert second.session == first.session + 1
        assert not second.leader
        assert second.outcomes == ()  # a follower's cycle is the lock probe only: no poll
        assert second.sessions == ()
        assert second.probe_only
        assert lock_holders(server) == []
        # The cycle after, as any follower, it may take the lock again.
        lock = CycleLock(key=DEFAULT_LOCK_KEY, acquire=True)
        assert sweep(conn, server=config, settings=settings, mode="preview", lock=lock).leader
    assert is_alive(server, victim)


def test_the_ha_session_has_the_server_probe_its_tcp_connection(
    fleet: list[EmbeddedPostgres],
) -> None:
    """A leader whose host vanished frees the lock within about 25 s, not the OS's 2 hours."""
    server = fleet[5]
    query = (
        "SELECT name, setting FROM pg_settings WHERE name IN ('tcp_keepalives_idle', "
        "'tcp_keepalives_interval', 'tcp_keepalives_count', 'tcp_user_timeout') ORDER BY name"
    )
    with _connection(server, tcp=True, ha=True) as conn:
        settings = {row["name"]: row["setting"] for row in conn.run(query)}
    assert settings == {
        "tcp_keepalives_count": "3",
        "tcp_keepalives_idle": "10",
        "tcp_keepalives_interval": "5",
        "tcp_user_timeout": "30000",
    }
    with _connection(server, tcp=True) as conn:
        plain = {row["name"]: row["setting"] for row in conn.run(query)}
    assert plain["tcp_keepalives_idle"] != "10"  # without [ha]: the server's own


def test_the_locks_holder_is_a_pg_reaper_instance_only_with_its_application_and_its_role(
    fleet: list[EmbeddedPostgres], clients: Clients
) -> None:
    server = fleet[5]
    with _connection(server) as conn:
        # Another instance: pg-reaper's application_name and the reaper's role.
        with _connection(server) as instance:
            assert lead(instance, DEFAULT_LOCK_KEY, acquire=True).leader
            seen = lead(conn, DEFAULT_LOCK_KEY, acquire=True)
            assert (seen.leader, seen.holder, seen.other) == (
                False,
                instance.facts().own_pid,
                None,
            )
        wait_for(lambda: lock_holders(server) == [], timeout=5, what="the instance's lock freed")

        for application, shared in [("squatter", False), (REAPER, False), ("reader", True)]:
            squatter = squat(clients, server, application=application, shared=shared)
            seen = lead(conn, DEFAULT_LOCK_KEY, acquire=True)
            assert not seen.leader, application
            assert seen.holder == squatter.info.backend_pid
            assert seen.other == LockHolder(
                pid=squatter.info.backend_pid, application=application, role=SQUATTER
            )
            release(squatter)

        # A prepared transaction holds its locks with no backend at all, across restarts.
        with psycopg.connect(server.dsn(user=SQUATTER), application_name="prepared") as prepared:
            prepared.execute("SELECT pg_advisory_xact_lock(%s)", [DEFAULT_LOCK_KEY])
            prepared.execute("PREPARE TRANSACTION 'squat'")
        try:
            seen = lead(conn, DEFAULT_LOCK_KEY, acquire=True)
        finally:
            admin(server, "ROLLBACK PREPARED 'squat'")
        assert (seen.leader, seen.holder) == (False, None)
        assert seen.other == LockHolder(pid=None, application=None, role=None)

        seen = lead(conn, DEFAULT_LOCK_KEY, acquire=True)
        assert (seen.leader, seen.other) == (True, None)


def test_a_lock_database_closed_to_public_keeps_other_roles_off_the_lock(
    fleet: list[EmbeddedPostgres], clients: Clients
) -> None:
    """docs/ha.md, "Lock squatting": what the operator must do, as written there."""
    server = fleet[5]
    squat(clients, server, application="squatter")  # the role exists; the lock in `postgres`
    admin(server, "DROP DATABASE IF EXISTS pg_reaper_lock")
    admin(server, "CREATE DATABASE pg_reaper_lock")
    admin(server, "REVOKE ALL ON DATABASE pg_reaper_lock FROM PUBLIC")
    admin(server, "GRANT CONNECT ON DATABASE pg_reaper_lock TO CURRENT_USER")  # the reaper's role

    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(server.dsn(user=SQUATTER, dbname="pg_reaper_lock"), connect_timeout=5)
    with _connection(server, dbname="pg_reaper_lock") as conn:
        seen = lead(conn, DEFAULT_LOCK_KEY, acquire=True)
    assert (seen.leader, seen.other) == (True, None)  # the squatter's lock is another database's
