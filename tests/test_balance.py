"""Balanced [ha] leadership (docs/ha.md): real daemons share six real servers, each leading its
share; an instance that comes or goes moves its share, a terminated leader session moves only
its server, every victim is signalled once, and two instances never signal on one server at
the same time. Followers only probe."""

from __future__ import annotations

import contextlib
import itertools
import textwrap
import threading
from collections import Counter
from typing import TYPE_CHECKING, Self

import pytest

from reaper.demo.programs import free_port
from tests.servers import wait_for
from tests.test_daemon import RunningDaemon, daemon_config, start_daemon
from tests.test_ha import IDLE_POLICY, Clients, admin, fleet, is_alive, lock_holders, reaped

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator, Sequence
    from pathlib import Path

    from reaper.demo.embedded import EmbeddedPostgres

pytestmark = pytest.mark.integration

__all__ = ["fleet", "start_daemon"]  # the fixtures, shared with test_ha.py and test_daemon.py

INTERVAL = 1.0  # [reaper] interval of every daemon here, in seconds
SETTLE = 20.0  # how long a test waits for leadership to settle (generous: not a speed goal)


@pytest.fixture
def clients(fleet: list[EmbeddedPostgres]) -> Iterator[Clients]:
    opened = Clients()
    yield opened
    opened.close(fleet)


def start(
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    fleet: Sequence[EmbeddedPostgres],
    instance: str,
) -> RunningDaemon:
    port = free_port()
    ha = textwrap.dedent(
        f"""
        [ha]
        enabled = true
        instance_id = "{instance}"
        """
    )
    config = daemon_config(
        tmp_path / f"{instance}.toml",
        servers={f"s{i}": server.dsn() for i, server in enumerate(fleet)},
        policies=ha + IDLE_POLICY,
        port=port,
        interval=f"{INTERVAL:g}s",
        min_interval="250ms",
    )
    daemon = start_daemon(config, port=port)
    daemon.wait_ready()
    return daemon


def led(daemon: RunningDaemon, names: Sequence[str]) -> set[str] | None:
    """The servers `daemon` leads, from one scrape; None once it is gone."""
    if daemon.process.poll() is not None:
        return None
    families = daemon.families()
    leader = families.get("pg_reaper_leader")
    values = {} if leader is None else {s.labels["server"]: s.value for s in leader.samples}
    return {name for name in names if values.get(name) == 1}


def settled(daemons: Sequence[RunningDaemon], names: Sequence[str]) -> list[set[str]] | None:
    """Each daemon's servers once every server has exactly one leader, else None."""
    shares = [led(d, names) or set() for d in daemons]
    counts = Counter(name for share in shares for name in share)
    return shares if all(counts[name] == 1 for name in names) else None


def wait_split(
    daemons: Sequence[RunningDaemon], names: Sequence[str], sizes: list[int]
) -> list[set[str]]:
    """Wait until the daemons lead `sizes` servers (in any order), each server one leader."""
    found: list[list[set[str]]] = []

    def done() -> bool:
        shares = settled(daemons, names)
        found[:] = [shares] if shares is not None else []
        return shares is not None and sorted(map(len, shares)) == sorted(sizes)

    daemons[0].wait_until(done, timeout=SETTLE, what=f"leadership split {sizes}")
    return found[0]


class Victims:
    """Idle sessions opened on every server, one per server every ~0.3 s, until stopped."""

    def __init__(self, clients: Clients, fleet: Sequence[EmbeddedPostgres]) -> None:
        self.clients, self.fleet = clients, fleet
        self.opened: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.3):
            for i, server in enumerate(self.fleet):
                pid = self.clients.idle(server, f"balance-victim-{n}")
                with self._lock:
                    self.opened.append((f"s{i}", pid))
            n += 1

    def snapshot(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self.opened)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for name, pid in self.opened:
            wait_for(
                lambda s=self.fleet[int(name[1:])], p=pid: not is_alive(s, p),  # type: ignore[misc]
                timeout=15,
                what=f"{name} pid {pid} reaped",
            )


def check_signals(
    daemons: Sequence[RunningDaemon],
    victims: Victims,
    names: Sequence[str],
    *,
    unrecorded: Collection[tuple[str, int]] = (),
) -> None:
    """From the audit events: every victim signalled exactly once, by the instance that led
    its server then; on each server the signalling instance changes only where leadership
    moved (two instances never take turns within one leadership).

    `unrecorded` are victims that may lack their event: an instance SIGKILLed between a
    signal and its audit line takes the line with it (the victim itself is gone, which
    `Victims` checks)."""
    events = [e for d in daemons for name in names for e in reaped(d, name)]
    signalled = Counter((e["server"], e["pid"]) for e in events)
    assert max(signalled.values(), default=1) == 1, "no victim signalled twice"
    missing = set(victims.opened) - set(signalled)
    assert missing <= set(unrecorded), f"victims never signalled: {sorted(missing)}"
    assert set(signalled) <= set(victims.opened), "only victims signalled"
    for name in names:
        mine = sorted((e for e in events if e["server"] == name), key=lambda e: e["timestamp"])
        turns = sum(1 for a, b in itertools.pairwise(mine) if a["instance"] != b["instance"])
        moves = sum(len(d.events("leadership_acquired", server=name)) for d in daemons)
        assert turns <= max(0, moves - 1), f"{name}: {turns} changes of signaller, {moves} leaders"


def check_followers_only_probe(daemon: RunningDaemon, names: Sequence[str]) -> None:
    """A follower exports no poll of a server it does not lead, but probes it and sees it up."""
    share = led(daemon, names) or set()
    for name in set(names) - share:
        assert daemon.value("pg_reaper_sessions", server=name, state="idle") is None, name
        assert (daemon.value("pg_reaper_ha_probes_total", server=name) or 0) > 0, name
        assert daemon.value("pg_reaper_server_up", server=name) == 1, name


NAMES = [f"s{i}" for i in range(6)]


def test_three_instances_on_six_servers_lead_two_each_and_signal_every_victim_once(
    fleet: list[EmbeddedPostgres],
    clients: Clients,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    daemons = [start(start_daemon, tmp_path, fleet, f"b{n}") for n in range(3)]
    shares = wait_split(daemons, NAMES, [2, 2, 2])
    with Victims(clients, fleet) as victims:
        wait_for(lambda: len(victims.opened) >= 24, timeout=30, what="victims")
    check_signals(daemons, victims, NAMES)
    assert settled(daemons, NAMES) == shares, "no flapping"
    for daemon, share in zip(daemons, shares, strict=True):
        instance = daemon.events("ha_enabled")[0]["instance"]
        assert {e["server"] for e in daemon.events("session_reaped")} <= share
        assert all(e["instance"] == instance for e in daemon.events("session_reaped"))
        check_followers_only_probe(daemon, NAMES)
        assert daemon.events("leadership_lost") == []
    for server in fleet:
        ((_, application),) = lock_holders(server)
        assert application == "pg-reaper"


def test_an_instance_killed_or_joining_moves_its_share_and_no_server_has_two_signallers(
    fleet: list[EmbeddedPostgres],
    clients: Clients,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    daemons = [start(start_daemon, tmp_path, fleet, f"j{n}") for n in range(2)]
    wait_split(daemons, NAMES, [3, 3])
    with Victims(clients, fleet) as victims:
        daemons.append(start(start_daemon, tmp_path, fleet, "j2"))  # joins
        shares = wait_split(daemons, NAMES, [2, 2, 2])
        victim = daemons[0]
        victim.process.kill()  # SIGKILL: its sessions and their locks go with it
        victim.process.wait(timeout=10)
        # what its last cycles may have signalled without the line: each of its servers' last
        # victims within two intervals (one opened per server every 0.3 s or more)
        opened = victims.snapshot()
        last = {name: [v for v in opened if v[0] == name][-7:] for name in shares[0]}
        unrecorded = [v for per_server in last.values() for v in per_server]
        survivors = daemons[1:]
        wait_split(survivors, NAMES, [3, 3])
        wait_for(lambda: len(victims.opened) >= 60, timeout=30, what="victims")
    check_signals(daemons, victims, NAMES, unrecorded=unrecorded)
    for daemon in survivors:
        check_followers_only_probe(daemon, NAMES)
    for daemon in daemons:
        for event in daemon.events("leadership_handed_over"):
            assert event["server"] in NAMES


def test_a_dba_terminating_a_leaders_session_moves_only_that_server(
    fleet: list[EmbeddedPostgres],
    clients: Clients,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    daemons = [start(start_daemon, tmp_path, fleet, f"t{n}") for n in range(3)]
    before = wait_split(daemons, NAMES, [2, 2, 2])
    ((holder, _),) = lock_holders(fleet[0])
    (old,) = [d for d, share in zip(daemons, before, strict=True) if "s0" in share]

    admin(fleet[0], "SELECT pg_terminate_backend(%s)", [holder])  # as a superuser

    old.wait_event("leadership_lost", server="s0")
    after = wait_split(daemons, NAMES, [3, 2, 1])
    for daemon, was, now in zip(daemons, before, after, strict=True):
        assert was - {"s0"} == now - {"s0"}, "only s0 moved"
        assert "s0" not in now or daemon is not old
    pid = clients.idle(fleet[0], "balance-after-terminate")
    wait_for(lambda: not is_alive(fleet[0], pid), timeout=15, what="reaped by the new leader")
    assert not [e for e in reaped(old, "s0") if e["pid"] == pid]
    with contextlib.suppress(AssertionError):  # and it stays there for a while
        old.wait_value("pg_reaper_leader", lambda v: v == 1, timeout=4 * INTERVAL, server="s0")
    assert old.value("pg_reaper_leader", server="s0") == 0
    assert settled(daemons, NAMES) == after
    for daemon in daemons:
        assert {e["server"] for e in daemon.events("leadership_lost")} <= {"s0"}
