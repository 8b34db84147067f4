"""The `pg-reaper` command: parses the command line and hands each command to its module. Human
output goes to stdout, logs to stderr.

Exit codes: 0 success; 1 a server could not be polled or a signal failed; 2 usage or config error.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from reaper import version_text
from reaper.commands import doctor, kill, kill_output, oneshot, report, sessions, victims
from reaper.commands.oneshot import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from reaper.demo.binaries import SUPPORTED_MAJORS
from reaper.observe import audit
from reaper.observe.log import configure
from reaper.observe.notifications import Notifications
from reaper.settings import (
    ConfigError,
    Settings,
    load_settings,
    resolve_config_path,
)
from reaper.sweep import connect

if TYPE_CHECKING:
    from collections.abc import Sequence

    from reaper.pg.activity import ServerConnection
    from reaper.settings import ServerConfig

__all__ = ["main"]

# `once` writes its audit rows before it exits, giving the audit database this long at most.
_AUDIT_FLUSH_TIMEOUT = 5.0
# ... and sends its [notify] messages meanwhile, giving the URLs as long at most.
_NOTIFY_FLUSH_TIMEOUT = 5.0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from reaper.demo.run import run_demo  # noqa: PLC0415 - only the demo needs the embedded server

        return run_demo(major=args.major, duration=args.duration)
    try:
        settings = load_settings(resolve_config_path(args.config))
    except ConfigError as exc:
        path = resolve_config_path(args.config)
        print(f"pg-reaper: invalid configuration in {path}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "dry_run", False):
        settings = settings.with_dry_run()
    configure(settings.log)
    if oneshot.unknown_server(settings, getattr(args, "server", None)):
        return EXIT_USAGE
    if args.command == "run":
        return _run(settings, args)
    handler = {
        "once": _once,
        "preview": _preview,
        "check-config": _check_config,
        "doctor": _doctor,
        "sessions": _sessions,
        "kill": _kill,
        "unblock": _unblock,
        "report": _report,
    }[args.command]
    return handler(settings, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg-reaper",
        description="Keeps PostgreSQL servers free of stale sessions.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="config file (default: $PG_REAPER_CONFIG, then /etc/pg-reaper/config.toml)",
        )
        return sub

    run = command("run", "the daemon: reap on schedule, serve metrics, until SIGTERM")
    run.add_argument("--dry-run", action="store_true", help="decide and report, signal nothing")

    once = command("once", "one sweep of every server, then exit")
    once.add_argument("--server", metavar="NAME", help="only this server")
    once.add_argument("--dry-run", action="store_true", help="decide and report, signal nothing")
    once.add_argument("--json", action="store_true", help="one JSON document on stdout")

    preview = command(
        "preview", "what would be reaped and by which policy, oldest idle first; signals nothing"
    )
    preview.add_argument("--server", metavar="NAME", help="only this server")
    preview.add_argument("--json", action="store_true", help="one JSON document on stdout")

    command("check-config", "validate; print the effective config with secrets redacted")

    doctor_command = command(
        "doctor",
        "per server: version, privileges, server-side timeouts, connection usage, problems",
    )
    doctor_command.add_argument("--server", metavar="NAME", help="only this server")
    doctor_command.add_argument("--json", action="store_true", help="one JSON document on stdout")

    sessions_command = command(
        "sessions",
        "client sessions per server by state (every state, 0 included), database, role or "
        "application, against the connection limits",
    )
    sessions_command.add_argument("--server", metavar="NAME", help="only this server")
    sessions_command.add_argument(
        "--by",
        choices=sessions.GROUPINGS,
        default="state",
        help="what to count by (default: state)",
    )
    sessions_command.add_argument("--json", action="store_true", help="one JSON document on stdout")

    kill_command = command(
        "kill",
        "terminate every matching client session, in any state: free a role at its connection "
        "limit, or empty a database to drop or rename it (docs/kill.md)",
    )
    kill_command.add_argument("--server", metavar="NAME", required=True, help="the server")
    kill_command.add_argument("--database", metavar="NAME", help="sessions on this database")
    kill_command.add_argument("--user", metavar="NAME", help="sessions of this role")
    kill_command.add_argument(
        "--application", metavar="REGEX", help="sessions whose application_name matches (search)"
    )
    kill_command.add_argument(
        "--client-addr", metavar="CIDR", help="sessions from this network; 'local': Unix socket"
    )
    kill_command.add_argument(
        "--block-connections",
        action="store_true",
        help="with --database: ALTER DATABASE ... WITH ALLOW_CONNECTIONS false first, then wait "
        "until nothing uses the database (needs the database's owner or a superuser)",
    )
    kill_command.add_argument(
        "--wait",
        metavar="DURATION",
        default="10s",
        help="how long to wait for the sessions to leave (default: 10s)",
    )
    kill_command.add_argument(
        "--dry-run", action="store_true", help="list and audit, signal nothing"
    )
    kill_command.add_argument(
        "--yes", action="store_true", help="do not ask (needed without a TTY)"
    )

    unblock_command = command(
        "unblock",
        "let connections into a database again (ALTER DATABASE ... ALLOW_CONNECTIONS true)",
    )
    unblock_command.add_argument("--server", metavar="NAME", required=True, help="the server")
    unblock_command.add_argument("--database", metavar="NAME", required=True, help="the database")

    report_command = command(
        "report",
        "the leak report, from the audit table: sessions reaped and idle time reclaimed per "
        "application, role, database, client, policy or server (docs/report.md)",
    )
    report_command.add_argument(
        "--since",
        metavar="DURATION",
        help=f"the window: this long up to now (default: {report.DEFAULT_SINCE})",
    )
    report_command.add_argument(
        "--from",
        dest="start",
        metavar="TIME",
        help="the window's start, ISO 8601 (UTC if no offset)",
    )
    report_command.add_argument(
        "--to", dest="end", metavar="TIME", help="with --from: the window's end (default: now)"
    )
    report_command.add_argument(
        "--by",
        choices=report.GROUPINGS,
        default="application",
        help="what to group by (default: application)",
    )
    report_command.add_argument(
        "--top",
        type=report.parse_top,
        default=report.DEFAULT_TOP,
        metavar="N",
        help=f"the N groups that leak most (default: {report.DEFAULT_TOP})",
    )
    # Any name in the audit table, not only this config's servers: the table holds the fleet's.
    report_command.add_argument(
        "--server", dest="audit_server", metavar="NAME", help="only the sessions of this server"
    )
    report_format = report_command.add_mutually_exclusive_group()
    report_format.add_argument("--json", action="store_true", help="one JSON document on stdout")
    report_format.add_argument(
        "--csv", action="store_true", help="CSV on stdout: a header, a line per group"
    )

    demo = commands.add_parser(
        "demo",
        help="start a throwaway PostgreSQL, open sessions in several states, reap them live",
        description="Start a throwaway PostgreSQL (pip-installable binaries, works as root), "
        "open real psql sessions in several states, and run the daemon on it, logging each "
        "decision as it happens. Ctrl-C stops it and removes everything it started.",
    )
    demo.add_argument(
        "--major", type=int, default=18, choices=SUPPORTED_MAJORS, help="PostgreSQL major"
    )
    demo.add_argument(
        "--duration", type=float, metavar="SECONDS", help="stop after this long (default: Ctrl-C)"
    )
    return parser


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from reaper.daemon.process import Daemon  # noqa: PLC0415 - the one-shot commands do without it

    try:
        daemon = Daemon(
            config_path=resolve_config_path(args.config),
            settings=settings,
            force_dry_run=args.dry_run,
        )
        return daemon.run()
    except audit.AuditTableUnusable as exc:
        # A table that cannot be written is said now, not found out by rows dropped later.
        print(f"pg-reaper: audit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the metrics listener could not bind
        listen = settings.metrics.listen
        print(
            f"pg-reaper: metrics.listen: cannot listen on {listen}: {exc.strerror}", file=sys.stderr
        )
        return EXIT_USAGE


def _once(settings: Settings, args: argparse.Namespace) -> int:
    if (sink := _audit_sink(settings)) is None:
        return EXIT_USAGE
    notifications = Notifications()
    notifications.start(settings)
    try:
        return oneshot.sweep_every_server(
            settings,
            mode="reap",
            only=args.server,
            as_json=args.json,
            audit=sink,
            notifications=notifications,
        )
    finally:
        notifications.drain()  # sends while the audit rows are written
        deadline = time.monotonic() + _NOTIFY_FLUSH_TIMEOUT
        sink.stop(timeout=_AUDIT_FLUSH_TIMEOUT)
        notifications.stop(timeout=max(0.0, deadline - time.monotonic()))


def _audit_sink(settings: Settings) -> audit.AuditSink | None:
    """The audit sink of a one-shot command, started; None, said on stderr, when the audit
    table cannot be written (said now, not found out by rows dropped later)."""
    sink = audit.AuditSink()
    try:
        sink.start(settings, check=True)
    except audit.AuditTableUnusable as exc:
        print(f"pg-reaper: audit: {exc}", file=sys.stderr)
        return None
    return sink


def _preview(settings: Settings, args: argparse.Namespace) -> int:
    return oneshot.sweep_every_server(settings, mode="preview", only=args.server, as_json=args.json)


def _doctor(settings: Settings, args: argparse.Namespace) -> int:
    def examine(server: ServerConfig, conn: ServerConnection) -> doctor.ServerReport:
        policies = settings.policies_for(server)
        return doctor.examine(conn, server=server.name, policies=policies)

    return oneshot.print_every_server(
        settings,
        args.server,
        work=examine,
        unreachable=doctor.unreachable,
        as_json=args.json,
        text=doctor.render_text,
        document=doctor.render_json,
    )


def _sessions(settings: Settings, args: argparse.Namespace) -> int:
    def census(server: ServerConfig, conn: ServerConnection) -> sessions.SessionCounts:
        return sessions.census(conn, server=server.name, by=args.by)

    return oneshot.print_every_server(
        settings,
        args.server,
        work=census,
        unreachable=functools.partial(sessions.SessionCounts, by=args.by),
        as_json=args.json,
        text=sessions.render_counts_text,
        document=sessions.render_counts_json,
    )


def _kill(settings: Settings, args: argparse.Namespace) -> int:
    try:
        target = victims.kill_target(
            database=args.database,
            user=args.user,
            application=args.application,
            client_addr=args.client_addr,
            block=args.block_connections,
        )
        wait = victims.parse_wait(args.wait)
    except ValueError as exc:
        print(f"pg-reaper: kill: {exc}", file=sys.stderr)
        return EXIT_USAGE
    dry_run = settings.reaper.dry_run
    ask = not (args.yes or dry_run)
    if ask and not sys.stdin.isatty():
        print(
            "pg-reaper: kill: stdin is not a terminal, so nobody can confirm: use --yes "
            "(or --dry-run to see what would be terminated)",
            file=sys.stderr,
        )
        return EXIT_USAGE

    def confirm(plan: kill.KillPlan) -> bool:
        return kill_output.ask_on_terminal(
            plan, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr
        )

    server = next(s for s in settings.servers if s.name == args.server)
    if (sink := _audit_sink(settings)) is None:
        return EXIT_USAGE
    try:
        with connect(server, settings) as conn:
            report = kill.kill(
                conn,
                server=server.name,
                target=target,
                block=args.block_connections,
                wait=wait,
                dry_run=dry_run,
                include_query=settings.log.include_query,
                confirm=confirm if ask else None,
                audit=sink,
            )
    finally:
        sink.stop(timeout=_AUDIT_FLUSH_TIMEOUT)
    config_path = str(resolve_config_path(args.config))
    print(kill_output.render_kill(report, config_path=config_path))
    return EXIT_FAILED if report.failed else EXIT_OK


def _unblock(settings: Settings, args: argparse.Namespace) -> int:
    server = next(s for s in settings.servers if s.name == args.server)
    with connect(server, settings) as conn:
        error = kill.unblock(conn, server=server.name, database=args.database)
    if error is not None:
        print(f"pg-reaper: unblock: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(kill_output.render_unblocked(server.name, args.database))
    return EXIT_OK


def _report(settings: Settings, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    try:
        window = report.parse_window(since=args.since, start=args.start, end=args.end, now=now)
    except ValueError as exc:
        print(f"pg-reaper: report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return report.report(
        settings,
        by=args.by,
        window=window,
        top=args.top,
        server=args.audit_server,
        output="json" if args.json else "csv" if args.csv else "text",
    )


def _check_config(settings: Settings, _args: argparse.Namespace) -> int:
    print(oneshot.effective_config(settings), end="")
    return EXIT_OK
