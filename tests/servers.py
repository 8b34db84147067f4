"""Real PostgreSQL servers for the integration tests.

In order of preference: the server named by ``PG_REAPER_TEST_DSN``; a container through
testcontainers when a Docker engine answers; else a throwaway server from the pip-installable
PostgreSQL binaries (run as an unprivileged account when the suite runs as root).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from reaper.demo.embedded import EmbeddedPostgres

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ADMIN_APPLICATION = "pytest-admin"


@dataclass(kw_only=True)
class TestServer:
    """A server the suite may use as superuser: where it is and how to reach it."""

    __test__ = False  # not a test class, despite the name

    major: int
    admin_conninfo: str  # superuser
    has_socket: bool
    embedded: EmbeddedPostgres | None = None
    _admin: psycopg.Connection[Any] | None = field(default=None, repr=False)

    def dsn(
        self,
        *,
        user: str | None = None,
        password: str | None = None,
        dbname: str | None = None,
        tcp: bool = False,
    ) -> str:
        """Conninfo for another role or database on this server.

        With `tcp` the session comes over 127.0.0.1 (a client_addr); without it over the Unix
        socket where there is one.
        """
        params = conninfo_to_dict(self.admin_conninfo)
        if tcp and self.embedded is not None:
            params["host"] = self.embedded.host
        if user is not None:
            params["user"] = user
            params.pop("password", None)
        if password is not None:
            params["password"] = password
        if dbname is not None:
            params["dbname"] = dbname
        return make_conninfo("", **params)

    @property
    def admin(self) -> psycopg.Connection[Any]:
        """One autocommit superuser session for set-up and for reading the server's own view."""
        if self._admin is None or self._admin.closed or self._admin.broken:
            self._admin = psycopg.connect(
                self.admin_conninfo, autocommit=True, application_name=ADMIN_APPLICATION
            )
        return self._admin

    def execute(self, query: str | sql.Composed, params: Any = None) -> list[tuple[Any, ...]]:
        cur = self.admin.execute(query, params)
        return cur.fetchall() if cur.description else []

    def is_alive(self, pid: int) -> bool:
        return bool(self.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]))

    def wait_gone(self, pid: int, *, timeout: float = 10.0) -> bool:
        """Termination is asynchronous: wait (bounded) until the backend has left the server."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_alive(pid):
                return True
            time.sleep(0.02)
        return False

    def state_of(self, pid: int) -> str | None:
        rows = self.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid])
        return rows[0][0] if rows else None

    def wait_state(self, pid: int, state: str, *, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state_of(pid) == state:
                return
            time.sleep(0.02)
        raise AssertionError(f"pid {pid} never reached state {state!r}: {self.state_of(pid)!r}")

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None


@contextlib.contextmanager
def start_server(major: int) -> Iterator[TestServer]:
    external = os.environ.get("PG_REAPER_TEST_DSN")
    if external:
        with psycopg.connect(external) as conn:
            found = conn.info.server_version // 10000
        has_socket = str(conninfo_to_dict(external).get("host", "")).startswith("/")
        server = TestServer(major=found, admin_conninfo=external, has_socket=has_socket)
        try:
            yield server
        finally:
            server.close()
        return
    if _docker_answers():
        yield from _container(major)
        return
    with EmbeddedPostgres(major=major, settings={"max_connections": "200"}) as pg:
        server = TestServer(major=major, admin_conninfo=pg.dsn(), has_socket=True, embedded=pg)
        try:
            yield server
        finally:
            server.close()


def _docker_answers() -> bool:
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):  # noqa: PTH110
        return False  # no engine: skip the client, which leaks a socket when it cannot connect
    try:
        import docker  # noqa: PLC0415 - only when Docker is wanted

        client = docker.from_env(timeout=3)
    except Exception:  # noqa: BLE001 - no client library or no configuration: no Docker
        return False
    try:
        client.ping()
    except Exception:  # noqa: BLE001 - no engine, no permission: both mean no Docker
        return False
    finally:
        client.close()
    return True


def _container(major: int) -> Iterator[TestServer]:
    from testcontainers.postgres import PostgresContainer  # noqa: PLC0415 - needs an engine

    with PostgresContainer(f"postgres:{major}", driver=None) as container:
        conninfo = make_conninfo(
            "",
            host=container.get_container_host_ip(),
            port=container.get_exposed_port(5432),
            user=container.username,
            password=container.password,
            dbname=container.dbname,
        )
        server = TestServer(major=major, admin_conninfo=conninfo, has_socket=False)
        try:
            yield server
        finally:
            server.close()


class Sessions:
    """Client sessions opened by one test, in real states; all closed when the test ends."""

    def __init__(self, server: TestServer) -> None:
        self.server = server
        self._conns: list[psycopg.Connection[Any]] = []
        self._threads: list[threading.Thread] = []

    def open(
        self,
        *,
        application: str = "app",
        user: str | None = None,
        password: str | None = None,
        dbname: str | None = None,
        tcp: bool = False,
        autocommit: bool = True,
        extra: str = "",
    ) -> psycopg.Connection[Any]:
        dsn = self.server.dsn(user=user, password=password, dbname=dbname, tcp=tcp)
        conn = psycopg.connect(
            f"{dsn} {extra}", autocommit=autocommit, application_name=application
        )
        self._conns.append(conn)
        return conn

    def idle(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """Idle after having run a statement."""
        conn = self.open(**kwargs)
        conn.execute("SELECT 1")
        return conn

    def idle_in_transaction(self, **kwargs: Any) -> psycopg.Connection[Any]:
        conn = self.open(autocommit=False, **kwargs)
        conn.execute("SELECT 1")
        return conn

    def idle_in_aborted_transaction(self, **kwargs: Any) -> psycopg.Connection[Any]:
        conn = self.open(autocommit=False, **kwargs)
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        return conn

    def active(self, *, seconds: float = 60, **kwargs: Any) -> psycopg.Connection[Any]:
        """Running `pg_sleep` in a background thread until cancelled (at teardown at the latest)."""
        conn = self.open(**kwargs)
        pid = conn.info.backend_pid

        def run() -> None:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_sleep(%s)", [seconds])

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)
        self.server.wait_state(pid, "active")
        return conn

    def close(self) -> None:
        pids = [c.info.backend_pid for c in self._conns if not c.closed]
        if pids:  # ends the pg_sleep of active sessions so that their threads can finish
            with contextlib.suppress(psycopg.Error):
                self.server.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", [pids]
                )
        for thread in self._threads:
            thread.join(timeout=10)
        for conn in self._conns:
            conn.close()


def usable(conn: psycopg.Connection[Any]) -> bool:
    """The client's own view: can this session still run a statement?"""
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


def wait_for(predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")
