"""What the configuration tests share."""

from __future__ import annotations

import os

import pytest

PASSWORD = "Sentinel-Pa55"

MINIMAL = """
[[servers]]
name = "primary"
dsn = "host=/tmp dbname=postgres"

[[policies]]
name = "idle"
max_idle = "15m"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PG_REAPER_* variable of the calling shell may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("PG_REAPER_"):
            monkeypatch.delenv(name)
