"""`pg-reaper kill` and `unblock`: the pure victim filter, the usage rules, and real sessions
terminated on real servers: a database emptied so that DROP DATABASE succeeds right after, a role
at its connection limit freed, dry runs and refusals that leave everything alone.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import re
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import sql

from reaper.cli import main
from reaper.commands.kill import _describe_blockers
from reaper.commands.victims import KillTarget, kill_target, parse_client_addr, select_victims
from reaper.policy import Session
from tests.servers import ADMIN_APPLICATION, usable

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.servers import Sessions, TestServer

IDLE_POLICY = """
[[policies]]
name = "idle"
max_idle = "15m"
"""
OWN_PID = 100
WEIRD = "we\"ird'; db"


# --- the pure victim filter --------------------------------------------------------------------


def make_session(**overrides: Any) -> Session:
    values: dict[str, Any] = {
        "pid": 200,
        "backend_type": "client backend",
        "database": "shop",
        "user": "web",
        "application": "rails",
        "client_addr": "10.0.3.7",
        "state": "idle",
        "backend_start": datetime(2024, 1, 1, tzinfo=UTC),
        "state_change": datetime(2024, 1, 1, tzinfo=UTC),
        "idle_seconds": 10.0,
        "transaction_seconds": None,
        "runtime_seconds": 12.0,
        "connection_seconds": 20.0,
    }
    values.update(overrides)
    return Session(**values)


def pids(sessions: Any) -> list[int]:
    return [s.pid for s in sessions]


def test_the_reapers_own_session_is_never_a_victim() -> None:
    own = make_session(pid=OWN_PID, application="pg-reaper")
    other = make_session(pid=201)
    assert pids(select_victims([own, other], KillTarget(database="shop"), own_pid=OWN_PID)) == [201]


@pytest.mark.parametrize(
    "backend_type",
    ["walsender", "autovacuum worker", "parallel worker", "background worker", "unknown"],
)
def test_backends_that_are_not_clients_are_never_victims(backend_type: str) -> None:
    # "unknown": a row whose kind is hidden from a role without pg_read_all_stats.
    backend = make_session(backend_type=backend_type, state="idle" if backend_type else None)
    assert select_victims([backend], KillTarget(database="shop"), own_pid=OWN_PID) == ()


@pytest.mark.parametrize(
    "state",
    [
        "idle",
        "idle in transaction",
        "idle in transaction (aborted)",
        "active",
        "fastpath function call",
        "disabled",
    ],
)
def test_every_state_is_a_victim(state: str) -> None:
    session = make_session(state=state)
    assert pids(select_victims([session], KillTarget(user="web"), own_pid=OWN_PID)) == [200]


def test_other_pg_reaper_sessions_are_victims_when_they_match() -> None:
    # A database to be dropped needs them gone too; policies, not kill, spare them.
    other_reaper = make_session(application="pg-reaper")
    target = KillTarget(application=re.compile("^pg-reaper$"))
    assert pids(select_victims([other_reaper], target, own_pid=OWN_PID)) == [200]


def test_every_filter_given_must_match() -> None:
    target = kill_target(
        database="shop", user="web", application="^rails", client_addr="10.0.0.0/8"
    )
    match = make_session(pid=1)
    others = [
        make_session(pid=2, database="dwh"),
        make_session(pid=3, user="etl"),
        make_session(pid=4, application="psql"),
        make_session(pid=5, client_addr="192.168.1.2"),
        make_session(pid=6, client_addr=None),
    ]
    assert pids(select_victims([match, *others], target, own_pid=OWN_PID)) == [1]


def test_an_application_regex_is_searched_not_anchored() -> None:
    target = kill_target(application="sidekiq")
    hits = [make_session(pid=1, application="app-sidekiq-7"), make_session(pid=2, application="")]
    assert pids(select_victims(hits, target, own_pid=OWN_PID)) == [1]


def test_local_matches_unix_socket_sessions_only() -> None:
    socket = make_session(pid=1, client_addr=None)
    tcp = make_session(pid=2, client_addr="127.0.0.1")
    local = kill_target(client_addr="local")
    assert pids(select_victims([socket, tcp], local, own_pid=OWN_PID)) == [1]
    loopback = kill_target(client_addr="127.0.0.0/8")
    assert pids(select_victims([socket, tcp], loopback, own_pid=OWN_PID)) == [2]


def test_an_ipv4_client_on_an_ipv6_socket_matches_its_ipv4_network() -> None:
    mapped = make_session(client_addr="::ffff:10.1.2.3")
    target = kill_target(client_addr="10.0.0.0/8")
    assert pids(select_victims([mapped], target, own_pid=OWN_PID)) == [200]


def test_victims_come_oldest_in_their_state_first() -> None:
    young = make_session(pid=1, idle_seconds=5.0)
    old = make_session(pid=2, idle_seconds=500.0)
    assert pids(select_victims([young, old], KillTarget(database="shop"), own_pid=OWN_PID)) == [
        2,
        1,
    ]


def test_a_bare_address_is_its_own_network_and_host_bits_are_refused() -> None:
    assert parse_client_addr("10.1.2.3") == ipaddress.ip_network("10.1.2.3/32")
    assert parse_client_addr("local") == "local"
    with pytest.raises(ValueError, match=re.escape("invalid CIDR '10.1.2.3/8'")):
        parse_client_addr("10.1.2.3/8")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "name at least one of --database, --user, --application, --client-addr"),
        ({"user": "web", "block": True}, "--block-connections needs --database"),
        (
            {"database": "shop", "user": "web", "block": True},
            "--block-connections empties the whole database",
        ),
        ({"application": "(unclosed"}, "--application: invalid regex '(unclosed'"),
        ({"client_addr": "nonsense"}, "--client-addr: invalid CIDR 'nonsense'"),
    ],
)
def test_bad_filters_are_refused_naming_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        kill_target(**options)


def test_what_keeps_a_database_in_use_comes_with_what_to_do_about_it() -> None:
    lines = _describe_blockers(
        [
            {"kind": "prepared transaction", "pid": None, "gid": "tx-1"},
            {"kind": "walsender", "pid": 42, "gid": None},
        ]
    )
    prepared, walsender = lines
    assert prepared == "1 prepared transaction (gid tx-1): COMMIT PREPARED or ROLLBACK PREPARED it"
    assert walsender.startswith("1 walsender (pid 42): logical replication from this database")


# --- usage errors (exit 2 before any connection) -----------------------------------------------


@pytest.fixture
def offline_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        textwrap.dedent(
            """\
            [log]
            format = "json"

            [[servers]]
            name = "primary"
            dsn = "host=/nonexistent dbname=postgres connect_timeout=1"
            """
        )
        + IDLE_POLICY,
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "name at least one of"),
        (["--user", "web", "--block-connections"], "--block-connections needs --database"),
        (["--database", "x", "--wait", "soon"], "--wait: invalid duration 'soon'"),
        (["--client-addr", "10.0.0.1/8"], "--client-addr: invalid CIDR"),
        (["--database", "x"], "use --yes"),  # stdin is not a terminal under pytest
    ],
)
def test_usage_errors_exit_2_without_connecting(
    offline_config: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code = main(["kill", "-c", str(offline_config), "--server", "primary", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_server_is_a_usage_error(
    offline_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["kill", "-c", str(offline_config), "--server", "nope", "--user", "x"]) == 2
    assert "--server 'nope' is not configured" in capsys.readouterr().err
    assert main(["unblock", "-c", str(offline_config), "--server", "nope", "--database", "x"]) == 2


def test_an_unreachable_server_exits_1(
    offline_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["kill", "-c", str(offline_config), "--server", "primary", "--user", "x", "--yes"])
    assert code == 1
    assert "cannot connect" in capsys.readouterr().out


# --- against real servers ----------------------------------------------------------------------


def run_kill(
    capsys: pytest.CaptureFixture[str], config: Path, server: str, *extra: str
) -> tuple[int, str, list[dict[str, Any]]]:
    code = main(["kill", "-c", str(config), "--server", server, *extra])
    captured = capsys.readouterr()
    # A prompt answered from a fake terminal is not echoed: its line ends with the next event.
    events = [
        json.loads(line[line.index("{") :]) for line in captured.err.splitlines() if "{" in line
    ]
    return code, captured.out, events


def audit_events(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {e["pid"]: e for e in events if e["event"] in {"session_reaped", "session_reap_failed"}}


def server_name(pg: TestServer) -> str:
    return f"pg{pg.major}"


@contextlib.contextmanager
def scratch_database(pg: TestServer, name: str) -> Iterator[str]:
    """A database made for one test, dropped at the end whatever became of it."""
    ident = sql.Identifier(name)
    pg.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
    pg.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    try:
        yield name
    finally:
        pg.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def connect_to(pg: TestServer, database: str) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.dsn(dbname=database), autocommit=True, connect_timeout=5)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["kill_me", WEIRD], ids=["plain", "weird-name"])
def test_block_connections_empties_a_database_so_that_drop_database_succeeds_right_after(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    with scratch_database(pg, name):
        idle = sessions.idle(application="idle", dbname=name)
        in_tx = sessions.idle_in_transaction(application="in-tx", dbname=name)
        aborted = sessions.idle_in_aborted_transaction(application="aborted", dbname=name)
        active = sessions.active(application="busy", dbname=name)
        other_reaper = sessions.idle(application="pg-reaper", dbname=name)
        elsewhere = sessions.idle(application="elsewhere")  # on postgres: not a victim
        victims = {c.info.backend_pid for c in (idle, in_tx, aborted, active, other_reaper)}

        code, out, events = run_kill(
            capsys,
            write_config(IDLE_POLICY),
            server_name(pg),
            "--database",
            name,
            "--block-connections",
            "--yes",
        )

        assert code == 0, out
        reaped = audit_events(events)
        assert set(reaped) == victims
        assert {e["result"] for e in reaped.values()} == {"terminated"}
        assert "has no session left" in out
        with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
            connect_to(pg, name)
        rows = pg.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [name],
        )
        assert rows == [(0,)]
        pg.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))  # no FORCE needed
        assert usable(elsewhere)
        assert usable(pg.admin)
        assert pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]) == []


@pytest.mark.integration
def test_unblock_lets_connections_in_again(
    pg: TestServer,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(IDLE_POLICY)
    with scratch_database(pg, WEIRD):
        code, _out, _events = run_kill(
            capsys, config, server_name(pg), "--database", WEIRD, "--block-connections", "--yes"
        )
        assert code == 0
        with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
            connect_to(pg, WEIRD)

        code = main(
            ["unblock", "-c", str(config), "--server", server_name(pg), "--database", WEIRD]
        )

        assert code == 0
        assert "accepts connections again" in capsys.readouterr().out
        with connect_to(pg, WEIRD) as conn:
            assert usable(conn)


@pytest.mark.integration
def test_kill_user_frees_a_role_at_its_connection_limit(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    login: dict[str, Any] = {"user": "appuser", "password": "appuser", "tcp": True}
    pg.execute("ALTER ROLE appuser CONNECTION LIMIT 2")
    try:
        first = sessions.idle(application="pool", **login)
        second = sessions.idle_in_transaction(application="pool", **login)
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            sessions.open(application="third", **login)

        code, out, events = run_kill(
            capsys, write_config(IDLE_POLICY), server_name(pg), "--user", "appuser", "--yes"
        )

        assert code == 0, out
        freed = {first.info.backend_pid, second.info.backend_pid}
        assert set(audit_events(events)) == freed
        assert usable(sessions.open(application="after-kill", **login))
        assert not usable(first)
    finally:
        pg.execute("ALTER ROLE appuser CONNECTION LIMIT -1")


@pytest.mark.integration
def test_dry_run_lists_and_audits_but_kills_nothing(
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    idle = sessions.idle(application="dry-victim")
    in_tx = sessions.idle_in_transaction(application="dry-victim")

    code, out, events = run_kill(
        capsys,
        write_config(IDLE_POLICY),
        f"pg{sessions.server.major}",
        "--application",
        "^dry-victim$",
        "--dry-run",
    )

    assert code == 0
    audited = audit_events(events)
    assert set(audited) == {idle.info.backend_pid, in_tx.info.backend_pid}
    assert all(e["dry_run"] is True and e["result"] == "dry_run" for e in audited.values())
    assert "(dry run)" in out
    assert usable(idle)
    assert usable(in_tx)


@pytest.mark.integration
def test_without_a_terminal_and_without_yes_kill_refuses_with_exit_2(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
) -> None:
    victim = sessions.idle(application="not-without-yes")
    config = write_config(IDLE_POLICY)
    command = [sys.executable, "-m", "reaper", "kill", "-c", str(config)]
    command += ["--server", server_name(pg), "--application", "^not-without-yes$"]

    proc = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False
    )

    assert proc.returncode == 2, proc.stderr
    assert "use --yes" in proc.stderr
    assert proc.stdout == ""
    assert usable(victim)

    proc = subprocess.run(
        [*command, "--yes"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert pg.wait_gone(victim.info.backend_pid)


class _Terminal(io.StringIO):
    """A stdin that says it is a terminal, with the operator's answer already typed."""

    def isatty(self) -> bool:
        return True


@pytest.mark.integration
@pytest.mark.parametrize(("answer", "killed"), [("y\n", True), ("n\n", False), ("", False)])
def test_on_a_terminal_kill_lists_the_victims_and_asks_first(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
    *,
    killed: bool,
) -> None:
    victim = sessions.idle(application="ask-me")
    monkeypatch.setattr(sys, "stdin", _Terminal(answer))

    code, out, _events = run_kill(
        capsys, write_config(IDLE_POLICY), server_name(pg), "--application", "^ask-me$"
    )

    header, row = out.splitlines()[:2]
    assert header.split()[:5] == ["SERVER", "PID", "USER", "DATABASE", "APPLICATION"]
    assert str(victim.info.backend_pid) in row
    assert "ask-me" in row
    assert code == (0 if killed else 1)
    assert usable(victim) is not killed
    if not killed:
        assert "nothing terminated: not confirmed" in out


@pytest.mark.integration
def test_the_prompt_names_the_count_and_the_server(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sessions.idle(application="prompted")
    sessions.idle(application="prompted")
    monkeypatch.setattr(sys, "stdin", _Terminal("no\n"))

    config = write_config(IDLE_POLICY)
    main(["kill", "-c", str(config), "--server", server_name(pg), "--application", "^prompted$"])

    assert f"Terminate 2 sessions on {server_name(pg)}? [y/N]" in capsys.readouterr().err


@pytest.mark.integration
def test_every_victim_gets_an_audit_event_on_stderr(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    opened = [
        sessions.idle(application="audit-me"),
        sessions.idle_in_transaction(application="audit-me"),
        sessions.active(application="audit-me"),
    ]
    opened_pids = [c.info.backend_pid for c in opened]  # 0 once a connection is lost
    spared = sessions.idle(application="audit-me-not")

    code, _out, events = run_kill(
        capsys, write_config(IDLE_POLICY), server_name(pg), "--application", "^audit-me$", "--yes"
    )

    assert code == 0
    audited = audit_events(events)
    assert set(audited) == set(opened_pids)
    for pid in opened_pids:
        event = audited[pid]
        assert event["event"] == "session_reaped"
        assert event["server"] == server_name(pg)
        assert event["policy"] == "kill"
        assert event["action"] == "terminate"
        assert event["result"] == "terminated"
        assert event["dry_run"] is False
        assert event["application"] == "audit-me"
        for key in ("backend_start", "database", "user", "client_addr", "state", "idle_seconds"):
            assert key in event
    (summary,) = [e for e in events if e["event"] == "kill_completed"]
    assert summary["terminated"] == 3
    assert usable(spared)
    assert usable(pg.admin)


@pytest.mark.integration
def test_the_reapers_own_session_is_spared_and_other_pg_reapers_are_not(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    other_reaper = sessions.idle(application="pg-reaper")

    code, _out, events = run_kill(
        capsys, write_config(IDLE_POLICY), server_name(pg), "--application", "^pg-reaper$", "--yes"
    )

    assert code == 0
    assert set(audit_events(events)) == {other_reaper.info.backend_pid}
    assert pg.wait_gone(other_reaper.info.backend_pid)


@pytest.mark.integration
def test_a_session_the_role_may_not_signal_is_denied_and_exits_1(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    superuser_session = sessions.idle(application="su-victim")  # the admin role: a superuser
    plain = sessions.idle(application="su-victim", user="appuser", password="appuser", tcp=True)
    dsn = pg.dsn(user="reaper_lp", password="reaper_lp", tcp=True)

    config = write_config(IDLE_POLICY, dsn=dsn)
    code, out, events = run_kill(
        capsys, config, server_name(pg), "--application", "^su-victim$", "--yes"
    )

    assert code == 1, out
    audited = audit_events(events)
    assert audited[superuser_session.info.backend_pid]["result"] == "denied"
    assert audited[superuser_session.info.backend_pid]["event"] == "session_reap_failed"
    assert audited[plain.info.backend_pid]["result"] == "terminated"
    assert usable(superuser_session)


@pytest.mark.integration
@pytest.mark.parametrize("createdb", [False, True], ids=["plain-role", "createdb-role"])
def test_blocking_needs_the_owner_or_a_superuser_and_says_so(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    *,
    createdb: bool,
) -> None:
    dsn = pg.dsn(user="reaper_lp", password="reaper_lp", tcp=True)
    with scratch_database(pg, "not_mine"):
        bystander = sessions.idle(application="bystander", dbname="not_mine")
        pg.execute(f"ALTER ROLE reaper_lp {'CREATEDB' if createdb else 'NOCREATEDB'}")
        try:
            code, out, _events = run_kill(
                capsys,
                write_config(IDLE_POLICY, dsn=dsn),
                server_name(pg),
                "--database",
                "not_mine",
                "--block-connections",
                "--yes",
            )
        finally:
            pg.execute("ALTER ROLE reaper_lp NOCREATEDB")

        assert code == 1
        assert "must be owner of database not_mine" in out
        assert "CREATEDB is not enough" in out
        assert usable(bystander)  # refused before anything was signalled
        with connect_to(pg, "not_mine") as conn:
            assert usable(conn)


@pytest.mark.integration
def test_the_reaper_cannot_block_the_database_it_is_connected_to(
    pg: TestServer,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(IDLE_POLICY, dsn=pg.dsn(dbname="otherdb"))

    code, out, _events = run_kill(
        capsys, config, server_name(pg), "--database", "otherdb", "--block-connections", "--yes"
    )

    assert code == 1
    assert "cannot disallow connections for current database" in out
    assert "point the server's dsn at another database" in out


@pytest.mark.integration
def test_dry_run_never_blocks_the_database(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with scratch_database(pg, "kill_me_not"):
        stays = sessions.idle(application="stays", dbname="kill_me_not")

        code, out, _events = run_kill(
            capsys,
            write_config(IDLE_POLICY),
            server_name(pg),
            "--database",
            "kill_me_not",
            "--block-connections",
            "--dry-run",
        )

        assert code == 0
        assert "would be blocked first" in out
        assert usable(stays)
        with connect_to(pg, "kill_me_not") as conn:
            assert usable(conn)


@pytest.mark.integration
def test_the_test_suites_admin_session_is_never_a_victim_of_kill_database(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # pytest-admin sits on postgres; kill --database otherdb must leave it, and postgres, alone.
    victim = sessions.idle(application="on-otherdb", dbname="otherdb")
    admin_pid = pg.admin.info.backend_pid

    code, _out, events = run_kill(
        capsys, write_config(IDLE_POLICY), server_name(pg), "--database", "otherdb", "--yes"
    )

    assert code == 0
    assert admin_pid not in audit_events(events)
    assert victim.info.backend_pid in audit_events(events)
    assert usable(pg.admin)
    rows = pg.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s", [admin_pid])
    assert rows == [(ADMIN_APPLICATION,)]


class _AnswerAfter:
    """A terminal whose operator does something else before answering yes."""

    def __init__(self, before_answer: Callable[[], object]) -> None:
        self._before_answer = before_answer

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        self._before_answer()
        return "y\n"


@pytest.mark.integration
def test_a_victim_that_ran_a_statement_after_it_was_listed_is_terminated_all_the_same(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The race-safe signal reports it `changed` (its state_change moved); kill takes every
    # state, so it polls again and signals the same backend as it is now.
    victim = sessions.idle(application="busy-meanwhile")
    pid = victim.info.backend_pid
    monkeypatch.setattr(sys, "stdin", _AnswerAfter(lambda: victim.execute("SELECT 1")))

    code, _out, events = run_kill(
        capsys, write_config(IDLE_POLICY), server_name(pg), "--application", "^busy-meanwhile$"
    )

    assert code == 0
    assert audit_events(events)[pid]["result"] == "terminated"
    assert pg.wait_gone(pid)


@pytest.mark.integration
def test_a_session_that_got_in_before_the_block_is_terminated_too(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with scratch_database(pg, "kill_me_late"):
        listed = sessions.idle(application="listed", dbname="kill_me_late")
        late: list[int] = []

        def connect_late() -> None:
            late.append(sessions.idle(application="late", dbname="kill_me_late").info.backend_pid)

        monkeypatch.setattr(sys, "stdin", _AnswerAfter(connect_late))
        listed_pid = listed.info.backend_pid

        code, out, events = run_kill(
            capsys,
            write_config(IDLE_POLICY),
            server_name(pg),
            "--database",
            "kill_me_late",
            "--block-connections",
        )

        assert code == 0, out
        assert set(audit_events(events)) == {listed_pid, *late}
        pg.execute("DROP DATABASE kill_me_late")


@pytest.mark.integration
def test_a_database_still_used_by_a_walsender_is_reported_at_once_and_exits_1(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Logical replication from the database: not a client session, never terminated; DROP
    # DATABASE would fail with "being accessed by other users", so kill says so, without
    # waiting for something that will not leave.
    with scratch_database(pg, "replicated"):
        walsender = sessions.open(
            application="decoder", dbname="replicated", extra="replication=database"
        )
        walsender.execute("IDENTIFY_SYSTEM")
        client = sessions.idle(application="client", dbname="replicated")
        client_pid = client.info.backend_pid

        code, out, events = run_kill(
            capsys,
            write_config(IDLE_POLICY),
            server_name(pg),
            "--database",
            "replicated",
            "--block-connections",
            "--yes",
            "--wait",
            "30s",
        )

        assert code == 1
        assert set(audit_events(events)) == {client_pid}
        assert f"1 walsender (pid {walsender.info.backend_pid})" in out
        (summary,) = [e for e in events if e["event"] == "kill_completed"]
        assert summary["remaining"] == 1
        assert summary["duration_ms"] < 10_000
        assert pg.is_alive(walsender.info.backend_pid)
