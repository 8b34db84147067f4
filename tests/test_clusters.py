"""Two `[[servers]]` entries on one PostgreSQL cluster are detected and refused: by the one-shot
commands before anything is signalled, by the daemon for every entry after the first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import pytest

from reaper.activity import ServerConnection
from reaper.clusters import ClusterIdentity, duplicates, identify

if TYPE_CHECKING:
    from reaper.settings import ServerConfig
    from tests.servers import TestServer

START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def entries(*names: str) -> list[ServerConfig]:
    return [cast("ServerConfig", SimpleNamespace(name=name)) for name in names]


def test_entries_on_one_cluster_are_paired_with_the_first_entry_on_it_in_config_order() -> None:
    one = ClusterIdentity(system_identifier=7, started=START)
    other = ClusterIdentity(system_identifier=8, started=START)

    found = duplicates(entries("a", "b", "c", "d"), {"a": one, "b": other, "c": one, "d": one})

    assert [(d.first, d.first_index, d.second, d.second_index) for d in found] == [
        ("a", 0, "c", 2),
        ("a", 0, "d", 3),
    ]
    assert found[0].message.startswith(
        "servers[0] 'a' and servers[2] 'c' are the same PostgreSQL cluster (system identifier 7"
    )


def test_copies_of_one_cluster_restored_from_one_backup_or_standbys_are_different_servers() -> None:
    # A restored copy or a streaming standby shares the system identifier: its postmaster's
    # start time tells it apart.
    primary = ClusterIdentity(system_identifier=7, started=START)
    standby = ClusterIdentity(system_identifier=7, started=START + timedelta(microseconds=1))

    assert duplicates(entries("primary", "standby"), {"primary": primary, "standby": standby}) == []


def test_entries_not_reached_are_not_compared() -> None:
    one = ClusterIdentity(system_identifier=7, started=START)

    assert duplicates(entries("a", "b", "c"), {"a": one}) == []


def session(dsn: str) -> ServerConnection:
    return ServerConnection(
        dsn=dsn, connect_timeout=timedelta(seconds=5), statement_timeout=timedelta(seconds=10)
    )


@pytest.mark.integration
def test_the_identity_is_readable_by_the_least_privileged_role_and_the_same_from_any_database(
    pg: TestServer,
) -> None:
    """pg_control_system() and pg_postmaster_start_time() are executable by PUBLIC: a role with
    only pg_signal_backend and pg_read_all_stats reads what a superuser reads, in any database."""
    least = pg.dsn(user="reaper_lp", password="reaper_lp", dbname="otherdb")
    with session(least) as a, session(pg.dsn()) as b:
        assert identify(a) == identify(b)
        (row,) = pg.execute(
            "SELECT system_identifier, pg_postmaster_start_time() FROM pg_control_system()"
        )
        assert identify(a) == ClusterIdentity(system_identifier=row[0], started=row[1])
