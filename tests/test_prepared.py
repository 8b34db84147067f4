"""Statements prepared once per session and run through psycopg's pq layer.

`Connection.run_prepared` answers as the server sent it: what a steady [ha] follower's probe runs
(reaper/pg/ha.py, probe). On real servers: the same answer as `run`, None (never an exception,
never a hang) for anything else, and prepared again whenever the session or its statement is gone.

`Connection.fetch` is `run` for the poll: the same rows and the same failures (`PostgresError`,
the session closed when it is lost), prepared again whenever the session or its statement is
gone, without the caller seeing it."""

from __future__ import annotations

import signal
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from reaper.daemon.balance import member_id
from reaper.demo.embedded import EmbeddedPostgres
from reaper.pg.connection import Connection, PostgresError, Prepared
from reaper.pg.ha import Membership, lead, probe
from reaper.settings import DEFAULT_LOCK_KEY
from tests.test_faults import _freeze

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.servers import TestServer

STATEMENT = Prepared.of(
    "pg_reaper_test",
    "-- pg-reaper: test\n"
    "SELECT %(n)s::pg_catalog.int8 AS n, %(word)s::pg_catalog.text AS word,"
    " %(n)s::pg_catalog.int8 / %(d)s::pg_catalog.int8 AS quotient,"
    " ARRAY[%(n)s::pg_catalog.int8, 2] AS numbers, %(flag)s::pg_catalog.bool AS flag",
)
PARAMS = {"n": 6, "word": "naïve", "d": 3, "flag": True}


def connection(dsn: str, *, statement_timeout: float = 5.0) -> Connection:
    return Connection(
        dsn=dsn,
        connect_timeout=timedelta(seconds=2),
        statement_timeout=timedelta(seconds=statement_timeout),
    )


@pytest.fixture
def conn(pg: TestServer) -> Iterator[Connection]:
    with connection(pg.dsn()) as opened:
        yield opened


def backend(conn: Connection) -> int:
    ((row,),) = [conn.run("SELECT pg_catalog.pg_backend_pid() AS pid")]
    return int(row["pid"])


def test_parameters_are_numbered_in_order_and_a_stray_percent_is_refused() -> None:
    assert STATEMENT.params == ("n", "word", "d", "flag")
    assert b"$1::pg_catalog.int8 / $3::pg_catalog.int8" in STATEMENT.text
    assert b"%" not in STATEMENT.text
    assert STATEMENT.encode(PARAMS) == (b"6", "naïve".encode(), b"3", b"t")
    with pytest.raises(ValueError, match="a % that is not a parameter"):
        Prepared.of("bad", "SELECT 5 %% 2, %(a)s")
    with pytest.raises(TypeError, match="float"):
        STATEMENT.encode({**PARAMS, "d": 1.5})


@pytest.mark.integration
def test_the_answer_is_the_servers_text_and_loads_as_run_returns_it(conn: Connection) -> None:
    assert conn.run_prepared(STATEMENT, STATEMENT.encode(PARAMS)) is None  # no session yet
    expected = conn.run(
        "SELECT %(n)s::int8 AS n, %(word)s::text AS word, %(n)s::int8 / %(d)s::int8 AS quotient,"
        " ARRAY[%(n)s::int8, 2] AS numbers, %(flag)s::bool AS flag",
        PARAMS,
    )
    row = conn.run_prepared(STATEMENT, STATEMENT.encode(PARAMS))
    assert row is not None
    assert row.values == (b"6", "naïve".encode(), b"2", b"{6,2}", b"t")
    assert [name for name, _ in row.columns()] == ["n", "word", "quotient", "numbers", "flag"]
    assert [row.load()] == expected
    assert row.load() == {"n": 6, "word": "naïve", "quotient": 2, "numbers": [6, 2], "flag": True}


@pytest.mark.integration
def test_a_failure_or_a_lost_statement_or_session_is_none_and_the_next_call_prepares_again(
    pg: TestServer, conn: Connection
) -> None:
    first = backend(conn)
    params = STATEMENT.encode(PARAMS)
    assert conn.run_prepared(STATEMENT, params) is not None
    # A failing statement: None, and the session still answers.
    assert conn.run_prepared(STATEMENT, STATEMENT.encode({**PARAMS, "d": 0})) is None
    assert backend(conn) == first
    assert conn.run_prepared(STATEMENT, params) is not None
    # The statement deallocated under it (DISCARD ALL by a pooler): None once, then again.
    conn.run("DEALLOCATE ALL")
    assert conn.run_prepared(STATEMENT, params) is None
    again = conn.run_prepared(STATEMENT, params)
    assert again is not None
    assert again.values[0] == b"6"
    # The session terminated: None (no reconnection here); `run` reconnects, and the new
    # session gets the statement prepared anew.
    pg.execute("SELECT pg_terminate_backend(%s)", [first])
    assert conn.run_prepared(STATEMENT, params) is None
    assert backend(conn) != first
    row = conn.run_prepared(STATEMENT, params)
    assert row is not None
    assert row.values[0] == b"6"


@pytest.mark.integration
def test_fetch_returns_what_run_returns_and_fails_as_run_fails(
    pg: TestServer, conn: Connection
) -> None:
    expected = conn.run(
        "SELECT %(n)s::int8 AS n, %(word)s::text AS word, %(n)s::int8 / %(d)s::int8 AS quotient,"
        " ARRAY[%(n)s::int8, 2] AS numbers, %(flag)s::bool AS flag"
        " FROM generate_series(1, 3)",
        PARAMS,
    )
    rows = Prepared.of(
        "pg_reaper_test_rows",
        "SELECT %(n)s::pg_catalog.int8 AS n, %(word)s::pg_catalog.text AS word,"
        " %(n)s::pg_catalog.int8 / %(d)s::pg_catalog.int8 AS quotient,"
        " ARRAY[%(n)s::pg_catalog.int8, 2] AS numbers, %(flag)s::pg_catalog.bool AS flag"
        " FROM pg_catalog.generate_series(1, 3)",
    )
    first = backend(conn)
    assert conn.fetch(rows, PARAMS) == expected
    assert len(expected) == 3
    # A statement the server refuses: the error `run` gives, and the session goes on.
    with pytest.raises(PostgresError, match="division by zero") as refused:
        conn.fetch(rows, {**PARAMS, "d": 0})
    assert refused.value.sqlstate == "22012"
    assert not refused.value.lost
    assert backend(conn) == first
    # Deallocated under it (DISCARD ALL by a pooler): prepared again, the caller sees nothing.
    conn.run("DEALLOCATE ALL")
    assert conn.fetch(rows, PARAMS) == expected
    assert backend(conn) == first
    # The session terminated: lost, as `run` says it; the next call reconnects and prepares.
    pg.execute("SELECT pg_terminate_backend(%s)", [first])
    with pytest.raises(PostgresError) as lost:
        conn.fetch(rows, PARAMS)
    assert lost.value.lost
    assert conn.fetch(rows, PARAMS) == expected
    assert backend(conn) != first


def test_a_server_that_stops_answering_is_severed_not_waited_for(pg_major: int) -> None:
    with (
        EmbeddedPostgres(major=pg_major) as server,
        connection(server.dsn(), statement_timeout=1) as c,
    ):
        params = STATEMENT.encode(PARAMS)
        backend(c)
        assert c.run_prepared(STATEMENT, params) is not None
        _freeze(server, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert c.run_prepared(STATEMENT, params) is None
            assert time.monotonic() - started < 6  # statement_timeout + 2 s of grace
        finally:
            _freeze(server, signal.SIGCONT)
        assert c.run_prepared(STATEMENT, params) is None  # severed: no session any more
        backend(c)  # `run` reconnects
        assert c.run_prepared(STATEMENT, params) is not None
        # `fetch`, as `run`: a PostgresError that says so, within the same bound.
        _freeze(server, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(PostgresError, match="no answer within 3s") as severed:
                c.fetch(STATEMENT, PARAMS)
            assert time.monotonic() - started < 6
            assert severed.value.lost
        finally:
            _freeze(server, signal.SIGCONT)
        assert c.fetch(STATEMENT, PARAMS) == [
            {"n": 6, "word": "naïve", "quotient": 2, "numbers": [6, 2], "flag": True}
        ]


@pytest.mark.integration
def test_a_followers_probe_reads_as_lead_and_keeps_the_members_ages_last(
    conn: Connection,
) -> None:
    membership = Membership(lock_key=DEFAULT_LOCK_KEY, member=member_id("probe-test"))
    backend(conn)
    seen = probe(conn, DEFAULT_LOCK_KEY, membership=membership)
    assert seen is not None
    assert [name for name, _ in seen.row.columns()][-1] == "member_ages"
    assert seen.fingerprint == seen.row.values[:-1]
    looked = lead(conn, DEFAULT_LOCK_KEY, acquire=False, membership=membership)
    read = seen.leadership()
    assert (read.leader, read.holder, read.wanting, read.joined) == (
        looked.leader,
        looked.holder,
        looked.wanting,
        looked.joined,
    )
    assert set(read.members) == set(looked.members) == {membership.member}
    # Its mark stays, its age grows: the same answer but for the last column.
    time.sleep(0.05)
    later = probe(conn, DEFAULT_LOCK_KEY, membership=membership)
    assert later is not None
    assert later.same(seen)
    assert later.row.values[-1] != seen.row.values[-1]
    # The lock taken by this session: another answer.
    assert lead(conn, DEFAULT_LOCK_KEY, acquire=True, membership=membership).leader
    taken = probe(conn, DEFAULT_LOCK_KEY, membership=membership)
    assert taken is not None
    assert not taken.same(seen)
    assert taken.leadership().leader
