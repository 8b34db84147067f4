"""The reaper's own connection when a server fails under it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import timedelta

import pytest

from reaper.demo.embedded import EmbeddedPostgres
from reaper.pg.activity import ServerConnection
from reaper.pg.connection import PostgresError

pytestmark = pytest.mark.integration


def _freeze(pg: EmbeddedPostgres, sig: signal.Signals) -> None:
    """Stop (or resume) the postmaster and every backend: a server that no longer answers."""
    assert pg.pid is not None
    children = subprocess.run(
        ["pgrep", "-P", str(pg.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    for pid in [pg.pid, *map(int, children)]:
        os.kill(pid, sig)


def test_a_server_that_stops_answering_is_given_up_on_after_statement_timeout(
    pg_major: int,
) -> None:
    with EmbeddedPostgres(major=pg_major) as pg:
        conn = ServerConnection(
            dsn=pg.dsn(),
            connect_timeout=timedelta(seconds=2),
            statement_timeout=timedelta(seconds=1),
        )
        with conn:
            assert conn.poll().sessions
            _freeze(pg, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(PostgresError, match="no answer within 3s"):
                    conn.poll()
                waited = time.monotonic() - started
                assert 2.5 < waited < 6  # statement_timeout + 2 s of grace, not forever
                with pytest.raises(PostgresError, match="cannot connect"):
                    conn.poll()  # reconnecting is bounded by connect_timeout
            finally:
                _freeze(pg, signal.SIGCONT)
            assert conn.poll().sessions  # and it comes back by itself


def test_a_restarted_server_is_reconnected_to(pg_major: int) -> None:
    with EmbeddedPostgres(major=pg_major) as pg:
        conn = ServerConnection(
            dsn=pg.dsn(),
            connect_timeout=timedelta(seconds=2),
            statement_timeout=timedelta(seconds=5),
        )
        with conn:
            first = conn.poll().facts.own_pid
            pg.stop(mode="immediate")
            with pytest.raises(PostgresError):
                conn.poll()
            pg.start()
            assert conn.poll().facts.own_pid != first
