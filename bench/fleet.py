"""What does one `pg-reaper run` cost when it watches a fleet of real servers, and does it keep
their schedule?

It starts `--servers` tiny PostgreSQL clusters (1,000 by default; bench/fleet_servers.py: one
initdb, copied per server, the smallest settings that run, Unix socket only), each with
`--sessions` idle sessions (``application_name = 'bench-fleet'``; never eligible: the policy reaps
after 1 h idle), and runs two daemons side by side over the same window:

- fleet: one ``[[servers]]`` entry per cluster, every entry with ``interval = "10s"``: no two
  entries share a cluster, so pg-reaper's arbiter refuses none (a refusal is a warning, counted);
- baseline: the same configuration with 1 server entry.

After every entry of the fleet has completed its first poll and a short settling time, the window
opens for ``--duration`` seconds (300 by default). Over the window, per daemon:

- CPU: utime + stime from /proc/<pid>/stat, as a share of one core; per poll, and per session
  polled (the sessions each `poll_completed` event counts: the idle ones and the reaper's own);
- RSS: VmRSS at the start and the end of the window, its maximum and VmHWM (the peak); threads;
- on time: from the ``poll_completed`` events (their own timestamps), per entry the gap to the
  previous poll of the same entry; a poll is on time when that gap is at most interval + 1 s.
  An entry whose last poll is more than interval + 1 s before the end of the window counts a
  late poll too.

Targets: fleet < 10 % of a core, RSS < 150 MB, 100 % of polls on time. The ratios against the
1-entry baseline give the cost per added server entry. The per-session cost before and after a
change is bench/session_cost.py's. The daemons, the sessions and the servers are stopped on exit,
on errors, on Ctrl-C and on SIGTERM.

    .venv/bin/python bench/fleet.py [--duration 300] [--servers 1000] [--sessions 2] [--jobs 4]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

import common
import tomli_w
from fleet_servers import TinyFleet, mem_available_mb

from reaper.demo.embedded import SUPPORTED_MAJORS

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from reaper.demo.embedded import EmbeddedPostgres

INTERVAL = 10.0
SLACK = 1.0  # a poll is on time within INTERVAL + SLACK of the previous one
APPLICATION = "bench-fleet"
TARGET_CPU = 0.10
TARGET_RSS_MB = 150.0
TARGET_ON_TIME = 1.0
SETTLE = 15.0  # seconds after the last first poll before the window opens
FIRST_ROUND_TIMEOUT = 120.0
SAMPLE_PERIOD = 5.0
STOP_TIMEOUT = 15.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- a daemon


@dataclass(frozen=True)
class Poll:
    entry: str
    at: float  # the event's own timestamp (epoch seconds)
    duration_ms: float
    sessions: int  # what the poll saw


@dataclass
class Usage:
    cpu_seconds: float
    at: float
    rss_kb: int
    hwm_kb: int
    threads: int


def read_usage(pid: int) -> Usage:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Fields after the command: state is index 0, utime index 11, stime index 12.
    cpu = (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
    status: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return Usage(
        cpu_seconds=cpu,
        at=time.monotonic(),
        rss_kb=int(status["VmRSS"].split()[0]),
        hwm_kb=int(status["VmHWM"].split()[0]),
        threads=int(status["Threads"]),
    )


class Daemon:
    """`python -m reaper run -c FILE`, its stderr read as JSON lines in a thread."""

    def __init__(self, name: str, config: Path) -> None:
        self.name = name
        self.polls: list[Poll] = []
        self.odd: list[str] = []  # warnings, errors and non-JSON lines, as they came
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reaper", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=common.daemon_env(),
        )
        assert self.proc.stderr is not None
        self._thread = threading.Thread(
            target=self._read, args=(self.proc.stderr,), name=f"log-{name}", daemon=True
        )
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                fields = json.loads(line)
            except ValueError:
                fields = None
            with self._changed:
                if not isinstance(fields, dict):
                    if line.strip():
                        self.odd.append(line.rstrip())
                elif fields.get("event") == "poll_completed":
                    self.polls.append(
                        Poll(
                            entry=str(fields.get("server")),
                            at=datetime.fromisoformat(str(fields["timestamp"])).timestamp(),
                            duration_ms=float(fields.get("duration_ms", 0.0)),
                            sessions=int(fields.get("sessions", 0)),
                        )
                    )
                elif fields.get("level") in {"warning", "error", "critical"}:
                    self.odd.append(json.dumps(fields))
                self._changed.notify_all()

    def wait_for(self, predicate: Callable[[Daemon], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout=timeout)

    @property
    def lock(self) -> threading.Condition:
        return self._changed

    def polled_entries(self) -> set[str]:
        return {p.entry for p in self.polls}

    def usage(self) -> Usage:
        return read_usage(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            asked = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
                self.stop_seconds = time.monotonic() - asked
            except subprocess.TimeoutExpired:
                self.odd.append(f"ignored SIGTERM for {STOP_TIMEOUT:g} s: killed")
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        self._thread.join(5.0)


def write_config(path: Path, servers: Sequence[EmbeddedPostgres]) -> None:
    config = {
        "reaper": {"interval": "30s"},
        "metrics": {"listen": f"127.0.0.1:{common.free_port()}"},
        "log": {"format": "json", "level": "info"},
        "servers": [
            {"name": f"pg{i:04d}", "dsn": pg.dsn(), "interval": f"{INTERVAL:g}s"}
            for i, pg in enumerate(servers)
        ],
        "policies": [
            {"name": "idle", "states": ["idle"], "max_idle": "1h"},
            {
                "name": "stuck-transactions",
                "states": ["idle in transaction", "idle in transaction (aborted)"],
                "max_idle": "1h",
            },
        ],
    }
    path.write_text(tomli_w.dumps(config))
    path.chmod(0o600)


# --------------------------------------------------------------------------- the window


@dataclass
class Measured:
    name: str
    entries: int
    window: float = 0.0
    cpu_seconds: float = 0.0
    rss_start_kb: int = 0
    rss_kb: int = 0
    hwm_kb: int = 0
    rss_max_kb: int = 0
    rss_series: list[tuple[float, int]] = field(default_factory=list)  # (seconds in, VmRSS kB)
    threads: int = 0
    polls: int = 0
    gaps: list[float] = field(default_factory=list)
    late: int = 0
    silent_entries: list[str] = field(default_factory=list)  # no poll at all in the window
    poll_ms: list[float] = field(default_factory=list)
    sessions_polled: int = 0
    notes: list[str] = field(default_factory=list)
    late_tails: int = 0  # entries whose last poll came too long before the window's end

    @property
    def cpu_share(self) -> float:
        return self.cpu_seconds / self.window if self.window else 0.0

    @property
    def cpu_per_poll_ms(self) -> float | None:
        return self.cpu_seconds * 1000 / self.polls if self.polls else None

    @property
    def cpu_per_session_us(self) -> float | None:
        return self.cpu_seconds * 1e6 / self.sessions_polled if self.sessions_polled else None

    @property
    def on_time(self) -> float:
        judged = len(self.gaps) + self.late_tails
        return (judged - self.late) / judged if judged else 0.0


def tally(daemon: Daemon, measured: Measured, start: float, end: float, names: list[str]) -> None:
    """The polls of each entry within [start, end] (epoch seconds), and their gaps."""
    by_entry: dict[str, list[float]] = {name: [] for name in names}
    before: dict[str, float] = {}
    for poll in daemon.polls:
        if poll.at < start:
            before[poll.entry] = max(before.get(poll.entry, 0.0), poll.at)
        elif poll.at <= end:
            by_entry.setdefault(poll.entry, []).append(poll.at)
            measured.poll_ms.append(poll.duration_ms)
            measured.sessions_polled += poll.sessions
    limit = INTERVAL + SLACK
    for name, times in by_entry.items():
        times.sort()
        measured.polls += len(times)
        previous = before.get(name)
        series = ([previous] if previous is not None else []) + times
        gaps = [b - a for a, b in itertools.pairwise(series)]
        measured.gaps.extend(gaps)
        measured.late += sum(g > limit for g in gaps)
        last = series[-1] if series else None
        if last is None:
            measured.silent_entries.append(name)
        if last is None or end - last > limit:
            measured.late_tails += 1
            measured.late += 1


def run_window(
    fleet: Daemon, base: Daemon, *, duration: float, entries: dict[str, list[str]]
) -> list[Measured]:
    daemons = (fleet, base)
    results = [Measured(d.name, len(entries[d.name])) for d in daemons]
    first = [d.usage() for d in daemons]
    start_wall, started = time.time(), time.monotonic()
    print(f"window: {duration:g} s ...", file=sys.stderr)
    while (left := started + duration - time.monotonic()) > 0:
        time.sleep(min(SAMPLE_PERIOD, left))
        for daemon, result in zip(daemons, results, strict=True):
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"the {daemon.name} daemon exited ({daemon.proc.returncode})")
            rss = daemon.usage().rss_kb
            result.rss_max_kb = max(result.rss_max_kb, rss)
            result.rss_series.append((time.monotonic() - started, rss))
    last = [d.usage() for d in daemons]
    end_wall = time.time()
    # Events of polls that ended just before the window closed may still be in the pipe.
    time.sleep(1.0)
    for daemon, result, a, b in zip(daemons, results, first, last, strict=True):
        result.window = b.at - a.at
        result.cpu_seconds = b.cpu_seconds - a.cpu_seconds
        result.rss_kb, result.hwm_kb, result.threads = b.rss_kb, b.hwm_kb, b.threads
        result.rss_start_kb = a.rss_kb
        with daemon.lock:  # the reader thread appends under it
            tally(daemon, result, start_wall, end_wall, entries[daemon.name])
    return results


# --------------------------------------------------------------------------- reporting


def _pct(values: Sequence[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(results: Sequence[Measured]) -> str:
    head = (
        "| daemon | entries | window s | CPU % of a core | RSS MB (start) | RSS MB (end) "
        "| RSS max MB | VmHWM MB "
        "| threads | polls | sessions per poll | CPU ms per poll | CPU µs per session polled "
        "| on time | gap p50 s | gap p99 s | gap max s | poll ms p50 | poll ms p99 |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        cells = [
            r.name,
            str(r.entries),
            _f(r.window, 1),
            _f(r.cpu_share * 100),
            _f(r.rss_start_kb / 1024, 1),
            _f(r.rss_kb / 1024, 1),
            _f(r.rss_max_kb / 1024, 1),
            _f(r.hwm_kb / 1024, 1),
            str(r.threads),
            str(r.polls),
            _f(r.sessions_polled / r.polls if r.polls else None, 1),
            _f(r.cpu_per_poll_ms, 3),
            _f(r.cpu_per_session_us, 1),
            f"{r.on_time * 100:.2f} % ({r.late} late)",
            _f(_pct(r.gaps, 50), 3),
            _f(_pct(r.gaps, 99), 3),
            _f(max(r.gaps, default=None), 3),
            _f(_pct(r.poll_ms, 50), 1),
            _f(_pct(r.poll_ms, 99), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(fleet: Measured, base: Measured) -> tuple[list[str], str]:
    added = max(fleet.entries - base.entries, 1)
    cpu_ratio = fleet.cpu_share / base.cpu_share if base.cpu_share else None
    rss_ratio = fleet.rss_kb / base.rss_kb if base.rss_kb else None
    per_cpu_ms = (fleet.cpu_share - base.cpu_share) * 1000 / added
    per_rss_kb = (fleet.rss_kb - base.rss_kb) / added
    polls_per_s = fleet.polls / fleet.window if fleet.window else 0.0
    cpu_per_poll = fleet.cpu_per_poll_ms
    lines = [
        (
            f"- CPU: fleet {fleet.cpu_share * 100:.2f} % / baseline "
            f"{base.cpu_share * 100:.2f} % of a core = {_f(cpu_ratio, 1)}x; "
            f"{per_cpu_ms:.3f} ms of CPU per second per added entry; "
            f"{_f(cpu_per_poll, 2)} ms of CPU per poll ({polls_per_s:.1f} polls/s, "
            f"{_f(fleet.cpu_per_session_us, 1)} µs per session polled, fixed costs included); "
            f"target < {TARGET_CPU * 100:g} %: {fleet.cpu_share / TARGET_CPU:.2f}x the target"
        ),
        (
            f"- RSS: fleet {fleet.rss_kb / 1024:.1f} MB / baseline {base.rss_kb / 1024:.1f} MB = "
            f"{_f(rss_ratio)}x; {per_rss_kb:.1f} KB per added entry; "
            f"target < {TARGET_RSS_MB:g} MB: {fleet.rss_kb / 1024 / TARGET_RSS_MB:.2f}x the target"
        ),
        (
            f"- on time (gap <= {INTERVAL + SLACK:g} s): fleet {fleet.on_time * 100:.2f} %, "
            f"baseline {base.on_time * 100:.2f} %; target {TARGET_ON_TIME * 100:g} %"
        ),
    ]
    misses = []
    if fleet.cpu_share >= TARGET_CPU:
        misses.append(f"CPU {fleet.cpu_share * 100:.2f} % of a core (target < 10 %)")
    if fleet.rss_kb / 1024 >= TARGET_RSS_MB:
        misses.append(f"RSS {fleet.rss_kb / 1024:.1f} MB (target < {TARGET_RSS_MB:g} MB)")
    if fleet.on_time < TARGET_ON_TIME:
        misses.append(f"{fleet.late} late polls ({fleet.on_time * 100:.2f} % on time)")
    if misses:
        sentence = f"Targets NOT met for {fleet.entries} entries: " + "; ".join(misses) + "."
    else:
        sentence = (
            f"Targets met for {fleet.entries} entries: {fleet.cpu_share * 100:.2f} % of a core, "
            f"{fleet.rss_kb / 1024:.1f} MB RSS, every poll on time."
        )
    return lines, sentence


def _rss_trend(result: Measured) -> str:
    """VmRSS about every minute of the window, and how much it grew in each half."""
    series = [(0.0, result.rss_start_kb), *result.rss_series]
    shown, next_at = [], 0.0
    for at, rss in series:
        if at >= next_at:
            shown.append(f"{at:.0f} s {rss / 1024:.1f}")
            next_at = at + 60.0 - SAMPLE_PERIOD / 2
    half = result.window / 2
    middle = min(series, key=lambda point: abs(point[0] - half))[1]
    first_half = (middle - result.rss_start_kb) / 1024
    second_half = (result.rss_kb - middle) / 1024
    return (
        f"VmRSS MB over the window: {', '.join(shown)}; grew {first_half:+.1f} MB in the first "
        f"half, {second_half:+.1f} MB in the second"
    )


def notes(daemons: Sequence[Daemon], results: Sequence[Measured]) -> list[str]:
    found: list[str] = []
    for daemon, result in zip(daemons, results, strict=True):
        found.extend(f"{daemon.name}: {n}" for n in result.notes)
        found.append(f"{daemon.name}: {_rss_trend(result)}")
        if result.silent_entries:
            found.append(
                f"{daemon.name}: {len(result.silent_entries)} entries never polled in the window"
            )
        kinds: dict[str, int] = {}
        for line in daemon.odd:
            key = line[:160]
            kinds[key] = kinds.get(key, 0) + 1
        found.extend(
            f"{daemon.name} said ({count}x): {line}" for line, count in list(kinds.items())[:10]
        )
        if daemon.stop_seconds is not None:
            found.append(
                f"{daemon.name}: stopped {daemon.stop_seconds:.2f} s after SIGTERM, "
                f"exit code {daemon.exit_code}"
            )
    return found


def append_results(
    *,
    info: list[str],
    args: argparse.Namespace,
    body: str,
    ratios: list[str],
    sentence: str,
) -> None:
    common.append_results(
        title=f"fleet, one daemon watching {args.servers} real servers",
        info=info,
        workload=(
            f"{args.servers} tiny PostgreSQL {args.major} clusters (bench/fleet_servers.py: one "
            "initdb copied per server, shared_buffers 128kB, max_connections 10, autovacuum off, "
            "Unix socket only), each started on its own (a distinct cluster for the arbiter) "
            f"with {args.sessions} idle sessions; one `[[servers]]` entry per cluster with "
            f'`interval = "{INTERVAL:g}s"`; policies idle and stuck-transactions with '
            '`max_idle = "1h"` (nothing eligible); metrics listening (not scraped); JSON logs '
            "read from a pipe. The baseline daemon (1 entry, same config otherwise) ran side by "
            f"side over the same window. Window {args.duration:g} s, opened {SETTLE:g} s after "
            "every entry had completed its first poll."
        ),
        body=body,
        ratios=ratios,
        sentence=sentence,
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--duration", type=float, default=300.0, help="seconds of measurement (300)"
    )
    parser.add_argument("--servers", type=int, default=1000, help="tiny clusters (1000)")
    parser.add_argument("--sessions", type=int, default=2, help="idle sessions each (2)")
    parser.add_argument("--jobs", type=int, default=4, help="servers started at once (4)")
    parser.add_argument("--major", type=int, default=18, choices=SUPPORTED_MAJORS)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.duration < 3 * INTERVAL or args.servers < 1 or args.jobs < 1:
        parser.error("--duration must be >= 30, --servers and --jobs >= 1")
    if not 0 <= args.sessions <= 5:
        parser.error("--sessions must be within 0..5 (max_connections 10)")
    return args


def _polled_all(wanted: set[str]) -> Callable[[Daemon], bool]:
    def check(daemon: Daemon) -> bool:
        return wanted <= daemon.polled_entries()

    return check


def _first_round(daemons: Sequence[Daemon], names: dict[str, list[str]]) -> None:
    for daemon in daemons:
        wanted = set(names[daemon.name])
        if not daemon.wait_for(_polled_all(wanted), FIRST_ROUND_TIMEOUT):
            got = len(daemon.polled_entries() & wanted)
            tail = "\n".join(daemon.odd[-10:])
            raise RuntimeError(
                f"{daemon.name}: only {got}/{len(wanted)} entries polled within "
                f"{FIRST_ROUND_TIMEOUT:g} s:\n{tail}"
            )


def _fleet_notes(fleet: TinyFleet, servers: list[EmbeddedPostgres], used_mb: float) -> list[str]:
    starts = sorted(fleet.start_seconds)
    return [
        (
            f"- servers: {len(servers)} started in {fleet.started_in:.0f} s by {fleet.jobs} "
            f"threads (copy + start + sessions: median {statistics.median(starts):.2f} s, max "
            f"{starts[-1]:.2f} s each); one server with its {fleet.sessions_each} idle "
            f"sessions and the daemons' sessions: {fleet.footprint(servers):.1f} MB PSS "
            f"(median of 20); MemAvailable fell {used_mb:.0f} MB while they started"
        )
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.raise_fd_limit(args.servers * (args.sessions + 1) + 200)
    fleet = TinyFleet(
        major=args.major,
        count=args.servers,
        sessions=args.sessions,
        jobs=args.jobs,
        application=APPLICATION,
    )
    daemons: list[Daemon] = []
    results: list[Measured] = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pg-reaper-bench-")))
        stack.callback(fleet.stop)
        print(f"starting {args.servers} tiny PostgreSQL {args.major} servers ...", file=sys.stderr)
        before_mb = mem_available_mb()
        servers = fleet.start()
        used_mb = before_mb - mem_available_mb()
        info = common.machine(servers[0])
        try:
            load_before = common.load_average()
            write_config(work / "fleet.toml", servers)
            write_config(work / "baseline.toml", servers[:1])
            names = {
                "fleet": [f"pg{i:04d}" for i in range(len(servers))],
                "baseline": ["pg0000"],
            }
            print(f"starting the daemons ({len(servers)} entries and 1) ...", file=sys.stderr)
            for name in ("fleet", "baseline"):  # one by one: started ones are stopped below
                daemons.append(Daemon(name, work / f"{name}.toml"))  # noqa: PERF401
            _first_round(daemons, names)
            print(f"every entry polled once; settling {SETTLE:g} s ...", file=sys.stderr)
            time.sleep(SETTLE)
            results = run_window(daemons[0], daemons[1], duration=args.duration, entries=names)
            info.extend(_fleet_notes(fleet, servers, used_mb))
        finally:
            for daemon in daemons:
                daemon.stop()
    info.append(
        f"- load average (1/5/15 min) before the window: {load_before}; "
        f"after it: {common.load_average()}"
    )
    body = table(results)
    ratios, sentence = verdict(results[0], results[1])
    found = notes(daemons, results)
    common.print_report(info, body, ratios, sentence)
    for line in found:
        print(f"- {line}")
    if not args.no_record:
        append_results(
            info=info,
            args=args,
            body=body,
            ratios=[*ratios, *(f"- note: {line}" for line in found)],
            sentence=sentence,
        )
    return 0


if __name__ == "__main__":
    common.run(main, stopped="the daemons, sessions and servers")
