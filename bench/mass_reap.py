"""How long does pg-reaper take to terminate 2,000 idle sessions, against one SQL statement?

On one throwaway PostgreSQL server (``max_connections`` 2,500) this opens N idle sessions
(``application_name = 'bench-mass'``) and terminates them, on a fresh set of N each time, in three
ways:

- floor: one ``SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type =
  'client backend' AND application_name = 'bench-mass' AND pid <> pg_backend_pid()`` on a
  connection opened (and warmed up) beforehand: the least any tool can do;
- sweep: pg-reaper in this process: settings loaded, ``reaper.sweep.connect`` connected and
  warmed up (as the daemon's persistent connection is), then one timed ``sweep(...)``: poll,
  decide, one race-safe signal statement, and one audit event per victim (JSON lines to a file);
- once: the whole ``pg-reaper once -c FILE`` subprocess, interpreter start-up included.

The policy: ``states = ["idle"]``, ``max_idle = "1s"``, ``applications = ["^bench-mass$"]``,
``max_terminations_per_cycle = 5000``. The rounds rotate the order of the three methods.

Also measured, for each: the time from the start until an observer connection (polling
pg_stat_activity every 10 ms in a thread) sees none of the sessions left, i.e. until every
terminated backend has exited. The server and every session are stopped on exit, on errors, on
Ctrl-C and on SIGTERM.

    .venv/bin/python bench/mass_reap.py [--sessions 2000] [--rounds 5] [--major 18]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import common
import psycopg
import tomli_w

from reaper.demo.embedded import SUPPORTED_MAJORS, EmbeddedPostgres
from reaper.observe.log import configure
from reaper.pg.activity import ServerConnection
from reaper.settings import load_settings
from reaper.sweep import connect, sweep

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from datetime import datetime, timedelta

    from psycopg.rows import TupleRow

    from reaper.pg.activity import Action, Snapshot
    from reaper.policy import Result, Session
    from reaper.settings import ServerConfig, Settings

APPLICATION = "bench-mass"
SERVER = "bench"
MAX_IDLE = 1.0
TARGET_RATIO = 1.5
OBSERVER_PERIOD = 0.01
GONE_TIMEOUT = 60.0
OPEN_WORKERS = 8
METHODS = ("floor", "sweep", "once")
FLOOR_SQL = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND application_name = %(app)s "
    "AND pid <> pg_backend_pid()"
)
COUNT_SQL = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND application_name = %(app)s"
)


@dataclass
class Run:
    method: str
    round: int
    sessions: int
    seconds: float  # the timed operation: the statement, the sweep, or the whole subprocess
    gone_seconds: float | None  # from the start until none of the sessions is left
    terminated: int
    poll_seconds: float | None = None  # sweep only: ServerConnection.poll (incl. pressure query)
    signal_seconds: float | None = None  # sweep only: ServerConnection.signal
    sweep_ms: float | None = None  # the sweep's own duration_ms (poll_completed)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- sessions


def open_sessions(dsn: str, count: int) -> list[psycopg.Connection[TupleRow]]:
    """Open `count` idle sessions, several at a time (the server forks one backend each)."""

    def one(_: int) -> psycopg.Connection[TupleRow]:
        return psycopg.connect(dsn, autocommit=True, application_name=APPLICATION)

    opened: list[psycopg.Connection[TupleRow]] = []
    try:
        with ThreadPoolExecutor(OPEN_WORKERS) as pool:
            opened.extend(pool.map(one, range(count)))
    except BaseException:
        common.close_sessions(opened)
        raise
    return opened


def count_left(conn: psycopg.Connection[TupleRow]) -> int:
    row = conn.execute(COUNT_SQL, {"app": APPLICATION}).fetchone()
    return int(row[0]) if row else 0


def wait_until_gone(conn: psycopg.Connection[TupleRow], *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while count_left(conn):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Observer:
    """From `start()` on, polls pg_stat_activity until none of the sessions is left."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True, application_name="bench-observer")
        self._go = threading.Event()
        self._done = threading.Event()
        self.started = 0.0
        self.gone_at: float | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)
        self._thread.start()

    def start(self) -> float:
        self.started = time.perf_counter()
        self._go.set()
        return self.started

    def _run(self) -> None:
        self._go.wait()
        deadline = self.started + GONE_TIMEOUT
        try:
            while time.perf_counter() < deadline:
                if count_left(self._conn) == 0:
                    self.gone_at = time.perf_counter()
                    break
                time.sleep(OBSERVER_PERIOD)
        except psycopg.Error as exc:
            self.error = f"{type(exc).__name__}: {exc}".strip()
        finally:
            self._done.set()

    def result(self) -> float | None:
        """Seconds from `start()` until none was left (None if never within GONE_TIMEOUT)."""
        self._done.wait(GONE_TIMEOUT + 5.0)
        self._go.set()  # never started: let the thread end
        self._thread.join(5.0)
        self._conn.close()
        return None if self.gone_at is None else self.gone_at - self.started


# --------------------------------------------------------------------------- the three methods


class TimedConnection(ServerConnection):
    """`reaper.sweep.connect`'s connection, timing its poll and its signal statement."""

    poll_seconds = 0.0
    signal_seconds = 0.0

    def poll(self, *, include_query: bool = False, include_blocking: bool = False) -> Snapshot:
        started = time.perf_counter()
        try:
            return super().poll(include_query=include_query, include_blocking=include_blocking)
        finally:
            self.poll_seconds += time.perf_counter() - started

    def signal(
        self,
        victims: Sequence[Session],
        *,
        action: Action,
        lock_key: int | None = None,
        blocking: Mapping[int, timedelta] | None = None,
        due: Mapping[int, datetime] | None = None,
    ) -> dict[int, tuple[Result, str | None]]:
        started = time.perf_counter()
        try:
            return super().signal(
                victims, action=action, lock_key=lock_key, blocking=blocking, due=due
            )
        finally:
            self.signal_seconds += time.perf_counter() - started


def timed_connection(server: ServerConfig, settings: Settings) -> TimedConnection:
    conn = connect(server, settings)
    conn.__class__ = TimedConnection  # the same object, with its poll and signal timed
    assert isinstance(conn, TimedConnection)
    return conn


def run_floor(pg: EmbeddedPostgres, count: int, rnd: int) -> Run:
    with psycopg.connect(pg.dsn(), autocommit=True, application_name="bench-floor") as conn:
        count_left(conn)  # warm the connection's catalog caches, as the sweep's is warmed
        observer = Observer(pg.dsn())
        started = observer.start()
        rows = conn.execute(FLOOR_SQL, {"app": APPLICATION}).fetchall()
        seconds = time.perf_counter() - started
    return Run(
        method="floor",
        round=rnd,
        sessions=count,
        seconds=seconds,
        gone_seconds=observer.result(),
        terminated=sum(bool(r[0]) for r in rows),
    )


def run_sweep(config: Path, log_path: Path, pg: EmbeddedPostgres, count: int, rnd: int) -> Run:
    settings = load_settings(config)
    server = settings.servers[0]
    with log_path.open("w") as log, timed_connection(server, settings) as conn:
        configure(settings.log, stream=log)
        conn.poll()  # connected, facts read, caches warm: the daemon's steady state
        conn.poll_seconds = 0.0
        observer = Observer(pg.dsn())
        started = observer.start()
        report = sweep(conn, server=server, settings=settings)
        seconds = time.perf_counter() - started
        log.flush()
    notes = [] if report.error is None else [f"sweep error: {report.error}"]
    return Run(
        method="sweep",
        round=rnd,
        sessions=count,
        seconds=seconds,
        gone_seconds=observer.result(),
        terminated=report.reaped,
        poll_seconds=conn.poll_seconds,
        signal_seconds=conn.signal_seconds,
        sweep_ms=report.duration_ms,
        notes=notes,
    )


def run_once(config: Path, log_path: Path, pg: EmbeddedPostgres, count: int, rnd: int) -> Run:
    with log_path.open("w") as log:
        observer = Observer(pg.dsn())
        started = observer.start()
        proc = subprocess.run(
            [sys.executable, "-m", "reaper", "once", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=common.daemon_env(),
            check=False,
            timeout=120,
        )
        seconds = time.perf_counter() - started
    events = read_events(log_path)
    reaped = sum(
        e.get("event") == "session_reaped" and e.get("result") == "terminated" for e in events
    )
    polls = [e for e in events if e.get("event") == "poll_completed"]
    notes = [] if proc.returncode == 0 else [f"`pg-reaper once` exited {proc.returncode}"]
    return Run(
        method="once",
        round=rnd,
        sessions=count,
        seconds=seconds,
        gone_seconds=observer.result(),
        terminated=reaped,
        sweep_ms=float(polls[0]["duration_ms"]) if polls else None,
        notes=notes,
    )


def read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                events.append(value)
    return events


def write_config(path: Path, pg: EmbeddedPostgres) -> None:
    config = {
        "reaper": {"max_terminations_per_cycle": 5000},
        "metrics": {"listen": ""},
        "log": {"format": "json", "level": "info"},
        "servers": [{"name": SERVER, "dsn": pg.dsn()}],
        "policies": [
            {
                "name": "idle",
                "states": ["idle"],
                "max_idle": f"{MAX_IDLE:g}s",
                "applications": [f"^{APPLICATION}$"],
            }
        ],
    }
    path.write_text(tomli_w.dumps(config))
    path.chmod(0o600)


def one_round(  # the three methods, each on a fresh set of sessions
    pg: EmbeddedPostgres, *, work: Path, count: int, rnd: int, watcher: psycopg.Connection[TupleRow]
) -> list[Run]:
    config, log_path = work / "config.toml", work / "reaper.log"
    order = METHODS[rnd % 3 :] + METHODS[: rnd % 3]
    runs = []
    for method in order:
        sessions = open_sessions(pg.dsn(), count)
        try:
            time.sleep(MAX_IDLE + 0.2)  # every session past max_idle
            print(f"round {rnd + 1}: {method} on {len(sessions)} sessions ...", file=sys.stderr)
            if method == "floor":
                run = run_floor(pg, count, rnd)
            elif method == "sweep":
                run = run_sweep(config, log_path, pg, count, rnd)
            else:
                run = run_once(config, log_path, pg, count, rnd)
        finally:
            common.close_sessions(sessions)
        if not wait_until_gone(watcher, timeout=GONE_TIMEOUT):
            run.notes.append(f"sessions still there {GONE_TIMEOUT:g} s later")
            watcher.execute(FLOOR_SQL, {"app": APPLICATION})
            wait_until_gone(watcher, timeout=GONE_TIMEOUT)
        runs.append(run)
        time.sleep(1.0)  # let the postmaster reap its children before the next set
    return runs


# --------------------------------------------------------------------------- reporting


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def table(runs: Sequence[Run]) -> str:
    head = (
        "| method | rounds | terminated | time ms (median) | min | max | vs floor "
        "| all gone ms (median) | gone vs floor | poll ms | signal ms | rest ms |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    floor = [r for r in runs if r.method == "floor"]
    floor_t = _median([r.seconds for r in floor])
    floor_g = _median([r.gone_seconds for r in floor])
    for method in METHODS:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        t = _median([r.seconds for r in mine])
        g = _median([r.gone_seconds for r in mine])
        poll = _median([r.poll_seconds for r in mine])
        sig = _median([r.signal_seconds for r in mine])
        rest = None if poll is None or sig is None or t is None else t - poll - sig
        label = {
            "floor": "floor: one pg_terminate_backend statement",
            "sweep": "pg-reaper sweep (in-process)",
            "once": "`pg-reaper once` subprocess",
        }[method]
        cells = [
            label,
            str(len(mine)),
            " / ".join(f"{r.terminated}" for r in mine) + f" of {mine[0].sessions}",
            _ms(t),
            _ms(min(r.seconds for r in mine)),
            _ms(max(r.seconds for r in mine)),
            _x(_ratio(t, floor_t)),
            _ms(g),
            _x(_ratio(g, floor_g)),
            _ms(poll),
            _ms(sig),
            _ms(rest),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(runs: Sequence[Run]) -> tuple[list[str], str]:
    def med(method: str, attr: str) -> float | None:
        return _median([getattr(r, attr) for r in runs if r.method == method])

    floor_t, sweep_t, once_t = (
        med("floor", "seconds"),
        med("sweep", "seconds"),
        med("once", "seconds"),
    )
    floor_g, sweep_g, once_g = (
        med("floor", "gone_seconds"),
        med("sweep", "gone_seconds"),
        med("once", "gone_seconds"),
    )
    ratio = _ratio(sweep_t, floor_t)
    lines = [
        (
            f"- sweep / floor (the target, <= {TARGET_RATIO:g}x): {_ms(sweep_t)} ms / "
            f"{_ms(floor_t)} ms = {_x(ratio)}"
        ),
        (
            f"- whole `once` subprocess / floor: {_ms(once_t)} ms / {_ms(floor_t)} ms = "
            f"{_x(_ratio(once_t, floor_t))}"
        ),
        (
            f"- until none left, sweep / floor: {_ms(sweep_g)} ms / {_ms(floor_g)} ms = "
            f"{_x(_ratio(sweep_g, floor_g))}; once / floor: {_ms(once_g)} ms / {_ms(floor_g)} ms = "
            f"{_x(_ratio(once_g, floor_g))}"
        ),
    ]
    every = all(r.terminated == r.sessions for r in runs)
    if ratio is not None and ratio <= TARGET_RATIO and every:
        sentence = (
            f"Target met: the in-process sweep terminated every session in {_x(ratio)} the time "
            f"of the single pg_terminate_backend statement (<= {TARGET_RATIO:g}x)."
        )
    else:
        misses = [
            *([] if every else ["not every session was terminated in every run"]),
            *(
                []
                if ratio is not None and ratio <= TARGET_RATIO
                else [f"the sweep took {_x(ratio)} the floor's time (target {TARGET_RATIO:g}x)"]
            ),
        ]
        sentence = "Target NOT met: " + "; ".join(misses) + "."
    return lines, sentence


def append_results(
    *, info: list[str], args: argparse.Namespace, body: str, ratios: list[str], sentence: str
) -> None:
    common.append_results(
        title=f"mass reap, {args.sessions} idle sessions, pg-reaper vs one statement",
        info=info,
        workload=(
            f"per run a fresh set of {args.sessions} idle sessions "
            f"(`application_name = '{APPLICATION}'`, {OPEN_WORKERS} threads opening them), "
            f"all idle > {MAX_IDLE:g} s; {args.rounds} round(s), each running floor, sweep and "
            'once in rotated order. Policy `states = ["idle"]`, '
            f'`max_idle = "{MAX_IDLE:g}s"`, `applications = ["^{APPLICATION}$"]`, '
            "`max_terminations_per_cycle = 5000`. Floor: one `SELECT pg_terminate_backend(pid) "
            "FROM pg_stat_activity WHERE backend_type = 'client backend' AND application_name = "
            "... AND pid <> pg_backend_pid()` on a warm connection. Sweep: `sweep()` on a "
            "connected, warmed-up `reaper.sweep.connect` connection, audit events (JSON) to a "
            "file; `rest` = plan + audit events + report. Once: the whole subprocess, "
            "logs to a file. `all gone`: from the start until an observer (10 ms) sees none "
            "of the sessions in pg_stat_activity."
        ),
        body=body,
        ratios=ratios,
        sentence=sentence,
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=2000, help="sessions per run (2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of floor/sweep/once (5)")
    parser.add_argument("--major", type=int, default=18, choices=SUPPORTED_MAJORS)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.rounds < 1:
        parser.error("--sessions and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for key in [k for k in os.environ if k.startswith("PG_REAPER_")]:
        del os.environ[key]  # the in-process sweep reads overrides from the environment too
    common.raise_fd_limit(args.sessions + 200)
    runs: list[Run] = []
    print(f"starting PostgreSQL {args.major} ...", file=sys.stderr)
    settings = {"max_connections": str(max(2500, args.sessions + 100))}
    with (
        EmbeddedPostgres(major=args.major, settings=settings) as pg,
        tempfile.TemporaryDirectory(prefix="pg-reaper-bench-") as tmp,
        psycopg.connect(pg.dsn(), autocommit=True, application_name="bench-watch") as watcher,
    ):
        work = Path(tmp)
        write_config(work / "config.toml", pg)
        info = common.machine(pg)
        load_before = common.load_average()
        for rnd in range(args.rounds):
            runs.extend(one_round(pg, work=work, count=args.sessions, rnd=rnd, watcher=watcher))
    info.append(
        f"- load average (1/5/15 min) before the first run: {load_before}; "
        f"after the last: {common.load_average()}"
    )
    body = table(runs)
    ratios, sentence = verdict(runs)
    notes = [f"{r.method} round {r.round + 1}: {n}" for r in runs for n in r.notes]
    common.print_report(info, body, ratios, sentence)
    for note in notes:
        print(f"- {note}")
    if not args.no_record:
        append_results(
            info=info,
            args=args,
            body=body,
            ratios=[*ratios, *(f"- note: {n}" for n in notes)],
            sentence=sentence,
        )
    return 0


if __name__ == "__main__":
    common.run(main, stopped="the server and sessions")
