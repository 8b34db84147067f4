"""The act step of a cycle: signal the victims of a plan (race-safely, by their policy's action,
cancel-then-terminate included) and say what became of every candidate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from reaper.pg.connection import PostgresError
from reaper.policy import Decision, Plan, Result
from reaper.sweep.report import Outcome

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from datetime import datetime

    from reaper.pg.activity import ServerConnection
    from reaper.sweep.memory import Cancels, LoggedEpisodes

__all__ = ["execute"]


def execute(  # noqa: PLR0913 - keyword-only, each one a collaborator of the act step
    conn: ServerConnection,
    decided: Plan,
    *,
    dry_run: bool,
    lock_key: int | None,
    cancels: Cancels | None,
    logged: LoggedEpisodes | None,
    due: Mapping[int, datetime] | None = None,
) -> tuple[Outcome, ...]:
    """What becomes of every candidate of `decided`: logged (each episode once, with `logged`),
    deferred, denied, or signalled (a cancel of a policy with escalate_after remembered in
    `cancels`, and escalated to terminate once due); in a dry run, signalled by nobody. A
    victim with a server time in `due` (armed signals) is signalled only once it has passed."""
    results: dict[int, tuple[Result, str | None]] = {}
    escalated: set[int] = set()
    for decision in decided.log:
        name = decision.policy.name if decision.policy else ""
        first = logged is None or logged.first(decision.session, policy=name)
        results[decision.session.pid] = (Result.LOGGED if first else Result.ALREADY_LOGGED, None)
    for decision in decided.deferred:
        results[decision.session.pid] = (Result.DEFERRED, None)
    for decision in decided.denied:
        results[decision.session.pid] = (
            Result.DENIED,
            "the reaper's role may not signal this session (superuser, or no pg_signal_backend)",
        )
    if dry_run:
        results.update({d.session.pid: (Result.DRY_RUN, None) for d in decided.signal})
    else:
        escalated = _signal(
            conn, decided.signal, results, lock_key=lock_key, cancels=cancels, due=due
        )
    return tuple(
        Outcome(
            decision=d,
            result=results[d.session.pid][0],
            detail=results[d.session.pid][1],
            escalated=d.session.pid in escalated,
        )
        for d in decided.candidates
    )


def _signal(
    conn: ServerConnection,
    victims: Iterable[Decision],
    results: dict[int, tuple[Result, str | None]],
    *,
    lock_key: int | None,
    cancels: Cancels | None,
    due: Mapping[int, datetime] | None,
) -> set[int]:
    """Signal `victims` by their policy's action, a cancel that did not stop its session
    escalated to terminate; the results go in `results`. The pids escalated."""
    actions: dict[str, list[Decision]] = {"terminate": [], "cancel": []}
    escalated: set[int] = set()
    for d in victims:
        assert d.policy is not None  # noqa: S101 - victims carry their policy
        escalation = None if cancels is None else cancels.due_in(d.session, d.policy)
        if escalation is None:
            actions[d.policy.action].append(d)
        elif escalation <= 0:
            actions["terminate"].append(d)  # the cancel did not stop it: escalate
            escalated.add(d.session.pid)
        else:
            results[d.session.pid] = (Result.ESCALATION_PENDING, None)
    for action in ("terminate", "cancel"):
        sessions = [d.session for d in actions[action]]
        # A victim of a when_blocking policy must still block when it is signalled.
        blocking = {
            d.session.pid: d.policy.when_blocking
            for d in actions[action]
            if d.policy is not None and d.policy.when_blocking is not None
        }
        try:
            results.update(
                conn.signal(sessions, action=action, lock_key=lock_key, blocking=blocking, due=due)
            )
        except PostgresError as exc:
            results.update({s.pid: (Result.ERROR, str(exc)) for s in sessions})
    if cancels is not None:
        _remember(cancels, actions, results, escalated)
    return escalated


def _remember(
    cancels: Cancels,
    actions: dict[str, list[Decision]],
    results: dict[int, tuple[Result, str | None]],
    escalated: set[int],
) -> None:
    """Note the cancels that may need escalating; forget the sessions escalated."""
    for d in actions["cancel"]:
        cancelled = results[d.session.pid][0] is Result.CANCELLED
        if cancelled and d.policy and d.policy.escalate_after is not None:
            cancels.remember(d.session, policy=d.policy.name)
    for d in actions["terminate"]:
        if d.session.pid in escalated and results[d.session.pid][0] in _FINAL:
            cancels.forget(d.session)


# What ends the story of an escalated session: signalled, or found gone or changed.
_FINAL = frozenset({Result.TERMINATED, Result.GONE, Result.CHANGED})
