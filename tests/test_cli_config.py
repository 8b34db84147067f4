"""`pg-reaper check-config`: every malformed config is exit 2 with a precise message, every good
one prints an effective config that loads back to the same settings, and no password shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict
from pydantic import SecretStr

from reaper.cli import main
from reaper.settings import Settings, load_settings
from tests.config_helpers import MINIMAL, PASSWORD, clean_environment  # noqa: F401 - clean_environment is an autouse fixture

CONFIGS = Path(__file__).parent / "configs"
BAD = sorted((CONFIGS / "bad").glob("*.toml"))
GOOD = sorted((CONFIGS / "good").glob("*.toml"))
ROOT = Path(__file__).parent.parent
EXPECT_PREFIX = "# expect: "

# A few of the bad configs also go through a real process, to prove the exit code end to end.
SUBPROCESS_CASES = [
    "toml-syntax-error.toml",
    "unknown-key-in-policy.toml",
    "duration-with-space.toml",
    "no-servers.toml",
    "server-malformed-dsn-uri.toml",
]


def _expected(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(EXPECT_PREFIX), f"{path.name}: first line must be '# expect: ...'"
    expected = first.removeprefix(EXPECT_PREFIX).strip()
    assert expected, f"{path.name}: empty expectation"
    return expected


def _check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check-config", "-c", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("PG_REAPER_")}


def _redacted_copy(settings: Settings) -> Settings:
    """`settings` as check-config prints it: every DSN replaced by its redacted form."""
    servers = tuple(
        s.model_copy(update={"dsn": SecretStr(s.redacted_dsn)}) for s in settings.servers
    )
    return settings.model_copy(update={"servers": servers})


# --- malformed configs -------------------------------------------------------------------------


def test_enough_bad_configs() -> None:
    assert len(BAD) >= 25
    expectations = [_expected(path) for path in BAD]
    # Each file tests a different thing.
    assert len(set(expectations)) == len(expectations)


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_bad_config_is_exit_2(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _check_config(path, capsys)
    assert code == 2, out
    assert out == ""
    assert _expected(path) in err
    assert "Traceback" not in err
    assert PASSWORD not in err
    header, *problems = err.splitlines()
    assert header == f"pg-reaper: invalid configuration in {path}:"
    assert problems
    assert all(line.startswith("  ") and line.strip() for line in problems), problems


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_config_subprocess(name: str) -> None:
    path = CONFIGS / "bad" / name
    result = subprocess.run(
        [sys.executable, "-m", "reaper", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_clean_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert _expected(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stderr


def test_password_not_in_error_about_another_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        MINIMAL.replace(
            'dsn = "host=/tmp dbname=postgres"',
            f'dsn = "postgresql://u:{PASSWORD}@host/db"\nintervall = "10s"',
        ),
        encoding="utf-8",
    )
    code, out, err = _check_config(path, capsys)
    assert code == 2
    assert "servers[0].intervall: unknown key 'intervall' (did you mean 'interval'?)" in err
    assert PASSWORD not in out + err


def test_password_not_in_dsn_type_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        MINIMAL.replace(
            'dsn = "host=/tmp dbname=postgres"', f'dsn = ["postgresql://u:{PASSWORD}@host/db"]'
        ),
        encoding="utf-8",
    )
    code, _, err = _check_config(path, capsys)
    assert code == 2
    assert "servers[0].dsn: Input should be a valid string" in err
    assert PASSWORD not in err


# --- a sentinel password in every place a config value comes from -------------------------------

_DSN = f"host=db password={PASSWORD}"
# (environment, the problem as reported, the variable it names): the password must never show,
# however the value is wrong.
ENV_CASES: dict[str, tuple[dict[str, object], str, str]] = {
    "servers-table-wrong-type": (
        {"PG_REAPER_SERVERS": [{"name": 5, "dsn": _DSN}]},
        "servers[0].name: Input should be a valid string",
        "PG_REAPER_SERVERS",
    ),
    "audit-table-wrong-type": (
        {"PG_REAPER_AUDIT": {"dsn": _DSN, "table": 5}},
        "audit.table: Input should be a valid string",
        "PG_REAPER_AUDIT",
    ),
    "audit-table-invalid": (
        {"PG_REAPER_AUDIT": {"dsn": _DSN, "table": f"a b {PASSWORD}"}},
        "audit.table: invalid table name (value not shown)",
        "PG_REAPER_AUDIT",
    ),
    "servers-table-bad-duration": (
        {"PG_REAPER_SERVERS": [{"name": "a", "dsn": _DSN, "interval": PASSWORD}]},
        "servers[0].interval: invalid duration (value not shown)",
        "PG_REAPER_SERVERS",
    ),
    "servers-table-password-file": (
        {"PG_REAPER_SERVERS": [{"name": "a", "dsn": "host=db", "password_file": PASSWORD}]},
        "servers[0].password_file: password file (path not shown) does not exist",
        "PG_REAPER_SERVERS",
    ),
    "servers-table-unknown-password-key": (
        {"PG_REAPER_SERVERS": [{"name": "a", "dsn": "host=db", "password": PASSWORD}]},
        "servers[0].password: unknown key 'password'",
        "PG_REAPER_SERVERS",
    ),
    "servers-table-duplicate-names": (
        {"PG_REAPER_SERVERS": [{"name": "a", "dsn": _DSN}, {"name": "a", "dsn": _DSN}]},
        "servers[1].name: duplicate name (value not shown)",
        "PG_REAPER_SERVERS",
    ),
    "servers-table-bad-dsn": (
        {"PG_REAPER_SERVERS": [{"name": "a", "dsn": f"{_DSN} port"}]},
        "servers[0].dsn: invalid connection string: missing = after … in connection info",
        "PG_REAPER_SERVERS",
    ),
    "servers-table-not-json": (
        {"PG_REAPER_SERVERS": f'[{{"name": "a", "dsn": "{_DSN}"'},
        "servers: the environment variable PG_REAPER_SERVERS must be JSON for a table or list",
        "PG_REAPER_SERVERS",
    ),
    "nested-list-not-json": (
        {"PG_REAPER_REAPER__PROTECT_USERS": f'["{PASSWORD}'},
        "reaper: the environment variable PG_REAPER_REAPER__PROTECT_USERS must be JSON",
        "PG_REAPER_REAPER__PROTECT_USERS",
    ),
    "nested-list-entry-like-a-dsn": (
        {"PG_REAPER_REAPER__PROTECT_APPLICATIONS": [f"(host=db password={PASSWORD}"]},
        "reaper.protect_applications[0]: invalid regex (value not shown)",
        "PG_REAPER_REAPER__PROTECT_APPLICATIONS",
    ),
    "nested-dsn": (
        {"PG_REAPER_AUDIT__DSN": f"{_DSN} port"},
        "audit.dsn: invalid connection string",
        "PG_REAPER_AUDIT__DSN",
    ),
    "nested-password-file": (
        {"PG_REAPER_AUDIT__PASSWORD_FILE": PASSWORD},
        "audit.password_file: password file (path not shown) does not exist",
        "PG_REAPER_AUDIT__PASSWORD_FILE",
    ),
}


def _env_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@pytest.mark.parametrize("case", ENV_CASES)
def test_a_wrong_environment_value_never_shows_the_password(
    case: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env, problem, variable = ENV_CASES[case]
    for name, value in env.items():
        monkeypatch.setenv(name, _env_text(value))
    code, out, err = _check_config(CONFIGS / "good" / "minimal.toml", capsys)
    assert code == 2, out
    assert PASSWORD not in out + err
    assert problem in err
    assert variable in err
    assert "Traceback" not in err


def test_a_wrong_environment_value_never_shows_the_password_in_a_real_process() -> None:
    env = _clean_env() | {"PG_REAPER_SERVERS": json.dumps([{"name": 5, "dsn": _DSN}])}
    result = subprocess.run(
        [sys.executable, "-m", "reaper", "check-config", "-c", str(CONFIGS / "good" / "full.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert "servers[0].name: Input should be a valid string (from the environment variable " in (
        result.stderr
    )


def test_a_scalar_from_an_environment_table_without_a_dsn_is_still_shown(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PG_REAPER_LOG", json.dumps({"level": "loud", "format": "json"}))
    code, _, err = _check_config(CONFIGS / "good" / "minimal.toml", capsys)
    assert code == 2
    assert "log.level: Input should be 'debug', 'info', 'warning' or 'error', got 'loud' " in err
    assert '"format"' not in err  # the key's own value, not the whole variable
    assert "PG_REAPER_LOG" in err


def test_a_table_variable_without_the_failing_key_leaves_the_blame_on_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PG_REAPER_REAPER", json.dumps({"interval": "1m"}))
    path = tmp_path / "config.toml"
    path.write_text('[reaper]\ndry_run = "perhaps"\n' + MINIMAL, encoding="utf-8")
    code, _, err = _check_config(path, capsys)
    assert code == 2
    assert "reaper.dry_run: Input should be a valid boolean" in err
    assert "got 'perhaps'" in err
    assert "PG_REAPER_REAPER" not in err


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (
            f'password_file = "{PASSWORD}"',
            "servers[0].password_file: password file (path not shown) does not exist",
        ),
        (f'interval = "postgresql://u:{PASSWORD}@h/db"', "servers[0].interval: invalid duration"),
        (f'policies = ["{_DSN}"]', "servers[0].policies: undefined policy (value not shown)"),
        (f'name = "{_DSN} {"x" * 50}"', "servers[0].name: invalid name (value not shown)"),
    ],
)
def test_a_password_put_in_the_wrong_key_of_the_file_is_not_shown(
    line: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    text = MINIMAL.replace('dsn = "host=/tmp dbname=postgres"', f'dsn = "host=/tmp"\n{line}')
    if line.startswith("name"):
        text = text.replace('name = "primary"\n', "", 1)
    path.write_text(text, encoding="utf-8")
    code, out, err = _check_config(path, capsys)
    assert code == 2, out
    assert problem in err
    assert PASSWORD not in out + err


def _check_dsn(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """check-config of the minimal config with `dsn` as its server's DSN."""
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL.replace('"host=/tmp dbname=postgres"', f'"{dsn}"'), encoding="utf-8")
    return _check_config(path, capsys)


@pytest.mark.parametrize("password", ["%%-!", "%%", "!@%%", "%%%%"])
def test_a_dsn_error_never_echoes_a_password_of_punctuation(
    password: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _check_dsn(f"postgresql://u:{password}@h/db", tmp_path, capsys)
    assert code == 2
    assert "servers[0].dsn: invalid connection string: invalid percent-encoded token" in err
    assert password not in err


def test_a_nul_in_a_dsn_is_refused_rather_than_cutting_the_dsn_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _check_dsn(f"host=db\\u0000 password={PASSWORD}", tmp_path, capsys)
    assert code == 2
    assert "servers[0].dsn: invalid connection string: it contains a NUL character" in err
    assert PASSWORD not in err


def test_check_config_hides_every_secret_keyword_libpq_hides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = f"host=db password={PASSWORD}1 sslpassword={PASSWORD}2"
    code, out, err = _check_dsn(dsn, tmp_path, capsys)
    assert code == 0, err
    assert PASSWORD not in out + err
    assert "sslpassword=********" in out


def test_huge_duration_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[reaper]\ninterval = "99999999999d"\n' + MINIMAL, encoding="utf-8")
    code, _, err = _check_config(path, capsys)
    assert code == 2
    assert "reaper.interval: invalid duration" in err


# --- good configs ------------------------------------------------------------------------------


def test_good_configs_exist() -> None:
    assert {p.name for p in GOOD} >= {"minimal.toml", "full.toml", "uri-with-password.toml"}


@pytest.mark.parametrize("path", GOOD, ids=[p.name for p in GOOD])
def test_good_config_round_trips(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _check_config(path, capsys)
    assert code == 0, err
    assert "pg-reaper: invalid configuration" not in err
    assert PASSWORD not in out
    assert PASSWORD not in err

    original = load_settings(path)
    printed = tomllib.loads(out)
    assert len(printed["servers"]) == len(original.servers)
    assert [s["dsn"] for s in printed["servers"]] == [s.redacted_dsn for s in original.servers]

    effective = tmp_path / "effective.toml"
    effective.write_text(out, encoding="utf-8")
    reloaded = load_settings(effective)
    assert reloaded == _redacted_copy(original)
    # Printing the printed config again changes nothing: the output is a fixed point.
    code, again, _ = _check_config(effective, capsys)
    assert code == 0
    assert again == out


def test_full_config_prints_every_value(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _check_config(CONFIGS / "good" / "full.toml", capsys)
    assert code == 0
    printed = tomllib.loads(out)
    assert printed["reaper"]["dry_run"] is True
    assert printed["reaper"]["max_terminations_per_cycle"] == 20
    assert printed["reaper"]["protect_applications"] == ["^pg_dump$", "backup"]
    assert printed["metrics"]["listen"] == "[::1]:9189"
    assert printed["log"] == {"format": "json", "level": "warning", "include_query": True}
    primary, replica = printed["servers"]
    assert conninfo_to_dict(primary.pop("dsn")) == {
        "host": "/var/run/postgresql",
        "dbname": "postgres",
        "user": "pg_reaper",
    }
    assert primary == {
        "name": "primary",
        "password_file": "/dev/null",
        "interval": "10s",
        "policies": ["idle", "stuck-transactions"],
    }
    assert set(replica) == {"name", "dsn"}  # unset optional keys are left out, not null
    idle, stuck, runaway = printed["policies"]
    assert idle["client_addrs"] == ["10.0.0.0/8", "fd00::/8", "local"]
    assert idle["exclude_applications"] == ["^psql$", "^pgAdmin"]
    assert stuck["max_transaction_age"] == "1h"
    assert stuck["states"] == ["idle in transaction", "idle in transaction (aborted)"]
    assert runaway == runaway | {"states": ["active"], "max_runtime": "30m", "action": "cancel"}
    assert "max_idle" not in runaway


def test_minimal_config_prints_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _check_config(CONFIGS / "good" / "minimal.toml", capsys)
    assert code == 0
    printed = tomllib.loads(out)
    assert printed["reaper"]["interval"] == "30s"
    assert printed["reaper"]["dry_run"] is False
    assert printed["reaper"]["max_terminations_per_cycle"] == 50
    assert printed["metrics"]["listen"] == "127.0.0.1:9188"
    assert printed["log"] == {"format": "auto", "level": "info", "include_query": False}
    (policy,) = printed["policies"]
    assert policy["states"] == ["idle", "idle in transaction", "idle in transaction (aborted)"]
    assert policy["action"] == "terminate"
    assert policy["max_idle"] == "15m"


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://u:{PASSWORD}@host/db",
        f"host=x password={PASSWORD}",
        f"postgresql://u@host/db?password={PASSWORD}",
        f"host=x password='{PASSWORD}'",
    ],
)
def test_password_never_printed(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        MINIMAL.replace('"host=/tmp dbname=postgres"', f'"{dsn}"'),
        encoding="utf-8",
    )
    assert PASSWORD in load_settings(path).servers[0].dsn.get_secret_value()
    code, out, err = _check_config(path, capsys)
    assert code == 0, err
    assert PASSWORD not in out
    assert PASSWORD not in err
    assert "password=********" in tomllib.loads(out)["servers"][0]["dsn"]


def test_check_config_shows_env_override(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PG_REAPER_REAPER__DRY_RUN", "true")
    code, out, _ = _check_config(CONFIGS / "good" / "minimal.toml", capsys)
    assert code == 0
    assert tomllib.loads(out)["reaper"]["dry_run"] is True


# --- which file ----------------------------------------------------------------------------------


def test_config_from_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PG_REAPER_CONFIG", str(CONFIGS / "good" / "full.toml"))
    assert main(["check-config"]) == 0
    out, _ = capsys.readouterr()
    assert [s["name"] for s in tomllib.loads(out)["servers"]] == ["primary", "replica"]


def test_option_wins_over_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PG_REAPER_CONFIG", str(tmp_path / "missing.toml"))
    code, out, _ = _check_config(CONFIGS / "good" / "minimal.toml", capsys)
    assert code == 0
    assert tomllib.loads(out)["servers"][0]["name"] == "local"


def test_missing_file_from_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere" / "config.toml"
    code, out, err = _check_config(path, capsys)
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        f"pg-reaper: invalid configuration in {path}:",
        f"  {path}: config file not found",
    ]


def test_missing_file_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "from-env.toml"
    monkeypatch.setenv("PG_REAPER_CONFIG", str(path))
    assert main(["check-config"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"  {path}: config file not found" in err
    assert "Traceback" not in err


def test_unreadable_path_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _check_config(tmp_path, capsys)  # a directory
    assert code == 2
    assert f"  {tmp_path}: cannot read config file" in err


def test_not_utf8_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xff\xfe" + MINIMAL.encode())
    code, _, err = _check_config(path, capsys)
    assert code == 2
    assert f"  {path}: not UTF-8 text" in err


def test_config_example_is_valid_and_documents_every_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = Path(__file__).parent.parent / "config.example.toml"
    assert main(["check-config", "-c", str(example)]) == 0
    effective = tomllib.loads(capsys.readouterr().out)
    text = example.read_text()
    sections = {
        "reaper": effective["reaper"],
        "metrics": effective["metrics"],
        "log": effective["log"],
        "audit": effective["audit"],
        "ha": effective["ha"],
        "notify": effective["notify"],
        "servers": effective["servers"][0],
        "policies": effective["policies"][0],
    }
    # Every policy key, whichever example policy shows it.
    sections["policies"] = {key for policy in effective["policies"] for key in policy}
    for section, keys in sections.items():
        for key in keys:
            assert f"\n{key} =" in text or f"\n# {key} =" in text, f"{section}.{key} not documented"
