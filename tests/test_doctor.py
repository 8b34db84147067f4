"""`pg-reaper doctor`: the pure diagnosis (thresholds, privileges, limits, timeouts) and the
command against real servers, including one small enough to fill.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import sql

from reaper.cli import main
from reaper.commands.doctor import (
    Connections,
    Limit,
    Privileges,
    ServerReport,
    ServerState,
    Setting,
    diagnose,
    failed,
    pg_milliseconds,
    read_state,
    render_json,
    render_text,
)
from reaper.demo.embedded import EmbeddedPostgres
from reaper.demo.programs import free_port
from reaper.pg.activity import ServerConnection
from reaper.pg.doctor import doctor_rows
from reaper.settings import PolicyConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.servers import Sessions, TestServer

PASSWORD = "Sentinel-Pa55"
IDLE_POLICY = """
[[policies]]
name = "idle"
max_idle = "15m"
"""


# --- the pure diagnosis ------------------------------------------------------------------------


def make_state(
    *,
    role: str = "reaper",
    superuser: bool = False,
    signal_backend: bool = True,
    read_all_stats: bool = True,
    use_reserved_connections: bool | None = None,
    client_sessions: int = 5,
    max_connections: int = 100,
    superuser_reserved_connections: int = 3,
    reserved_connections: int | None = None,
    hidden_sessions: int = 0,
    disabled_sessions: int = 0,
    track_activities: bool = True,
    timeouts: tuple[Setting, ...] = (),
    limits: tuple[Limit, ...] = (),
) -> ServerState:
    """A healthy PostgreSQL 15 primary seen by a least-privilege reaper, unless told otherwise."""
    return ServerState(
        server_version="15.8",
        server_version_num=150_008,
        in_recovery=False,
        privileges=Privileges(
            role=role,
            superuser=superuser,
            signal_backend=signal_backend,
            read_all_stats=read_all_stats,
            monitor=False,
            use_reserved_connections=use_reserved_connections,
            connection_limit=None,
        ),
        track_activities=track_activities,
        connections=Connections(
            client_sessions=client_sessions,
            hidden_sessions=hidden_sessions,
            disabled_sessions=disabled_sessions,
            max_connections=max_connections,
            superuser_reserved_connections=superuser_reserved_connections,
            reserved_connections=reserved_connections,
        ),
        timeouts=timeouts,
        limits=limits,
    )


def messages(findings: Any) -> list[str]:
    return [f.message for f in findings]


def test_a_healthy_server_has_no_problem_and_no_warning() -> None:
    diagnosis = diagnose(make_state())
    assert diagnosis.problems == ()
    assert diagnosis.warnings == ()


@pytest.mark.parametrize(
    ("sessions", "expected"),
    [(7, None), (8, "warning"), (9, "problem"), (10, "problem"), (12, "problem")],
)
def test_connection_usage_is_a_warning_from_80_and_a_problem_from_90_percent_of_usable_slots(
    sessions: int, expected: str | None
) -> None:
    # 13 - 3 superuser_reserved_connections: 10 usable slots, so 8 is exactly 80%, 9 exactly 90%.
    state = make_state(client_sessions=sessions, max_connections=13)
    diagnosis = diagnose(state)
    problems = [m for m in messages(diagnosis.problems) if "connection limit" in m]
    warnings = [m for m in messages(diagnosis.warnings) if "connection usage" in m]
    assert (expected == "problem") == bool(problems)
    assert (expected == "warning") == bool(warnings)
    if problems:
        assert problems[0].startswith("server near its connection limit")
        assert f"{sessions} client sessions of 10 usable slots" in problems[0]


def test_reserved_connections_of_postgresql_16_are_not_usable_slots() -> None:
    # 22 - 3 - 2 = 17 usable: 16 sessions are 94%; without the 2 reserved they would be 84%.
    state = make_state(client_sessions=16, max_connections=22, reserved_connections=2)
    assert state.connections.usable == 17
    assert "server near its connection limit" in messages(diagnose(state).problems)[0]
    older = replace(state, connections=replace(state.connections, reserved_connections=None))
    assert older.connections.usable == 19
    assert diagnose(older).problems == ()


def test_missing_pg_read_all_stats_is_a_loud_problem_with_the_grant_that_fixes_it() -> None:
    diagnosis = diagnose(make_state(role="reaper_blind", read_all_stats=False, hidden_sessions=4))
    (problem,) = diagnosis.problems
    assert "LACKS pg_read_all_stats" in problem.message
    assert "SILENTLY MATCH NONE" in problem.message
    assert "4 hidden now" in problem.message
    assert problem.fix == "GRANT pg_read_all_stats TO reaper_blind"


def test_query_filters_without_pg_read_all_stats_are_a_warning_naming_the_policies() -> None:
    listeners = PolicyConfig(
        name="listeners", max_idle=timedelta(hours=1), exclude_queries=["^LISTEN"]
    )
    reports = PolicyConfig(name="reports", max_idle=timedelta(hours=1), queries=["^SELECT"])
    plain = PolicyConfig(name="idle", max_idle=timedelta(hours=1))
    blind = make_state(role="reaper_blind", read_all_stats=False)
    diagnosis = diagnose(blind, policies=[listeners, plain, reports])
    (warning,) = [w for w in diagnosis.warnings if "last query" in w.message]
    assert warning.message.startswith(
        "policies 'listeners', 'reports' filter on the last query (queries, exclude_queries)"
    )
    assert "'exclude_queries' spares them all" in warning.message
    assert warning.fix == "GRANT pg_read_all_stats TO reaper_blind"
    (one,) = [
        w.message
        for w in diagnose(blind, policies=[listeners]).warnings
        if "last query" in w.message
    ]
    assert one.startswith("policy 'listeners' filters on the last query")
    # Seen, or not used: nothing to say.
    assert not [
        w for w in diagnose(make_state(), policies=[listeners]).warnings if "query" in w.message
    ]
    assert not [w for w in diagnose(blind, policies=[plain]).warnings if "query" in w.message]


def test_missing_pg_signal_backend_is_a_problem() -> None:
    (problem,) = diagnose(make_state(signal_backend=False)).problems
    assert "lacks pg_signal_backend" in problem.message
    assert problem.fix == "GRANT pg_signal_backend TO reaper"


def test_the_fix_quotes_a_role_name_that_sql_would_not_read_bare() -> None:
    (problem,) = diagnose(make_state(role="pg-Reaper", read_all_stats=False)).problems
    assert problem.fix == 'GRANT pg_read_all_stats TO "pg-Reaper"'


@pytest.mark.parametrize(
    ("role", "quoted"), [("user", '"user"'), ("current_user", '"current_user"')]
)
def test_the_fix_quotes_a_role_named_like_a_keyword(role: str, quoted: str) -> None:
    (problem,) = diagnose(make_state(role=role, signal_backend=False)).problems
    assert problem.fix == f"GRANT pg_signal_backend TO {quoted}"


def test_a_limit_fix_quotes_the_name_for_sql_and_for_the_shell() -> None:
    limits = (Limit(kind="role", name="Ops Team", connection_limit=2, sessions=2),)
    (problem,) = diagnose(make_state(limits=limits)).problems
    assert problem.fix == (
        "end its idle sessions (pg-reaper kill --user 'Ops Team'), "
        'or ALTER ROLE "Ops Team" CONNECTION LIMIT <higher>'
    )


def test_a_superuser_reaper_is_a_warning_not_a_problem() -> None:
    state = make_state(superuser=True, signal_backend=True, read_all_stats=True)
    diagnosis = diagnose(state)
    assert diagnosis.problems == ()
    (warning,) = diagnosis.warnings
    assert "is a superuser: more than the reaper needs" in warning.message


def test_reserved_connections_advice_only_from_postgresql_16_and_never_a_problem() -> None:
    assert diagnose(make_state(use_reserved_connections=None)).notes == ()
    without = diagnose(make_state(use_reserved_connections=False, reserved_connections=0))
    assert without.problems == ()
    assert without.warnings == ()
    (note,) = without.notes
    assert "GRANT pg_use_reserved_connections TO reaper and set reserved_connections" in note
    unused = diagnose(make_state(use_reserved_connections=True, reserved_connections=0))
    assert "reserved_connections is 0" in unused.notes[0]
    assert diagnose(make_state(use_reserved_connections=True, reserved_connections=3)).notes == ()


@pytest.mark.parametrize(
    ("sessions", "expected"), [(7, None), (8, "warning"), (9, "problem"), (10, "problem")]
)
def test_a_role_near_its_connection_limit_is_named(sessions: int, expected: str | None) -> None:
    limits = (Limit(kind="role", name="appuser", connection_limit=10, sessions=sessions),)
    diagnosis = diagnose(make_state(limits=limits))
    assert (expected == "problem") == any("role appuser" in m for m in messages(diagnosis.problems))
    assert (expected == "warning") == any("role appuser" in m for m in messages(diagnosis.warnings))


def test_a_database_at_its_connection_limit_is_a_problem_naming_it() -> None:
    limits = (Limit(kind="database", name="shop", connection_limit=2, sessions=2),)
    (problem,) = diagnose(make_state(limits=limits)).problems
    assert problem.message == "database shop near its connection limit: 2 of 2 sessions (100%)"
    assert problem.fix is not None
    assert "ALTER DATABASE shop CONNECTION LIMIT" in problem.fix


def test_a_connection_limit_of_zero_is_a_warning() -> None:
    limits = (Limit(kind="role", name="retired", connection_limit=0, sessions=0),)
    diagnosis = diagnose(make_state(limits=limits))
    assert diagnosis.problems == ()
    assert "CONNECTION LIMIT 0" in diagnosis.warnings[0].message


def test_track_activities_off_is_a_problem_and_disabled_rows_a_warning() -> None:
    assert (
        "track_activities is off"
        in diagnose(make_state(track_activities=False)).problems[0].message
    )
    (warning,) = diagnose(make_state(disabled_sessions=2)).warnings
    assert warning.message.startswith("2 sessions run with track_activities = off")


def timeout(name: str, value: str, *, role: str | None = None) -> Setting:
    if role is None:
        return Setting(
            name=name, value=value, milliseconds=pg_milliseconds(value), source="configuration file"
        )
    return Setting(
        name=name,
        value=value,
        milliseconds=pg_milliseconds(value),
        source="user",
        override=True,
        role=role,
    )


def test_timeouts_are_explained_against_the_policies_they_race_with() -> None:
    policies = [
        PolicyConfig.model_validate({"name": "idle", "states": ["idle"], "max_idle": "15m"}),
        PolicyConfig.model_validate({"name": "quick", "states": ["idle"], "max_idle": "1m"}),
        PolicyConfig.model_validate(
            {"name": "runaway", "states": ["active"], "max_runtime": "30m", "action": "cancel"}
        ),
    ]
    state = make_state(
        timeouts=(
            timeout("statement_timeout", "0"),
            timeout("idle_session_timeout", "5min", role="appuser"),
        )
    )
    (note,) = diagnose(state, policies=policies).notes
    assert note.startswith("idle_session_timeout = 5min for role appuser: the server itself ends")
    assert "acts before policy 'idle' (max_idle 15m)" in note
    assert "policy 'quick' (max_idle 1m) acts first" in note
    assert "runaway" not in note


def test_a_statement_timeout_shorter_than_max_runtime_preempts_the_policy() -> None:
    policies = [
        PolicyConfig.model_validate(
            {"name": "runaway", "states": ["active"], "max_runtime": "30m", "action": "cancel"}
        )
    ]
    state = make_state(timeouts=(timeout("statement_timeout", "10min"),))
    (note,) = diagnose(state, policies=policies).notes
    assert note.startswith("statement_timeout = 10min server-wide (configuration file)")
    assert "acts before policy 'runaway' (max_runtime 30m)" in note


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("300000", 300_000),
        ("5min", 300_000),
        ("5 min", 300_000),
        ("1.5s", 1500),
        ("2h", 7_200_000),
        ("1d", 86_400_000),
        ("0", 0),
        ("five minutes", None),
    ],
)
def test_time_settings_are_read_as_postgresql_reads_them(text: str, ms: int | None) -> None:
    assert pg_milliseconds(text) == ms


def test_rows_become_a_state_with_overrides_normalised_and_the_reapers_masking_noted() -> None:
    rows: dict[str, list[dict[str, Any]]] = {
        "server": [
            {
                "server_version": "16.4",
                "server_version_num": 160_004,
                "in_recovery": True,
                "role": "reaper_lp",
                "superuser": False,
                "connection_limit": -1,
                "signal_backend": True,
                "read_all_stats": True,
                "monitor": False,
                "use_reserved_connections": True,
                "track_activities": True,
            }
        ],
        "connections": [
            {
                "client_sessions": 3,
                "hidden_sessions": 0,
                "disabled_sessions": 0,
                "max_connections": 100,
                "superuser_reserved_connections": 3,
                "reserved_connections": 2,
            }
        ],
        "limits": [{"kind": "role", "name": "appuser", "connection_limit": 5, "sessions": 1}],
        "overrides": [
            {"role": "appuser", "database": None, "name": "idle_session_timeout", "value": "5 min"},
            {"role": None, "database": "shop", "name": "track_activities", "value": "off"},
        ],
        "timeouts": [
            {"name": "statement_timeout", "setting": "7000", "unit": "ms", "source": "user"},
            {"name": "idle_session_timeout", "setting": "0", "unit": "ms", "source": "default"},
        ],
    }
    state = read_state(rows)
    assert state.in_recovery
    assert state.privileges.connection_limit is None
    assert state.connections.usable == 95
    names = [(t.name, t.value, t.source, t.role) for t in state.timeouts]
    assert names == [
        ("idle_session_timeout", "0", "default", None),
        ("statement_timeout", "7s", "user", None),
        ("idle_session_timeout", "5min", "user", "appuser"),
    ]
    assert state.timeouts[1].scope == "as the reaper's session gets it (user)"
    (untracked,) = state.untracked
    assert untracked.scope == "in database shop"
    assert "ALTER DATABASE shop RESET track_activities" in [w.fix for w in diagnose(state).warnings]


def test_text_output_has_one_line_per_problem_with_its_fix() -> None:
    state = make_state(read_all_stats=False)
    report = ServerReport(server="main", target="db:5432", state=state, diagnosis=diagnose(state))
    text = render_text([report])
    assert text.splitlines()[0] == "main (db:5432): 1 problem"
    assert "  PROBLEM: ROLE reaper LACKS pg_read_all_stats" in text
    assert "— fix: GRANT pg_read_all_stats TO reaper" in text
    assert render_json([report])["ok"] is False


def test_an_unexaminable_server_is_a_problem_in_both_outputs() -> None:
    error = "cannot connect to db:5432: connection refused"
    report = ServerReport(
        server="main", target="db:5432", state=None, error=error, diagnosis=failed(error)
    )
    assert not report.ok
    assert f"PROBLEM: server could not be examined: {error}" in render_text([report])
    document = render_json([report])
    assert document["servers"][0]["error"] == error
    assert document["servers"][0]["privileges"] is None


# --- the command against real servers ----------------------------------------------------------


def run_doctor(
    capsys: pytest.CaptureFixture[str], config: Path, *extra: str
) -> tuple[int, dict[str, Any]]:
    code = main(["doctor", "-c", str(config), "--json", *extra])
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, document


def run_doctor_text(capsys: pytest.CaptureFixture[str], config: Path) -> tuple[int, str]:
    code = main(["doctor", "-c", str(config)])
    return code, capsys.readouterr().out


def only_server(document: dict[str, Any]) -> dict[str, Any]:
    servers: list[dict[str, Any]] = document["servers"]
    (server,) = servers
    return server


def problem_messages(server: dict[str, Any]) -> list[str]:
    return [p["message"] for p in server["problems"]]


@pytest.mark.integration
def test_a_reaper_without_pg_read_all_stats_fails_loudly_with_the_grant(
    pg: TestServer, write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(IDLE_POLICY, dsn=pg.dsn(user="reaper_blind", password="reaper_blind"))

    code, text = run_doctor_text(capsys, config)

    assert code == 1
    (line,) = [line for line in text.splitlines() if "pg_read_all_stats TO" in line]
    assert line.startswith("  PROBLEM: ROLE reaper_blind LACKS pg_read_all_stats")
    assert line.endswith("— fix: GRANT pg_read_all_stats TO reaper_blind")
    assert f"PostgreSQL {pg.major}" in text


@pytest.mark.integration
def test_query_filters_without_pg_read_all_stats_get_a_warning_from_doctor(
    pg: TestServer, write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    listeners = IDLE_POLICY + "exclude_queries = ['^LISTEN']\n"
    blind = write_config(listeners, dsn=pg.dsn(user="reaper_blind", password="reaper_blind"))

    code, text = run_doctor_text(capsys, blind)

    assert code == 1  # the missing privilege itself is a problem
    (line,) = [line for line in text.splitlines() if "last query" in line]
    assert line.startswith("  warning: policy 'idle' filters on the last query"), line
    # With the privilege, nothing to say about it.
    seeing = write_config(listeners, dsn=pg.dsn(user="reaper_lp", password="reaper_lp"))
    code, text = run_doctor_text(capsys, seeing)
    assert "last query" not in text


@pytest.mark.integration
def test_a_least_privilege_reaper_has_no_privilege_problem(
    pg: TestServer, write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(IDLE_POLICY, dsn=pg.dsn(user="reaper_lp", password="reaper_lp"))

    code, document = run_doctor(capsys, config)

    server = only_server(document)
    assert code == 0, server["problems"]
    assert document["ok"] is True
    assert server["problems"] == []
    assert server["role"] == "reaper_lp"
    assert server["version"].startswith(str(pg.major))
    assert server["in_recovery"] is False
    privileges = server["privileges"]
    assert privileges["pg_signal_backend"] is True
    assert privileges["pg_read_all_stats"] is True
    assert privileges["superuser"] is False
    assert (privileges["pg_use_reserved_connections"] is None) == (pg.major < 16)
    assert (server["connections"]["reserved_connections"] is None) == (pg.major < 16)
    names = {t["name"] for t in server["timeouts"]}
    assert ("transaction_timeout" in names) == (pg.major >= 17)


@pytest.mark.integration
def test_a_role_at_its_connection_limit_is_a_problem_naming_it(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(IDLE_POLICY, dsn=pg.dsn(user="reaper_lp", password="reaper_lp"))
    pg.execute("ALTER ROLE appuser CONNECTION LIMIT 2")
    try:
        for _ in range(2):
            sessions.idle(user="appuser", password="appuser", tcp=True)

        code, document = run_doctor(capsys, config)

        assert code == 1
        server = only_server(document)
        (limit,) = [x for x in server["limits"] if x["kind"] == "role" and x["name"] == "appuser"]
        assert (limit["connection_limit"], limit["sessions"]) == (2, 2)
        assert "role appuser near its connection limit: 2 of 2 sessions (100%)" in (
            problem_messages(server)
        )
    finally:
        pg.execute("ALTER ROLE appuser CONNECTION LIMIT -1")


@pytest.mark.integration
def test_a_per_role_idle_session_timeout_shows_up_with_its_interplay(
    pg: TestServer, write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(IDLE_POLICY, dsn=pg.dsn(user="reaper_lp", password="reaper_lp"))
    pg.execute("ALTER ROLE appuser SET idle_session_timeout = '5min'")
    try:
        code, document = run_doctor(capsys, config)
        text_code, text = run_doctor_text(capsys, config)
    finally:
        pg.execute("ALTER ROLE appuser RESET idle_session_timeout")

    assert code == text_code == 0
    server = only_server(document)
    assert {
        "name": "idle_session_timeout",
        "value": "5min",
        "milliseconds": 300_000,
        "source": "user",
        "role": "appuser",
        "database": None,
    } in server["timeouts"]
    assert "idle_session_timeout = 5min for role appuser" in text
    assert any("acts before policy 'idle' (max_idle 15m)" in n for n in server["notes"])


@pytest.mark.integration
def test_sessions_without_track_activities_are_reported(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    hidden = sessions.open(application="untracked")
    hidden.execute("SET track_activities = off")  # a superuser-only setting
    hidden.execute("SELECT 1")
    pg.wait_state(hidden.info.backend_pid, "disabled")
    config = write_config(IDLE_POLICY, dsn=pg.dsn(user="reaper_lp", password="reaper_lp"))

    code, document = run_doctor(capsys, config)

    assert code == 0
    server = only_server(document)
    assert server["connections"]["disabled_sessions"] == 1
    assert any("track_activities = off" in w["message"] for w in server["warnings"])


@pytest.mark.integration
def test_an_unknown_server_name_is_a_usage_error(
    write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "-c", str(write_config(IDLE_POLICY)), "--server", "nope"]) == 2
    assert "'nope' is not configured" in capsys.readouterr().err


# A server of our own, small enough to fill: 20 slots, 3 of them for superusers (and
# reserved_connections 0 on 16+), so 17 usable. It also has a server-wide timeout in its config.


@pytest.fixture(scope="module")
def small_server(pg_major: int) -> Iterator[EmbeddedPostgres]:
    settings = {"max_connections": "20", "idle_in_transaction_session_timeout": "10min"}
    with EmbeddedPostgres(major=pg_major, settings=settings) as server:
        yield server


def small_config(tmp_path: Path, server: EmbeddedPostgres) -> Path:
    path = tmp_path / "small.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [log]
            format = "json"

            [[servers]]
            name = "small"
            dsn = "{server.dsn()}"
            """
        )
        + IDLE_POLICY,
        encoding="utf-8",
    )
    return path


@pytest.mark.integration
def test_a_server_at_90_percent_of_its_connections_is_a_problem(
    small_server: EmbeddedPostgres, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = small_config(tmp_path, small_server)
    opened: list[psycopg.Connection[Any]] = []

    def open_until(total: int) -> None:
        """Idle sessions until `total` client sessions, the reaper's own included."""
        while len(opened) + 1 < total:
            opened.append(psycopg.connect(small_server.dsn(), autocommit=True))

    try:
        open_until(9)  # 9 of 17: 53%
        code, document = run_doctor(capsys, config)
        server = only_server(document)
        assert server["connections"]["client_sessions"] == 9
        assert server["connections"]["usable"] == 17
        assert code == 0, server["problems"]  # the superuser reaper is only a warning
        assert not [w for w in server["warnings"] if "connection" in w["message"]]

        open_until(14)  # 82%
        code, document = run_doctor(capsys, config)
        server = only_server(document)
        assert code == 0
        assert any(
            w["message"].startswith("server connection usage high: 14 client sessions of 17")
            for w in server["warnings"]
        )

        open_until(16)  # 94%
        code, text = run_doctor_text(capsys, config)
        assert code == 1
        assert (
            "  PROBLEM: server near its connection limit: 16 client sessions of 17 usable slots "
            "(94%; max_connections 20 - superuser_reserved_connections 3"
        ) in text
    finally:
        for conn in opened:
            conn.close()


@pytest.mark.integration
def test_server_wide_timeouts_are_the_servers_not_the_reapers_own(
    small_server: EmbeddedPostgres, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The reaper sets these timeouts to 0 for its own session: doctor must see past that.
    code, document = run_doctor(capsys, small_config(tmp_path, small_server))

    assert code == 0
    timeouts = {t["name"]: t for t in only_server(document)["timeouts"] if t["role"] is None}
    assert timeouts["idle_in_transaction_session_timeout"]["value"] == "10min"
    assert timeouts["idle_in_transaction_session_timeout"]["source"] == "configuration file"
    assert timeouts["statement_timeout"]["value"] == "0"
    assert timeouts["statement_timeout"]["source"] == "default"


@pytest.mark.integration
def test_doctor_leaves_the_reapers_own_session_settings_as_they_were(
    small_server: EmbeddedPostgres,
) -> None:
    with ServerConnection(
        dsn=small_server.dsn(),
        connect_timeout=timedelta(seconds=5),
        statement_timeout=timedelta(seconds=10),
    ) as conn:
        doctor_rows(conn)
        rows = conn.run(
            "SELECT current_setting('idle_in_transaction_session_timeout') AS idle_in_tx,"
            " current_setting('statement_timeout') AS statement"
        )
    assert rows == [{"idle_in_tx": "0", "statement": "10s"}]


def test_an_unreachable_server_is_a_problem_naming_it_without_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    config = tmp_path / "unreachable.toml"
    config.write_text(
        textwrap.dedent(
            f"""\
            [reaper]
            connect_timeout = "2s"

            [log]
            format = "json"

            [[servers]]
            name = "gone"
            dsn = "host=127.0.0.1 port={port} user=reaper password={PASSWORD} dbname=postgres"
            """
        )
        + IDLE_POLICY,
        encoding="utf-8",
    )

    code = main(["doctor", "-c", str(config)])
    text = capsys.readouterr()
    json_code = main(["doctor", "-c", str(config), "--json"])
    as_json = capsys.readouterr()

    assert code == json_code == 1
    assert f"PROBLEM: server could not be examined: cannot connect to 127.0.0.1:{port}" in text.out
    server = only_server(json.loads(as_json.out))
    assert server["ok"] is False
    assert f"127.0.0.1:{port}" in server["error"]
    for output in (text.out, text.err, as_json.out, as_json.err):
        assert PASSWORD not in output


# --- the fixes doctor prints run as printed -----------------------------------------------------

# Roles whose names SQL would read as something else when bare: a syntax error (user) or the
# role running the statement (current_user, i.e. the superuser pasting the fix).
KEYWORD_ROLES = ("user", "current_user")
KEYWORD_DATABASE = "table"
# A statement doctor prints for a person to run: a fix, or the GRANT inside a note.
_PRINTED_STATEMENT = re.compile(r'(?:GRANT|ALTER) (?:[^;"—]|"(?:[^"]|"")*")*?(?=$| and set |; )')


@pytest.fixture
def keyword_roles(pg: TestServer) -> Iterator[None]:
    """LOGIN roles named `user` and `current_user`, without privileges, and a database `table`,
    each with track_activities off in that database (the reaper connects to another)."""

    def drop() -> None:
        pg.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(KEYWORD_DATABASE)))
        for role in KEYWORD_ROLES:
            pg.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))

    drop()
    pg.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(KEYWORD_DATABASE)))
    for role in KEYWORD_ROLES:
        pg.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(role)
            )
        )
        pg.execute(
            sql.SQL("ALTER ROLE {} IN DATABASE {} SET track_activities = off").format(
                sql.Identifier(role), sql.Identifier(KEYWORD_DATABASE)
            )
        )
    pg.execute(
        sql.SQL("ALTER DATABASE {} SET track_activities = off").format(
            sql.Identifier(KEYWORD_DATABASE)
        )
    )
    yield
    drop()


def _memberships(pg: TestServer, role: str) -> set[str]:
    """The roles `role` was granted, read from the catalog (pg_has_role is true for a superuser
    whatever was granted)."""
    rows = pg.execute(
        "SELECT g.rolname FROM pg_catalog.pg_auth_members AS m"
        " JOIN pg_catalog.pg_roles AS r ON r.oid = m.member"
        " JOIN pg_catalog.pg_roles AS g ON g.oid = m.roleid WHERE r.rolname = %s",
        [role],
    )
    return {name for (name,) in rows}


def _track_activities_overrides(pg: TestServer) -> set[tuple[str | None, str | None]]:
    """(role, database) of every ALTER ROLE/DATABASE ... SET track_activities left."""
    rows = pg.execute(
        "SELECT r.rolname, d.datname FROM pg_catalog.pg_db_role_setting AS s"
        " LEFT JOIN pg_catalog.pg_roles AS r ON r.oid = s.setrole"
        " LEFT JOIN pg_catalog.pg_database AS d ON d.oid = s.setdatabase"
        " WHERE pg_catalog.array_to_string(s.setconfig, ',') LIKE '%%track_activities%%'"
    )
    return {(role, database) for role, database in rows}


@pytest.mark.integration
@pytest.mark.usefixtures("keyword_roles")
@pytest.mark.parametrize("role", KEYWORD_ROLES)
def test_every_fix_doctor_prints_for_a_keyword_named_role_runs_as_printed(
    role: str,
    pg: TestServer,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(IDLE_POLICY, dsn=pg.dsn(user=role, password=role))
    superuser = pg.execute("SELECT current_user")[0][0]
    before = _memberships(pg, superuser)

    code, text = run_doctor_text(capsys, config)

    assert code == 1, text
    statements = [m[0] for line in text.splitlines() for m in _PRINTED_STATEMENT.finditer(line)]
    grants = [s for s in statements if s.startswith("GRANT")]
    expected = {"pg_read_all_stats", "pg_signal_backend"}
    if pg.major >= 16:
        expected.add("pg_use_reserved_connections")  # the note's GRANT
    assert {s.split()[1] for s in grants} == expected, text
    assert all(s.endswith(f' TO "{role}"') for s in grants), grants
    resets = [s for s in statements if s.startswith("ALTER")]
    assert sorted(resets) == [
        f'ALTER DATABASE "{KEYWORD_DATABASE}" RESET track_activities',
        f'ALTER ROLE "current_user" IN DATABASE "{KEYWORD_DATABASE}" RESET track_activities',
        f'ALTER ROLE "user" IN DATABASE "{KEYWORD_DATABASE}" RESET track_activities',
    ], text

    for statement in statements:
        pg.execute(statement)  # exactly as printed

    assert _memberships(pg, role) == expected
    for granted in expected:
        assert pg.execute("SELECT pg_catalog.pg_has_role(%s, %s, 'MEMBER')", [role, granted])[0][0]
    assert _memberships(pg, superuser) == before  # not granted to whoever ran it
    assert _track_activities_overrides(pg) == set()
    code, document = run_doctor(capsys, config)
    assert only_server(document)["problems"] == [], document
