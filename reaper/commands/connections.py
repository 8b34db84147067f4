"""A server's connection slots and how many are in use, as `doctor` and `sessions` show them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Connections", "percent_of"]


def percent_of(part: int, whole: int) -> float:
    """`part` as a share of `whole`; with no slot at all (0, or a limit below it) it is full."""
    return 100.0 * part / whole if whole > 0 else 100.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Connections:
    """Client sessions against max_connections, less the slots reserved for some roles."""

    client_sessions: int  # the reaper's own included
    hidden_sessions: int  # rows whose kind the reaper's role may not see (counted as clients)
    disabled_sessions: int  # state 'disabled': track_activities off in that session
    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int | None  # PostgreSQL 16+; None before

    @property
    def usable(self) -> int:
        """Slots open to a role that is neither superuser nor granted reserved connections."""
        return max(
            0,
            self.max_connections
            - self.superuser_reserved_connections
            - (self.reserved_connections or 0),
        )

    @property
    def percent(self) -> float:
        return percent_of(self.client_sessions, self.usable)

    def usage(self) -> str:
        """One line: the sessions against the usable slots, and the settings that make them."""
        reserved = (
            f", {self.reserved_connections} reserved_connections"
            if self.reserved_connections is not None
            else ""
        )
        return (
            f"{self.client_sessions} client sessions of {self.usable} usable slots "
            f"({self.percent:.0f}%): max_connections {self.max_connections}, "
            f"{self.superuser_reserved_connections} superuser_reserved_connections{reserved}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "client_sessions": self.client_sessions,
            "hidden_sessions": self.hidden_sessions,
            "disabled_sessions": self.disabled_sessions,
            "max_connections": self.max_connections,
            "superuser_reserved_connections": self.superuser_reserved_connections,
            "reserved_connections": self.reserved_connections,
            "usable": self.usable,
            "percent": round(self.percent, 1),
        }
