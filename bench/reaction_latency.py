"""How soon after a session becomes eligible does `pg-reaper run` terminate it, and at what cost?

On one throwaway PostgreSQL server this runs the daemon twice, one schedule after the other:

- deadline: ``interval = "30s"``, ``min_interval = "1s"`` (the daemon's deadline scheduling);
- fixed:    ``interval = "1s"``,  ``min_interval = "1s"`` (the baseline: poll every second).

Both reap with one policy, ``states = ["idle"]``, ``max_idle = "5s"``. For each schedule the
same N sessions connect at random moments spread over the run, run ``SELECT 1`` and then stay idle,
so they cross ``max_idle`` at random times relative to the polls.

Lateness of a victim, two ways:

- server: ``idle_seconds`` of its ``session_reaped`` event minus 5 s, by the server's clock at the
  poll that reaped it (how long after eligibility that poll ran);
- observed: wall time from its ``SELECT 1`` returning + 5 s until an observer connection, polling
  pg_stat_activity every 20 ms, sees its pid gone (adds the signal, the backend's exit and up to
  one observer period).

Polls: ``poll_completed`` events from the first session's start until the poll that reaped the
last victim. The daemon, the server and every session are stopped on exit, on Ctrl-C and on
SIGTERM.

    .venv/bin/python bench/reaction_latency.py [--sessions N] [--duration S] [--major M]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
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

MAX_IDLE = 5.0
MIN_INTERVAL = 1.0
TARGET_P99 = 1.5
SERVER = "bench"
OBSERVER_PERIOD = 0.02
FIRST_POLL_TIMEOUT = 30.0
GIVE_UP_AFTER = 30.0  # seconds past --duration
GONE_GRACE = 3.0  # after the last reap, for the observer to see the last pids go
STOP_TIMEOUT = 15.0  # the design promises an exit within 10 s of SIGTERM


@dataclass(frozen=True)
class Schedule:
    name: str
    interval: str
    min_interval: str


SCHEDULES = (
    Schedule("deadline", interval="30s", min_interval="1s"),
    Schedule("fixed-1s", interval="1s", min_interval="1s"),
)


@dataclass
class Victim:
    application: str
    offset: float  # planned start, seconds after the schedule's start
    conn: psycopg.Connection[TupleRow] | None = None
    pid: int | None = None
    idle_at: float | None = None  # wall clock just after its SELECT 1 returned
    gone_at: float | None = None  # wall clock when the observer first missed it
    idle_seconds: float | None = None  # from its session_reaped event
    reaped_at: float | None = None  # when its session_reaped event arrived
    error: str | None = None

    @property
    def eligible_at(self) -> float | None:
        return None if self.idle_at is None else self.idle_at + MAX_IDLE

    @property
    def server_lateness(self) -> float | None:
        return None if self.idle_seconds is None else self.idle_seconds - MAX_IDLE

    @property
    def observed_lateness(self) -> float | None:
        if self.gone_at is None or self.eligible_at is None:
            return None
        return self.gone_at - self.eligible_at


@dataclass(frozen=True)
class Event:
    received: float
    fields: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.fields.get("event", ""))


@dataclass
class Outcome:
    schedule: Schedule
    victims: list[Victim]
    events: list[Event]
    started: float
    window_end: float | None = None  # the poll that reaped the last victim
    polls: int = 0
    exit_code: int | None = None
    stop_seconds: float | None = None
    stray_lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def window(self) -> float | None:
        return None if self.window_end is None else self.window_end - self.started

    @property
    def polls_per_minute(self) -> float | None:
        window = self.window
        return None if not window else self.polls * 60.0 / window

    @property
    def reaped(self) -> list[Victim]:
        return [v for v in self.victims if v.idle_seconds is not None]


# --------------------------------------------------------------------------- the daemon's log


class DaemonLog:
    """Reads the daemon's stderr (JSON lines) in a thread; anything else is kept as stray text."""

    def __init__(self, stream: IO[str]) -> None:
        self.events: list[Event] = []
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
                    self.events.append(Event(received, fields))
                elif line.strip():
                    self.stray.append(line.rstrip())
                self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[Event]], bool], *, until: float) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: predicate(self.events), timeout=max(0.0, until - time.time())
            )

    def snapshot(self) -> list[Event]:
        with self._changed:
            return list(self.events)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _is_poll(event: Event) -> bool:
    return event.name == "poll_completed" and event.fields.get("server") == SERVER


def _reap_key(event: Event) -> tuple[Any, Any] | None:
    fields = event.fields
    if (
        event.name == "session_reaped"
        and fields.get("server") == SERVER
        and fields.get("result") == "terminated"
    ):
        return fields.get("pid"), fields.get("application")
    return None


# --------------------------------------------------------------------------- the observer


class Observer:
    """Polls pg_stat_activity every OBSERVER_PERIOD and notes when each watched victim is gone."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True, application_name="bench-observer")
        self._watched: dict[tuple[int, str], Victim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)
        self._thread.start()

    def watch(self, victim: Victim) -> None:
        assert victim.pid is not None
        with self._lock:
            self._watched[victim.pid, victim.application] = victim

    def _run(self) -> None:
        query = (
            "SELECT pid, application_name FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND application_name LIKE 'bench-%'"
        )
        try:
            while not self._stop.is_set():
                with self._lock:
                    watched = dict(self._watched)
                present = {(int(pid), str(app)) for pid, app in self._conn.execute(query)}
                seen = time.time()
                with self._lock:
                    for key, victim in watched.items():
                        if key not in present:
                            victim.gone_at = seen
                            del self._watched[key]
                self._stop.wait(OBSERVER_PERIOD)
        except psycopg.Error as exc:
            self.error = f"{type(exc).__name__}: {exc}".strip()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._conn.close()


# --------------------------------------------------------------------------- one schedule


def _config(pg: EmbeddedPostgres, schedule: Schedule, sessions: int) -> dict[str, Any]:
    return {
        "reaper": {
            "interval": schedule.interval,
            "min_interval": schedule.min_interval,
            "max_terminations_per_cycle": max(1000, 10 * sessions),
        },
        "metrics": {"listen": ""},
        "log": {"format": "json", "level": "info"},
        "servers": [{"name": SERVER, "dsn": pg.dsn()}],
        "policies": [{"name": "idle", "states": ["idle"], "max_idle": f"{MAX_IDLE:g}s"}],
    }


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


def _open_victim(pg: EmbeddedPostgres, victim: Victim, observer: Observer) -> None:
    try:
        victim.conn = psycopg.connect(
            pg.dsn(), autocommit=True, application_name=victim.application
        )
        victim.pid = victim.conn.info.backend_pid
        victim.conn.execute("SELECT 1")
        victim.idle_at = time.time()
    except psycopg.Error as exc:
        victim.error = f"{type(exc).__name__}: {exc}".strip()
        return
    observer.watch(victim)


def _all_reaped(victims: list[Victim]) -> Callable[[list[Event]], bool]:
    wanted = {(v.pid, v.application) for v in victims if v.idle_at is not None}

    def check(events: list[Event]) -> bool:
        return wanted <= {_reap_key(e) for e in events}

    return check


def run_schedule(
    pg: EmbeddedPostgres, schedule: Schedule, *, offsets: Sequence[float], duration: float
) -> Outcome:
    work = Path(tempfile.mkdtemp(prefix="pg-reaper-bench-"))
    cfg = work / "config.toml"
    cfg.write_text(tomli_w.dumps(_config(pg, schedule, len(offsets))))
    cfg.chmod(0o600)
    victims = [
        Victim(application=f"bench-{schedule.name}-{i:03d}", offset=offset)
        for i, offset in enumerate(sorted(offsets))
    ]
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
    outcome = Outcome(schedule=schedule, victims=victims, events=[], started=time.time())
    observer: Observer | None = None
    try:
        if not log.wait_for(
            lambda events: any(map(_is_poll, events)), until=time.time() + FIRST_POLL_TIMEOUT
        ):
            tail = "\n".join(log.stray[-20:]) or "(no output)"
            raise RuntimeError(f"{schedule.name}: the daemon never completed a poll:\n{tail}")
        observer = Observer(pg.dsn())
        outcome.started = started = time.time()
        give_up = started + duration + GIVE_UP_AFTER
        for victim in victims:
            time.sleep(max(0.0, started + victim.offset - time.time()))
            if proc.poll() is not None:
                raise RuntimeError(f"{schedule.name}: the daemon exited ({proc.returncode})")
            _open_victim(pg, victim, observer)
        if not log.wait_for(_all_reaped(victims), until=give_up):
            outcome.notes.append(f"gave up waiting for every victim after {duration:g} s + 30 s")
        deadline = min(give_up, time.time() + GONE_GRACE)
        while time.time() < deadline and any(
            v.gone_at is None for v in victims if v.idle_at is not None
        ):
            time.sleep(OBSERVER_PERIOD)
        if observer.error:
            outcome.notes.append(f"the observer failed: {observer.error}")
    finally:
        if observer is not None:
            observer.close()
        for victim in victims:
            if victim.conn is not None:
                victim.conn.close()
        _stop_daemon(proc, outcome)
        log.join(5.0)
        cfg.unlink(missing_ok=True)
        work.rmdir()
    outcome.events = log.snapshot()
    outcome.stray_lines = list(log.stray)
    _tally(outcome)
    return outcome


def _tally(outcome: Outcome) -> None:
    """Attach each reap to its victim; count the polls up to the one that reaped the last."""
    by_key = {(v.pid, v.application): v for v in outcome.victims if v.idle_at is not None}
    last_reap = None
    for index, event in enumerate(outcome.events):
        key = _reap_key(event)
        victim = None if key is None else by_key.get(key)
        if victim is not None and victim.idle_seconds is None:
            victim.idle_seconds = float(event.fields["idle_seconds"])
            victim.reaped_at = event.received
            last_reap = index
    if last_reap is None or len(outcome.reaped) < len(by_key):
        return
    closing = next((e for e in outcome.events[last_reap:] if _is_poll(e)), None)
    if closing is None:
        return
    outcome.window_end = closing.received
    outcome.polls = sum(
        outcome.started <= e.received <= closing.received for e in outcome.events if _is_poll(e)
    )


# --------------------------------------------------------------------------- what was odd


def _poll_times(outcome: Outcome) -> list[tuple[float, float]]:
    """(start, end) of each poll, by wall clock: its event's arrival minus its duration."""
    return [
        (e.received - float(e.fields.get("duration_ms", 0.0)) / 1000.0, e.received)
        for e in outcome.events
        if _is_poll(e)
    ]


def _is_deadline(schedule: Schedule) -> bool:
    return schedule.interval != schedule.min_interval


def _due_after(outcome: Outcome, start: float, end: float) -> float:
    """The delay the schedule should choose after the poll that ran from `start` to `end`."""
    if not _is_deadline(outcome.schedule):
        return MIN_INTERVAL
    left = [
        max(0.0, v.eligible_at - start)
        for v in outcome.victims
        if v.idle_at is not None
        and v.eligible_at is not None
        and v.idle_at < start
        and (v.reaped_at is None or v.reaped_at > end)
    ]
    delay = min(MAX_IDLE, min(left) + 0.05) if left else MAX_IDLE
    return max(MIN_INTERVAL, delay)


def _gap_oddities(outcome: Outcome, polls: list[tuple[float, float]]) -> list[str]:
    """Polls more than 0.1 s later or earlier than the schedule should have made them."""
    off = [
        (a - outcome.started, (b - a) - _due_after(outcome, a, a_end), b - a)
        for (a, a_end), (b, _) in itertools.pairwise(polls)
    ]
    late = [o for o in off if abs(o[1]) > 0.1]
    found = [
        f"poll at +{at + gap:.2f} s came {dev:+.3f} s off its due time (gap {gap:.3f} s)"
        for at, dev, gap in late[:10]
    ]
    if len(late) > 10:
        found.append(f"... {len(late) - 10} more polls more than 0.1 s off their due time")
    if off:
        devs = [dev for _, dev, _ in off]
        found.append(
            f"{len(off)} poll gaps: deviation from due time min {min(devs):+.3f} s, "
            f"median {statistics.median(devs):+.3f} s, max {max(devs):+.3f} s"
        )
    return found


def _victim_oddities(outcome: Outcome, polls: list[tuple[float, float]]) -> list[str]:
    """Victims reaped later than min_interval allows, and polls that came just too early."""
    found = []
    near = []
    for victim in outcome.reaped:
        eligible, lateness = victim.eligible_at, victim.server_lateness
        assert eligible is not None
        assert lateness is not None
        if lateness > MIN_INTERVAL + 0.1:
            found.append(
                f"{victim.application}: reaped {lateness:.3f} s after eligibility "
                "(> min_interval + 0.1 s)"
            )
        # A poll ran just before it crossed max_idle, so it waited min_interval for the next.
        if (
            _is_deadline(outcome.schedule)
            and lateness > 0.5
            and any(eligible - 0.15 < begin <= eligible for begin, _ in polls)
        ):
            near.append(lateness)
    if near:
        found.append(
            f"{len(near)} victim(s) missed by a poll that started < 0.15 s before they became "
            f"eligible, then waited for the next (lateness {min(near):.3f}-{max(near):.3f} s)"
        )
    unreaped = [v for v in outcome.victims if v.idle_at is not None and v.idle_seconds is None]
    if unreaped:
        found.append(f"{len(unreaped)} victim(s) never reaped")
    failed = [v for v in outcome.victims if v.error]
    found.extend(f"{v.application}: could not open: {v.error}" for v in failed[:5])
    return found


def _daemon_oddities(outcome: Outcome) -> list[str]:
    found = [
        f"daemon {e.fields.get('level')}: {json.dumps(e.fields)}"
        for e in outcome.events
        if e.fields.get("level") in {"warning", "error", "critical"}
    ]
    found.extend(f"daemon stderr: {line}" for line in outcome.stray_lines[:10])
    if outcome.exit_code != 0:
        found.append(f"the daemon exited with code {outcome.exit_code} after SIGTERM")
    if outcome.stop_seconds is not None:
        slow = " (the design promises 10 s)" if outcome.stop_seconds > 10.0 else ""
        found.append(
            f"the daemon stopped {outcome.stop_seconds:.2f} s after SIGTERM, "
            f"exit code {outcome.exit_code}{slow}"
        )
    return found


def oddities(outcome: Outcome) -> list[str]:
    """Polls later (or earlier) than the schedule promises, near misses, daemon complaints."""
    polls = [p for p in _poll_times(outcome) if p[1] >= outcome.started]
    return [
        *outcome.notes,
        *_gap_oddities(outcome, polls),
        *_victim_oddities(outcome, polls),
        *_daemon_oddities(outcome),
    ]


# --------------------------------------------------------------------------- reporting


def percentile(values: Sequence[float], pct: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _lateness(outcome: Outcome, kind: str) -> list[float]:
    values = (
        v.server_lateness if kind == "server" else v.observed_lateness for v in outcome.victims
    )
    return [x for x in values if x is not None]


def table(outcomes: Sequence[Outcome]) -> str:
    head = (
        "| schedule | victims | p50 s | p99 s | max s | observed p50 s | observed p99 s "
        "| observed max s | polls | window s | polls/min |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for o in outcomes:
        server, observed = _lateness(o, "server"), _lateness(o, "observed")
        opened = sum(v.idle_at is not None for v in o.victims)
        cells = [
            f"{o.schedule.name} ({o.schedule.interval}/{o.schedule.min_interval})",
            f"{len(o.reaped)}/{opened}",
            _fmt(percentile(server, 50)),
            _fmt(percentile(server, 99)),
            _fmt(max(server, default=None)),
            _fmt(percentile(observed, 50)),
            _fmt(percentile(observed, 99)),
            _fmt(max(observed, default=None)),
            str(o.polls),
            _fmt(o.window, 1),
            _fmt(o.polls_per_minute, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _p99(outcome: Outcome) -> tuple[float | None, bool]:
    """p99 lateness: as observed when every victim was observed, else by the server's clock."""
    observed = _lateness(outcome, "observed")
    complete = len(observed) == len(outcome.victims) and not outcome.notes
    return percentile(observed if complete else _lateness(outcome, "server"), 99), complete


def verdict(deadline: Outcome, fixed: Outcome) -> tuple[list[str], str]:
    """The ratio lines and one sentence on whether the issue's targets are met."""
    p99, complete = _p99(deadline)
    fixed_p99, _ = _p99(fixed)
    kind = "observed" if complete else "server-clock"
    poll_ratio = deadline.polls / fixed.polls if fixed.polls else None
    ppm_d, ppm_f = deadline.polls_per_minute, fixed.polls_per_minute
    rate_ratio = ppm_d / ppm_f if ppm_d is not None and ppm_f else None
    target_ratio = None if p99 is None else p99 / TARGET_P99
    lines = [
        (
            f"- deadline p99 lateness ({kind}) vs target {TARGET_P99:g} s: "
            f"{_fmt(p99)} s = {_fmt(target_ratio, 2)} x target"
        ),
        (
            f"- deadline polls / fixed 1 s polls: {deadline.polls} / {fixed.polls} = "
            f"{_fmt(poll_ratio, 2)} (per minute: {_fmt(rate_ratio, 2)})"
        ),
    ]
    every = all(len(o.reaped) == len(o.victims) for o in (deadline, fixed))
    latency_ok = p99 is not None and p99 <= TARGET_P99
    polls_ok = poll_ratio is not None and poll_ratio < 1.0
    if every and latency_ok and polls_ok:
        sentence = (
            f"Targets met: with interval 30s / min_interval 1s the p99 lateness was "
            f"{_fmt(p99)} s (<= {TARGET_P99:g} s; fixed 1 s polling: {_fmt(fixed_p99)} s) "
            f"using {_fmt(poll_ratio, 2)}x the polls of fixed 1 s polling."
        )
    else:
        misses = [
            *([] if every else ["not every victim was reaped"]),
            *([] if latency_ok else [f"p99 lateness {_fmt(p99)} s > {TARGET_P99:g} s"]),
            *([] if polls_ok else [f"{_fmt(poll_ratio, 2)}x the polls of fixed 1 s polling"]),
        ]
        sentence = "Targets NOT met: " + "; ".join(misses) + "."
    return lines, sentence


def append_results(
    *,
    info: list[str],
    args: argparse.Namespace,
    body: str,
    ratios: list[str],
    sentence: str,
    notes: dict[str, list[str]],
) -> None:
    common.append_results(
        title="reaction latency, deadline scheduling vs fixed 1 s polling",
        info=info,
        workload=(
            f"{args.sessions} sessions per schedule, each connecting and running "
            f"`SELECT 1` at a random moment (seed {args.seed}) within {args.duration:g} s, "
            f'then idle; one policy `states = ["idle"]`, `max_idle = "{MAX_IDLE:g}s"`. '
            "Lateness is seconds after eligibility: by the server's clock at the reaping poll "
            f"(`idle_seconds` - {MAX_IDLE:g}), and as observed (pid gone from "
            f"pg_stat_activity, {OBSERVER_PERIOD * 1000:g} ms observer)."
        ),
        body=body,
        ratios=ratios,
        sentence=sentence,
        more=[
            (
                "Notes from the run (polls off their due time by more than 0.1 s, late victims, "
                "daemon warnings):"
            ),
            "",
            *(
                f"- {name}: {line}"
                for name, lines in notes.items()
                for line in (lines or ["nothing odd"])
            ),
            "",
        ],
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=60, help="sessions per schedule (60)")
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds over which they start (60)"
    )
    parser.add_argument("--major", type=int, default=18, choices=SUPPORTED_MAJORS)
    parser.add_argument("--seed", type=int, default=1, help="for the sessions' start moments")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.sessions < 2 or args.duration <= 0:
        parser.error("--sessions must be at least 2 and --duration positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    offsets = [rng.uniform(0.0, args.duration) for _ in range(args.sessions)]
    outcomes: list[Outcome] = []
    print(f"starting PostgreSQL {args.major} ...", file=sys.stderr)
    with EmbeddedPostgres(
        major=args.major, settings={"max_connections": str(max(100, args.sessions + 20))}
    ) as pg:
        info = common.machine(pg)
        load_before = common.load_average()
        for schedule in SCHEDULES:
            print(
                f"{schedule.name}: interval {schedule.interval}, min_interval "
                f"{schedule.min_interval}; {args.sessions} sessions over {args.duration:g} s ...",
                file=sys.stderr,
            )
            outcomes.append(run_schedule(pg, schedule, offsets=offsets, duration=args.duration))
    info.append(
        f"- load average (1/5/15 min) before the first schedule: {load_before}; "
        f"after the last: {common.load_average()}"
    )
    body = table(outcomes)
    ratios, sentence = verdict(outcomes[0], outcomes[1])
    common.print_report(info, body, ratios, sentence)
    notes = {o.schedule.name: oddities(o) for o in outcomes}
    for name, lines in notes.items():
        print(f"\n{name}:")
        for line in lines or ["nothing odd"]:
            print(f"  - {line}")
    if not args.no_record:
        append_results(
            info=info, args=args, body=body, ratios=ratios, sentence=sentence, notes=notes
        )
    return 0


if __name__ == "__main__":
    common.run(main, stopped="the server, sessions and daemon")
