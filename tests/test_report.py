"""`pg-reaper report`: the leak report, read from an audit table filled by real runs of `once`
(real idle sessions reaped, a dry run), and by rows of other ages and hostile names written
straight into it."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import textwrap
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from reaper.audit_event import AuditEvent, AuditRecord
from reaper.cli import main
from reaper.commands.report import (
    ReportHeader,
    Window,
    parse_window,
    render_csv,
    render_json,
    render_text,
)
from reaper.pg.audit import AuditConnection
from reaper.pg.report import LeakGroup, LeakReport
from tests.servers import ADMIN_APPLICATION, Sessions, TestServer
from tests.test_daemon import toml_string

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

# A socket directory that does not exist: every connection fails at once, no server needed.
UNREACHABLE = "host=/nonexistent/pg-reaper-report-test port=5432 dbname=postgres"
NOW = datetime.now(UTC)
# Names an application (or a writer of the table) may choose: commas, quotes, a line break,
# terminal escapes, a right-to-left override, and the starts of spreadsheet formulas.
HOSTILE = (
    "a,b",
    'q"uote',
    "line\nbreak",
    "\x1b[31mred",
    "\u202eevil",
    "=cmd|' /C calc'!A0",
    "+1",
    "-2",
    "@SUM(1)",
)


def config_text(*, dsn: str, audit_dsn: str | None, table: str, policies: str = "") -> str:
    audit = (
        ""
        if audit_dsn is None
        else f"\n[audit]\ndsn = {toml_string(audit_dsn)}\ntable = {toml_string(table)}\n"
    )
    return (
        textwrap.dedent(
            f"""\
            [reaper]
            protect_applications = ["^{ADMIN_APPLICATION}$"]

            [log]
            format = "json"

            [[servers]]
            name = "main"
            dsn = {toml_string(dsn)}
            """
        )
        + textwrap.dedent(policies or '[[policies]]\nname = "never"\nmax_idle = "1000d"\n')
        + audit
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def report(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["report", "-c", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def report_json(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> dict[str, Any]:
    code, out, err = report(capsys, config, *args, "--json")
    assert code == 0, err
    document: dict[str, Any] = json.loads(out)
    return document


def by_name(document: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
    return {g["name"]: g for g in document["groups"]}


def all_rows(pg: TestServer, table: tuple[str, str]) -> list[dict[str, Any]]:
    with psycopg.connect(pg.dsn(), autocommit=True, row_factory=dict_row) as conn:
        query = sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(*table))
        return conn.execute(query).fetchall()


def expected(rows: list[dict[str, Any]], column: str) -> dict[Any, tuple[int, float, int]]:
    """The report computed from the raw rows, independently of report.sql: per group,
    (sessions reaped, idle seconds reclaimed, sessions only in a dry run), each session once."""
    reaped: dict[Any, dict[tuple[Any, ...], float]] = {}
    dry: dict[Any, set[tuple[Any, ...]]] = {}
    for row in rows:
        session = (row["server"], row["pid"], row["backend_start"])
        if row["event"] != "session_reaped":
            continue
        if not row["dry_run"] and row["result"] in {"terminated", "cancelled"}:
            held = reaped.setdefault(row[column], {})
            held[session] = max(held.get(session, 0.0), row["idle_seconds"] or 0.0)
        elif row["dry_run"] and row["result"] == "dry_run":
            dry.setdefault(row[column], set()).add(session)
    return {
        name: (
            len(reaped.get(name, {})),
            sum(reaped.get(name, {}).values()),
            len(dry.get(name, set()) - set(reaped.get(name, {}))),
        )
        for name in reaped.keys() | dry.keys()
    }


# --- a table filled by real runs -------------------------------------------------------------


@dataclass(frozen=True)
class Filled:
    config: Path
    table: tuple[str, str]
    tag: str
    rows: list[dict[str, Any]]


@pytest.fixture(scope="module")
def filled(pg: TestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    """An audit table written by `once`: a dry run and a real run over six idle sessions of
    three applications, two roles and two databases, then a dry run over two more."""
    tag = f"rp{os.getpid()}"  # this worker's sessions and table only
    table = ("public", f"{tag}_audit")
    pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(*table)))
    opened = Sessions(pg)
    app = {"user": "appuser", "password": "appuser"}
    try:
        for _ in range(3):
            opened.idle(application=f"{tag}-web", tcp=True, **app)
        for _ in range(2):
            opened.idle_in_transaction(
                application=f"{tag}-batch", user="keeper", password="keeper", dbname="otherdb"
            )
        opened.idle(application=f'={tag}-cmd,"x"', **app)
        time.sleep(1.3)
        policies = f"""
            [[policies]]
            name = "stuck"
            states = ["idle in transaction"]
            max_idle = "1s"
            applications = [{toml_string(tag)}]

            [[policies]]
            name = "idle"
            max_idle = "1s"
            applications = [{toml_string(tag)}]
            """
        config = write(
            tmp_path_factory.mktemp("report") / "config.toml",
            config_text(dsn=pg.dsn(), audit_dsn=pg.dsn(), table=".".join(table), policies=policies),
        )
        assert main(["once", "-c", str(config), "--dry-run"]) == 0
        assert main(["once", "-c", str(config)]) == 0
        for _ in range(2):
            opened.idle(application=f"{tag}-dry", **app)
        time.sleep(1.3)
        assert main(["once", "-c", str(config), "--dry-run"]) == 0
        rows = all_rows(pg, table)
        yield Filled(config=config, table=table, tag=tag, rows=rows)
    finally:
        opened.close()
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(*table)))


# Per --by: the column, and the counts the run above must give (None: seen in the rows only).
GROUPS = {
    "application": "application",
    "user": "user",
    "database": "database",
    "client": "client_addr",
    "policy": "policy",
    "server": "server",
}


def known_counts(tag: str, by: str) -> dict[str, tuple[int, int]] | None:
    """(reaped, dry run only) of the groups whose counts follow from the sessions opened."""
    return {
        "application": {
            f"{tag}-web": (3, 0),
            f"{tag}-batch": (2, 0),
            f'={tag}-cmd,"x"': (1, 0),
            f"{tag}-dry": (0, 2),
        },
        "user": {"appuser": (4, 2), "keeper": (2, 0)},
        "policy": {"idle": (4, 2), "stuck": (2, 0)},
        "server": {"main": (6, 2)},
    }.get(by)


@pytest.mark.integration
@pytest.mark.parametrize("by", list(GROUPS))
def test_report_counts_real_reaps_by_every_grouping_in_every_format(
    by: str, filled: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    column = GROUPS[by]
    truth = expected(filled.rows, column)
    assert sum(n for n, _, _ in truth.values()) == 6
    assert sum(d for _, _, d in truth.values()) == 2
    known = known_counts(filled.tag, by)
    if known is not None:
        assert {k: (n, d) for k, (n, _, d) in truth.items()} == known
    if by == "database":
        assert truth["otherdb"][0] == 2

    # JSON: every group, its counts and the idle time its reaped sessions held.
    document = report_json(capsys, filled.config, "--by", by)
    assert document["by"] == by
    assert document["table"] == ".".join(filled.table)
    groups = by_name(document)
    assert groups.keys() == truth.keys()
    for name, (sessions, idle, dry) in truth.items():
        group = groups[name]
        assert group["sessions_reaped"] == sessions, name
        assert group["dry_run_sessions"] == dry, name
        assert group["idle_seconds_reclaimed"] == pytest.approx(idle, abs=0.01)
        assert (group["last_reaped"] is None) == (sessions == 0)
        if sessions:
            assert group["idle_seconds_reclaimed"] > 1.0 * sessions  # max_idle was 1s
    assert [g["sessions_reaped"] for g in document["groups"]] == sorted(
        (g["sessions_reaped"] for g in document["groups"]), reverse=True
    )
    assert document["total"] == {
        "groups": len(truth),
        "sessions_reaped": 6,
        "idle_seconds_reclaimed": pytest.approx(sum(i for _, i, _ in truth.values()), abs=0.01),
        "dry_run_sessions": 2,
    }

    # CSV: the same numbers, a header first, the formula-like name neutralised.
    code, out, err = report(capsys, filled.config, "--by", by, "--csv")
    assert code == 0, err
    header, *records = list(csv.reader(io.StringIO(out)))
    assert header == [
        by,
        "sessions_reaped",
        "idle_seconds_reclaimed",
        "longest_idle_seconds",
        "dry_run_sessions",
        "first_reaped",
        "last_reaped",
    ]
    assert len(out.splitlines()) == len(truth) + 1
    csv_counts = {r[0]: (int(r[1]), float(r[2]), int(r[4])) for r in records}
    for name, (sessions, idle, dry) in truth.items():
        cell = "'" + name if name.startswith("=") else name
        assert csv_counts[cell][0::2] == (sessions, dry)
        assert csv_counts[cell][1] == pytest.approx(idle, abs=0.01)

    # The table: a title, a line per group with its count, the totals.
    code, out, err = report(capsys, filled.config, "--by", by)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"Sessions reaped by {by}, between ")
    assert "REAPED" in lines[2]
    assert "IDLE RECLAIMED" in lines[2]
    for name, (sessions, _, dry) in truth.items():
        (line,) = [x for x in lines[3:] if x.startswith(f"  {name}  ")]
        cells = re.split(r"\s{2,}", line.strip())
        assert (cells[1], cells[4]) == (str(sessions), str(dry)), line
    assert lines[-1].startswith(f"{len(truth)} ")
    assert "6 sessions reaped" in lines[-1]
    assert "2 more would have been (dry run)" in lines[-1]


@pytest.mark.integration
def test_top_n_shows_the_groups_that_leak_most_and_totals_over_all(
    filled: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    document = report_json(capsys, filled.config, "--top", "2")
    assert [g["name"] for g in document["groups"]] == [f"{filled.tag}-web", f"{filled.tag}-batch"]
    assert document["total"]["groups"] == 4
    assert document["total"]["sessions_reaped"] == 6
    code, out, _ = report(capsys, filled.config, "--top", "1")
    assert code == 0
    assert out.splitlines()[-1].startswith("the top 1 of 4 applications: 6 sessions reaped")


@pytest.mark.integration
def test_server_filter_reads_only_that_servers_sessions(
    filled: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_json(capsys, filled.config, "--server", "main")["total"]["sessions_reaped"] == 6
    # Any name in the table, not only the config's servers: none reaped there.
    code, out, _ = report(capsys, filled.config, "--server", "elsewhere")
    assert code == 0
    assert out.startswith("no sessions reaped on server elsewhere between ")


# --- rows written straight into the table ----------------------------------------------------


def event(
    application: str | None,
    *,
    pid: int,
    ago: timedelta,
    idle: float = 60.0,
    result: str = "terminated",
    dry_run: bool = False,
    server: str = "main",
    failed: bool = False,
) -> dict[str, Any]:
    """An audit row as pg-reaper writes it, logged `ago` before now."""
    return AuditEvent(
        event="session_reap_failed" if failed else "session_reaped",
        server=server,
        dry_run=dry_run,
        instance="test:1",
        record=AuditRecord(
            policy="idle",
            action="terminate",
            result=result,
            pid=pid,
            backend_start=NOW - timedelta(days=30, seconds=-pid),  # one per pid
            database="shop",
            user="app",
            application=application,
            client_addr="local",
            state="idle",
            idle_seconds=float(idle),
        ),
        logged_at=NOW - ago,
    ).row()


@pytest.fixture
def table_of(pg: TestServer, tmp_path: Path) -> Iterator[Any]:
    """Make an audit table (as the writer does) holding `rows`; the config that reads it."""
    made: list[tuple[str, str]] = []

    def make(rows: list[dict[str, Any]], *, name: str) -> Path:
        table = ("public", f"{name}_{os.getpid()}")
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(*table)))
        made.append(table)
        with AuditConnection(
            dsn=pg.dsn(),
            table=table,
            connect_timeout=timedelta(seconds=5),
            statement_timeout=timedelta(seconds=10),
        ) as conn:
            conn.insert(rows)
        # The servers are not reached: the report reads the audit database only.
        return write(
            tmp_path / f"{name}.toml",
            config_text(dsn=UNREACHABLE, audit_dsn=pg.dsn(), table=".".join(table)),
        )

    yield make
    for table in made:
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(*table)))


@pytest.mark.integration
def test_windows_leave_out_rows_logged_outside_them(
    table_of: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    hour, day = timedelta(hours=1), timedelta(days=1)
    config = table_of(
        [
            event("old", pid=1, ago=10 * day, idle=100),
            event("old", pid=2, ago=10 * day, idle=200),
            event("mid", pid=3, ago=3 * day, idle=30),
            event("new", pid=4, ago=hour, idle=40),
            # cancelled, then terminated by escalate_after: one session, its longest idle.
            event("new", pid=5, ago=hour, idle=10, result="cancelled"),
            event("new", pid=5, ago=hour - timedelta(seconds=5), idle=15),
            # a dry run of a session reaped afterwards counts as reaped only
            event("new", pid=4, ago=2 * hour, idle=30, result="dry_run", dry_run=True),
            # neither a failure nor the `log` action is a reap
            event("new", pid=6, ago=hour, result="denied", failed=True),
            event("new", pid=7, ago=hour, result="logged"),
        ],
        name="rp_windows",
    )

    def counts(*args: str) -> dict[str | None, tuple[int, float, int]]:
        document = report_json(capsys, config, *args)
        return {
            name: (g["sessions_reaped"], g["idle_seconds_reclaimed"], g["dry_run_sessions"])
            for name, g in by_name(document).items()
        }

    assert counts() == {"mid": (1, 30, 0), "new": (2, 55, 0)}  # the default: 7 days
    assert counts("--since", "30d") == {
        "old": (2, 300, 0),
        "mid": (1, 30, 0),
        "new": (2, 55, 0),
    }
    assert counts("--since", "2d") == {"new": (2, 55, 0)}
    start, end = (NOW - 11 * day).isoformat(), (NOW - 9 * day).isoformat()
    assert counts("--from", start, "--to", end) == {"old": (2, 300, 0)}
    # A date alone is midnight UTC; --to defaults to now.
    assert counts("--from", (NOW - 4 * day).date().isoformat()) == {
        "mid": (1, 30, 0),
        "new": (2, 55, 0),
    }

    # An empty window says so, in each format, and is no error.
    code, out, err = report(capsys, config, "--from", "2001-01-01", "--to", "2001-01-02")
    assert (code, err) == (0, "")
    assert out.startswith(
        "no sessions reaped between 2001-01-01 00:00:00 UTC and 2001-01-02 00:00:00 UTC ("
    )
    document = report_json(capsys, config, "--from", "2001-01-01", "--to", "2001-01-02")
    assert document["groups"] == []
    assert document["total"]["sessions_reaped"] == 0
    assert (document["from"], document["to"]) == (
        "2001-01-01T00:00:00+00:00",
        "2001-01-02T00:00:00+00:00",
    )
    code, out, _ = report(capsys, config, "--from", "2001-01-01", "--to", "2001-01-02", "--csv")
    assert code == 0
    assert out.splitlines() == [
        (
            "application,sessions_reaped,idle_seconds_reclaimed,longest_idle_seconds,"
            "dry_run_sessions,first_reaped,last_reaped"
        )
    ]


@pytest.mark.integration
def test_hostile_names_are_escaped_in_the_table_exact_in_json_and_safe_in_csv(
    table_of: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [event(name, pid=100 + i, ago=timedelta(minutes=5)) for i, name in enumerate(HOSTILE)]
    rows += [event(None, pid=99, ago=timedelta(minutes=5))]
    rows += [event("", pid=98, ago=timedelta(minutes=5))]
    config = table_of(rows, name="rp_hostile")

    document = report_json(capsys, config, "--top", "50")
    assert set(by_name(document)) == {*HOSTILE, None, ""}

    code, out, _ = report(capsys, config, "--top", "50")
    assert code == 0
    assert "\x1b" not in out
    assert "\u202e" not in out
    assert "  \\x1b[31mred  " in out
    assert "  \\u202eevil  " in out
    assert "  line\\x0abreak  " in out
    assert "  (unknown)  " in out
    assert "  (empty)  " in out
    assert len(out.splitlines()) == 3 + len(HOSTILE) + 2 + 2  # title, blank, header; blank, total

    code, out, _ = report(capsys, config, "--top", "50", "--csv")
    assert code == 0
    assert len(out.splitlines()) == 1 + len(HOSTILE) + 2  # one record per line
    names = [record[0] for record in csv.reader(io.StringIO(out))][1:]
    assert set(names) == {
        "a,b",
        'q"uote',
        "line\\x0abreak",
        "\\x1b[31mred",
        "\\u202eevil",
        "'=cmd|' /C calc'!A0",
        "'+1",
        "'-2",
        "'@SUM(1)",
        "",
    }
    assert names.count("") == 2  # NULL and empty


# --- what the report says when it cannot answer ----------------------------------------------


@pytest.mark.integration
def test_a_missing_table_or_schema_is_named_with_where_to_look(
    pg: TestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for table in ("public.rp_no_such_table", "rp_no_such_schema.audit"):
        config = write(
            tmp_path / "c.toml", config_text(dsn=pg.dsn(), audit_dsn=pg.dsn(), table=table)
        )
        code, out, err = report(capsys, config)
        assert (code, out) == (2, "")
        assert f"the audit table {table} does not exist" in err
        assert "docs/audit.md" in err


@pytest.mark.integration
def test_a_role_without_select_is_told_the_grant_and_works_once_granted(
    pg: TestServer,
    table_of: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """deploy/sql/pg_reaper_audit.sql grants INSERT only: the writer's role cannot read."""
    table_of([event("app", pid=1, ago=timedelta(minutes=1))], name="rp_grants")
    table = f"public.rp_grants_{os.getpid()}"
    pg.execute(f"GRANT INSERT ON {table} TO appuser")
    writer_dsn = pg.dsn(user="appuser", password="appuser", tcp=True)
    config = write(
        tmp_path / "writer.toml", config_text(dsn=pg.dsn(), audit_dsn=writer_dsn, table=table)
    )
    code, out, err = report(capsys, config)
    assert (code, out) == (2, "")
    assert f"the audit table {table} cannot be read: role appuser lacks SELECT on it" in err
    assert f"GRANT SELECT ON {table} TO appuser" in err
    assert "PG_REAPER_AUDIT__DSN" in err
    assert "password" not in err

    # As another role, through the environment, as docs/report.md says.
    with monkeypatch.context() as patched:
        patched.setenv("PG_REAPER_AUDIT__DSN", pg.dsn())
        assert report_json(capsys, config)["total"]["sessions_reaped"] == 1

    pg.execute(f"GRANT SELECT ON {table} TO appuser")
    assert report_json(capsys, config)["total"]["sessions_reaped"] == 1


@pytest.mark.integration
def test_a_view_a_foreign_table_shape_or_untrusted_row_security_is_not_read(
    pg: TestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suffix = os.getpid()
    view, wrong, secured = (f"public.rp_{kind}_{suffix}" for kind in ("view", "wrong", "rls"))
    pg.execute(f"DROP TABLE IF EXISTS {wrong}, {secured}")
    pg.execute(f"DROP VIEW IF EXISTS {view}")
    pg.execute(f"CREATE VIEW {view} AS SELECT 1 AS x")
    pg.execute(f"CREATE TABLE {wrong} (logged_at timestamptz, application integer)")
    # A table of another role, with row security: its policies would run as the reader.
    pg.execute(f"CREATE TABLE {secured} (LIKE {wrong})")
    pg.execute(f"ALTER TABLE {secured} OWNER TO appuser")
    pg.execute(f"ALTER TABLE {secured} ENABLE ROW LEVEL SECURITY")
    pg.execute(f"GRANT SELECT ON {secured} TO reaper_lp")
    try:
        cases = [
            (view, pg.dsn(), "is not a table"),
            (wrong, pg.dsn(), "is not pg-reaper's: these columns are missing or of another type"),
            (
                secured,
                pg.dsn(user="reaper_lp", password="reaper_lp", tcp=True),
                "has row-level security and is owned by role appuser",
            ),
        ]
        for table, dsn, said in cases:
            config = write(
                tmp_path / "c.toml", config_text(dsn=pg.dsn(), audit_dsn=dsn, table=table)
            )
            code, out, err = report(capsys, config)
            assert (code, out) == (2, ""), table
            assert said in err, err
            if table == wrong:  # the columns it lacks, and the one of another type
                assert "event, server, dry_run, result, pid, backend_start" in err
                assert "application" in err
    finally:
        pg.execute(f"DROP TABLE IF EXISTS {wrong}, {secured}")
        pg.execute(f"DROP VIEW IF EXISTS {view}")


# --- no server needed --------------------------------------------------------------------------


def test_no_audit_section_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "c.toml", config_text(dsn=UNREACHABLE, audit_dsn=None, table=""))
    code, out, err = report(capsys, config)
    assert (code, out) == (2, "")
    assert "no audit table is configured" in err
    assert "[audit]" in err


def test_an_unreachable_audit_database_exits_1_without_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = f"{UNREACHABLE} password=Report-S3cret"
    config = write(tmp_path / "c.toml", config_text(dsn=UNREACHABLE, audit_dsn=dsn, table="t"))
    code, out, err = report(capsys, config)
    assert (code, out) == (1, "")
    assert "cannot connect to /nonexistent/pg-reaper-report-test:5432" in err
    assert "Report-S3cret" not in err


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--since", "3d", "--from", "2026-01-01"], "--since cannot be combined with --from/--to"),
        (["--to", "2026-01-01"], "--to needs --from"),
        (["--since", "soon"], "--since: invalid duration 'soon'"),
        (["--since", "0"], "--since: must be longer than 0"),
        (["--since", "999999d"], "--since: '999999d' reaches before year 1"),
        (["--from", "yesterday"], "--from: invalid time 'yesterday': use ISO 8601"),
        (["--from", "2026-01-02", "--to", "2026-01-01"], "must be before --to"),
        (["--from", "2026-01-01T10:00+02:00", "--to", "2026-01-01T08:00Z"], "must be before"),
    ],
)
def test_a_bad_window_is_a_usage_error_naming_the_option(
    args: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(
        tmp_path / "c.toml", config_text(dsn=UNREACHABLE, audit_dsn=UNREACHABLE, table="t")
    )
    code, out, err = report(capsys, config, *args)
    assert (code, out) == (2, "")
    assert said in err


@pytest.mark.parametrize("args", [["--top", "0"], ["--top", "x"], ["--json", "--csv"]])
def test_bad_options_are_refused_by_the_parser(args: list[str], tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml", config_text(dsn=UNREACHABLE, audit_dsn=UNREACHABLE, table="t")
    )
    with pytest.raises(SystemExit) as exited:
        main(["report", "-c", str(config), *args])
    assert exited.value.code == 2


def test_the_window_default_is_the_last_week_and_times_without_offset_are_utc() -> None:
    now = datetime(2026, 12, 1, 18, 0, tzinfo=UTC)
    assert parse_window(since=None, start=None, end=None, now=now) == Window(
        start=now - timedelta(days=7), end=now
    )
    assert parse_window(since="1h30m", start=None, end=None, now=now).start == now - timedelta(
        minutes=90
    )
    window = parse_window(
        since=None, start="2026-11-01T10:00", end="2026-11-02T12:00+02:00", now=now
    )
    assert window == Window(
        start=datetime(2026, 11, 1, 10, tzinfo=UTC), end=datetime(2026, 11, 2, 10, tzinfo=UTC)
    )


def test_renderings_of_one_report_agree() -> None:
    moment = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    leaks = LeakReport(
        groups=(
            LeakGroup(
                name="=web",
                sessions=3,
                idle_seconds=5400.0,
                longest_idle_seconds=3600.0,
                dry_run_sessions=0,
                first_reaped=moment,
                last_reaped=moment + timedelta(hours=2),
            ),
            LeakGroup(
                name=None,
                sessions=0,
                idle_seconds=0.0,
                longest_idle_seconds=None,
                dry_run_sessions=4,
                first_reaped=None,
                last_reaped=None,
            ),
        ),
        total_groups=5,
        total_sessions=9,
        total_idle_seconds=7200.0,
        total_dry_run_sessions=4,
    )
    header = ReportHeader(
        table="reaper.audit",
        target="db:5432",
        by="policy",
        window=Window(start=moment - timedelta(days=7), end=moment + timedelta(days=1)),
        top=2,
    )
    lines = render_text(leaks, header).splitlines()
    assert lines[0] == (
        "Sessions reaped by policy, between 2026-11-23 12:00:00 UTC and 2026-12-01 12:00:00 UTC "
        "(reaper.audit on db:5432)"
    )
    assert [re.split(r"\s{2,}", line.strip()) for line in lines[2:5]] == [
        [
            "POLICY",
            "REAPED",
            "IDLE RECLAIMED",
            "LONGEST IDLE",
            "DRY RUN",
            "FIRST REAPED",
            "LAST REAPED",
        ],
        ["=web", "3", "1h30m00s", "1h00m00s", "0", "2026-11-30 12:00", "2026-11-30 14:00"],
        ["(unknown)", "0", "0.0s", "-", "4", "-", "-"],
    ]
    assert len({len(line) for line in lines[2:5]}) == 1  # aligned, numbers to the right
    assert lines[4].endswith("   -")
    assert lines[5:] == [
        "",
        (
            "the top 2 of 5 policies: 9 sessions reaped, 2h00m00s idle reclaimed; "
            "4 more would have been (dry run)"
        ),
    ]
    document = render_json(leaks, header)
    assert document["groups"][0] == {
        "name": "=web",
        "sessions_reaped": 3,
        "idle_seconds_reclaimed": 5400.0,
        "longest_idle_seconds": 3600.0,
        "dry_run_sessions": 0,
        "first_reaped": "2026-11-30T12:00:00+00:00",
        "last_reaped": "2026-11-30T14:00:00+00:00",
    }
    assert render_csv(leaks, by="policy").splitlines() == [
        (
            "policy,sessions_reaped,idle_seconds_reclaimed,longest_idle_seconds,dry_run_sessions,"
            "first_reaped,last_reaped"
        ),
        "'=web,3,5400.0,3600.0,0,2026-11-30T12:00:00+00:00,2026-11-30T14:00:00+00:00",
        ",0,0.0,,4,,",
    ]
