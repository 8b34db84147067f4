"""reaper/identifiers.py: names are quoted exactly as PostgreSQL's own quote_ident() quotes them,
checked against real servers for every keyword they know and for names that trip naive rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from psycopg import sql

from reaper.identifiers import KEYWORDS, quote_identifier

if TYPE_CHECKING:
    from tests.servers import TestServer

# Names a "looks plain" rule gets wrong, and some that are plain.
TRICKY = [
    "reaper",
    "_private",
    "x_1",
    "abort",  # an unreserved keyword: bare
    "User",
    "USER",
    "Ops Team",
    'we"ird',
    '"',
    "1abc",
    "a$b",  # the lexer reads it bare, quote_ident() still quotes it
    "a-b",
    "a.b",
    "naïve",
    "ß",
    "é",
    "日本",
    " lead",
    "trail ",
    "",
    "pg-reaper",
]
# Keywords in PostgreSQL 16 or 17 but not 14: quoted here whatever the server.
NEWER_KEYWORDS = {
    "json",
    "json_array",
    "json_arrayagg",
    "json_exists",
    "json_object",
    "json_objectagg",
    "json_query",
    "json_scalar",
    "json_serialize",
    "json_table",
    "json_value",
    "merge_action",
    "system_user",
}


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("reaper", "reaper"),
        ("user", '"user"'),
        ("current_user", '"current_user"'),
        ("select", '"select"'),
        ("all", '"all"'),
        ("between", '"between"'),
        ("char", '"char"'),
        ("abort", "abort"),
        ("Ops Team", '"Ops Team"'),
        ('we"ird', '"we""ird"'),
        ("1abc", '"1abc"'),
        ("a$b", '"a$b"'),
        ("", '""'),
    ],
)
def test_a_name_is_bare_only_when_plain_and_not_a_keyword(name: str, quoted: str) -> None:
    assert quote_identifier(name) == quoted


def test_the_keyword_list_is_lowercase_words() -> None:
    assert all(word.isascii() and word.islower() and word.isidentifier() for word in KEYWORDS)
    assert NEWER_KEYWORDS <= KEYWORDS


@pytest.mark.integration
def test_quoting_is_the_servers_own_for_every_keyword_and_tricky_name(pg: TestServer) -> None:
    keywords = dict(pg.execute("SELECT word, catcode FROM pg_catalog.pg_get_keywords()"))
    not_unreserved = {word for word, category in keywords.items() if category != "U"}
    assert not_unreserved <= KEYWORDS
    assert KEYWORDS - not_unreserved <= NEWER_KEYWORDS
    if pg.major >= 17:
        assert not_unreserved == KEYWORDS

    names = sorted({*keywords, *KEYWORDS, *TRICKY})
    theirs = dict(
        pg.execute(
            "SELECT name, pg_catalog.quote_ident(name) FROM pg_catalog.unnest(%s::text[]) AS name",
            [names],
        )
    )
    for name in names:
        if name in KEYWORDS and name not in not_unreserved:  # reserved only on newer servers
            assert quote_identifier(name) == f'"{name}"'
        else:
            assert quote_identifier(name) == theirs[name], name


@pytest.mark.integration
def test_every_quoted_name_reads_back_as_itself(pg: TestServer) -> None:
    """Printed SQL is pasted into psql: the server must read each quoted name as the name."""
    names = sorted({*KEYWORDS, *TRICKY} - {""})  # a zero-length name is no identifier at all
    columns = ", ".join(f"1 AS {quote_identifier(name)}" for name in names)
    cursor = pg.admin.execute(sql.SQL("SELECT " + columns))  # the statement under test
    assert cursor.description is not None
    assert [column.name for column in cursor.description] == names
