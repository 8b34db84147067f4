from __future__ import annotations

import os
import sys
import textwrap
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from reaper.observe.log import configure
from reaper.pg.activity import ServerConnection
from reaper.settings import LogSection
from tests.servers import ADMIN_APPLICATION, Sessions, TestServer, start_server

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

DEFAULT_MAJORS = "14,18"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-major",
        action="append",
        default=[],
        help="PostgreSQL major(s) for integration tests (repeatable, or comma-separated); "
        f"default: $PG_REAPER_TEST_MAJORS, else {DEFAULT_MAJORS}",
    )


def _majors(config: pytest.Config) -> list[int]:
    raw = ",".join(config.getoption("--pg-major")) or os.environ.get(
        "PG_REAPER_TEST_MAJORS", DEFAULT_MAJORS
    )
    return sorted({int(part) for part in raw.split(",") if part.strip()})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pg_major" in metafunc.fixturenames:
        majors = _majors(metafunc.config)
        if os.environ.get("PG_REAPER_TEST_DSN"):
            majors = majors[:1]  # one external server, whatever its major
        metafunc.parametrize("pg_major", majors, ids=[f"pg{m}" for m in majors], scope="session")


@pytest.fixture(scope="session")
def pg(pg_major: int) -> Iterator[TestServer]:
    """A running PostgreSQL server of `pg_major`, with the roles and database the tests use."""
    with start_server(pg_major) as server:
        _prepare(server)
        yield server


def _prepare(server: TestServer) -> None:
    for statement in (
        "DROP DATABASE IF EXISTS otherdb",
        "CREATE DATABASE otherdb",
        "DROP ROLE IF EXISTS keeper",
        "CREATE ROLE keeper LOGIN PASSWORD 'keeper'",
        "DROP ROLE IF EXISTS appuser",
        "CREATE ROLE appuser LOGIN PASSWORD 'appuser'",
        # The least-privilege reaper of DESIGN.md, and one that forgot pg_read_all_stats.
        "DROP ROLE IF EXISTS reaper_lp",
        "CREATE ROLE reaper_lp LOGIN PASSWORD 'reaper_lp'",
        "GRANT pg_signal_backend, pg_read_all_stats TO reaper_lp",
        "DROP ROLE IF EXISTS reaper_blind",
        "CREATE ROLE reaper_blind LOGIN PASSWORD 'reaper_blind'",
        "GRANT pg_signal_backend TO reaper_blind",
    ):
        server.execute(statement)


@pytest.fixture(autouse=True)
def _logs_to_this_tests_stderr() -> None:
    """structlog keeps the stream it was configured with: give each test its own (captured) one."""
    configure(LogSection(format="json"), stream=sys.stderr)


@pytest.fixture
def sessions(pg: TestServer) -> Iterator[Sessions]:
    opened = Sessions(pg)
    yield opened
    opened.close()


@pytest.fixture
def reaper(pg: TestServer) -> Iterator[ServerConnection]:
    """The least-privilege reaper's session (role reaper_lp: pg_signal_backend and
    pg_read_all_stats), for the tests that poll and signal through it directly."""
    with ServerConnection(
        dsn=pg.dsn(user="reaper_lp", password="reaper_lp"),
        connect_timeout=timedelta(seconds=5),
        statement_timeout=timedelta(seconds=10),
    ) as conn:
        yield conn


@pytest.fixture
def write_config(tmp_path: Path, pg: TestServer) -> Callable[..., Path]:
    """Write a config for `pg` whose policies follow; the test suite's own session is protected."""

    def write(
        policies: str,
        *,
        reaper: str = "",
        dsn: str | None = None,
        server_extra: str = "",
        log: str = 'format = "json"',
    ) -> Path:
        path = tmp_path / "config.toml"
        conninfo = dsn if dsn is not None else pg.dsn()
        path.write_text(
            textwrap.dedent(
                f"""\
                [reaper]
                protect_applications = ["^{ADMIN_APPLICATION}$"]
                {reaper}

                [log]
                {log}

                [[servers]]
                name = "pg{pg.major}"
                dsn = {_toml_string(conninfo)}
                {server_extra}
                """
            )
            + textwrap.dedent(policies),
            encoding="utf-8",
        )
        return path

    return write


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
