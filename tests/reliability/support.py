"""Helpers the reliability tests share: throwaway servers and the daemon of test_daemon.py."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import psycopg

from reaper.demo.programs import free_port
from tests.servers import ADMIN_APPLICATION
from tests.test_daemon import RunningDaemon, daemon_config

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

    from reaper.demo.embedded import EmbeddedPostgres

__all__ = [
    "ADMIN_APPLICATION",
    "RunningDaemon",
    "admin_execute",
    "daemon_config",
    "error_events",
    "free_port",
    "is_alive",
    "running_daemon",
    "wait_gone",
]


@contextlib.contextmanager
def running_daemon(config: Path, *, port: int | None, **kwargs: Any) -> Iterator[RunningDaemon]:
    """`pg-reaper run` for the length of a `with` block; killed (bounded) whatever happens."""
    daemon = RunningDaemon(config, port=port, **kwargs)
    try:
        yield daemon
    finally:
        daemon.stop()


def admin_execute(
    server: EmbeddedPostgres, query: str, params: Any = None
) -> list[tuple[Any, ...]]:
    """One statement as the superuser, on a short-lived connection (the server may have been
    restarted since the last one)."""
    with psycopg.connect(
        server.dsn(), autocommit=True, application_name=ADMIN_APPLICATION, connect_timeout=5
    ) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def is_alive(server: EmbeddedPostgres, pid: int) -> bool:
    return bool(admin_execute(server, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]))


def wait_gone(server: EmbeddedPostgres, pid: int, *, timeout: float) -> float | None:
    """Seconds until `pid` left the server (polled every 20 ms), None if it did not in time."""
    started = time.monotonic()
    with psycopg.connect(server.dsn(), autocommit=True, application_name=ADMIN_APPLICATION) as conn:
        while (waited := time.monotonic() - started) < timeout:
            row = conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
            if row is None:
                return waited
            time.sleep(0.02)
    return None


def error_events(daemon: RunningDaemon, *, allowed: Mapping[str, int] | None = None) -> list[str]:
    """Every event logged at error level or above, but for up to `allowed[name]` of each name."""
    budget = dict(allowed or {})
    unexpected = []
    for event in daemon.events():
        if event.get("level") not in {"error", "critical", "exception"}:
            continue
        name = str(event.get("event"))
        if budget.get(name, 0) > 0:
            budget[name] -= 1
            continue
        unexpected.append(name)
    return unexpected
