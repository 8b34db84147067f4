"""`pg-reaper demo`: a throwaway PostgreSQL, real client sessions in several states, reaped live.

The clients are real `psql` processes fed through a pipe, so each session sits in the state its
last input left it in. Everything started is stopped and removed at the end, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from reaper.activity import ServerConnection
from reaper.embedded import EmbeddedPostgres

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["run_demo"]

MAX_IDLE_SECONDS = 3

_CLIENTS: tuple[tuple[str, str, str], ...] = (
    # application_name, what it sends, what it shows
    ("web-app", "SELECT 1;", "idle"),
    ("web-app", "", "idle, never ran a statement"),
    ("batch-job", "BEGIN; SELECT 1;", "idle in transaction"),
    ("batch-job", "BEGIN; SELECT 1/0;", "idle in transaction (aborted)"),
    ("psql", "SELECT 1;", "idle, but protected: an operator's psql"),
    ("report", "SELECT pg_sleep(600);", "active: a long query, never idle"),
)

CONFIG = """\
[reaper]
max_terminations_per_cycle = 50
protect_applications = ["^psql$"]

[log]
format = "console"

[[servers]]
name = "demo"
dsn = "{dsn}"

[[policies]]
name = "idle"
states = ["idle"]
max_idle = "{max_idle}s"

[[policies]]
name = "stuck-transactions"
states = ["idle in transaction", "idle in transaction (aborted)"]
max_idle = "{max_idle}s"

[[policies]]
name = "runaway-queries"
states = ["active"]
max_runtime = "1h"
action = "cancel"
"""


def run_demo(*, major: int = 18) -> int:
    from reaper.cli import main  # noqa: PLC0415 - the demo drives the real command line

    say(f"Starting a throwaway PostgreSQL {major} ...")
    with (
        EmbeddedPostgres(major=major) as pg,
        _clients(pg) as clients,
        tempfile.TemporaryDirectory(prefix="pg-reaper-demo-") as tmp,
    ):
        say(f"PostgreSQL {pg.version} is listening on {pg.socket_dir} and 127.0.0.1:{pg.port}.")
        say(f"Its files are in {pg.base_dir}.\n")
        say("Client sessions opened (real psql processes):")
        for (application, _sql, shows), proc in zip(_CLIENTS, clients, strict=True):
            say(f"  {application:<10} pid-of-psql {proc.pid:<7} {shows}")
        config = Path(tmp) / "config.toml"
        # Over the Unix socket, where the throwaway server trusts local sessions: no password.
        dsn = f"host={pg.socket_dir} port={pg.port} dbname=postgres user={pg.superuser}"
        config.write_text(CONFIG.format(dsn=dsn, max_idle=MAX_IDLE_SECONDS))
        say(f"\nConfig {config}:\n")
        say("\n".join(f"  {line}" for line in config.read_text().splitlines()))
        say(f"\nWaiting {MAX_IDLE_SECONDS + 1}s for the idle sessions to pass max_idle ...\n")
        time.sleep(MAX_IDLE_SECONDS + 1)

        say("$ pg-reaper preview -c config.toml    # what would be reaped, signals nothing\n")
        code = main(["preview", "-c", str(config)])
        say("\n$ pg-reaper once -c config.toml       # one sweep: reap them\n")
        code = max(code, main(["once", "-c", str(config)]))
        time.sleep(0.5)
        say("\n$ pg-reaper preview -c config.toml    # nothing left to reap\n")
        code = max(code, main(["preview", "-c", str(config)]))
        say("\nThe server's own view of the client sessions left:")
        with ServerConnection(
            dsn=dsn, connect_timeout=timedelta(seconds=5), statement_timeout=timedelta(seconds=5)
        ) as conn:
            snapshot = conn.poll()
        for session in sorted(snapshot.sessions, key=lambda s: s.application):
            if session.pid != snapshot.facts.own_pid:
                say(f"  {session.application:<10} {session.state}")
        say("Stopping PostgreSQL and removing everything the demo started.")
    return code


@contextlib.contextmanager
def _clients(pg: EmbeddedPostgres) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        for application, sql, _shows in _CLIENTS:
            proc = subprocess.Popen(  # noqa: S603 - PostgreSQL's own psql, fixed arguments
                [
                    str(pg.bin_dir / "psql"),
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=0",
                    f"{pg.dsn()} application_name={application}",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            assert proc.stdin is not None  # noqa: S101 - stdin=PIPE
            proc.stdin.write(sql + "\n")
            proc.stdin.flush()  # the pipe stays open: psql waits, its session sits in its state
            procs.append(proc)
        time.sleep(0.5)
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            proc.kill()
            proc.wait(timeout=10)


def say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the demo talks to the person running it
    sys.stdout.flush()
