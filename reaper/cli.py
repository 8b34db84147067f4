"""The `pg-reaper` command. Human output goes to stdout, logs to stderr.

Exit codes: 0 success; 1 a server could not be polled or a signal failed; 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

import tomli_w

from reaper import __version__, doctor
from reaper.embedded import SUPPORTED_MAJORS
from reaper.log import configure, get_logger
from reaper.output import render_json, render_table
from reaper.settings import ConfigError, Settings, load_settings, resolve_config_path
from reaper.sweep import Mode, SweepReport, connect, sweep

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from reaper.demo import run_demo  # noqa: PLC0415 - only the demo needs the embedded server

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
    if args.command == "run":
        return _run(settings, args)
    handler = {
        "once": _once,
        "preview": _preview,
        "check-config": _check_config,
        "doctor": _doctor,
    }[args.command]
    return handler(settings, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg-reaper",
        description="Keeps PostgreSQL servers free of stale sessions.",
    )
    parser.add_argument("--version", action="version", version=f"pg-reaper {__version__}")
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


def _run_all(settings: Settings, *, mode: Mode, only: str | None = None) -> list[SweepReport]:
    reports = []
    for server in settings.servers:
        if only is not None and server.name != only:
            continue
        with connect(server, settings) as conn:
            report = sweep(conn, server=server, settings=settings, mode=mode)
        if report.error is not None and mode == "reap":
            get_logger().error("poll_failed", server=server.name, error=report.error)
        reports.append(report)
    return reports


def _print_reports(reports: list[SweepReport], *, settings: Settings, as_json: bool) -> int:
    if as_json:
        document = render_json(reports, include_query=settings.log.include_query)
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        print(render_table(reports))
    return EXIT_FAILED if any(r.failed for r in reports) else EXIT_OK


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from reaper.daemon import Daemon  # noqa: PLC0415 - the one-shot commands do without it

    try:
        daemon = Daemon(
            config_path=resolve_config_path(args.config),
            settings=settings,
            force_dry_run=args.dry_run,
        )
        return daemon.run()
    except OSError as exc:  # the metrics listener could not bind
        listen = settings.metrics.listen
        print(
            f"pg-reaper: metrics.listen: cannot listen on {listen}: {exc.strerror}", file=sys.stderr
        )
        return EXIT_USAGE


def _once(settings: Settings, args: argparse.Namespace) -> int:
    reports = _run_all(settings, mode="reap")
    return _print_reports(reports, settings=settings, as_json=args.json)


def _unknown_server(settings: Settings, name: str | None) -> bool:
    """Say so when `--server NAME` names no configured server."""
    names = [s.name for s in settings.servers]
    if name is None or name in names:
        return False
    print(
        f"pg-reaper: --server {name!r} is not configured (servers: {', '.join(names)})",
        file=sys.stderr,
    )
    return True


def _preview(settings: Settings, args: argparse.Namespace) -> int:
    if _unknown_server(settings, args.server):
        return EXIT_USAGE
    reports = _run_all(settings, mode="preview", only=args.server)
    return _print_reports(reports, settings=settings, as_json=args.json)


def _doctor(settings: Settings, args: argparse.Namespace) -> int:
    if _unknown_server(settings, args.server):
        return EXIT_USAGE
    reports = []
    for server in settings.servers:
        if args.server is not None and server.name != args.server:
            continue
        with connect(server, settings) as conn:
            policies = settings.policies_for(server)
            reports.append(doctor.examine(conn, server=server.name, policies=policies))
    if args.json:
        print(json.dumps(doctor.render_json(reports), indent=2, ensure_ascii=False))
    else:
        print(doctor.render_text(reports))
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAILED


def _check_config(settings: Settings, _args: argparse.Namespace) -> int:
    print(tomli_w.dumps(_without_none_keys(settings.redacted())), end="")
    return EXIT_OK


def _without_none_keys(table: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: an unset optional key is left out, as in the file."""

    def clean(value: object) -> object:
        if isinstance(value, dict):
            return _without_none_keys(value)
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {k: clean(v) for k, v in table.items() if v is not None}
