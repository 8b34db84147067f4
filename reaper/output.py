"""What the one-shot commands print: a readable table for people, one JSON document for tools."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from reaper.sweep import audit_fields

if TYPE_CHECKING:
    from collections.abc import Sequence

    from reaper.policy import Session
    from reaper.sweep import SweepReport

__all__ = [
    "SESSION_COLUMNS",
    "human_duration",
    "render_json",
    "render_table",
    "safe_text",
    "session_cells",
    "table_lines",
]

# C0 and C1 controls, and the Unicode characters that break or reorder a line on a terminal:
# line and paragraph separators, and bidirectional marks, embeddings, overrides and isolates.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
# The columns of a session in every table of sessions (`once`, `preview`, `kill`).
SESSION_COLUMNS = (
    "server",
    "pid",
    "user",
    "database",
    "application",
    "client",
    "state",
    "idle for",
)
_COLUMNS = (*SESSION_COLUMNS, "policy", "result")
_WIDTH = 28


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(value: object, *, width: int = _WIDTH) -> str:
    """One printable line: control characters escaped, long values cut with an ellipsis."""
    text = "" if value is None else str(value)
    text = _CONTROL.sub(_escape, text)
    return text if len(text) <= width else text[: width - 1] + "…"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s"


def table_lines(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right_from: int | None = None,
    indent: str = "",
) -> list[str]:
    """Aligned columns two spaces apart, the header line first, trailing blanks cut; column
    `right_from` and those after it are right-aligned (numbers). Cells are shown as they are:
    make them printable first (`safe_text`)."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        aligned = (
            c.rjust(w) if right_from is not None and i >= right_from else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return indent + "  ".join(aligned).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def session_cells(server: str, session: Session) -> tuple[str, ...]:
    """A session in the `SESSION_COLUMNS`, every cell printable."""
    values = (
        server,
        str(session.pid),
        session.user,
        session.database,
        session.application,
        session.client_addr or "local",
        session.state,
        human_duration(session.idle_seconds),
    )
    return tuple(safe_text(v) for v in values)


def render_table(reports: Sequence[SweepReport]) -> str:
    """`once` and `preview`: a line per candidate, then one summary line per server."""
    rows = [
        (
            *session_cells(report.server, o.decision.session),
            safe_text(o.policy),
            safe_text(o.result.value),
        )
        for report in reports
        for o in report.outcomes
    ]
    lines: list[str] = []
    if rows:
        lines.extend(table_lines([c.upper() for c in _COLUMNS], rows))
        lines.append("")
    for report in reports:
        lines.append(_summary(report))
        lines.extend(f"  warning: {w}" for w in report.warnings)
    return "\n".join(lines)


def _summary(report: SweepReport) -> str:
    name = safe_text(report.server, width=63)
    if not report.ok:
        return f"{name}: poll failed: {report.error}"
    counts: dict[str, int] = {}
    for outcome in report.outcomes:
        counts[outcome.result.value] = counts.get(outcome.result.value, 0) + 1
    tally = ", ".join(f"{n} {result}" for result, n in sorted(counts.items()))
    dry = " (dry run)" if report.dry_run else ""
    return (
        f"{name}: {len(report.sessions)} client sessions, {report.candidates} candidates"
        f"{': ' + tally if tally else ''}{dry}"
    )


def render_json(reports: Sequence[SweepReport], *, include_query: bool) -> dict[str, Any]:
    return {
        "servers": [
            {
                "server": report.server,
                "ok": report.ok,
                "error": report.error,
                "dry_run": report.dry_run,
                "sessions": len(report.sessions),
                "candidates": report.candidates,
                "reaped": report.reaped,
                "duration_ms": report.duration_ms,
                "warnings": list(report.warnings),
                "decisions": [
                    audit_fields(o, include_query=include_query) for o in report.outcomes
                ],
            }
            for report in reports
        ],
        "ok": not any(r.failed for r in reports),
    }
