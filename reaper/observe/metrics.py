"""Every Prometheus metric of pg-reaper, defined once, with bounded label sets.

No pid, user, database, application or query text is ever a label: only server names, policy
names, actions, failure reasons and states, all of which come from the configuration or from a
fixed list.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from reaper import __version__
from reaper.observe.audit import ERROR_REASONS as AUDIT_ERROR_REASONS
from reaper.observe.notifications import ERROR_REASONS as NOTIFY_ERROR_REASONS
from reaper.policy import Result
from reaper.settings import ALL_STATES

if TYPE_CHECKING:
    from collections.abc import Iterable

    from reaper.observe.cycle import CycleReport
    from reaper.settings import Settings

__all__ = ["PROBE_OUTCOMES", "UNKNOWN_STATE", "Metrics"]

# The `state` label of sessions whose state the reaper may not see (NULL in pg_stat_activity).
UNKNOWN_STATE = "unknown"
_STATES = (*ALL_STATES, UNKNOWN_STATE)
_FAILURE_REASONS = {
    Result.GONE: "gone",
    Result.CHANGED: "changed",
    Result.DENIED: "denied",
    Result.ERROR: "error",
}
# What a pressure probe found (reaper/daemon/probe.py).
PROBE_OUTCOMES = ("calm", "pressure", "poll", "error")
_REAPED_ACTIONS = {Result.TERMINATED: "terminate", Result.CANCELLED: "cancel", Result.LOGGED: "log"}


class Metrics:
    """The daemon's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call] # *_created series help no alert
        # Each series a cycle updates, looked up once: labels() costs a sort and a lock at every
        # call, a dozen calls per cycle of every server. Emptied whenever a series is removed.
        # Beside each child, the value last given to `_set` (a gauge set again to the value it
        # holds is left alone: most of a cycle's gauges hold what the last cycle set).
        self._children: dict[tuple[Any, tuple[str, ...]], list[Any]] = {}
        self._children_lock = threading.Lock()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_reaped = Counter(
            "pg_reaper_sessions_reaped",
            "Sessions terminated, cancelled or logged by a policy (not counted in dry run).",
            ["server", "policy", "action"],
            registry=r,
        )
        self.reap_failures = Counter(
            "pg_reaper_reap_failures",
            "Victims that could not be signalled: gone, changed, denied, error.",
            ["server", "policy", "reason"],
            registry=r,
        )
        self.candidates = Gauge(
            "pg_reaper_candidates",
            "Sessions matched by each policy at the last poll (dry run included).",
            ["server", "policy"],
            registry=r,
        )
        self.deferred = Counter(
            "pg_reaper_deferred",
            "Victims held back by max_terminations_per_cycle.",
            ["server"],
            registry=r,
        )
        self.sessions = Gauge(
            "pg_reaper_sessions",
            "Client sessions at the last poll, by state.",
            ["server", "state"],
            registry=r,
        )
        self.max_connections = Gauge(
            "pg_reaper_max_connections",
            "The server's max_connections.",
            ["server"],
            registry=r,
        )
        self.connections_used = Gauge(
            "pg_reaper_connections_used",
            "Client sessions at the last poll, the reaper's own included.",
            ["server"],
            registry=r,
        )
        self.connections_usable = Gauge(
            "pg_reaper_connections_usable",
            "Connection slots an ordinary role can use: max_connections less "
            "superuser_reserved_connections and reserved_connections.",
            ["server"],
            registry=r,
        )
        self.pressure = Gauge(
            "pg_reaper_pressure",
            "1 when the policy's connection-pressure condition held at the last poll.",
            ["server", "policy"],
            registry=r,
        )
        self.pressure_probes = Counter(
            "pg_reaper_pressure_probes",
            "Pressure probes between polls (docs/pressure.md), by outcome: calm (no level "
            "crossed), pressure (crossed, as the last poll saw), poll (a level crossed that the "
            "last poll did not see: the server is polled at once), error.",
            ["server", "outcome"],
            registry=r,
        )
        self.poll_duration = Histogram(
            "pg_reaper_poll_duration_seconds",
            "Time of one cycle on one server: poll, decide, signal.",
            ["server"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.armed_sessions = Gauge(
            "pg_reaper_armed_sessions",
            "Sessions armed to be signalled the moment they become eligible (armed signals).",
            ["server"],
            registry=r,
        )
        self.armed_firings = Counter(
            "pg_reaper_armed_firings",
            "Signal statements run by armed timers (armed signals).",
            ["server"],
            registry=r,
        )
        self.poll_errors = Counter(
            "pg_reaper_poll_errors",
            "Polls that failed (server unreachable, query failed).",
            ["server"],
            registry=r,
        )
        self.server_up = Gauge(
            "pg_reaper_server_up",
            "1 when the last poll of the server succeeded.",
            ["server"],
            registry=r,
        )
        self.last_poll = Gauge(
            "pg_reaper_last_poll_timestamp_seconds",
            "Unix time of the last successful poll.",
            ["server"],
            registry=r,
        )
        self.leader = Gauge(
            "pg_reaper_leader",
            "1 when this instance reaps the server: always without [ha]; with [ha], while it "
            "holds the server's advisory lock.",
            ["server"],
            registry=r,
        )
        self.lock_held_by_other = Gauge(
            "pg_reaper_lock_held_by_other",
            "[ha]: 1 while a backend that is not a pg-reaper instance holds the server's advisory "
            "lock (lock squatting: no instance can reap the server), else 0.",
            ["server"],
            registry=r,
        )
        self.ha_probes = Counter(
            "pg_reaper_ha_probes",
            "[ha]: cycles in which this instance followed: one probe of the lock and the members "
            "instead of a poll.",
            ["server"],
            registry=r,
        )
        self.dry_run = Gauge("pg_reaper_dry_run", "1 when no signal is sent (dry run).", registry=r)
        self.config_reload_ok = Gauge(
            "pg_reaper_config_last_reload_successful",
            "1 when the last configuration load or reload succeeded.",
            registry=r,
        )
        self.build_info = Gauge(
            "pg_reaper_build_info", "pg-reaper's version.", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        self.audit_errors = Counter(
            "pg_reaper_audit_errors",
            "Audit table trouble: failed writes (reason=write, each attempt) and rows dropped "
            "because the queue was full (reason=dropped, each row).",
            ["reason"],
            registry=r,
        )
        for reason in AUDIT_ERROR_REASONS:
            self.audit_errors.labels(reason=reason)
        self.notify_errors = Counter(
            "pg_reaper_notify_errors",
            "[notify] trouble: a message a URL did not take (reason=send, each URL each message), "
            "a cycle left out of every message (reason=dropped: the queue was full, or pg-reaper "
            "exited first).",
            ["reason"],
            registry=r,
        )
        for reason in NOTIFY_ERROR_REASONS:
            self.notify_errors.labels(reason=reason)

    def configure(self, settings: Settings) -> None:
        """Show every series of the configured servers and policies, at 0 until measured."""
        self.dry_run.set(1 if settings.reaper.dry_run else 0)
        self._forget_children()
        for server in settings.servers:
            self.server_up.labels(server=server.name)
            if not settings.ha.enabled:
                self.leader.labels(server=server.name).set(1)
                self._remove(self.lock_held_by_other, server.name)  # [ha] may have been turned off
                self._remove(self.ha_probes, server.name)
            else:
                self.leader.labels(server=server.name)
                self.lock_held_by_other.labels(server=server.name)
                self.ha_probes.labels(server=server.name)
            self.poll_errors.labels(server=server.name)
            self.deferred.labels(server=server.name)
            self.armed_sessions.labels(server=server.name)
            self.armed_firings.labels(server=server.name)
            for policy in settings.policies_for(server):
                self.candidates.labels(server=server.name, policy=policy.name)
                if policy.pressure:
                    self.pressure.labels(server=server.name, policy=policy.name)
                else:  # a reload may have taken its pressure key away
                    self._remove(self.pressure, server.name, policy.name)
                # Counters exist from the start at 0: increase() needs a sample before the
                # first reap (or the first failure) to see it.
                self.sessions_reaped.labels(
                    server=server.name, policy=policy.name, action=policy.action
                )
                if policy.escalate_after is not None:  # cancel-then-terminate
                    self.sessions_reaped.labels(
                        server=server.name, policy=policy.name, action="terminate"
                    )
                for reason in _FAILURE_REASONS.values():
                    self.reap_failures.labels(server=server.name, policy=policy.name, reason=reason)

    def forget_server(self, server: str, *, policies: Iterable[str] = ()) -> None:
        """Drop the series of a server no longer configured."""
        for metric in (
            self.server_up,
            self.leader,
            self.lock_held_by_other,
            self.ha_probes,
            self.poll_errors,
            self.deferred,
            self.armed_sessions,
            self.armed_firings,
            self.max_connections,
            self.connections_used,
            self.connections_usable,
            self.last_poll,
            self.poll_duration,
        ):
            self._remove(metric, server)
        for state in _STATES:
            self._remove(self.sessions, server, state)
        for policy in policies:
            self.forget_policy(server, policy)

    def show_pressure_probes(self, server: str) -> None:
        """The probe's series of a server that is probed, at 0 until it probes."""
        for outcome in PROBE_OUTCOMES:
            self.pressure_probes.labels(server=server, outcome=outcome)

    def forget_pressure_probes(self, server: str) -> None:
        """A server no longer probed (no pressure policies, or removed)."""
        for outcome in PROBE_OUTCOMES:
            self._remove(self.pressure_probes, server, outcome)

    def forget_policy(self, server: str, policy: str) -> None:
        self._remove(self.candidates, server, policy)
        self._remove(self.pressure, server, policy)
        for action in _REAPED_ACTIONS.values():
            self._remove(self.sessions_reaped, server, policy, action)
        for reason in _FAILURE_REASONS.values():
            self._remove(self.reap_failures, server, policy, reason)

    def _child(self, metric: Gauge | Counter | Histogram, *values: str) -> Any:  # noqa: ANN401 - prometheus_client's children are untyped
        """`metric.labels(*values)` (in the metric's label order), from the cache."""
        return self._entry(metric, values)[0]

    def _set(self, metric: Gauge, value: float, *values: str) -> None:
        """Set a gauge's series to `value`, unless `_set` left it there already. Every set of a
        series goes through here, or none does."""
        entry = self._entry(metric, values)
        if entry[1] != value:
            entry[0].set(value)
            entry[1] = value

    def _entry(self, metric: Gauge | Counter | Histogram, values: tuple[str, ...]) -> list[Any]:
        key = (metric, values)
        entry = self._children.get(key)
        if entry is None:
            # Under the lock, so that a series removed meanwhile is never cached: the removal
            # evicts it from the cache after it (_remove). An entry evicted while a cycle sets
            # it is dropped with its value: the next one sets the new series.
            with self._children_lock:
                entry = self._children[key] = [metric.labels(*values), None]
        return entry

    def _forget_children(self) -> None:
        with self._children_lock:
            self._children.clear()

    def _remove(self, metric: Gauge | Counter | Histogram, *labels: str) -> None:
        """Remove a series, and its child from the cache: a series removed must be made anew
        when it comes back (a cached child would be set but no longer exported)."""
        _remove(metric, *labels)
        with self._children_lock:
            self._children.pop((metric, labels), None)

    def forget_leader_gauges(self, server: str, *, policies: Iterable[str]) -> None:
        """[ha]: drop what only a server's leader measures (it polls, a follower only probes),
        so that a follower never shows a stale value: `max by (server)` over the instances
        gives the leader's (docs/ha.md)."""
        for metric in (self.max_connections, self.connections_used, self.connections_usable):
            self._remove(metric, server)
        for state in _STATES:
            self._remove(self.sessions, server, state)
        for policy in policies:
            self._remove(self.candidates, server, policy)
            self._remove(self.pressure, server, policy)

    def record_probe(self, server: str, *, finished_at: float) -> None:
        """[ha]: a follower's cycle, one probe that the server answered."""
        self._set(self.server_up, 1, server)
        self._child(self.last_poll, server).set(finished_at)
        self._child(self.ha_probes, server).inc()

    def record_poll_failure(self, server: str) -> None:
        self.poll_errors.labels(server=server).inc()
        self._set(self.server_up, 0, server)

    def record(self, report: CycleReport, *, policies: Iterable[str], finished_at: float) -> None:
        """Account for one successful cycle of one server."""
        server = report.server
        self._set(self.server_up, 1, server)
        self._child(self.last_poll, server).set(finished_at)
        self._child(self.poll_duration, server).observe(report.duration_ms / 1000)
        self._record_connections(report)
        by_state = dict.fromkeys(_STATES, 0)
        for session in report.sessions:
            by_state[session.state if session.state in by_state else UNKNOWN_STATE] += 1
        for state, count in by_state.items():
            self._set(self.sessions, count, server, state)
        matched = self.record_signals(report, matched=dict.fromkeys(policies, 0))
        for policy, count in matched.items():
            self._set(self.candidates, count, server, policy)

    def record_signals(
        self, report: CycleReport, *, matched: dict[str, int] | None = None
    ) -> dict[str, int]:
        """Count the reaps, failures and deferrals of `report`'s outcomes: a cycle's, or an
        armed firing's (which has no poll). Returns `matched` with each outcome's policy counted."""
        server = report.server
        matched = {} if matched is None else matched
        deferred = 0
        for outcome in report.outcomes:
            policy = outcome.policy
            matched[policy] = matched.get(policy, 0) + 1
            if outcome.result is Result.DEFERRED:
                deferred += 1
            elif report.dry_run:
                continue  # nothing was signalled: no reap and no failure (a `denied` is predicted)
            elif (reason := _FAILURE_REASONS.get(outcome.result)) is not None:
                self._child(self.reap_failures, server, policy, reason).inc()
            elif action := _REAPED_ACTIONS.get(outcome.result):
                self._child(self.sessions_reaped, server, policy, action).inc()
        if deferred:
            self._child(self.deferred, server).inc(deferred)
        return matched

    def _record_connections(self, report: CycleReport) -> None:
        """How full the server was at the poll, and which pressure conditions held."""
        server = report.server
        if report.facts is not None:
            facts = report.facts
            self._set(self.max_connections, facts.max_connections, server)
            self._set(self.connections_used, facts.client_sessions, server)
            self._set(self.connections_usable, facts.usable_connections, server)
        for policy, held in report.pressure:
            self._set(self.pressure, 1 if held else 0, server, policy)


def _remove(metric: Gauge | Counter | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never observed
        metric.remove(*labels)
