"""`pg-reaper doctor`: what each server and the reaper's role on it look like, and what is wrong.

A thin I/O shell (`examine`: one read-only round of queries through `ServerConnection`) around a
pure core: `read_state` (doctor_state.py) turns the rows into a `ServerState`, `diagnose`
(doctor_diagnosis.py) turns that and the server's policies into problems (exit 1), warnings and
notes; doctor_render.py prints them as text or JSON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reaper.commands.connections import Connections
from reaper.commands.doctor_diagnosis import (
    PROBLEM_PERCENT,
    WARNING_PERCENT,
    Diagnosis,
    Finding,
    ServerReport,
    diagnose,
    failed,
    timeout_notes,
)
from reaper.commands.doctor_render import render_json, render_text
from reaper.commands.doctor_state import (
    TIMEOUTS,
    Limit,
    Privileges,
    ServerState,
    Setting,
    pg_milliseconds,
    read_state,
)
from reaper.pg.connection import PostgresError
from reaper.pg.doctor import doctor_rows

if TYPE_CHECKING:
    from collections.abc import Sequence

    from reaper.pg.activity import ServerConnection
    from reaper.settings import PolicyConfig

__all__ = [
    "PROBLEM_PERCENT",
    "TIMEOUTS",
    "WARNING_PERCENT",
    "Connections",
    "Diagnosis",
    "Finding",
    "Limit",
    "Privileges",
    "ServerReport",
    "ServerState",
    "Setting",
    "diagnose",
    "examine",
    "failed",
    "pg_milliseconds",
    "read_state",
    "render_json",
    "render_text",
    "timeout_notes",
    "unreachable",
]


def examine(
    conn: ServerConnection, *, server: str, policies: Sequence[PolicyConfig]
) -> ServerReport:
    """Query one server (read-only) and diagnose it; an unreachable server is a problem too."""
    try:
        state = read_state(doctor_rows(conn))
    except PostgresError as exc:
        return unreachable(server=server, target=conn.target, error=str(exc))
    return ServerReport(
        server=server,
        target=conn.target,
        state=state,
        diagnosis=diagnose(state, policies=policies),
    )


def unreachable(*, server: str, target: str, error: str) -> ServerReport:
    """The report of a server that could not be examined: its error is its problem."""
    return ServerReport(
        server=server, target=target, state=None, error=error, diagnosis=failed(error)
    )
