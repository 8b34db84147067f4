"""How soon after a burst of clients past `when_connections_above` is the server back under the
level, with `interval = "30s"`: the pressure probe against the same daemon without it.

On one throwaway PostgreSQL server (``max_connections`` 60: 57 usable slots, so
``when_connections_above = "80%"`` is a level of 45 client sessions) a pool of 30 sessions sits
idle past the policy's ``max_idle`` (2 s), beside an observer session and the daemon's own: 32.
Then, again and again, 18 more clients connect at once (50 sessions, 5 over the level); the
daemon reaps the 5 oldest pool sessions. Between bursts the burst's clients leave, the pool is
filled up again and left idle past ``max_idle``, and a random pause (0 to 1.5 s) puts the next
burst at a random moment of the probe's cadence.

Each daemon runs with ``interval = "30s"``, ``min_interval = "1s"`` and one policy
(``max_idle = "2s"``, ``when_connections_above = "80%"``, the pool's sessions only):

- probe-1s: the default ``pressure_probe_interval = "1s"``;
- probe-500ms: ``pressure_probe_interval = "500ms"``;
- no-probe: ``pressure_probe_interval = "0s"`` (the baseline, pg-reaper before the probe: pressure
  is seen at the next poll, up to 30 s later), over fewer bursts.

Reaction time of a burst: from the moment the client that took the count past the level had
connected until the observer (a count of client backends every 10 ms) sees the count back at the
level or under it. Then the probe's and the poll's server cost per call (``EXPLAIN ANALYZE``
Execution Time, medians) at the pool's size, and per second at their cadences. The daemon, the
server and every session are stopped on exit, on Ctrl-C and on SIGTERM.

    .venv/bin/python bench/pressure.py [--bursts 20] [--baseline-bursts 5] [--major 18]
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import common
import psycopg
import tomli_w
from reaction_latency import DaemonLog

from reaper.demo.embedded import SUPPORTED_MAJORS, EmbeddedPostgres
from reaper.pg.activity import POLL_SQL, PROBE_SQL

if TYPE_CHECKING:
    from collections.abc import Sequence

    from psycopg.rows import TupleRow

SERVER = "bench"
MAX_CONNECTIONS = 60  # less 3 superuser_reserved_connections: 57 usable
LEVEL = 57 * 80 // 100  # when_connections_above = "80%": 45
POOL = 30
BURST = 18  # 30 + observer + reaper + 18 = 50: 5 over the level
MAX_IDLE = 2.0
INTERVAL = "30s"
TARGET_P99 = 1.0
OBSERVER_PERIOD = 0.01
GIVE_UP = 45.0  # seconds for one burst to be reaped: past the 30 s interval
COST_REPETITIONS = 60


@dataclass(frozen=True)
class Mode:
    name: str
    probe_interval: str
    seconds: float  # the probe's cadence, 0 without


MODES = (
    Mode("probe-1s", "1s", 1.0),
    Mode("probe-500ms", "500ms", 0.5),
    Mode("no-probe", "0s", 0.0),
)


@dataclass
class Outcome:
    mode: Mode
    reactions: list[float] = field(default_factory=list)
    missed: int = 0  # bursts not back under the level within GIVE_UP
    polls: int = 0
    probed: int = 0  # pressure_probed events
    seconds: float = 0.0  # the bursts' part of the run


def _config(pg: EmbeddedPostgres, mode: Mode) -> dict[str, Any]:
    return {
        "reaper": {
            "interval": INTERVAL,
            "min_interval": "1s",
            "pressure_probe_interval": mode.probe_interval,
        },
        "metrics": {"listen": ""},
        "log": {"format": "json", "level": "info"},
        "servers": [{"name": SERVER, "dsn": pg.dsn()}],
        "policies": [
            {
                "name": "crowded",
                "max_idle": f"{MAX_IDLE:g}s",
                "when_connections_above": "80%",
                "applications": ["^bench-pool$"],
            }
        ],
    }


def _connect(pg: EmbeddedPostgres, application: str) -> psycopg.Connection[TupleRow]:
    conn = psycopg.connect(pg.dsn(), autocommit=True, application_name=application)
    conn.execute("SELECT 1")
    return conn


def _count(observer: psycopg.Connection[TupleRow]) -> int:
    row = observer.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def _settle(observer: psycopg.Connection[TupleRow], expected: int) -> None:
    deadline = time.monotonic() + 10.0
    while _count(observer) != expected and time.monotonic() < deadline:
        time.sleep(OBSERVER_PERIOD)


def _refill(
    pg: EmbeddedPostgres, pool: list[psycopg.Connection[TupleRow]], present: set[int]
) -> None:
    """Replace the pool's sessions that the daemon terminated."""
    for i, conn in enumerate(pool):
        if conn.info.backend_pid not in present:
            conn.close()
            pool[i] = _connect(pg, "bench-pool")


def one_burst(
    pg: EmbeddedPostgres, observer: psycopg.Connection[TupleRow], pool_exec: ThreadPoolExecutor
) -> tuple[float | None, list[psycopg.Connection[TupleRow]]]:
    """Open the burst; the seconds from crossing the level until back at it (None: gave up)."""
    base = _count(observer)

    def open_one(_: int) -> tuple[float, psycopg.Connection[TupleRow]]:
        conn = psycopg.connect(pg.dsn(), autocommit=True, application_name="bench-burst")
        return time.monotonic(), conn

    opened = list(pool_exec.map(open_one, range(BURST)))
    times = sorted(t for t, _ in opened)
    crossed = times[LEVEL - base]  # the connection that made base + k > LEVEL
    deadline = time.monotonic() + GIVE_UP
    while time.monotonic() < deadline:
        if _count(observer) <= LEVEL:
            return time.monotonic() - crossed, [c for _, c in opened]
        time.sleep(OBSERVER_PERIOD)
    return None, [c for _, c in opened]


def run_mode(pg: EmbeddedPostgres, mode: Mode, bursts: int, rng: random.Random) -> Outcome:
    work = Path(tempfile.mkdtemp(prefix="pg-reaper-bench-"))
    cfg = work / "config.toml"
    cfg.write_text(tomli_w.dumps(_config(pg, mode)))
    cfg.chmod(0o600)
    outcome = Outcome(mode=mode)
    pool: list[psycopg.Connection[TupleRow]] = []
    burst: list[psycopg.Connection[TupleRow]] = []
    observer = psycopg.connect(pg.dsn(), autocommit=True, application_name="bench-observer")
    proc = subprocess.Popen(
        [sys.executable, "-m", "reaper", "run", "-c", str(cfg)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=common.daemon_env(),
    )
    assert proc.stderr is not None
    log = DaemonLog(proc.stderr)
    try:
        if not log.wait_for_poll(until=time.time() + 30):
            raise RuntimeError(f"{mode.name}: the daemon never completed a poll")
        pool.extend(_connect(pg, "bench-pool") for _ in range(POOL))
        started = time.monotonic()
        with ThreadPoolExecutor(BURST) as pool_exec:
            for number in range(bursts):
                _settle(observer, POOL + 2)
                time.sleep(MAX_IDLE + 0.2 + rng.uniform(0.0, 1.5))
                seconds, burst = one_burst(pg, observer, pool_exec)
                if seconds is None:
                    outcome.missed += 1
                else:
                    outcome.reactions.append(seconds)
                print(f"  {mode.name} burst {number + 1}/{bursts}: {seconds}", file=sys.stderr)
                common.close_sessions(burst)
                present = {int(r[0]) for r in observer.execute("SELECT pid FROM pg_stat_activity")}
                _refill(pg, pool, present)
        outcome.seconds = time.monotonic() - started
    finally:
        common.close_sessions(burst)
        common.close_sessions(pool)
        observer.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.join(5.0)
        cfg.unlink(missing_ok=True)
        work.rmdir()
    events = list(log.events)
    outcome.polls = sum(1 for e in events if e.get("event") == "poll_completed")
    outcome.probed = sum(1 for e in events if e.get("event") == "pressure_probed")
    return outcome


def server_cost(pg: EmbeddedPostgres) -> dict[str, float]:
    """Median server ms per call of the probe and the poll, with the pool connected."""
    pool = [_connect(pg, "bench-pool") for _ in range(POOL)]
    statements = {
        "probe": (PROBE_SQL, None),
        "poll": (POLL_SQL, {"include_query": False, "include_blocking": False}),
    }
    times: dict[str, list[float]] = {name: [] for name in statements}
    try:
        with psycopg.connect(pg.dsn(), autocommit=True, application_name="bench-cost") as conn:
            for _ in range(COST_REPETITIONS):
                for name, (query, params) in statements.items():
                    row = conn.execute(
                        "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + query, params, prepare=True
                    ).fetchone()
                    assert row is not None
                    times[name].append(float(row[0][0]["Execution Time"]))
    finally:
        common.close_sessions(pool)
    return {name: statistics.median(values[5:]) for name, values in times.items()}


def _pct(values: Sequence[float], pct: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(outcomes: Sequence[Outcome]) -> str:
    head = (
        "| daemon | pressure_probe_interval | bursts | p50 s | p99 s | max s | missed "
        "| polls/min | pressure_probed |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for o in outcomes:
        cells = [
            o.mode.name,
            o.mode.probe_interval,
            str(len(o.reactions) + o.missed),
            _fmt(_pct(o.reactions, 50)),
            _fmt(_pct(o.reactions, 99)),
            _fmt(max(o.reactions, default=None)),
            str(o.missed),
            f"{60 * o.polls / o.seconds:.1f}" if o.seconds else "n/a",
            str(o.probed),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(outcomes: Sequence[Outcome], cost: dict[str, float]) -> tuple[list[str], str]:
    by_name = {o.mode.name: o for o in outcomes}
    default, baseline = by_name["probe-1s"], by_name["no-probe"]
    lines = []
    base50 = _pct(baseline.reactions, 50)
    for o in outcomes:
        if o is baseline or base50 is None or not o.reactions:
            continue
        lines.append(
            f"- {o.mode.name}: p50 {_fmt(_pct(o.reactions, 50))} s = "
            f"{(_pct(o.reactions, 50) or 0) / base50:.3f}x the no-probe daemon's "
            f"{base50:.3f} s; p99 {_fmt(_pct(o.reactions, 99))} s"
        )
    probe, poll = cost["probe"], cost["poll"]
    lines.append(
        f"- server cost at {POOL + 2} client sessions: probe {probe:.3f} ms per call = "
        f"{probe / poll:.2f}x a full poll ({poll:.3f} ms); per second, a probe every 1 s: "
        f"{probe:.3f} ms/s = {probe / poll:.2f} of one full poll; every 500 ms: "
        f"{2 * probe:.3f} ms/s = {2 * probe / poll:.2f}; the polls every {INTERVAL}: "
        f"{poll / 30:.4f} ms/s"
    )
    p99 = _pct(default.reactions, 99)
    if p99 is not None and p99 <= TARGET_P99 and not default.missed:
        sentence = (
            f"Target met: with the default probe (1 s) the server is back under the level "
            f"{p99:.3f} s (p99) after a burst crossed it (<= {TARGET_P99:g} s), against "
            f"{_fmt(_pct(baseline.reactions, 99))} s without the probe."
        )
    else:
        sentence = (
            f"Target NOT met: with the default probe (1 s) the p99 is {_fmt(p99)} s "
            f"(target <= {TARGET_P99:g} s; {default.missed} bursts missed)."
        )
    return lines, sentence


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bursts", type=int, default=20, help="bursts per probe daemon (20)")
    parser.add_argument(
        "--baseline-bursts", type=int, default=5, help="bursts for the daemon without probe (5)"
    )
    parser.add_argument("--major", type=int, default=18, choices=SUPPORTED_MAJORS)
    parser.add_argument("--seed", type=int, default=1, help="for the pauses between bursts")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.bursts < 1 or args.baseline_bursts < 1:
        parser.error("--bursts and --baseline-bursts must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    outcomes: list[Outcome] = []
    print(f"starting PostgreSQL {args.major} ...", file=sys.stderr)
    with EmbeddedPostgres(
        major=args.major, settings={"max_connections": str(MAX_CONNECTIONS)}
    ) as pg:
        info = common.machine(pg)
        load_before = common.load_average()
        for mode in MODES:
            bursts = args.baseline_bursts if mode.seconds == 0 else args.bursts
            print(f"{mode.name}: {bursts} bursts ...", file=sys.stderr)
            outcomes.append(run_mode(pg, mode, bursts, rng))
        cost = server_cost(pg)
    info.append(
        f"- load average (1/5/15 min) before the first daemon: {load_before}; "
        f"after the last: {common.load_average()}"
    )
    body = table(outcomes)
    ratios, sentence = verdict(outcomes, cost)
    common.print_report(info, body, ratios, sentence)
    if not args.no_record:
        common.append_results(
            title="pressure: back under when_connections_above after a burst, probe vs none",
            info=info,
            workload=(
                f"max_connections {MAX_CONNECTIONS} (57 usable; 80% is {LEVEL}); a pool of {POOL} "
                f"sessions idle past max_idle {MAX_IDLE:g}s, an observer and the daemon's own "
                f"session; bursts of {BURST} clients connecting at once ({POOL + 2 + BURST} "
                f"sessions, {POOL + 2 + BURST - LEVEL} over), a random pause of 0-1.5 s between "
                f'bursts (seed {args.seed}); interval = "{INTERVAL}", min_interval = "1s", one '
                'policy max_idle = "2s", when_connections_above = "80%" on the pool. Reaction: '
                "from the connect of the client that crossed the level until the observer "
                f"({OBSERVER_PERIOD * 1000:g} ms) sees the count back at the level. Cost: "
                f"EXPLAIN ANALYZE Execution Time, medians of {COST_REPETITIONS}."
            ),
            body=body,
            ratios=ratios,
            sentence=sentence,
        )
    return 0


if __name__ == "__main__":
    common.run(main, stopped="the server, sessions and daemon")
