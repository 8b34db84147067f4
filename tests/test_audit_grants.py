"""The audit table for real deployments: made beforehand with deploy/sql/pg_reaper_audit.sql,
written by the role of deploy/sql/pg_reaper_role.sql with no CREATE anywhere, and a missing
privilege said at start rather than found out by dropped rows."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import sql

from reaper.cli import main
from reaper.pg.audit import AuditConnection
from tests.servers import Sessions, TestServer, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
ROLE_SQL = ROOT / "deploy" / "sql" / "pg_reaper_role.sql"
AUDIT_SQL = ROOT / "deploy" / "sql" / "pg_reaper_audit.sql"
ROLE = "pg-reaper"
DB = "audit_grants"
TIMEOUT = timedelta(seconds=5)


def _run_sql(pg: TestServer, path: Path, *, dbname: str) -> None:
    """A deploy/sql file as psql -f runs it: every statement, as the superuser."""
    with psycopg.connect(pg.dsn(dbname=dbname), autocommit=True) as conn:
        conn.execute(path.read_text(encoding="utf-8").encode())


@pytest.fixture
def audit_database(pg: TestServer) -> Iterator[str]:
    """A fresh database where no role but its owner may create in schema public (as on 15+)."""
    _run_sql(pg, ROLE_SQL, dbname="postgres")
    pg.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB)))
    pg.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB)))
    with psycopg.connect(pg.dsn(dbname=DB), autocommit=True) as conn:
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # 14 still grants it
    yield DB
    pg.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB)))


def _config(tmp_path: Path, pg: TestServer, *, table: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[log]
format = "json"

[audit]
dsn = {json.dumps(pg.dsn(user=ROLE, dbname=DB))}
table = {json.dumps(table)}

[[servers]]
name = "s"
dsn = {json.dumps(pg.dsn(user=ROLE))}

[[policies]]
name = "idle"
states = ["idle"]
max_idle = "1s"
applications = ["^audit-grants-victim$"]
""",
        encoding="utf-8",
    )
    return path


def _columns(pg: TestServer, schema: str, table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn(dbname=DB), autocommit=True) as conn:
        return conn.execute(
            "SELECT column_name, data_type, is_nullable, is_identity FROM "
            "information_schema.columns WHERE table_schema = %s AND table_name = %s "
            "ORDER BY ordinal_position",
            (schema, table),
        ).fetchall()


def test_the_deploy_sql_makes_the_table_pg_reaper_would_make(
    pg: TestServer, audit_database: str
) -> None:
    _run_sql(pg, AUDIT_SQL, dbname=audit_database)
    _run_sql(pg, AUDIT_SQL, dbname=audit_database)  # idempotent
    with psycopg.connect(pg.dsn(dbname=audit_database), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA made")  # owned by the superuser: trusted
    with AuditConnection(
        dsn=pg.dsn(dbname=audit_database),
        table=("made", "audit"),
        connect_timeout=TIMEOUT,
        statement_timeout=TIMEOUT,
    ) as conn:
        assert conn.preflight() is None  # makes it

    assert _columns(pg, "reaper", "audit") == _columns(pg, "made", "audit")
    assert len(_columns(pg, "reaper", "audit")) == 22


def test_the_role_from_deploy_sql_writes_rows_without_create_anywhere(
    pg: TestServer,
    sessions: Sessions,
    audit_database: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _run_sql(pg, AUDIT_SQL, dbname=audit_database)
    victim = sessions.idle(application="audit-grants-victim", user="appuser", password="appuser")
    time.sleep(1.3)

    code = main(["once", "-c", str(_config(tmp_path, pg, table="reaper.audit")), "--json"])

    output = capsys.readouterr()
    assert code == 0, output
    assert pg.wait_gone(victim.info.backend_pid)

    def written() -> bool:
        with psycopg.connect(pg.dsn(dbname=audit_database), autocommit=True) as conn:
            rows = conn.execute("SELECT pid, result, policy FROM reaper.audit").fetchall()
        return rows == [(victim.info.backend_pid, "terminated", "idle")]

    wait_for(written, what="the victim's row")


@pytest.mark.parametrize(
    "case",
    [
        (None, "public.pg_reaper_audit", "lacks CREATE on schema public"),
        ('REVOKE INSERT ON reaper.audit FROM "pg-reaper"', "reaper.audit", "lacks INSERT"),
        ('REVOKE USAGE ON SCHEMA reaper FROM "pg-reaper"', "reaper.audit", "lacks USAGE"),
    ],
    ids=["no-create", "no-insert", "no-usage"],
)
@pytest.mark.parametrize("command", [["once", "--json"], ["run"]], ids=["once", "run"])
def test_a_missing_privilege_is_an_error_at_start_and_nothing_is_reaped(  # noqa: PLR0917 - fixtures and two parameters
    pg: TestServer,
    sessions: Sessions,
    audit_database: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: tuple[str | None, str, str],
    command: list[str],
) -> None:
    prepare, table, missing = case
    _run_sql(pg, AUDIT_SQL, dbname=audit_database)
    if prepare is not None:
        with psycopg.connect(pg.dsn(dbname=audit_database), autocommit=True) as conn:
            conn.execute(prepare.encode())
    victim = sessions.idle(application="audit-grants-victim", user="appuser", password="appuser")
    time.sleep(1.3)

    code = main([command[0], "-c", str(_config(tmp_path, pg, table=table)), *command[1:]])

    err = capsys.readouterr().err
    assert code == 2
    assert missing in err
    assert "docs/audit.md" in err
    assert pg.is_alive(victim.info.backend_pid)
