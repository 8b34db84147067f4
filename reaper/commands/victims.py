"""Whom `pg-reaper kill` terminates: its filters, read from the command line and validated, and
the pure choice of the victims among one poll's sessions."""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reaper.policy import CLIENT_BACKEND, HIDDEN_BACKEND, in_networks
from reaper.settings import parse_duration

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import timedelta

    from reaper.policy import Session
    from reaper.settings import ClientNetwork

__all__ = [
    "KillTarget",
    "hidden_matches",
    "kill_target",
    "parse_client_addr",
    "parse_wait",
    "select_victims",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class KillTarget:
    """What `kill` terminates: client sessions matching every filter given (at least one)."""

    database: str | None = None
    user: str | None = None
    application: re.Pattern[str] | None = None  # re.search
    client_addr: ClientNetwork | None = None  # "local": a Unix-socket session

    def matches(self, session: Session) -> bool:
        if self.database is not None and session.database != self.database:
            return False
        if self.user is not None and session.user != self.user:
            return False
        if self.application is not None and not self.application.search(session.application):
            return False
        return self.client_addr is None or in_networks(session.client_addr, [self.client_addr])

    def describe(self) -> str:
        """The filters as a shell would take them: `--database shop --user 'we"ird'`."""
        words: list[str] = []
        for option, value in (
            ("--database", self.database),
            ("--user", self.user),
            ("--application", self.application.pattern if self.application else None),
            ("--client-addr", None if self.client_addr is None else str(self.client_addr)),
        ):
            if value is not None:
                words += [option, value]
        return shlex.join(words)


def kill_target(
    *,
    database: str | None = None,
    user: str | None = None,
    application: str | None = None,
    client_addr: str | None = None,
    block: bool = False,
) -> KillTarget:
    """The validated filters of `kill`; `ValueError` naming the option that is wrong."""
    if database is None and user is None and application is None and client_addr is None:
        raise ValueError("name at least one of --database, --user, --application, --client-addr")
    if block and database is None:
        raise ValueError("--block-connections needs --database")
    if block and (user is not None or application is not None or client_addr is not None):
        raise ValueError(
            "--block-connections empties the whole database: it cannot be combined with "
            "--user, --application or --client-addr"
        )
    pattern = None
    if application is not None:
        try:
            pattern = re.compile(application)
        except re.error as exc:
            raise ValueError(f"--application: invalid regex {application!r}: {exc}") from None
    network = None
    if client_addr is not None:
        try:
            network = parse_client_addr(client_addr)
        except ValueError as exc:
            raise ValueError(f"--client-addr: {exc}") from None
    return KillTarget(database=database, user=user, application=pattern, client_addr=network)


def parse_wait(value: str) -> timedelta:
    """`--wait`: a duration such as "10s" or "1m30s" (0 does not wait)."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"--wait: {exc}") from None


def parse_client_addr(value: str) -> ClientNetwork:
    """A CIDR (a bare address is its /32 or /128) or `local` for Unix-socket sessions."""
    if value == "local":
        return "local"
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"invalid CIDR {value!r}: {exc} (or 'local')") from None


def select_victims(
    sessions: Iterable[Session], target: KillTarget, *, own_pid: int
) -> tuple[Session, ...]:
    """The client sessions `kill` terminates, in any state, oldest in its state first.

    Never the reaper's own session, never a backend that is not a client (walsenders,
    autovacuum, background and parallel workers), never a row whose kind is hidden from the
    reaper's role. Other pg-reapers' sessions are not spared: a database to be dropped needs
    them gone too.
    """
    chosen = [
        s
        for s in sessions
        if s.backend_type == CLIENT_BACKEND and s.pid != own_pid and target.matches(s)
    ]
    return tuple(sorted(chosen, key=lambda s: (-s.age_in_state, s.pid)))


def hidden_matches(sessions: Iterable[Session], target: KillTarget) -> int:
    """Rows hidden from the reaper's role whose database and role (all it can see of them)
    match: sessions `kill` cannot terminate, nor even tell apart from other backends."""
    return sum(
        s.backend_type == HIDDEN_BACKEND
        and (target.database is None or s.database == target.database)
        and (target.user is None or s.user == target.user)
        for s in sessions
    )
