"""How long does `pg-reaper once` take over a live server and two hung ones, serial vs parallel?

It starts one throwaway PostgreSQL server (the live one, over its Unix socket) and two hung
servers: 127.0.0.1 ports where a thread of this script accepts connections and never answers,
so that libpq waits for `connect_timeout` (`--connect-timeout`, 2 s by default). Then, in this
process (`reaper.cli.main`, output to /dev/null, no interpreter start-up counted), each round
times, in rotated order:

- **serial**: the old behaviour, one server after another: `once` on a config with only the
  live server, then on one with only the first hung server, then the second;
- **parallel**: `once` on one config with all three (live, hung, hung).

Expected: parallel takes about one connect_timeout, serial about two (plus the live poll).
Reported: medians over `--rounds` and parallel / serial. Everything it started is stopped on
exit, on errors, on Ctrl-C and on SIGTERM.

    .venv/bin/python bench/oneshot.py [--rounds 3] [--connect-timeout 2] [--major 18]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import common

from reaper.cli import main as reaper_main
from reaper.demo.embedded import SUPPORTED_MAJORS, EmbeddedPostgres

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

HUNG = ("hung-1", "hung-2")


@contextlib.contextmanager
def hung_server() -> Iterator[int]:
    """A 127.0.0.1 port that accepts and never answers; yields the port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, name="hung-server", daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        listener.close()


def write_config(path: Path, servers: dict[str, str], *, connect_timeout: float) -> Path:
    text = f'[reaper]\nconnect_timeout = "{connect_timeout:g}s"\n\n[log]\nformat = "json"\n'
    for name, dsn in servers.items():
        text += f"\n[[servers]]\nname = {json.dumps(name)}\ndsn = {json.dumps(dsn)}\n"
    text += '\n[[policies]]\nname = "idle"\nmax_idle = "1h"\n'
    path.write_text(text, encoding="utf-8")
    return path


def timed_once(config: Path) -> tuple[float, int]:
    """Seconds `pg-reaper once -c config` took in this process, and its exit code."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        started = time.perf_counter()
        code = reaper_main(["once", "-c", str(config)])
        return time.perf_counter() - started, code


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="repetitions (3)")
    parser.add_argument(
        "--connect-timeout", type=float, default=2.0, help="seconds, libpq's minimum is 2 (2)"
    )
    parser.add_argument("--major", type=int, default=18, choices=SUPPORTED_MAJORS)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.connect_timeout < 2:
        parser.error("--rounds must be at least 1 and --connect-timeout at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    timeout = args.connect_timeout
    times: dict[str, list[float]] = {"serial": [], "parallel": []}
    codes: dict[str, set[int]] = {"serial": set(), "parallel": set()}
    print(f"starting PostgreSQL {args.major} ...", file=sys.stderr)
    with (
        EmbeddedPostgres(major=args.major) as pg,
        hung_server() as port_1,
        hung_server() as port_2,
        tempfile.TemporaryDirectory(prefix="pg-reaper-bench-") as tmp,
    ):
        info = common.machine(pg)
        load_before = common.load_average()
        dsns = {"live": pg.dsn()} | {
            name: f"host=127.0.0.1 port={port} dbname=postgres user=nobody"
            for name, port in zip(HUNG, (port_1, port_2), strict=True)
        }
        each = [
            write_config(Path(tmp) / f"{name}.toml", {name: dsn}, connect_timeout=timeout)
            for name, dsn in dsns.items()
        ]
        every = write_config(Path(tmp) / "all.toml", dsns, connect_timeout=timeout)
        for n in range(args.rounds):
            order = ["serial", "parallel"] if n % 2 == 0 else ["parallel", "serial"]
            for variant in order:
                print(f"round {n + 1}/{args.rounds}: {variant} ...", file=sys.stderr)
                if variant == "serial":
                    runs = [timed_once(config) for config in each]
                    times["serial"].append(sum(seconds for seconds, _ in runs))
                    codes["serial"].update(code for _, code in runs)
                else:
                    seconds, code = timed_once(every)
                    times["parallel"].append(seconds)
                    codes["parallel"].add(code)
    info.append(
        f"- load average (1/5/15 min) before the first round: {load_before}; "
        f"after the last: {common.load_average()}"
    )
    serial, parallel = (statistics.median(times[v]) for v in ("serial", "parallel"))
    rows = [
        "| variant | rounds | median s | min s | max s | exit codes |",
        "|---|---|---|---|---|---|",
        *(
            f"| {v} | {len(times[v])} | {statistics.median(times[v]):.2f} | {min(times[v]):.2f}"
            f" | {max(times[v]):.2f} | {', '.join(map(str, sorted(codes[v])))} |"
            for v in ("serial", "parallel")
        ),
    ]
    body = "\n".join(rows)
    ratio = parallel / serial
    ratios = [
        f"- parallel / serial: {parallel:.2f} s / {serial:.2f} s = {ratio:.2f}x",
        (
            f"- parallel / connect_timeout: {parallel:.2f} s / {timeout:g} s = "
            f"{parallel / timeout:.2f}x (target: about 1x, not 2x)"
        ),
    ]
    met = parallel < 1.5 * timeout
    sentence = (
        f"Target {'met' if met else 'NOT met'}: `once` over a live server and two hung ones took "
        f"{parallel:.2f} s, {parallel / timeout:.2f}x connect_timeout ({timeout:g} s); one "
        f"server after another took {serial:.2f} s."
    )
    common.print_report(info, body, ratios, sentence)
    if not args.no_record:
        common.append_results(
            title="one-shot commands over a live server and two hung ones, serial vs parallel",
            info=info,
            workload=(
                f"`pg-reaper once` in-process (`reaper.cli.main`), `connect_timeout = "
                f'"{timeout:g}s"`; the live server is embedded PostgreSQL over its Unix socket, '
                "each hung server a 127.0.0.1 listener that accepts and never answers. Serial: "
                "three one-server configs one after another (the old behaviour); parallel: "
                f"one config with all three. {args.rounds} round(s), order rotated."
            ),
            body=body,
            ratios=ratios,
            sentence=sentence,
        )
    return 0


if __name__ == "__main__":
    common.run(main, stopped="the server and the hung listeners")
