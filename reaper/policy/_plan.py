"""One server's cycle: every session decided oldest idle first, pressure policies within their
allowance, then the victims sorted into signalled, logged, deferred by the cap, and denied."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from reaper.policy._evaluate import can_signal, decide, evaluate
from reaper.policy._pressure import level, role_connections
from reaper.policy._values import Decision, Plan, age_order, oldest_first

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from reaper.policy._values import ServerFacts, Session
    from reaper.settings import PolicyConfig, ReaperSection


def plan(
    sessions: Iterable[Session],
    policies: Sequence[PolicyConfig],
    *,
    reaper: ReaperSection,
    facts: ServerFacts,
) -> Plan:
    """Decide every session of one poll, then order and cap the victims.

    Sessions are decided oldest idle first, the order in which pressure policies spend their
    allowance: they reap only down to their level (docs/pressure.md).
    """
    ordered = sorted(sessions, key=age_order)
    take = None
    if any(p.pressure for p in policies):
        take = _Allowance(ordered, policies, reaper=reaper, facts=facts).take
    matched: list[Decision] = []
    spared: list[Decision] = []
    for session in ordered:
        decision = decide(session, policies, reaper=reaper, facts=facts, take=take)
        (matched if decision.matched else spared).append(decision)
    signal: list[Decision] = []
    log: list[Decision] = []
    deferred: list[Decision] = []
    denied: list[Decision] = []
    for decision in oldest_first(matched):
        assert decision.policy is not None  # noqa: S101 - matched decisions carry a policy
        if decision.policy.action == "log":
            log.append(decision)
        elif not can_signal(decision.session, facts):
            denied.append(decision)
        elif len(signal) < reaper.max_terminations_per_cycle:
            signal.append(decision)
        else:
            deferred.append(decision)
    return Plan(
        signal=tuple(signal),
        log=tuple(log),
        deferred=tuple(deferred),
        denied=tuple(denied),
        spared=tuple(spared),
    )


class _Allowance:
    """How many victims the pressure policies may still take this cycle, spent oldest first.

    The counts start from the poll's, less the sessions that a policy without pressure
    terminates this cycle anyway. Every victim a pressure policy takes brings the count of the
    server and of the victim's role down by one; a policy takes none once the counts its
    conditions look at are down to its level. A `log` policy counts its own victims as if it
    terminated them (it shows what it would do) but lowers no count for the other policies.
    Victims the reaper may not signal free no slot and cost nothing (they are reported denied).
    """

    def __init__(
        self,
        sessions: Sequence[Session],
        policies: Sequence[PolicyConfig],
        *,
        reaper: ReaperSection,
        facts: ServerFacts,
    ) -> None:
        self._facts = facts
        plain = [p for p in policies if not p.pressure]
        self._relieving = {
            s.pid: s
            for s in sessions
            if (d := evaluate(s, plain, reaper=reaper, facts=facts)).policy is not None
            and d.policy.action == "terminate"
            and can_signal(s, facts)
        }
        self._server = facts.client_sessions - len(self._relieving)
        self._roles: Counter[str | None] = Counter({r.role: r.sessions for r in facts.roles})
        self._roles.subtract(s.user for s in self._relieving.values())
        # What each `log` policy has taken: of the server's count, and of each role's.
        self._logged: Counter[str] = Counter()
        self._logged_roles: dict[str, Counter[str | None]] = {}

    def take(self, session: Session, policy: PolicyConfig, why: str) -> tuple[bool, str]:
        """Whether `policy`, which matches `session`, may take it as a victim, and why."""
        if not policy.pressure:
            return True, why
        user = session.user
        logs = policy.action == "log"
        if not logs and (session.pid in self._relieving or not can_signal(session, self._facts)):
            return True, why  # terminated by a later policy anyway, or frees no slot
        own = self._logged_roles.setdefault(policy.name, Counter()) if logs else Counter()
        # A session a later policy would terminate keeps its slot if this one only logs it.
        back = int(logs and session.pid in self._relieving)
        short = self._short(
            policy,
            user=user,
            server=self._server + back - (self._logged[policy.name] if logs else 0),
            role=self._roles[user] + back - own[user],
        )
        if short is not None:
            return False, short
        if logs:
            self._logged[policy.name] += 1
            own[user] += 1
            if back:
                del self._relieving[session.pid]
                self._server += 1
                self._roles[user] += 1
        else:
            self._server -= 1
            self._roles[user] -= 1
        return True, why

    def _short(
        self, policy: PolicyConfig, *, user: str | None, server: int, role: int
    ) -> str | None:
        """Why `policy` may take no more victims (of `user`), given the counts left; None if
        it may."""
        percent = policy.when_connections_above
        if percent is not None:
            mark = level(self._facts.usable_connections, percent)
            if server <= mark:
                return (
                    "other victims this cycle already bring connections down to "
                    f"when_connections_above {percent}% ({mark})"
                )
        percent = policy.when_role_connections_above
        limits = role_connections(self._facts, user)
        if percent is not None and limits is not None:
            mark = level(limits.limit, percent)
            if role <= mark:
                return (
                    f"other victims this cycle already bring role {user!r} down to "
                    f"when_role_connections_above {percent}% ({mark})"
                )
        return None
