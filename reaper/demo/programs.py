"""Running PostgreSQL's programs (and pip) for the embedded servers: as which account, with a
timeout, and with the tail of their output in the error when they fail.

initdb and postgres refuse to run as root, so a root caller runs them as `nobody`.
"""

from __future__ import annotations

import os
import pwd
import secrets
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "COMMAND_TIMEOUT_SECONDS",
    "OUTPUT_TAIL_LINES",
    "UNPRIVILEGED_ACCOUNT",
    "Account",
    "EmbeddedPostgresError",
    "check_reachable",
    "free_port",
    "process_alive",
    "run",
    "server_account",
    "tail",
]

UNPRIVILEGED_ACCOUNT = "nobody"
COMMAND_TIMEOUT_SECONDS = 180.0
OUTPUT_TAIL_LINES = 30


class EmbeddedPostgresError(RuntimeError):
    """Fetching the binaries or running an embedded server failed."""


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int
    home: str


def server_account() -> Account | None:
    """The account servers run as: None for the current user, `nobody` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_ACCOUNT)
    except KeyError as exc:
        raise EmbeddedPostgresError(
            f"running as root, but there is no {UNPRIVILEGED_ACCOUNT!r} account to run "
            "PostgreSQL as (initdb and postgres refuse to run as root)"
        ) from exc
    return Account(uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir)


def check_reachable(bin_dir: Path, account: Account) -> None:
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
                f"{UNPRIVILEGED_ACCOUNT!r} account that runs the server ({directory} is mode "
                f"{stat.filemode(mode.st_mode)}); set PG_REAPER_PG_CACHE to a directory outside it"
            )


def tail(text: str, lines: int = OUTPUT_TAIL_LINES) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(kept) if kept else "(no output)"


def run(  # noqa: PLR0913 - a thin wrapper around subprocess.run's own options
    command: Sequence[str],
    *,
    what: str,
    account: Account | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = COMMAND_TIMEOUT_SECONDS,
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
            f"{what}: `{shown}` did not finish within {timeout} s\n{tail(output)}"
        ) from exc
    except OSError as exc:
        raise EmbeddedPostgresError(f"{what}: cannot run `{shown}`: {exc}") from exc
    if check and result.returncode != 0:
        raise EmbeddedPostgresError(
            f"{what}: `{shown}` exited with code {result.returncode}\n"
            f"{tail(result.stdout + result.stderr)}"
        )
    return result


def _decode(output: str | bytes | None) -> str:
    if output is None:
        return ""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output


def process_alive(pid: int) -> bool:
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


# Ports handed out below the kernel's ephemeral range: a port the kernel chose (bind to port 0)
# is one it may give the next outgoing connection of any process as its local port before the
# caller listens on it, and on a busy machine (a test run's hundreds of connections) it does.
_LOWEST_PORT = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_PORT_TRIES = 100


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, outside the ephemeral range.

    Chosen at random below the range (so two processes asking at once rarely get the same one)
    and checked by binding it; where the range cannot be read, the kernel chooses.
    """
    try:
        ephemeral_low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = _LOWEST_PORT
    for _ in range(_PORT_TRIES if ephemeral_low > _LOWEST_PORT + _PORT_TRIES else 0):
        port = _LOWEST_PORT + secrets.randbelow(ephemeral_low - _LOWEST_PORT)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen
