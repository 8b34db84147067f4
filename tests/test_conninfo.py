"""reaper/conninfo.py reads a DSN exactly as libpq does (PQconninfoParse, through psycopg's
conninfo_to_dict): the same keywords, values and order on success, a refusal on the same inputs,
and messages that are libpq's with every quoted word (a password, perhaps) left out."""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

import psycopg
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict
from psycopg.conninfo import make_conninfo as psycopg_make_conninfo

from reaper.conninfo import (
    KEYWORDS,
    SECRET_KEYWORDS,
    make_conninfo,
    parse_conninfo,
    redact_conninfo,
)

EXAMPLES = hypothesis_settings(database=None, max_examples=600, deadline=None)

# Every message parse_conninfo may give: libpq's own words, no part of the DSN.
_MESSAGES = re.compile(
    r"invalid connection string: (?:"
    r"missing = after … in connection info string"
    r"|unterminated quoted string in connection info string"
    r"|invalid connection option …"
    r"|end of string reached when looking for matching \] in IPv6 host address in URI: …"
    r"|IPv6 host address may not be empty in URI: …"
    r"|unexpected character … at position \d+ in URI \(expected : or /\): …"
    r"|missing key/value separator = in URI query parameter: …"
    r"|extra key/value separator = in URI query parameter: …"
    r"|invalid URI query parameter: …"
    r"|invalid percent-encoded token: …"
    r"|forbidden value %00 in percent-encoded value: …"
    r"|unexpected spaces found in …, use percent-encoded spaces \(%20\) instead"
    r"|a percent-encoded value is not UTF-8 text"
    r"|it contains a NUL character"
    r"|it is not valid Unicode text)"
)
# libpq's messages quote its own punctuation too: these are not the caller's words.
_LIBPQ_LITERALS = (
    ('missing "=" after', "missing = after"),
    ('matching "]" in', "matching ] in"),
    ('key/value separator "=" in', "key/value separator = in"),
    ('(expected ":" or "/")', "(expected : or /)"),
)


def _libpq(dsn: str) -> tuple[dict[str, str] | None, str | None]:
    """What libpq makes of `dsn`: its keywords, or its message with the quoted words cut."""
    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}, None
    except UnicodeDecodeError:  # a percent-encoded value that is not UTF-8
        return None, None
    except psycopg.ProgrammingError as exc:
        message = " ".join(str(exc).split())
        for literal, plain in _LIBPQ_LITERALS:
            message = message.replace(literal, plain)
        return None, "invalid connection string: " + re.sub(r'"[^"]*"', "…", message)


def _same_as_libpq(dsn: str) -> None:
    expected, libpq_message = _libpq(dsn)
    parsed, message = None, None
    try:
        parsed = parse_conninfo(dsn)
    except ValueError as exc:
        message = str(exc)
    if message is not None:
        assert expected is None, f"refused what libpq reads: {message}"
        assert _MESSAGES.fullmatch(message), message
        if libpq_message is not None and '"' not in unquote(dsn):  # else libpq's quotes are unclear
            assert message == libpq_message
        return
    assert expected is not None, f"read what libpq refuses: {libpq_message}"
    assert parsed is not None
    assert list(parsed.items()) == list(expected.items())  # libpq's order too


# --- generated DSNs ----------------------------------------------------------------------------

_NO_NUL = st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])
_PIECES = st.sampled_from(
    [
        *list(" \t\n\r\v\f'\\\"=%&?@:/[],#;"),
        *["é", "€", "😀", "\x01", "\x7f", "\u00a0", "\u2028", "a", "Z", "0", "5432"],
        *["%2", "%25", "%00", "%zz", "%41", "%ff", "%c3%a9", "%2C", "%40", "%3D", "%26"],
        *["host=evil", "password=x", "dbname=x port=1", "postgresql://u:p@h", "' or '"],
    ]
)
_hostile = st.lists(_PIECES, max_size=8).map("".join)
_values = st.one_of(_hostile, st.text(_NO_NUL, max_size=12))
_keywords = st.one_of(
    st.sampled_from(KEYWORDS),
    st.sampled_from(["requiressl", "ssl", "bogus", "", "Host", "passwordx", "tty"]),
    _values,
)


def _escaped(value: str, *, quoted: bool) -> str:
    value = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{value}'" if quoted else value.replace(" ", "\\ ")


@st.composite
def keyword_strings(draw: st.DrawFn) -> str:
    """``key = value`` pairs: escaped or quoted as a careful writer would, or raw."""
    blanks = st.sampled_from(["", " ", "  ", "\t", "\n ", "\r\n"])
    out = [draw(blanks)]
    for _ in range(draw(st.integers(0, 4))):
        keyword, value = draw(_keywords), draw(_values)
        form = draw(st.sampled_from(["plain", "quoted", "raw", "raw-quoted"]))
        if form in {"plain", "quoted"}:
            value = _escaped(value, quoted=form == "quoted")
        elif form == "raw-quoted":
            value = f"'{value}'"
        out.append(f"{keyword}{draw(blanks)}={draw(blanks)}{value}{draw(blanks)} ")
    return "".join(out)


@st.composite
def uris(draw: st.DrawFn) -> str:
    """``postgresql://user:password@host:port,.../dbname?key=value&...``, each part percent-
    encoded or raw, some parts missing or empty."""

    def part(strategy: st.SearchStrategy[str] = _values) -> str:
        text = draw(strategy)
        return quote(text, safe="") if draw(st.booleans()) else text

    uri = draw(st.sampled_from(["postgresql://", "postgres://"]))
    if draw(st.booleans()):
        uri += part() + (":" + part() if draw(st.booleans()) else "") + "@"
    hosts = []
    for _ in range(draw(st.integers(0, 3))):
        host = draw(st.sampled_from(["db", "", "[::1]", "[fe80::1%25eth0]", "[]", "[::1"]))
        host = host if draw(st.booleans()) else part()
        hosts.append(host + (":" + part(st.sampled_from(["5432", "", "x"])) * draw(st.booleans())))
    uri += ",".join(hosts)
    if draw(st.booleans()):
        uri += "/" + part()
    if draw(st.booleans()):
        pairs = [
            f"{part(_keywords)}{'=' if draw(st.integers(0, 9)) else ''}{part()}"
            for _ in range(draw(st.integers(0, 3)))
        ]
        uri += "?" + "&".join(pairs)
    return uri


@EXAMPLES
@given(keyword_strings())
def test_keyword_strings_are_read_as_libpq_reads_them(dsn: str) -> None:
    _same_as_libpq(dsn)


@EXAMPLES
@given(uris())
def test_uris_are_read_as_libpq_reads_them(dsn: str) -> None:
    _same_as_libpq(dsn)


@EXAMPLES
@given(
    st.one_of(
        _values,
        st.tuples(st.sampled_from(["postgresql://", "postgres://"]), _hostile).map("".join),
        st.lists(st.sampled_from(["host", "password", "=", " ", "'", "\\", "x", "é"])).map("".join),
    )
)
def test_any_text_is_read_or_refused_as_libpq_does(dsn: str) -> None:
    _same_as_libpq(dsn)


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("host=db port=5433", {"host": "db", "port": "5433"}),
        ("  host = db\tdbname= ''", {"dbname": "", "host": "db"}),
        (r"password='it\'s a \\secret' user=a\ b", {"user": "a b", "password": r"it's a \secret"}),
        ("password=host=evil port=1", {"password": "host=evil", "port": "1"}),
        ("requiressl=1", {"sslmode": "require"}),
        ("postgres://", {}),
        (
            "postgresql://u%40x:p%3Ass@[::1]:5433,db2/app?sslmode=require&ssl=true",
            {
                "user": "u@x",
                "password": "p:ss",
                "dbname": "app",
                "host": "::1,db2",
                "port": "5433,",
                "sslmode": "require",
            },
        ),
        ("postgresql://h/?application_name=%C3%A9", {"host": "h", "application_name": "é"}),
        ("postgresql://u:p/x@h", {"dbname": "x@h", "host": "u", "port": "p"}),
    ],
)
def test_examples(dsn: str, expected: dict[str, str]) -> None:
    assert parse_conninfo(dsn) == expected
    _same_as_libpq(dsn)


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("host=db secret", "missing = after … in connection info string"),
        ("host='secret", "unterminated quoted string in connection info string"),
        ("secret=1", "invalid connection option …"),
        ("postgresql://u:secret@[::1", "matching ] in IPv6 host address in URI: …"),
        ("postgresql://u:secret@[::1]x", "unexpected character … at position 28 in URI"),
        ("postgresql://u:secret%zz@h", "invalid percent-encoded token: …"),
        ("postgresql://h/?secret", "missing key/value separator = in URI query parameter: …"),
        ("postgresql://h/?password=secret=", "extra key/value separator = in URI query"),
        ("postgresql://h/?secret=1", "invalid URI query parameter: …"),
        ("postgresql://h/secret%ff", "a percent-encoded value is not UTF-8 text"),
        ("host=db\x00 password=secret", "it contains a NUL character"),
        ("password=secret\udcff", "it is not valid Unicode text"),
    ],
)
def test_a_refusal_names_what_is_wrong_without_the_dsn(dsn: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid connection string") as raised:
        parse_conninfo(dsn)
    assert message in str(raised.value)
    assert "secret" not in str(raised.value)


# --- the keyword tables ------------------------------------------------------------------------


def test_every_keyword_libpq_knows_is_known() -> None:
    libpq = [o.keyword.decode() for o in psycopg.pq.Conninfo.get_defaults()]
    assert set(libpq) <= set(KEYWORDS)
    assert len(set(KEYWORDS)) == len(KEYWORDS)


def test_the_secret_keywords_are_the_ones_libpq_hides() -> None:
    hidden = {o.keyword.decode() for o in psycopg.pq.Conninfo.get_defaults() if o.dispchar == b"*"}
    assert hidden | {"password", "sslpassword", "oauth_client_secret"} == SECRET_KEYWORDS
    assert set(KEYWORDS) >= SECRET_KEYWORDS


# --- building and redacting --------------------------------------------------------------------

_params = st.dictionaries(st.sampled_from(KEYWORDS), _values, max_size=6)


@EXAMPLES
@given(_params)
def test_a_built_dsn_reads_back_as_its_keywords(params: dict[str, str]) -> None:
    built = make_conninfo(**params)
    assert parse_conninfo(built) == params
    assert built == psycopg_make_conninfo(**params)


@EXAMPLES
@given(keyword_strings(), _params)
def test_keywords_set_over_a_dsn_are_built_as_psycopg_builds_them(
    dsn: str, params: dict[str, str]
) -> None:
    try:
        expected = psycopg_make_conninfo(dsn, **params)
    except psycopg.ProgrammingError:
        with pytest.raises(ValueError, match="invalid connection string"):
            make_conninfo(dsn, **params)
        return
    assert make_conninfo(dsn, **params) == expected


def test_none_leaves_a_keyword_out_and_numbers_are_written() -> None:
    assert make_conninfo("", host="/run/pg", port=5432, password=None) == "host=/run/pg port=5432"
    assert make_conninfo() == ""
    with pytest.raises(ValueError, match="invalid connection option"):
        make_conninfo(hots="db")


def _old_redaction(dsn: str) -> str:
    """What redact_conninfo gave when it read DSNs through libpq."""
    try:
        params = conninfo_to_dict(dsn)
    except (psycopg.ProgrammingError, UnicodeDecodeError):
        return "<invalid connection string>"
    hidden = {k: "********" if k in SECRET_KEYWORDS else str(v) for k, v in params.items()}
    return psycopg_make_conninfo(**hidden)


@EXAMPLES
@given(st.one_of(keyword_strings(), uris()))
def test_redaction_is_what_it_was_through_libpq(dsn: str) -> None:
    assert redact_conninfo(dsn) == _old_redaction(dsn)


def test_redaction_hides_every_secret_keyword() -> None:
    dsn = make_conninfo(**dict.fromkeys(SECRET_KEYWORDS, "s3cret"), host="db")
    redacted = redact_conninfo(dsn)
    assert "s3cret" not in redacted
    assert parse_conninfo(redacted) == dict.fromkeys(SECRET_KEYWORDS, "********") | {"host": "db"}
    assert redact_conninfo("host=db secret") == "<invalid connection string>"
