"""What an embedded server's data directory gets after initdb: its settings, in a file of their
own that postgresql.conf includes, and the pg_hba.conf rules it relies on.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from reaper.demo.programs import EmbeddedPostgresError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

__all__ = ["DEFAULT_SETTINGS", "check_hba", "merge_settings", "quote_setting", "write_config"]

_SETTING_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")

DEFAULT_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "100",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}
# Fixed by the constructor's arguments; a `settings` entry would silently disagree with them.
_RESERVED_SETTINGS = frozenset({"port", "unix_socket_directories"})
_INCLUDE = "include 'pg_reaper.conf'"
_HBA_RULES = (
    ("local", "all", "all", "trust"),
    ("host", "all", "all", "127.0.0.1/32", "scram-sha-256"),
    ("local", "replication", "all", "trust"),
    ("host", "replication", "all", "127.0.0.1/32", "scram-sha-256"),
)


def merge_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """`DEFAULT_SETTINGS` with the caller's `settings` over them; names are checked."""
    merged = dict(DEFAULT_SETTINGS)
    for name, value in settings.items():
        if not _SETTING_NAME_RE.fullmatch(name):
            raise EmbeddedPostgresError(f"invalid setting name {name!r}")
        if name.lower() in _RESERVED_SETTINGS:
            raise EmbeddedPostgresError(
                f"{name!r} is managed by EmbeddedPostgres; pass port= instead"
            )
        merged[name.lower()] = str(value)
    return merged


def quote_setting(value: str) -> str:
    """Quote `value` as a postgresql.conf string literal."""
    if any(char in value for char in "\n\r\0"):
        raise EmbeddedPostgresError(f"setting value {value!r} contains a line break or NUL")
    # The configuration-file lexer processes backslash escapes inside quoted strings.
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def check_hba(data_dir: Path) -> None:
    """Make sure pg_hba.conf trusts the socket and asks for a password on 127.0.0.1."""
    hba = data_dir / "pg_hba.conf"
    present = {
        tuple(line.split())
        for line in hba.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    missing = [rule for rule in _HBA_RULES if rule not in present]
    if missing:
        # initdb's default file starts with these rules; pg_hba.conf is matched top-down,
        # so anything added goes first.
        added = "".join(" ".join(rule) + "\n" for rule in missing)
        hba.write_text(added + hba.read_text())


def write_config(data_dir: Path, settings: Mapping[str, str]) -> Path:
    """Write `settings` to pg_reaper.conf and include it from postgresql.conf; return the file."""
    include = data_dir / "pg_reaper.conf"
    include.write_text(
        "# Written by pg-reaper's EmbeddedPostgres.\n"
        + "".join(f"{name} = {quote_setting(value)}\n" for name, value in settings.items())
    )
    # postgresql.auto.conf is read after this, so ALTER SYSTEM still overrides these. A copied
    # data directory includes it already.
    conf = data_dir / "postgresql.conf"
    if _INCLUDE not in conf.read_text().splitlines():
        with conf.open("a") as out:
            out.write(f"\n{_INCLUDE}\n")
    return include
