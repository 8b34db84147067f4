"""Armed signals (docs/semantics.md): after a poll, the sessions still under a threshold whose
future decision is a signal, each with the moment it becomes eligible; and, at that moment, the
race-safe signal of those due, reported as a cycle's victims are.

Which sessions are armed is the policy engine's own answer for the session aged to its crossing,
first matching policy wins; the signalling statement checks the age again by the server's clock
(signal.sql), so that a timer firing early signals nobody.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING

from reaper.policy import (
    Decision,
    Plan,
    Result,
    can_signal,
    evaluate,
    oldest_first,
    seconds_until_eligible,
)
from reaper.sweep.act import execute
from reaper.sweep.report import Outcome, SweepReport

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from reaper.pg.activity import ServerConnection
    from reaper.policy import Session
    from reaper.settings import PolicyConfig, ServerConfig, Settings
    from reaper.sweep.memory import Memory

__all__ = ["ARMED_REASON", "Armed", "Arming", "arming", "fire", "reported"]

# How far past its crossing a session is aged to ask the engine what it will be: eligibility is
# "age > threshold", strictly.
_PAST = 0.001
# Said in the reason of an armed signal's audit event.
ARMED_REASON = "armed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Armed:
    """A session to signal once it becomes eligible, if it has not changed by then."""

    decision: Decision  # the engine's, for the session aged past its crossing
    due: datetime  # the server time of its crossing (the column plus the threshold)
    at: float  # the same moment by time.monotonic(), as the poll's clock says

    @property
    def pid(self) -> int:
        return self.decision.session.pid


@dataclass(frozen=True, slots=True, kw_only=True)
class Arming:
    """What a poll arms, and the crossings left for the next polls (`eligible_in`)."""

    victims: tuple[Armed, ...] = ()  # earliest first
    eligible_in: float | None = None


def arming(
    report: SweepReport,
    *,
    server: ServerConfig,
    settings: Settings,
    horizon: float | None = None,
) -> Arming:
    """The sessions of `report` to arm: only after a successful poll by the leader that may
    signal (not a dry run, not a preview). The others are left to the polls (`eligible_in`):
    those a `log`, pressure or when_blocking policy would take, and escalations. With
    `horizon`, a session that crosses later than that many seconds after the poll is left to
    the polls too: they come sooner than that, and the one before its moment arms it."""
    if (
        not report.ok
        or report.dry_run
        or not report.leader
        or report.polled is None
        or report.facts is None
    ):
        return Arming(eligible_in=report.eligible_in)
    if any(o.result is Result.DEFERRED for o in report.outcomes):
        # Victims held back by the cap: the next poll comes at once and arms then.
        return Arming(eligible_in=report.eligible_in)
    if horizon is not None and (report.eligible_in is None or report.eligible_in > horizon):
        # The poll's earliest crossing (an escalation's included) is past the horizon.
        return Arming(eligible_in=report.eligible_in)
    policies = settings.policies_for(server)
    by_name = {p.name: p for p in policies}
    now, sent = report.polled
    candidates = {o.decision.session.pid for o in report.outcomes}
    victims: list[Armed] = []
    left = [report.escalation_in]
    for session in report.sessions:
        if session.pid in candidates:
            continue
        delta = seconds_until_eligible(
            session, policies, reaper=settings.reaper, facts=report.facts
        )
        if delta is None:
            continue
        if horizon is not None and delta > horizon:
            left.append(delta)  # for a later poll to arm
            continue
        decision = evaluate(
            _aged(session, delta + _PAST), policies, reaper=settings.reaper, facts=report.facts
        )
        policy = None if decision.policy is None else by_name.get(decision.policy.name)
        if policy is None or not _armable(policy) or not can_signal(session, report.facts):
            left.append(delta)
            continue
        victims.append(
            Armed(
                decision=replace(decision, reason=f"{decision.reason} ({ARMED_REASON})"),
                due=now + timedelta(microseconds=math.ceil(delta * 1_000_000)),
                at=sent + delta,
            )
        )
    victims.sort(key=lambda a: (a.at, -a.decision.session.age_in_state, a.pid))
    return Arming(
        victims=tuple(victims), eligible_in=min((t for t in left if t is not None), default=None)
    )


def _armable(policy: PolicyConfig) -> bool:
    """Whether a victim of `policy` may be signalled without a poll at its moment: a pressure
    policy's allowance and a lock wait are the poll's to judge, a `log` policy signals nothing."""
    return policy.action != "log" and not policy.pressure and policy.when_blocking is None


def _aged(session: Session, seconds: float) -> Session:
    """`session` as a poll `seconds` later would see it, nothing else having changed."""

    def older(age: float | None) -> float | None:
        return None if age is None else age + seconds

    return replace(
        session,
        idle_seconds=older(session.idle_seconds),
        transaction_seconds=older(session.transaction_seconds),
        runtime_seconds=older(session.runtime_seconds),
        connection_seconds=older(session.connection_seconds),
    )


def fire(
    conn: ServerConnection,
    victims: Sequence[Armed],
    *,
    server: str,
    settings: Settings,
    lock_key: int | None,
    memory: Memory | None,
) -> SweepReport:
    """Signal `victims` (due now) race-safely, oldest first and within
    `max_terminations_per_cycle` (the rest `deferred`, for a poll to take); each is signalled
    only if unchanged since the poll and past its threshold by the server's clock (else
    `changed`, `gone` or `not_due`). Raises PostgresError when the session is lost."""
    started = time.perf_counter()
    ordered = oldest_first(a.decision for a in victims)
    cap = settings.reaper.max_terminations_per_cycle
    outcomes = execute(
        conn,
        Plan(signal=ordered[:cap], deferred=ordered[cap:]),
        dry_run=False,
        lock_key=lock_key,
        cancels=None if memory is None else memory.cancels,
        logged=None,
        due={a.pid: a.due for a in victims},
    )
    return SweepReport(
        server=server,
        dry_run=False,
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
        outcomes=outcomes,
        leader=not any(o.result is Result.NOT_LEADER for o in outcomes),
    )


def reported(outcomes: Sequence[Outcome]) -> tuple[Outcome, ...]:
    """The outcomes of a firing that are audited and counted as a cycle's: a session that
    changed or left before its moment was simply never a victim (a poll sees it again)."""
    return tuple(o for o in outcomes if o.result not in {Result.CHANGED, Result.GONE})
