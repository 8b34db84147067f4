"""The reaping session: a poll of client sessions with ages by the server's clock (poll.sql), and
race-safe signalling with one result per victim (signal.sql).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from psycopg import sql

from reaper.pg.connection import Connection, PostgresError, Prepared, query
from reaper.policy import (
    CLIENT_BACKEND,
    DROPPED_ROLE,
    Result,
    RoleConnections,
    ServerFacts,
    Session,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from datetime import datetime, timedelta

__all__ = ["PROBE_ROLES_SQL", "PROBE_SQL", "ServerConnection", "Snapshot", "poll_reads_every_role"]

Action = Literal["terminate", "cancel"]
_SIGNAL_FUNCTIONS: dict[Action, sql.Identifier] = {
    "terminate": sql.Identifier("pg_catalog", "pg_terminate_backend"),
    "cancel": sql.Identifier("pg_catalog", "pg_cancel_backend"),
}
_SIGNALLED: dict[Action, Result] = {"terminate": Result.TERMINATED, "cancel": Result.CANCELLED}
_INSUFFICIENT_PRIVILEGE = "42501"
_DETAILS = {
    "denied": "permission denied: a superuser's session, or the reaper's role lacks "
    "pg_signal_backend",
    "unblocked": "no longer blocks a backend waiting for a lock for when_blocking",
    "not_due": "not yet past its threshold by the server's clock",
}
# Results of signal.sql that are another Result's special case.
_RESULTS = {"unblocked": Result.CHANGED}
FACTS_SQL = query("facts")
# One statement: session, role, database and clock rows (see poll.sql), put together by poll();
# with a row for every role, or only for the roles that have a backend (poll_reads_every_role).
_POLL_TEMPLATE = query("poll")
POLL_SQL = _POLL_TEMPLATE.replace("{every_role}", "true")
POLL_BACKEND_ROLES_SQL = _POLL_TEMPLATE.replace("{every_role}", "false")
# Run at every cycle of every server: prepared once per session (Connection.fetch).
_POLLS = {
    True: Prepared.of("pg_reaper_poll", POLL_SQL),
    False: Prepared.of("pg_reaper_poll_backend_roles", POLL_BACKEND_ROLES_SQL),
}
SIGNAL_SQL = query("signal")
# The pressure probe: client backends counted on the server (docs/pressure.md, the fast path).
PROBE_SQL = query("probe")
PROBE_ROLES_SQL = query("probe_roles")  # + the roles whose connection limit applies
# Which cluster (and which run of it) a session is on: reaper/clusters.py.
CLUSTER_IDENTITY_SQL = query("cluster_identity")


def poll_reads_every_role(roles: int | None, sessions: int) -> bool:
    """Whether the next poll should return a row for every role (`POLL_SQL`) rather than only
    for the roles that have a backend (`POLL_BACKEND_ROLES_SQL`), given the roles the last poll
    that read every role saw (None: none yet) and the sessions of the last poll. A role row
    costs the server about what a backend costs the other way: read every role unless there
    are more roles than sessions. Either way the sessions and their values are the same."""
    return roles is None or sessions >= roles


def _age(now: datetime, then: datetime | None) -> float | None:
    """`now - then` in seconds, both read from the server: the age by the server's clock (the
    same float8 as ``extract(epoch FROM now() - then)::float8``)."""
    return None if then is None else (now - then).total_seconds()


@dataclass(frozen=True, slots=True)
class _Blocker:
    """A blocker row of poll.sql: the backends waiting behind one backend, and since when the
    longest of them has waited."""

    blocked: tuple[int, ...]
    since: datetime


def _session(
    row: Mapping[str, Any],
    roles: Mapping[int, Mapping[str, Any]],
    databases: Mapping[int, str],
    now: datetime,
    blockers: Mapping[int, _Blocker],
) -> Session | None:
    """A session row of poll.sql with its role's and database's names; None for a hidden row
    (NULL backend_type) whose role or database has no name, as pg_stat_activity would show it."""
    role = roles.get(row["role_oid"])
    database = databases.get(row["database_oid"])
    if row["backend_type"] is None and (role is None or database is None):
        return None
    user = None if role is None else role["name"]
    if role is None and row["role_oid"] is not None:
        user = DROPPED_ROLE  # its role was dropped while it stayed connected
    blocker = blockers.get(row["pid"])
    return Session(
        pid=row["pid"],
        backend_type=row["backend_type"] or "unknown",
        database=database,
        user=user,
        application=row["application_name"] or "",
        client_addr=row["client_addr"],
        state=row["state"],
        backend_start=row["backend_start"],
        state_change=row["state_change"],
        idle_seconds=_age(now, row["state_change"]),
        transaction_seconds=_age(now, row["xact_start"]),
        runtime_seconds=_age(now, row["query_start"]),
        connection_seconds=_age(now, row["backend_start"]),
        superuser=False if role is None else role["superuser"],
        member=False if role is None else role["member"],
        signaller=False if role is None else role["signaller"],
        query=row["query"],  # NULL unless include_query
        blocking=() if blocker is None else blocker.blocked,
        # A wait that began after the poll's now() (a few microseconds apart) has not lasted.
        lock_wait_seconds=None if blocker is None else max(0.0, _age(now, blocker.since) or 0.0),
    )


# --- the connection ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Limits:
    """What each victim must still meet when signalled, by pid: the lock wait it blocks
    (when_blocking), the server time its age must have passed (armed signals)."""

    blocking: Mapping[int, timedelta]
    due: Mapping[int, datetime]


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """One poll of one server."""

    facts: ServerFacts
    sessions: tuple[Session, ...]
    now: datetime | None = None  # the server's now() at the poll: every age is measured from it
    sent: float = 0.0  # time.monotonic() right before the poll statement was sent


@dataclass(frozen=True, slots=True, kw_only=True)
class Leadership:
    """Whether this session holds a server's advisory lock ([ha]), and which backend does."""

    leader: bool
    holder: int | None  # the pid of the backend holding the lock, None when it is free


class ServerConnection(Connection):
    """The session that polls a server and signals its sessions."""

    def _opened(self) -> None:
        self._facts: ServerFacts | None = None
        self._roles_seen: int | None = None  # role rows of the last poll that read every role
        self._every_role = True  # what the next poll reads: see poll_reads_every_role

    def facts(self) -> ServerFacts:
        if self._facts is None or self._conn is None or self._conn.closed:
            rows = self.run(FACTS_SQL)
            if not rows:
                raise PostgresError(f"{self.target}: the reaper's role is not in pg_roles")
            self._facts = ServerFacts(**rows[0])
        return self._facts

    def poll(self, *, include_query: bool = False, include_blocking: bool = False) -> Snapshot:
        """Every client backend, as the server sees it now: one statement (poll.sql). The
        last query's text only with `include_query`; which backends each session blocks (for
        when_blocking) only with `include_blocking`."""
        facts = self.facts()
        every_role = self._every_role
        sent = time.monotonic()
        rows = self.fetch(
            _POLLS[every_role],
            {"include_query": include_query, "include_blocking": include_blocking},
        )
        session_rows: list[dict[str, Any]] = []
        roles: dict[int, dict[str, Any]] = {}
        databases: dict[int, str] = {}
        blockers: dict[int, _Blocker] = {}
        now: datetime | None = None
        for row in rows:
            if row["pid"] is not None:
                session_rows.append(row)
            elif row["role_oid"] is not None:
                roles[row["role_oid"]] = row
            elif row["database_oid"] is not None:
                databases[row["database_oid"]] = row["name"]
            elif row["blocker"] is not None:
                blocked = tuple(sorted(pid for pid in row["blocked"] if pid is not None))
                blockers[row["blocker"]] = _Blocker(blocked, row["wait_start"])
            else:
                now = row["now"]
        if now is None:  # the clock row is always there
            raise PostgresError(f"{self.target}: the poll returned no clock row")
        if every_role:
            self._roles_seen = len(roles)
        self._every_role = poll_reads_every_role(self._roles_seen, len(session_rows))
        sessions = tuple(
            session
            for row in session_rows
            if (session := _session(row, roles, databases, now, blockers)) is not None
        )
        # How full the server is, for connection pressure: counted in the poll's own rows (the
        # reaper's session included), so that the counts and the sessions agree. Client backends
        # only: a hidden row (no pg_read_all_stats) may be a parallel worker, a background worker
        # or a walsender, and pressure policies do not act on such counts (ServerFacts). Only
        # roles with sessions (whichever role rows the poll read): a role without is below any
        # share.
        clients = [s for s in sessions if s.backend_type == CLIENT_BACKEND]
        per_role = Counter(s.user for s in clients)
        limited = tuple(
            RoleConnections(
                role=role["name"],
                limit=role["connection_limit"],
                sessions=per_role[role["name"]],
            )
            for role in roles.values()
            if role["connection_limit"] is not None and per_role[role["name"]]
        )
        facts = replace(facts, client_sessions=len(clients), roles=limited)
        return Snapshot(facts=facts, sessions=sessions, now=now, sent=sent)

    def probe(self, *, per_role: bool) -> ServerFacts | None:
        """How full the server is now, counted as `poll` counts it (its facts with
        `client_sessions` and, with `per_role`, `roles` measured anew), in one small statement
        (probe.sql, probe_roles.sql). None, without running anything, when the session is not
        open: a probe never connects (the server's cycle does, with its retries)."""
        if not self.connected:
            return None
        facts = self.facts()
        rows = self.run(PROBE_ROLES_SQL if per_role else PROBE_SQL, doing="pressure probe failed")
        totals = [row["sessions"] for row in rows if row["total"]]
        if len(totals) != 1:  # the grand total of GROUP BY ROLLUP is always there, once
            raise PostgresError(f"{self.target}: the pressure probe returned no total")
        roles = tuple(
            RoleConnections(
                role=row["role"], limit=row["connection_limit"], sessions=row["sessions"]
            )
            for row in rows
            if not row["total"] and row["role"] is not None and row["sessions"]
        )
        return replace(facts, client_sessions=totals[0], roles=roles)

    def signal(
        self,
        victims: Sequence[Session],
        *,
        action: Action,
        lock_key: int | None = None,
        blocking: Mapping[int, timedelta] | None = None,
        due: Mapping[int, datetime] | None = None,
    ) -> dict[int, tuple[Result, str | None]]:
        """Signal `victims` race-safely; one (result, detail) per pid, whatever befalls the others.

        All victims go in one statement, which checks each one's permission itself. Should it fail
        all the same, each victim is retried in a statement of its own so that one failure stays
        its own (a victim signalled before the failure then reports `gone`). With `lock_key`,
        the statement signals only if this session holds that advisory lock ([ha]); otherwise
        every victim reports `not_leader`. A victim with a threshold in `blocking` (by pid: the
        when_blocking of the policy that chose it) is signalled only if it still blocks a backend
        that has waited that long; otherwise it is `changed`. A victim with a time in `due` (by
        pid: the server time at which it crosses its threshold) is signalled only once the
        server's clock has passed it; before, it is `not_due` (armed signals).
        """
        if not victims:
            return {}
        limits = _Limits(blocking=blocking or {}, due=due or {})
        try:
            return self._signal_batch(victims, action=action, lock_key=lock_key, limits=limits)
        except PostgresError as exc:
            if exc.lost:
                raise
        results: dict[int, tuple[Result, str | None]] = {}
        for victim in victims:
            try:
                results.update(
                    self._signal_batch([victim], action=action, lock_key=lock_key, limits=limits)
                )
            except PostgresError as exc:
                if exc.lost:
                    raise
                denied = exc.sqlstate == _INSUFFICIENT_PRIVILEGE
                results[victim.pid] = (Result.DENIED if denied else Result.ERROR, exc.reason)
        return results

    def _signal_batch(
        self,
        victims: Sequence[Session],
        *,
        action: Action,
        lock_key: int | None,
        limits: _Limits,
    ) -> dict[int, tuple[Result, str | None]]:
        query = sql.SQL(SIGNAL_SQL).format(signal=_SIGNAL_FUNCTIONS[action])
        params = {
            "lock_key": lock_key,
            "pids": [v.pid for v in victims],
            "backend_starts": [v.backend_start for v in victims],
            "state_changes": [v.state_change for v in victims],
            "states": [v.state for v in victims],
            "blocking": [limits.blocking.get(v.pid) for v in victims],
            "due": [limits.due.get(v.pid) for v in victims],
        }
        # A statement that failed on a working session leaves it open: each victim is then
        # retried on it (signal), under the same advisory lock.
        rows = self.run(query, params, keep_open=True)
        signalled = _SIGNALLED[action]
        return {
            row["pid"]: (signalled, None)
            if row["result"] == "signalled"
            else (_RESULTS.get(row["result"]) or Result(row["result"]), _DETAILS.get(row["result"]))
            for row in rows
        }

    def cluster_identity(self) -> dict[str, Any]:
        """The cluster this session is on: its `system_identifier` and the postmaster's start
        time (`started`), read on the current session (connecting first if needed); see
        reaper/clusters.py. Read-only."""
        # Refused when a superuser revoked EXECUTE from PUBLIC.
        return self.run(CLUSTER_IDENTITY_SQL, doing="cannot read the cluster's identity")[0]
