"""Operator workflows: `pg-reaper sessions`, `kill` and `unblock`.

`sessions` counts one server's client sessions by state, database, role or application, against
the server's usable slots and each role's and database's connection limit. `kill` terminates
every client session that matches the operator's filters, in any state, through the daemon's
race-safe path (`ServerConnection.signal`) and with the daemon's audit events; with `block` it
first stops new connections to the database, then waits until nothing uses it any more, so that
DROP DATABASE or ALTER DATABASE ... RENAME succeeds right after. `unblock` lets connections in
again.

Pure cores (`count_states`, `count_groups`, `select_victims`) behind thin shells (`census`,
`kill`, `unblock`) that talk to the server only through `ServerConnection`.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TextIO

from reaper.commands.doctor import Connections
from reaper.identifiers import quote_identifier
from reaper.observe.log import get_logger
from reaper.output import human_duration, render_table, safe_text
from reaper.pg.connection import PostgresError
from reaper.pg.doctor import connection_limits
from reaper.pg.kill import allow_connections, database_blockers
from reaper.policy import (
    CLIENT_BACKEND,
    Decision,
    Result,
    Rule,
    ServerFacts,
    Session,
    in_networks,
)
from reaper.settings import ALL_STATES, parse_duration
from reaper.sweep import Outcome, SweepReport, audit_event, visibility_warnings

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from datetime import datetime, timedelta

    from reaper.pg.activity import ServerConnection
    from reaper.settings import ClientNetwork

__all__ = [
    "GROUPINGS",
    "KILL_RULE",
    "Count",
    "KillPlan",
    "KillReport",
    "KillTarget",
    "SessionCounts",
    "ask_on_terminal",
    "census",
    "count_groups",
    "count_states",
    "hidden_matches",
    "kill",
    "kill_target",
    "parse_client_addr",
    "parse_wait",
    "render_counts_json",
    "render_counts_text",
    "render_kill",
    "render_unblocked",
    "render_victims",
    "select_victims",
    "unblock",
]

Grouping = Literal["state", "database", "user", "application"]
GROUPINGS: tuple[Grouping, ...] = ("state", "database", "user", "application")
# The state of a row the reaper's role may not see (NULL in pg_stat_activity): the metrics'
# `state="unknown"` too.
UNKNOWN_STATE = "unknown"
_HIDDEN = "unknown"  # poll.sql's backend_type for a row whose kind is hidden

# Every victim of `kill` is decided by this one rule: the audit events, the table and the JSON
# of `once` then say `policy = "kill"`, `action = "terminate"` with no special case.
KILL_RULE = Rule(name="kill", action="terminate")

# Backends that go away once the client sessions of a database are terminated: a parallel
# worker ends with its leader. Any other kind (walsender, logical replication worker,
# background worker) and prepared transactions stay: kill reports them instead of waiting.
_ENDED_BY_KILL = frozenset({CLIENT_BACKEND, "parallel worker"})
_PAUSE_SECONDS = 0.05


# --- sessions: the pure core ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Count:
    """Client sessions of one state, database, role or application."""

    name: str | None  # None: not visible to the reaper's role (no pg_read_all_stats)
    sessions: int
    connection_limit: int | None = None  # rolconnlimit / datconnlimit when >= 0

    @property
    def percent(self) -> float | None:
        if self.connection_limit is None:
            return None
        if self.connection_limit <= 0:
            return 100.0
        return 100.0 * self.sessions / self.connection_limit


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionCounts:
    """`pg-reaper sessions` for one server."""

    server: str
    target: str  # host:port, never a secret
    by: Grouping
    error: str | None = None
    connections: Connections | None = None
    states: tuple[Count, ...] = ()
    groups: tuple[Count, ...] = ()  # by `by`; the states again for "state"

    @property
    def ok(self) -> bool:
        return self.error is None


def count_states(sessions: Iterable[Session]) -> tuple[Count, ...]:
    """Client sessions by state: every state PostgreSQL reports, 0 included, then `unknown`
    (a row the reaper's role may not see); a state unknown to pg-reaper is listed by its name."""
    counts = dict.fromkeys((*ALL_STATES, UNKNOWN_STATE), 0)
    for session in sessions:
        state = UNKNOWN_STATE if session.state is None else session.state
        counts[state] = counts.get(state, 0) + 1
    return tuple(Count(name=name, sessions=n) for name, n in counts.items())


def count_groups(
    sessions: Iterable[Session], *, by: Grouping, limits: Sequence[Mapping[str, Any]] = ()
) -> tuple[Count, ...]:
    """Client sessions per database, role or application, most first. A role or database with
    a connection limit (`limits`: doctor_limits.sql rows) is listed with it, even without
    sessions."""
    if by == "state":
        return count_states(sessions)
    kind = {"database": "database", "user": "role"}.get(by)
    limit_of: dict[str | None, int] = {
        row["name"]: row["connection_limit"] for row in limits if row["kind"] == kind
    }
    counts: dict[str | None, int] = dict.fromkeys(limit_of, 0)
    for session in sessions:
        key = _group_key(session, by)
        counts[key] = counts.get(key, 0) + 1
    groups = [
        Count(name=k, sessions=n, connection_limit=limit_of.get(k)) for k, n in counts.items()
    ]
    return tuple(sorted(groups, key=lambda c: (-c.sessions, c.name is None, c.name or "")))


def _group_key(session: Session, by: Grouping) -> str | None:
    if by == "database":
        return session.database
    if by == "user":
        return session.user
    # The application of a hidden row is NULL, not an empty application_name.
    return None if session.backend_type == _HIDDEN else session.application


def _connections(row: Mapping[str, Any], sessions: Sequence[Session]) -> Connections:
    """The server's slots (doctor_connections.sql), with the sessions counted from the poll so
    that every number shown comes from one snapshot."""
    return Connections(
        client_sessions=len(sessions),
        hidden_sessions=sum(s.backend_type == _HIDDEN for s in sessions),
        disabled_sessions=sum(s.state == "disabled" for s in sessions),
        max_connections=row["max_connections"],
        superuser_reserved_connections=row["superuser_reserved_connections"],
        reserved_connections=row["reserved_connections"],
    )


# --- sessions: the shell and output -----------------------------------------------------------


def census(conn: ServerConnection, *, server: str, by: Grouping) -> SessionCounts:
    """Count one server's client sessions; an unreachable server is reported, not raised."""
    try:
        snapshot = conn.poll()
        rows = connection_limits(conn)
    except PostgresError as exc:
        return SessionCounts(server=server, target=conn.target, by=by, error=str(exc))
    if not rows["connections"]:
        return SessionCounts(server=server, target=conn.target, by=by, error="no answer")
    sessions = snapshot.sessions
    return SessionCounts(
        server=server,
        target=conn.target,
        by=by,
        connections=_connections(rows["connections"][0], sessions),
        states=count_states(sessions),
        groups=count_groups(sessions, by=by, limits=rows["limits"]),
    )


_GROUP_HEADERS = {"state": "STATE", "database": "DATABASE", "user": "USER", "application": "APP"}


def render_counts_text(reports: Sequence[SessionCounts]) -> str:
    """Per server: one line of connection usage, then a table of the counts."""
    return "\n\n".join(_counts_text(report) for report in reports)


def _counts_text(report: SessionCounts) -> str:
    title = f"{safe_text(report.server, width=63)} ({safe_text(report.target, width=200)})"
    if report.connections is None:
        return f"{title}: cannot be reached: {report.error}"
    conns = report.connections
    reserved = (
        f", {conns.reserved_connections} reserved_connections"
        if conns.reserved_connections is not None
        else ""
    )
    usage = (
        f"{title}: {conns.client_sessions} client sessions of {conns.usable} usable slots "
        f"({conns.percent:.0f}%): max_connections {conns.max_connections}, "
        f"{conns.superuser_reserved_connections} superuser_reserved_connections{reserved}"
    )
    lines = [usage]
    header = _GROUP_HEADERS[report.by]
    if report.by == "state":
        rows = [(c.name or UNKNOWN_STATE, str(c.sessions)) for c in report.groups]
        lines.extend(_table((header, "SESSIONS"), rows, right=1, indent="  "))
    else:
        limited = [
            (_group_name(c.name), str(c.sessions), _limit_text(c), _percent_text(c))
            for c in report.groups
        ]
        lines.extend(
            _table((header, "SESSIONS", "LIMIT", "USE"), limited, right=1, indent="  ")
            if limited
            else ["  (no client session)"]
        )
    if conns.hidden_sessions:
        lines.append(
            f"  warning: {conns.hidden_sessions} sessions are hidden from the reaper's role "
            "(no pg_read_all_stats): their state, kind and application are unknown"
        )
    return "\n".join(lines)


def _group_name(name: str | None) -> str:
    if name is None:
        return "(not visible)"
    return safe_text(name, width=63) if name else "(empty)"


def _limit_text(count: Count) -> str:
    return "-" if count.connection_limit is None else str(count.connection_limit)


def _percent_text(count: Count) -> str:
    percent = count.percent
    return "-" if percent is None else f"{percent:.0f}%"


def render_counts_json(reports: Sequence[SessionCounts]) -> dict[str, Any]:
    return {
        "servers": [_counts_json(report) for report in reports],
        "ok": all(r.ok for r in reports),
    }


def _counts_json(report: SessionCounts) -> dict[str, Any]:
    conns = report.connections
    return {
        "server": report.server,
        "target": report.target,
        "ok": report.ok,
        "error": report.error,
        "client_sessions": conns.client_sessions if conns else None,
        "hidden_sessions": conns.hidden_sessions if conns else None,
        "max_connections": conns.max_connections if conns else None,
        "superuser_reserved_connections": conns.superuser_reserved_connections if conns else None,
        "reserved_connections": conns.reserved_connections if conns else None,
        "usable": conns.usable if conns else None,
        "percent": round(conns.percent, 1) if conns else None,
        "states": {c.name: c.sessions for c in report.states},
        "by": report.by,
        "groups": [
            {
                "name": c.name,
                "sessions": c.sessions,
                "connection_limit": c.connection_limit,
                "percent": None if c.percent is None else round(c.percent, 1),
            }
            for c in report.groups
        ],
    }


# --- kill: the pure core ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KillTarget:
    """What `kill` terminates: client sessions matching every filter given (at least one)."""

    database: str | None = None
    user: str | None = None
    application: re.Pattern[str] | None = None  # re.search
    client_addr: ClientNetwork | None = None  # "local": a Unix-socket session

    def matches(self, session: Session) -> bool:
        if self.database is not None and session.database != self.database:
            return False
        if self.user is not None and session.user != self.user:
            return False
        if self.application is not None and not self.application.search(session.application):
            return False
        return self.client_addr is None or in_networks(session.client_addr, [self.client_addr])

    def describe(self) -> str:
        """The filters as a shell would take them: `--database shop --user 'we"ird'`."""
        words: list[str] = []
        for option, value in (
            ("--database", self.database),
            ("--user", self.user),
            ("--application", self.application.pattern if self.application else None),
            ("--client-addr", None if self.client_addr is None else str(self.client_addr)),
        ):
            if value is not None:
                words += [option, value]
        return shlex.join(words)


def kill_target(
    *,
    database: str | None = None,
    user: str | None = None,
    application: str | None = None,
    client_addr: str | None = None,
    block: bool = False,
) -> KillTarget:
    """The validated filters of `kill`; `ValueError` naming the option that is wrong."""
    if database is None and user is None and application is None and client_addr is None:
        raise ValueError("name at least one of --database, --user, --application, --client-addr")
    if block and database is None:
        raise ValueError("--block-connections needs --database")
    if block and (user is not None or application is not None or client_addr is not None):
        raise ValueError(
            "--block-connections empties the whole database: it cannot be combined with "
            "--user, --application or --client-addr"
        )
    pattern = None
    if application is not None:
        try:
            pattern = re.compile(application)
        except re.error as exc:
            raise ValueError(f"--application: invalid regex {application!r}: {exc}") from None
    network = None
    if client_addr is not None:
        try:
            network = parse_client_addr(client_addr)
        except ValueError as exc:
            raise ValueError(f"--client-addr: {exc}") from None
    return KillTarget(database=database, user=user, application=pattern, client_addr=network)


def parse_wait(value: str) -> timedelta:
    """`--wait`: a duration such as "10s" or "1m30s" (0 does not wait)."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"--wait: {exc}") from None


def parse_client_addr(value: str) -> ClientNetwork:
    """A CIDR (a bare address is its /32 or /128) or `local` for Unix-socket sessions."""
    if value == "local":
        return "local"
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"invalid CIDR {value!r}: {exc} (or 'local')") from None


def select_victims(
    sessions: Iterable[Session], target: KillTarget, *, own_pid: int
) -> tuple[Session, ...]:
    """The client sessions `kill` terminates, in any state, oldest in its state first.

    Never the reaper's own session, never a backend that is not a client (walsenders,
    autovacuum, background and parallel workers), never a row whose kind is hidden from the
    reaper's role. Other pg-reapers' sessions are not spared: a database to be dropped needs
    them gone too.
    """
    chosen = [
        s
        for s in sessions
        if s.backend_type == CLIENT_BACKEND and s.pid != own_pid and target.matches(s)
    ]
    return tuple(sorted(chosen, key=lambda s: (-s.age_in_state, s.pid)))


def hidden_matches(sessions: Iterable[Session], target: KillTarget) -> int:
    """Rows hidden from the reaper's role whose database and role (all it can see of them)
    match: sessions `kill` cannot terminate, nor even tell apart from other backends."""
    return sum(
        s.backend_type == _HIDDEN
        and (target.database is None or s.database == target.database)
        and (target.user is None or s.user == target.user)
        for s in sessions
    )


def _key(session: Session) -> tuple[int, datetime | None]:
    """One backend: a pid may be reused by a newer backend, its backend_start not."""
    return session.pid, session.backend_start


# --- kill: the shell --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KillPlan:
    """What `kill` is about to do, shown to the operator before anything happens."""

    server: str
    target: KillTarget
    block: bool  # block connections to target.database first, then wait for it to empty
    dry_run: bool
    facts: ServerFacts
    sessions: tuple[Session, ...]
    victims: tuple[Session, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class KillReport:
    """What `kill` did on one server."""

    server: str
    dry_run: bool
    duration_ms: float
    plan: KillPlan | None = None
    error: str | None = None  # the server could not be polled, or refused to block
    confirmed: bool = True
    outcomes: tuple[Outcome, ...] = ()
    blocked: bool = False  # connections to the database are blocked (by this run)
    waited_seconds: float = 0.0
    remaining: tuple[str, ...] = ()  # what still keeps the database in use (with block)
    lingering: tuple[int, ...] = ()  # pids terminated that had not exited when the wait ended

    @property
    def failed(self) -> bool:
        """Exit 1: unreachable, refused, not confirmed, a victim not signalled (denied or
        error), or a database to empty still in use."""
        return (
            self.error is not None
            or not self.confirmed
            or bool(self.remaining)
            or any(o.result.is_failure for o in self.outcomes)
        )

    def as_sweep_report(self) -> SweepReport:
        """The same shape as one `once` cycle, for its table."""
        plan = self.plan
        return SweepReport(
            server=self.server,
            dry_run=self.dry_run,
            duration_ms=self.duration_ms,
            error=self.error if plan is None else None,
            facts=plan.facts if plan else None,
            sessions=plan.sessions if plan else (),
            outcomes=self.outcomes,
            warnings=plan.warnings if plan else (),
        )


def kill(  # noqa: PLR0913 - one keyword per option of the command
    conn: ServerConnection,
    *,
    server: str,
    target: KillTarget,
    block: bool = False,
    wait: timedelta,
    dry_run: bool = False,
    include_query: bool = False,
    confirm: Callable[[KillPlan], bool] | None = None,
) -> KillReport:
    """Terminate every client session on `server` that matches `target`.

    Polls, asks `confirm` (unless None or there is nothing to do), then with `block` runs
    ALTER DATABASE ... WITH ALLOW_CONNECTIONS false; signals the victims race-safely, and waits
    (at most `wait`) until they have left the server, re-polling to retry a victim that
    changed state under the signal (kill takes every state) and, with `block`, to terminate
    the stragglers that got in before the block took effect. One audit event per victim.
    """
    log = get_logger(server=server)
    started = time.perf_counter()

    def elapsed() -> float:
        return round((time.perf_counter() - started) * 1000, 1)

    failure: str | None = None
    try:
        snapshot = conn.poll(include_query=include_query)
    except PostgresError as exc:
        failure = str(exc)
    if failure is not None:
        log.error("poll_failed", error=failure)
        return KillReport(server=server, dry_run=dry_run, duration_ms=elapsed(), error=failure)
    own_pid = snapshot.facts.own_pid
    plan = KillPlan(
        server=server,
        target=target,
        block=block,
        dry_run=dry_run,
        facts=snapshot.facts,
        sessions=snapshot.sessions,
        victims=select_victims(snapshot.sessions, target, own_pid=own_pid),
        warnings=_kill_warnings(snapshot.facts, snapshot.sessions, target),
    )
    for warning in plan.warnings:
        log.warning("privileges_insufficient", detail=warning)
    if confirm is not None and (plan.victims or block) and not confirm(plan):
        return KillReport(
            server=server, dry_run=dry_run, duration_ms=elapsed(), plan=plan, confirmed=False
        )
    if dry_run:
        outcomes = tuple(_outcome(v, plan, Result.DRY_RUN, None) for v in plan.victims)
        for outcome in outcomes:
            audit_event(log, outcome, server=server, dry_run=True, include_query=include_query)
        report = KillReport(
            server=server, dry_run=True, duration_ms=0, plan=plan, outcomes=outcomes
        )
    else:
        report = _terminate(conn, plan, wait=wait, log=log, include_query=include_query)
    report = replace(report, duration_ms=elapsed())
    log.info(
        "kill_completed",
        database=target.database,
        blocked=report.blocked,
        dry_run=dry_run,
        victims=len(report.outcomes),
        terminated=sum(o.result is Result.TERMINATED for o in report.outcomes),
        failed=sum(o.result.is_failure for o in report.outcomes),
        remaining=len(report.remaining),
        duration_ms=report.duration_ms,
    )
    return report


def _terminate(  # noqa: C901 - one loop: signal, re-poll, wait, each step says why
    conn: ServerConnection,
    plan: KillPlan,
    *,
    wait: timedelta,
    log: Any,  # noqa: ANN401 - structlog's bound loggers are untyped proxies
    include_query: bool,
) -> KillReport:
    target = plan.target
    own_pid = plan.facts.own_pid
    database = target.database
    started = time.monotonic()
    deadline = started + wait.total_seconds()
    blocked = False
    if plan.block and database is not None:
        refused = _allow_connections(conn, database, allow=False)
        if refused is not None:
            log.error("block_connections_failed", database=database, error=refused)
            return KillReport(
                server=plan.server, dry_run=False, duration_ms=0, plan=plan, error=refused
            )
        blocked = True
        log.warning("connections_blocked", database=database)
    latest: dict[tuple[int, datetime | None], Outcome] = {}
    todo: Sequence[Session] = plan.victims
    error: str | None = None
    blockers: list[dict[str, Any]] = []
    present: set[tuple[int, datetime | None]] = set()
    while True:
        try:
            results = conn.signal(todo, action="terminate")
        except PostgresError as exc:
            results = {v.pid: (Result.ERROR, str(exc)) for v in todo}
            error = str(exc)
        for victim in todo:
            result, detail = results.get(victim.pid, (Result.ERROR, "no result"))
            outcome = _outcome(victim, plan, result, detail)
            latest[_key(victim)] = outcome
            if result is not Result.CHANGED:  # retried below; audited once it is final
                audit_event(
                    log, outcome, server=plan.server, dry_run=False, include_query=include_query
                )
        if error is not None:
            break
        try:
            snapshot = conn.poll(include_query=include_query)
            current = select_victims(snapshot.sessions, target, own_pid=own_pid)
            blockers = database_blockers(conn, database) if blocked and database else []
        except PostgresError as exc:
            error = str(exc)
            break
        present = {_key(s) for s in snapshot.sessions}
        # A victim that changed state is signalled again with what it looks like now; with
        # block, so is any session that got into the database before the block took effect.
        todo = [
            s
            for s in current
            if (_key(s) not in latest and blocked)
            or (_key(s) in latest and latest[_key(s)].result is Result.CHANGED)
        ]
        waiting = [
            k
            for k, o in latest.items()
            if k in present and o.result in {Result.TERMINATED, Result.CHANGED}
        ]
        # Sessions that could not be signalled (denied, error) will not leave: no use waiting.
        stuck = {o.decision.session.pid for o in latest.values() if o.result.is_failure}
        leaving = [b for b in blockers if b["kind"] in _ENDED_BY_KILL and b["pid"] not in stuck]
        if not todo and not waiting and not leaving:
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(_PAUSE_SECONDS)
    for outcome in latest.values():
        if outcome.result is Result.CHANGED:
            audit_event(
                log, outcome, server=plan.server, dry_run=False, include_query=include_query
            )
    lingering = tuple(
        o.decision.session.pid
        for k, o in latest.items()
        if o.result is Result.TERMINATED and k in present
    )
    return KillReport(
        server=plan.server,
        dry_run=False,
        duration_ms=0,
        plan=plan,
        error=error,
        outcomes=tuple(latest.values()),
        blocked=blocked,
        waited_seconds=round(time.monotonic() - started, 3),
        remaining=_describe_blockers(blockers) if error is None else (),
        lingering=lingering,
    )


def _describe_blockers(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """What still uses the database, one line per kind, with what to do about it."""
    pids: dict[str, list[str]] = {}
    for row in rows:
        label = row["gid"] if row["kind"] == "prepared transaction" else str(row["pid"])
        pids.setdefault(row["kind"], []).append(label)
    advice = {
        CLIENT_BACKEND: "not terminated in time (see each session's result)",
        "parallel worker": "ends with its leader",
        "prepared transaction": "COMMIT PREPARED or ROLLBACK PREPARED it",
        "walsender": "logical replication from this database: stop its consumer (the "
        "subscriber, pg_recvlogical)",
        "logical replication worker": "ALTER SUBSCRIPTION ... DISABLE on this database first",
        _HIDDEN: "hidden from the reaper's role: GRANT pg_read_all_stats to it",
    }
    lines = []
    for kind, labels in pids.items():
        what = "gid" if kind == "prepared transaction" else "pid"
        shown = ", ".join(safe_text(label, width=63) for label in labels[:10])
        more = f" and {len(labels) - 10} more" if len(labels) > 10 else ""
        hint = advice.get(kind, "not a client session: pg-reaper does not terminate it")
        lines.append(f"{len(labels)} {kind} ({what} {shown}{more}): {hint}")
    return tuple(lines)


def _kill_warnings(
    facts: ServerFacts, sessions: tuple[Session, ...], target: KillTarget
) -> tuple[str, ...]:
    warnings = list(visibility_warnings(facts, sessions))
    hidden = hidden_matches(sessions, target)
    if hidden:
        warnings.append(
            f"{hidden} sessions that may match are hidden from role {facts.role!r} (no "
            "pg_read_all_stats): kill cannot terminate them"
        )
    return tuple(warnings)


def _allow_connections(conn: ServerConnection, database: str, *, allow: bool) -> str | None:
    """ALTER DATABASE ... ALLOW_CONNECTIONS; why PostgreSQL refused, or None."""
    try:
        allow_connections(conn, database, allow=allow)
    except PostgresError as exc:
        return str(exc)
    return None


def _outcome(session: Session, plan: KillPlan, result: Result, detail: str | None) -> Outcome:
    block = " --block-connections" if plan.block else ""
    reason = f"pg-reaper kill {plan.target.describe()}{block}"
    decision = Decision(session=session, policy=KILL_RULE, reason=reason)
    return Outcome(decision=decision, result=result, detail=detail)


def unblock(conn: ServerConnection, *, server: str, database: str) -> str | None:
    """ALTER DATABASE ... WITH ALLOW_CONNECTIONS true; the error, or None."""
    log = get_logger(server=server)
    refused = _allow_connections(conn, database, allow=True)
    if refused is not None:
        log.error("unblock_connections_failed", database=database, error=refused)
        return refused
    log.info("connections_unblocked", database=database)
    return None


def render_unblocked(server: str, database: str) -> str:
    return (
        f"{safe_text(server, width=63)}: database {_database(database)} accepts connections again"
    )


# --- kill: the operator's terminal ------------------------------------------------------------


_VICTIM_COLUMNS = (
    "server",
    "pid",
    "user",
    "database",
    "application",
    "client",
    "state",
    "idle for",
)


def render_victims(plan: KillPlan) -> str:
    """The sessions `kill` is about to terminate, in the columns of `once`'s table."""
    rows = [
        (
            plan.server,
            str(s.pid),
            s.user,
            s.database,
            s.application,
            s.client_addr or "local",
            s.state,
            human_duration(s.idle_seconds),
        )
        for s in plan.victims
    ]
    cells = [[safe_text(v) for v in row] for row in rows]
    return "\n".join(_table(tuple(c.upper() for c in _VICTIM_COLUMNS), cells))


def ask_on_terminal(plan: KillPlan, *, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> bool:
    """List the victims on stdout, then ask on stderr; only `y` or `yes` says yes."""
    if plan.victims:
        print(render_victims(plan), file=stdout)
        print(file=stdout)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=stderr)
    count = len(plan.victims)
    sessions = f"{count} session{'s' if count != 1 else ''}"
    server = safe_text(plan.server, width=63)
    if plan.block and plan.target.database is not None:
        database = _database(plan.target.database)
        question = f"Block connections to database {database} and terminate {sessions} on {server}?"
    else:
        question = f"Terminate {sessions} on {server}?"
    print(f"{question} [y/N] ", end="", file=stderr, flush=True)
    answer = stdin.readline()
    if not answer.endswith("\n"):
        print(file=stderr)  # end of input (Ctrl-D): nothing echoed the end of the line
    return answer.strip().lower() in {"y", "yes"}


def render_kill(report: KillReport, *, config_path: str) -> str:
    """`once`'s table and summary line, then what became of the database and the wait."""
    if not report.confirmed:
        return "nothing terminated: not confirmed"
    plan = report.plan
    lines = [render_table([report.as_sweep_report()])]
    if plan is None:
        return lines[0]
    database = _database(plan.target.database or "")
    if report.dry_run and plan.block:
        lines.append(
            f"  dry run: connections to database {database} would be blocked first, then "
            "pg-reaper would wait for it to empty"
        )
    if report.blocked:
        lines.append(f"  connections to database {database} are blocked")
        if report.remaining:
            lines.extend(
                f"  database {database} still in use after {report.waited_seconds:g}s: {line}"
                for line in report.remaining
            )
        elif report.error is None:
            lines.append(
                f"  database {database} has no session left ({report.waited_seconds:g}s): "
                "DROP DATABASE or ALTER DATABASE ... RENAME can run now"
            )
        unblock_command = shlex.join(
            [
                "pg-reaper",
                "unblock",
                "-c",
                config_path,
                "--server",
                plan.server,
                "--database",
                plan.target.database or "",
            ]
        )
        lines.append(f"  to let connections in again: {safe_text(unblock_command, width=400)}")
    if report.lingering:
        pids = ", ".join(str(p) for p in report.lingering)
        lines.append(
            f"  warning: terminated but still on the server after {report.waited_seconds:g}s: "
            f"pid {pids}"
        )
    if report.error is not None:
        lines.append(f"  error: {report.error}")
    if not report.outcomes and not report.dry_run and report.error is None:
        lines.append(f"  no client session matches {plan.target.describe()}")
    return "\n".join(lines)


# --- helpers ----------------------------------------------------------------------------------


def _database(name: str) -> str:
    """A database name as SQL would write it (shop, "we""ird'; db"), printable."""
    return safe_text(quote_identifier(name), width=200)


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: int | None = None,
    indent: str = "",
) -> list[str]:
    """Aligned columns; column `right` and those after it are right-aligned (numbers)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return (
            indent
            + "  ".join(
                c.rjust(w) if right is not None and i >= right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )

    return [line(headers), *(line(row) for row in rows)]
