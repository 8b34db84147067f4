"""How role, database and other names are written in the SQL that pg-reaper prints (the fixes
`doctor` suggests, warnings, the commands `kill` and `unblock` show).

pg-reaper never builds the SQL it sends from strings: what it sends goes through
`psycopg.sql.Identifier`. What it prints for a person to paste must be just as exact, so it
follows PostgreSQL's own ``quote_identifier()`` (src/backend/utils/adt/ruleutils.c).
"""

from __future__ import annotations

import re

__all__ = ["KEYWORDS", "quote_identifier"]

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
