"""libpq connection strings (conninfo and URIs): parsed, and redacted for printing."""

from __future__ import annotations

import re
from functools import cache

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["parse_conninfo", "redact_conninfo"]

_SECRET_KEYS = frozenset({"password", "sslpassword"})


def parse_conninfo(dsn: str) -> dict[str, str]:
    """Parse a libpq conninfo string or URI; `ValueError` (secret-free) when it is malformed."""
    if "\x00" in dsn:  # libpq would silently stop reading there, dropping what follows
        raise ValueError("invalid connection string: it contains a NUL character")
    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except psycopg.ProgrammingError as exc:
        if '"' in dsn:  # libpq's quoting of the offending word cannot be undone safely
            raise ValueError(
                "invalid connection string: not key=value pairs or a postgresql:// URI"
            ) from None
        # libpq quotes the offending word (a password, a whole URI, a punctuation-only
        # password such as %%-!): drop every quoted word, keeping only libpq's own words.
        message = " ".join(str(exc).split())
        for literal, plain in _CONNINFO_LITERALS:
            message = message.replace(literal, plain)
        message = re.sub(r'"[^"]*"', "…", message)
        raise ValueError(f"invalid connection string: {message}") from None


# The quoted punctuation of libpq's own conninfo messages (fe-connect.c), not the caller's.
_CONNINFO_LITERALS = (
    ('missing "=" after', "missing = after"),
    ('matching "]" in', "matching ] in"),
    ('key/value separator "=" in', "key/value separator = in"),
    ('(expected ":" or "/")', "(expected : or /)"),
)


@cache  # libpq's keyword table does not change while the process runs
def _secret_keywords() -> frozenset[str]:
    """The conninfo keywords libpq itself hides (dispchar "*": password, sslpassword,
    oauth_client_secret in libpq 18, ...), and the ones known whatever libpq this is."""
    defaults = psycopg.pq.Conninfo.get_defaults()
    hidden = {o.keyword.decode() for o in defaults if o.dispchar == b"*"}
    return frozenset(hidden | _SECRET_KEYS | {"oauth_client_secret"})


def redact_conninfo(dsn: str) -> str:
    """The DSN in keyword form with every secret replaced: safe to print and log."""
    try:
        params = parse_conninfo(dsn)
    except ValueError:
        return "<invalid connection string>"
    secret = _secret_keywords()
    return make_conninfo(**{k: "********" if k in secret else v for k, v in params.items()})
