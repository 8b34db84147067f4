"""What do three `[ha]` daemons on the same servers cost, against one daemon alone?

It starts three sets of ``--servers`` throwaway PostgreSQL servers (6 each by default), each
server with ``--idle`` idle client sessions that no policy matches (so that a poll has rows to
read and plan), and on them, all at once:

1. baseline: one ``pg-reaper run`` with ``[ha] enabled`` alone on the first set;
2. what three processes cost by themselves: three ``[ha]`` daemons that share nothing on the
   second set, each with a third of its servers (each leads its own, follows none);
3. three daemons with the same configuration but their own ``instance_id`` on the third set.

Once leadership has settled (each server one leader, the three split evenly) and after a
warm-up, every daemon's CPU time (user + system, from /proc/<pid>/stat) is read over the same
``--windows`` windows of ``--window`` seconds, with the polls
(``pg_reaper_poll_duration_seconds_count``) and follower probes (``pg_reaper_ha_probes_total``)
each made in them. Measured side by side, the arrangements share the machine's noise (10 % and
more from one minute to the next on a shared virtual machine), which measured one after the
other fell on their ratio. Last, failover: one of the three is SIGKILLed; the time until the two
others lead every server between them, split evenly, in intervals.

Target: the three together spend <= 1.5x the CPU of the one alone. The second step tells how much
of that is the followers' own work, and how much three processes instead of one. Run under the
machine-wide lock, as every benchmark:

    flock /work/wt/bench.lock .venv/bin/python bench/ha.py [--windows 3] [--interval 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import common
import psycopg
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from reaper.demo.embedded import SUPPORTED_MAJORS, EmbeddedPostgres

if TYPE_CHECKING:
    from collections.abc import Sequence

    from psycopg.rows import TupleRow

TARGET = 1.5
STOP_TIMEOUT = 15.0
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


class Daemon:
    """One `pg-reaper run`, its metrics port and its log file."""

    def __init__(
        self, work: Path, servers: Sequence[EmbeddedPostgres], *, name: str, interval: float
    ) -> None:
        self.name = name
        self.port = common.free_port()
        config = work / f"{name}.toml"
        document = {
            "reaper": {"interval": f"{interval:g}s", "min_interval": "250ms"},
            "metrics": {"listen": f"127.0.0.1:{self.port}"},
            "log": {"format": "json"},
            "ha": {"enabled": True, "instance_id": name},
            "servers": [{"name": f"s{i}", "dsn": s.dsn()} for i, s in enumerate(servers)],
            "policies": [
                {"name": "idle", "states": ["idle"], "max_idle": "1h", "applications": ["^nobody$"]}
            ],
        }
        config.write_text(tomli_w.dumps(document))
        self.log = (work / f"{name}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reaper", "run", "-c", str(config)],
            env=common.daemon_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def cpu(self) -> float:
        """Seconds of CPU (user + system) the process has used."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICK

    def metrics(self) -> dict[tuple[str, str], float]:
        """(sample name, server label) -> value, summed over other labels."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        values: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, sample.labels.get("server", ""))
                values[key] = values.get(key, 0.0) + sample.value
        return values

    def led(self, names: Sequence[str]) -> set[str]:
        with contextlib.suppress(OSError):
            values = self.metrics()
            return {n for n in names if values.get(("pg_reaper_leader", n)) == 1}
        return set()

    def counts(self, names: Sequence[str]) -> tuple[float, float]:
        """(polls, probes) so far, over every server."""
        values = self.metrics()
        polls = sum(values.get(("pg_reaper_poll_duration_seconds_count", n), 0.0) for n in names)
        probes = sum(values.get(("pg_reaper_ha_probes_total", n), 0.0) for n in names)
        return polls, probes

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def wait_split(
    daemons: Sequence[Daemon], names: Sequence[str], *, timeout: float, even: bool = True
) -> list[set[str]]:
    """Each daemon's servers, once every server has one leader and (`even`) the split is even."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shares = [d.led(names) for d in daemons]
        counts = Counter(n for share in shares for n in share)
        sizes = sorted(len(s) for s in shares)
        if all(counts[n] == 1 for n in names) and (not even or sizes[-1] - sizes[0] <= 1):
            return shares
        time.sleep(0.05)
    raise SystemExit(
        f"leadership did not settle in {timeout:g}s: {[d.led(names) for d in daemons]}"
    )


def measure(
    daemons: Sequence[Daemon], names: Sequence[str], window: float
) -> list[tuple[float, float, float]]:
    """(CPU seconds, polls, probes) of each daemon over `window` seconds. The counts are
    scraped outside the CPU window (before its start, after its end): rendering /metrics is
    the daemon's work too, and there are three daemons to scrape against one."""
    before = []
    for daemon in daemons:
        polls, probes = daemon.counts(names)
        before.append((daemon.cpu(), polls, probes))
    time.sleep(window)
    after = [(d.cpu(), *d.counts(names)) for d in daemons]
    return [(a[0] - b[0], a[1] - b[1], a[2] - b[2]) for a, b in zip(after, before, strict=True)]


def start_servers(
    stack: contextlib.ExitStack,
    args: argparse.Namespace,
    sessions: list[psycopg.Connection[TupleRow]],
) -> list[EmbeddedPostgres]:
    """`args.servers` servers, each with `args.idle` idle client sessions."""
    servers = [
        stack.enter_context(
            EmbeddedPostgres(major=args.major, settings={"max_connections": str(args.idle + 20)})
        )
        for _ in range(args.servers)
    ]
    for server in servers:
        for _ in range(args.idle):
            conn = psycopg.connect(server.dsn(), autocommit=True, application_name="bench-idle")
            conn.execute("SELECT 1")
            sessions.append(conn)
    return servers


def _per(cpu: float, base: float) -> float:
    """`cpu` as a multiple of `base`."""
    return cpu / base if base else float("inf")


def run(args: argparse.Namespace) -> int:
    names = [f"s{i}" for i in range(args.servers)]
    with contextlib.ExitStack() as stack:
        sessions: list[psycopg.Connection[TupleRow]] = []
        stack.callback(common.close_sessions, sessions)
        # Each arrangement on servers of its own, all measured over the same windows: the
        # machine's own noise (10 % and more from one minute to the next here) falls on the
        # three alike instead of on the ratio.
        alone_servers, apart_servers, ha_servers = (
            start_servers(stack, args, sessions) for _ in range(3)
        )
        info = common.machine(alone_servers[0])
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ha-")))
        settle = 10 * args.interval

        alone = Daemon(work, alone_servers, name="alone", interval=args.interval)
        apart = [
            Daemon(work, apart_servers[n::3], name=f"apart{n}", interval=args.interval)
            for n in range(3)
        ]
        three = [Daemon(work, ha_servers, name=f"ha{n}", interval=args.interval) for n in range(3)]
        for daemon in (alone, *apart, *three):
            stack.callback(daemon.stop)
        wait_split([alone], names, timeout=settle)
        for n, daemon in enumerate(apart):
            wait_split([daemon], names[: len(apart_servers[n::3])], timeout=settle)
        shares = wait_split(three, names, timeout=settle, even=not args.unbalanced)
        time.sleep(args.warmup)
        shares = wait_split(three, names, timeout=settle, even=not args.unbalanced)
        windows = [
            measure([alone, *apart, *three], names, args.window) for _ in range(args.windows)
        ]
        after = [d.led(names) for d in three]

        three[0].process.kill()
        killed = time.monotonic()
        survivors = wait_split(three[1:], names, timeout=settle, even=not args.unbalanced)
        failover = (time.monotonic() - killed) / args.interval

    span = args.window * args.windows
    # Each window's measures in the order measured: the one alone, the three apart, the three.
    alone_each = [w[0] for w in windows]
    apart_each = [sum(cpu for cpu, _, _ in w[1 : 1 + len(apart)]) for w in windows]
    three_each = [sum(cpu for cpu, _, _ in w[1 + len(apart) :]) for w in windows]
    base_cpu, base_polls, base_probes = (sum(a[k] for a in alone_each) for k in range(3))
    apart_cpu = sum(apart_each)
    each = [
        tuple(sum(w[1 + len(apart) + i][k] for w in windows) for k in range(3))
        for i in range(len(three))
    ]
    total = sum(cpu for cpu, _, _ in each)
    ratios_each = [_per(t, a[0]) for t, a in zip(three_each, alone_each, strict=True)]
    floors_each = [_per(f, a[0]) for f, a in zip(apart_each, alone_each, strict=True)]
    ratio, floor = _per(total, base_cpu), _per(apart_cpu, base_cpu)
    rows = [
        "| daemon | leads | CPU s | CPU % of a core | polls | probes |",
        "|---|---|---|---|---|---|",
        (
            f"| alone | {len(names)} | {base_cpu:.2f} | {100 * base_cpu / span:.2f} | "
            f"{base_polls:.0f} | {base_probes:.0f} |"
        ),
    ]
    for daemon, share, (cpu, polls, probes) in zip(three, shares, each, strict=True):
        rows.append(
            f"| {daemon.name} | {len(share)} ({', '.join(sorted(share))}) | {cpu:.2f} | "
            f"{100 * cpu / span:.2f} | {polls:.0f} | {probes:.0f} |"
        )
    rows.append(
        f"| three sharing nothing (a third of the servers each) | {len(names)} | "
        f"{apart_cpu:.2f} | {100 * apart_cpu / span:.2f} | - | - |"
    )
    rows.append(
        f"| three together | {sum(len(s) for s in shares)} | {total:.2f} | "
        f"{100 * total / span:.2f} | {sum(p for _, p, _ in each):.0f} | "
        f"{sum(p for _, _, p in each):.0f} |"
    )
    body = "\n".join(rows)
    stable = "stable" if after == shares else f"moved during the windows: {after}"
    ratios = [
        (
            f"- three [ha] daemons / one alone: {ratio:.2f}x CPU over the {args.windows} windows "
            f"(target <= {TARGET:g}x); window by window: "
            f"{', '.join(f'{r:.2f}x' for r in ratios_each)}"
        ),
        (
            f"- three sharing nothing / one alone: {floor:.2f}x (three processes instead of one;"
            f" window by window {', '.join(f'{r:.2f}x' for r in floors_each)});"
            f" the followers' own work: {ratio - floor:.2f}x"
        ),
        f"- leadership split {'/'.join(str(len(s)) for s in shares)}, {stable}",
        (
            f"- after SIGKILL of {three[0].name}: the two others led "
            f"{'/'.join(str(len(x)) for x in survivors)} after {failover:.2f} intervals"
        ),
    ]
    met = ratio <= TARGET
    sentence = (
        f"Target {'met' if met else 'NOT met'}: three [ha] daemons spend {ratio:.2f}x the CPU of "
        f"one (target <= {TARGET:g}x)."
    )
    workload = (
        f"three sets of {args.servers} servers with {args.idle} idle client sessions each, no "
        f"policy matching: one daemon alone on the first, three sharing nothing (a third each) "
        f"on the second, three [ha] daemons on the third, all running together and measured "
        f"over the same {args.windows} windows of {args.window:g} s (after a warm-up of "
        f"{args.warmup:g} s); interval {args.interval:g} s"
    )
    common.print_report(info, body, ratios, sentence)
    if not args.no_append:
        common.append_results(
            title="[ha] leadership: three daemons against one (bench/ha.py)",
            info=info,
            workload=workload,
            body=body,
            ratios=ratios,
            sentence=sentence,
        )
    return 0 if met else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=6)
    parser.add_argument("--idle", type=int, default=20, help="idle sessions per server")
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--windows", type=int, default=3, help="windows measured")
    parser.add_argument("--major", type=int, default=18, choices=SUPPORTED_MAJORS)
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    parser.add_argument(
        "--unbalanced",
        action="store_true",
        help="accept any split (to measure a pg-reaper that does not balance leadership)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.servers < 3:
        raise SystemExit("--servers: at least 3")
    return run(args)


if __name__ == "__main__":
    common.run(main, stopped="the daemons and the servers")
