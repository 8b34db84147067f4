"""One cycle for one server: poll, decide, signal, and report every decision.

`cycle` runs it (observe -> decide -> act -> report), `report` holds what it returns and turns
each outcome into an audit event, `memory` what the daemon keeps of a server between cycles,
`armed` what a poll arms and what an armed timer signals (the daemon's armed signals).
"""

from reaper.sweep.cycle import HaLock, Mode, connect, sweep, visibility_warnings
from reaper.sweep.memory import Cancels, LoggedEpisodes, Memory
from reaper.sweep.report import (
    Outcome,
    ServerRun,
    SweepReport,
    audit_event,
    audit_fields,
    audit_record,
)

__all__ = [
    "Cancels",
    "HaLock",
    "LoggedEpisodes",
    "Memory",
    "Mode",
    "Outcome",
    "ServerRun",
    "SweepReport",
    "audit_event",
    "audit_fields",
    "audit_record",
    "connect",
    "sweep",
    "visibility_warnings",
]
