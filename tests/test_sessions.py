"""`pg-reaper sessions`: the counts (pure) and the command against real servers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

from reaper.cli import main
from reaper.commands.sessions import Count, count_groups, count_states
from reaper.policy import Session

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.servers import Sessions, TestServer

IDLE_POLICY = """
[[policies]]
name = "idle"
max_idle = "15m"
"""
EVERY_STATE = [
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "active",
    "fastpath function call",
    "disabled",
    "unknown",
]


def make_session(**overrides: Any) -> Session:
    values: dict[str, Any] = {
        "pid": 1,
        "backend_type": "client backend",
        "database": "shop",
        "user": "web",
        "application": "rails",
        "client_addr": None,
        "state": "idle",
        "backend_start": datetime(2024, 1, 1, tzinfo=UTC),
        "state_change": datetime(2024, 1, 1, tzinfo=UTC),
        "idle_seconds": 1.0,
        "transaction_seconds": None,
        "runtime_seconds": None,
        "connection_seconds": 1.0,
    }
    values.update(overrides)
    return Session(**values)


def hidden(**overrides: Any) -> Session:
    """A row as a role without pg_read_all_stats sees another role's session."""
    return make_session(backend_type="unknown", state=None, application="", **overrides)


# --- the pure counts ---------------------------------------------------------------------------


def test_every_state_is_listed_with_zeros_and_hidden_rows_are_unknown() -> None:
    counts = count_states([make_session(), make_session(state="active"), hidden()])
    assert [c.name for c in counts] == EVERY_STATE
    by_name = {c.name: c.sessions for c in counts}
    assert by_name == {
        "idle": 1,
        "idle in transaction": 0,
        "idle in transaction (aborted)": 0,
        "active": 1,
        "fastpath function call": 0,
        "disabled": 0,
        "unknown": 1,
    }


def test_a_state_pg_reaper_does_not_know_is_listed_by_its_name() -> None:
    counts = count_states([make_session(state="waiting for godot")])
    assert counts[-1] == Count(name="waiting for godot", sessions=1)


def test_counts_per_role_carry_the_roles_connection_limit_even_without_sessions() -> None:
    sessions = [make_session(user="web"), make_session(user="web"), make_session(user="etl")]
    limits = [
        {"kind": "role", "name": "web", "connection_limit": 4, "sessions": 2},
        {"kind": "role", "name": "idle_role", "connection_limit": 3, "sessions": 0},
        {"kind": "database", "name": "shop", "connection_limit": 1, "sessions": 3},
    ]
    groups = count_groups(sessions, by="user", limits=limits)
    assert groups == (
        Count(name="web", sessions=2, connection_limit=4),
        Count(name="etl", sessions=1),
        Count(name="idle_role", sessions=0, connection_limit=3),
    )
    assert groups[0].percent == 50.0
    assert groups[1].percent is None


def test_counts_per_database_use_the_database_limits() -> None:
    limits = [{"kind": "database", "name": "shop", "connection_limit": 2, "sessions": 0}]
    (shop,) = count_groups([make_session(), make_session()], by="database", limits=limits)
    assert shop == Count(name="shop", sessions=2, connection_limit=2)
    assert shop.percent == 100.0


def test_a_hidden_rows_application_is_not_visible_rather_than_empty() -> None:
    groups = count_groups(
        [hidden(), make_session(application=""), make_session(application="rails")],
        by="application",
    )
    assert {c.name: c.sessions for c in groups} == {None: 1, "": 1, "rails": 1}


# --- against real servers ----------------------------------------------------------------------


def run_sessions(
    capsys: pytest.CaptureFixture[str], config: Path, *extra: str
) -> tuple[int, dict[str, Any]]:
    code = main(["sessions", "-c", str(config), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def setting(pg: TestServer, name: str) -> int:
    return int(pg.execute("SELECT current_setting(%s)", [name])[0][0])


@pytest.mark.integration
def test_sessions_shows_every_state_with_zeros_and_the_servers_slots(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sessions.idle(application="counted")
    sessions.idle_in_transaction(application="counted")
    sessions.idle_in_aborted_transaction(application="counted")

    code, document = run_sessions(capsys, write_config(IDLE_POLICY))

    assert code == 0
    assert document["ok"] is True
    (server,) = document["servers"]
    assert list(server["states"]) == EVERY_STATE
    states = server["states"]
    assert states["idle"] >= 2  # the admin session and ours
    assert states["idle in transaction"] >= 1
    assert states["idle in transaction (aborted)"] >= 1
    assert states["active"] >= 1  # the reaper's own session, polling
    assert states["fastpath function call"] == 0
    assert states["disabled"] == 0
    assert states["unknown"] == 0
    assert server["client_sessions"] == sum(states.values())
    assert server["max_connections"] == setting(pg, "max_connections")
    reserved = server["superuser_reserved_connections"]
    assert reserved == setting(pg, "superuser_reserved_connections")
    if pg.major >= 16:
        assert server["reserved_connections"] == setting(pg, "reserved_connections")
    else:
        assert server["reserved_connections"] is None
    usable = server["max_connections"] - reserved - (server["reserved_connections"] or 0)
    assert server["usable"] == usable
    assert server["percent"] == round(100 * server["client_sessions"] / usable, 1)


@pytest.mark.integration
def test_sessions_by_user_shows_a_roles_connection_limit(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pg.execute("ALTER ROLE appuser CONNECTION LIMIT 2")
    try:
        sessions.idle(application="app", user="appuser", password="appuser", tcp=True)
        code, document = run_sessions(capsys, write_config(IDLE_POLICY), "--by", "user")
        text_code = main(["sessions", "-c", str(write_config(IDLE_POLICY)), "--by", "user"])
        text = capsys.readouterr().out
    finally:
        pg.execute("ALTER ROLE appuser CONNECTION LIMIT -1")

    assert code == 0
    assert text_code == 0
    (server,) = document["servers"]
    assert server["by"] == "user"
    groups = {g["name"]: g for g in server["groups"]}
    assert groups["appuser"] == {
        "name": "appuser",
        "sessions": 1,
        "connection_limit": 2,
        "percent": 50.0,
    }
    admin_role = pg.execute("SELECT current_user")[0][0]
    assert groups[admin_role]["connection_limit"] is None  # a superuser: no limit applies
    appuser_line = next(line for line in text.splitlines() if line.strip().startswith("appuser"))
    assert appuser_line.split() == ["appuser", "1", "2", "50%"]


@pytest.mark.integration
def test_sessions_by_database_shows_a_databases_connection_limit(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pg.execute("ALTER DATABASE otherdb CONNECTION LIMIT 4")
    try:
        sessions.idle(application="app", dbname="otherdb")
        code, document = run_sessions(capsys, write_config(IDLE_POLICY), "--by", "database")
    finally:
        pg.execute("ALTER DATABASE otherdb CONNECTION LIMIT -1")

    assert code == 0
    groups = {g["name"]: g for g in document["servers"][0]["groups"]}
    assert groups["otherdb"]["connection_limit"] == 4
    assert groups["otherdb"]["sessions"] == 1
    assert groups["postgres"]["connection_limit"] is None


@pytest.mark.integration
def test_sessions_by_application_counts_each_application_name(
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sessions.idle(application="counted-twice")
    sessions.idle(application="counted-twice")

    code, document = run_sessions(capsys, write_config(IDLE_POLICY), "--by", "application")

    assert code == 0
    groups = {g["name"]: g["sessions"] for g in document["servers"][0]["groups"]}
    assert groups["counted-twice"] == 2
    assert groups["pg-reaper"] >= 1


@pytest.mark.integration
def test_the_human_table_lists_every_state(
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["sessions", "-c", str(write_config(IDLE_POLICY))])

    out = capsys.readouterr().out
    assert code == 0
    first, header, *rows = out.splitlines()
    assert "client sessions of" in first
    assert "max_connections" in first
    assert header.split() == ["STATE", "SESSIONS"]
    assert [row.rsplit(maxsplit=1)[0].strip() for row in rows] == EVERY_STATE
    assert rows[4].split()[-1] == "0"  # fastpath function call


@pytest.mark.integration
def test_a_role_without_pg_read_all_stats_sees_hidden_sessions_as_unknown(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sessions.idle(application="hidden-from-blind")  # a superuser's session
    dsn = pg.dsn(user="reaper_blind", password="reaper_blind", tcp=True)

    code, document = run_sessions(capsys, write_config(IDLE_POLICY, dsn=dsn))

    assert code == 0
    server = document["servers"][0]
    assert server["states"]["unknown"] >= 1
    assert server["hidden_sessions"] == server["states"]["unknown"]


@pytest.mark.integration
def test_an_unreachable_server_exits_1(
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(IDLE_POLICY, dsn="host=127.0.0.1 port=1 dbname=postgres")

    code, document = run_sessions(capsys, config)

    assert code == 1
    assert document["ok"] is False
    assert "cannot connect" in document["servers"][0]["error"]
    assert main(["sessions", "-c", str(config)]) == 1
    assert "cannot be reached" in capsys.readouterr().out


@pytest.mark.integration
def test_an_unknown_server_is_a_usage_error(
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["sessions", "-c", str(write_config(IDLE_POLICY)), "--server", "nope"]) == 2
    assert "--server 'nope' is not configured" in capsys.readouterr().err
