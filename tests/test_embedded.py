"""Smoke test of the throwaway PostgreSQL servers in reaper.embedded."""

from __future__ import annotations

import os

import psycopg
import pytest

from reaper.embedded import EmbeddedPostgres

MAJORS = [
    int(major)
    for major in os.environ.get("PG_REAPER_TEST_MAJORS", "14,18").split(",")
    if major.strip()
]

pytestmark = pytest.mark.integration


def _server_version_num(dsn: str) -> str:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("major", MAJORS)
def test_start_connect_stop_cleanup(major: int) -> None:
    # Quotes, a backslash and a space exercise the conninfo and password-file quoting.
    pg = EmbeddedPostgres(major=major, password="it's a \\secret")
    try:
        pg.start()
        pg.start()  # already running: nothing to do
        assert pg.pid is not None
        assert pg.version.split(".")[0] == str(major)

        assert _server_version_num(pg.dsn()).startswith(str(major))
        assert _server_version_num(pg.dsn(tcp=True)).startswith(str(major))

        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(pg.dsn(tcp=True, password="wrong"), connect_timeout=10).close()

        port, data_dir = pg.port, pg.data_dir
        pg.restart()
        assert (pg.port, pg.data_dir) == (port, data_dir)
        assert _server_version_num(pg.dsn(tcp=True)).startswith(str(major))

        pg.stop()
        pg.stop()  # not running: nothing to do
        assert pg.pid is None
        for dsn in (pg.dsn(), pg.dsn(tcp=True)):
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(dsn, connect_timeout=5).close()
    finally:
        pg.cleanup()
    assert not pg.base_dir.exists()


def test_context_manager_and_owner_commands() -> None:
    with EmbeddedPostgres(major=MAJORS[-1], settings={"max_connections": "20"}) as pg:
        pid = pg.pid
        assert pid is not None
        with psycopg.connect(pg.dsn(), connect_timeout=10) as conn:
            row = conn.execute("SHOW max_connections").fetchone()
        assert row == ("20",)
        result = pg.run_as_owner(["psql", "-XAtc", "SELECT current_user", pg.dsn()])
        assert result.stdout.strip() == pg.superuser
        pg.run_as_owner(["kill", "-STOP", str(pid)])
    # cleanup copes with a stopped postmaster
    assert pg.pid is None
    assert not pg.base_dir.exists()
