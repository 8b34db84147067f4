"""`pg-reaper report`: the leak report. Which application (role, database, client, policy or
server) keeps leaking sessions: the sessions reaped and the idle time they held, per group, over
a window of time, read from the audit table that every pg-reaper instance writes (docs/report.md).

Needs no running daemon and no server of `[[servers]]`: only the audit database. The window and
the rendering are pure (`parse_window`, `render_text`, `render_json`, `render_csv`); `report`
is the shell.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from reaper.commands.oneshot import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from reaper.identifiers import quote_identifier
from reaper.output import human_duration, safe_text, table_lines
from reaper.pg.connection import Connection, PostgresError
from reaper.pg.report import GROUP_COLUMNS, AuditTableUnreadable, read_leaks
from reaper.settings import parse_duration

if TYPE_CHECKING:
    from reaper.pg.report import LeakGroup, LeakReport
    from reaper.settings import Settings

__all__ = [
    "DEFAULT_SINCE",
    "DEFAULT_TOP",
    "GROUPINGS",
    "ReportHeader",
    "Window",
    "parse_top",
    "parse_window",
    "render_csv",
    "render_json",
    "render_text",
    "report",
]

GROUPINGS: tuple[str, ...] = tuple(GROUP_COLUMNS)
DEFAULT_SINCE = "7d"
DEFAULT_TOP = 20
# A report reads days of rows at once: its statements get at least this long, whatever the
# [reaper] statement_timeout that bounds the daemon's polls.
MIN_STATEMENT_TIMEOUT = timedelta(seconds=60)
# A CSV cell that starts with one of these is a formula to a spreadsheet (CSV injection):
# such a cell gets a leading apostrophe, which spreadsheets show as text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NAME_WIDTH = 40
_HEADERS = {
    "application": "APPLICATION",
    "user": "USER",
    "database": "DATABASE",
    "client": "CLIENT",
    "policy": "POLICY",
    "server": "SERVER",
}
_GROUP_WORDS = {
    "application": ("application", "applications"),
    "user": ("role", "roles"),
    "database": ("database", "databases"),
    "client": ("client address", "client addresses"),
    "policy": ("policy", "policies"),
    "server": ("server", "servers"),
}
_CSV_COLUMNS = (
    "sessions_reaped",
    "idle_seconds_reclaimed",
    "longest_idle_seconds",
    "dry_run_sessions",
    "first_reaped",
    "last_reaped",
)


@dataclass(frozen=True, slots=True)
class Window:
    """The report's window: start <= logged_at < end, both in UTC."""

    start: datetime
    end: datetime


# --- the window (pure) ---------------------------------------------------------------------


def parse_window(*, since: str | None, start: str | None, end: str | None, now: datetime) -> Window:
    """`--since DURATION` (default 7d: the last week up to `now`), or `--from TIME` with an
    optional `--to TIME` (default `now`). A time is ISO 8601; without an offset it is UTC.
    `ValueError`, naming the option, for a bad or empty window."""
    if since is not None and (start is not None or end is not None):
        raise ValueError("--since cannot be combined with --from/--to: give one window")
    if end is not None and start is None:
        raise ValueError("--to needs --from")
    if start is None:
        try:
            length = parse_duration(since or DEFAULT_SINCE)
        except ValueError as exc:
            raise ValueError(f"--since: {exc}") from None
        if length <= timedelta(0):
            raise ValueError("--since: must be longer than 0")
        try:
            return Window(start=now - length, end=now)
        except OverflowError:
            raise ValueError(f"--since: {since!r} reaches before year 1") from None
    window = Window(
        start=_parse_time(start, option="--from"),
        end=now if end is None else _parse_time(end, option="--to"),
    )
    if window.start >= window.end:
        raise ValueError(f"--from ({_iso(window.start)}) must be before --to ({_iso(window.end)})")
    return window


def parse_top(value: str) -> int:
    """`--top N`: a whole number, at least 1 (argparse says what is wrong)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {value!r}")
    return number


def _parse_time(value: str, *, option: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"{option}: invalid time {value!r}: use ISO 8601, such as 2026-11-24, "
            "2026-11-24T08:00, 2026-11-24T08:00:00+01:00 (UTC when no offset is given)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


# --- the shell -------------------------------------------------------------------------------


def report(
    settings: Settings,
    *,
    by: str,
    window: Window,
    top: int,
    server: str | None,
    output: str,
) -> int:
    """Read the report from the audit table and print it (`output`: text, json or csv); the
    exit code: 2 when no audit table is configured or it cannot be read (missing, a privilege
    missing), 1 when the audit database cannot be reached or the query fails."""
    section = settings.audit
    if not section.enabled:
        _complain(
            "no audit table is configured: the report reads the table that `run`, `once` and "
            "`kill` write with an [audit] section (docs/audit.md)"
        )
        return EXIT_USAGE
    conn = Connection(
        dsn=section.dsn.get_secret_value(),
        password_file=section.password_file,
        connect_timeout=settings.reaper.connect_timeout,
        statement_timeout=max(settings.reaper.statement_timeout, MIN_STATEMENT_TIMEOUT),
    )
    try:
        with conn:
            leaks = read_leaks(
                conn,
                table=section.table_name,
                by=by,
                start=window.start,
                end=window.end,
                top=top,
                server=server,
            )
    except AuditTableUnreadable as exc:
        _complain(str(exc))
        return EXIT_USAGE
    except PostgresError as exc:
        _complain(str(exc))
        return EXIT_FAILED
    table = ".".join(quote_identifier(part) for part in section.table_name)
    header = ReportHeader(
        table=table, target=conn.target, by=by, window=window, top=top, server=server
    )
    if output == "json":
        sys.stdout.write(
            json.dumps(render_json(leaks, header), indent=2, ensure_ascii=False) + "\n"
        )
    elif output == "csv":
        sys.stdout.write(render_csv(leaks, by=by))
    else:
        sys.stdout.write(render_text(leaks, header) + "\n")
    return EXIT_OK


def _complain(message: str) -> None:
    sys.stderr.write(f"pg-reaper: report: {safe_text(message, width=2000)}\n")


# --- the output (pure) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportHeader:
    """What a report is about: where it was read, by what, over when."""

    table: str
    target: str
    by: str
    window: Window
    top: int
    server: str | None = None


def render_text(leaks: LeakReport, header: ReportHeader) -> str:
    """The title line, a table of the top groups, and a line of totals; or one line saying
    that nothing was reaped in the window."""
    window = f"{_human_time(header.window.start)} and {_human_time(header.window.end)}"
    where = f"{safe_text(header.table, width=200)} on {safe_text(header.target, width=200)}"
    only = f" on server {safe_text(header.server, width=63)}" if header.server else ""
    if not leaks.groups:
        return f"no sessions reaped{only} between {window} ({where})"
    title = f"Sessions reaped{only} by {header.by}, between {window} ({where})"
    rows = [
        (
            _group_name(group.name),
            str(group.sessions),
            human_duration(group.idle_seconds),
            human_duration(group.longest_idle_seconds),
            str(group.dry_run_sessions),
            _human_time(group.first_reaped, short=True),
            _human_time(group.last_reaped, short=True),
        )
        for group in leaks.groups
    ]
    headers = (
        _HEADERS[header.by],
        "REAPED",
        "IDLE RECLAIMED",
        "LONGEST IDLE",
        "DRY RUN",
        "FIRST REAPED",
        "LAST REAPED",
    )
    shown = (
        f"the top {len(leaks.groups)} of {leaks.total_groups}"
        if leaks.total_groups > len(leaks.groups)
        else f"{leaks.total_groups}"
    )
    totals = (
        f"{shown} {_plural(header.by, leaks.total_groups)}: {leaks.total_sessions} sessions "
        f"reaped, {human_duration(leaks.total_idle_seconds)} idle reclaimed"
    )
    if leaks.total_dry_run_sessions:
        totals += f"; {leaks.total_dry_run_sessions} more would have been (dry run)"
    return "\n".join(
        [title, "", *table_lines(headers, rows, right_from=1, indent="  "), "", totals]
    )


def _plural(by: str, n: int) -> str:
    one, many = _GROUP_WORDS[by]
    return one if n == 1 else many


def _group_name(name: str | None) -> str:
    if name is None:
        return "(unknown)"
    return safe_text(name, width=_NAME_WIDTH) if name else "(empty)"


def _human_time(moment: datetime | None, *, short: bool = False) -> str:
    if moment is None:
        return "-"
    text = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S")
    return text if short else f"{text} UTC"


def render_json(leaks: LeakReport, header: ReportHeader) -> dict[str, Any]:
    """One JSON document: the window, the totals and the top groups, names exactly as stored
    (JSON escapes what must be)."""
    return {
        "table": header.table,
        "target": header.target,
        "by": header.by,
        "server": header.server,
        "from": _iso(header.window.start),
        "to": _iso(header.window.end),
        "top": header.top,
        "total": {
            "groups": leaks.total_groups,
            "sessions_reaped": leaks.total_sessions,
            "idle_seconds_reclaimed": _seconds(leaks.total_idle_seconds),
            "dry_run_sessions": leaks.total_dry_run_sessions,
        },
        "groups": [_group_json(group) for group in leaks.groups],
        "ok": True,
    }


def _group_json(group: LeakGroup) -> dict[str, Any]:
    return {
        "name": group.name,
        "sessions_reaped": group.sessions,
        "idle_seconds_reclaimed": _seconds(group.idle_seconds),
        "longest_idle_seconds": _seconds(group.longest_idle_seconds),
        "dry_run_sessions": group.dry_run_sessions,
        "first_reaped": None if group.first_reaped is None else _iso(group.first_reaped),
        "last_reaped": None if group.last_reaped is None else _iso(group.last_reaped),
    }


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def render_csv(leaks: LeakReport, *, by: str) -> str:
    """A header line, then one line per group (the top groups). A name is made safe for the
    tools that read CSV: control characters (a newline too) escaped as in the table, so that
    every record is one line, and a leading formula character neutralised with an apostrophe;
    the csv module quotes commas and quotes. An unknown name (NULL) is an empty cell."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((by, *_CSV_COLUMNS))
    for group in leaks.groups:
        json_group = _group_json(group)
        writer.writerow(
            (
                _csv_text(group.name),
                *("" if (v := json_group[c]) is None else v for c in _CSV_COLUMNS),
            )
        )
    return out.getvalue()


def _csv_text(value: str | None) -> str:
    if value is None:
        return ""
    text = safe_text(value, width=len(value) * 6 + 1)  # escaped, never cut
    return f"'{text}" if text.startswith(_FORMULA_START) else text
