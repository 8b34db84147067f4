"""What `kill` and `unblock` show the operator: the victims and the question before anything
happens, `once`'s table and what became of the database after."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from reaper.identifiers import quote_identifier
from reaper.output import SESSION_COLUMNS, render_table, safe_text, session_cells, table_lines

if TYPE_CHECKING:
    from typing import TextIO

    from reaper.commands.kill import KillPlan, KillReport

__all__ = ["ask_on_terminal", "render_kill", "render_unblocked", "render_victims"]


def render_victims(plan: KillPlan) -> str:
    """The sessions `kill` is about to terminate, in the columns of `once`'s table."""
    rows = [session_cells(plan.server, s) for s in plan.victims]
    return "\n".join(table_lines([c.upper() for c in SESSION_COLUMNS], rows))


def ask_on_terminal(plan: KillPlan, *, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> bool:
    """List the victims on stdout, then ask on stderr; only `y` or `yes` says yes."""
    if plan.victims:
        print(render_victims(plan), file=stdout)
        print(file=stdout)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=stderr)
    count = len(plan.victims)
    sessions = f"{count} session{'s' if count != 1 else ''}"
    server = safe_text(plan.server, width=63)
    if plan.block and plan.target.database is not None:
        database = _database(plan.target.database)
        question = f"Block connections to database {database} and terminate {sessions} on {server}?"
    else:
        question = f"Terminate {sessions} on {server}?"
    print(f"{question} [y/N] ", end="", file=stderr, flush=True)
    answer = stdin.readline()
    if not answer.endswith("\n"):
        print(file=stderr)  # end of input (Ctrl-D): nothing echoed the end of the line
    return answer.strip().lower() in {"y", "yes"}


def render_kill(report: KillReport, *, config_path: str) -> str:
    """`once`'s table and summary line, then what became of the database and the wait."""
    if not report.confirmed:
        return "nothing terminated: not confirmed"
    plan = report.plan
    table = render_table([report.as_sweep_report()])
    if plan is None:
        return table
    lines = [table]
    database = _database(plan.target.database or "")
    if report.dry_run and plan.block:
        lines.append(
            f"  dry run: connections to database {database} would be blocked first, then "
            "pg-reaper would wait for it to empty"
        )
    if report.blocked:
        lines.extend(_blocked_lines(report, plan, database=database, config_path=config_path))
    if report.lingering:
        pids = ", ".join(str(p) for p in report.lingering)
        lines.append(
            f"  warning: terminated but still on the server after {report.waited_seconds:g}s: "
            f"pid {pids}"
        )
    if report.error is not None:
        lines.append(f"  error: {report.error}")
    if not report.outcomes and not report.dry_run and report.error is None:
        lines.append(f"  no client session matches {plan.target.describe()}")
    return "\n".join(lines)


def _blocked_lines(
    report: KillReport, plan: KillPlan, *, database: str, config_path: str
) -> list[str]:
    """The database blocked: whether it is empty now, and how to let connections in again."""
    lines = [f"  connections to database {database} are blocked"]
    if report.remaining:
        lines.extend(
            f"  database {database} still in use after {report.waited_seconds:g}s: {line}"
            for line in report.remaining
        )
    elif report.error is None:
        lines.append(
            f"  database {database} has no session left ({report.waited_seconds:g}s): "
            "DROP DATABASE or ALTER DATABASE ... RENAME can run now"
        )
    unblock_command = shlex.join(
        [
            "pg-reaper",
            "unblock",
            "-c",
            config_path,
            "--server",
            plan.server,
            "--database",
            plan.target.database or "",
        ]
    )
    lines.append(f"  to let connections in again: {safe_text(unblock_command, width=400)}")
    return lines


def render_unblocked(server: str, database: str) -> str:
    return (
        f"{safe_text(server, width=63)}: database {_database(database)} accepts connections again"
    )


def _database(name: str) -> str:
    """A database name as SQL would write it (shop, "we""ird'; db"), printable."""
    return safe_text(quote_identifier(name), width=200)
