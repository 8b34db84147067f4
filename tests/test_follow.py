"""[ha] followers probed in rounds (docs/ha.md, "What a follower costs"): the schedulers of two
instances, in this process, share six real servers. A server an instance follows is probed in
the instance's rounds, once per probe period (1.5 intervals), with its fellows; anything that
changes (its session ends, its leader leaves) gives it back to its own job at once."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import pytest
from structlog.testing import capture_logs

from reaper.daemon.balance import FOLLOW_INTERVALS
from reaper.daemon.follow import FollowerRound
from reaper.daemon.scheduler import Scheduler
from reaper.observe.metrics import Metrics
from reaper.settings import Settings
from tests.servers import wait_for
from tests.test_ha import admin, fleet, lock_holders

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from reaper.daemon.worker import Worker
    from reaper.demo.embedded import EmbeddedPostgres
    from reaper.pg.ha import Probe

pytestmark = pytest.mark.integration

__all__ = ["fleet"]  # the fixture, shared with test_ha.py

INTERVAL = 1.0
PERIOD = FOLLOW_INTERVALS * INTERVAL  # a steady follower's probes of a server
NAMES = [f"s{i}" for i in range(6)]


class Instance:
    """One [ha] instance's scheduler and metrics."""

    def __init__(self, servers: Sequence[EmbeddedPostgres], instance: str) -> None:
        self.settings = Settings(
            servers=[{"name": n, "dsn": s.dsn()} for n, s in zip(NAMES, servers, strict=True)],
            policies=[{"name": "idle", "max_idle": "1h", "applications": ["^nobody$"]}],
            reaper={"interval": f"{INTERVAL:g}s", "min_interval": "250ms"},
            ha={"enabled": True, "instance_id": instance},
        )
        self.metrics = Metrics()
        self.scheduler = Scheduler(self.settings, metrics=self.metrics)
        self.scheduler.start()

    def value(self, name: str, server: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"server": server})

    def leads(self) -> set[str]:
        return {n for n in NAMES if self.value("pg_reaper_leader", n) == 1}

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.stop(timeout=5)


@pytest.fixture
def pair(fleet: list[EmbeddedPostgres]) -> Iterator[tuple[Instance, Instance]]:
    first, second = Instance(fleet, "round-a"), Instance(fleet, "round-b")
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def settle(pair: tuple[Instance, Instance]) -> tuple[set[str], set[str]]:
    """Each instance's servers, once they lead 3 each and park the 3 others."""
    first, second = pair

    def done() -> bool:
        a, b = first.leads(), second.leads()
        return (
            len(a) == len(b) == 3
            and not a & b
            and first.scheduler.parked() == set(NAMES) - a
            and second.scheduler.parked() == set(NAMES) - b
        )

    wait_for(done, timeout=20, what="a 3/3 split, each instance's followed servers parked")
    return first.leads(), second.leads()


def last_statement(server: EmbeddedPostgres, pid: int) -> str:
    ((query,),) = admin(server, "SELECT query FROM pg_stat_activity WHERE pid = %s", [pid])
    return str(query)


def follower_pid(server: EmbeddedPostgres) -> int | None:
    """The pid of the pg-reaper session on `server` that does not hold the lock (None: there
    is not exactly one)."""
    ((holder, _),) = lock_holders(server)
    pids = admin(
        server,
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-reaper' AND pid <> %s",
        [holder],
    )
    return int(pids[0][0]) if len(pids) == 1 else None


def test_a_follower_probes_the_servers_it_follows_together_once_per_period_and_never_polls(
    fleet: list[EmbeddedPostgres], pair: tuple[Instance, Instance]
) -> None:
    first, _ = pair
    led, _ = settle(pair)
    followed = sorted(set(NAMES) - led)
    before = {n: first.scheduler.polls(n) for n in followed}
    time.sleep(6 * PERIOD)
    for name in followed:
        probes = first.scheduler.polls(name) - before[name]
        assert 4 <= probes <= 9, (name, probes)  # once per period, once early at most
        index = NAMES.index(name)
        pid = follower_pid(fleet[index])
        assert pid is not None
        statement = last_statement(fleet[index], pid)
        assert statement.startswith("-- pg-reaper: ha_lead"), statement
    # Probed in one round, the rounds merged by now: the same moment, give or take the
    # statements before each.
    stamps = [first.value("pg_reaper_last_poll_timestamp_seconds", n) for n in followed]
    assert all(stamp is not None for stamp in stamps)
    assert max(s for s in stamps if s) - min(s for s in stamps if s) < 0.25 * INTERVAL
    assert first.scheduler.parked() == set(followed), "steady: still parked"


def test_a_parked_server_goes_back_to_its_own_job_when_its_session_ends_or_its_leader_leaves(
    fleet: list[EmbeddedPostgres], pair: tuple[Instance, Instance]
) -> None:
    first, second = pair
    led, others = settle(pair)
    name = min(others)  # followed by the first instance
    server = fleet[NAMES.index(name)]
    pid = follower_pid(server)
    assert pid is not None

    admin(server, "SELECT pg_terminate_backend(%s)", [pid])  # the follower's session

    # Its next probe finds a new session: its own cycle reads the cluster and the lock again,
    # and parks it again; nothing changes hands.
    wait_for(
        lambda: follower_pid(server) not in {None, pid} and name in first.scheduler.parked(),
        timeout=10 * INTERVAL,
        what="the follower's new session, parked again",
    )
    assert first.leads() == led
    assert second.leads() == others

    second.stop()  # its sessions end: the first instance leads every server within two intervals
    stopped = time.monotonic()
    wait_for(lambda: first.leads() == set(NAMES), timeout=10 * INTERVAL, what="all led")
    assert time.monotonic() - stopped <= 2 * INTERVAL + 0.5
    assert first.scheduler.parked() == set()


def test_a_steady_answer_is_judged_once_until_a_hold_off_ends(
    pair: tuple[Instance, Instance],
) -> None:
    first, _ = pair
    led, _ = settle(pair)
    name = min(set(NAMES) - led)
    worker = first.scheduler._workers[name]

    def judged_once() -> Probe | None:
        """The answer judged steady, if the next two probes took it as judged (right after
        the split, an ask may still be withdrawn: that answer is another, judged anew)."""
        steady = worker.steady
        probes = first.scheduler.polls(name)
        wait_for(
            lambda: first.scheduler.polls(name) >= probes + 2, timeout=4 * PERIOD, what="probes"
        )
        if steady is None or worker.steady is None or worker.steady[1] is not steady[1]:
            return None
        return steady[1]

    for _ in range(5):
        judged = judged_once()
        if judged is not None:
            break
    # The same answer, save the ages: taken as judged, not read again.
    assert judged is not None, "no answer was judged once and then taken as judged"
    assert name in first.scheduler.parked()

    worker.steady_until = time.monotonic()  # as when a hold-off or a retirement ends
    # Its next probe gives it back to its own cycle, which judges afresh and parks it again.
    wait_for(
        lambda: worker.steady is not None and worker.steady[1] is not judged,
        timeout=4 * PERIOD,
        what="the server judged again",
    )
    assert first.leads() == led


def test_a_round_says_a_failure_to_resume_a_server_and_goes_on() -> None:
    woken: list[str] = []

    def wake(worker: Worker) -> None:
        if worker.name == "first":
            raise RuntimeError("no such job")
        woken.append(worker.name)

    servers = [cast("Worker", SimpleNamespace(name=n)) for n in ("first", "second")]
    rounds = FollowerRound(run=lambda _: None, wake=wake)  # every probe: back to its own job
    try:
        with capture_logs() as logs:
            for server in servers:
                rounds.park(server, due=time.monotonic(), every=PERIOD)
            wait_for(lambda: woken == ["second"], timeout=5, what="the second server resumed")
        assert rounds.parked() == set()
        (said,) = [e for e in logs if e["event"] == "scheduler"]
        assert said["log_level"] == "error"
        assert "'first'" in said["message"]
        assert "no such job" in said["message"]
        # The thread goes on: a server parked later is probed too.
        later = cast("Worker", SimpleNamespace(name="later"))
        rounds.park(later, due=time.monotonic(), every=PERIOD)
        wait_for(lambda: "later" in woken, timeout=5, what="a later round")
    finally:
        rounds.cancel()
