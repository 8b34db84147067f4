"""What does the daemon's poll query cost the server, against ``SELECT * FROM pg_stat_activity``?

On one throwaway PostgreSQL server (``max_connections`` 4,200) this opens idle sessions in steps
(100, 1,000, 4,000 by default) as four ordinary roles, and at each step runs, as prepared
statements on one psycopg connection of a least-privilege role (``pg_read_all_stats`` +
``pg_signal_backend``, as the design recommends):

- bare: ``SELECT * FROM pg_stat_activity`` (the baseline);
- poll: ``reaper.activity.POLL_SQL`` with ``include_query`` false (the product);
- two candidate rewrites, not the product, to show what would bring the poll under the baseline:
  - fenced: the same columns and rows, with the view and its ``pg_roles`` join behind an
    ``OFFSET 0`` so that the planner's 1-row estimate after the ``backend_type`` filter cannot
    turn the joins into nested loops;
  - fenced-dp: fenced, with the four ages computed by ``date_part('epoch', ...)`` (double
    precision) instead of ``extract(epoch FROM ...)::float8`` (numeric since PostgreSQL 14);
  - lean: ``pg_stat_get_activity(NULL)`` alone, raw timestamps plus ``now()`` (ages subtracted
    by the client from the server's own ``now()``), oids instead of names; plus the per-role
    and per-database lookups it needs (``pg_roles`` with ``pg_has_role`` once per role,
    ``pg_database``), counted in its cost as if run at every poll.

Cost per execution, two ways, each over many repetitions with the variants' order rotated every
repetition to cancel drift, reported as medians: the server's ``Execution Time`` from
``EXPLAIN (ANALYZE, TIMING OFF)`` (planning excluded), and the client's wall time of a prepared
execute + fetch. The server and every session are stopped on exit, on errors, on Ctrl-C and on
SIGTERM.

    .venv/bin/python bench/poll_cost.py [--steps 100,1000,4000] [--repetitions 100] [--major 18]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shlex
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import psycopg
from reaction_latency import load_average, machine

from reaper.activity import POLL_SQL
from reaper.embedded import SUPPORTED_MAJORS, EmbeddedPostgres

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

    from psycopg.rows import TupleRow

APPLICATION = "bench-poll"
ROLES = tuple(f"bench_app_{i}" for i in range(4))
REAPER_ROLE = "bench_reaper"
TARGET_RATIO = 1.0
OPEN_WORKERS = 8
WARMUP = 5
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PARAMS = {"include_query": False}

BARE_SQL = "SELECT * FROM pg_stat_activity"

FENCED_SQL = """
SELECT a.pid,
       coalesce(a.backend_type, 'unknown') AS backend_type,
       a.datname,
       a.usename,
       a.application_name,
       host(a.client_addr) AS client_addr,
       a.state,
       a.backend_start,
       a.state_change,
       extract(epoch FROM now() - a.state_change)::float8 AS idle_seconds,
       extract(epoch FROM now() - a.xact_start)::float8 AS transaction_seconds,
       extract(epoch FROM now() - a.query_start)::float8 AS runtime_seconds,
       extract(epoch FROM now() - a.backend_start)::float8 AS connection_seconds,
       coalesce(a.rolsuper, false) AS superuser,
       CASE WHEN a.role_oid IS NULL THEN false ELSE pg_has_role(a.role_oid, 'USAGE') END AS member,
       CASE WHEN %(include_query)s THEN a.query END AS query
FROM (SELECT a.*, r.oid AS role_oid, r.rolsuper
      FROM pg_stat_activity a
      LEFT JOIN pg_roles r ON r.oid = a.usesysid
      OFFSET 0) AS a
WHERE a.backend_type = 'client backend'
   OR (a.backend_type IS NULL AND a.datname IS NOT NULL AND a.usename IS NOT NULL)
"""

# The fenced query with date_part() (double precision) instead of extract() (numeric since
# PostgreSQL 14, then cast back to float8) for the four ages.
FENCED_DATE_PART_SQL = re.sub(
    r"extract\(epoch FROM (now\(\) - a\.\w+)\)::float8", r"date_part('epoch', \1)", FENCED_SQL
)

LEAN_SQL = """
SELECT a.pid, a.backend_type, a.datid, a.usesysid, a.application_name, a.client_addr, a.state,
       a.backend_start, a.state_change, a.xact_start, a.query_start, now() AS now,
       CASE WHEN %(include_query)s THEN a.query END AS query
FROM pg_stat_get_activity(NULL) AS a
WHERE a.backend_type = 'client backend' OR (a.backend_type IS NULL AND a.datid IS NOT NULL)
"""
LEAN_ROLES_SQL = "SELECT oid, rolname, rolsuper, pg_has_role(oid, 'USAGE') AS member FROM pg_roles"
LEAN_DATABASES_SQL = "SELECT oid, datname FROM pg_database"


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # baseline | product | candidate
    statements: tuple[str, ...]  # run one after the other; the cost is their sum
    description: str


VARIANTS = (
    Variant("bare", "baseline", (BARE_SQL,), "SELECT * FROM pg_stat_activity"),
    Variant("poll", "product", (POLL_SQL,), "reaper.activity.POLL_SQL (include_query false)"),
    Variant(
        "fenced",
        "candidate",
        (FENCED_SQL,),
        "POLL_SQL with the view + pg_roles join behind OFFSET 0 (hash joins)",
    ),
    Variant(
        "fenced-dp",
        "candidate",
        (FENCED_DATE_PART_SQL,),
        "fenced, with date_part('epoch', ...) instead of extract(epoch FROM ...)::float8",
    ),
    Variant(
        "lean",
        "candidate",
        (LEAN_SQL, LEAN_ROLES_SQL, LEAN_DATABASES_SQL),
        "pg_stat_get_activity(NULL) alone + now(); role and database lookups",
    ),
)


@dataclass
class Step:
    sessions: int  # idle sessions opened by the benchmark
    rows: dict[str, int] = field(default_factory=dict)  # rows of each variant's first statement
    server_ms: dict[str, list[float]] = field(default_factory=dict)
    wall_ms: dict[str, list[float]] = field(default_factory=dict)


# --------------------------------------------------------------------------- sessions


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard == resource.RLIM_INFINITY else max(soft, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted != resource.RLIM_INFINITY and wanted < needed:
        raise SystemExit(
            f"the file-descriptor limit is {wanted}, {needed} are needed: raise the hard limit"
        )


def open_sessions(
    pg: EmbeddedPostgres, sessions: list[psycopg.Connection[TupleRow]], target: int
) -> str | None:
    """Open sessions until there are `target`; the error if the server or the machine refused."""
    first = len(sessions)

    def one(i: int) -> psycopg.Connection[TupleRow]:
        dsn = pg.dsn(user=ROLES[i % len(ROLES)])
        return psycopg.connect(dsn, autocommit=True, application_name=APPLICATION)

    error: str | None = None
    with ThreadPoolExecutor(OPEN_WORKERS) as pool:
        futures = [pool.submit(one, i) for i in range(first, target)]
        for future in futures:
            try:
                sessions.append(future.result())
            except psycopg.Error as exc:
                error = error or " ".join(str(exc).split())
    return error


def close_sessions(sessions: list[psycopg.Connection[TupleRow]]) -> None:
    for conn in sessions:
        with contextlib.suppress(psycopg.Error, OSError):
            conn.close()
    sessions.clear()


def prepare_roles(pg: EmbeddedPostgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True, application_name="bench-setup") as conn:
        conn.execute(
            f"CREATE ROLE {REAPER_ROLE} LOGIN IN ROLE pg_read_all_stats, pg_signal_backend"
        )
        for role in ROLES:
            conn.execute(f"CREATE ROLE {role} LOGIN")


# --------------------------------------------------------------------------- measuring


def _params(statement: str) -> dict[str, Any] | None:
    return PARAMS if "%(include_query)s" in statement else None


def server_ms(conn: psycopg.Connection[TupleRow], variant: Variant) -> float:
    total = 0.0
    for statement in variant.statements:
        cur = conn.execute(
            "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + statement,
            _params(statement),
            prepare=True,
        )
        row = cur.fetchone()
        assert row is not None
        total += float(row[0][0]["Execution Time"])
    return total


def wall_ms(conn: psycopg.Connection[TupleRow], variant: Variant) -> float:
    started = time.perf_counter()
    for statement in variant.statements:
        conn.execute(statement, _params(statement), prepare=True).fetchall()
    return (time.perf_counter() - started) * 1000.0


def measure(conn: psycopg.Connection[TupleRow], step: Step, repetitions: int) -> None:
    for variant in VARIANTS:
        step.rows[variant.name] = len(
            conn.execute(variant.statements[0], _params(variant.statements[0])).fetchall()
        )
        step.server_ms[variant.name] = []
        step.wall_ms[variant.name] = []
        for _ in range(WARMUP):  # prepared (psycopg prepares on the 2nd run), caches warm
            server_ms(conn, variant)
            wall_ms(conn, variant)
    for rep in range(repetitions):
        shift = rep % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]
        for variant in order:
            step.server_ms[variant.name].append(server_ms(conn, variant))
        for variant in order:
            step.wall_ms[variant.name].append(wall_ms(conn, variant))


# --------------------------------------------------------------------------- reporting


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _ratio(step: Step, name: str, kind: str) -> float:
    data = step.server_ms if kind == "server" else step.wall_ms
    return _median(data[name]) / _median(data["bare"])


def table(steps: Sequence[Step]) -> str:
    head = (
        "| sessions | query | kind | rows | server ms (median) | server p90 | vs bare "
        "| wall ms (median) | vs bare |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for step in steps:
        for variant in VARIANTS:
            server = step.server_ms[variant.name]
            cells = [
                str(step.sessions),
                variant.name,
                variant.kind,
                str(step.rows[variant.name]),
                f"{_median(server):.3f}",
                f"{statistics.quantiles(server, n=10)[-1]:.3f}" if len(server) > 1 else "n/a",
                f"{_ratio(step, variant.name, 'server'):.2f}x",
                f"{_median(step.wall_ms[variant.name]):.3f}",
                f"{_ratio(step, variant.name, 'wall'):.2f}x",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(steps: Sequence[Step], refused: str | None) -> tuple[list[str], str]:
    lines = []
    for step in steps:
        ratio = _ratio(step, "poll", "server")
        extra = _median(step.server_ms["poll"]) - _median(step.server_ms["bare"])
        lines.append(
            f"- {step.sessions} sessions: poll / bare (server) = {ratio:.2f}x "
            f"({extra:+.3f} ms, {extra * 1000 / max(step.rows['poll'], 1):+.2f} us per row); "
            f"wall {_ratio(step, 'poll', 'wall'):.2f}x; candidates: fenced "
            f"{_ratio(step, 'fenced', 'server'):.2f}x, fenced-dp "
            f"{_ratio(step, 'fenced-dp', 'server'):.2f}x, "
            f"lean {_ratio(step, 'lean', 'server'):.2f}x"
        )
    if refused:
        lines.append(f"- could not open more sessions: {refused}")
    worst = max(_ratio(s, "poll", "server") for s in steps)
    if worst <= TARGET_RATIO:
        sentence = (
            f"Target met: the poll costs the server at most {worst:.2f}x a bare "
            f"SELECT * FROM pg_stat_activity (<= {TARGET_RATIO:g}x) at every step."
        )
    else:
        sentence = (
            f"Target NOT met: the poll costs the server up to {worst:.2f}x a bare "
            f"SELECT * FROM pg_stat_activity (target <= {TARGET_RATIO:g}x)."
        )
    return lines, sentence


def _command() -> str:
    python = os.path.relpath(sys.executable) if sys.executable else "python"
    return shlex.join([python, *sys.argv])


def append_results(
    *, info: list[str], args: argparse.Namespace, body: str, ratios: list[str], sentence: str
) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    variants = "; ".join(f"{v.name}: {v.description}" for v in VARIANTS)
    section = [
        f"## {now}: poll query cost vs SELECT * FROM pg_stat_activity",
        "",
        *info,
        f"- Command: `{_command()}`",
        (
            f"- Workload: idle sessions in steps of {args.steps} as {len(ROLES)} ordinary roles; "
            f"queries run as prepared statements by a role with pg_read_all_stats and "
            f"pg_signal_backend; {args.repetitions} repetitions per step, order rotated each "
            "repetition, medians. server = EXPLAIN (ANALYZE, TIMING OFF) Execution Time; wall "
            f"= client execute + fetch over the Unix socket. Queries: {variants}. "
            "`rows` counts the first statement's rows (bare: every backend, including "
            "background processes)."
        ),
        "",
        body,
        "",
        *ratios,
        "",
        sentence,
        "",
    ]
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by the scripts in this directory; newest last.\n\n"
        )
    with RESULTS.open("a") as out:
        out.write("\n".join(section) + "\n")


# --------------------------------------------------------------------------- main


def _interrupt(signum: int, _frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _steps(text: str) -> list[int]:
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not steps or steps[0] < 1:
        raise argparse.ArgumentTypeError("steps must be positive")
    return steps


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--steps", type=_steps, default=[100, 1000, 4000], help="session counts (100,1000,4000)"
    )
    parser.add_argument(
        "--repetitions", type=int, default=100, help="measurements per query per step (100)"
    )
    parser.add_argument("--major", type=int, default=18, choices=SUPPORTED_MAJORS)
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.name}")
    args = parser.parse_args(argv)
    if args.repetitions < 2:
        parser.error("--repetitions must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    top = args.steps[-1]
    raise_fd_limit(top + 200)
    steps: list[Step] = []
    sessions: list[psycopg.Connection[TupleRow]] = []
    refused: str | None = None
    print(f"starting PostgreSQL {args.major} ...", file=sys.stderr)
    settings = {"max_connections": str(max(100, top + 200))}
    with EmbeddedPostgres(major=args.major, settings=settings) as pg:
        try:
            prepare_roles(pg)
            info = machine(pg)
            load_before = load_average()
            with psycopg.connect(
                pg.dsn(user=REAPER_ROLE), autocommit=True, application_name="bench-poller"
            ) as conn:
                for target in args.steps:
                    print(f"opening sessions up to {target} ...", file=sys.stderr)
                    refused = open_sessions(pg, sessions, target)
                    print(f"measuring at {len(sessions)} sessions ...", file=sys.stderr)
                    step = Step(sessions=len(sessions))
                    measure(conn, step, args.repetitions)
                    steps.append(step)
                    if refused:
                        break
        finally:
            close_sessions(sessions)
    info.append(
        f"- load average (1/5/15 min) before the first step: {load_before}; "
        f"after the last: {load_average()}"
    )
    body = table(steps)
    ratios, sentence = verdict(steps, refused)
    print("\n".join(info))
    print()
    print(body)
    print()
    print("\n".join(ratios))
    print(sentence)
    if not args.no_record:
        append_results(info=info, args=args, body=body, ratios=ratios, sentence=sentence)
        print(f"\nappended to {RESULTS}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        print(
            f"interrupted ({exc or 'SIGINT'}); the server and sessions are stopped", file=sys.stderr
        )
        sys.exit(130)
