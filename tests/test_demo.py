"""`pg-reaper demo`: the README's first command, end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_reaps_idle_sessions_spares_psql_and_active_and_cleans_up(pg_major: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "reaper", "demo", "--major", str(pg_major)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("demo ")]
    reaped = [line for line in rows if line.rstrip().endswith("terminated")]
    assert len(reaped) == 4
    assert {line.split()[4] for line in reaped} == {"web-app", "batch-job"}
    left = proc.stdout.split("The server's own view of the client sessions left:")[1]
    assert left.split("Stopping")[0].split() == ["psql", "idle", "report", "active"]
    assert "password" not in proc.stdout
    base_dir = Path(proc.stdout.split("Its files are in ")[1].split()[0].rstrip("."))
    assert base_dir.name.startswith("pg-reaper-")
    assert not base_dir.exists()  # the server's files are gone
