"""What the observers (metrics, notifications) read of one cycle's report: reaper.sweep's
`SweepReport` and its outcomes, as protocols, since observe sits below sweep in the house."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from reaper.policy import Decision, Result, ServerFacts, Session

__all__ = ["CycleOutcome", "CycleReport"]


class CycleOutcome(Protocol):
    """One matched session's outcome (reaper.sweep's `Outcome`)."""

    @property
    def policy(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def result(self) -> Result: ...
    @property
    def decision(self) -> Decision: ...


class CycleReport(Protocol):
    """One cycle on one server (reaper.sweep's `SweepReport`)."""

    @property
    def server(self) -> str: ...
    @property
    def dry_run(self) -> bool: ...
    @property
    def duration_ms(self) -> float: ...
    @property
    def facts(self) -> ServerFacts | None: ...
    @property
    def sessions(self) -> Sequence[Session]: ...
    @property
    def outcomes(self) -> Sequence[CycleOutcome]: ...
    @property
    def pressure(self) -> Sequence[tuple[str, bool]]: ...
