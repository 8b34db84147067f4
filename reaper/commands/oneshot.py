"""The one-shot commands' shared work: `once` and `preview` (one sweep of every server),
`check-config`, and the fan-out over servers that they, `doctor` and `sessions` share.

Each server is reached on its own connection, `MAX_PARALLEL` at once at most, and a server that
cannot be reached is reported, not waited for twice. Two entries that are one cluster stop the
command before anything is done.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TextIO, TypeVar

import tomli_w

from reaper import clusters
from reaper.observe.log import get_logger
from reaper.output import render_json, render_table
from reaper.pg.connection import PostgresError
from reaper.sweep import Mode, SweepReport, connect, sweep

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from reaper.observe.audit import AuditSink
    from reaper.observe.notifications import Notifications
    from reaper.pg.activity import ServerConnection
    from reaper.settings import ServerConfig, Settings

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "MAX_PARALLEL",
    "Unreachable",
    "Unreached",
    "effective_config",
    "on_every_server",
    "print_every_server",
    "selected",
    "sweep_every_server",
    "unknown_server",
]

EXIT_OK = 0
EXIT_FAILED = 1  # a server could not be polled or examined, or a signal failed
EXIT_USAGE = 2  # usage or config error
# The one-shot commands reach this many servers at once at most, each on its own connection with
# its own timeouts: a dead or hung server costs one connect_timeout (or statement_timeout + 2 s)
# in parallel with the others, not in series. Bounded so that a fleet is not dialled all at once.
MAX_PARALLEL = 16

T = TypeVar("T")


class _Report(Protocol):
    @property
    def ok(self) -> bool: ...


R = TypeVar("R", bound=_Report)
R_co = TypeVar("R_co", bound=_Report, covariant=True)


class Unreachable(Protocol[R_co]):
    """The report of a server that could not be reached, from its name, target and error."""

    def __call__(self, *, server: str, target: str, error: str) -> R_co: ...


@dataclass(frozen=True, slots=True)
class Unreached:
    """A server whose session could not be opened (or its identity read)."""

    error: str
    seconds: float


def selected(settings: Settings, name: str | None) -> list[ServerConfig]:
    """Every server, or only the one `--server NAME` names."""
    return [s for s in settings.servers if name is None or s.name == name]


def unknown_server(settings: Settings, name: str | None) -> bool:
    """Say so when `--server NAME` names no configured server."""
    names = [s.name for s in settings.servers]
    if name is None or name in names:
        return False
    _say(
        f"pg-reaper: --server {name!r} is not configured (servers: {', '.join(names)})",
        stream=sys.stderr,
    )
    return True


def _reach(
    conn: ServerConnection, *, identify: bool
) -> clusters.ClusterIdentity | Unreached | None:
    """Open `conn`'s session; with `identify`, read which cluster it is on."""
    started = time.perf_counter()
    try:
        conn.connect()
        return clusters.identify(conn) if identify else None
    except PostgresError as exc:
        return Unreached(str(exc), time.perf_counter() - started)


def on_every_server(
    settings: Settings,
    servers: Sequence[ServerConfig],
    *,
    work: Callable[[ServerConfig, ServerConnection], T],
    unreached: Callable[[ServerConfig, ServerConnection, Unreached], T],
) -> list[T] | None:
    """`work` on every server at once (`MAX_PARALLEL` at most), each on its own connection; the
    results in config order. A server that could not be reached gets `unreached` instead of a
    second wait. None, said on stderr, when two of them are one cluster: then nothing was done.
    """
    conns = [connect(server, settings) for server in servers]
    identify = len(servers) > 1  # one entry is one cluster: nothing to compare
    try:
        with ThreadPoolExecutor(
            max_workers=max(1, min(MAX_PARALLEL, len(servers))),
            thread_name_prefix="pg-reaper-server",
        ) as pool:
            reached = list(pool.map(lambda conn: _reach(conn, identify=identify), conns))
            identities = {
                server.name: found
                for server, found in zip(servers, reached, strict=True)
                if isinstance(found, clusters.ClusterIdentity)
            }
            if duplicates := clusters.duplicates(servers, identities):
                for duplicate in duplicates:
                    _say(f"pg-reaper: {duplicate.message}", stream=sys.stderr)
                return None

            def run(server: ServerConfig, conn: ServerConnection, found: object) -> T:
                if isinstance(found, Unreached):
                    return unreached(server, conn, found)
                return work(server, conn)

            return list(pool.map(run, servers, conns, reached))
    finally:
        for conn in conns:
            conn.close()


def print_every_server(  # noqa: PLR0913 - one command's two steps and two renderings
    settings: Settings,
    only: str | None,
    *,
    work: Callable[[ServerConfig, ServerConnection], R],
    unreachable: Unreachable[R],
    as_json: bool,
    text: Callable[[Sequence[R]], str],
    document: Callable[[Sequence[R]], dict[str, Any]],
) -> int:
    """`work` on every server (or on `only`), `unreachable` for each that could not be reached,
    then every report as `text` or as one JSON `document`; the exit code: 1 when a report is
    not ok."""

    def unreached(server: ServerConfig, conn: ServerConnection, why: Unreached) -> R:
        return unreachable(server=server.name, target=conn.target, error=why.error)

    servers = selected(settings, only)
    reports = on_every_server(settings, servers, work=work, unreached=unreached)
    if reports is None:
        return EXIT_USAGE
    _say(_json(document(reports)) if as_json else text(reports))
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAILED


def sweep_every_server(
    settings: Settings,
    *,
    mode: Mode,
    only: str | None = None,
    as_json: bool,
    audit: AuditSink | None = None,
    notifications: Notifications | None = None,
) -> int:
    """`once` (mode reap) or `preview`: one sweep of every server (or of `only`), printed; the
    audit events of `once` also go to `audit`, and what it reaped to `notifications`."""
    reports = _sweep_all(settings, mode=mode, only=only, audit=audit, notifications=notifications)
    if reports is None:
        return EXIT_USAGE
    if as_json:
        _say(_json(render_json(reports, include_query=settings.log.include_query)))
    else:
        _say(render_table(reports))
    return EXIT_FAILED if any(r.failed for r in reports) else EXIT_OK


def _sweep_all(
    settings: Settings,
    *,
    mode: Mode,
    only: str | None = None,
    audit: AuditSink | None = None,
    notifications: Notifications | None = None,
) -> list[SweepReport] | None:
    dry_run = settings.reaper.dry_run or mode == "preview"

    def run(server: ServerConfig, conn: ServerConnection) -> SweepReport:
        report = sweep(conn, server=server, settings=settings, mode=mode, audit=audit)
        if notifications is not None and mode == "reap" and report.ok:
            notifications.submit(report)  # only queued: sent while the other servers are swept
        return report

    def unreached(server: ServerConfig, _conn: ServerConnection, why: Unreached) -> SweepReport:
        duration_ms = round(why.seconds * 1000, 1)
        return SweepReport(
            server=server.name, dry_run=dry_run, duration_ms=duration_ms, error=why.error
        )

    reports = on_every_server(settings, selected(settings, only), work=run, unreached=unreached)
    if reports is not None and mode == "reap":
        for report in reports:
            if report.error is not None:
                get_logger().error("poll_failed", server=report.server, error=report.error)
    return reports


def _json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False)


def _say(text: str, *, stream: TextIO | None = None) -> None:
    """A line of a one-shot command's output (on stdout) or of its complaint (on stderr)."""
    print(text, file=stream)


def effective_config(settings: Settings) -> str:
    """`check-config`'s output: the validated config as TOML, secrets redacted."""
    return tomli_w.dumps(_without_none_keys(settings.redacted()))


def _without_none_keys(table: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: an unset optional key is left out, as in the file."""

    def clean(value: object) -> object:
        if isinstance(value, dict):
            return _without_none_keys(value)
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {k: clean(v) for k, v in table.items() if v is not None}
