"""How soon after a session becomes eligible is it gone, and at what cost in polls and signals?

On one throwaway PostgreSQL server, for each scenario (a `max_idle`, a number of sessions, the
seconds over which they start), three methods one after the other on the same workload:

- armed:    `pg-reaper run` with ``interval = "30s"``, ``min_interval = "1s"`` (armed signals: a
  timer per server at the moment its next session becomes eligible, polls every smallest
  threshold);
- fixed-1s: `pg-reaper run` with ``interval = "1s"``, ``min_interval = "1s"`` and armed signals
  switched off in the benchmark's daemon process (the classic poller: poll every second, signal
  what the poll finds eligible);
- idle_session_timeout: no daemon; each session runs ``SET idle_session_timeout`` first, and
  PostgreSQL's own timer ends it (the limit: what the server does by itself).

The daemons reap with one policy, ``states = ["idle"]``, ``max_idle`` the scenario's. Each
session connects at a random moment within the scenario's window (the same moments for every
method), runs ``SELECT 1`` and stays idle, so it crosses ``max_idle`` at a random time relative to
the polls.

Lateness of a victim: the moment its socket turns readable (the server's FATAL message and
close, seen by one selector thread watching every victim's socket) minus the moment its
``SELECT 1`` returned plus ``max_idle``. The same measure for the three methods.

Polls: ``poll_completed`` events from the first session's start until the last victim is gone,
per minute. Signal statements: armed firings (``armed_signals_fired``) plus the polls that
signalled (``candidates > 0``), per minute. The daemon, the server and every session are stopped
on exit, on Ctrl-C and on SIGTERM.

    .venv/bin/python bench/reaction_latency.py [--scenarios 3:40:40,60:16:15] [--major M]
"""

from __future__ import annotations

import argparse
import json
import random
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import common
import psycopg
import tomli_w

from reaper.demo.embedded import SUPPORTED_MAJORS, EmbeddedPostgres

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from psycopg.rows import TupleRow

TARGET_P99 = 0.10
TARGET_POLLS = 0.4  # armed full polls / fixed 1 s polls, where max_idle is 3 s
SERVER = "bench"
FIRST_POLL_TIMEOUT = 30.0
GIVE_UP_AFTER = 15.0  # seconds past the last session's eligibility
STOP_TIMEOUT = 15.0  # the design promises an exit within 10 s of SIGTERM
METHODS = ("armed", "fixed-1s", "idle_session_timeout")
SCHEDULES = {"armed": ("30s", "1s"), "fixed-1s": ("1s", "1s")}
# The daemon with nothing ever armed (each poll's crossings left to the polls), for the baseline.
POLLING_ONLY = """
import sys
import reaper.daemon.armed
from reaper.sweep.armed import Arming
reaper.daemon.armed.arming = lambda report, **_: Arming(eligible_in=report.eligible_in)
from reaper.cli import main
raise SystemExit(main())
"""


@dataclass(frozen=True)
class Scenario:
    max_idle: float
    sessions: int
    duration: float

    @property
    def name(self) -> str:
        return f"max_idle {self.max_idle:g}s"


@dataclass
class Victim:
    application: str
    offset: float  # planned start, seconds after the method's start
    conn: psycopg.Connection[TupleRow] | None = None
    pid: int | None = None
    idle_at: float | None = None  # wall clock just after its SELECT 1 returned
    gone_at: float | None = None  # wall clock when its socket turned readable
    reason: str | None = None  # of its session_reaped event
    error: str | None = None


@dataclass
class Outcome:
    scenario: Scenario
    method: str
    victims: list[Victim]
    started: float
    events: list[dict[str, Any]] = field(default_factory=list)
    received: list[float] = field(default_factory=list)  # arrival of each event
    exit_code: int | None = None
    stop_seconds: float | None = None
    stray_lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def opened(self) -> list[Victim]:
        return [v for v in self.victims if v.idle_at is not None]

    @property
    def gone(self) -> list[Victim]:
        return [v for v in self.opened if v.gone_at is not None]

    def lateness(self) -> list[float]:
        m = self.scenario.max_idle
        return [v.gone_at - (v.idle_at + m) for v in self.gone if v.idle_at and v.gone_at]

    @property
    def window(self) -> float | None:
        ends = [v.gone_at for v in self.gone if v.gone_at is not None]
        return max(ends) - self.started if ends else None

    def _count(self, predicate: Callable[[dict[str, Any]], bool]) -> int:
        window = self.window
        if window is None:
            return 0
        end = self.started + window
        return sum(
            self.started <= at <= end and predicate(e)
            for e, at in zip(self.events, self.received, strict=True)
        )

    @property
    def polls(self) -> int:
        return self._count(_is_poll)

    @property
    def signal_statements(self) -> int:
        return self._count(
            lambda e: (
                (e.get("event") == "armed_signals_fired" and e.get("server") == SERVER)
                or (_is_poll(e) and int(e.get("candidates", 0)) > 0)
            )
        )

    def per_minute(self, count: int) -> float | None:
        window = self.window
        return None if not window or self.method == "idle_session_timeout" else count * 60 / window


def _is_poll(event: dict[str, Any]) -> bool:
    return event.get("event") == "poll_completed" and event.get("server") == SERVER


# --------------------------------------------------------------------------- watching victims


class SocketWatcher:
    """One thread, one selector: notes when each victim's socket turns readable (the server
    sent its FATAL message and closed the connection: the session is gone)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        self._thread.start()

    def watch(self, victim: Victim) -> None:
        assert victim.conn is not None
        with self._lock:
            self._selector.register(victim.conn.fileno(), selectors.EVENT_READ, victim)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ready = self._selector.select(timeout=0) if self._selector.get_map() else []
                for key, _ in ready:
                    key.data.gone_at = time.time()
                    self._selector.unregister(key.fileobj)
            if not ready:
                time.sleep(0.0005)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._selector.close()


class DaemonLog:
    """Reads the daemon's stderr (JSON lines) in a thread; anything else is kept as stray text."""

    def __init__(self, stream: IO[str]) -> None:
        self.events: list[dict[str, Any]] = []
        self.received: list[float] = []
        self.stray: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            received = time.time()
            try:
                fields = json.loads(line)
            except ValueError:
                fields = None
            with self._changed:
                if isinstance(fields, dict):
                    self.events.append(fields)
                    self.received.append(received)
                elif line.strip():
                    self.stray.append(line.rstrip())
                self._changed.notify_all()

    def wait_for_poll(self, *, until: float) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: any(map(_is_poll, self.events)), timeout=max(0.0, until - time.time())
            )

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# --------------------------------------------------------------------------- one method


def _config(pg: EmbeddedPostgres, scenario: Scenario, method: str) -> dict[str, Any]:
    interval, min_interval = SCHEDULES[method]
    return {
        "reaper": {
            "interval": interval,
            "min_interval": min_interval,
            "max_terminations_per_cycle": max(1000, 10 * scenario.sessions),
        },
        "metrics": {"listen": ""},
        "log": {"format": "json", "level": "info"},
        "servers": [{"name": SERVER, "dsn": pg.dsn()}],
        "policies": [
            {
                "name": "idle",
                "states": ["idle"],
                "max_idle": f"{scenario.max_idle:g}s",
                "applications": ["^bench-"],
            }
        ],
    }


def _open_victim(pg: EmbeddedPostgres, victim: Victim, scenario: Scenario, method: str) -> None:
    try:
        victim.conn = psycopg.connect(
            pg.dsn(), autocommit=True, application_name=victim.application
        )
        victim.pid = victim.conn.info.backend_pid
        if method == "idle_session_timeout":
            ms = round(scenario.max_idle * 1000)
            victim.conn.execute(f"SET idle_session_timeout = {ms}")
        victim.conn.execute("SELECT 1")
        victim.idle_at = time.time()
    except psycopg.Error as exc:
        victim.error = f"{type(exc).__name__}: {exc}".strip()


def _start_daemon(
    pg: EmbeddedPostgres, scenario: Scenario, method: str, cfg: Path
) -> tuple[subprocess.Popen[str], DaemonLog]:
    cfg.write_text(tomli_w.dumps(_config(pg, scenario, method)))
    cfg.chmod(0o600)
    boot = ["-c", POLLING_ONLY] if method == "fixed-1s" else ["-m", "reaper"]
    proc = subprocess.Popen(
        [sys.executable, *boot, "run", "-c", str(cfg)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=common.daemon_env(),
    )
    assert proc.stderr is not None
    log = DaemonLog(proc.stderr)
    if not log.wait_for_poll(until=time.time() + FIRST_POLL_TIMEOUT):
        proc.kill()
        tail = "\n".join(log.stray[-20:]) or "(no output)"
        raise RuntimeError(f"{method}: the daemon never completed a poll:\n{tail}")
    return proc, log


def _stop_daemon(proc: subprocess.Popen[str], outcome: Outcome) -> None:
    if proc.poll() is None:
        asked = time.time()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
            outcome.stop_seconds = time.time() - asked
        except subprocess.TimeoutExpired:
            outcome.notes.append(f"the daemon ignored SIGTERM for {STOP_TIMEOUT:g} s: killed")
            proc.kill()
            proc.wait()
    outcome.exit_code = proc.returncode


def run_method(
    pg: EmbeddedPostgres, scenario: Scenario, method: str, *, offsets: Sequence[float]
) -> Outcome:
    victims = [
        Victim(application=f"bench-{method}-{i:03d}", offset=offset)
        for i, offset in enumerate(sorted(offsets))
    ]
    work = Path(tempfile.mkdtemp(prefix="pg-reaper-bench-"))
    cfg = work / "config.toml"
    daemon = None if method == "idle_session_timeout" else _start_daemon(pg, scenario, method, cfg)
    outcome = Outcome(scenario=scenario, method=method, victims=victims, started=time.time())
    watcher = SocketWatcher()
    try:
        started = outcome.started = time.time()
        for victim in victims:
            time.sleep(max(0.0, started + victim.offset - time.time()))
            if daemon is not None and daemon[0].poll() is not None:
                raise RuntimeError(f"{method}: the daemon exited ({daemon[0].returncode})")
            _open_victim(pg, victim, scenario, method)
            if victim.conn is not None and victim.idle_at is not None:
                watcher.watch(victim)
        give_up = time.time() + scenario.max_idle + GIVE_UP_AFTER
        while time.time() < give_up and any(v.gone_at is None for v in outcome.opened):
            time.sleep(0.05)
        if any(v.gone_at is None for v in outcome.opened):
            outcome.notes.append("gave up waiting for every victim to be gone")
        time.sleep(0.5)  # the last audit events
    finally:
        watcher.close()
        for victim in victims:
            if victim.conn is not None:
                victim.conn.close()
        if daemon is not None:
            proc, log = daemon
            _stop_daemon(proc, outcome)
            log.join(5.0)
            outcome.events, outcome.received = list(log.events), list(log.received)
            outcome.stray_lines = list(log.stray)
        cfg.unlink(missing_ok=True)
        work.rmdir()
    reasons = {
        (e.get("pid"), e.get("application")): e.get("reason")
        for e in outcome.events
        if e.get("event") == "session_reaped" and e.get("result") == "terminated"
    }
    for victim in victims:
        victim.reason = reasons.get((victim.pid, victim.application))
    return outcome


# --------------------------------------------------------------------------- reporting


def percentile(values: Sequence[float], pct: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _by(outcomes: Sequence[Outcome], scenario: Scenario, method: str) -> Outcome:
    return next(o for o in outcomes if o.scenario == scenario and o.method == method)


def table(outcomes: Sequence[Outcome]) -> str:
    head = (
        "| scenario | method | gone | p50 s | p99 s | max s | full polls | polls/min "
        "| signal statements | statements/min | armed reaps |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for o in outcomes:
        late = o.lateness()
        daemon = o.method != "idle_session_timeout"
        armed = sum(bool(v.reason and v.reason.endswith("(armed)")) for v in o.victims)
        cells = [
            o.scenario.name,
            o.method if not daemon else f"{o.method} ({'/'.join(SCHEDULES[o.method])})",
            f"{len(o.gone)}/{len(o.opened)}",
            _fmt(percentile(late, 50)),
            _fmt(percentile(late, 99)),
            _fmt(max(late, default=None)),
            str(o.polls) if daemon else "-",
            _fmt(o.per_minute(o.polls), 1) if daemon else "-",
            str(o.signal_statements) if daemon else "-",
            _fmt(o.per_minute(o.signal_statements), 1) if daemon else "-",
            f"{armed}/{len(o.gone)}" if daemon else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def verdict(outcomes: Sequence[Outcome], scenarios: Sequence[Scenario]) -> tuple[list[str], str]:
    """The ratio lines and one sentence on whether the issue's targets are met (on the 3 s
    scenario, or the first one)."""
    lines = []
    for s in scenarios:
        armed, fixed, server = (_by(outcomes, s, m) for m in METHODS)
        p99 = percentile(armed.lateness(), 99)
        limit = percentile(server.lateness(), 99)
        polls = _ratio(armed.per_minute(armed.polls), fixed.per_minute(fixed.polls))
        lines.append(
            f"- {s.name}: armed p99 lateness {_fmt(p99)} s (target {TARGET_P99:g} s; "
            f"idle_session_timeout {_fmt(limit)} s, armed = {_fmt(_ratio(p99, limit), 1)}x it; "
            f"fixed 1 s {_fmt(percentile(fixed.lateness(), 99))} s); armed full polls per minute "
            f"/ fixed 1 s polling = {_fmt(polls, 2)}x"
        )
    main = next((s for s in scenarios if s.max_idle == 3.0), scenarios[0])
    armed, fixed = _by(outcomes, main, "armed"), _by(outcomes, main, "fixed-1s")
    p99 = percentile(armed.lateness(), 99)
    polls = _ratio(armed.per_minute(armed.polls), fixed.per_minute(fixed.polls))
    every = all(len(o.gone) == len(o.opened) == len(o.victims) for o in outcomes)
    misses = [
        *([] if every else ["not every victim was gone"]),
        *([] if p99 is not None and p99 <= TARGET_P99 else [f"p99 {_fmt(p99)} s"]),
        *([] if polls is not None and polls <= TARGET_POLLS else [f"{_fmt(polls, 2)}x polls"]),
    ]
    if misses:
        return lines, f"Targets NOT met ({main.name}): " + "; ".join(misses) + "."
    return lines, (
        f"Targets met ({main.name}): armed signals' p99 lateness {_fmt(p99)} s "
        f"(<= {TARGET_P99:g} s) with {_fmt(polls, 2)}x the full polls of fixed 1 s polling "
        f"(<= {TARGET_POLLS:g}x)."
    )


def oddities(outcome: Outcome) -> list[str]:
    """Victims never gone, not_due answers, daemon complaints."""
    found = list(outcome.notes)
    found.extend(
        f"{v.application}: could not open: {v.error}" for v in outcome.victims[:5] if v.error
    )
    not_due = sum(
        int(e.get("results", {}).get("not_due", 0))
        for e in outcome.events
        if e.get("event") == "armed_signals_fired"
    )
    if not_due:
        found.append(f"{not_due} armed victim(s) found not yet due by the server (re-armed)")
    found.extend(
        f"daemon {e.get('level')}: {json.dumps(e)}"
        for e in outcome.events
        if e.get("level") in {"warning", "error", "critical"}
    )
    found.extend(f"daemon stderr: {line}" for line in outcome.stray_lines[:10])
    if outcome.method != "idle_session_timeout":
        if outcome.exit_code != 0:
            found.append(f"the daemon exited with code {outcome.exit_code} after SIGTERM")
        if outcome.stop_seconds is not None:
            found.append(f"the daemon stopped {outcome.stop_seconds:.2f} s after SIGTERM")
    return found


# --------------------------------------------------------------------------- main


def _scenario(text: str) -> Scenario:
    try:
        max_idle, sessions, duration = text.split(":")
        scenario = Scenario(float(max_idle), int(sessions), float(duration))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MAX_IDLE:SESSIONS:SECONDS") from exc
    if scenario.max_idle <= 0 or scenario.sessions < 2 or scenario.duration <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: positive numbers, at least 2 sessions")
    return scenario


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--scenarios",
        type=lambda text: [_scenario(t) for t in text.split(",")],
        default=[Scenario(3.0, 40, 40.0), Scenario(60.0, 16, 15.0)],
        help="MAX_IDLE:SESSIONS:SECONDS, comma-separated (3:40:40,60:16:15)",
    )
    parser.add_argument("--major", type=int, default=18, choices=SUPPORTED_MAJORS)
    parser.add_argument("--seed", type=int, default=1, help="for the sessions' start moments")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    outcomes: list[Outcome] = []
    biggest = max(s.sessions for s in args.scenarios)
    print(f"starting PostgreSQL {args.major} ...", file=sys.stderr)
    with EmbeddedPostgres(
        major=args.major, settings={"max_connections": str(max(100, biggest + 20))}
    ) as pg:
        info = common.machine(pg)
        load_before = common.load_average()
        for scenario in args.scenarios:
            offsets = [rng.uniform(0.0, scenario.duration) for _ in range(scenario.sessions)]
            for method in METHODS:
                print(f"{scenario.name}: {method} ...", file=sys.stderr)
                outcomes.append(run_method(pg, scenario, method, offsets=offsets))
    info.append(
        f"- load average (1/5/15 min) before the first method: {load_before}; "
        f"after the last: {common.load_average()}"
    )
    body = table(outcomes)
    ratios, sentence = verdict(outcomes, args.scenarios)
    common.print_report(info, body, ratios, sentence)
    notes = {f"{o.scenario.name}, {o.method}": oddities(o) for o in outcomes}
    for name, lines in notes.items():
        print(f"\n{name}:")
        for line in lines or ["nothing odd"]:
            print(f"  - {line}")
    if not args.no_record:
        _record(args, info=info, body=body, ratios=ratios, sentence=sentence, notes=notes)
    return 0


def _record(
    args: argparse.Namespace,
    *,
    info: list[str],
    body: str,
    ratios: list[str],
    sentence: str,
    notes: dict[str, list[str]],
) -> None:
    scenarios = "; ".join(
        f"{s.name}: {s.sessions} sessions starting within {s.duration:g} s" for s in args.scenarios
    )
    common.append_results(
        title="reaction latency: armed signals vs fixed 1 s polling vs idle_session_timeout",
        info=info,
        workload=(
            f"{scenarios} (seed {args.seed}), the same moments for each method; each session "
            "connects, runs `SELECT 1` and stays idle (with idle_session_timeout: `SET "
            'idle_session_timeout` first). One policy `states = ["idle"]`, the scenario\'s '
            "`max_idle`. Lateness: when the victim's socket turned readable (the server's FATAL "
            "and close) minus (its `SELECT 1` returning + max_idle). Polls and signal statements "
            "(armed firings + polls that signalled) from the first session's start to the last "
            "victim gone."
        ),
        body=body,
        ratios=ratios,
        sentence=sentence,
        more=[
            "Notes from the run (victims never gone, not_due answers, daemon warnings):",
            "",
            *(
                f"- {name}: {line}"
                for name, lines in notes.items()
                for line in (lines or ["nothing odd"])
            ),
            "",
        ],
    )


if __name__ == "__main__":
    common.run(main, stopped="the server, sessions and daemon")
