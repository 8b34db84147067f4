"""Soak: the daemon under constant session churn for 10 minutes neither grows nor leaks.

From minute 1 (once imports, caches and the first thousand kills are behind it) to the end, its
resident memory (VmRSS) must grow by less than 5 MB and its open file descriptors must stay within
2 of what they were. Meanwhile the churn is checked as in test_churn: no wrong kill, no survivor.
/metrics is scraped every 5 s, as Prometheus would.

Run with `-m soak` (deselected otherwise); PG_REAPER_SOAK_SECONDS and PG_REAPER_SOAK_CLIENTS
resize it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from reaper.demo.embedded import EmbeddedPostgres
from tests.reliability.churn import REACTION_BOUND, Churn, check_churn
from tests.reliability.support import daemon_config, free_port, running_daemon
from tests.test_daemon import policy

pytestmark = [pytest.mark.integration, pytest.mark.soak]

SECONDS = float(os.environ.get("PG_REAPER_SOAK_SECONDS") or 600)
CLIENTS = int(os.environ.get("PG_REAPER_SOAK_CLIENTS") or 100)
WARM_UP = min(60.0, SECONDS / 5)
SAMPLE_EVERY = 5.0
MAX_IDLE = 2.0
PREFIX = "soak-"
RSS_GROWTH_LIMIT_KB = 5 * 1024
FD_DRIFT_LIMIT = 2


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the churn started
    rss_kb: int
    fds: int


def measure(pid: int, at: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    rss = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return Sample(
        at=at, rss_kb=int(rss.split()[1]), fds=sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    )


@pytest.mark.timeout(SECONDS + 600)
def test_the_daemon_neither_grows_nor_leaks_under_10_minutes_of_churn(
    pg_major: int, tmp_path: Path
) -> None:
    port = free_port()
    with EmbeddedPostgres(major=pg_major, settings={"max_connections": "300"}) as server:
        config = daemon_config(
            tmp_path / "config.toml",
            servers={"soak": server.dsn()},
            policies=policy("idle", f"^{PREFIX}", max_idle="2s"),
            port=port,
            interval="30s",
            min_interval="1s",
        )
        with running_daemon(config, port=port) as daemon:
            daemon.wait_ready()
            pid = daemon.process.pid
            churn = Churn(
                server.dsn(), clients=CLIENTS, prefix=PREFIX, idle=(0.5, 5.0), seed=pg_major
            )
            churn.start()
            started = time.monotonic()
            samples = []
            while (at := time.monotonic() - started) < SECONDS:
                status, _ = daemon.get("/metrics")
                assert status == 200
                samples.append(measure(pid, at))
                time.sleep(min(SAMPLE_EVERY, max(0.0, SECONDS - at)))
            samples.append(measure(pid, time.monotonic() - started))
            churn.park()
            report = churn.finish(timeout=MAX_IDLE + REACTION_BOUND + 3)
            verdict = check_churn(report, daemon, max_idle=MAX_IDLE, prefix=PREFIX)
            reaped = len(daemon.events("session_reaped"))
            daemon.send(signal.SIGTERM)
            assert daemon.wait_exit(timeout=15) == 0, daemon.stderr_text()
            errors = [e for e in daemon.events() if e.get("level") in {"error", "critical"}]

    after_warm_up = [s for s in samples if s.at >= WARM_UP]
    baseline, last = after_warm_up[0], after_warm_up[-1]
    growth = last.rss_kb - baseline.rss_kb
    fds = sorted({s.fds for s in after_warm_up})
    print(  # noqa: T201 - the numbers of the run, shown with -s
        f"\nsoak: PostgreSQL {pg_major}, {CLIENTS} clients, {SECONDS:.0f} s, "
        f"{len(report.lives)} sessions, {reaped} reaped, {len(verdict.problems)} problems\n"
        f"soak: VmRSS {samples[0].rss_kb} kB at start, {baseline.rss_kb} kB at "
        f"{baseline.at:.0f} s, {last.rss_kb} kB at {last.at:.0f} s (growth {growth} kB, "
        f"max {max(s.rss_kb for s in after_warm_up)} kB); "
        f"open fds {samples[0].fds} at start, {baseline.fds} at {baseline.at:.0f} s, "
        f"seen after warm-up: {fds}"
    )
    assert not verdict.problems, "\n".join(verdict.problems[:40])
    assert errors == [], errors[:5]
    assert reaped >= CLIENTS
    assert growth < RSS_GROWTH_LIMIT_KB, f"VmRSS grew by {growth} kB after warm-up"
    assert all(abs(s.fds - baseline.fds) <= FD_DRIFT_LIMIT for s in after_warm_up), fds
