"""What a notification says: a cycle's report folded into a `Summary` (counts by policy and
result, the oldest victims; never a query text), and a `Summary` rendered as a title and a body.
Pure: no I/O. reaper/observe/notifications.py sends them."""

from __future__ import annotations

import collections
import ipaddress
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from reaper.policy import Result
from reaper.settings import ALL_STATES, format_duration

if TYPE_CHECKING:
    from collections.abc import Sequence

    from reaper.observe.cycle import CycleReport
    from reaper.policy import Session

__all__ = ["Summary", "Victim", "render", "summarize"]

# What a message calls each result that makes one.
_DONE = {Result.TERMINATED: "terminated", Result.CANCELLED: "cancelled", Result.LOGGED: "logged"}
_WOULD = {"terminate": "would terminate", "cancel": "would cancel", "log": "logged"}
_FAILED = {Result.GONE: "gone", Result.CHANGED: "changed", Result.DENIED: "denied"}
_FAILED[Result.ERROR] = "error"
_TEXT_LIMIT = 64  # characters of a name from the server (user, application, ...) a message shows


# --- what a message says -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Victim:
    """One reaped session, as a message lists it."""

    pid: int
    user: str | None
    application: str
    database: str | None
    client_addr: str | None
    state: str | None
    age: float  # seconds in its state (idle, or running)
    policy: str
    done: str  # terminated, cancelled, logged, would terminate, ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """What one or more cycles of one server reaped: the contents of one message."""

    server: str
    cycles: int
    first: float  # Unix time of the first cycle summed
    last: float
    # (policy, what was done) -> sessions
    counts: dict[tuple[str, str], int]
    failed: dict[str, int]  # reason -> victims that could not be signalled
    victims: tuple[Victim, ...]  # the oldest, at most [notify] victims
    dry_run: bool  # every cycle summed was a dry run

    @property
    def sessions(self) -> int:
        return sum(self.counts.values())

    def plus(self, other: Summary, *, keep: int) -> Summary:
        counts = collections.Counter(self.counts)
        counts.update(other.counts)
        failed = collections.Counter(self.failed)
        failed.update(other.failed)
        return Summary(
            server=self.server,
            cycles=self.cycles + other.cycles,
            first=min(self.first, other.first),
            last=max(self.last, other.last),
            counts=dict(counts),
            failed=dict(failed),
            victims=_oldest((*self.victims, *other.victims), keep),
            dry_run=self.dry_run and other.dry_run,  # a reload may end a dry run mid-window
        )


def summarize(report: CycleReport, *, keep: int, at: float | None = None) -> Summary | None:
    """What `report`'s cycle reaped (None when it reaped nothing: no message), with the `keep`
    oldest victims."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    failed: collections.Counter[str] = collections.Counter()
    victims = []
    for outcome in report.outcomes:
        decision = outcome.decision
        policy = decision.policy.name if decision.policy is not None else ""
        if outcome.result is Result.DRY_RUN:
            done = _WOULD.get(outcome.action, f"would {outcome.action}")
        elif (word := _DONE.get(outcome.result)) is not None:
            done = word
        else:
            if (reason := _FAILED.get(outcome.result)) is not None:
                failed[reason] += 1
            continue
        counts[policy, done] += 1
        victims.append(_victim(decision.session, policy=policy, done=done))
    if not counts:
        return None
    now = time.time() if at is None else at
    return Summary(
        server=report.server,
        cycles=1,
        first=now,
        last=now,
        counts=dict(counts),
        failed=dict(failed),
        victims=_oldest(victims, keep),
        dry_run=report.dry_run,
    )


def _victim(session: Session, *, policy: str, done: str) -> Victim:
    running = session.state in {"active", "fastpath function call"}
    age = session.runtime_seconds if running else session.idle_seconds
    return Victim(
        pid=session.pid,
        user=session.user,
        application=session.application,
        database=session.database,
        client_addr=session.client_addr,
        state=session.state,
        age=age if age is not None else session.age_in_state,
        policy=policy,
        done=done,
    )


def _oldest(victims: Sequence[Victim], keep: int) -> tuple[Victim, ...]:
    return tuple(sorted(victims, key=lambda v: (-v.age, v.pid))[:keep])


def render(summary: Summary, *, instance: str, prefix: str) -> tuple[str, str]:
    """(title, body) of the message for `summary`: plain text, every name that comes from a
    server quoted and cut short (it is untrusted: an application_name can say anything)."""
    by_done: collections.Counter[str] = collections.Counter()
    for (_policy, done), count in summary.counts.items():
        by_done[done] += count
    totals = ", ".join(f"{count} {done}" for done, count in sorted(by_done.items()))
    title = f"{prefix} on {summary.server}: {totals}"
    if summary.dry_run:
        title += " (dry run)"
    lines = [f"Server {summary.server}, instance {instance}, {_when(summary)}."]
    if summary.dry_run:
        lines.append("Dry run: no session was signalled.")
    lines += ["", "By policy:"]
    lines += [
        f"  {policy or '-'}: {count} {done}"
        for (policy, done), count in sorted(summary.counts.items())
    ]
    if summary.failed:
        failed = ", ".join(f"{count} {reason}" for reason, count in sorted(summary.failed.items()))
        lines.append(f"Could not be signalled: {failed}.")
    if summary.victims:
        lines += ["", f"Oldest ({len(summary.victims)} of {summary.sessions}):"]
        lines += [f"  {_describe(v)}" for v in summary.victims]
    return title, "\n".join(lines)


def _when(summary: Summary) -> str:
    first = datetime.fromtimestamp(summary.first, UTC).strftime("%Y-%m-%d %H:%M:%S")
    if summary.cycles == 1:
        return f"1 cycle at {first} UTC"
    last = datetime.fromtimestamp(summary.last, UTC).strftime("%H:%M:%S")
    return f"{summary.cycles} cycles from {first} to {last} UTC"


def _describe(victim: Victim) -> str:
    where = ", ".join(
        f"{name} {_quoted(value)}"
        for name, value in (
            ("user", victim.user),
            ("application", victim.application),
            ("database", victim.database),
        )
        if value is not None
    )
    age = format_duration(timedelta(seconds=round(victim.age)))
    # The policy's name comes from the config (printable); the rest from the server.
    return (
        f"pid {victim.pid}, {where}, from {_address(victim.client_addr)}: "
        f"{_state(victim.state)} for {age} (policy {victim.policy or '-'}, {victim.done})"
    )


def _address(client_addr: str | None) -> str:
    if client_addr is None:
        return "local"
    try:
        return str(ipaddress.ip_address(client_addr))
    except ValueError:
        return _quoted(client_addr)


def _state(state: str | None) -> str:
    if state is None:
        return "unknown state"
    return state if state in ALL_STATES else _quoted(state)


def _quoted(text: str) -> str:
    """`text` in double quotes, control characters escaped, cut at `_TEXT_LIMIT` characters."""
    shown = []
    for char in text[:_TEXT_LIMIT]:
        if char in '"\\':
            shown.append("\\" + char)
        elif char.isprintable():
            shown.append(char)
        else:
            shown.append(char.encode("unicode_escape").decode("ascii"))
    return f'"{"".join(shown)}{"…" if len(text) > _TEXT_LIMIT else ""}"'
