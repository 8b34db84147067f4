"""A server's connection slots: client sessions against max_connections, less the reserved slots.

Shared by `doctor` (is the server about to refuse connections?) and `sessions` (the counts).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Connections", "percent"]


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
        return percent(self.client_sessions, self.usable)


def percent(part: int, whole: int) -> float:
    """`part` as a share of `whole`; 100 when there is no `whole` at all."""
    return 100.0 * part / whole if whole > 0 else 100.0
