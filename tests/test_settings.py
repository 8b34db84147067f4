"""Unit tests of reaper/settings/: durations, defaults, environment overrides, secrets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from reaper.settings import (
    DEFAULT_CONFIG_PATH,
    IDLE_STATES,
    ConfigError,
    Settings,
    format_duration,
    load_settings,
    parse_duration,
    resolve_config_path,
)
from tests.config_helpers import MINIMAL, PASSWORD, clean_environment  # noqa: F401 - clean_environment is an autouse fixture


def _load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path)


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2d", timedelta(days=2)),
        ("500ms", timedelta(milliseconds=500)),
        ("1m5ms", timedelta(minutes=1, milliseconds=5)),
        ("1d2h3m4s5ms", timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=5)),
        (45, timedelta(seconds=45)),
        ("45", timedelta(seconds=45)),
        (0, timedelta(0)),
        ("  15m ", timedelta(minutes=15)),
        (timedelta(minutes=3), timedelta(minutes=3)),
    ],
    ids=repr,
)
def test_parse_duration(text: object, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "value",
    [
        "15 mins",
        "-5s",
        "1h30",
        "m",
        "",
        "   ",
        "30m1h",
        "15M",
        "1.5h",
        "+5",
        -5,
        1.5,
        True,
        None,
        ["15m"],
    ],
    ids=repr,
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration") as info:
        parse_duration(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(days=2), "2d"),
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(days=1, seconds=1, milliseconds=1), "1d1s1ms"),
        (timedelta(hours=25), "1d1h"),
    ],
)
def test_format_duration(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@pytest.mark.parametrize("text", ["90s", "15m", "1h30m", "2d", "500ms", "45", "3600", "0"])
def test_format_parse_round_trip_of_strings(text: str) -> None:
    value = parse_duration(text)
    assert parse_duration(format_duration(value)) == value
    # Formatting is canonical: a formatted value formats to itself.
    assert format_duration(parse_duration(format_duration(value))) == format_duration(value)


_CANONICAL = re.compile(
    r"0s|(?:[1-9]\d*d)?(?:[1-9]\d*h)?(?:[1-9]\d*m)?(?:[1-9]\d*s)?(?:[1-9]\d*ms)?"
)


@hypothesis_settings(database=None, max_examples=300)
@given(st.integers(min_value=0, max_value=1_000_000 * 86_400_000))  # up to a million days
def test_format_parse_round_trip_of_whole_milliseconds(milliseconds: int) -> None:
    value = timedelta(milliseconds=milliseconds)
    text = format_duration(value)
    assert _CANONICAL.fullmatch(text), text
    assert parse_duration(text) == value


def test_parse_duration_too_large_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("99999999999d")


# --- defaults ----------------------------------------------------------------------------------


def test_defaults_from_design(tmp_path: Path) -> None:
    settings = _load(tmp_path, MINIMAL)
    assert settings.reaper.interval == timedelta(seconds=30)
    assert settings.reaper.min_interval == timedelta(seconds=1)
    assert settings.reaper.dry_run is False
    assert settings.reaper.max_terminations_per_cycle == 50
    assert settings.reaper.protect_users == ()
    assert settings.reaper.protect_applications == ()
    assert settings.metrics.listen == "127.0.0.1:9188"
    assert settings.log.format == "auto"
    assert settings.log.level == "info"
    assert settings.log.include_query is False

    (server,) = settings.servers
    assert server.password_file is None
    assert server.interval is None
    assert server.policies is None

    (policy,) = settings.policies
    assert policy.states == ("idle", "idle in transaction", "idle in transaction (aborted)")
    assert policy.states == IDLE_STATES
    assert policy.action == "terminate"
    assert policy.max_idle == timedelta(minutes=15)
    assert policy.max_runtime is None
    assert policy.max_transaction_age is None
    assert policy.thresholds == {"max_idle": timedelta(minutes=15)}
    for key in (
        "databases",
        "users",
        "applications",
        "client_addrs",
        "exclude_databases",
        "exclude_users",
        "exclude_applications",
        "exclude_client_addrs",
        "queries",
        "exclude_queries",
    ):
        assert getattr(policy, key) == (), key
    assert policy.when_blocking is None
    assert not policy.reads_queries


def test_values_are_parsed_into_types(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        MINIMAL
        + """
[[policies]]
name = "scoped"
states = ["idle in transaction"]
max_transaction_age = "1h"
applications = ["^web-"]
client_addrs = ["10.0.0.0/8", "local", "fd00::/8"]
""",
    )
    policy = settings.policies[1]
    assert policy.max_transaction_age == timedelta(hours=1)
    assert policy.applications[0].search("web-1") is not None
    assert policy.applications[0].search("psql") is None
    assert [str(a) for a in policy.client_addrs] == ["10.0.0.0/8", "local", "fd00::/8"]


def test_when_blocking_alone_is_a_threshold_and_query_filters_are_regexes(
    tmp_path: Path,
) -> None:
    settings = _load(
        tmp_path,
        MINIMAL
        + """
[[policies]]
name = "blockers"
states = ["idle in transaction"]
when_blocking = "30s"

[[policies]]
name = "listeners"
max_idle = "1h"
queries = ['^SELECT']
exclude_queries = ['(?i)^\\s*LISTEN\\b']
""",
    )
    blockers, listeners = settings.policies[1:]
    assert blockers.when_blocking == timedelta(seconds=30)
    assert blockers.blocking_seconds == 30.0
    assert blockers.thresholds == {}  # no age threshold: when_blocking alone
    assert not blockers.reads_queries
    assert listeners.reads_queries
    assert listeners.exclude_queries[0].search("  listen jobs") is not None
    assert listeners.exclude_queries[0].search("SELECT 'LISTEN'") is None
    assert listeners.queries[0].search("SELECT 1") is not None


@pytest.mark.parametrize(("length", "valid"), [(1, True), (63, True), (64, False)])
def test_name_length_limit(tmp_path: Path, length: int, valid: bool) -> None:  # noqa: FBT001
    text = MINIMAL.replace('name = "primary"', f'name = "{"n" * length}"')
    if valid:
        assert _load(tmp_path, text).servers[0].name == "n" * length
    else:
        with pytest.raises(ConfigError) as info:
            _load(tmp_path, text)
        assert info.value.problems[0].startswith("servers[0].name: invalid name ")


# --- environment overrides ---------------------------------------------------------------------

FILE_WITH_REAPER = """
[reaper]
interval = "10s"
dry_run = false

[log]
level = "warning"
"""


def test_env_dry_run_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _load(tmp_path, FILE_WITH_REAPER + MINIMAL).reaper.dry_run is False
    monkeypatch.setenv("PG_REAPER_REAPER__DRY_RUN", "true")
    settings = _load(tmp_path, FILE_WITH_REAPER + MINIMAL)
    assert settings.reaper.dry_run is True
    # The override replaces one key, not the whole [reaper] table.
    assert settings.reaper.interval == timedelta(seconds=10)


@pytest.mark.parametrize("value", ["debug", "DEBUG"])
def test_env_log_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PG_REAPER_LOG__LEVEL", value)
    settings = _load(tmp_path, FILE_WITH_REAPER + MINIMAL)
    assert settings.log.level == "debug"
    assert settings.log.format == "auto"


def test_env_max_terminations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_REAPER_REAPER__MAX_TERMINATIONS_PER_CYCLE", "7")
    settings = _load(tmp_path, MINIMAL)
    assert settings.reaper.max_terminations_per_cycle == 7
    assert settings.reaper.dry_run is False


def test_env_duration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_REAPER_REAPER__INTERVAL", "1m30s")
    assert _load(tmp_path, FILE_WITH_REAPER + MINIMAL).reaper.interval == timedelta(seconds=90)


def test_env_invalid_value_names_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_REAPER_REAPER__DRY_RUN", "perhaps")
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, FILE_WITH_REAPER + MINIMAL)
    (problem,) = info.value.problems
    assert problem.startswith("reaper.dry_run: Input should be a valid boolean")


def test_env_invalid_value_shows_env_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_REAPER_REAPER__DRY_RUN", "perhaps")
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, FILE_WITH_REAPER + MINIMAL)
    assert "perhaps" in info.value.problems[0]
    assert "PG_REAPER_REAPER__DRY_RUN" in info.value.problems[0]


@pytest.mark.parametrize("name", ["PG_REAPER_POLICIES__0__MAX_IDLE", "PG_REAPER_SERVERS__0__DSN"])
def test_env_setting_one_entry_of_a_list_is_refused_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "5m")
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, MINIMAL)
    (problem,) = info.value.problems
    key = name.split("__", maxsplit=1)[0].removeprefix("PG_REAPER_")
    assert problem == (
        f"{key.lower()}: {name} cannot set one entry of a list: set the whole list as JSON in "
        f"PG_REAPER_{key}, or edit the file"
    )


def test_env_config_path_is_not_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PG_REAPER_CONFIG shares the prefix but is not a key: it must not trip extra="forbid".
    monkeypatch.setenv("PG_REAPER_CONFIG", str(tmp_path / "config.toml"))
    assert _load(tmp_path, MINIMAL).servers[0].name == "primary"


def test_env_invalid_complex_value_is_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_REAPER_SERVERS", "garbage")
    with pytest.raises(ConfigError):
        _load(tmp_path, MINIMAL)


# --- config path -------------------------------------------------------------------------------


def test_resolve_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH
    assert str(DEFAULT_CONFIG_PATH) == "/etc/pg-reaper/config.toml"
    monkeypatch.setenv("PG_REAPER_CONFIG", str(tmp_path / "env.toml"))
    assert resolve_config_path(None) == tmp_path / "env.toml"
    assert resolve_config_path(tmp_path / "arg.toml") == tmp_path / "arg.toml"


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.problems == (f"{path}: config file not found",)


# --- policies and intervals per server ---------------------------------------------------------

THREE_POLICIES = """
[reaper]
interval = "45s"

[[servers]]
name = "picky"
dsn = "host=/tmp"
interval = "10s"
policies = ["c", "a"]

[[servers]]
name = "all"
dsn = "host=/tmp"

[[policies]]
name = "a"
max_idle = "1m"

[[policies]]
name = "b"
max_idle = "2m"

[[policies]]
name = "c"
max_idle = "3m"
"""


def test_policies_for_keeps_file_order(tmp_path: Path) -> None:
    settings = _load(tmp_path, THREE_POLICIES)
    picky, everything = settings.servers
    assert [p.name for p in settings.policies_for(picky)] == ["a", "c"]
    assert [p.name for p in settings.policies_for(everything)] == ["a", "b", "c"]
    assert settings.policies_for(picky)[1].max_idle == timedelta(minutes=3)


def test_interval_for_uses_server_override(tmp_path: Path) -> None:
    settings = _load(tmp_path, THREE_POLICIES)
    picky, everything = settings.servers
    assert settings.interval_for(picky) == timedelta(seconds=10)
    assert settings.interval_for(everything) == timedelta(seconds=45)


# --- secrets -----------------------------------------------------------------------------------

SECRET_DSNS = f"""
[[servers]]
name = "uri"
dsn = "postgresql://reaper:{PASSWORD}@db.example.com:5432/app"

[[servers]]
name = "keywords"
dsn = "host=x dbname=postgres user=reaper password={PASSWORD}"

[[servers]]
name = "quoted"
dsn = "host=x user=reaper password='{PASSWORD} with spaces' sslpassword={PASSWORD}"

[[policies]]
name = "idle"
max_idle = "15m"
"""


def test_secrets_never_shown(tmp_path: Path) -> None:
    settings = _load(tmp_path, SECRET_DSNS)
    # The secret is really there (or this test would prove nothing) ...
    assert all(PASSWORD in s.dsn.get_secret_value() for s in settings.servers)
    # ... and nothing meant for display shows it.
    redacted = settings.redacted()
    assert PASSWORD not in json.dumps(redacted)
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)
    for server in settings.servers:
        assert PASSWORD not in repr(server)
        assert PASSWORD not in server.redacted_dsn
    uri, keywords, quoted = redacted["servers"]
    assert "password=********" in uri["dsn"]
    assert "host=db.example.com" in uri["dsn"]
    assert "dbname=app" in uri["dsn"]
    assert "password=********" in keywords["dsn"]
    assert "user=reaper" in keywords["dsn"]
    assert "sslpassword=********" in quoted["dsn"]


def test_redacted_is_the_effective_config(tmp_path: Path) -> None:
    data = _load(tmp_path, THREE_POLICIES).redacted()
    assert data["reaper"]["interval"] == "45s"
    assert data["servers"][0]["interval"] == "10s"
    assert data["servers"][0]["policies"] == ["c", "a"]
    assert data["servers"][1]["interval"] is None
    assert [p["max_idle"] for p in data["policies"]] == ["1m", "2m", "3m"]


# --- immutability ------------------------------------------------------------------------------


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = _load(tmp_path, MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        settings.reaper = settings.reaper  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.reaper.dry_run = True  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.servers[0].name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.policies[0].max_idle = timedelta(0)  # type: ignore[misc]
    assert settings.reaper.dry_run is False
    assert settings.servers[0].name == "primary"


def test_with_dry_run_copies(tmp_path: Path) -> None:
    settings = _load(tmp_path, MINIMAL)
    dry = settings.with_dry_run()
    assert dry.reaper.dry_run is True
    assert settings.reaper.dry_run is False
    assert dry.servers == settings.servers


# --- problems name the key path ----------------------------------------------------------------


def test_every_problem_is_reported(tmp_path: Path) -> None:
    text = MINIMAL.replace('max_idle = "15m"', 'max_idle = "15 mins"\naction = "kill"')
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, '[log]\nlevel = "loud"\n' + text)
    assert sorted(info.value.problems) == [
        "log.level: Input should be 'debug', 'info', 'warning' or 'error', got 'loud'",
        "policies[0].action: Input should be 'terminate', 'cancel' or 'log', got 'kill'",
        (
            "policies[0].max_idle: invalid duration '15 mins': use units d, h, m, s, ms "
            "as in '90s', '15m', '1h30m'"
        ),
    ]
    assert str(info.value) == "\n".join(info.value.problems)


def test_reference_problems_one_per_line(tmp_path: Path) -> None:
    text = MINIMAL + MINIMAL.replace("[[policies]]", 'policies = ["nope"]\n\n[[policies]]')
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert len(info.value.problems) == 3


# --- [ha] and escalate_after -------------------------------------------------------------------


def test_ha_defaults(tmp_path: Path) -> None:
    ha = _load(tmp_path, MINIMAL).ha
    assert ha.enabled is False
    assert ha.lock_key == -2719498840538813096  # docs/ha.md names it
    assert ha.lock_database == "postgres"
    assert ha.instance_id == ""
    host, _, pid = ha.instance.rpartition(":")
    assert host
    assert pid == str(os.getpid())


def test_ha_values_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL + '\n[ha]\nlock_key = 42\nlock_database = "ops"\ninstance_id = "pod-a"\n'
    monkeypatch.setenv("PG_REAPER_HA__ENABLED", "true")
    ha = _load(tmp_path, text).ha
    assert (ha.enabled, ha.lock_key, ha.lock_database, ha.instance) == (True, 42, "ops", "pod-a")


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ("lock_key = 9223372036854775808", "ha.lock_key: Input should be less than or equal to"),
        ('lock_database = ""', "ha.lock_database: invalid database name ''"),
        ('instance_id = " a"', "ha.instance_id: invalid instance_id ' a'"),
        ("enabeld = true", "ha.enabeld: unknown key 'enabeld' (did you mean 'enabled'?)"),
    ],
)
def test_ha_refuses(tmp_path: Path, section: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, MINIMAL + f"\n[ha]\n{section}\n")
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_escalate_after_only_with_cancel(tmp_path: Path) -> None:
    runaway = '[[policies]]\nname = "runaway"\nstates = ["active"]\nmax_runtime = "30m"\n'
    settings = _load(tmp_path, MINIMAL + runaway + 'action = "cancel"\nescalate_after = "30s"\n')
    assert settings.policies[1].escalate_after == timedelta(seconds=30)
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, MINIMAL + runaway + 'action = "terminate"\nescalate_after = "30s"\n')
    expected = (
        "policies[1]: escalate_after needs action 'cancel' (it terminates a session that is "
        "still running the query it was cancelled for)"
    )
    assert caught.value.problems == (expected,)


def test_the_config_model_and_the_policy_engine_import_no_database_driver() -> None:
    # Checked in a fresh interpreter: this test process has long imported psycopg.
    code = "import reaper.policy, reaper.settings, sys; assert 'psycopg' not in sys.modules"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
