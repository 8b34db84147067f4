"""How much memory does an idle `pg-reaper run` with one server hold, against its bare imports?

It starts one throwaway PostgreSQL server and, side by side for ``--settle`` seconds (30 by
default), three processes:

- daemon: ``python -m reaper run -c FILE`` with one server, the policies of the design's example
  (idle 15 min, stuck transactions 5 min), metrics listening on 127.0.0.1, JSON logs to a file;
- baseline: ``python -c "import psycopg, pydantic_settings, structlog, prometheus_client,
  apscheduler; time.sleep(...)"``, the libraries the daemon cannot do without;
- imports: ``python -c "import reaper.cli, reaper.daemon.process; time.sleep(...)"``, pg-reaper's
  own modules imported but nothing started (to tell code from running state).

Then it reads VmRSS (with RssAnon and RssFile, and VmHWM, the peak) from /proc/<pid>/status of
each. Target: the daemon < 60 MB. ``--runs`` repeats the whole thing (medians reported). The
processes and the server are stopped on exit, on errors, on Ctrl-C and on SIGTERM.

    .venv/bin/python bench/footprint.py [--settle 30] [--runs 3] [--major 18]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import common
import tomli_w

from reaper.demo.embedded import SUPPORTED_MAJORS, EmbeddedPostgres

if TYPE_CHECKING:
    from collections.abc import Sequence

TARGET_MB = 60.0
STOP_TIMEOUT = 15.0
BASELINE_IMPORTS = "psycopg, pydantic_settings, structlog, prometheus_client, apscheduler"
PROCESSES = ("daemon", "baseline", "imports")


@dataclass(frozen=True)
class Memory:
    rss_kb: int
    anon_kb: int
    file_kb: int
    hwm_kb: int
    threads: int


def read_memory(pid: int) -> Memory:
    status: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip().split()[0] if value.strip() else ""

    def kb(key: str) -> int:
        return int(status.get(key) or 0)

    return Memory(
        rss_kb=kb("VmRSS"),
        anon_kb=kb("RssAnon"),
        file_kb=kb("RssFile") + kb("RssShmem"),
        hwm_kb=kb("VmHWM"),
        threads=kb("Threads"),
    )


def write_config(path: Path, pg: EmbeddedPostgres) -> None:
    config = {
        "reaper": {"interval": "30s"},
        "metrics": {"listen": f"127.0.0.1:{common.free_port()}"},
        "log": {"format": "json", "level": "info"},
        "servers": [{"name": "primary", "dsn": pg.dsn()}],
        "policies": [
            {
                "name": "idle",
                "states": ["idle"],
                "max_idle": "15m",
                "exclude_applications": ["^psql$", "^pgAdmin"],
            },
            {
                "name": "stuck-transactions",
                "states": ["idle in transaction", "idle in transaction (aborted)"],
                "max_idle": "5m",
                "max_transaction_age": "1h",
            },
        ],
    }
    path.write_text(tomli_w.dumps(config))
    path.chmod(0o600)


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def one_run(pg: EmbeddedPostgres, work: Path, settle: float) -> tuple[dict[str, Memory], list[str]]:
    config, log_path = work / "config.toml", work / "daemon.log"
    write_config(config, pg)
    sleep = f"time.sleep({settle + 60:g})"
    commands = {
        "daemon": [sys.executable, "-m", "reaper", "run", "-c", str(config)],
        "baseline": [sys.executable, "-c", f"import time, {BASELINE_IMPORTS}; {sleep}"],
        "imports": [
            sys.executable,
            "-c",
            f"import time, reaper.cli, reaper.daemon.process; {sleep}",
        ],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    notes: list[str] = []
    with log_path.open("wb") as log:
        try:
            for name, command in commands.items():
                procs[name] = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log if name == "daemon" else subprocess.DEVNULL,
                    env=common.daemon_env(),
                )
            time.sleep(settle)
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited early ({proc.returncode})")
            memory = {name: read_memory(proc.pid) for name, proc in procs.items()}
        finally:
            for name, proc in procs.items():
                code = _stop(proc)
                if name == "daemon" and code != 0:
                    notes.append(f"the daemon exited with code {code} after SIGTERM")
    text = log_path.read_text(errors="replace")
    polls = text.count('"poll_completed"')
    if not polls:
        notes.append("the daemon logged no poll_completed: " + text[-500:])
    notes.extend(
        f"daemon said: {line[:200]}"
        for line in text.splitlines()
        if '"level": "warning"' in line or '"level": "error"' in line
    )
    return memory, notes


# --------------------------------------------------------------------------- reporting


def _mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def _med(runs: Sequence[dict[str, Memory]], name: str, attr: str) -> float:
    return float(statistics.median(getattr(run[name], attr) for run in runs))


def table(runs: Sequence[dict[str, Memory]]) -> str:
    head = (
        "| process | runs | RSS MB (median) | min | max | RssAnon MB | RssFile+Shmem MB "
        "| VmHWM MB | threads | vs baseline |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    label = {
        "daemon": "`pg-reaper run`, one server, idle",
        "baseline": f"bare `import {BASELINE_IMPORTS}`",
        "imports": "`import reaper.cli, reaper.daemon.process` only",
    }
    base = _med(runs, "baseline", "rss_kb")
    for name in PROCESSES:
        rss = [run[name].rss_kb for run in runs]
        cells = [
            label[name],
            str(len(runs)),
            _mb(statistics.median(rss)),
            _mb(min(rss)),
            _mb(max(rss)),
            _mb(_med(runs, name, "anon_kb")),
            _mb(_med(runs, name, "file_kb")),
            _mb(_med(runs, name, "hwm_kb")),
            f"{_med(runs, name, 'threads'):g}",
            f"{statistics.median(rss) / base:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(runs: Sequence[dict[str, Memory]]) -> tuple[list[str], str]:
    daemon = _med(runs, "daemon", "rss_kb") / 1024
    base = _med(runs, "baseline", "rss_kb") / 1024
    imports = _med(runs, "imports", "rss_kb") / 1024
    lines = [
        (
            f"- daemon / baseline: {daemon:.1f} MB / {base:.1f} MB = {daemon / base:.2f}x "
            f"({daemon - base:+.1f} MB: {imports - base:+.1f} MB pg-reaper's own modules and what "
            f"they import beyond the baseline, {daemon - imports:+.1f} MB running state)"
        ),
        f"- daemon vs target {TARGET_MB:g} MB: {daemon / TARGET_MB:.2f}x the target",
    ]
    if daemon < TARGET_MB:
        sentence = f"Target met: an idle daemon with one server holds {daemon:.1f} MB (< 60 MB)."
    else:
        sentence = (
            f"Target NOT met: an idle daemon with one server holds {daemon:.1f} MB "
            f"(target < {TARGET_MB:g} MB; the bare libraries alone: {base:.1f} MB)."
        )
    return lines, sentence


def append_results(
    *, info: list[str], args: argparse.Namespace, body: str, ratios: list[str], sentence: str
) -> None:
    common.append_results(
        title="footprint of an idle daemon with one server",
        info=info,
        workload=(
            f"the three processes started side by side, memory read from "
            f"/proc/<pid>/status {args.settle:g} s later; {args.runs} run(s). The daemon: one "
            "server (embedded PostgreSQL, Unix socket), policies idle 15m and "
            "stuck-transactions 5m/1h, metrics listening on 127.0.0.1 (not scraped), JSON logs "
            "to a file."
        ),
        body=body,
        ratios=ratios,
        sentence=sentence,
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--settle", type=float, default=30.0, help="seconds before reading (30)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (3)")
    parser.add_argument("--major", type=int, default=18, choices=SUPPORTED_MAJORS)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.settle <= 0 or args.runs < 1:
        parser.error("--settle must be positive and --runs at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs: list[dict[str, Memory]] = []
    notes: list[str] = []
    print(f"starting PostgreSQL {args.major} ...", file=sys.stderr)
    with (
        EmbeddedPostgres(major=args.major) as pg,
        tempfile.TemporaryDirectory(prefix="pg-reaper-bench-") as tmp,
    ):
        info = common.machine(pg)
        load_before = common.load_average()
        for n in range(args.runs):
            print(f"run {n + 1}/{args.runs}: {args.settle:g} s ...", file=sys.stderr)
            memory, found = one_run(pg, Path(tmp), args.settle)
            runs.append(memory)
            notes.extend(f"run {n + 1}: {line}" for line in found)
    info.append(
        f"- load average (1/5/15 min) before the first run: {load_before}; "
        f"after the last: {common.load_average()}"
    )
    body = table(runs)
    ratios, sentence = verdict(runs)
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
    common.run(main, stopped="the processes and the server")
