"""`pg-reaper once` against real servers: who is reaped, who is spared, seen by the server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest

from reaper.cli import main
from tests.servers import Sessions, TestServer, usable, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.integration

IDLE_POLICY = """
[[policies]]
name = "idle"
max_idle = "1s"
"""


def run_once(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> tuple[int, Any]:
    code = main(["once", "-c", str(config), "--json", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out)


def decisions(document: Any) -> dict[int, dict[str, Any]]:
    return {d["pid"]: d for server in document["servers"] for d in server["decisions"]}


def test_idle_sessions_past_max_idle_are_terminated_in_every_idle_state(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    never_ran = sessions.open(application="never-ran-a-statement")
    idle = sessions.idle(application="idle")
    in_tx = sessions.idle_in_transaction(application="in-tx")
    aborted = sessions.idle_in_aborted_transaction(application="aborted")
    other_db = sessions.idle(application="other-db", dbname="otherdb")
    victims = [never_ran, idle, in_tx, aborted, other_db]
    pids = {c.info.backend_pid for c in victims}
    assert pg.state_of(aborted.info.backend_pid) == "idle in transaction (aborted)"
    time.sleep(1.3)

    code, document = run_once(capsys, write_config(IDLE_POLICY))

    assert code == 0
    reaped = decisions(document)
    assert pids <= set(reaped)
    for pid in pids:
        assert reaped[pid]["result"] == "terminated"
        assert reaped[pid]["policy"] == "idle"
        assert pg.wait_gone(pid), f"pid {pid} still on the server"
    assert reaped[other_db.info.backend_pid]["database"] == "otherdb"
    assert not usable(idle)


def test_active_and_recently_idle_sessions_are_spared(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    active = sessions.active(application="busy")
    # Its last query started 2.5 s ago but it has been idle only since it ended: the widely
    # copied scripts measure from query_start and would kill it.
    finished_long_query = sessions.open(application="long-query")
    finished_long_query.execute("SELECT pg_sleep(2.5)")
    config = write_config(
        """
        [[policies]]
        name = "idle"
        max_idle = "2s"
        """
    )

    code, document = run_once(capsys, config)

    assert code == 0
    assert active.info.backend_pid not in decisions(document)
    assert finished_long_query.info.backend_pid not in decisions(document)
    assert pg.state_of(active.info.backend_pid) == "active"
    assert usable(finished_long_query)


def test_protected_users_applications_and_pg_reaper_sessions_are_spared(
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    keeper = sessions.idle(application="app", user="keeper", password="keeper", tcp=True)
    psql = sessions.idle(application="psql")
    other_reaper = sessions.idle(application="pg-reaper")
    plain = sessions.idle(application="plain")
    time.sleep(1.3)
    config = write_config(
        IDLE_POLICY,
        reaper='protect_users = ["keeper"]\nmax_terminations_per_cycle = 50',
    )
    config.write_text(
        config.read_text().replace(
            'protect_applications = ["^pytest-admin$"]',
            'protect_applications = ["^pytest-admin$", "^psql$"]',
        )
    )

    code, document = run_once(capsys, config)

    assert code == 0
    reaped = decisions(document)
    assert reaped[plain.info.backend_pid]["result"] == "terminated"
    for spared in (keeper, psql, other_reaper):
        assert spared.info.backend_pid not in reaped
        assert usable(spared)


def test_disabled_rows_are_spared_unless_a_policy_lists_disabled(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    hidden = sessions.open(application="untracked")
    hidden.execute("SET track_activities = off")
    hidden.execute("SELECT 1")
    pg.wait_state(hidden.info.backend_pid, "disabled")
    time.sleep(1.3)

    code, document = run_once(capsys, write_config(IDLE_POLICY))
    assert code == 0
    assert hidden.info.backend_pid not in decisions(document)
    assert usable(hidden)

    listing_disabled = """
        [[policies]]
        name = "untracked"
        states = ["disabled"]
        max_connection_age = "1s"
        """
    code, document = run_once(capsys, write_config(listing_disabled))
    assert code == 0
    assert decisions(document)[hidden.info.backend_pid]["policy"] == "untracked"
    assert pg.wait_gone(hidden.info.backend_pid)


def test_walsender_idle_between_replication_commands_is_never_touched(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    walsender = sessions.open(application="replica", extra="replication=database")
    walsender.execute("IDENTIFY_SYSTEM")
    pid = walsender.info.backend_pid
    rows = pg.execute("SELECT backend_type, state FROM pg_stat_activity WHERE pid = %s", [pid])
    assert rows == [("walsender", "idle")]
    time.sleep(1.3)

    code, document = run_once(capsys, write_config(IDLE_POLICY))

    assert code == 0
    assert pid not in decisions(document)
    assert pg.is_alive(pid)


def test_dry_run_reports_but_signals_nothing(
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    idle = sessions.idle(application="idle")
    time.sleep(1.3)

    code, document = run_once(capsys, write_config(IDLE_POLICY), "--dry-run")

    assert code == 0
    decision = decisions(document)[idle.info.backend_pid]
    assert decision["result"] == "dry_run"
    assert document["servers"][0]["dry_run"] is True
    assert usable(idle)


def test_cap_defers_the_youngest_victims_to_the_next_cycle(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    oldest = sessions.idle(application="first")
    time.sleep(0.3)
    younger = [sessions.idle(application=f"later-{i}") for i in range(3)]
    time.sleep(1.3)

    config = write_config(IDLE_POLICY, reaper="max_terminations_per_cycle = 2")
    code, document = run_once(capsys, config)

    assert code == 0
    reaped = decisions(document)
    results = {pid: d["result"] for pid, d in reaped.items()}
    assert results[oldest.info.backend_pid] == "terminated"
    assert pg.wait_gone(oldest.info.backend_pid)
    assert sorted(results[c.info.backend_pid] for c in younger).count("terminated") == 1
    assert sorted(results[c.info.backend_pid] for c in younger).count("deferred") == 2
    assert list(results.values()).count("terminated") == 2
    survivors = [c for c in younger if results[c.info.backend_pid] == "deferred"]
    assert len(survivors) == 2
    assert all(usable(c) for c in survivors)


def test_least_privilege_role_reaps_all_but_a_superuser_session(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    superuser_idle = sessions.idle(application="dba")
    user_idle = [sessions.idle(application="app", user="appuser", password="appuser", tcp=True)]
    user_idle.append(sessions.idle_in_transaction(application="app2"))  # also a superuser's
    time.sleep(1.3)
    config = write_config(IDLE_POLICY, dsn=pg.dsn(user="reaper_lp", password="reaper_lp"))

    code, document = run_once(capsys, config)

    assert code == 1  # a signal failed: the superuser's sessions cannot be signalled
    reaped = decisions(document)
    assert reaped[superuser_idle.info.backend_pid]["result"] == "denied"
    assert reaped[user_idle[0].info.backend_pid]["result"] == "terminated"
    assert reaped[user_idle[1].info.backend_pid]["result"] == "denied"
    assert pg.wait_gone(user_idle[0].info.backend_pid)
    assert usable(superuser_idle)
    assert document["servers"][0]["warnings"] == []


def test_a_predicted_denied_does_not_fail_preview_or_a_dry_run(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A dry run sends no signal, so none can fail: a superuser's session is shown `denied`
    (what the real run would get) and the command still exits 0 (docs/once.md)."""
    superuser_idle = sessions.idle(application="dba")
    time.sleep(1.3)
    config = write_config(IDLE_POLICY, dsn=pg.dsn(user="reaper_lp", password="reaper_lp"))

    for command in (["once", "--dry-run"], ["preview"]):
        code = main([command[0], "-c", str(config), "--json", *command[1:]])
        document = json.loads(capsys.readouterr().out)

        assert code == 0, command
        assert document["ok"] is True
        assert decisions(document)[superuser_idle.info.backend_pid]["result"] == "denied"
    assert usable(superuser_idle)


def test_without_pg_read_all_stats_it_says_it_cannot_see_other_roles(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = sessions.idle(application="app", user="appuser", password="appuser", tcp=True)
    time.sleep(1.3)
    config = write_config(IDLE_POLICY, dsn=pg.dsn(user="reaper_blind", password="reaper_blind"))

    code = main(["once", "-c", str(config)])
    captured = capsys.readouterr()

    assert code == 0
    assert "lacks pg_read_all_stats" in captured.out
    hidden = re.search(r"other roles' sessions \((\d+) hidden now\)", captured.out)
    assert hidden is not None
    assert int(hidden[1]) >= 1  # appuser's session at least (and the suite's own admin's)
    assert "GRANT pg_read_all_stats TO reaper_blind" in captured.out
    assert "privileges_insufficient" in captured.err
    assert usable(other)


def test_unreachable_server_exits_1_and_the_other_servers_are_still_reaped(
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    idle = sessions.idle(application="idle")
    time.sleep(1.3)
    config = write_config(IDLE_POLICY)
    config.write_text(
        config.read_text().replace(
            "[[policies]]",
            '[[servers]]\nname = "dead"\ndsn = "host=127.0.0.1 port=1 connect_timeout=1"\n\n'
            "[[policies]]",
            1,
        )
    )

    code, document = run_once(capsys, config)

    assert code == 1
    by_name = {s["server"]: s for s in document["servers"]}
    assert by_name["dead"]["ok"] is False
    assert "cannot connect" in by_name["dead"]["error"]
    assert decisions(document)[idle.info.backend_pid]["result"] == "terminated"


def test_command_line_prints_a_table_and_audit_lines_on_stderr(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
) -> None:
    idle = sessions.idle(application="table-me")
    time.sleep(1.3)
    config = write_config(IDLE_POLICY)

    proc = subprocess.run(
        [sys.executable, "-m", "reaper", "once", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0].split()
    assert header[:5] == ["SERVER", "PID", "USER", "DATABASE", "APPLICATION"]
    row = next(line for line in proc.stdout.splitlines() if str(idle.info.backend_pid) in line)
    assert "table-me" in row
    assert "terminated" in row
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    reaped = next(e for e in events if e["event"] == "session_reaped")
    for key in (
        "server",
        "policy",
        "action",
        "dry_run",
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
    ):
        assert key in reaped, key
    assert "query" not in reaped
    completed = next(e for e in events if e["event"] == "poll_completed")
    assert completed["reaped"] >= 1
    wait_for(lambda: not pg.is_alive(idle.info.backend_pid), what="backend exit")


def test_password_file_is_used_and_never_printed(
    pg: TestServer,
    sessions: Sessions,
    tmp_path: Path,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    if pg.embedded is None:
        pytest.skip("needs a server that checks TCP passwords (the suite's own)")
    pg.execute("ALTER ROLE reaper_lp PASSWORD 'Sentinel-Pa55'")
    secret = tmp_path / "password"
    secret.write_text("Sentinel-Pa55\n")
    idle = sessions.idle(application="app", user="appuser", password="appuser", tcp=True)
    time.sleep(1.3)
    dsn = pg.dsn(user="reaper_lp", tcp=True)
    config = write_config(IDLE_POLICY, dsn=dsn, server_extra=f'password_file = "{secret}"')
    try:
        code = main(["once", "-c", str(config), "--json"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert decisions(json.loads(captured.out))[idle.info.backend_pid]["result"] == "terminated"
        assert "Sentinel-Pa55" not in captured.out + captured.err

        secret.write_text("wrong-password\n")
        code = main(["once", "-c", str(config), "--json"])
        captured = capsys.readouterr()
        assert code == 1
        assert "password authentication failed" in captured.out
        assert "wrong-password" not in captured.out + captured.err
    finally:
        pg.execute("ALTER ROLE reaper_lp PASSWORD 'reaper_lp'")


def test_client_addr_scopes_tcp_and_local_sessions(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    if not pg.has_socket:
        pytest.skip("needs Unix-socket sessions")
    over_tcp = sessions.idle(application="tcp", user="appuser", password="appuser", tcp=True)
    over_socket = sessions.idle(application="socket")
    time.sleep(1.3)
    config = write_config(
        """
        [[policies]]
        name = "loopback-only"
        max_idle = "1s"
        client_addrs = ["127.0.0.0/8"]
        """
    )

    code, document = run_once(capsys, config)

    assert code == 0
    reaped = decisions(document)
    assert reaped[over_tcp.info.backend_pid]["client_addr"] == "127.0.0.1"
    assert over_socket.info.backend_pid not in reaped
    assert usable(over_socket)
    time.sleep(1.3)  # it just ran a statement: idle again from now

    config = write_config(IDLE_POLICY.replace('"1s"', '"1s"\nclient_addrs = ["local"]'))
    code, document = run_once(capsys, config)
    assert decisions(document)[over_socket.info.backend_pid]["client_addr"] == "local"


def test_preview_lists_victims_oldest_first_and_signals_nothing(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = sessions.idle(application="first")
    time.sleep(0.2)
    second = sessions.idle_in_transaction(application="second")
    time.sleep(1.3)
    config = write_config(IDLE_POLICY)

    code = main(["preview", "-c", str(config), "--json", "--server", f"pg{pg.major}"])
    document = json.loads(capsys.readouterr().out)

    assert code == 0
    order = [d["pid"] for d in document["servers"][0]["decisions"]]
    assert order.index(first.info.backend_pid) < order.index(second.info.backend_pid)
    assert usable(first)
    assert pg.state_of(second.info.backend_pid) == "idle in transaction"

    assert main(["preview", "-c", str(config), "--server", "nope"]) == 2
    assert "not configured" in capsys.readouterr().err


def test_reaper_sets_its_own_session_up_defensively(pg: TestServer) -> None:
    from datetime import timedelta  # noqa: PLC0415

    from reaper.pg.activity import ServerConnection  # noqa: PLC0415

    pg.execute("ALTER ROLE reaper_lp SET idle_session_timeout = '1s'")
    try:
        with ServerConnection(
            dsn=pg.dsn(user="reaper_lp", password="reaper_lp") + " application_name=other",
            connect_timeout=timedelta(seconds=3),
            statement_timeout=timedelta(seconds=7),
        ) as conn:
            facts = conn.poll().facts
            time.sleep(1.5)  # longer than the role's idle_session_timeout
            rows = pg.execute(
                "SELECT application_name FROM pg_stat_activity WHERE pid = %s", [facts.own_pid]
            )
            assert rows == [("pg-reaper",)]
            again = conn.poll()
            assert again.facts.own_pid == facts.own_pid  # the same session survived
            assert facts.read_all_stats
            assert facts.signal_backend
            assert not facts.superuser
    finally:
        pg.execute("ALTER ROLE reaper_lp RESET idle_session_timeout")


def test_the_poll_of_a_role_without_pg_read_all_stats_and_its_ages_by_the_servers_clock(
    pg: TestServer, sessions: Sessions
) -> None:
    from datetime import timedelta  # noqa: PLC0415

    from reaper.pg.activity import ServerConnection  # noqa: PLC0415

    mine = sessions.idle(application="mine", user="reaper_blind", password="reaper_blind")
    other = sessions.idle(application="theirs", user="appuser", password="appuser")
    with ServerConnection(
        dsn=pg.dsn(user="reaper_blind", password="reaper_blind"),
        connect_timeout=timedelta(seconds=3),
        statement_timeout=timedelta(seconds=7),
    ) as conn:
        conn.connect()
        before = pg.execute("SELECT now()")[0][0]
        snapshot = conn.poll()
        after = pg.execute("SELECT now()")[0][0]
        with_query = conn.poll(include_query=True)
        on_server = pg.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        )[0][0]

    by_pid = {s.pid: s for s in snapshot.sessions}
    # Its own role's session: everything, with ages by the server's clock.
    own = by_pid[mine.info.backend_pid]
    assert (own.backend_type, own.state, own.user, own.application) == (
        "client backend",
        "idle",
        "reaper_blind",
        "mine",
    )
    assert own.database == pg.execute("SELECT current_database()")[0][0]
    assert (own.superuser, own.member, own.client_addr, own.query) == (False, True, None, None)
    assert own.state_change is not None
    assert own.backend_start is not None
    assert isinstance(own.idle_seconds, float)
    assert (before - own.state_change).total_seconds() <= own.idle_seconds
    assert own.idle_seconds <= (after - own.state_change).total_seconds()
    assert own.connection_seconds == pytest.approx(
        own.idle_seconds + (own.state_change - own.backend_start).total_seconds(), abs=1e-6
    )
    assert own.transaction_seconds is None  # idle: no transaction open
    assert own.runtime_seconds is not None  # the age of its last query
    assert own.runtime_seconds >= own.idle_seconds
    # Another role's session: still returned, with its names, as state unknown.
    hidden = by_pid[other.info.backend_pid]
    assert (hidden.backend_type, hidden.state, hidden.user, hidden.database) == (
        "unknown",
        None,
        "appuser",
        own.database,
    )
    assert hidden.application == "theirs"  # visible to every role
    assert (hidden.idle_seconds, hidden.connection_seconds, hidden.backend_start) == (
        None,
        None,
        None,
    )
    assert (hidden.superuser, hidden.member) == (False, False)
    # Listed like every other session (the suite's admin session is hidden too), but not counted
    # as a client: a hidden row may be a parallel worker, a background worker or a walsender.
    assert len(snapshot.sessions) == on_server
    visible = sum(s.backend_type == "client backend" for s in snapshot.sessions)
    assert snapshot.facts.client_sessions == visible < on_server
    assert {s.backend_type for s in snapshot.sessions} == {"client backend", "unknown"}
    # The query text only when asked for, and only where the role may see it.
    queries = {s.pid: s.query for s in with_query.sessions}
    assert queries[mine.info.backend_pid] == "SELECT 1"
    assert queries[other.info.backend_pid] == "<insufficient privilege>"
    assert all(s.query is None for s in snapshot.sessions)


def test_the_poll_reads_only_the_roles_with_a_backend_when_roles_outnumber_sessions(
    pg: TestServer, sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import timedelta  # noqa: PLC0415

    from reaper.pg.activity import POLL_BACKEND_ROLES_SQL, POLL_SQL, ServerConnection  # noqa: PLC0415
    from reaper.pg.connection import Prepared  # noqa: PLC0415
    from reaper.policy import RoleConnections  # noqa: PLC0415

    pg.execute("DROP ROLE IF EXISTS poll_limited")
    pg.execute("CREATE ROLE poll_limited LOGIN PASSWORD 'poll_limited' CONNECTION LIMIT 5")
    try:
        limited = [
            sessions.idle(user="poll_limited", password="poll_limited", application="limited")
            for _ in range(2)
        ]
        sessions.idle(user="appuser", password="appuser")
        with ServerConnection(
            dsn=pg.dsn(user="reaper_lp", password="reaper_lp"),
            connect_timeout=timedelta(seconds=3),
            statement_timeout=timedelta(seconds=7),
        ) as conn:
            run: list[Any] = []
            execute = conn.fetch  # to see which statement each poll runs

            def spy(statement: Any, params: Any, **kwargs: Any) -> list[dict[str, Any]]:
                run.append(statement.text)
                return execute(statement, params, **kwargs)

            monkeypatch.setattr(conn, "fetch", spy)
            every = conn.poll()  # the first poll on a connection reads every role
            (roles,) = pg.execute("SELECT count(*) FROM pg_roles")[0]
            assert roles > len(every.sessions)  # the test server's: more roles than sessions
            some = conn.poll()
        texts = [Prepared.of("poll", sql).text for sql in (POLL_SQL, POLL_BACKEND_ROLES_SQL)]
        assert run[-2:] == texts

        def seen(snapshot: Any) -> set[tuple[Any, ...]]:
            return {
                (s.pid, s.backend_type, s.database, s.user, s.superuser, s.member, s.state)
                for s in snapshot.sessions
            }

        assert seen(some) == seen(every)
        assert some.facts.client_sessions == every.facts.client_sessions
        expected = (RoleConnections(role="poll_limited", limit=5, sessions=2),)
        assert every.facts.roles == some.facts.roles == expected
        for conn_ in limited:
            conn_.close()
    finally:
        pg.execute("DROP ROLE IF EXISTS poll_limited")


def test_connection_refused_names_the_server_without_secrets() -> None:
    from datetime import timedelta  # noqa: PLC0415

    from reaper.pg.activity import ServerConnection  # noqa: PLC0415
    from reaper.pg.connection import PostgresError  # noqa: PLC0415

    conn = ServerConnection(
        dsn="host=127.0.0.1 port=1 user=x password=Sentinel-Pa55",
        connect_timeout=timedelta(seconds=1),
        statement_timeout=timedelta(seconds=1),
    )
    with pytest.raises(PostgresError) as info:
        conn.poll()
    assert "127.0.0.1:1" in str(info.value)
    assert "Sentinel-Pa55" not in str(info.value)
    assert info.value.__cause__ is None  # no libpq exception carrying the DSN along


def test_reapers_own_session_is_never_a_victim_even_when_a_policy_matches_it(
    pg: TestServer, write_config: Callable[..., Path]
) -> None:
    from reaper.policy import evaluate  # noqa: PLC0415
    from reaper.settings import load_settings  # noqa: PLC0415
    from reaper.sweep import connect, sweep  # noqa: PLC0415

    # While it polls, the reaper's own session is active, and it has been connected for more
    # than a second: this policy would match it but for the rule that protects it.
    every_old_active = """
        [[policies]]
        name = "old-active"
        states = ["active"]
        max_connection_age = "1s"
        """
    settings = load_settings(write_config(every_old_active))
    server = settings.servers[0]
    with connect(server, settings) as conn:
        own_pid = conn.poll().facts.own_pid
        time.sleep(1.3)

        report = sweep(conn, server=server, settings=settings)

        mine = next(s for s in report.sessions if s.pid == own_pid)
        assert mine.state == "active"
        assert mine.connection_seconds is not None
        assert mine.connection_seconds > 1.0
        assert own_pid not in {o.decision.session.pid for o in report.outcomes}
        facts = conn.poll().facts
        decision = evaluate(mine, settings.policies, reaper=settings.reaper, facts=facts)
        assert decision.reason == "the reaper's own session"
        assert facts.own_pid == own_pid  # still the same, living session
    assert pg.wait_gone(own_pid)  # closed on exit
