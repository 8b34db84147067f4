"""Bad input: random configuration files, hostile names on real sessions, and a reaper that
cannot see.

- Fuzzed TOML through `check-config` in-process: every document is accepted (exit 0, and what it
  prints is a configuration that reads back to the same output) or refused (exit 2, a message on
  stderr); never an exception.
- Sessions whose role, database and application_name hold quotes, newlines, SQL, emoji, ANSI
  escapes, right-to-left marks and 64 characters: reaped, matched by regex and by exact name,
  and shown one line per session in the `once` table, exactly as the server shows them in the
  JSON and the audit lines.
- A reaper role without pg_read_all_stats kills nothing and says why.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import tempfile
import time
import tomllib
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import tomli_w
from hypothesis import HealthCheck, event, given, reject
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from psycopg import sql

from reaper.cli import main
from reaper.settings import (
    ALL_STATES,
    AuditSection,
    LogSection,
    MetricsSection,
    PolicyConfig,
    ReaperSection,
    ServerConfig,
)
from tests.config_helpers import clean_environment  # noqa: F401 - an autouse fixture
from tests.servers import ADMIN_APPLICATION

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.servers import Sessions, TestServer


# --- 1. fuzzed configuration files -------------------------------------------------------------

# Real files, so that password_file can be accepted as well as refused.
_EXISTING_FILE = Path(__file__)
_DURATION_KEYS = frozenset(
    {"interval", "min_interval", "connect_timeout", "statement_timeout"}
    | {"max_idle", "max_runtime", "max_transaction_age", "max_connection_age"}
)
_REGEX_LIST_KEYS = frozenset({"protect_applications", "applications", "exclude_applications"})
_NAME_LIST_KEYS = frozenset(
    {"protect_users", "databases", "users", "exclude_databases", "exclude_users", "policies"}
)
_CIDR_LIST_KEYS = frozenset({"client_addrs", "exclude_client_addrs"})

# No surrogates: they cannot be written as UTF-8 (nor as TOML).
_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
    st.datetimes(),
    st.dates(),
    st.times(),
)
_anything = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_durations = st.one_of(
    st.sampled_from(
        [
            *[
                "90s",
                "15m",
                "1h30m",
                "2d",
                "500ms",
                "0",
                "0s",
                "-5s",
                "1h 30m",
                "15 mins",
                "",
                "1m30",
            ],
            *["99999999999999999999d", "1.5s", "1H", " 10s ", "10S", "1ms", "1h1h", "m", "0ms"],
        ]
    ),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.builds(
        "{}{}".format,
        st.integers(min_value=0, max_value=10**6),
        st.sampled_from(["d", "h", "m", "s", "ms", "", "x", "µs"]),
    ),
)
_regexes = st.one_of(
    st.sampled_from(["^psql$", "^pgAdmin", "(", "[a-", "a{2,1}", "(?P<x>", ".*", "", "\\", "é+"]),
    _text,
)
_cidrs = st.one_of(
    st.sampled_from(
        [
            *["local", "10.0.0.0/8", "10.0.0.1/8", "::1/128", "fe80::/10", "256.0.0.0/8", "", "x"],
            *["127.0.0.1", "::ffff:10.0.0.0/104", "10.0.0.0/33", " 10.0.0.0/8 "],
        ]
    ),
    _text,
)
_dsns = st.one_of(
    st.sampled_from(
        [
            *[
                "host=/tmp dbname=postgres",
                "postgresql://u:pw@h/db",
                "host=x port=notaport",
                "port",
            ],
            *["postgresql://[bad", "host='unterminated", "", "service=none", "a=b", "dbname=é"],
        ]
    ),
    _text,
)


def _plausible(key: str) -> st.SearchStrategy[Any]:
    """Values that are nearly right for `key`, so that the fuzzer gets past the first check."""
    if key in _DURATION_KEYS:
        return _durations
    if key in _REGEX_LIST_KEYS:
        return st.lists(_regexes, max_size=3)
    if key in _CIDR_LIST_KEYS:
        return st.lists(_cidrs, max_size=3)
    if key in _NAME_LIST_KEYS:
        return st.lists(st.one_of(st.sampled_from(["idle", "app", "p0", "p1"]), _text), max_size=3)
    strategies: dict[str, st.SearchStrategy[Any]] = {
        "name": st.one_of(st.sampled_from(["primary", "p0", "p1", " x", "a" * 64]), _text),
        "dsn": _dsns,
        "password_file": st.sampled_from([str(_EXISTING_FILE), "/nonexistent/pw", "", "/"]),
        "states": st.lists(st.one_of(st.sampled_from([*ALL_STATES, "IDLE"]), _text), max_size=4),
        "action": st.sampled_from(["terminate", "cancel", "log", "kill", ""]),
        "when_connections_above": st.one_of(
            st.sampled_from(["80%", "0%", "101%", "80", "80.5%", "%"]), st.integers(0, 100)
        ),
        "dry_run": st.one_of(st.booleans(), st.sampled_from(["true", "yes", 1])),
        "include_query": st.booleans(),
        "max_terminations_per_cycle": st.integers(min_value=-5, max_value=2**70),
        "listen": st.sampled_from(["127.0.0.1:9188", "", ":9188", "[::1]:9188", "::1:x", "h:0"]),
        "format": st.sampled_from(["auto", "json", "console", "JSON", "xml"]),
        "level": st.sampled_from(["debug", "info", "warning", "error", "INFO", "trace"]),
        "table": st.one_of(st.sampled_from(["pg_reaper_audit", "ops.log", "a.b.c", '"x"']), _text),
    }
    strategies["when_role_connections_above"] = strategies["when_connections_above"]
    return strategies.get(key, _anything)


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _is_name(text: str) -> bool:
    return text.strip() == text and not any(unicodedata.category(c) == "Cc" for c in text)


# Valid values, key by key: a document built from these alone is accepted.
_valid_durations = st.one_of(
    st.integers(min_value=1, max_value=10**6),
    st.builds(
        "{}{}".format,
        st.integers(min_value=1, max_value=10**5),
        st.sampled_from(["d", "h", "m", "s", "ms"]),
    ),
    st.sampled_from(["1h30m", "2d12h", "1m30s", "1s500ms"]),
)
_valid_names = st.text(
    st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=20
).filter(_is_name)
_valid_regexes = st.one_of(
    st.sampled_from(["^psql$", "^pgAdmin", ".*", "é+", "^a|b$", "\\$"]), _text.filter(_compiles)
)
_valid_cidrs = st.one_of(
    st.sampled_from(["local", "10.0.0.0/8", "::1/128", "fe80::/10", "192.168.1.7/32"]),
    st.ip_addresses().map(lambda a: f"{a}/{a.max_prefixlen}"),
)
_valid_percentages = st.integers(min_value=1, max_value=100).map("{}%".format)


def _lists(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(element, max_size=3)


_scopes = st.fixed_dictionaries(
    {},
    optional={
        "databases": _lists(_text),
        "users": _lists(_text),
        "applications": _lists(_valid_regexes),
        "client_addrs": _lists(_valid_cidrs),
        "exclude_databases": _lists(_text),
        "exclude_users": _lists(_text),
        "exclude_applications": _lists(_valid_regexes),
        "exclude_client_addrs": _lists(_valid_cidrs),
    },
)
_idle_policy = st.fixed_dictionaries(
    {
        "states": st.lists(
            st.sampled_from(["idle", "idle in transaction", "idle in transaction (aborted)"]),
            unique=True,
            min_size=1,
        ),
        "max_idle": _valid_durations,
    },
    optional={
        "max_transaction_age": _valid_durations,
        "max_connection_age": _valid_durations,
        "action": st.sampled_from(["terminate", "log"]),
        "when_connections_above": _valid_percentages,
        "when_role_connections_above": _valid_percentages,
    },
)
_active_policy = st.fixed_dictionaries(
    {"states": st.just(["active"]), "max_runtime": _valid_durations},
    optional={"action": st.sampled_from(["cancel", "terminate", "log"])},
)


@st.composite
def _valid_document(draw: st.DrawFn) -> dict[str, Any]:
    policy_names = draw(st.lists(_valid_names, unique=True, min_size=1, max_size=3))
    policies = [
        {"name": name} | draw(st.one_of(_idle_policy, _active_policy)) | draw(_scopes)
        for name in policy_names
    ]
    servers = [
        {"name": name, "dsn": draw(st.sampled_from(_VALID_DSNS))}
        | draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "interval": st.sampled_from(["10s", "1m", 60]),
                    "password_file": st.just(str(_EXISTING_FILE)),
                    "policies": st.lists(st.sampled_from(policy_names), unique=True),
                },
            )
        )
        for name in draw(st.lists(_valid_names, unique=True, min_size=1, max_size=3))
    ]
    for policy in policies:
        if policy.get("action") == "cancel":
            policy.pop("when_connections_above", None)
    sections = st.fixed_dictionaries(
        {},
        optional={
            "reaper": st.fixed_dictionaries(
                {},
                optional={
                    "interval": st.sampled_from(["30s", "1m", "10s"]),
                    "min_interval": st.sampled_from(["1s", "500ms", "2s"]),
                    "dry_run": st.booleans(),
                    "max_terminations_per_cycle": st.integers(1, 2**40),
                    "protect_users": _lists(_text),
                    "protect_applications": _lists(_valid_regexes),
                    "connect_timeout": _valid_durations,
                    "statement_timeout": _valid_durations,
                },
            ),
            "metrics": st.fixed_dictionaries(
                {}, optional={"listen": st.sampled_from(["127.0.0.1:9188", "", "[::1]:1"])}
            ),
            "log": st.fixed_dictionaries(
                {},
                optional={
                    "format": st.sampled_from(["auto", "json", "console", "JSON"]),
                    "level": st.sampled_from(["debug", "info", "warning", "error", "INFO"]),
                    "include_query": st.booleans(),
                },
            ),
            "audit": st.fixed_dictionaries(
                {},
                optional={
                    "dsn": st.sampled_from(["", *_VALID_DSNS]),
                    "table": st.sampled_from(["pg_reaper_audit", "ops.log", '"Mixed Case"']),
                    "password_file": st.just(str(_EXISTING_FILE)),
                },
            ),
        },
    )
    return draw(sections) | {"servers": servers, "policies": policies}


_VALID_DSNS = [
    "host=/tmp dbname=postgres",
    "postgresql://u:pw@h:5433/db?sslmode=require",
    "host=db1,db2 port=5432,5433 target_session_attrs=read-write",
    "",
    "service=reaper",
]


def _paths(node: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in the document a value sits."""
    found = [here] if here else []
    if isinstance(node, dict):
        for key, value in node.items():
            found.extend(_paths(value, (*here, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_paths(value, (*here, index)))
    return found


@st.composite
def _document(draw: st.DrawFn) -> dict[str, Any]:
    """A valid document with none, one or a few things broken: a value replaced by a nearly
    right or an arbitrary one, a key dropped, a stray key added."""
    doc = copy.deepcopy(draw(_valid_document()))  # mutated below: st.just shares its value
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))):
        path = draw(st.sampled_from(_paths(doc)))
        *parents, last = path
        container: Any = doc
        for part in parents:
            container = container[part]
        operation = draw(st.sampled_from(["replace", "replace", "arbitrary", "drop", "add"]))
        key = str(last)
        if operation == "replace":
            container[last] = draw(_plausible(key))
        elif operation == "arbitrary":
            container[last] = draw(_anything)
        elif operation == "drop" and isinstance(container, dict):
            del container[last]
        elif isinstance(container, dict):
            container[draw(st.one_of(_text, st.sampled_from(_ALL_KEYS)))] = draw(_anything)
    return doc


_ALL_KEYS = sorted(
    {
        key
        for model in (ReaperSection, MetricsSection, LogSection, AuditSection)
        for key in model.model_fields
    }
    | set(ServerConfig.model_fields)
    | set(PolicyConfig.model_fields)
    | {"reaper", "metrics", "log", "audit", "servers", "policies"}
)


@st.composite
def _config_text(draw: st.DrawFn) -> str:
    """Mostly a TOML document of the right shape; sometimes one cut short or with a typo."""
    doc = draw(_document())
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError):
        reject()  # not a test of tomli_w
    mangle = draw(st.integers(0, 9))
    if mangle == 0 and text:
        return text[: draw(st.integers(0, len(text) - 1))]
    if mangle == 1:
        at = draw(st.integers(0, len(text)))
        return (
            text[:at]
            + draw(st.sampled_from(["[", "]", '"', "=", "\n[[", "\\u", "\x00"]))
            + text[at:]
        )
    return text


def _check_config(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check-config", "-c", str(path)])
    return code, out.getvalue(), err.getvalue()


def _accepted_or_refused(path: Path) -> None:
    code, out, err = _check_config(path)
    event(f"exit {code}")
    assert "Traceback" not in err
    if code == 2:
        assert out == ""
        header, _, problems = err.partition("\n")
        assert header == f"pg-reaper: invalid configuration in {path}:"
        assert problems.startswith("  "), err
        assert problems.strip(), err
        return
    assert code == 0, (code, err)
    assert err == ""
    # What check-config prints is a configuration, and it reads back to itself.
    tomllib.loads(out)
    again = path.with_suffix(".effective.toml")
    again.write_text(out, encoding="utf-8")
    code2, out2, err2 = _check_config(again)
    assert (code2, err2) == (0, ""), err2
    assert out2 == out


@hypothesis_settings(
    max_examples=int(os.environ.get("PG_REAPER_FUZZ_EXAMPLES") or 300),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(text=_config_text())
def test_any_config_file_is_accepted_or_refused_with_a_message_never_a_traceback(
    text: str,
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.toml"
        path.write_text(text, encoding="utf-8")
        _accepted_or_refused(path)


@hypothesis_settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_are_refused_with_a_message_never_a_traceback(data: bytes | str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.toml"
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8", errors="surrogatepass")
        else:
            path.write_bytes(data)
        _accepted_or_refused(path)


MINIMAL = '[[servers]]\nname = "a"\ndsn = "host=/tmp"\n[[policies]]\nname = "p"\nmax_idle = "1m"\n'


@pytest.mark.parametrize(
    "line",
    [
        "_env_prefix = 5",
        "_env_file = 5",
        "_build_sources = 1",
        "_cli_parse_args = true",
        '_env_prefix = "X_"',
        '_secrets_dir = "/nonexistent"',
        "_case_sensitive = true",
    ],
)
def test_a_top_level_key_named_like_a_pydantic_settings_option_is_an_unknown_key(
    line: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"{line}\n{MINIMAL}", encoding="utf-8")
    key = line.split(" ", 1)[0]
    try:
        code, out, err = _check_config(path)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the old bug showed as any of these
        pytest.fail(f"check-config raised {type(exc).__name__}: {exc}")
    assert code == 2, out
    assert f"{key}: unknown key" in err, err


def test_a_key_with_control_characters_is_named_on_one_line_without_them(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[reaper]\n"a\\nb\\u001b[2J" = 1\n' + MINIMAL, encoding="utf-8")
    code, out, err = _check_config(path)
    assert code == 2, out
    _, *problems = err.rstrip("\n").split("\n")
    assert len(problems) == 1, problems
    assert not re.search(r"[\x00-\x1f\x7f]", problems[0]), problems


# --- 2. hostile names on real sessions -------------------------------------------------------

HOSTILE_ROLES = [
    'it\'s "quoted"',
    "two\nlines\r\tand a tab",
    "x'; DROP TABLE pg_class; --",
    "emoji 🙂🔥",
    "rtl \u202egnp.exe\u200f",
    "ansi \x1b[31mred\x1b[0m",
    "sep\u2028ara\u2029tor\u0085",
]
HOSTILE_DATABASES = ["db\nnew line 🙂", "db'; DROP DATABASE postgres; --\u202e"]
# application_name as the client sets it, and a regex for what the server shows of it:
# PostgreSQL keeps printable ASCII only (before 16 the rest becomes '?', from 16 on a \xNN
# escape) and cuts it to 63 bytes.
HOSTILE_APPLICATIONS = [
    ("x'; DROP TABLE pg_class; --", r"^x'; DROP TABLE pg_class; --$"),
    ("two\nlines", r"^two(\?|\\x0a)lines$"),
    ("emoji 🙂", r"^emoji \S+$"),
    ("rtl \u202egnp.exe", r"gnp\.exe$"),
    ("a" * 64, r"^a{63}$"),
    ('it\'s "quoted" \x1b[31m', r"^it's \"quoted\" "),
]
# Characters that must not reach a terminal raw: C0 and C1 controls (tab and newline included).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def hostile(pg: TestServer) -> Iterator[None]:
    """Roles and databases with hostile names on the suite's server, dropped afterwards."""
    if pg.embedded is None:
        pytest.skip("needs the suite's own server (trusted Unix-socket logins for any role)")
    _drop_hostile(pg)
    for role in HOSTILE_ROLES:
        pg.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    for database in HOSTILE_DATABASES:
        pg.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    yield
    _drop_hostile(pg)


def _drop_hostile(pg: TestServer) -> None:
    for database in HOSTILE_DATABASES:
        pg.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
        )
    for role in HOSTILE_ROLES:
        pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role]
        )
        pg.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _hostile_config(path: Path, dsn: str) -> Path:
    document = {
        "reaper": {"protect_applications": [f"^{ADMIN_APPLICATION}$"]},
        "log": {"format": "json"},
        "servers": [{"name": "hostile", "dsn": dsn}],
        "policies": [
            {
                "name": "by-application",
                "max_idle": "1s",
                "applications": [regex for _, regex in HOSTILE_APPLICATIONS],
            },
            {"name": "by-user", "max_idle": "1s", "users": HOSTILE_ROLES},
            {"name": "by-database", "max_idle": "1s", "databases": HOSTILE_DATABASES},
        ],
    }
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _open_hostile_sessions(sessions: Sessions) -> dict[int, str]:
    """Idle sessions with every hostile name, and the policy that must name each one."""
    expected: dict[int, str] = {}
    for application, _ in HOSTILE_APPLICATIONS:
        expected[sessions.idle(application=application).info.backend_pid] = "by-application"
    for role in HOSTILE_ROLES:
        expected[sessions.idle(application="hostile-user", user=role).info.backend_pid] = "by-user"
    for database in HOSTILE_DATABASES:
        conn = sessions.idle(application="hostile-database", dbname=database)
        expected[conn.info.backend_pid] = "by-database"
    conn = sessions.idle(
        application="hostile-both", user=HOSTILE_ROLES[1], dbname=HOSTILE_DATABASES[0]
    )
    expected[conn.info.backend_pid] = "by-user"
    return expected


def _as_the_server_shows(pg: TestServer, pids: list[int]) -> dict[int, dict[str, str]]:
    rows = pg.execute(
        "SELECT pid, usename, datname, application_name FROM pg_stat_activity WHERE pid = ANY(%s)",
        [pids],
    )
    return {
        pid: {"user": user, "database": database, "application": application}
        for pid, user, database, application in rows
    }


@pytest.mark.usefixtures("hostile")
def test_hostile_names_are_reaped_matched_and_shown_one_line_per_session(
    pg: TestServer, sessions: Sessions, tmp_path: Path
) -> None:
    expected = _open_hostile_sessions(sessions)
    shown = _as_the_server_shows(pg, list(expected))
    assert len(shown) == len(expected)
    # What PostgreSQL made of the application names: cut to 63 bytes, printable ASCII only.
    applications = {s["application"] for s in shown.values()}
    assert "a" * 63 in applications
    assert all(a.isascii() and a.isprintable() for a in applications), applications
    assert {s["user"] for s in shown.values()} >= set(HOSTILE_ROLES)  # names kept as they are
    time.sleep(1.3)
    config = _hostile_config(tmp_path / "config.toml", pg.dsn())

    # The table of a dry run: one line per session, nothing raw that a terminal would act on.
    code, out, err = _run(["once", "--dry-run", "-c", str(config)])
    assert code == 0, err
    assert not _CONTROL.search(out.replace("\n", "")), repr(out)
    header, *lines = out.split("\n")
    assert header.split()[:2] == ["SERVER", "PID"]
    rows = lines[: lines.index("")]
    assert sorted(int(row.split()[1]) for row in rows) == sorted(expected), rows
    for row in rows:
        assert row.split()[-1] == "dry_run", row
        assert row.split()[-2] == expected[int(row.split()[1])], row

    # For real, as JSON: every name exactly as the server shows it.
    code, out, err = _run(["once", "--json", "-c", str(config)])
    assert code == 0, err
    decisions = {d["pid"]: d for d in json.loads(out)["servers"][0]["decisions"]}
    assert set(decisions) == set(expected)
    for pid, decision in decisions.items():
        assert decision["result"] == "terminated", decision
        assert decision["policy"] == expected[pid], decision
        assert {k: decision[k] for k in ("user", "database", "application")} == shown[pid]
    # The audit lines on stderr: one JSON object per line, the same names.
    events = [json.loads(line) for line in err.split("\n") if line]
    audited = {e["pid"]: e for e in events if e["event"] == "session_reaped"}
    assert set(audited) == set(expected)
    for pid, logged in audited.items():
        assert {k: logged[k] for k in ("user", "database", "application")} == shown[pid]
    for pid in expected:
        assert pg.wait_gone(pid), pid


@pytest.mark.usefixtures("hostile")
def test_hostile_names_in_the_table_hold_no_line_separator_or_bidi_control(
    pg: TestServer, sessions: Sessions, tmp_path: Path
) -> None:
    expected = _open_hostile_sessions(sessions)
    time.sleep(1.3)
    config = _hostile_config(tmp_path / "config.toml", pg.dsn())
    code, out, err = _run(["preview", "-c", str(config)])
    assert code == 0, err
    assert all(str(pid) in out for pid in expected)
    assert out.splitlines() == out.rstrip("\n").split("\n"), "a row is split by a line separator"
    raw = [
        c
        for c in out
        if unicodedata.bidirectional(c) in {"RLO", "LRO", "RLE", "LRE", "PDF"}
        or c in "\u200e\u200f\u061c\u2066\u2067\u2068\u2069"
    ]
    assert raw == [], raw


# --- 3. a reaper that cannot see ---------------------------------------------------------------


@pytest.mark.usefixtures("hostile")
def test_a_reaper_without_pg_read_all_stats_kills_nothing_and_says_why(
    pg: TestServer, sessions: Sessions, tmp_path: Path
) -> None:
    others = [sessions.idle(application="hostile-user", user=role) for role in HOSTILE_ROLES]
    own_app = sessions.idle(application=HOSTILE_APPLICATIONS[0][0])  # superuser's, by regex
    time.sleep(1.3)
    config = _hostile_config(tmp_path / "config.toml", pg.dsn(user="reaper_blind"))

    code, out, err = _run(["once", "--json", "-c", str(config)])

    assert code == 0, err
    report = json.loads(out)["servers"][0]
    assert report["ok"]
    assert report["decisions"] == [], report["decisions"]
    (warning,) = [w for w in report["warnings"] if "pg_read_all_stats" in w]
    assert "role 'reaper_blind' lacks pg_read_all_stats" in warning
    assert "GRANT pg_read_all_stats TO reaper_blind" in warning
    hidden = re.search(r"\((\d+) hidden now\)", warning)
    assert hidden is not None
    assert int(hidden[1]) >= len(others) + 1
    events = [json.loads(line) for line in err.split("\n") if line]
    told = [e for e in events if e["event"] == "privileges_insufficient"]
    assert [e["detail"] for e in told] == [warning]
    assert told[0]["level"] == "warning"
    assert not [e for e in events if e["event"] in {"session_reaped", "session_reap_failed"}]
    for conn in [*others, own_app]:
        assert pg.is_alive(conn.info.backend_pid)

    # The table says it too, under the summary.
    code, out, _ = _run(["once", "-c", str(config)])
    assert code == 0
    assert f"  warning: {warning}" in out.split("\n")
