"""Servers whose settings someone else chose: the reaper's session is immune to them.

Every case runs in a database owned by a non-superuser who has planted a trap: functions and
views in schema `public` that shadow the ones pg-reaper calls (`now()`, `pg_backend_pid()`,
`pg_terminate_backend()` ...), each of which records who ran it in a trap table, and a database
setting that searches `public` before `pg_catalog`. On top of that each case adds its own unusual
settings (DateStyle, IntervalStyle, a half-hour TimeZone, a SQL_ASCII database, tiny per-role
timeouts, ...). In every case one session idle past `max_idle` is reaped, a fresh one is spared,
ages are right (no skewed clock), no command crashes, and the trap table stays empty: none of the
owner's functions ran as the reaper.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import sql

from reaper.cli import main
from reaper.policy import DROPPED_ROLE
from tests.servers import Sessions, TestServer, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.integration

OWNER = "hostile_owner"  # owns the hostile databases; no superuser
REAPER = "reaper_lp"  # pg_signal_backend + pg_read_all_stats (tests/conftest.py)
VICTIM_ROLE = "appuser"
MAX_IDLE = 2.0

# What the database owner plants: every function pg-reaper calls, shadowed in public, each
# recording who ran it; and views shadowing the catalogs pg-reaper reads, showing nothing.
_TRAP_FUNCTIONS = {
    "now()": ("timestamptz", "pg_catalog.now() + interval '1 day'"),
    "clock_timestamp()": ("timestamptz", "pg_catalog.clock_timestamp() + interval '1 day'"),
    "pg_backend_pid()": ("integer", "0"),
    "pg_terminate_backend(integer)": ("boolean", "false"),
    "pg_terminate_backend(integer, bigint)": ("boolean", "false"),
    "pg_cancel_backend(integer)": ("boolean", "false"),
    "pg_has_role(name, text)": ("boolean", "true"),
    "pg_has_role(oid, text)": ("boolean", "true"),
    "current_setting(text)": ("text", "'0'"),
    "current_setting(text, boolean)": ("text", "'0'"),
    "set_config(text, text, boolean)": ("text", "''"),
    "host(inet)": ("text", "'10.0.0.1'"),
    "pg_stat_clear_snapshot()": ("void", "NULL"),
    "pg_try_advisory_lock(bigint)": ("boolean", "false"),
    "to_regclass(text)": ("regclass", "NULL"),
    "current_database()": ("name", "'nowhere'"),
    "pg_postmaster_start_time()": ("timestamptz", "pg_catalog.now()"),
    "pg_is_in_recovery()": ("boolean", "true"),
    "split_part(text, text, integer)": ("text", "''"),
    "pg_get_userbyid(oid)": ("name", "'postgres'"),
}
_TRAP_VIEWS = ("pg_roles", "pg_stat_activity", "pg_database", "pg_locks", "pg_settings")


@dataclass
class Case:
    name: str
    # Statements run as the superuser once the hostile database `db` exists ({db} filled in).
    settings: list[str] = field(default_factory=list)
    encoding: str | None = None
    config_log: str = 'format = "json"'
    # Statements run as the superuser in the hostile database.
    extra: list[str] = field(default_factory=list)


def _cases(major: int) -> list[Case]:
    parallel = "debug_parallel_query" if major >= 16 else "force_parallel_mode"
    tiny = [
        "statement_timeout = '1ms'",
        "lock_timeout = '1ms'",
        "idle_session_timeout = '1ms'",
        "idle_in_transaction_session_timeout = '1ms'",
        "default_transaction_read_only = on",
        "default_transaction_isolation = 'serializable'",
        "work_mem = '64kB'",
        f"{parallel} = on",
        "parallel_setup_cost = 0",
        "parallel_tuple_cost = 0",
        "min_parallel_table_scan_size = 0",
        "jit_above_cost = 0",
        "default_tablespace = 'nowhere'",
    ]
    if major >= 17:
        tiny.append("transaction_timeout = '1ms'")
    return [
        Case(name="search_path"),
        Case(
            name="datestyle_sql_dmy",
            settings=[
                "ALTER DATABASE {db} SET datestyle = 'SQL, DMY'",
                "ALTER DATABASE {db} SET intervalstyle = 'sql_standard'",
                "ALTER DATABASE {db} SET timezone = 'Asia/Kolkata'",
            ],
        ),
        Case(
            name="datestyle_german",
            settings=[
                "ALTER DATABASE {db} SET datestyle = 'German'",
                "ALTER DATABASE {db} SET intervalstyle = 'iso_8601'",
                "ALTER ROLE " + REAPER + " IN DATABASE {db} SET timezone = 'Australia/Adelaide'",
                "ALTER ROLE " + REAPER + " IN DATABASE {db} SET extra_float_digits = -15",
            ],
        ),
        Case(
            name="sql_ascii",
            encoding="SQL_ASCII",
            config_log='format = "json"\ninclude_query = true',
        ),
        Case(
            name="tiny_role_settings",
            settings=[f"ALTER ROLE {REAPER} IN DATABASE {{db}} SET {s}" for s in tiny],
        ),
    ]


CASE_NAMES = [c.name for c in _cases(18)]


# --- the hostile database ----------------------------------------------------------------------


def _trap_ddl() -> list[str]:
    statements = [
        (
            "CREATE TABLE public.trap (fn text, ran_as name, at timestamptz DEFAULT "
            "pg_catalog.clock_timestamp())"
        ),
        "GRANT INSERT ON public.trap TO PUBLIC",
    ]
    for signature, (returns, value) in _TRAP_FUNCTIONS.items():
        name = signature.split("(")[0]
        body = (
            f"BEGIN INSERT INTO public.trap (fn, ran_as) VALUES ('{name}', current_user); "
            f"RETURN {value}; END"
        )
        if returns == "void":
            body = (
                f"BEGIN INSERT INTO public.trap (fn, ran_as) VALUES ('{name}', current_user); END"
            )
        statements.append(
            f"CREATE FUNCTION public.{signature} RETURNS {returns} LANGUAGE plpgsql "
            f"AS $trap$ {body} $trap$"
        )
    statements.append(
        "CREATE FUNCTION public.unnest(anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql "
        "AS $trap$ BEGIN INSERT INTO public.trap (fn, ran_as) VALUES ('unnest', current_user); "
        "RETURN; END $trap$"
    )
    statements.extend(
        f"CREATE VIEW public.{view} AS SELECT * FROM pg_catalog.{view} WHERE false"
        for view in _TRAP_VIEWS
    )
    return statements


def _make_hostile_database(pg: TestServer, db: str, case: Case) -> None:
    pg.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
    if not _role_exists(pg, OWNER):
        pg.execute(f"CREATE ROLE {OWNER} LOGIN PASSWORD '{OWNER}'")
    create = sql.SQL("CREATE DATABASE {} OWNER {}").format(
        sql.Identifier(db), sql.Identifier(OWNER)
    )
    if case.encoding:
        create = sql.SQL(
            "CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C'"
        ).format(sql.Identifier(db), sql.Identifier(OWNER), sql.Literal(case.encoding))
    pg.execute(create)
    # PostgreSQL 14's schema public lets everyone create; 15+ gives it to the database owner.
    with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(OWNER)))
        for statement in case.extra:
            admin.execute(statement)
    with psycopg.connect(pg.dsn(user=OWNER, password=OWNER, dbname=db), autocommit=True) as owner:
        for statement in _trap_ddl():
            owner.execute(statement)
        owner.execute(
            sql.SQL("ALTER DATABASE {} SET search_path = public, pg_catalog").format(
                sql.Identifier(db)
            )
        )
    for statement in case.settings:
        pg.execute(statement.format(db=db))


def _role_exists(pg: TestServer, role: str) -> bool:
    return bool(pg.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)))


def _trap_rows(pg: TestServer, db: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn(dbname=db), autocommit=True, client_encoding="UTF8") as admin:
        return admin.execute("SELECT fn, ran_as FROM public.trap ORDER BY at").fetchall()


def _arm_check(pg: TestServer, db: str) -> None:
    """An ordinary client of the database does walk into the trap: the test can fail."""
    dsn = pg.dsn(user=VICTIM_ROLE, password=VICTIM_ROLE, dbname=db)
    with psycopg.connect(dsn, autocommit=True) as client:
        client.execute("SELECT now(), pg_backend_pid()")
    assert {row[0] for row in _trap_rows(pg, db)} >= {"now", "pg_backend_pid"}
    with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as admin:
        admin.execute("TRUNCATE public.trap")


def _config(
    tmp_path: Path,
    pg: TestServer,
    *,
    db: str,
    log: str = 'format = "json"',
    extra: str = "",
    audit_db: str | None = None,
) -> Path:
    """The reaper's role on database `db`, an idle policy for the test's own sessions; with
    `audit_db`, the audit table in that database."""
    dsn = pg.dsn(user=REAPER, password=REAPER, dbname=db)
    audit = ""
    if audit_db is not None:
        audit_dsn = pg.dsn(user=REAPER, password=REAPER, dbname=audit_db)
        audit = f"[audit]\ndsn = {json.dumps(audit_dsn)}\n"
    path = tmp_path / f"{db}.toml"
    path.write_text(
        f"""
[reaper]
connect_timeout = "5s"
statement_timeout = "5s"

[log]
{log}

[[servers]]
name = "hostile"
dsn = {json.dumps(dsn)}

[[policies]]
name = "idle"
states = ["idle"]
max_idle = "{MAX_IDLE:g}s"
applications = ["^victim$", "^fresh$", "^hostile-"]
{extra}

{audit}""",
        encoding="utf-8",
    )
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    document = json.loads(captured.out) if "--json" in argv else captured.out
    return code, document, captured.err


def _decisions(document: Any) -> dict[int, dict[str, Any]]:
    return {d["pid"]: d for server in document["servers"] for d in server["decisions"]}


# --- the cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_a_hostile_database_neither_runs_code_as_the_reaper_nor_skews_nor_stops_it(
    pg: TestServer,
    sessions: Sessions,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case_name: str,
) -> None:
    case = next(c for c in _cases(pg.major) if c.name == case_name)
    db = f"hostile_{case.name}"
    _make_hostile_database(pg, db, case)
    _arm_check(pg, db)
    victim = sessions.idle(application="victim", user=VICTIM_ROLE, password=VICTIM_ROLE, dbname=db)
    if case.encoding == "SQL_ASCII":  # a query text that is not UTF-8, read with include_query
        victim.execute(b"SELECT 'caf\xe9'")
        # A role and a database whose names are not UTF-8 (made in a SQL_ASCII database).
        with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as raw:
            raw.execute("SET client_encoding = 'SQL_ASCII'")
            raw.execute(b'DROP ROLE IF EXISTS "hostile-caf\xe9"')
            raw.execute(b'CREATE ROLE "hostile-caf\xe9" LOGIN')
            raw.execute(b'DROP DATABASE IF EXISTS "hostile-caf\xe9"')
            raw.execute(b'CREATE DATABASE "hostile-caf\xe9"')
    time.sleep(MAX_IDLE + 0.5)
    fresh = sessions.idle(application="fresh", user=VICTIM_ROLE, password=VICTIM_ROLE, dbname=db)
    config = _config(tmp_path, pg, db=db, log=case.config_log)

    code, preview, _ = _run(capsys, "preview", "-c", str(config), "--json")
    assert code == 0
    planned = _decisions(preview)
    assert set(planned) == {victim.info.backend_pid}
    # The clock is the server's own: about MAX_IDLE, not a day more.
    assert MAX_IDLE < planned[victim.info.backend_pid]["idle_seconds"] < 120

    code, document, _ = _run(capsys, "once", "-c", str(config), "--json")
    assert code == 0
    decided = _decisions(document)
    assert decided[victim.info.backend_pid]["result"] == "terminated"
    assert fresh.info.backend_pid not in decided
    assert pg.wait_gone(victim.info.backend_pid)
    assert pg.is_alive(fresh.info.backend_pid)

    for command in ("doctor", "sessions"):
        code, _, _ = _run(capsys, command, "-c", str(config), "--json")
        assert code in {0, 1}, command
    assert _trap_rows(pg, db) == []


def test_settings_from_the_environment_do_not_skew_the_session(
    pg: TestServer,
    sessions: Sessions,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    victim = sessions.idle(application="victim", user=VICTIM_ROLE, password=VICTIM_ROLE)
    time.sleep(MAX_IDLE + 0.5)
    fresh = sessions.idle(application="fresh", user=VICTIM_ROLE, password=VICTIM_ROLE)
    # libpq sends PGDATESTYLE and PGTZ as startup parameters, and PGOPTIONS as options: set
    # for the reaper's run only (the test's own sessions would get statement_timeout = 1 ms).
    with monkeypatch.context() as env:
        env.setenv("PGDATESTYLE", "German")
        env.setenv("PGTZ", "Asia/Kolkata")
        env.setenv("PGOPTIONS", "-c statement_timeout=1 -c search_path=public")
        code, document, _ = _run(
            capsys, "once", "-c", str(_config(tmp_path, pg, db="postgres")), "--json"
        )

    assert code == 0
    decided = _decisions(document)
    assert decided[victim.info.backend_pid]["result"] == "terminated"
    assert MAX_IDLE < decided[victim.info.backend_pid]["idle_seconds"] < 120
    assert fresh.info.backend_pid not in decided
    assert pg.wait_gone(victim.info.backend_pid)


# --- a session that names itself pg-reaper -----------------------------------------------------


def test_naming_a_session_pg_reaper_spares_it_only_for_a_role_that_could_be_a_reapers(
    pg: TestServer,
    sessions: Sessions,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # application_name is the client's to choose: an application that takes pg-reaper's name
    # opts out of nothing. A session of a role with pg_signal_backend (another instance's) is
    # spared.
    spoofed = sessions.idle(application="pg-reaper", user=VICTIM_ROLE, password=VICTIM_ROLE)
    instance = sessions.idle(application="pg-reaper", user=REAPER, password=REAPER)
    time.sleep(MAX_IDLE + 0.5)
    config = _config(tmp_path, pg, db="postgres")
    config.write_text(
        config.read_text(encoding="utf-8").replace(
            'applications = ["^victim$", "^fresh$", "^hostile-"]', 'applications = ["^pg-reaper$"]'
        ),
        encoding="utf-8",
    )

    code, document, _ = _run(capsys, "once", "-c", str(config), "--json")

    assert code == 0
    decided = _decisions(document)
    assert decided[spoofed.info.backend_pid]["result"] == "terminated"
    assert instance.info.backend_pid not in decided
    assert pg.wait_gone(spoofed.info.backend_pid)
    assert pg.is_alive(instance.info.backend_pid)


# --- a role dropped under its own session ------------------------------------------------------


@pytest.fixture
def dropped_session(pg: TestServer, sessions: Sessions) -> Callable[[], psycopg.Connection[Any]]:
    def open_and_drop() -> psycopg.Connection[Any]:
        pg.execute("DROP ROLE IF EXISTS hostile_doomed")
        pg.execute("CREATE ROLE hostile_doomed LOGIN PASSWORD 'doomed'")
        conn = sessions.idle(application="hostile-doomed", user="hostile_doomed", password="doomed")
        pg.execute("DROP ROLE hostile_doomed")  # PostgreSQL lets its session stay
        assert pg.execute(
            "SELECT usename IS NULL FROM pg_stat_activity WHERE pid = %s", (conn.info.backend_pid,)
        ) == [(True,)]
        return conn

    return open_and_drop


def test_a_session_whose_role_was_dropped_is_reaped_under_the_dropped_name(
    pg: TestServer,
    dropped_session: Callable[[], psycopg.Connection[Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    orphan = dropped_session()
    time.sleep(MAX_IDLE + 0.5)

    code, document, _ = _run(
        capsys, "once", "-c", str(_config(tmp_path, pg, db="postgres")), "--json"
    )

    assert code == 0
    decision = _decisions(document)[orphan.info.backend_pid]
    assert decision["result"] == "terminated"
    assert decision["user"] == DROPPED_ROLE
    assert pg.wait_gone(orphan.info.backend_pid)


def test_exclude_users_can_name_a_dropped_role(
    pg: TestServer,
    dropped_session: Callable[[], psycopg.Connection[Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    orphan = dropped_session()
    time.sleep(MAX_IDLE + 0.5)
    config = _config(tmp_path, pg, db="postgres", extra=f'exclude_users = ["{DROPPED_ROLE}"]')

    code, document, _ = _run(capsys, "once", "-c", str(config), "--json")

    assert code == 0
    assert orphan.info.backend_pid not in _decisions(document)
    assert pg.is_alive(orphan.info.backend_pid)


# --- the audit table ---------------------------------------------------------------------------


def test_an_audit_table_someone_else_owns_is_refused_and_runs_none_of_their_code(
    pg: TestServer,
    sessions: Sessions,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = "hostile_audit"
    _make_hostile_database(pg, db, Case(name="audit"))
    with psycopg.connect(pg.dsn(user=OWNER, password=OWNER, dbname=db), autocommit=True) as owner:
        # What the table's owner could make an INSERT run as the reaper's role.
        owner.execute(
            "CREATE TABLE public.pg_reaper_audit (LIKE public.trap, "
            "extra text DEFAULT public.now()::text)"
        )
        owner.execute("GRANT INSERT ON public.pg_reaper_audit TO PUBLIC")
    victim = sessions.idle(application="victim", user=VICTIM_ROLE, password=VICTIM_ROLE)
    time.sleep(MAX_IDLE + 0.5)
    config = _config(tmp_path, pg, db="postgres", audit_db=db)

    code = main(["once", "-c", str(config), "--json"])

    err = capsys.readouterr().err
    assert code == 2  # said at start, before anything is reaped
    assert f"owned by role {OWNER!r}" in err
    assert pg.is_alive(victim.info.backend_pid)
    assert _trap_rows(pg, db) == []
    with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as admin:
        assert admin.execute("SELECT count(*) FROM public.pg_reaper_audit").fetchone() == (0,)


def test_audit_rows_are_written_under_a_read_only_default(
    pg: TestServer,
    sessions: Sessions,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = "hostile_readonly"
    pg.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    pg.execute(f"CREATE DATABASE {db}")
    with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as admin:
        admin.execute(f"GRANT CREATE ON SCHEMA public TO {REAPER}")
    pg.execute(f"ALTER DATABASE {db} SET default_transaction_read_only = on")
    pg.execute(f"ALTER ROLE {REAPER} IN DATABASE {db} SET statement_timeout = '1ms'")
    victim = sessions.idle(application="victim", user=VICTIM_ROLE, password=VICTIM_ROLE)
    time.sleep(MAX_IDLE + 0.5)
    config = _config(tmp_path, pg, db="postgres", audit_db=db)

    code, _, _ = _run(capsys, "once", "-c", str(config), "--json")

    assert code == 0

    def written() -> bool:
        with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as admin:
            rows = admin.execute(
                "SELECT pid, result FROM public.pg_reaper_audit WHERE pid = %s",
                (victim.info.backend_pid,),
            ).fetchall()
        return rows == [(victim.info.backend_pid, "terminated")]

    wait_for(written, what="the audit row")
