"""What one cycle of one server costs the daemon in Python, per cycle and per session, before and
after a change: the rows of a poll decoded into sessions, the policy engine's decisions, the
report, its log line and its metrics, as the daemon's job runs them.

One throwaway PostgreSQL server; idle sessions in steps (never eligible: the policies reap after
1 h idle). At each step a child process per tree ("before": a git revision, exported to a
temporary directory; "after": this checkout) connects the way the daemon does and runs
``--cycles`` cycles back to back, each ``sweep()`` + ``Metrics.record()`` + the next delay, with
JSON logs written to /dev/null; it reports the CPU time of the cycles (time.process_time: the
psycopg/libpq decoding included, the server's side not). The trees take turns, ``--rounds``
times; medians. The cost per session is the slope between the smallest and the largest step;
the cost per cycle is the smallest step's.

    .venv/bin/python bench/session_cost.py [--before main] [--steps 10,300] [--cycles 300]
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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import common
import psycopg
import tomli_w

from reaper.demo.embedded import SUPPORTED_MAJORS, EmbeddedPostgres

if TYPE_CHECKING:
    from collections.abc import Sequence

    from psycopg.rows import TupleRow

APPLICATION = "bench-session-cost"
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the child


def _config(dsn: str) -> dict[str, Any]:
    return {
        "reaper": {"interval": "10s"},
        "log": {"format": "json", "level": "info"},
        "servers": [{"name": "pg", "dsn": dsn, "interval": "10s"}],
        "policies": [
            {"name": "idle", "states": ["idle"], "max_idle": "1h"},
            {
                "name": "stuck-transactions",
                "states": ["idle in transaction", "idle in transaction (aborted)"],
                "max_idle": "1h",
            },
        ],
    }


def child(config: Path, cycles: int, *, profile: bool) -> None:
    """Run `cycles` cycles of the configured server with whichever reaper is importable."""
    from reaper.daemon.cadence import delay_for  # noqa: PLC0415 - the tree under test
    from reaper.observe import log  # noqa: PLC0415
    from reaper.observe.metrics import Metrics  # noqa: PLC0415
    from reaper.settings import load_settings  # noqa: PLC0415
    from reaper.sweep import Memory, connect, sweep  # noqa: PLC0415

    settings = load_settings(config)
    server = settings.servers[0]
    with Path(os.devnull).open("w") as sink:
        log.configure(settings.log, stream=sink)
        metrics = Metrics()
        metrics.configure(settings)
        conn = connect(server, settings, ha=True)
        memory = Memory()
        policies = [p.name for p in settings.policies_for(server)]

        def one() -> int:
            report = sweep(conn, server=server, settings=settings, memory=memory)
            if not report.ok:
                raise RuntimeError(report.error)
            metrics.record(report, policies=policies, finished_at=time.time())
            delay_for(report, settings=settings, server=server, failures=0)
            return len(report.sessions)

        for _ in range(max(cycles // 10, 5)):  # warm up: connect, prepare, caches
            sessions = one()
        profiler = None
        if profile:
            import cProfile  # noqa: PLC0415

            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
        started = time.process_time()
        for _ in range(cycles):
            sessions = one()
        cpu = time.process_time() - started
        if profiler is not None:
            import pstats  # noqa: PLC0415

            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        conn.close()
    print(json.dumps({"cpu_per_cycle_us": cpu / cycles * 1e6, "sessions": sessions}))


# --------------------------------------------------------------------------- the parent


def export(ref: str, into: Path) -> Path:
    """The reaper package of git revision `ref`, exported under `into`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "reaper"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure(tree: Path, config: Path, cycles: int, *, profile: bool) -> dict[str, float]:
    env = common.daemon_env()
    env["PYTHONPATH"] = str(tree)
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(config), "--cycles", str(cycles)]
        + (["--profile"] if profile else []),
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the child for {tree} failed:\n{out.stderr[-3000:]}")
    if profile:
        print(out.stderr, file=sys.stderr)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--before", default="main", help="git revision to compare with (main)")
    parser.add_argument("--steps", default="10,300", help="idle sessions per step (10,300)")
    parser.add_argument("--cycles", type=int, default=300, help="cycles per measurement (300)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per tree (3)")
    parser.add_argument("--major", type=int, default=18, choices=SUPPORTED_MAJORS)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each child")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.step_list = sorted({int(s) for s in args.steps.split(",")})
    if args.child is None and (len(args.step_list) < 2 or args.step_list[0] < 0):
        parser.error("--steps needs two or more counts >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        child(args.child, args.cycles, profile=args.profile)
        return 0
    steps: list[int] = args.step_list
    sessions: list[psycopg.Connection[TupleRow]] = []
    cost: dict[tuple[str, int], list[float]] = {}
    seen: dict[int, int] = {}
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pg-reaper-bench-")))
        trees = {"before": export(args.before, work), "after": ROOT}
        settings = {"max_connections": str(max(steps) + 20)}
        pg = EmbeddedPostgres(major=args.major, settings=settings)
        stack.callback(pg.cleanup)
        stack.callback(common.close_sessions, sessions)
        pg.start()
        info = common.machine(pg)
        config = work / "reaper.toml"
        config.write_text(tomli_w.dumps(_config(pg.dsn())))
        config.chmod(0o600)
        for step in steps:
            while len(sessions) < step:
                conn = psycopg.connect(pg.dsn(), autocommit=True, application_name=APPLICATION)
                conn.execute("SELECT 1")
                sessions.append(conn)
            print(f"{step} idle sessions ...", file=sys.stderr)
            order = list(trees)
            for turn in range(args.rounds):
                for name in order[turn % 2 :] + order[: turn % 2]:
                    got = measure(trees[name], config, args.cycles, profile=args.profile)
                    cost.setdefault((name, step), []).append(got["cpu_per_cycle_us"])
                    seen[step] = int(got["sessions"])
    body, ratios, sentence = report(cost, seen, steps)
    common.print_report(info, body, ratios, sentence)
    if not args.no_record:
        common.append_results(
            title="per-session cost of a cycle, before and after",
            info=info,
            workload=(
                f"one server; idle sessions in steps of {steps} (never eligible: max_idle 1h); "
                f"per step and tree {args.rounds} child processes take turns, each running "
                f"{args.cycles} cycles (sweep + Metrics.record + next delay, JSON logs to "
                "/dev/null) after a warm-up; CPU time of the child (time.process_time), "
                f"medians. before = `{args.before}`, after = this checkout. `sessions` is what a "
                "poll saw (the idle sessions, the reaper's own and the benchmark's)."
            ),
            body=body,
            ratios=ratios,
            sentence=sentence,
        )
    return 0


def report(
    cost: dict[tuple[str, int], list[float]], seen: dict[int, int], steps: list[int]
) -> tuple[str, list[str], str]:
    lines = [
        "| sessions | before µs per cycle | after µs per cycle | after / before |",
        "|---|---|---|---|",
    ]
    med = {key: statistics.median(values) for key, values in cost.items()}
    for step in steps:
        b, a = med["before", step], med["after", step]
        lines.append(f"| {seen[step]} | {b:.0f} | {a:.0f} | {a / b:.2f}x |")
    low, high = steps[0], steps[-1]
    span = seen[high] - seen[low]
    per = {name: (med[name, high] - med[name, low]) / span for name in ("before", "after")}
    ratios = [
        (
            f"- per session per cycle: before {per['before']:.2f} µs, after {per['after']:.2f} µs "
            f"= {per['after'] / per['before']:.2f}x"
        ),
        (
            f"- per cycle at {seen[low]} sessions: before {med['before', low]:.0f} µs, after "
            f"{med['after', low]:.0f} µs = {med['after', low] / med['before', low]:.2f}x"
        ),
    ]
    sentence = (
        f"Per-session Python cost {per['before']:.2f} µs -> {per['after']:.2f} µs per poll; "
        f"fixed cost per cycle {med['before', low]:.0f} µs -> {med['after', low]:.0f} µs."
    )
    return "\n".join(lines), ratios, sentence


if __name__ == "__main__":
    common.run(main, stopped="the sessions and the server")
