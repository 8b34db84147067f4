"""How role and database names are written in the SQL that pg-reaper shows (fixes, advice)."""

from __future__ import annotations

import re

__all__ = ["quote_identifier"]

_PLAIN_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]*", re.ASCII)


def quote_identifier(name: str) -> str:
    """A role or database name as it must be written in SQL (for the fixes shown)."""
    if _PLAIN_IDENTIFIER.fullmatch(name):
        return name
    return '"' + name.replace('"', '""') + '"'
