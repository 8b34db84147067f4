"""The audit table: one row per audit event, written off the reaping path to a database of its own,
which may be slow, hung or down without delaying a single termination."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from reaper.audit_event import AuditEvent, AuditRecord
from reaper.cli import main
from reaper.demo.embedded import EmbeddedPostgres
from reaper.demo.programs import free_port
from reaper.identifiers import parse_table_name
from reaper.observe.audit import AuditSink, AuditWriter
from reaper.observe.log import configure
from reaper.observe.metrics import Metrics
from reaper.observe.queue import RowQueue
from reaper.pg.audit import AuditConnection
from reaper.settings import ConfigError, LogSection, Settings, load_settings
from tests.servers import TestServer, wait_for
from tests.test_daemon import RunningDaemon, daemon_config, policy, toml_string

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.servers import Sessions

# A socket directory that does not exist: every connection fails at once, no server needed.
UNREACHABLE = "host=/nonexistent/pg-reaper-audit-test port=5432 dbname=postgres"
SECRET = "Audit-S3cret-Pa55"
WRONG_SECRET = "Wrong-S3cret-Pa55"


def audit_table(dsn: str, *, table: str = "pg_reaper_audit", extra: str = "") -> str:
    return f"\n[audit]\ndsn = {toml_string(dsn)}\ntable = {toml_string(table)}\n{extra}\n"


def rows_of(server: EmbeddedPostgres, table: tuple[str, ...]) -> list[dict[str, Any]]:
    """The audit table as the audit server has it (none when it does not exist)."""
    with psycopg.connect(server.dsn(), autocommit=True, row_factory=dict_row) as conn:
        exists = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL AS e", [sql.Identifier(*table).as_string(conn)]
        ).fetchone()
        if not exists or not exists["e"]:
            return []
        query = sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(*table))
        return conn.execute(query).fetchall()


def json_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def log_to(capsys: pytest.CaptureFixture[str]) -> Callable[[], list[dict[str, Any]]]:
    """From now on, the JSON events logged (by any thread) go to capsys: call in the test body,
    where sys.stderr is capsys's own."""
    configure(LogSection(format="json"), stream=sys.stderr)
    return lambda: json_events(capsys.readouterr().err)


def decisions(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] in {"session_reaped", "session_reap_failed"}]


def check_row_is_the_log_line(row: dict[str, Any], event: dict[str, Any], *, server: str) -> None:
    """Every field of the audit log line, with the same value, in its typed column."""
    assert row["event"] == event["event"]
    assert row["server"] == server == event["server"]
    for key, value in event.items():
        if key in {"event", "level", "timestamp", "server"}:
            continue
        if key == "backend_start":
            assert row[key] == datetime.fromisoformat(value)
        else:
            assert row[key] == value, f"{key}: table {row[key]!r}, log {value!r}"
    for key in ("detail", "query"):
        if key not in event:
            assert row[key] is None
    logged = datetime.fromisoformat(event["timestamp"])
    assert abs((row["logged_at"] - logged).total_seconds()) < 5


# --- the table name (no database) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("pg_reaper_audit", ("pg_reaper_audit",)),
        ("Audit.Reaped_Sessions", ("audit", "reaped_sessions")),  # folded, as SQL does
        ('"Audit Log"', ("Audit Log",)),
        ('"we.ird ""schema"""."t; DROP TABLE x; --"', ('we.ird "schema"', "t; DROP TABLE x; --")),
        ('ops."Reaped"', ("ops", "Reaped")),
        ("a$1", ("a$1",)),
        ("é" * 31, None),  # not a plain (ASCII) name: it needs quotes
    ],
)
def test_table_names_are_read_as_sql_reads_them(value: str, parsed: tuple[str, ...] | None) -> None:
    if parsed is None:
        with pytest.raises(ValueError, match="quote a name"):
            parse_table_name(value)
    else:
        assert parse_table_name(value) == parsed


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "use 'table' or 'schema.table'"),
        ("a.b.c", "use 'table' or 'schema.table'"),
        ("audit log", "use 'table' or 'schema.table'"),
        ("1audit", "use 'table' or 'schema.table'"),
        ('"unterminated', "unterminated quoted name"),
        ('""', "a quoted name is empty"),
        ('"a\nb"', "control character"),
        ('"' + "é" * 32 + '"', "longer than 63 bytes"),
        ("a" * 64, "longer than 63 bytes"),
        ("schema.", "use 'table' or 'schema.table'"),
    ],
)
def test_bad_table_names_are_configuration_errors(
    value: str, problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_environment(monkeypatch)
    path = _minimal_config(tmp_path, audit_table("host=/tmp dbname=audit", table=value))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    (line,) = caught.value.problems
    assert line.startswith("audit.table: invalid table name")
    assert problem in line


def test_the_audit_section_is_optional_and_strict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_environment(monkeypatch)
    settings = load_settings(_minimal_config(tmp_path, ""))
    assert not settings.audit.enabled
    assert not load_settings(_minimal_config(tmp_path, '\n[audit]\ndsn = ""\n')).audit.enabled
    enabled = load_settings(_minimal_config(tmp_path, audit_table("host=/tmp", table="ops.log")))
    assert enabled.audit.enabled
    assert enabled.audit.table_name == ("ops", "log")
    with pytest.raises(ConfigError, match=r"audit\.tabel: unknown key 'tabel' \(did you mean"):
        load_settings(_minimal_config(tmp_path, '\n[audit]\ntabel = "x"\n'))
    with pytest.raises(ConfigError, match=r"audit\.password_file: password file .* does not"):
        load_settings(_minimal_config(tmp_path, '\n[audit]\npassword_file = "/nonexistent"\n'))
    monkeypatch.setenv("PG_REAPER_AUDIT__DSN", "host=/elsewhere")
    assert load_settings(_minimal_config(tmp_path, "")).audit.enabled


def test_the_audit_dsn_is_a_secret_in_check_config_and_in_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clean_environment(monkeypatch)
    path = _minimal_config(tmp_path, audit_table(f"postgresql://auditor:{SECRET}@db.example/a"))
    assert main(["check-config", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    assert "password=********" in out
    assert "host=db.example" in out
    assert SECRET not in repr(load_settings(path))

    # A malformed DSN, and one whose error is about another key: the password shows in neither.
    for text in (
        audit_table(f"host=x password='{SECRET}"),
        audit_table(f"postgresql://auditor:{SECRET}@db.example/a", extra="tabel = 'x'"),
    ):
        path = _minimal_config(tmp_path, text)
        assert main(["check-config", "-c", str(path)]) == 2
        out, err = capsys.readouterr()
        assert "audit." in err
        assert SECRET not in out + err


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("PG_REAPER_"):
            monkeypatch.delenv(name)


def _minimal_config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        textwrap.dedent(
            """\
            [log]
            format = "json"

            [[servers]]
            name = "primary"
            dsn = "host=/tmp dbname=postgres"

            [[policies]]
            name = "idle"
            max_idle = "15m"
            """
        )
        + extra,
        encoding="utf-8",
    )
    return path


# --- the queue and the writer (no database) ----------------------------------------------------


def _event(pid: int, *, result: str = "terminated", instance: str = "pod-a") -> AuditEvent:
    record = AuditRecord(policy="idle", action="terminate", result=result, pid=pid)
    return AuditEvent(
        event="session_reaped", server="s", dry_run=False, instance=instance, record=record
    )


def _rows(count: int, *, start: int = 0) -> list[dict[str, Any]]:
    return [_event(pid).row() for pid in range(start, start + count)]


def test_the_queue_is_bounded_and_drops_the_newest_rows_counting_them() -> None:
    queue = RowQueue(capacity=3)
    taken = [queue.put(row) for row in _rows(5)]

    assert taken == [True, True, True, False, False]
    assert queue.dropped == 2
    assert len(queue) == 3
    stop = threading.Event()
    assert [r["pid"] for r in queue.peek(10, until=stop)] == [0, 1, 2]  # the oldest kept


def test_a_batch_stays_queued_until_it_is_written() -> None:
    queue = RowQueue(capacity=10)
    for row in _rows(5):
        queue.put(row)
    stop = threading.Event()

    first = queue.peek(2, until=stop)
    assert [r["pid"] for r in first] == [0, 1]
    assert [r["pid"] for r in queue.peek(2, until=stop)] == [0, 1], "not written: still there"
    queue.pop(len(first))
    assert [r["pid"] for r in queue.peek(10, until=stop)] == [2, 3, 4]

    left = queue.close()
    assert [r["pid"] for r in left] == [2, 3, 4]
    assert queue.put(_rows(1)[0]) is None, "a closed queue takes nothing"
    queue.pop(1)  # a write that ends after the close changes nothing
    assert len(queue) == 0
    stop.set()
    assert queue.peek(10, until=stop) == []


def test_rows_adopted_from_another_writer_fill_the_queue_up_to_its_bound() -> None:
    queue = RowQueue(capacity=4)
    queue.put(_rows(1)[0])
    assert queue.extend(_rows(5, start=10)) == 2
    assert queue.dropped == 2
    assert [r["pid"] for r in queue.close()] == [0, 10, 11, 12]


def test_a_full_queue_drops_counts_and_warns_once_without_waiting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logged = log_to(capsys)
    metrics = Metrics()
    writer = _writer(UNREACHABLE, metrics=metrics, capacity=100)  # not started: nothing drains

    started = time.monotonic()
    taken = [writer.submit(row) for row in _rows(1000)]
    took = time.monotonic() - started

    assert took < 0.5, f"1000 submits took {took:.2f} s"
    assert taken.count(True) == 100
    assert taken.count(False) == 900
    assert writer.dropped == 900
    assert _sample(metrics, "pg_reaper_audit_errors_total", reason="dropped") == 900
    assert _sample(metrics, "pg_reaper_audit_errors_total", reason="write") == 0
    warnings = [e for e in logged() if e["event"] == "audit_queue_full"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["capacity"] == 100
    assert len(writer.stop(timeout=1)) == 100


def test_an_unreachable_database_is_logged_once_counted_retried_and_never_waited_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logged = log_to(capsys)
    metrics = Metrics()
    writer = _writer(UNREACHABLE, metrics=metrics)
    writer.start()
    try:
        started = time.monotonic()
        for row in _rows(50):
            assert writer.submit(row) is True
        assert time.monotonic() - started < 0.5
        wait_for(lambda: writer.failures >= 2, timeout=10, what="a retry after 1 s")
        assert writer.failing
        assert writer.queued == 50, "the rows wait for the database"
    finally:
        stopping = time.monotonic()
        left = writer.stop(timeout=2)
        assert time.monotonic() - stopping < 2.5
    assert len(left) == 50
    errors = _sample(metrics, "pg_reaper_audit_errors_total", reason="write")
    assert errors is not None
    assert errors >= 2
    failed = [e for e in logged() if e["event"] == "audit_failed"]
    assert [e["level"] for e in failed] == ["error"], "retries are at debug level"
    assert "cannot connect" in failed[0]["error"]
    assert failed[0]["table"] == "public.pg_reaper_audit"


def test_submit_without_a_writer_does_nothing() -> None:
    AuditSink().submit(_event(1))


def test_a_reload_that_changes_the_table_hands_the_queued_rows_to_the_new_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_environment(monkeypatch)
    first = load_settings(_minimal_config(tmp_path, audit_table(UNREACHABLE, table="one")))
    second = load_settings(_minimal_config(tmp_path, audit_table(UNREACHABLE, table="two")))
    sink = AuditSink()
    writer = sink.start(first)
    try:
        assert writer is not None
        for pid in range(3):
            sink.submit(_event(pid))
        assert sink.reconfigure(first, timeout=0.5) is writer, "unchanged: kept"
        replacement = sink.reconfigure(second, timeout=0.5)
        assert replacement is not None
        assert replacement is not writer
        assert replacement.table == "public.two"
        assert replacement.queued == 3
        sink.submit(_event(9))
        assert replacement.queued == 4
        assert writer.submit(_rows(1)[0]) is None, "the old writer is stopped"
        assert sink.reconfigure(_without_audit(second), timeout=0.5) is None
    finally:
        sink.stop(timeout=0.5)


def _without_audit(settings: Settings) -> Settings:
    return settings.model_copy(update={"audit": type(settings.audit)()})


def _writer(dsn: str, **kwargs: Any) -> AuditWriter:
    conn = AuditConnection(
        dsn=dsn,
        table=("public", "pg_reaper_audit"),
        connect_timeout=timedelta(seconds=2),
        statement_timeout=timedelta(seconds=5),
    )
    return AuditWriter(conn, **kwargs)


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# --- against real servers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def audit_server(pg_major: int) -> Iterator[EmbeddedPostgres]:
    """The audit database: a throwaway server of its own, which a test may stop and freeze."""
    # synchronous_commit off (the throwaway default) would lose acknowledged rows to the
    # immediate shutdowns of the tests: a commit is durable when it returns, as in production.
    with EmbeddedPostgres(major=pg_major, settings={"synchronous_commit": "on"}) as server:
        yield server


@pytest.fixture
def audit_db(audit_server: EmbeddedPostgres) -> EmbeddedPostgres:
    audit_server.start()  # an earlier test may have left it stopped
    return audit_server


@pytest.mark.integration
def test_once_writes_one_row_per_audit_log_line_dry_run_and_failures_included(
    pg: TestServer,
    sessions: Sessions,
    audit_db: EmbeddedPostgres,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = {"user": "appuser", "password": "appuser", "tcp": True}
    idle = [sessions.idle(application=f"ta-idle-{i}", **app) for i in range(2)]
    in_tx = sessions.idle_in_transaction(application="ta-in-tx", **app)
    superuser = sessions.idle(application="ta-superuser")  # not for a pg_signal_backend role
    time.sleep(1.3)
    table = ("public", "ta_audit")
    config = write_config(
        """
        [[policies]]
        name = "stuck"
        states = ["idle in transaction"]
        max_idle = "1s"
        applications = ["^ta-"]

        [[policies]]
        name = "idle"
        max_idle = "1s"
        applications = ["^ta-"]
        """
        + audit_table(audit_db.dsn(), table="public.ta_audit"),
        dsn=pg.dsn(user="reaper_lp", password="reaper_lp", tcp=True),
    )

    # The superuser's session is denied: predicted in a dry run, which signals nothing and so
    # fails nothing (exit 0); a real failure when it is tried (exit 1).
    assert main(["once", "-c", str(config), "--dry-run"]) == 0
    dry_logged = decisions(json_events(capsys.readouterr().err))
    assert main(["once", "-c", str(config)]) == 1
    logged = decisions(json_events(capsys.readouterr().err))

    rows = rows_of(audit_db, table)
    assert len(rows) == len(dry_logged) + len(logged), "one row per log line, no more"
    server = f"pg{pg.major}"
    for row, event in zip(rows, dry_logged + logged, strict=True):
        check_row_is_the_log_line(row, event, server=server)
    by_pid = {(r["pid"], r["dry_run"]): r for r in rows}
    victims = {c.info.backend_pid for c in idle}
    for pid in victims:
        assert by_pid[pid, True]["result"] == "dry_run"
        assert by_pid[pid, False]["result"] == "terminated"
        assert by_pid[pid, False]["policy"] == "idle"
    stuck = by_pid[in_tx.info.backend_pid, False]
    assert (stuck["policy"], stuck["result"], stuck["state"]) == (
        "stuck",
        "terminated",
        "idle in transaction",
    )
    assert stuck["transaction_seconds"] > 1
    denied = by_pid[superuser.info.backend_pid, False]
    assert denied["event"] == "session_reap_failed"
    assert denied["result"] == "denied"
    assert denied["detail"]
    assert pg.is_alive(superuser.info.backend_pid)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("spelled", "table"),
    [
        (
            '"we.ird ""schema"""."audit""; DROP TABLE canary; --"',
            ('we.ird "schema"', 'audit"; DROP TABLE canary; --'),
        ),
        ("Odd_Schema.Reaped_Sessions", ("odd_schema", "reaped_sessions")),
    ],
    ids=["quoted", "folded"],
)
def test_a_hostile_table_name_and_application_name_round_trip(
    spelled: str,
    table: tuple[str, str],
    sessions: Sessions,
    audit_db: EmbeddedPostgres,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with psycopg.connect(audit_db.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table[0])))
        conn.execute("CREATE TABLE IF NOT EXISTS public.canary (x int)")
    application = 'tc-x\'); DROP TABLE canary; -- "q" \\ %s {t} $$'
    victim = sessions.idle(application=application)
    time.sleep(1.3)
    config = write_config(policy("idle", "^tc-") + audit_table(audit_db.dsn(), table=spelled))

    assert main(["once", "-c", str(config)]) == 0

    (event,) = decisions(json_events(capsys.readouterr().err))
    assert event["application"] == application
    (row,) = rows_of(audit_db, table)
    assert row["pid"] == victim.info.backend_pid
    assert row["application"] == application
    with psycopg.connect(audit_db.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.canary')").fetchone() != (None,)
        indexes = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
            list(table),
        ).fetchall()
    assert any("(logged_at)" in i[0] for i in indexes), indexes


@pytest.mark.integration
def test_the_audit_password_never_appears_in_output_or_logs(
    sessions: Sessions,
    audit_db: EmbeddedPostgres,
    write_config: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with psycopg.connect(audit_db.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS public.td_audit")
        conn.execute("DROP ROLE IF EXISTS auditor")
        conn.execute(sql.SQL("CREATE ROLE auditor LOGIN PASSWORD {}").format(sql.Literal(SECRET)))
        conn.execute("GRANT USAGE, CREATE ON SCHEMA public TO auditor")
    password_file = tmp_path / "audit-password"
    password_file.write_text(SECRET + "\n", encoding="utf-8")
    over_tcp = audit_db.dsn(user="auditor", tcp=True)
    outputs = []

    # In the DSN, then from password_file: both write their rows.
    for dsn, extra in (
        (audit_db.dsn(user="auditor", password=SECRET, tcp=True), ""),
        (over_tcp, f"password_file = {toml_string(str(password_file))}"),
    ):
        victim = sessions.idle(application="td-victim")
        time.sleep(1.3)
        config = write_config(
            policy("idle", "^td-") + audit_table(dsn, table="td_audit", extra=extra)
        )
        assert main(["once", "-c", str(config), "--json"]) == 0
        out, err = capsys.readouterr()
        outputs.append(out + err)
        assert victim.info.backend_pid in {r["pid"] for r in rows_of(audit_db, ("td_audit",))}
        assert main(["check-config", "-c", str(config)]) == 0
        outputs.append("".join(capsys.readouterr()))

    # A wrong password: the failure is logged, and says nothing of either password.
    sessions.idle(application="td-victim")
    time.sleep(1.3)
    config = write_config(
        policy("idle", "^td-")
        + audit_table(audit_db.dsn(user="auditor", password=WRONG_SECRET, tcp=True))
    )
    assert main(["once", "-c", str(config)]) == 0
    out, err = capsys.readouterr()
    outputs.append(out + err)
    failed = [e for e in json_events(err) if e["event"] == "audit_failed"]
    assert failed
    assert "password authentication failed" in failed[0]["error"]
    assert [e for e in json_events(err) if e["event"] == "audit_rows_lost"]

    for text in outputs:
        assert SECRET not in text
        assert WRONG_SECRET not in text


@pytest.mark.integration
def test_the_daemon_reaps_on_time_while_the_audit_database_is_down_and_catches_up_after(
    pg: TestServer,
    sessions: Sessions,
    audit_db: EmbeddedPostgres,
    tmp_path: Path,
) -> None:
    port = free_port()
    server = f"pg{pg.major}"
    table = ("public", "tb_audit")
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server: pg.dsn()},
        policies=policy("idle", "^tb-", max_idle="2s")
        + audit_table(audit_db.dsn(), table="tb_audit"),
        port=port,
    )
    daemon = RunningDaemon(config, port=port)
    try:
        daemon.wait_ready()
        assert daemon.wait_event("audit_started")["table"] == "public.tb_audit"
        first = sessions.idle(application="tb-before")
        assert pg.wait_gone(first.info.backend_pid, timeout=10)
        wait_for(lambda: len(rows_of(audit_db, table)) == 1, timeout=5, what="the first row")
        with psycopg.connect(audit_db.dsn(), autocommit=True) as conn:
            names = {r[0] for r in conn.execute("SELECT application_name FROM pg_stat_activity")}
        assert "pg-reaper" in names, "the writer's session names itself"

        audit_db.stop(mode="immediate")

        for i in range(3):
            conn = sessions.open(application=f"tb-down-{i}")
            conn.execute("SELECT 1")
            eligible_at = time.monotonic() + 2.0
            assert pg.wait_gone(conn.info.backend_pid, timeout=10)
            late = time.monotonic() - eligible_at
            assert late < 2.5, f"terminated {late:.2f} s after it became eligible"
        failed = daemon.wait_event("audit_failed")
        assert failed["level"] == "error"
        daemon.wait_value(
            "pg_reaper_audit_errors_total", lambda v: (v or 0) >= 2, reason="write", timeout=10
        )
        assert len(daemon.events("audit_failed")) == 1, "retries are at debug level"
        assert daemon.value("pg_reaper_audit_errors_total", reason="dropped") == 0

        audit_db.start()

        recovered = daemon.wait_event("audit_recovered", timeout=20)
        assert recovered["level"] == "info"
        assert recovered["failures"] >= 2
        reaped = daemon.events("session_reaped")
        assert len(reaped) == 4
        daemon.wait_until(lambda: len(rows_of(audit_db, table)) >= 4, timeout=5, what="every row")
        rows = rows_of(audit_db, table)
        assert sorted(r["pid"] for r in rows) == sorted(e["pid"] for e in reaped), rows
        by_pid = {r["pid"]: r for r in rows}
        for event in reaped:
            check_row_is_the_log_line(by_pid[event["pid"]], event, server=server)

        daemon.send(signal.SIGTERM)
        assert daemon.wait_exit(timeout=15) == 0
        assert not daemon.events("audit_rows_lost")
        assert daemon.other_lines == []
    finally:
        daemon.stop()


@pytest.mark.integration
def test_a_hung_audit_database_delays_neither_reaping_nor_shutdown(
    pg: TestServer,
    sessions: Sessions,
    audit_db: EmbeddedPostgres,
    tmp_path: Path,
) -> None:
    config = daemon_config(
        tmp_path / "config.toml",
        servers={f"pg{pg.major}": pg.dsn()},
        policies=policy("idle", "^th-", max_idle="2s")
        + audit_table(audit_db.dsn(), table="th_audit"),
        port=None,
    )
    daemon = RunningDaemon(config, port=None)
    writer_pid = None
    try:
        first = sessions.idle(application="th-before")
        assert pg.wait_gone(first.info.backend_pid, timeout=15)
        wait_for(lambda: bool(rows_of(audit_db, ("th_audit",))), timeout=5, what="a row")
        with psycopg.connect(audit_db.dsn(), autocommit=True) as conn:
            (writer_pid,) = (
                r[0]
                for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-reaper'"
                )
            )
        os.kill(writer_pid, signal.SIGSTOP)  # the writer's backend answers nothing from now on

        for i in range(2):
            conn = sessions.open(application=f"th-hung-{i}")
            conn.execute("SELECT 1")
            eligible_at = time.monotonic() + 2.0
            assert pg.wait_gone(conn.info.backend_pid, timeout=10)
            late = time.monotonic() - eligible_at
            assert late < 2.5, f"terminated {late:.2f} s after it became eligible"

        started = time.monotonic()
        daemon.send(signal.SIGTERM)
        code = daemon.wait_exit(timeout=15)
        took = time.monotonic() - started
        assert code == 0, daemon.stderr_text()
        assert took < 5, f"took {took:.1f} s to stop"
        lost = daemon.events("audit_rows_lost")
        assert lost
        assert lost[0]["rows"] >= 1
    finally:
        if writer_pid is not None:
            os.kill(writer_pid, signal.SIGCONT)
        daemon.stop()


@pytest.mark.integration
def test_sighup_with_a_new_table_moves_the_audit_to_it(
    pg: TestServer,
    sessions: Sessions,
    audit_db: EmbeddedPostgres,
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.toml"

    def write(table: str) -> Path:
        return daemon_config(
            path,
            servers={f"pg{pg.major}": pg.dsn()},
            policies=policy("idle", "^ts-", max_idle="1s")
            + audit_table(audit_db.dsn(), table=table),
            port=None,
        )

    daemon = RunningDaemon(write("ts_before"), port=None)
    try:
        before = sessions.idle(application="ts-before")
        assert pg.wait_gone(before.info.backend_pid, timeout=15)
        wait_for(lambda: bool(rows_of(audit_db, ("ts_before",))), timeout=5, what="a row")

        write("ts_after")
        daemon.send(signal.SIGHUP)
        daemon.wait_event("config_reloaded")
        assert daemon.wait_event("audit_started", table="public.ts_after")
        after = sessions.idle(application="ts-after")
        assert pg.wait_gone(after.info.backend_pid, timeout=15)
        wait_for(lambda: bool(rows_of(audit_db, ("ts_after",))), timeout=5, what="a row")

        assert [r["pid"] for r in rows_of(audit_db, ("ts_before",))] == [before.info.backend_pid]
        assert [r["pid"] for r in rows_of(audit_db, ("ts_after",))] == [after.info.backend_pid]
    finally:
        daemon.stop()


# An audit table as an earlier pg-reaper made it: every column but instance.
_EARLIER_TABLE = """
CREATE TABLE {table} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, logged_at timestamptz NOT NULL,
    event text NOT NULL, server text NOT NULL, policy text, action text,
    dry_run boolean NOT NULL, result text NOT NULL, pid integer NOT NULL,
    backend_start timestamptz, database text, "user" text, application text, client_addr text,
    state text, idle_seconds double precision, transaction_seconds double precision,
    connection_seconds double precision, reason text, detail text, query text)
"""


@pytest.mark.integration
@pytest.mark.parametrize("owner", [True, False], ids=["owner", "insert-only"])
def test_a_table_made_by_an_earlier_pg_reaper_gets_the_instance_column_or_still_its_rows(
    audit_db: EmbeddedPostgres,
    capsys: pytest.CaptureFixture[str],
    owner: bool,  # noqa: FBT001 - a parameter
) -> None:
    table = f"earlier_{'owned' if owner else 'granted'}"
    with psycopg.connect(audit_db.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS earlier_owned, earlier_granted")
        conn.execute(sql.SQL(_EARLIER_TABLE).format(table=sql.Identifier(table)))
        conn.execute("DROP ROLE IF EXISTS audit_writer")
        conn.execute("CREATE ROLE audit_writer LOGIN")
        grant = (
            "ALTER TABLE {} OWNER TO audit_writer"
            if owner
            else "GRANT INSERT ON {} TO audit_writer"
        )
        conn.execute(sql.SQL(grant).format(sql.Identifier(table)))
    configure(LogSection(format="json"), stream=sys.stderr)
    session = AuditConnection(
        dsn=audit_db.dsn(user="audit_writer"),
        table=("public", table),
        connect_timeout=timedelta(seconds=2),
        statement_timeout=timedelta(seconds=5),
    )
    writer = AuditWriter(session)
    row = _event(7, result="terminated", instance="pod-a").row()
    writer.start()
    try:
        writer.submit(row)
        wait_for(lambda: writer.written == 1, timeout=10, what="the row written")
    finally:
        writer.stop(timeout=5)
    (written,) = rows_of(audit_db, (table,))
    assert written["pid"] == 7
    warnings = [
        e for e in json_events(capsys.readouterr().err) if e["event"] == "audit_table_outdated"
    ]
    if owner:
        assert written["instance"] == "pod-a"
        assert warnings == []
    else:
        assert "instance" not in written
        (warning,) = warnings
        assert "must be owner" in warning["error"]
        assert f"ALTER TABLE public.{table} ADD COLUMN instance text" in warning["detail"]
