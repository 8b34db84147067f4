"""How role, database and other names are written in the SQL that pg-reaper prints (the fixes
`doctor` suggests, warnings, the commands `kill` and `unblock` show).

pg-reaper never builds the SQL it sends from strings: what it sends goes through
`psycopg.sql.Identifier`. What it prints for a person to paste must be just as exact, so it
follows PostgreSQL's own ``quote_identifier()`` (src/backend/utils/adt/ruleutils.c).
"""

from __future__ import annotations

import re

__all__ = ["KEYWORDS", "parse_table_name", "quote_identifier"]

# The keywords that are not UNRESERVED in PostgreSQL 14 to 18 (src/include/parser/kwlist.h):
# as a bare name each is a syntax error (`GRANT x TO user`) or means something else
# (`TO current_user` is whoever runs the statement). Unreserved keywords are plain names.
_RESERVED = """
    all analyse analyze and any array as asc asymmetric both case cast check collate
    column constraint create current_catalog current_date current_role current_time
    current_timestamp current_user default deferrable desc distinct do else end except
    false fetch for foreign from grant group having in initially intersect into lateral
    leading limit localtime localtimestamp not null offset on only or order placing
    primary references returning select session_user some symmetric system_user table then
    to trailing true union unique user using variadic when where window with
"""
_TYPE_FUNC_NAME = """
    authorization binary collation concurrently cross current_schema freeze full ilike
    inner is isnull join left like natural notnull outer overlaps right similar
    tablesample verbose
"""
# Some are newer than PostgreSQL 14: system_user and four json_* words came in 16, json, six
# more json_* words and merge_action in 17. Quoting them is harmless on an older server.
_COL_NAME = """
    between bigint bit boolean char character coalesce dec decimal exists extract float
    greatest grouping inout int integer interval json json_array json_arrayagg json_exists
    json_object json_objectagg json_query json_scalar json_serialize json_table json_value
    least merge_action national nchar none normalize nullif numeric out overlay position
    precision real row setof smallint substring time timestamp treat trim values varchar
    xmlattributes xmlconcat xmlelement xmlexists xmlforest xmlnamespaces xmlparse xmlpi
    xmlroot xmlserialize xmltable
"""
KEYWORDS = frozenset((_RESERVED + _TYPE_FUNC_NAME + _COL_NAME).split())

# PostgreSQL's "safe" name: a lowercase letter or underscore, then lowercase letters, digits and
# underscores (not $, which the lexer allows but quote_identifier() does not leave bare).
_PLAIN = re.compile(r"[a-z_][a-z0-9_]*", re.ASCII)


def quote_identifier(name: str) -> str:
    """`name` as PostgreSQL's ``quote_ident()`` writes it: bare only when it is a plain
    lowercase name and not a keyword other than an unreserved one; else in double quotes, with
    each double quote doubled (``user`` -> ``"user"``, ``Ops Team`` -> ``"Ops Team"``)."""
    if _PLAIN.fullmatch(name) and name not in KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


# --- table names (the audit table's) ----------------------------------------------------------

_UNQUOTED = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*", re.ASCII)  # a name SQL reads unquoted
_MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL would truncate a longer name


def parse_table_name(value: str) -> tuple[str, ...]:
    """``table`` or ``schema.table``, read as SQL reads them: a plain name is folded to lower
    case; a double-quoted one (``"Audit Log"``, ``""`` for a quote) is kept as written.

    Raises `ValueError` naming the problem.
    """
    parts: list[str] = []
    position = 0
    while True:
        if value.startswith('"', position):
            end = position + 1
            while True:
                end = value.find('"', end)
                if end < 0:
                    raise ValueError(f"invalid table name {value!r}: unterminated quoted name")
                if not value.startswith('"', end + 1):
                    break
                end += 2
            part, position = value[position + 1 : end].replace('""', '"'), end + 1
        elif match := _UNQUOTED.match(value, position):
            part, position = match[0].lower(), match.end()
        else:
            raise ValueError(
                f"invalid table name {value!r}: use 'table' or 'schema.table'; quote a name "
                "that is not a plain identifier, as in '\"Audit Log\"'"
            )
        _check_identifier(value, part)
        parts.append(part)
        if position == len(value):
            break
        if value[position] != "." or len(parts) == 2:
            raise ValueError(
                f"invalid table name {value!r}: use 'table' or 'schema.table'; quote a name "
                "that is not a plain identifier, as in '\"Audit Log\"'"
            )
        position += 1
    return tuple(parts)


def _check_identifier(value: str, part: str) -> None:
    if not part:
        raise ValueError(f"invalid table name {value!r}: a quoted name is empty")
    if re.search(r"[\x00-\x1f\x7f]", part):
        raise ValueError(f"invalid table name {value!r}: control character in a name")
    if len(part.encode()) > _MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"invalid table name {value!r}: a name is longer than "
            f"{_MAX_IDENTIFIER_BYTES} bytes (PostgreSQL would truncate it)"
        )
