"""`pg-reaper demo`: the README's first command, end to end."""

from __future__ import annotations

import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.integration


def _reaped_applications(output: str) -> set[str]:
    return {
        word.removeprefix("application=")
        for line in output.splitlines()
        if "session_reaped" in line
        for word in line.split()
        if word.startswith("application=")
    }


def _base_dir(output: str) -> Path:
    base_dir = Path(output.split("Its files are in ")[1].split(maxsplit=1)[0].rstrip("."))
    assert base_dir.name.startswith("pg-reaper-")
    return base_dir


def _nothing_left_running(base_dir: Path) -> bool:
    found = subprocess.run(
        ["pgrep", "-f", str(base_dir)], capture_output=True, text=True, check=False
    )
    return not base_dir.exists() and found.stdout.strip() == ""


def test_demo_reaps_idle_sessions_live_spares_psql_and_active_and_cleans_up(
    pg_major: int,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "reaper", "demo", "--major", str(pg_major), "--duration", "8"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _reaped_applications(proc.stdout) == {"web-app", "batch-job"}
    assert "result=terminated" in proc.stdout
    assert "/metrics" in proc.stdout
    left = proc.stdout.split("The server's own view of the client sessions left:")[1]
    rows = [line.split() for line in left.split("Stopping")[0].strip().splitlines()]
    assert ["psql", "idle"] in rows
    assert ["report", "active"] in rows
    assert "password" not in proc.stdout
    assert _nothing_left_running(_base_dir(proc.stdout))


def test_ctrl_c_stops_the_demo_cleanly(pg_major: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "reaper", "demo", "--major", str(pg_major)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    reaped = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "session_reaped" in line:
                reaped.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert reaped.wait(timeout=60), "".join(lines)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert proc.wait(timeout=20) == 0, "".join(lines)
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=10)
        proc.stdout.close()
    output = "".join(lines)
    assert "daemon_stopped" in output
    assert _nothing_left_running(_base_dir(output))


def test_while_the_demo_runs_no_other_account_can_reach_its_socket_or_log_in_over_tcp(
    pg_major: int,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "reaper", "demo", "--major", str(pg_major), "--duration", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        listening = None
        for line in proc.stdout:  # bounded: the demo ends after --duration
            lines.append(line)
            listening = re.search(r"is listening on (\S+) and 127\.0\.0\.1:(\d+)\.", line)
            if listening:
                break
        assert listening is not None, "".join(lines)
        socket_dir, port = Path(listening[1]), int(listening[2])

        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(socket_dir.parent.stat().st_mode) == 0o700
        # The fixed password of old no longer logs in as superuser over TCP.
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(
                host="127.0.0.1",
                port=port,
                user="postgres",
                password="postgres",
                dbname="postgres",
                connect_timeout=10,
            ).close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)  # reads what is left, so the demo never blocks on it
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
