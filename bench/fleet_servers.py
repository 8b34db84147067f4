"""Many tiny throwaway PostgreSQL clusters for bench/fleet.py, each a cluster of its own.

One initdb (1 MB WAL segments), one start to drop the template databases and shrink the WAL, then
a copy of that data directory per server, each started on its own Unix socket only, with the
smallest settings that run: 128 kB of shared buffers, 10 connections, no autovacuum, no
background workers, no WAL senders, synchronous I/O. Copies started separately are distinct
clusters for pg-reaper's arbiter: the same system identifier, but each postmaster's own start
time. Servers are started (and stopped) by a bounded pool of threads; every server made is
stopped and removed by `stop`, which the benchmark calls on exit, errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

import common
import psycopg

from reaper.demo.embedded import EmbeddedPostgres

if TYPE_CHECKING:
    from psycopg.rows import TupleRow

TINY_SETTINGS = {
    "listen_addresses": "",  # the Unix socket only
    "max_connections": "10",
    "shared_buffers": "128kB",
    "autovacuum": "off",
    "max_worker_processes": "0",
    "max_parallel_workers": "0",
    "max_wal_senders": "0",
    "max_replication_slots": "0",
    "wal_level": "minimal",
    "min_wal_size": "2MB",
    "max_wal_size": "4MB",
    "log_min_messages": "warning",
}
TINY_18 = {"io_method": "sync"}  # no I/O worker processes


def _pss_kb(pid: int) -> int:
    """Proportional set size of `pid` and its children (kB): what the server costs in memory."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for each in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{each}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


class TinyFleet:
    """`count` tiny clusters with `sessions` idle sessions each (`application`)."""

    def __init__(
        self, *, major: int, count: int, sessions: int, jobs: int, application: str
    ) -> None:
        self.major, self.count, self.sessions_each, self.jobs = major, count, sessions, jobs
        self.application = application
        self.settings = {**TINY_SETTINGS, **(TINY_18 if major >= 18 else {})}
        self.servers: list[EmbeddedPostgres] = []  # every server made, started or not
        self.sessions: list[psycopg.Connection[TupleRow]] = []
        self.start_seconds: list[float] = []  # copy + start + sessions, per server
        self.started_in = 0.0
        self.template: EmbeddedPostgres | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> list[EmbeddedPostgres]:
        """Every server started with its sessions, in order; raises on the first failure."""
        began = time.monotonic()
        template = self._template()
        slots: list[EmbeddedPostgres | None] = [None] * self.count
        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="pg-start") as pool:
            futures = {pool.submit(self._one, template): i for i in range(self.count)}
            try:
                for done, future in enumerate(as_completed(futures), 1):
                    slots[futures[future]] = future.result()
                    if done % 100 == 0 or done == self.count:
                        print(f"  {done}/{self.count} servers up", file=sys.stderr)
            except BaseException:
                self._stopping.set()  # the queued ones return at once
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        self.started_in = time.monotonic() - began
        return [pg for pg in slots if pg is not None]

    def _template(self) -> EmbeddedPostgres:
        pg = EmbeddedPostgres(
            major=self.major, settings=self.settings, initdb_options=["--wal-segsize=1"]
        )
        self.template = pg
        pg.start()
        with psycopg.connect(pg.dsn(), autocommit=True, application_name="bench-setup") as conn:
            for name in ("template0", "template1"):  # a third of the copy each
                conn.execute(f"ALTER DATABASE {name} WITH IS_TEMPLATE false")
                conn.execute(f"DROP DATABASE {name}")
            conn.execute("CHECKPOINT")
        pg.stop()
        return pg

    def _one(self, template: EmbeddedPostgres) -> EmbeddedPostgres | None:
        if self._stopping.is_set():
            return None
        began = time.monotonic()
        pg = EmbeddedPostgres(
            major=self.major,
            settings=self.settings,
            password=template.password,
            template=template.data_dir,
        )
        with self._lock:
            self.servers.append(pg)
        pg.start()
        opened = []
        for _ in range(self.sessions_each):
            conn = psycopg.connect(pg.dsn(), autocommit=True, application_name=self.application)
            opened.append(conn)
            conn.execute("SELECT 1")
        with self._lock:
            self.sessions.extend(opened)
            self.start_seconds.append(time.monotonic() - began)
        return pg

    def footprint(self, servers: list[EmbeddedPostgres], sample: int = 20) -> float:
        """Median PSS (MB) of a server's processes, its idle sessions and any other client
        sessions included, over the first `sample` servers."""
        sizes = [_pss_kb(pid) / 1024 for pg in servers[:sample] if (pid := pg.pid) is not None]
        return statistics.median(sizes) if sizes else 0.0

    def stop(self) -> None:
        """Close the sessions, stop and remove every server made (a pool of threads)."""
        self._stopping.set()
        common.close_sessions(self.sessions)
        with self._lock:
            servers = list(self.servers)
        if servers:
            print(f"stopping {len(servers)} servers ...", file=sys.stderr)
        with ThreadPoolExecutor(max_workers=max(self.jobs, 8)) as pool:
            for future in [pool.submit(pg.cleanup) for pg in servers]:
                with contextlib.suppress(Exception):
                    future.result()
        if self.template is not None:
            self.template.cleanup()
