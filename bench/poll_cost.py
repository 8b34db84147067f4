"""What does the daemon's poll query cost the server, against ``SELECT * FROM pg_stat_activity``?

On one throwaway PostgreSQL server (``max_connections`` 4,200) this opens idle sessions in steps
(100, 1,000, 4,000 by default) as four ordinary roles, and at each step runs, as prepared
statements on one psycopg connection of a least-privilege role (``pg_read_all_stats`` +
``pg_signal_backend``, as the design recommends):

- bare: ``SELECT * FROM pg_stat_activity`` (the baseline);
- function: ``SELECT pid FROM pg_stat_get_activity(NULL)``, the function both read, alone: the
  floor (it looks every backend up in the process array, so at thousands of sessions it is most
  of the cost of bare and of the poll alike);
- poll: ``reaper.pg.activity.POLL_SQL`` with ``include_query`` false (the product): the whole poll
  in one statement, session rows from ``pg_stat_get_activity(NULL)`` alone plus one row per role,
  one per database and the server's ``now()``, which the reaper puts together;
- poll-br: ``reaper.pg.activity.POLL_BACKEND_ROLES_SQL``, the same with role rows only for the roles
  that have a backend (``pg_stat_get_backend_idset()``), which the product runs instead when the
  server has more roles than sessions (``poll_reads_every_role``); the table marks the one the
  product runs at each step, and the verdict is about that one;
- previous: the poll as it was before (the view joined with ``pg_roles``, ages in SQL, and a
  second statement for the roles' connection limits), for comparison;
- joined, a candidate, not the product: one statement that keeps the names per row
  (``pg_stat_get_activity(NULL)`` hash-joined with ``pg_database`` and a MATERIALIZED
  ``pg_roles`` CTE), to show what the names per row cost;
- probe, probe-role: ``reaper.pg.activity.PROBE_SQL``, the pressure probe the daemon runs between
  polls on a server with pressure policies (docs/pressure.md): the client backends counted on the
  server, one row back; probe-role (``PROBE_ROLES_SQL``) adds a row per role whose connection
  limit applies (a ``when_role_connections_above`` policy). Its cost per second at the probe's
  cadence is reported as a fraction of one full poll;
- count, idset, numbackends: the other candidates for the probe, not the product: a bare
  ``count(*)`` of client backends; ``pg_stat_get_backend_idset()`` with
  ``pg_stat_get_backend_userid`` per backend (which cannot tell a client backend from a parallel
  worker or a walsender); ``sum(numbackends)`` of ``pg_stat_database`` (every backend with a
  database, autovacuum and parallel workers included).

``--extra-roles N`` creates N more (NOLOGIN) roles first: a server with many roles, where the
product runs poll-br.

Cost per execution, two ways, each over many repetitions with the variants' order rotated every
repetition to cancel drift, reported as medians: the server's ``Execution Time`` from
``EXPLAIN (ANALYZE, TIMING OFF)`` (planning excluded), and the client's wall time of a prepared
execute + fetch. The server and every session are stopped on exit, on errors, on Ctrl-C and on
SIGTERM.

    .venv/bin/python bench/poll_cost.py [--steps 100,1000,4000] [--repetitions 100] [--major 18]
                                        [--extra-roles 0] [--probe-interval 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import common
import psycopg

from reaper.demo.embedded import SUPPORTED_MAJORS, EmbeddedPostgres
from reaper.pg.activity import (
    POLL_BACKEND_ROLES_SQL,
    POLL_SQL,
    PROBE_ROLES_SQL,
    PROBE_SQL,
    poll_reads_every_role,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from psycopg.rows import TupleRow

APPLICATION = "bench-poll"
ROLES = tuple(f"bench_app_{i}" for i in range(4))
REAPER_ROLE = "bench_reaper"
TARGET_RATIO = 1.0
OPEN_WORKERS = 8
WARMUP = 5
PARAMS = {"include_query": False, "include_blocking": False}

BARE_SQL = "SELECT * FROM pg_stat_activity"
# The set-returning function that both read, alone: the floor. It looks every backend up in the
# process array, so its cost per row grows with the number of backends and, at thousands of
# sessions, it is most of both bare's and the poll's cost.
FUNCTION_SQL = "SELECT pid FROM pg_stat_get_activity(NULL)"

# The poll before it became one statement (pg-reaper up to 586cdc6): the client sessions joined
# with pg_roles (pg_has_role per session) and named through the view's joins, ages as
# extract(epoch ...)::float8; then, at every poll, a second statement for the roles' limits.
PREVIOUS_SQL = """
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
       coalesce(r.rolsuper, false) AS superuser,
       CASE WHEN r.oid IS NULL THEN false ELSE pg_has_role(r.oid, 'USAGE') END AS member,
       CASE WHEN %(include_query)s THEN a.query END AS query
FROM pg_stat_activity a
LEFT JOIN pg_roles r ON r.oid = a.usesysid
WHERE a.backend_type = 'client backend'
   OR (a.backend_type IS NULL AND a.datname IS NOT NULL AND a.usename IS NOT NULL)
"""
PREVIOUS_PRESSURE_SQL = """
SELECT r.rolname AS role,
       r.rolconnlimit AS connection_limit
FROM pg_roles r
WHERE r.rolconnlimit >= 0
  AND r.rolcanlogin
  AND NOT r.rolsuper
"""

# One statement that keeps the names per row: pg_stat_get_activity(NULL) hash-joined with
# pg_database and with pg_roles (pg_has_role once per role, in a MATERIALIZED CTE), the
# client-backend filter after the joins so that the planner's row estimate keeps hash joins.
JOINED_SQL = """
WITH r AS MATERIALIZED (
  SELECT r.oid, r.rolname, r.rolsuper, pg_has_role(r.oid, 'USAGE') AS member,
         CASE WHEN r.rolconnlimit >= 0 AND r.rolcanlogin AND NOT r.rolsuper
              THEN r.rolconnlimit END AS connection_limit
  FROM pg_roles r
)
SELECT a.pid, coalesce(a.backend_type, 'unknown') AS backend_type, d.datname,
       r.rolname AS usename, a.application_name, host(a.client_addr) AS client_addr, a.state,
       a.backend_start, a.state_change, a.xact_start, a.query_start, now() AS now,
       coalesce(r.rolsuper, false) AS superuser, coalesce(r.member, false) AS member,
       r.connection_limit, CASE WHEN %(include_query)s THEN a.query END AS query
FROM pg_stat_get_activity(NULL) AS a
LEFT JOIN r ON r.oid = a.usesysid
LEFT JOIN pg_database d ON d.oid = a.datid
WHERE CASE WHEN a.backend_type IS NULL
           THEN a.datid IS NOT NULL AND d.datname IS NOT NULL AND r.rolname IS NOT NULL
           ELSE a.backend_type = 'client backend' END
"""


# The other candidates for the pressure probe (the product's is PROBE_SQL).
COUNT_SQL = (
    "SELECT count(*) FROM pg_catalog.pg_stat_get_activity(NULL) AS a "
    "WHERE a.backend_type = 'client backend'"
)
IDSET_SQL = (
    "SELECT pg_catalog.pg_stat_get_backend_userid(b) AS role_oid, count(*) "
    "FROM pg_catalog.pg_stat_get_backend_idset() AS b GROUP BY 1"
)
NUMBACKENDS_SQL = "SELECT sum(numbackends) FROM pg_catalog.pg_stat_database"


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # baseline | floor | product | probe | previous | candidate
    statements: tuple[str, ...]  # run one after the other; the cost is their sum
    description: str
    blocking: bool = False  # the poll's include_blocking (a policy with when_blocking)


VARIANTS = (
    Variant("bare", "baseline", (BARE_SQL,), "SELECT * FROM pg_stat_activity"),
    Variant("function", "floor", (FUNCTION_SQL,), "pg_stat_get_activity(NULL) alone"),
    Variant(
        "poll",
        "product",
        (POLL_SQL,),
        "reaper.pg.activity.POLL_SQL (include_query false): the whole poll in one statement, a "
        "row per role",
    ),
    Variant(
        "poll-br",
        "product",
        (POLL_BACKEND_ROLES_SQL,),
        "reaper.pg.activity.POLL_BACKEND_ROLES_SQL: the same with role rows only for the roles "
        "that have a backend, which the product runs when there are more roles than sessions",
    ),
    Variant(
        "poll-blk",
        "product",
        (POLL_SQL,),
        "reaper.pg.activity.POLL_SQL with include_blocking: what a server with a when_blocking "
        "policy pays (pg_locks, and pg_blocking_pids per waiting backend)",
        blocking=True,
    ),
    Variant(
        "previous",
        "previous",
        (PREVIOUS_SQL, PREVIOUS_PRESSURE_SQL),
        "the poll before: the view joined with pg_roles + the roles' limits (two statements)",
    ),
    Variant(
        "joined",
        "candidate",
        (JOINED_SQL,),
        "one statement with names per row: pg_stat_get_activity(NULL) hash-joined with "
        "pg_database and a MATERIALIZED pg_roles CTE",
    ),
    Variant(
        "probe",
        "probe",
        (PROBE_SQL,),
        "reaper.pg.activity.PROBE_SQL: the pressure probe (client backends counted on the server)",
    ),
    Variant(
        "probe-role",
        "probe",
        (PROBE_ROLES_SQL,),
        "reaper.pg.activity.PROBE_ROLES_SQL: the same + a row per role whose connection limit "
        "applies (a when_role_connections_above policy)",
    ),
    Variant("count", "candidate", (COUNT_SQL,), "count(*) of client backends alone"),
    Variant(
        "idset",
        "candidate",
        (IDSET_SQL,),
        "pg_stat_get_backend_idset() with pg_stat_get_backend_userid, grouped (cannot tell "
        "client backends from workers and walsenders)",
    ),
    Variant(
        "numbackends",
        "candidate",
        (NUMBACKENDS_SQL,),
        "sum(pg_stat_database.numbackends) (every backend with a database)",
    ),
)


@dataclass
class Step:
    sessions: int  # idle sessions opened by the benchmark
    rows: dict[str, int] = field(default_factory=dict)  # rows each variant returns (all statements)
    product: str = "poll"  # the variant the product runs at this step
    server_ms: dict[str, list[float]] = field(default_factory=dict)
    wall_ms: dict[str, list[float]] = field(default_factory=dict)


# --------------------------------------------------------------------------- sessions


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


def prepare_roles(pg: EmbeddedPostgres, extra: int) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True, application_name="bench-setup") as conn:
        conn.execute(
            f"CREATE ROLE {REAPER_ROLE} LOGIN IN ROLE pg_read_all_stats, pg_signal_backend"
        )
        for role in ROLES:
            conn.execute(f"CREATE ROLE {role} LOGIN")
        for i in range(extra):
            conn.execute(f"CREATE ROLE bench_extra_{i}")


# --------------------------------------------------------------------------- measuring


def _params(statement: str, variant: Variant | None = None) -> dict[str, Any] | None:
    if "%(include_query)s" not in statement:
        return None
    blocking = variant is not None and variant.blocking
    return (
        {**PARAMS, "include_blocking": blocking}
        if "%(include_blocking)s" in statement
        else {"include_query": False}
    )


def server_ms(conn: psycopg.Connection[TupleRow], variant: Variant) -> float:
    total = 0.0
    for statement in variant.statements:
        cur = conn.execute(
            "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + statement,
            _params(statement, variant),
            prepare=True,
        )
        row = cur.fetchone()
        assert row is not None
        total += float(row[0][0]["Execution Time"])
    return total


def wall_ms(conn: psycopg.Connection[TupleRow], variant: Variant) -> float:
    started = time.perf_counter()
    for statement in variant.statements:
        conn.execute(statement, _params(statement, variant), prepare=True).fetchall()
    return (time.perf_counter() - started) * 1000.0


def product_variant(conn: psycopg.Connection[TupleRow]) -> str:
    """Which of the product's two statements a poll runs on this server, by the product's rule
    (reaper.pg.activity.poll_reads_every_role) after a first poll that reads every role."""
    rows = conn.execute(POLL_SQL, PARAMS).fetchall()
    sessions = sum(1 for row in rows if row[0] is not None)  # pid
    roles = sum(1 for row in rows if row[0] is None and row[3] is not None)  # role_oid
    return "poll" if poll_reads_every_role(roles, sessions) else "poll-br"


def measure(conn: psycopg.Connection[TupleRow], step: Step, repetitions: int) -> None:
    step.product = product_variant(conn)
    for variant in VARIANTS:
        step.rows[variant.name] = sum(
            len(conn.execute(statement, _params(statement, variant)).fetchall())
            for statement in variant.statements
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
                f"{variant.kind} (runs)" if variant.name == step.product else variant.kind,
                str(step.rows[variant.name]),
                f"{_median(server):.3f}",
                f"{statistics.quantiles(server, n=10)[-1]:.3f}" if len(server) > 1 else "n/a",
                f"{_ratio(step, variant.name, 'server'):.2f}x",
                f"{_median(step.wall_ms[variant.name]):.3f}",
                f"{_ratio(step, variant.name, 'wall'):.2f}x",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_lines(steps: Sequence[Step], probe_interval: float) -> list[str]:
    """The pressure probe against the full poll: per call, and per second at its cadence."""
    lines = []
    for step in steps:
        poll = _median(step.server_ms[step.product])
        probe = _median(step.server_ms["probe"])
        role = _median(step.server_ms["probe-role"])
        per_second = probe / probe_interval
        candidates = ", ".join(
            f"{name} {_median(step.server_ms[name]) / poll:.2f}x"
            for name in ("count", "idset", "numbackends", "function")
        )
        lines.append(
            f"- {step.sessions} sessions, pressure probe: {probe:.3f} ms server per call = "
            f"{probe / poll:.2f}x the poll ({role / poll:.2f}x with per-role counts), "
            f"{_median(step.wall_ms['probe']):.3f} ms wall; at one probe every "
            f"{probe_interval:g} s: {per_second:.3f} ms of server time per second = "
            f"{per_second / poll:.2f} of one full poll per second; "
            f"the other candidates per call / the poll: {candidates}"
        )
    return lines


def verdict(
    steps: Sequence[Step], refused: str | None, *, probe_interval: float = 1.0
) -> tuple[list[str], str]:
    lines = []
    for step in steps:
        product = step.product
        ratio = _ratio(step, product, "server")
        extra = _median(step.server_ms[product]) - _median(step.server_ms["bare"])
        others = ", ".join(
            f"{v.name} {_ratio(step, v.name, 'server'):.2f}x / {_ratio(step, v.name, 'wall'):.2f}x"
            for v in VARIANTS
            if v.name not in {"bare", product}
        )
        lines.append(
            f"- {step.sessions} sessions: the product runs {product}: / bare = {ratio:.2f}x "
            f"server ({extra:+.3f} ms), {_ratio(step, product, 'wall'):.2f}x wall; "
            f"server / wall: {others}"
        )
    lines.extend(probe_lines(steps, probe_interval))
    if refused:
        lines.append(f"- could not open more sessions: {refused}")
    worst = max(_ratio(s, s.product, "server") for s in steps)
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


def append_results(
    *, info: list[str], args: argparse.Namespace, body: str, ratios: list[str], sentence: str
) -> None:
    variants = "; ".join(f"{v.name}: {v.description}" for v in VARIANTS)
    common.append_results(
        title="poll query cost vs SELECT * FROM pg_stat_activity",
        info=info,
        workload=(
            f"idle sessions in steps of {args.steps} as {len(ROLES)} ordinary roles "
            f"({args.extra_roles} more roles without sessions); "
            f"queries run as prepared statements by a role with pg_read_all_stats and "
            f"pg_signal_backend; {args.repetitions} repetitions per step, order rotated each "
            "repetition, medians. server = EXPLAIN (ANALYZE, TIMING OFF) Execution Time; wall "
            f"= client execute + fetch over the Unix socket. Queries: {variants}. "
            "`rows` counts the rows returned by all of a variant's statements (bare: every "
            "backend, including background processes; poll: sessions, roles, databases and "
            "the clock row)."
        ),
        body=body,
        ratios=ratios,
        sentence=sentence,
    )


# --------------------------------------------------------------------------- main


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
    parser.add_argument(
        "--extra-roles", type=int, default=0, help="roles without sessions to create first (0)"
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=1.0,
        help="the pressure probe's cadence in seconds, for its cost per second (1)",
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.probe_interval <= 0:
        parser.error("--probe-interval must be positive")
    if args.repetitions < 2:
        parser.error("--repetitions must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    top = args.steps[-1]
    common.raise_fd_limit(top + 200)
    steps: list[Step] = []
    sessions: list[psycopg.Connection[TupleRow]] = []
    refused: str | None = None
    print(f"starting PostgreSQL {args.major} ...", file=sys.stderr)
    settings = {"max_connections": str(max(100, top + 200))}
    with EmbeddedPostgres(major=args.major, settings=settings) as pg:
        try:
            prepare_roles(pg, args.extra_roles)
            info = common.machine(pg)
            load_before = common.load_average()
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
            common.close_sessions(sessions)
    info.append(
        f"- load average (1/5/15 min) before the first step: {load_before}; "
        f"after the last: {common.load_average()}"
    )
    body = table(steps)
    ratios, sentence = verdict(steps, refused, probe_interval=args.probe_interval)
    common.print_report(info, body, ratios, sentence)
    if not args.no_record:
        append_results(info=info, args=args, body=body, ratios=ratios, sentence=sentence)
    return 0


if __name__ == "__main__":
    common.run(main, stopped="the server and sessions")
