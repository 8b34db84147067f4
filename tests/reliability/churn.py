"""Client sessions that come and go while the daemon reaps them: the churn of test_churn and
test_soak, and the check that not one of them was killed by mistake.

Each client is a thread with one connection at a time. It runs a statement (sometimes a short
`pg_sleep`), notes the moment the statement returned (its last activity, by the monotonic clock),
then sits idle for a random time around `max_idle`, watching its socket: a terminated backend
sends its FATAL message and closes the socket at once, so the client knows to the millisecond
when it was killed, without having to use the session. A killed client connects again.

At the end (`park`) the clients stop running statements and sit idle until the daemon kills
them, which it must do within max_idle + REACTION_BOUND: so every session ends by a kill that its
client saw, and the daemon's account can be compared with the clients' one for one.
"""

from __future__ import annotations

import random
import select
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from psycopg import pq

if TYPE_CHECKING:
    from tests.test_daemon import RunningDaemon

__all__ = ["Churn", "ChurnReport", "Life", "Verdict", "check_churn"]

# A kill may be seen up to this much before `max_idle` has passed by the client's clock: the
# client notes its last activity a little after the server does (state_change), and both clocks
# tick with some granularity.
CLOCK_SLACK = 0.2
# Every session idle longer than max_idle + this must have been killed.
REACTION_BOUND = 2.0
# The documented race: the signalling statement re-reads a victim, then signals it. A statement
# the client sends in between runs, and the signal meant for the idle period before it lands
# during it or, when the reaper's backend was descheduled between its re-read and its kill() (a
# loaded machine), shortly after it returned. Within this long after, such a kill is that race.
RACE_BOUND = 1.0
# How often an idle client looks at the stop flag (its socket wakes it at once).
_WAKE_EVERY = 0.5


@dataclass
class Life:
    """One backend of one client, from connect to kill (or to the end of the run)."""

    client: int
    application: str
    pid: int
    backend_start: datetime
    last_activity: float  # monotonic: when the last statement returned
    statements: int = 0
    # (from, to) monotonic: periods idle by the client's choice, each ended by its next statement
    # or by the end of the run, never by a kill.
    idle_periods: list[tuple[float, float]] = field(default_factory=list)
    killed_at: float | None = None
    killed_while: Literal["idle", "statement"] | None = None
    statement_started: float | None = None  # of the statement that was interrupted, if one was


@dataclass
class ChurnReport:
    lives: list[Life]
    errors: list[str]  # anything unexpected in a client thread
    stopped_at: float  # monotonic: when the parked clients were let go (the daemon still ran)

    @property
    def killed(self) -> list[Life]:
        return [life for life in self.lives if life.killed_at is not None]


class Churn:
    """`clients` threads churning sessions on `dsn` until `stop()`."""

    def __init__(
        self,
        dsn: str,
        *,
        clients: int,
        prefix: str,
        idle: tuple[float, float],
        sleep_share: float = 0.3,
        seed: int = 0,
    ) -> None:
        self._dsn = dsn
        self._prefix = prefix
        self._idle = idle
        self._sleep_share = sleep_share
        self._stop = threading.Event()  # no more statements or connections: park
        self._release = threading.Event()  # parked clients give up waiting for their kill
        self._lock = threading.Lock()
        self.lives: list[Life] = []
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(
                target=self._client,
                args=[index, random.Random(seed * 100_003 + index)],  # noqa: S311 - not crypto
                name=f"{prefix}{index}",
                daemon=True,
            )
            for index in range(clients)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def park(self) -> None:
        """No more statements or connections: every client sits idle until it is killed."""
        self._stop.set()

    def finish(self, *, timeout: float) -> ChurnReport:
        """Wait (up to `timeout`) for every parked client to be killed, then let the rest go."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        stopped_at = time.monotonic()
        self._release.set()
        for thread in self._threads:
            thread.join(timeout=30)
        alive = [t.name for t in self._threads if t.is_alive()]
        with self._lock:
            errors = list(self.errors) + [f"{name}: did not stop" for name in alive]
            return ChurnReport(lives=list(self.lives), errors=errors, stopped_at=stopped_at)

    def sessions(self) -> int:
        with self._lock:
            return len(self.lives)

    # one client

    def _client(self, index: int, rng: random.Random) -> None:
        application = f"{self._prefix}{index}"
        try:
            while not self._stop.is_set():
                self._one_life(index, application, rng)
        except Exception as exc:  # noqa: BLE001 - reported by the test, with the client's name
            with self._lock:
                self.errors.append(f"{application}: {type(exc).__name__}: {exc}")

    def _one_life(self, index: int, application: str, rng: random.Random) -> None:
        with psycopg.connect(
            self._dsn, autocommit=True, application_name=application, connect_timeout=10
        ) as conn:
            row = conn.execute(
                "SELECT pg_backend_pid(), backend_start FROM pg_stat_activity "
                "WHERE pid = pg_backend_pid()"
            ).fetchone()
            assert row is not None
            life = Life(
                client=index,
                application=application,
                pid=row[0],
                backend_start=row[1],
                last_activity=time.monotonic(),
            )
            with self._lock:
                self.lives.append(life)
            while not self._stop.is_set():
                if not self._statement(conn, life, rng):
                    return
                if not self._sit_idle(
                    conn, life, until=life.last_activity + rng.uniform(*self._idle)
                ):
                    return
            self._sit_idle(conn, life, until=None)  # parked

    def _statement(self, conn: psycopg.Connection[Any], life: Life, rng: random.Random) -> bool:
        """Run one statement; False if the session turned out to be killed."""
        started = time.monotonic()
        try:
            if rng.random() < self._sleep_share:
                conn.execute("SELECT pg_sleep(%s)", [round(rng.uniform(0.05, 0.5), 3)])
            else:
                conn.execute("SELECT 1")
        except psycopg.Error:
            if not _broken(conn):
                raise
            life.killed_at, life.killed_while = time.monotonic(), "statement"
            life.statement_started = started
            return False
        life.last_activity = time.monotonic()
        life.statements += 1
        return True

    def _sit_idle(self, conn: psycopg.Connection[Any], life: Life, *, until: float | None) -> bool:
        """Idle until `until` (None: parked, until killed or let go), watching the socket; False
        if the session was killed. Parking cuts short an idle period: the parked one goes on."""
        since = life.last_activity
        watch = select.poll()
        watch.register(conn.fileno(), select.POLLIN)
        while True:
            if until is None:
                if self._release.is_set():
                    break
                wait = _WAKE_EVERY
            else:
                if self._stop.is_set():
                    return True  # parked next: the same idle period goes on
                wait = min(until - time.monotonic(), _WAKE_EVERY)
                if wait <= 0:
                    break
            if watch.poll(wait * 1000):
                seen = time.monotonic()
                if _dead(conn):
                    life.killed_at, life.killed_while = seen, "idle"
                    return False
                # Something else arrived (a notice): that was activity of a sort; carry on.
                life.idle_periods.append((since, seen))
                life.last_activity = since = time.monotonic()
        life.idle_periods.append((since, time.monotonic()))
        return True


def _dead(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.Error:
        if _broken(conn):
            return True
        raise
    return False


def _broken(conn: psycopg.Connection[Any]) -> bool:
    """The connection is gone (a kill shows as OperationalError, or as InternalError "got no
    result from the query" when it lands between a query and its result)."""
    return conn.broken or conn.closed or conn.pgconn.status != pq.ConnStatus.OK


def _raced(life: Life, *, max_idle: float) -> bool:
    """Whether a kill soon after a statement is the documented race: the idle period before
    that statement had passed max_idle (the one the reaper judged), and the kill came within
    RACE_BOUND of the statement's return."""
    if not life.idle_periods or life.killed_at is None:
        return False
    since, until = life.idle_periods[-1]
    return (
        until - since >= max_idle - CLOCK_SLACK
        and life.killed_at - life.last_activity <= RACE_BOUND
    )


@dataclass
class Verdict:
    problems: list[str]  # wrong kills, survivors, disagreements: each fails the test


def check_churn(
    report: ChurnReport,
    daemon: RunningDaemon,
    *,
    max_idle: float,
    prefix: str,
) -> Verdict:
    """Every way the run went wrong, as readable lines (none: zero wrong kills, no survivor)."""
    verdict = Verdict(problems=[f"client error: {e}" for e in report.errors])
    # Idle periods are judged up to here: the clients stop, then the daemon.
    reaping_until = report.stopped_at
    for life in report.lives:
        who = f"{life.application} pid {life.pid}"
        if life.killed_at is not None and life.killed_while == "statement":
            # The documented race: a statement sent after max_idle may meet the signal.
            assert life.statement_started is not None
            idle = life.statement_started - life.last_activity
            if idle < max_idle - CLOCK_SLACK:
                verdict.problems.append(
                    f"{who}: killed during a statement started {idle:.3f} s after its last "
                    f"activity (max_idle {max_idle} s)"
                )
        elif life.killed_at is not None:
            idle = life.killed_at - life.last_activity
            if idle < max_idle - CLOCK_SLACK and not _raced(life, max_idle=max_idle):
                verdict.problems.append(
                    f"{who}: killed after {idle:.3f} s idle (max_idle {max_idle} s)"
                )
            elif (
                idle > max_idle + REACTION_BOUND
                and life.last_activity + max_idle + REACTION_BOUND < reaping_until
            ):
                verdict.problems.append(f"{who}: killed only after {idle:.3f} s idle")
        for since, until in life.idle_periods:
            idle = min(until, reaping_until) - since
            if idle > max_idle + REACTION_BOUND:
                verdict.problems.append(
                    f"{who}: survived {idle:.3f} s idle (max_idle {max_idle} s) while the "
                    "daemon ran"
                )
    verdict.problems.extend(_check_audit(report, daemon, max_idle=max_idle, prefix=prefix))
    return verdict


def _check_audit(
    report: ChurnReport, daemon: RunningDaemon, *, max_idle: float, prefix: str
) -> list[str]:
    """The daemon's own account agrees: each kill it logged was idle past max_idle, and the
    sessions it says it terminated are exactly the ones the clients saw die."""
    problems = []
    ours = [
        e
        for e in daemon.events()
        if str(e.get("application", "")).startswith(prefix)
        and e.get("event") in {"session_reaped", "session_reap_failed"}
    ]
    terminated = set()
    for event in ours:
        if event["event"] == "session_reap_failed":
            if event["result"] not in {"changed", "gone"}:
                problems.append(f"reap failed other than by a race: {event}")
            continue
        if event["result"] != "terminated" or event["state"] != "idle":
            problems.append(f"unexpected decision: {event}")
        # idle_seconds is rounded to the millisecond: 2.0 stands for (2.0, 2.0005).
        if not event["idle_seconds"] >= max_idle:
            problems.append(f"terminated at idle_seconds {event['idle_seconds']}: {event}")
        terminated.add((event["pid"], datetime.fromisoformat(event["backend_start"])))
    killed = {(life.pid, life.backend_start) for life in report.killed}
    for pid, _ in sorted(killed - terminated):
        problems.append(f"pid {pid} died, but the daemon logged no session_reaped for it")
    for pid, _ in sorted(terminated - killed):
        problems.append(f"the daemon terminated pid {pid}, but its client never saw it die")
    return problems
