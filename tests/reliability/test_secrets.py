"""Secrets: one sentinel password, put everywhere a password can come from, and looked for
everywhere pg-reaper writes.

The sentinel is the password of a role that logs in over TCP (scram), given in a keyword DSN, in
a URI, in a `password_file`, in `PGPASSWORD`, in a `.pgpass` file (`PGPASSFILE`), in a service
file (`PGSERVICEFILE`), in `PG_REAPER_SERVERS` / `PG_REAPER_AUDIT__DSN`, and in the `[audit]`
DSN; it is also the wrong password of another role and the password of a server that cannot be
reached. It must never show in the daemon's log lines or /metrics, nor in what `once`,
`preview`, `check-config`, `doctor`, `sessions` and `kill` print, nor in the text of the
exception a failing connection raises. (Config errors: tests/test_cli_config.py.)
"""

from __future__ import annotations

import json
import signal
import time
import traceback
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import tomli_w
from psycopg import sql

from reaper.cli import main
from reaper.pg.activity import ServerConnection
from reaper.pg.audit import AuditConnection
from reaper.pg.connection import PostgresError
from tests.config_helpers import clean_environment  # noqa: F401 - an autouse fixture
from tests.reliability.support import ADMIN_APPLICATION, free_port, running_daemon

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.servers import Sessions, TestServer

pytestmark = pytest.mark.integration

SENTINEL = "Zq7-Reliability-Sentinel-Pw"
ROLE = "secret_keeper"  # its password is the sentinel
WRONG_ROLE = "secret_wrong"  # the sentinel is not its password
AUDIT_TABLE = "secret_audit"
VICTIMS = "^secret-victim"


@pytest.fixture(scope="module")
def roles(pg: TestServer) -> Iterator[None]:
    if pg.embedded is None:
        pytest.skip("needs the suite's own server (TCP logins with a password it sets)")
    _drop(pg)
    pg.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(ROLE), sql.Literal(SENTINEL)
        )
    )
    pg.execute(
        sql.SQL("GRANT pg_signal_backend, pg_read_all_stats TO {}").format(sql.Identifier(ROLE))
    )
    pg.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(ROLE)))
    pg.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'not-the-sentinel'").format(
            sql.Identifier(WRONG_ROLE)
        )
    )
    yield
    _drop(pg)


def _drop(pg: TestServer) -> None:
    pg.execute(sql.SQL("DROP TABLE IF EXISTS public.{}").format(sql.Identifier(AUDIT_TABLE)))
    for role in (ROLE, WRONG_ROLE):
        pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role]
        )
        exists = pg.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role])
        if exists:
            pg.execute(sql.SQL("REVOKE ALL ON SCHEMA public FROM {}").format(sql.Identifier(role)))
            pg.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# --- where the sentinel goes ------------------------------------------------------------------


def _tcp(pg: TestServer, **params: str) -> str:
    """A keyword DSN over 127.0.0.1 for `ROLE`, with extra parameters."""
    base = pg.dsn(user=params.pop("user", ROLE), tcp=True)
    return " ".join([base, *(f"{k}={v}" for k, v in params.items())])


def _uri(pg: TestServer) -> str:
    assert pg.embedded is not None
    return f"postgresql://{ROLE}:{SENTINEL}@127.0.0.1:{pg.embedded.port}/postgres"


SERVICE = "pg_reaper_secret"


def _libpq_files(pg: TestServer, tmp_path: Path) -> dict[str, str]:
    """A .pgpass file and a service file that hold the sentinel, as libpq's variables name them."""
    assert pg.embedded is not None
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{pg.embedded.port}:*:{ROLE}:{SENTINEL}\n", encoding="utf-8")
    pgpass.chmod(0o600)
    service = tmp_path / "pg_service.conf"
    service.write_text(
        f"[{SERVICE}]\nhost=127.0.0.1\nport={pg.embedded.port}\nuser={ROLE}\n"
        f"dbname=postgres\npassword={SENTINEL}\n",
        encoding="utf-8",
    )
    service.chmod(0o600)
    return {"PGPASSFILE": str(pgpass), "PGSERVICEFILE": str(service)}


def _servers(pg: TestServer, tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Every way to give the sentinel to a server, as [[servers]] tables (name -> table)."""
    password_file = tmp_path / "password"
    password_file.write_text(SENTINEL + "\n", encoding="utf-8")
    password_file.chmod(0o600)
    return {
        "keyword": {"dsn": _tcp(pg, password=SENTINEL)},
        "uri": {"dsn": _uri(pg)},
        "file": {"dsn": _tcp(pg), "password_file": str(password_file)},
        "environment": {"dsn": _tcp(pg)},  # PGPASSWORD
        "pgpass": {"dsn": _tcp(pg)},  # PGPASSFILE
        "service": {"dsn": f"service={SERVICE}"},  # PGSERVICEFILE
        "wrong": {"dsn": _tcp(pg, user=WRONG_ROLE, password=SENTINEL)},
        "unreachable": {
            "dsn": f"host=127.0.0.1 port={free_port()} user={ROLE} password={SENTINEL} "
            "dbname=postgres connect_timeout=2"
        },
    }


WORKING = ("keyword", "uri", "file", "environment", "pgpass", "service")


def _config(
    path: Path,
    servers: dict[str, dict[str, Any]],
    *,
    audit_dsn: str,
    listen: str = "",
    level: str = "info",
    interval: str = "30s",
) -> Path:
    document: dict[str, Any] = {
        "reaper": {
            "interval": interval,
            "min_interval": "1s",
            "protect_applications": [f"^{ADMIN_APPLICATION}$"],
            "connect_timeout": "2s",
        },
        "metrics": {"listen": listen},
        "log": {"format": "json", "level": level},
        "audit": {"dsn": audit_dsn, "table": AUDIT_TABLE},
        "servers": [{"name": name, **table} for name, table in servers.items()],
        "policies": [{"name": "victims", "max_idle": "1s", "applications": [VICTIMS]}],
    }
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


def _no_sentinel(where: str, text: str) -> None:
    assert SENTINEL not in text, f"the password shows in {where}:\n{text}"


def _victims(sessions: Sessions, count: int = 1) -> list[int]:
    """Idle sessions of an ordinary role, which the reaper's role may signal."""
    return [
        sessions.idle(application=f"secret-victim-{i}", user="appuser").info.backend_pid
        for i in range(count)
    ]


# --- the one-shot commands, in-process ----------------------------------------------------------

COMMANDS = [
    ["check-config"],
    ["preview"],
    ["preview", "--json"],
    ["once", "--json"],
    ["once"],
    ["doctor"],
    ["doctor", "--json"],
    ["sessions"],
    ["sessions", "--json", "--by", "user"],
]


@pytest.mark.usefixtures("roles")
@pytest.mark.parametrize("form", [*WORKING, "wrong", "unreachable", "PG_REAPER_SERVERS"])
def test_no_command_prints_the_password_however_it_is_given(
    form: str,
    pg: TestServer,
    sessions: Sessions,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    servers = _servers(pg, tmp_path)
    audit_dsn = _tcp(pg, password=SENTINEL)
    if form == "PG_REAPER_SERVERS":
        # The servers and the audit DSN from the environment, over what the file says.
        monkeypatch.setenv("PG_REAPER_SERVERS", json.dumps([{"name": form, **servers["keyword"]}]))
        monkeypatch.setenv("PG_REAPER_AUDIT__DSN", audit_dsn)
        config = _config(
            tmp_path / "config.toml", {"file-says": {"dsn": "host=/nonexistent"}}, audit_dsn=""
        )
    else:
        if form == "environment":
            monkeypatch.setenv("PGPASSWORD", SENTINEL)
        if form in {"pgpass", "service"}:
            variable = "PGPASSFILE" if form == "pgpass" else "PGSERVICEFILE"
            monkeypatch.setenv(variable, _libpq_files(pg, tmp_path)[variable])
        config = _config(tmp_path / "config.toml", {form: servers[form]}, audit_dsn=audit_dsn)
    _victims(sessions, 2)
    time.sleep(1.3)

    printed: dict[str, tuple[str, str]] = {}
    for command in [*COMMANDS, _kill(form)]:
        code = main([*command, "-c", str(config)])
        out, err = capsys.readouterr()
        where = " ".join(command)
        printed[where] = (out, err)
        assert "Traceback" not in err, err
        assert code in {0, 1}, (where, code, err)

    for where, (out, err) in printed.items():
        _no_sentinel(f"the output of {where}", out)
        _no_sentinel(f"the log of {where}", err)
    # Not vacuous: the working forms did connect (and reap); the others failed, saying why.
    (report,) = json.loads(printed["once --json"][0])["servers"]
    if form in {*WORKING, "PG_REAPER_SERVERS"}:
        assert report["ok"], report
        assert report["reaped"] >= 1, report
    else:
        assert not report["ok"]
        expected = "password authentication failed" if form == "wrong" else "Connection refused"
        assert expected in report["error"], report


def _kill(form: str) -> list[str]:
    return ["kill", "--server", form, "--application", "^secret-nobody$", "--dry-run", "--yes"]


# --- the daemon ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("roles")
def test_the_daemon_never_logs_or_exports_the_password(
    pg: TestServer, sessions: Sessions, tmp_path: Path
) -> None:
    """Every form at once in one daemon, at debug level, failing servers included; the [audit]
    DSN carries the sentinel too."""
    servers = _servers(pg, tmp_path)
    port = free_port()
    config = _config(
        tmp_path / "config.toml",
        servers,
        audit_dsn=_tcp(pg, password=SENTINEL),
        listen=f"127.0.0.1:{port}",
        level="debug",
        interval="5s",
    )
    victims = _victims(sessions, 3)
    env = {"PGPASSWORD": SENTINEL, **_libpq_files(pg, tmp_path)}
    with running_daemon(config, port=port, env=env) as daemon:
        daemon.wait_ready()
        # Every working form logs in; all are on one cluster, so the first entry acts and the
        # others are refused as duplicates, which they can only be once connected.
        daemon.wait_value("pg_reaper_server_up", lambda v: v == 1, server=WORKING[0])
        daemon.wait_until(
            lambda: {e["server"] for e in daemon.events("duplicate_cluster")} >= set(WORKING[1:]),
            timeout=15,
            what="every other working form connected (and refused as the same cluster)",
        )
        # Two failures each: the first is logged at error level, the retries at debug level
        # (with debug on, psycopg's and libpq's own words about them too).
        for name in ("wrong", "unreachable"):
            daemon.wait_value(
                "pg_reaper_poll_errors_total", lambda v: (v or 0) >= 2, server=name, timeout=30
            )
        for pid in victims:
            assert pg.wait_gone(pid)
        daemon.wait_until(
            lambda: {e["pid"] for e in daemon.events("session_reaped")} >= set(victims),
            timeout=10,
            what="the victims' audit events",
        )
        # The audit table is written by its own thread, in batches: the rows follow the events.
        daemon.wait_until(
            lambda: _audited_pids(pg) >= set(victims),
            timeout=15,
            what="the victims' rows in the audit table (through the audit DSN)",
        )
        pages = {path: daemon.get(path)[1] for path in ("/metrics", "/healthz", "/readyz", "/")}
        daemon.send(signal.SIGHUP)  # a reload logs the configuration's summary
        daemon.wait_event("config_reloaded")
        daemon.send(signal.SIGTERM)
        assert daemon.wait_exit(timeout=15) == 0

        events = daemon.events()
        assert any(e["event"] == "poll_failed" and e["level"] == "debug" for e in events)
        log = "\n".join([json.dumps(e) for e in events] + daemon.other_lines)
    _no_sentinel("the daemon's log", log)
    for path, body in pages.items():
        _no_sentinel(path, body)
    assert "password authentication failed" in log
    assert "Connection refused" in log


def _audited_pids(pg: TestServer) -> set[int]:
    query = sql.SQL("SELECT pid FROM public.{}").format(sql.Identifier(AUDIT_TABLE))
    try:
        return {row[0] for row in pg.execute(query)}
    except psycopg.errors.UndefinedTable:  # not created yet
        return set()


# --- exceptions ---------------------------------------------------------------------------------


def _everything_said(exc: BaseException) -> str:
    """An exception's message, repr and whole traceback, the suppressed context included."""
    parts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    context = exc.__context__
    while context is not None:
        parts.extend([str(context), repr(context), "".join(traceback.format_exception(context))])
        context = context.__context__
    return "\n".join(parts)


@pytest.mark.usefixtures("roles")
@pytest.mark.parametrize("form", ["wrong", "unreachable"])
def test_a_failing_connection_raises_an_error_without_the_password(
    form: str, pg: TestServer, tmp_path: Path
) -> None:
    dsn = _servers(pg, tmp_path)[form]["dsn"]
    timeout = timedelta(seconds=2)
    with (
        ServerConnection(dsn=dsn, connect_timeout=timeout, statement_timeout=timeout) as conn,
        pytest.raises(PostgresError) as raised,
    ):
        conn.poll()
    with (
        AuditConnection(
            dsn=dsn,
            table=("public", AUDIT_TABLE),
            connect_timeout=timeout,
            statement_timeout=timeout,
        ) as audit,
        pytest.raises(PostgresError) as raised_audit,
    ):
        audit.insert([{"event": "x"}])
    for exc in (raised.value, raised_audit.value):
        said = _everything_said(exc)
        _no_sentinel("the exception", said)
        assert ("password authentication failed" if form == "wrong" else "refused") in said


@pytest.mark.parametrize(
    "dsn",
    [
        f"host=x password={SENTINEL} port",
        f"host=x password='{SENTINEL}",
        f"postgresql://u:{SENTINEL}@[bad",
        f"postgresql://u:{SENTINEL}@h/db?password={SENTINEL}&x",
        f"postgresql://u:{SENTINEL}%zz@h/db",
        f"postgresql://u:{SENTINEL} x@h/db",
    ],
)
def test_a_malformed_dsn_is_refused_without_its_password(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path / "config.toml", {"bad": {"dsn": dsn}}, audit_dsn=dsn)
    assert main(["check-config", "-c", str(config)]) == 2
    _, err = capsys.readouterr()
    assert "servers[0].dsn: invalid connection string" in err
    assert "audit.dsn: invalid connection string" in err
    _no_sentinel("check-config's error", err)
    # The same from the environment.
    monkeypatch.setenv("PG_REAPER_SERVERS", json.dumps([{"name": "env", "dsn": dsn}]))
    monkeypatch.setenv("PG_REAPER_AUDIT__DSN", dsn)
    assert main(["check-config", "-c", str(config)]) == 2
    _, err = capsys.readouterr()
    assert "PG_REAPER_SERVERS" in err
    _no_sentinel("check-config's error", err)


def test_a_malformed_uri_with_a_quote_in_its_password_is_refused_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = f'postgresql://u:x"{SENTINEL}@[bad'
    config = _config(tmp_path / "config.toml", {"bad": {"dsn": dsn}}, audit_dsn="")
    assert main(["check-config", "-c", str(config)]) == 2
    _, err = capsys.readouterr()
    assert "servers[0].dsn: invalid connection string" in err
    _no_sentinel("check-config's error", err)
