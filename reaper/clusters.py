"""One `[[servers]]` entry per PostgreSQL cluster.

Everything pg-reaper reads and signals is cluster-wide, whatever database a DSN names: two
entries on one cluster would double its per-cycle cap and let each one's policies reach the
other's sessions. A cluster is recognised by what its server says about itself
(reaper/pg/sql/cluster_identity.sql): the system identifier that initdb chose, which every copy
restored from one base backup and every streaming standby shares with its origin, and the
postmaster's start time, which tells those running copies apart. A host name, a port or a
socket path would not do: one server is reached by many, and one name can reach many servers.

The one-shot commands refuse a configuration with two entries on one cluster before anything is
signalled; the daemon lets only one entry act on a cluster (docs/configuration.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from datetime import datetime

    from reaper.pg.activity import ServerConnection
    from reaper.settings import ServerConfig

__all__ = ["ClusterIdentity", "Duplicate", "duplicates", "identify"]


@dataclass(frozen=True, slots=True)
class ClusterIdentity:
    """One running PostgreSQL server: two sessions with equal identities are on one cluster."""

    system_identifier: int
    started: datetime  # pg_postmaster_start_time()

    def __str__(self) -> str:
        return f"system identifier {self.system_identifier}, started {self.started.isoformat()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Duplicate:
    """Two entries of `[[servers]]` on one cluster, `first` before `second` in the file."""

    first: str
    first_index: int
    second: str
    second_index: int
    identity: ClusterIdentity

    @property
    def message(self) -> str:
        return (
            f"servers[{self.first_index}] {self.first!r} and servers[{self.second_index}] "
            f"{self.second!r} are the same PostgreSQL cluster ({self.identity}): one "
            "[[servers]] entry per cluster, since everything pg-reaper reads and signals is "
            "cluster-wide whatever database the dsn names"
        )


def identify(conn: ServerConnection) -> ClusterIdentity:
    """The identity of the cluster `conn`'s session is on; raises `PostgresError`."""
    row = conn.cluster_identity()
    return ClusterIdentity(system_identifier=row["system_identifier"], started=row["started"])


def duplicates(
    servers: Sequence[ServerConfig], identities: Mapping[str, ClusterIdentity]
) -> list[Duplicate]:
    """Each entry of `servers` (config order) on the same cluster as an earlier one, paired with
    the first entry on that cluster. Entries without an identity (not reached) are left out."""
    first: dict[ClusterIdentity, tuple[int, str]] = {}
    found = []
    for index, server in enumerate(servers):
        identity = identities.get(server.name)
        if identity is None:
            continue
        if identity not in first:
            first[identity] = (index, server.name)
            continue
        first_index, first_name = first[identity]
        found.append(
            Duplicate(
                first=first_name,
                first_index=first_index,
                second=server.name,
                second_index=index,
                identity=identity,
            )
        )
    return found
