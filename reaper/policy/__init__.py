"""The policy engine: a pure function from session snapshots and rules to decisions.

No database and no clock of its own: every age was computed by the server's clock when the
snapshot was taken. `evaluate` decides one session; `plan` orders and caps one server's cycle.

The values live in `_values`, one session's evaluation in `_evaluate`, connection pressure in
`_pressure`, the cycle's plan in `_plan`; import them from here.
"""

from reaper.policy._evaluate import can_signal, evaluate, in_networks, seconds_until_eligible
from reaper.policy._plan import plan
from reaper.policy._pressure import PRESSURE_UNKNOWN, pressure_held
from reaper.policy._values import (
    CLIENT_BACKEND,
    DROPPED_ROLE,
    HIDDEN_BACKEND,
    Action,
    Decision,
    Plan,
    Result,
    RoleConnections,
    Rule,
    ServerFacts,
    Session,
)

__all__ = [
    "CLIENT_BACKEND",
    "DROPPED_ROLE",
    "HIDDEN_BACKEND",
    "PRESSURE_UNKNOWN",
    "Action",
    "Decision",
    "Plan",
    "Result",
    "RoleConnections",
    "Rule",
    "ServerFacts",
    "Session",
    "can_signal",
    "evaluate",
    "in_networks",
    "plan",
    "pressure_held",
    "seconds_until_eligible",
]
