"""Two `[[servers]]` entries on one PostgreSQL cluster are detected and refused: by the one-shot
commands before anything is signalled, by the daemon for every entry after the first."""

from __future__ import annotations

import json
import signal
import textwrap
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import pytest

from reaper.cli import main
from reaper.clusters import ClusterIdentity, duplicates, identify
from reaper.pg.activity import ServerConnection
from tests.servers import ADMIN_APPLICATION, Sessions, TestServer
from tests.test_daemon import RunningDaemon, second_embedded, second_server, start_daemon

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from reaper.settings import ServerConfig

# Fixtures of test_daemon.py, used here too.
__all__ = ["second_embedded", "second_server", "start_daemon"]

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


# --- real servers ------------------------------------------------------------------------------


def config_text(servers: dict[str, tuple[str, str]], *, interval: str = "30s") -> str:
    """A config whose entries each have their own policy, matching only their own victims by
    application_name: `servers` maps an entry's name to its DSN and that application."""
    text = textwrap.dedent(
        f"""\
        [reaper]
        interval = "{interval}"
        min_interval = "1s"
        protect_applications = ["^{ADMIN_APPLICATION}$"]

        [metrics]
        listen = ""

        [log]
        format = "json"
        """
    )
    for name, (dsn, _application) in servers.items():
        text += (
            f"\n[[servers]]\nname = {json.dumps(name)}\ndsn = {json.dumps(dsn)}\n"
            f'policies = ["{name}-idle"]\n'
        )
    for name, (_dsn, application) in servers.items():
        text += (
            f'\n[[policies]]\nname = "{name}-idle"\nmax_idle = "1s"\n'
            f"applications = [{json.dumps('^' + application + '$')}]\n"
        )
    return text


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.integration
@pytest.mark.parametrize("command", ["once", "preview", "doctor", "sessions"])
def test_two_entries_on_one_cluster_are_refused_with_exit_2_before_anything_is_signalled(
    command: str,
    pg: TestServer,
    sessions: Sessions,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    victim = sessions.idle(application="dup-victim")
    config = write(
        tmp_path / "config.toml",
        config_text(
            {
                "a": (pg.dsn(dbname="postgres"), "dup-victim"),
                "b": (pg.dsn(dbname="otherdb"), "dup-victim"),
            }
        ),
    )
    time.sleep(1.3)  # the victim is idle past max_idle

    code = main([command, "-c", str(config)])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert (
        "pg-reaper: servers[0] 'a' and servers[1] 'b' are the same PostgreSQL cluster "
        "(system identifier "
    ) in captured.err
    assert pg.is_alive(victim.info.backend_pid)


@pytest.mark.integration
def test_entries_on_two_clusters_are_each_reaped(
    pg: TestServer,
    second_server: TestServer,
    sessions: Sessions,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    on_other = Sessions(second_server)
    try:
        here = sessions.idle(application="two-here")
        there = on_other.idle(application="two-there")
        config = write(
            tmp_path / "config.toml",
            config_text({"a": (pg.dsn(), "two-here"), "b": (second_server.dsn(), "two-there")}),
        )
        time.sleep(1.3)

        code = main(["once", "-c", str(config), "--json"])

        document = json.loads(capsys.readouterr().out)
        assert code == 0, document
        results = {
            (s["server"], d["pid"]): d["result"]
            for s in document["servers"]
            for d in s["decisions"]
        }
        assert results == {
            ("a", here.info.backend_pid): "terminated",
            ("b", there.info.backend_pid): "terminated",
        }
    finally:
        on_other.close()


@pytest.mark.integration
def test_the_daemon_lets_only_the_first_entry_on_a_cluster_act_until_a_reload_removes_it(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    first = sessions.idle(application="dup-first")
    second = sessions.idle(application="dup-second")
    both = {
        "a": (pg.dsn(dbname="postgres"), "dup-first"),
        "b": (pg.dsn(dbname="otherdb"), "dup-second"),
    }
    config = write(tmp_path / "config.toml", config_text(both))

    daemon = start_daemon(config, port=None)

    refused = daemon.wait_event("duplicate_cluster", server="b")
    assert refused["level"] == "error"
    assert refused["acting"] == "a"
    assert refused["error"].startswith(
        "servers[0] 'a' and servers[1] 'b' are the same PostgreSQL cluster (system identifier "
    )
    assert pg.wait_gone(first.info.backend_pid), "the first entry acts"
    reaped_at = len(daemon.events("poll_completed", server="a"))
    daemon.wait_until(
        lambda: len(daemon.events("poll_completed", server="a")) >= reaped_at + 2,
        timeout=10,
        what="two more cycles of the first entry",
    )
    assert pg.is_alive(second.info.backend_pid), "the second entry signals nothing"
    assert not daemon.events("session_reaped", server="b")
    assert not daemon.events("poll_completed", server="b"), daemon.stderr_text()
    assert len(daemon.events("duplicate_cluster")) == 1  # once per change, not per cycle
    (failed, *_) = daemon.events("poll_failed", server="b")
    assert failed["error"].startswith(refused["error"].split(";")[0])

    write(config, config_text({"b": both["b"]}))
    daemon.send(signal.SIGHUP)
    daemon.wait_event("config_reloaded")

    assert pg.wait_gone(second.info.backend_pid), "alone on its cluster, the entry acts"
    daemon.wait_event("session_reaped", server="b", application="dup-second")
    daemon.wait_event("duplicate_cluster_resolved", server="b")
