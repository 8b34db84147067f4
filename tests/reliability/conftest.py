"""What the reliability suite shares with pytest: which majors it runs on, and the soak gate.

The short forms run in CI on PostgreSQL 14 and 18 only (the oldest and the newest supported
major), so that a CI run over 14-18 stays fast; `PG_REAPER_RELIABILITY_ALL_MAJORS=1` runs them on
every major asked for. Tests marked `soak` run only when `-m` names them (`-m soak`): pyproject's
`addopts` deselects them, and so does this hook when another `-m` replaces that default.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CI_MAJORS = frozenset({14, 18})
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A hook of a sub-directory's conftest still sees every item of the session: only ours.
    ours = [item for item in items if HERE in Path(str(item.path)).parents]
    every_major = os.environ.get("PG_REAPER_RELIABILITY_ALL_MAJORS", "") not in {"", "0"}
    for item in ours:
        callspec = getattr(item, "callspec", None)
        major = callspec.params.get("pg_major") if callspec is not None else None
        if major is not None and major not in CI_MAJORS and not every_major:
            item.add_marker(
                pytest.mark.skip(
                    reason=f"reliability tests run on PostgreSQL 14 and 18 only, not {major} "
                    "(PG_REAPER_RELIABILITY_ALL_MAJORS=1 for every major)"
                )
            )
    if "soak" in (config.option.markexpr or ""):
        return
    soak = [item for item in ours if item.get_closest_marker("soak") is not None]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if item not in soak]
