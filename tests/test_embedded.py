"""Smoke test of the throwaway PostgreSQL servers in reaper.embedded."""

from __future__ import annotations

import os
import pwd
import secrets
import socket
import stat
import subprocess
from pathlib import Path

import psycopg
import pytest

from reaper.demo import programs
from reaper.demo.embedded import EmbeddedPostgres, EmbeddedPostgresError

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


def _other_account() -> pwd.struct_passwd | None:
    """A local account that is neither root nor the one that runs the servers."""
    for name in ("daemon", "bin", "sys", "games", "mail"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


@pytest.mark.parametrize("major", MAJORS)
def test_only_the_servers_account_reaches_the_socket_and_tcp_needs_a_random_password(
    major: int,
) -> None:
    with EmbeddedPostgres(major=major) as pg:
        owner = pg.data_dir.stat().st_uid  # the account that runs the server
        for directory in (pg.base_dir, pg.socket_dir):
            mode = directory.stat()
            assert stat.S_IMODE(mode.st_mode) == 0o700, directory
            assert mode.st_uid == owner, directory
        # The suite's own connections and the owner's subprocesses still get in.
        assert _server_version_num(pg.dsn()).startswith(str(major))
        result = pg.run_as_owner(["psql", "-XAtc", "SELECT 1", pg.dsn()])
        assert result.stdout.strip() == "1"

        assert pg.password != "postgres"
        assert len(pg.password) >= 32
        assert _server_version_num(pg.dsn(tcp=True)).startswith(str(major))
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(pg.dsn(tcp=True, password="postgres"), connect_timeout=10).close()

        other = _other_account()
        if os.geteuid() == 0 and other is not None:
            # Another local account: the socket's trust is out of its reach.
            attempt = subprocess.run(
                [str(pg.bin_dir / "psql"), "-XAtc", "SELECT 1", pg.dsn(password="")],
                user=other.pw_uid,
                group=other.pw_gid,
                extra_groups=[],
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                cwd="/",
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert attempt.returncode != 0
            assert "Permission denied" in attempt.stderr, attempt.stderr


def test_every_server_gets_its_own_password() -> None:
    first, second = EmbeddedPostgres(major=MAJORS[-1]), EmbeddedPostgres(major=MAJORS[-1])
    try:
        assert first.password != second.password
        assert "postgres" not in {first.password, second.password}
    finally:
        first.cleanup()
        second.cleanup()


def _identity(dsn: str) -> tuple[object, ...]:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT system_identifier, pg_postmaster_start_time(),"
            " current_setting('port'), current_setting('wal_segment_size')"
            " FROM pg_control_system()"
        ).fetchone()
    assert row is not None
    return tuple(row)


def test_a_template_copy_is_a_cluster_of_its_own_run() -> None:
    """Copies of one stopped cluster start on their own ports as the same system but distinct
    runs (what bench/fleet.py relies on); a running template is refused."""
    template = EmbeddedPostgres(initdb_options=["--wal-segsize=1"])
    copies: list[EmbeddedPostgres] = []
    try:
        template.start()
        busy = EmbeddedPostgres(template=template.data_dir)
        copies.append(busy)
        with pytest.raises(EmbeddedPostgresError, match="in use"):
            busy.start()
        template.stop()
        for _ in range(2):
            pg = EmbeddedPostgres(template=template.data_dir, password=template.password)
            copies.append(pg)
            pg.start()
        started = copies[1:]
        first, second = (_identity(pg.dsn(tcp=True)) for pg in started)
        assert first[0] == second[0]  # one system identifier
        assert first[1] != second[1]  # two postmaster runs
        assert (first[2], second[2]) == (str(started[0].port), str(started[1].port))
        assert first[3] == "1MB"  # initdb_options reached initdb
        conf = (started[0].data_dir / "postgresql.conf").read_text()
        assert conf.count("include 'pg_reaper.conf'") == 1
    finally:
        for pg in [*copies, template]:
            pg.cleanup()


def test_free_ports_are_below_the_ephemeral_range_and_skip_a_taken_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel gives ports of its ephemeral range to outgoing connections: a listener's port
    # chosen from it can be taken by another process's connection before the listener binds.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {programs.free_port() for _ in range(20)}
    assert len(ports) > 1  # chosen at random, not a fixed sequence
    assert all(programs._LOWEST_PORT <= port < low for port in ports)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy - programs._LOWEST_PORT, 7])
        monkeypatch.setattr(secrets, "randbelow", lambda _: next(picks))
        assert programs.free_port() == programs._LOWEST_PORT + 7

    monkeypatch.setattr(programs, "_EPHEMERAL_RANGE", Path("/nonexistent"))
    assert programs.free_port() >= low  # without the range, the kernel's choice
