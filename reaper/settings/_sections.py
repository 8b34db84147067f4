"""The sections of the config file, each a frozen model that refuses unknown keys."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
from datetime import timedelta
from functools import cached_property
from pathlib import Path  # noqa: TC003 - pydantic reads the fields' annotations at run time
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from reaper.conninfo import parse_conninfo, redact_conninfo
from reaper.identifiers import parse_table_name
from reaper.settings._durations import Duration, PositiveDuration, format_duration
from reaper.settings._notify_urls import AppriseMissing, check_url, load_apprise, redact_url
from reaper.settings._values import Name, Network, Percentage, Regex, readable_password_file

# [ha]'s advisory lock key: the first 8 bytes of SHA-256("pg-reaper"), a signed bigint.
# -2719498840538813096; pg_locks shows it as classid 3661784630, objid 2325278040, objsubid 1.
DEFAULT_LOCK_KEY = int.from_bytes(hashlib.sha256(b"pg-reaper").digest()[:8], "big", signed=True)

# The values pg_stat_activity.state takes (NULL aside: a row the reaper may not see).
IDLE_STATES = ("idle", "idle in transaction", "idle in transaction (aborted)")
ACTIVE_STATES = ("active", "fastpath function call")
ALL_STATES = (*IDLE_STATES, *ACTIVE_STATES, "disabled")


def default_instance_id() -> str:
    """``hostname:pid``: what tells one instance's audit events from another's."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReaperSection(_Section):
    interval: PositiveDuration = timedelta(seconds=30)
    min_interval: PositiveDuration = timedelta(seconds=1)
    dry_run: bool = False
    max_terminations_per_cycle: int = Field(default=50, ge=1)
    protect_users: tuple[str, ...] = ()
    protect_applications: tuple[Regex, ...] = ()
    # The reaper's own session: connect_timeout bounds a dead server; statement_timeout bounds a
    # poll stuck behind a catalog lock (the server-side idle timeouts are switched off for it).
    connect_timeout: PositiveDuration = timedelta(seconds=5)
    statement_timeout: PositiveDuration = timedelta(seconds=10)
    # `pg-reaper run` reloads the config file by itself when its contents change (checked every
    # 5 s), as SIGHUP does: a Kubernetes ConfigMap is updated in place, on every replica.
    watch_config: bool = True
    # The pressure fast path (docs/pressure.md): a server with pressure policies has its
    # connection count probed this often between polls; "0s" turns the probe off.
    pressure_probe_interval: Duration = timedelta(seconds=1)

    @model_validator(mode="after")
    def _intervals(self) -> Self:
        if self.min_interval > self.interval:
            raise ValueError(
                f"min_interval ({format_duration(self.min_interval)}) is longer than "
                f"interval ({format_duration(self.interval)})"
            )
        return self


# The shortest pressure probe cadence: a probe is a statement on the server.
MIN_PROBE_INTERVAL = timedelta(milliseconds=100)


def probe_interval_problem(probe: timedelta, interval: timedelta, *, of: str) -> str | None:
    """What is wrong with a pressure_probe_interval beside the interval it serves, if anything."""
    if probe == timedelta(0):
        return None  # off
    if probe < MIN_PROBE_INTERVAL:
        return (
            f"{format_duration(probe)} is shorter than {format_duration(MIN_PROBE_INTERVAL)} "
            "(use '0s' to turn the probe off)"
        )
    if probe > interval:
        return (
            f"{format_duration(probe)} is longer than {of} ({format_duration(interval)}): "
            "the polls would come first"
        )
    return None


class MetricsSection(_Section):
    # "127.0.0.1:9188", "[::1]:9188", "[::]:9188" (dual-stack), ":9188" (every address), or a host
    # name resolved at start (every address it resolves to); reaper/daemon/http.py binds it.
    listen: str = "127.0.0.1:9188"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value == "":
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"invalid listen address {value!r}: use 'host:port' or '' to disable")
        bracketed = host.startswith("[") and host.endswith("]")
        if host.startswith("[") != host.endswith("]") or (":" in host and not bracketed):
            raise ValueError(
                f"invalid listen address {value!r}: bracket an IPv6 host, as in '[::1]:9188'"
            )
        if bracketed:
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise ValueError(
                    f"invalid listen address {value!r}: {host[1:-1]!r} is not an IPv6 address"
                ) from None
        return value


class LogSection(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    include_query: bool = False

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class AuditSection(_Section):
    """The audit table (reaper/observe/audit.py); disabled while `dsn` is empty."""

    dsn: SecretStr = SecretStr("")
    # The reaper's session has search_path pinned to pg_catalog: a name without a schema is
    # read as in schema public (docs/audit.md).
    table: str = "public.pg_reaper_audit"
    password_file: Path | None = None

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value():
            parse_conninfo(value.get_secret_value())  # raises ValueError without secrets
        return value

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        parse_table_name(value)
        return value

    _password_file = field_validator("password_file")(readable_password_file)

    @property
    def enabled(self) -> bool:
        return bool(self.dsn.get_secret_value())

    @property
    def table_name(self) -> tuple[str, str]:
        """(schema, table), as PostgreSQL reads `table`; schema public when it names none."""
        parts = parse_table_name(self.table)
        return (parts[0], parts[1]) if len(parts) == 2 else ("public", parts[0])

    @property
    def redacted_dsn(self) -> str:
        return redact_conninfo(self.dsn.get_secret_value()) if self.enabled else ""


class HaSection(_Section):
    """Several instances sharing servers (docs/ha.md): each server reaped by the holder of an
    advisory lock on it."""

    enabled: bool = False
    # The advisory lock: pg_try_advisory_lock(lock_key), in the database lock_database. Every
    # instance that shares a server must use the same two values.
    lock_key: int = Field(default=DEFAULT_LOCK_KEY, ge=-(2**63), le=2**63 - 1)
    lock_database: str = "postgres"
    # Who this instance is in audit events and logs; "" means "hostname:pid".
    instance_id: str = ""

    @field_validator("lock_database")
    @classmethod
    def _lock_database(cls, value: str) -> str:
        if not value or "\x00" in value or len(value.encode()) > 63:  # NAMEDATALEN - 1
            raise ValueError(f"invalid database name {value!r}: 1 to 63 bytes")
        return value

    @field_validator("instance_id")
    @classmethod
    def _instance_id(cls, value: str) -> str:
        if value and (not value.isprintable() or value.strip() != value or len(value) > 200):
            raise ValueError(
                f"invalid instance_id {value!r}: up to 200 printable characters, "
                "no surrounding spaces"
            )
        return value

    @property
    def instance(self) -> str:
        """This instance's id: `instance_id`, else ``hostname:pid``."""
        return self.instance_id or default_instance_id()


def _apprise_url(value: SecretStr) -> SecretStr:
    check_url(value.get_secret_value())  # a ValueError that never quotes the URL
    return value


class NotifySection(_Section):
    """Notifications of what was reaped, through apprise (reaper/observe/notifications.py);
    disabled while `urls` is empty. Every URL is a secret: shown only redacted."""

    urls: tuple[Annotated[SecretStr, AfterValidator(_apprise_url)], ...] = ()
    # Per server: at most one message per window; the cycles inside it are summed into the
    # message sent when it ends. 0: a message for every cycle that reaped something.
    cooldown: Duration = timedelta(minutes=5)
    title: str = "pg-reaper"
    # Bounds each network wait of a delivery (connect, then each read), per URL.
    timeout: PositiveDuration = timedelta(seconds=10)
    victims: int = Field(default=5, ge=0, le=50)  # the oldest victims a message lists

    @field_validator("urls", mode="before")
    @classmethod
    def _apprise_installed(cls, value: object) -> object:
        if value:
            try:
                load_apprise()
            except AppriseMissing as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("title")
    @classmethod
    def _title(cls, value: str) -> str:
        if not value or not value.isprintable() or len(value) > 100:
            raise ValueError(f"invalid title {value!r}: 1 to 100 printable characters")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.urls)

    @property
    def redacted_urls(self) -> list[str]:
        return [redact_url(url.get_secret_value()) for url in self.urls]


class ServerConfig(_Section):
    name: Name
    dsn: SecretStr
    password_file: Path | None = None
    interval: PositiveDuration | None = None
    pressure_probe_interval: Duration | None = None  # [reaper]'s when unset
    policies: tuple[str, ...] | None = None

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: SecretStr) -> SecretStr:
        parse_conninfo(value.get_secret_value())  # raises ValueError without secrets
        return value

    _password_file = field_validator("password_file")(readable_password_file)

    @property
    def redacted_dsn(self) -> str:
        return redact_conninfo(self.dsn.get_secret_value())


# A policy's age thresholds, in the order its reasons name them.
THRESHOLDS = ("max_idle", "max_runtime", "max_transaction_age", "max_connection_age")
# What a policy needs at least one of: an age threshold, or when_blocking (which alone is enough).
CONDITIONS = (*THRESHOLDS, "when_blocking")


class PolicyConfig(_Section):
    name: Name
    states: tuple[str, ...] = IDLE_STATES
    max_idle: PositiveDuration | None = None
    max_runtime: PositiveDuration | None = None
    max_transaction_age: PositiveDuration | None = None
    max_connection_age: PositiveDuration | None = None
    # Connection pressure (docs/pressure.md): the policy applies only while client sessions
    # exceed this share of the usable slots, or of the session's role's connection limit.
    when_connections_above: Percentage | None = None
    when_role_connections_above: Percentage | None = None
    # Blockers (docs/configuration.md): the policy matches a session only while it blocks a
    # backend whose lock wait began at least this long ago (pg_blocking_pids, pg_locks.waitstart).
    when_blocking: PositiveDuration | None = None
    databases: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    applications: tuple[Regex, ...] = ()
    client_addrs: tuple[Network, ...] = ()
    exclude_databases: tuple[str, ...] = ()
    exclude_users: tuple[str, ...] = ()
    exclude_applications: tuple[Regex, ...] = ()
    exclude_client_addrs: tuple[Network, ...] = ()
    # Regexes (re.search) on the session's last query text: a heuristic (docs/configuration.md).
    queries: tuple[Regex, ...] = ()
    exclude_queries: tuple[Regex, ...] = ()
    action: Literal["terminate", "cancel", "log"] = "terminate"
    # Cancel-then-terminate: a session cancelled by this policy that still runs the same query
    # this long after the cancel is terminated.
    escalate_after: PositiveDuration | None = None

    @field_validator("states")
    @classmethod
    def _states(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must list at least one state")
        for state in value:
            if state not in ALL_STATES:
                known = ", ".join(repr(s) for s in ALL_STATES)
                raise ValueError(f"unknown state {state!r}: use one of {known}")
        if len(set(value)) != len(value):
            raise ValueError("lists a state twice")
        return value

    @model_validator(mode="after")
    def _thresholds(self) -> Self:
        if all(getattr(self, t) is None for t in CONDITIONS):
            raise ValueError("needs at least one of " + ", ".join(CONDITIONS))
        active = [s for s in self.states if s in ACTIVE_STATES]
        if self.max_idle is not None and active:
            raise ValueError(
                f"max_idle cannot apply to state {active[0]!r}: an active session is not idle "
                "(use max_runtime)"
            )
        if self.max_runtime is not None and not active:
            raise ValueError("max_runtime needs 'active' in states (it measures a running query)")
        if self.action == "cancel" and len(active) != len(self.states):
            raise ValueError(
                "action 'cancel' only interrupts a running query: with idle states it does "
                "nothing (use 'terminate', or states = ['active'])"
            )
        if self.escalate_after is not None and self.action != "cancel":
            raise ValueError(
                "escalate_after needs action 'cancel' (it terminates a session that is still "
                "running the query it was cancelled for)"
            )
        if self.action == "cancel" and self.pressure:
            raise ValueError(
                f"{next(iter(self.pressure))} needs action 'terminate' (or 'log'): cancelling a "
                "query frees no connection"
            )
        return self

    # Cached: the policy engine reads them for every session of every poll.
    @cached_property
    def thresholds(self) -> dict[str, timedelta]:
        return {key: value for key in THRESHOLDS if (value := getattr(self, key)) is not None}

    @cached_property
    def limits(self) -> tuple[tuple[str, float], ...]:
        """The thresholds set, in seconds, in the order of `thresholds`."""
        return tuple((key, value.total_seconds()) for key, value in self.thresholds.items())

    @cached_property
    def blocking_seconds(self) -> float | None:
        """when_blocking in seconds; None when the policy has none."""
        return None if self.when_blocking is None else self.when_blocking.total_seconds()

    @property
    def reads_queries(self) -> bool:
        """Whether the policy looks at the sessions' last query text (queries, exclude_queries)."""
        return bool(self.queries or self.exclude_queries)

    @cached_property
    def pressure(self) -> dict[str, int]:
        """The connection-pressure conditions set, as percentages; all of them must hold."""
        return {
            key: value
            for key in ("when_connections_above", "when_role_connections_above")
            if (value := getattr(self, key)) is not None
        }
