"""The configuration: one TOML file, validated strictly into one frozen model.

Everything else in pg-reaper only ever sees `Settings`. Errors name the key path and the bad
value (``policies[1].max_idle: invalid duration '15 mins'``); secrets never appear in them.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import ipaddress
import json
import os
import re
import socket
import tomllib
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from reaper.conninfo import parse_conninfo, redact_conninfo
from reaper.identifiers import parse_table_name

__all__ = [
    "ACTIVE_STATES",
    "ALL_STATES",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_LOCK_KEY",
    "IDLE_STATES",
    "AuditSection",
    "ConfigError",
    "HaSection",
    "LogSection",
    "MetricsSection",
    "PolicyConfig",
    "ReaperSection",
    "ServerConfig",
    "Settings",
    "default_instance_id",
    "format_duration",
    "load_settings",
    "parse_duration",
    "resolve_config_path",
]

DEFAULT_CONFIG_PATH = Path("/etc/pg-reaper/config.toml")
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


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per thing that is wrong."""

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


# --- value types -------------------------------------------------------------------------------

_DURATION = re.compile(
    r"(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m(?!s))?(?:(?P<s>\d+)s)?(?:(?P<ms>\d+)ms)?",
    re.ASCII,
)


def parse_duration(value: object) -> timedelta:
    """Parse ``"90s"``, ``"15m"``, ``"1h30m"``, ``"2d"``, ``"500ms"`` or integer seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(  # noqa: TRY004 - pydantic reports ValueError
            f"invalid duration {value!r}: use a string such as '90s', '15m', '1h30m'"
        )
    text = value.strip() if isinstance(value, str) else str(value)
    if re.fullmatch(r"-?\d+", text, re.ASCII) or text.startswith("-"):
        if text.startswith("-"):
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        try:
            return timedelta(seconds=int(text))
        except OverflowError:
            raise ValueError(f"invalid duration {value!r}: too long") from None
    match = _DURATION.fullmatch(text)
    if not text or match is None or not any(match.groupdict().values()):
        raise ValueError(
            f"invalid duration {value!r}: use units d, h, m, s, ms as in '90s', '15m', '1h30m'"
        )
    parts = {unit: int(amount) for unit, amount in match.groupdict().items() if amount}
    try:
        return timedelta(
            days=parts.get("d", 0),
            hours=parts.get("h", 0),
            minutes=parts.get("m", 0),
            seconds=parts.get("s", 0),
            milliseconds=parts.get("ms", 0),
        )
    except OverflowError:
        raise ValueError(f"invalid duration {value!r}: too long") from None


def format_duration(value: timedelta) -> str:
    """The shortest spelling `parse_duration` reads back: ``1h30m``, ``90s`` is ``1m30s``."""
    total_ms = round(value.total_seconds() * 1000)
    if total_ms == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        amount, total_ms = divmod(total_ms, size)
        if amount:
            out.append(f"{amount}{unit}")
    if total_ms:
        out.append(f"{total_ms}ms")
    return "".join(out)


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be greater than 0")
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
PositiveDuration = Annotated[
    timedelta,
    BeforeValidator(lambda v: _positive(parse_duration(v))),
    PlainSerializer(format_duration, return_type=str),
]


def _compile_regex(value: object) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    if not isinstance(value, str):
        raise ValueError(f"invalid regex {value!r}: must be a string")  # noqa: TRY004 - pydantic reports ValueError
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regex {value!r}: {exc}") from None


Regex = Annotated[
    re.Pattern[str],
    BeforeValidator(_compile_regex),
    PlainSerializer(lambda p: p.pattern, return_type=str),
]

ClientNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network | Literal["local"]


def _parse_network(value: object) -> ClientNetwork:
    if value == "local":
        return "local"
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 - pydantic reports ValueError
            f"invalid CIDR {value!r}: must be a string such as '10.0.0.0/8' or 'local'"
        )
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        hint = ""
        with contextlib.suppress(ValueError):
            hint = f" (did you mean '{ipaddress.ip_network(value.strip(), strict=False)}'?)"
        raise ValueError(f"invalid CIDR {value!r}: {exc}{hint}") from None


Network = Annotated[
    ClientNetwork,
    BeforeValidator(_parse_network),
    PlainSerializer(str, return_type=str),
]

_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,63}")


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value) or value.strip() != value:
        raise ValueError(
            f"invalid name {value!r}: 1 to 63 printable characters, no surrounding spaces"
        )
    return value


Name = Annotated[str, BeforeValidator(lambda v: _check_name(v) if isinstance(v, str) else v)]


def _parse_percentage(value: object) -> int:
    """``"80%"`` -> 80: a whole percentage from 1% to 100%, always written with its sign (a bare
    80 or 0.8 would be ambiguous)."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 - pydantic reports ValueError
            f"invalid percentage {_toml_repr(value)}: write it as a string such as '80%'"
        )
    text = value.strip()
    if re.fullmatch(r"\d+", text, re.ASCII):
        raise ValueError(f"invalid percentage {value!r}: write the % sign, as in '{text}%'")
    if not re.fullmatch(r"\d+%", text, re.ASCII):
        raise ValueError(
            f"invalid percentage {value!r}: use a whole percentage from '1%' to '100%', "
            "such as '80%'"
        )
    percent = int(text[:-1])
    if not 1 <= percent <= 100:
        raise ValueError(f"invalid percentage {value!r}: must be from '1%' to '100%'")
    return percent


Percentage = Annotated[
    int,
    BeforeValidator(_parse_percentage),
    PlainSerializer(lambda v: f"{v}%", return_type=str),
]


def _readable_password_file(value: Path | None) -> Path | None:
    """A password file must exist and be readable now (its contents are read at each connect)."""
    if value is not None and not os.access(value, os.R_OK):
        why = "does not exist" if not value.exists() else "is not readable"
        # The path is not shown: it may be a password put there by mistake.
        raise ValueError(f"password file (path not shown) {why}")
    return value


# --- sections ----------------------------------------------------------------------------------


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

    @model_validator(mode="after")
    def _intervals(self) -> Self:
        if self.min_interval > self.interval:
            raise ValueError(
                f"min_interval ({format_duration(self.min_interval)}) is longer than "
                f"interval ({format_duration(self.interval)})"
            )
        return self


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

    _password_file = field_validator("password_file")(_readable_password_file)

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


class ServerConfig(_Section):
    name: Name
    dsn: SecretStr
    password_file: Path | None = None
    interval: PositiveDuration | None = None
    policies: tuple[str, ...] | None = None

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: SecretStr) -> SecretStr:
        parse_conninfo(value.get_secret_value())  # raises ValueError without secrets
        return value

    _password_file = field_validator("password_file")(_readable_password_file)

    @property
    def redacted_dsn(self) -> str:
        return redact_conninfo(self.dsn.get_secret_value())


# A policy's age thresholds, in the order its reasons name them.
THRESHOLDS = ("max_idle", "max_runtime", "max_transaction_age", "max_connection_age")


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
    databases: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    applications: tuple[Regex, ...] = ()
    client_addrs: tuple[Network, ...] = ()
    exclude_databases: tuple[str, ...] = ()
    exclude_users: tuple[str, ...] = ()
    exclude_applications: tuple[Regex, ...] = ()
    exclude_client_addrs: tuple[Network, ...] = ()
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
        if all(getattr(self, t) is None for t in THRESHOLDS):
            raise ValueError("needs at least one of " + ", ".join(THRESHOLDS))
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
    def pressure(self) -> dict[str, int]:
        """The connection-pressure conditions set, as percentages; all of them must hold."""
        return {
            key: value
            for key in ("when_connections_above", "when_role_connections_above")
            if (value := getattr(self, key)) is not None
        }


class Settings(BaseSettings):
    """The whole validated configuration. Environment variables override the file."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="PG_REAPER_",
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    reaper: ReaperSection = ReaperSection()
    metrics: MetricsSection = MetricsSection()
    log: LogSection = LogSection()
    audit: AuditSection = AuditSection()
    ha: HaSection = HaSection()
    servers: tuple[ServerConfig, ...] = Field(min_length=1)
    policies: tuple[PolicyConfig, ...] = Field(min_length=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],  # noqa: ARG003 - part of the hook's signature
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no .env files
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - secrets via password_file
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: the environment overrides what the TOML file (passed as init data) says.
        return env_settings, init_settings

    @model_validator(mode="after")
    def _references(self) -> Self:
        problems = []
        defined = [p.name for p in self.policies]
        for kind, names in (("servers", [s.name for s in self.servers]), ("policies", defined)):
            for index, name in enumerate(names):
                if name in names[:index]:
                    problems.append(f"{kind}[{index}].name: duplicate name {name!r}")
        for index, server in enumerate(self.servers):
            if server.interval is not None and server.interval < self.reaper.min_interval:
                problems.append(
                    f"servers[{index}].interval: {format_duration(server.interval)} is shorter "
                    f"than reaper.min_interval ({format_duration(self.reaper.min_interval)})"
                )
            for ref in server.policies or ():
                if ref not in defined:
                    hint = _did_you_mean(ref, defined)
                    problems.append(f"servers[{index}].policies: undefined policy {ref!r}{hint}")
        if problems:
            raise ValueError("\n".join(problems))  # each line names its own key
        return self

    def policies_for(self, server: ServerConfig) -> tuple[PolicyConfig, ...]:
        """The policies that apply to `server`, in file order (the first match names a session)."""
        if server.policies is None:
            return self.policies
        wanted = set(server.policies)
        return tuple(p for p in self.policies if p.name in wanted)

    def interval_for(self, server: ServerConfig) -> timedelta:
        return server.interval or self.reaper.interval

    def with_dry_run(self) -> Settings:
        return self.model_copy(update={"reaper": self.reaper.model_copy(update={"dry_run": True})})

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets replaced: safe to print."""
        data = self.model_dump(mode="json")
        for server, raw in zip(self.servers, data["servers"], strict=True):
            raw["dsn"] = server.redacted_dsn
        data["audit"]["dsn"] = self.audit.redacted_dsn
        return data


# --- loading -----------------------------------------------------------------------------------


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """`-c FILE`, else ``$PG_REAPER_CONFIG``, else ``/etc/pg-reaper/config.toml``."""
    if path:
        return Path(path)
    from_env = os.environ.get("PG_REAPER_CONFIG")
    return Path(from_env) if from_env else DEFAULT_CONFIG_PATH


def load_settings(path: Path) -> Settings:
    """Read, parse and validate `path`; raise `ConfigError` naming every problem."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"]) from None
    # pydantic-settings reads keyword arguments starting with "_" as its own options
    # (_env_prefix, _cli_parse_args, ...): in the file they are unknown keys like any other.
    private = [key for key in data if key.startswith("_")]
    if private:
        raise ConfigError([f"{_key_path((key,))}: unknown key {key!r}" for key in private])
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, data)) from None
    except SettingsError as exc:  # an environment variable that is not valid JSON for a table
        raise ConfigError([_env_problem(exc)]) from None


_ECHO_VALUE = frozenset(
    {"literal_error", "bool_parsing", "bool_type", "int_parsing", "int_type", "string_type"}
)
# Keys whose values are never shown: a password_file may be a password put there by mistake.
_SECRET_KEYS = frozenset({"dsn", "password", "password_file", "sslpassword"})
# Text that may hold a connection string or a password: keyword=value, a URI, a "dsn" key.
_SECRET_TEXT = re.compile(r"(?i)pass|dsn|://|postgres(ql)?:|[a-z_]\s*=")
_MISSING = object()


def _explain(error: ValidationError, data: dict[str, Any]) -> list[str]:  # noqa: C901 - one branch per kind of error
    """One line per problem, naming its key path (and the environment variable that set it).

    A value is shown only when it is the scalar at the failing key, not under a secret key, not
    itself secret-looking, and not from an environment variable whose text holds a DSN: the
    messages of the validators quote the value, so a message that may not show it is cut there.
    """
    problems: list[str] = []
    errors = error.errors(include_url=False)
    for item in errors:
        loc = item["loc"]
        if item["type"] == "too_short" and any(len(e["loc"]) > len(loc) for e in errors):
            continue  # a list whose every entry failed is "too short" only as a consequence
        path = _key_path(loc)
        message = str(item["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        origin = _origin(loc, data)
        if item["type"] == "extra_forbidden":
            key = str(loc[-1])
            message = f"unknown key {key!r}{_did_you_mean(key, _known_keys(loc[:-1]))}"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] == "too_short" and loc in {("servers",), ("policies",)}:
            message = f"at least one [[{loc[0]}]] table is required"
        elif item["type"] == "tuple_type":
            message = _not_a_list(loc)
        elif item["type"] == "model_type":
            message = f"must be a table ([{path}])" if len(loc) == 1 else "must be a table"
        elif origin.secret(loc):  # a validator's message, which may quote the value
            message = _without_value(message, item.get("input"))
        elif item["type"] in _ECHO_VALUE and origin.shows(loc):
            message = f"{message}, got {_toml_repr(origin.value)}"
        if not path:  # the model-wide check names each key itself, one line each
            problems.extend(_line_problem(line, data) for line in message.splitlines())
            continue
        if origin.variable:
            message = f"{message} (from the environment variable {origin.variable})"
        problems.append(f"{path}: {message}" if path else message)
    return problems


class _Origin:
    """Where the value at a key path came from: the file, or an environment variable."""

    __slots__ = ("value", "variable", "variable_text")

    def __init__(self, value: object, variable: str | None, variable_text: str | None) -> None:
        self.value = value  # the value at the key path as given; _MISSING when unknown
        self.variable = variable
        self.variable_text = variable_text

    def secret(self, loc: tuple[int | str, ...]) -> bool:
        """Whether nothing of the value may show in an error message."""
        if _SECRET_KEYS.intersection(str(part).lower() for part in loc):
            return True
        if self.variable_text is not None and _SECRET_TEXT.search(self.variable_text):
            return True  # a JSON table or list that holds a DSN: nothing of it is shown
        values = self.value if isinstance(self.value, list | tuple) else [self.value]
        return any(isinstance(v, str) and _SECRET_TEXT.search(v) for v in values)

    def shows(self, loc: tuple[int | str, ...]) -> bool:
        """Whether the value may be echoed: a scalar that is not secret."""
        return isinstance(self.value, str | bool | int | float) and not self.secret(loc)


def _origin(loc: tuple[int | str, ...], data: dict[str, Any]) -> _Origin:
    variable = _env_source(loc)
    if variable is None:
        return _Origin(_lookup(data, loc), None, None)
    return _Origin(*variable)


def _not_a_list(loc: tuple[int | str, ...]) -> str:
    if loc not in {("servers",), ("policies",)}:
        return 'must be a list (a TOML array such as ["a", "b"])'
    key = str(loc[0])
    if variables := _item_variables(key):
        return (
            f"{', '.join(variables)} cannot set one entry of a list: set the whole list as "
            f"JSON in PG_REAPER_{key.upper()}, or edit the file"
        )
    return f"must be an array of tables: write [[{key}]]"


def _item_variables(key: str) -> list[str]:
    """The environment variables that try to set one entry of the list `key`
    (``PG_REAPER_POLICIES__0__MAX_IDLE``): pydantic-settings reads them as a table."""
    prefix = f"PG_REAPER_{key.upper()}__"
    return sorted(name for name in os.environ if name.upper().startswith(prefix))


def _env_source(loc: tuple[int | str, ...]) -> tuple[object, str, str] | None:
    """The environment variable that set the value at `loc`, if one did: the value at `loc`
    in it (a table or list variable is JSON), its name, and its whole text."""
    # PG_REAPER_REAPER__DRY_RUN for ("reaper", "dry_run"); PG_REAPER_SERVERS for
    # ("servers", 0, "dsn"), whose rest (0, "dsn") is looked up in the JSON.
    prefixes = [i + 1 for i, part in enumerate(loc) if isinstance(part, str)]
    for end in reversed(prefixes):
        names = [str(p) for p in loc[:end] if isinstance(p, str)]
        wanted = ("PG_REAPER_" + "__".join(names)).upper()
        for key, text in os.environ.items():
            if key.upper() != wanted:
                continue
            rest = loc[end:]
            if not rest:
                return text, key, text
            try:
                value = _lookup(json.loads(text), rest)
            except ValueError:
                return _MISSING, key, text
            if value is not _MISSING:
                return value, key, text
            # Set, but without this key: the value came from the file (a partial update).
    return None


def _line_problem(line: str, data: dict[str, Any]) -> str:
    """One line of the model-wide check, ``key.path: message``, as `_explain` writes a field's
    problem: its value hidden when it may not be shown, its environment variable named."""
    path, sep, message = line.partition(": ")
    if not sep:
        return line
    loc = tuple(
        int(index) if index else key for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path)
    )
    origin = _origin(loc, data)
    if origin.secret(loc):
        message = _without_value(message, origin.value)
    if origin.variable:
        message = f"{message} (from the environment variable {origin.variable})"
    return f"{path}: {message}"


def _without_value(message: str, value: object) -> str:
    """`message` cut before the first quoted word or the value itself, where the validators put
    the value they refuse."""
    cuts = [i for i in (message.find("'"), message.find('"')) if i >= 0]
    if isinstance(value, str) and value.strip():
        unquoted = re.search(rf"(?<!\w){re.escape(value.strip())}(?!\w)", message)
        cuts.extend([unquoted.start()] if unquoted else [])
    if not cuts:
        return message
    kept = message[: min(cuts)].rstrip(" :,(")
    return f"{kept or 'invalid value'} (value not shown)"


def _env_problem(error: SettingsError) -> str:
    """An environment variable for a table or list that is not JSON, named exactly."""
    match = re.search(r'field "(\w+)"', str(error))
    field = match[1] if match else "?"
    name = f"PG_REAPER_{field.upper()}"
    why = "must be JSON for a table or list"
    for key, text in sorted(os.environ.items()):
        upper = key.upper()
        if upper != name and not upper.startswith(name + "__"):
            continue
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:  # its reason and position, never the text
            where = f"{exc.msg}: line {exc.lineno} column {exc.colno}"
            return f"{field}: the environment variable {key} {why} ({where})"
    return f"{field}: the environment variable {name} {why}"


def _toml_repr(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if not part.isprintable():  # a quoted TOML key may hold a newline or an escape
            part = repr(part)  # noqa: PLW2901 - shown, not used
        if not out:
            out = part
        else:
            out += f".{part}"
    return out


def _lookup(data: object, loc: tuple[int | str, ...]) -> object:
    """The value at `loc` in `data`; `_MISSING` when there is none."""
    for part in loc:
        try:
            data = data[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return data


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        inner = getattr(annotation, "__args__", (annotation,))[0]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif isinstance(inner, type) and issubclass(inner, BaseModel):
            model = inner
        else:
            return []
    return list(model.model_fields)


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
