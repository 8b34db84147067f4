"""`pg-reaper demo`: a throwaway PostgreSQL, real client sessions in several states, reaped live.

The clients are real `psql` processes fed through a pipe, so each session sits in the state its
last input left it in. The daemon runs with a short-threshold config and logs each decision as
it happens. Ctrl-C (or `--duration`) stops it; everything started is stopped and removed.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import Self

from reaper.daemon.process import Daemon
from reaper.demo.embedded import EmbeddedPostgres
from reaper.demo.programs import free_port
from reaper.observe.log import configure
from reaper.pg.activity import ServerConnection
from reaper.settings import load_settings

__all__ = ["run_demo"]

MAX_IDLE_SECONDS = 3
NEW_CLIENT_EVERY_SECONDS = 4
MAX_CLIENTS = 200  # psql notices its session is gone only when it next sends: keep them bounded

# application_name, what it sends, what it shows
_CLIENTS: tuple[tuple[str, str, str], ...] = (
    ("web-app", "SELECT 1;", "idle: reaped 3 s after its last statement"),
    ("web-app", "", "idle, never ran a statement: reaped too"),
    ("batch-job", "BEGIN; SELECT 1;", "idle in transaction: reaped (policy stuck-transactions)"),
    ("batch-job", "BEGIN; SELECT 1/0;", "idle in transaction (aborted): reaped"),
    ("psql", "SELECT 1;", "idle, but an operator's psql: protected, never reaped"),
    ("report", "SELECT pg_sleep(3600);", "active, a long query: not idle, never reaped"),
)

CONFIG = """\
[reaper]
interval = "30s"
min_interval = "1s"
protect_applications = ["^psql$"]

[metrics]
listen = "127.0.0.1:{metrics_port}"

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


def run_demo(*, major: int = 18, duration: float | None = None) -> int:
    say(f"Starting a throwaway PostgreSQL {major} ...")
    with (
        EmbeddedPostgres(major=major) as pg,
        tempfile.TemporaryDirectory(prefix="pg-reaper-demo-") as tmp,
        _Clients(pg) as clients,
    ):
        say(f"PostgreSQL {pg.version} is listening on {pg.socket_dir} and 127.0.0.1:{pg.port}.")
        say(f"Its files are in {pg.base_dir}.")
        say("Only its own account and root can reach them; TCP needs a secret made for this run.\n")
        # Over the Unix socket, where the throwaway server trusts local sessions: no password. The
        # socket directory is mode 0700, so no other local account gets that trust.
        dsn = f"host={pg.socket_dir} port={pg.port} dbname=postgres user={pg.superuser}"
        port = free_port()
        config = Path(tmp) / "config.toml"
        config.write_text(CONFIG.format(dsn=dsn, max_idle=MAX_IDLE_SECONDS, metrics_port=port))
        say(f"The config ({config}):\n")
        say("\n".join(f"  {line}" for line in config.read_text().splitlines()))
        say("\nClient sessions (real psql processes):")
        for application, sql, shows in _CLIENTS:
            clients.open(application, sql)
            say(f"  {application:<10} {shows}")
        say(f"  (and a new idle web-app session every {NEW_CLIENT_EVERY_SECONDS} s)")
        say(f"\nMetrics: http://127.0.0.1:{port}/metrics   health: /healthz /readyz")
        stop_after = f"for {duration:g} s" if duration else "until Ctrl-C"
        say(f"Running `pg-reaper run` {stop_after}; each decision is logged as it happens:\n")

        settings = load_settings(config)
        configure(settings.log, stream=sys.stdout)
        daemon = Daemon(config_path=config, settings=settings, force_dry_run=False)
        clients.keep_opening("web-app", "SELECT 1;", every=NEW_CLIENT_EVERY_SECONDS)
        if duration:
            timer = threading.Timer(duration, daemon.stop, args=["--duration elapsed"])
            timer.daemon = True
            timer.start()
        code = daemon.run()
        clients.stop_opening()

        say("\nThe server's own view of the client sessions left:")
        with ServerConnection(
            dsn=dsn, connect_timeout=timedelta(seconds=5), statement_timeout=timedelta(seconds=5)
        ) as conn:
            snapshot = conn.poll()
        for session in sorted(snapshot.sessions, key=lambda s: (s.application, s.pid)):
            if session.pid != snapshot.facts.own_pid:
                say(f"  {session.application:<10} {session.state}")
        say("Stopping PostgreSQL and removing everything the demo started.")
    return code


class _Clients:
    """psql processes, each holding one session in the state its input left it in."""

    def __init__(self, pg: EmbeddedPostgres) -> None:
        self._pg = pg
        self._procs: list[subprocess.Popen[str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_opening()
        for proc in self._procs:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            proc.kill()
            proc.wait(timeout=10)

    def open(self, application: str, sql: str) -> None:
        dsn = f"host={self._pg.socket_dir} port={self._pg.port} dbname=postgres user=postgres"
        proc = subprocess.Popen(  # noqa: S603 - PostgreSQL's own psql, fixed arguments
            [str(self._pg.bin_dir / "psql"), "-X", "-q", f"{dsn} application_name={application}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdin is not None  # noqa: S101 - stdin=PIPE
        proc.stdin.write(sql + "\n")
        proc.stdin.flush()  # the pipe stays open: psql waits, its session sits in its state
        self._procs.append(proc)

    def keep_opening(self, application: str, sql: str, *, every: float) -> None:
        def loop() -> None:
            while not self._stop.wait(every) and len(self._procs) < MAX_CLIENTS:
                self.open(application, sql)

        self._thread = threading.Thread(target=loop, name="demo-clients", daemon=True)
        self._thread.start()

    def stop_opening(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the demo talks to the person running it
