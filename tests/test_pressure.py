"""Connection-pressure policies: `when_connections_above` and `when_role_connections_above`.

The engine is tested pure (facts built by hand); the poll's counts and `pg-reaper once` against
a throwaway server of 20 connections (17 usable) that each test module starts for itself.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from reaper.cli import main
from reaper.demo.embedded import EmbeddedPostgres
from reaper.observe.metrics import Metrics
from reaper.policy import (
    RoleConnections,
    ServerFacts,
    Session,
    evaluate,
    plan,
    pressure_held,
    seconds_until_eligible,
)
from reaper.settings import ConfigError, PolicyConfig, load_settings
from reaper.sweep import SweepReport, connect
from tests.servers import Sessions, TestServer, wait_for
from tests.test_policy import OWN_PID, make_policy, make_reaper, make_session, pids

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

REAPER = make_reaper()
# max_connections 20 less superuser_reserved_connections 3: 17 usable; 80% of them is 13.
CROWDED = make_policy("crowded", max_idle="1s", when_connections_above="80%")


def make_facts(
    *,
    used: int,
    max_connections: int = 20,
    superuser_reserved: int = 3,
    reserved: int = 0,
    roles: tuple[RoleConnections, ...] = (),
    superuser: bool = False,
) -> ServerFacts:
    return ServerFacts(
        own_pid=OWN_PID,
        role="pg_reaper",
        superuser=superuser,
        signal_backend=True,
        read_all_stats=True,
        server_version_num=170_000,
        max_connections=max_connections,
        superuser_reserved_connections=superuser_reserved,
        reserved_connections=reserved,
        client_sessions=used,
        roles=roles,
    )


def idle_sessions(
    count: int,
    *,
    first_pid: int = 1,
    user: str = "app",
    idle_seconds: float = 1000.0,
    **fields: Any,
) -> list[Session]:
    """`count` sessions idle for a long time, the lowest pid the oldest."""
    return [
        make_session(pid=first_pid + i, user=user, idle_seconds=idle_seconds - i, **fields)
        for i in range(count)
    ]


# --- when_connections_above --------------------------------------------------------------------


def test_without_pressure_a_pressure_policy_reaps_nothing() -> None:
    sessions = idle_sessions(8)
    result = plan(sessions, [CROWDED], reaper=REAPER, facts=make_facts(used=9))
    assert result.candidates == ()
    assert len(result.spared) == 8
    assert {d.reason for d in result.spared} == {
        "crowded: connections 9/17 not above when_connections_above 80% (13)"
    }


def test_at_exactly_the_level_there_is_no_pressure() -> None:
    result = plan(idle_sessions(12), [CROWDED], reaper=REAPER, facts=make_facts(used=13))
    assert result.candidates == ()


def test_at_95_percent_it_reaps_exactly_down_to_the_level_oldest_idle_first() -> None:
    # 16 of 17 slots: 15 idle sessions and the reaper's own; 16 - floor(17 * 0.8) = 3 victims.
    sessions = idle_sessions(15)
    result = plan(sessions, [CROWDED], reaper=REAPER, facts=make_facts(used=16))
    assert pids(result.signal) == [1, 2, 3]
    assert result.deferred == ()
    assert result.signal[0].reason == (
        "idle 1000s > max_idle 1s, connections 16/17 > when_connections_above 80% (13)"
    )
    held_back = {d.session.pid: d.reason for d in result.spared}
    assert sorted(held_back) == list(range(4, 16))
    assert held_back[4] == (
        "crowded: other victims this cycle already bring connections down to "
        "when_connections_above 80% (13)"
    )


def test_the_oldest_are_chosen_whatever_the_order_of_the_poll() -> None:
    sessions = list(reversed(idle_sessions(15)))
    result = plan(sessions, [CROWDED], reaper=REAPER, facts=make_facts(used=16))
    assert pids(result.signal) == [1, 2, 3]


def test_the_excess_counts_sessions_no_policy_can_touch() -> None:
    # 20 clients (superusers in the reserved slots) of which only 4 are idle enough to match:
    # all 4 go, although the server stays above the level.
    young = [make_session(pid=100 + i, idle_seconds=0.5) for i in range(15)]
    result = plan([*idle_sessions(4), *young], [CROWDED], reaper=REAPER, facts=make_facts(used=20))
    assert pids(result.signal) == [1, 2, 3, 4]


def test_the_per_cycle_cap_still_applies() -> None:
    capped = make_reaper(max_terminations_per_cycle=2)
    result = plan(idle_sessions(15), [CROWDED], reaper=capped, facts=make_facts(used=16))
    assert pids(result.signal) == [1, 2]
    assert pids(result.deferred) == [3]


def test_reserved_connections_shrink_the_usable_slots() -> None:
    # 16+: max_connections 20 - superuser_reserved 3 - reserved 2 = 15 usable; 80% is 12.
    facts = make_facts(used=14, reserved=2)
    assert facts.usable_connections == 15
    result = plan(idle_sessions(13), [CROWDED], reaper=REAPER, facts=facts)
    assert pids(result.signal) == [1, 2]


def test_unknown_slots_never_make_pressure() -> None:
    facts = make_facts(used=50, max_connections=0, superuser_reserved=0)
    assert plan(idle_sessions(10), [CROWDED], reaper=REAPER, facts=facts).candidates == ()


def test_a_pressure_policy_still_needs_its_thresholds() -> None:
    recent = [make_session(pid=i, idle_seconds=0.5) for i in range(1, 16)]
    result = plan(recent, [CROWDED], reaper=REAPER, facts=make_facts(used=16))
    assert result.candidates == ()
    assert result.spared[0].reason == "crowded: under every threshold"


def test_sessions_that_other_policies_terminate_relieve_the_pressure_first() -> None:
    # 17 clients, 4 over the level; 3 sessions go anyway (idle past 15m, a policy without
    # pressure): the pressure policy adds one victim, not four.
    plain = make_policy("idle", max_idle="15m")
    sessions = [
        make_session(pid=1, idle_seconds=2000.0),
        make_session(pid=2, idle_seconds=1000.0),
        make_session(pid=3, idle_seconds=950.0),
        make_session(pid=4, idle_seconds=600.0),
        make_session(pid=5, idle_seconds=500.0),
        make_session(pid=6, idle_seconds=400.0),
    ]
    result = plan(sessions, [CROWDED, plain], reaper=REAPER, facts=make_facts(used=17))
    assert pids(result.signal) == [1, 2, 3, 4]
    # File order still names them: the first policy that matches (and may take them).
    assert [d.policy.name for d in result.signal if d.policy] == ["crowded"] * 4
    # Without pressure the plain policy alone terminates the same three.
    calm = plan(sessions, [CROWDED, plain], reaper=REAPER, facts=make_facts(used=6))
    assert pids(calm.signal) == [1, 2, 3]
    assert [d.policy.name for d in calm.signal if d.policy] == ["idle"] * 3


def test_two_pressure_policies_share_the_count() -> None:
    # Down to 13 by the first, then on down to 8 by the second: 8 victims in all, not 3 + 8.
    half = make_policy("half", max_idle="1s", when_connections_above="50%")
    result = plan(idle_sessions(15), [CROWDED, half], reaper=REAPER, facts=make_facts(used=16))
    assert pids(result.signal) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [d.policy.name for d in result.signal if d.policy] == ["crowded"] * 3 + ["half"] * 5


def test_a_session_beyond_the_allowance_is_decided_by_the_next_policies() -> None:
    watch = make_policy("watch", max_idle="1s", action="log")
    result = plan(idle_sessions(15), [CROWDED, watch], reaper=REAPER, facts=make_facts(used=16))
    assert pids(result.signal) == [1, 2, 3]
    assert pids(result.log) == list(range(4, 16))
    assert {d.policy.name for d in result.log if d.policy} == {"watch"}


def test_victims_the_reaper_may_not_signal_free_no_slot_and_cost_nothing() -> None:
    superusers = idle_sessions(2, superuser=True)
    others = idle_sessions(13, first_pid=3)
    result = plan([*superusers, *others], [CROWDED], reaper=REAPER, facts=make_facts(used=16))
    assert pids(result.denied) == [1, 2]
    assert pids(result.signal) == [3, 4, 5]


def test_a_log_policy_reports_what_it_would_reap() -> None:
    watch = make_policy("watch", max_idle="1s", when_connections_above="80%", action="log")
    result = plan(idle_sessions(15), [watch], reaper=REAPER, facts=make_facts(used=16))
    assert pids(result.log) == [1, 2, 3]
    assert result.signal == ()


def test_a_log_policy_first_in_file_order_logs_what_a_later_policy_would_terminate() -> None:
    # First match names a session: the log policy takes the three over the level, though the
    # plain policy after it would have terminated them; nothing is counted twice.
    watch = make_policy("watch", max_idle="1s", when_connections_above="80%", action="log")
    plain = make_policy("idle", max_idle="15m")
    sessions = [
        *idle_sessions(3, first_pid=1, idle_seconds=2000.0),
        *idle_sessions(12, first_pid=4, idle_seconds=500.0),
    ]
    result = plan(sessions, [watch, plain], reaper=REAPER, facts=make_facts(used=16))
    assert pids(result.log) == [1, 2, 3]
    assert result.signal == ()


def test_the_reapers_own_and_protected_sessions_count_but_are_never_victims() -> None:
    own = make_session(pid=OWN_PID, idle_seconds=5000.0)
    keeper = make_session(pid=99, user="keeper", idle_seconds=4000.0)
    guarded = make_reaper(protect_users=["keeper"])
    sessions = [own, keeper, *idle_sessions(14)]
    result = plan(sessions, [CROWDED], reaper=guarded, facts=make_facts(used=16))
    assert pids(result.signal) == [1, 2, 3]


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    ages=st.lists(st.floats(min_value=0.0, max_value=100.0), max_size=40),
    others=st.integers(min_value=0, max_value=20),
    max_connections=st.integers(min_value=4, max_value=60),
    superuser_reserved=st.integers(min_value=0, max_value=3),
    percent=st.integers(min_value=1, max_value=100),
    cap=st.integers(min_value=1, max_value=50),
)
def test_victims_are_the_oldest_matches_exactly_down_to_the_level(
    ages: list[float],
    others: int,
    max_connections: int,
    superuser_reserved: int,
    percent: int,
    cap: int,
) -> None:
    sessions = [make_session(pid=i + 1, idle_seconds=age) for i, age in enumerate(ages)]
    facts = make_facts(
        used=len(sessions) + others,
        max_connections=max_connections,
        superuser_reserved=superuser_reserved,
    )
    policy = make_policy("crowded", max_idle="1s", when_connections_above=f"{percent}%")
    result = plan(
        sessions, [policy], reaper=make_reaper(max_terminations_per_cycle=cap), facts=facts
    )
    level = facts.usable_connections * percent // 100
    matching = sorted(
        (s for s in sessions if s.age_in_state > 1), key=lambda s: (-s.age_in_state, s.pid)
    )
    taken = matching[: max(0, facts.client_sessions - level)]
    assert pids(result.signal) == [s.pid for s in taken[:cap]]
    assert pids(result.deferred) == [s.pid for s in taken[cap:]]


# --- when_role_connections_above ---------------------------------------------------------------


ROLE_CROWDED = make_policy("role-crowded", max_idle="1s", when_role_connections_above="70%")
ROLES = (
    RoleConnections(role="app", limit=10, sessions=10),
    RoleConnections(role="batch", limit=20, sessions=6),
)


def test_role_pressure_reaps_each_role_down_to_its_own_level() -> None:
    app = idle_sessions(10, first_pid=1, user="app")
    batch = idle_sessions(6, first_pid=101, user="batch")
    free = idle_sessions(5, first_pid=201, user="nolimit")
    root = idle_sessions(2, first_pid=301, user="postgres", superuser=True)
    facts = make_facts(used=24, max_connections=100, roles=ROLES, superuser=True)
    result = plan([*app, *batch, *free, *root], [ROLE_CROWDED], reaper=REAPER, facts=facts)
    # app: 10 of 10, 70% is 7: the 3 oldest. batch: 6 of 20 is under 14. nolimit: no limit.
    assert pids(result.signal) == [1, 2, 3]
    reasons = {d.session.pid: d.reason for d in result.spared}
    assert reasons[4] == (
        "role-crowded: other victims this cycle already bring role 'app' down to "
        "when_role_connections_above 70% (7)"
    )
    assert reasons[101] == (
        "role-crowded: role 'batch' connections 6/20 not above when_role_connections_above 70% (14)"
    )
    assert reasons[201] == "role-crowded: role 'nolimit' has no connection limit"
    assert reasons[301] == (
        "role-crowded: role 'postgres' is a superuser: no connection limit applies"
    )
    assert result.signal[0].reason == (
        "idle 1000s > max_idle 1s, role 'app' connections 10/10 > "
        "when_role_connections_above 70% (7)"
    )


def test_both_conditions_must_hold_and_the_smaller_excess_wins() -> None:
    both = make_policy(
        "both", max_idle="1s", when_connections_above="80%", when_role_connections_above="50%"
    )
    app = idle_sessions(10, user="app")
    roles = (RoleConnections(role="app", limit=10, sessions=10),)
    # Server 15/17 (excess 2 over 13), role app 10/10 (excess 5 over 5): 2 victims.
    result = plan(app, [both], reaper=REAPER, facts=make_facts(used=15, roles=roles))
    assert pids(result.signal) == [1, 2]
    # Server 10/17 is not above 13: nothing, however full the role.
    result = plan(app, [both], reaper=REAPER, facts=make_facts(used=10, roles=roles))
    assert result.candidates == ()
    assert result.spared[0].reason.startswith("both: connections 10/17 not above")
    # Server over, role under (4 of 10 is not above 5): nothing either.
    few = (RoleConnections(role="app", limit=10, sessions=4),)
    result = plan(app[:4], [both], reaper=REAPER, facts=make_facts(used=16, roles=few))
    assert result.candidates == ()


def test_a_role_with_connection_limit_zero_loses_every_matching_session() -> None:
    roles = (RoleConnections(role="app", limit=0, sessions=3),)
    result = plan(
        idle_sessions(3), [ROLE_CROWDED], reaper=REAPER, facts=make_facts(used=4, roles=roles)
    )
    assert pids(result.signal) == [1, 2, 3]


# --- scheduling and metrics --------------------------------------------------------------------


def test_no_early_poll_for_a_pressure_policy_without_pressure() -> None:
    waiting = make_session(idle_seconds=0.4)
    calm, crowded = make_facts(used=5), make_facts(used=16)
    assert seconds_until_eligible(waiting, [CROWDED], reaper=REAPER, facts=calm) is None
    left = seconds_until_eligible(waiting, [CROWDED], reaper=REAPER, facts=crowded)
    assert left == pytest.approx(0.6)
    # Past its threshold and held back by the allowance: nothing to wait for.
    held_back = make_session(idle_seconds=50.0)
    assert seconds_until_eligible(held_back, [CROWDED], reaper=REAPER, facts=crowded) is None
    # A plain policy beside it still schedules as before.
    plain = make_policy("idle", max_idle="60s")
    assert seconds_until_eligible(waiting, [CROWDED, plain], reaper=REAPER, facts=calm) == 59.6


def test_evaluate_applies_the_condition_but_not_the_allowance() -> None:
    session = make_session(idle_seconds=50.0)
    assert evaluate(session, [CROWDED], reaper=REAPER, facts=make_facts(used=14)).matched
    assert not evaluate(session, [CROWDED], reaper=REAPER, facts=make_facts(used=13)).matched


def test_pressure_held_per_policy() -> None:
    assert pressure_held(make_policy(max_idle="1s"), make_facts(used=20)) is None
    assert pressure_held(CROWDED, make_facts(used=14)) is True
    assert pressure_held(CROWDED, make_facts(used=13)) is False
    assert pressure_held(ROLE_CROWDED, make_facts(used=1, roles=ROLES)) is True
    scoped = make_policy(
        "scoped", max_idle="1s", when_role_connections_above="70%", users=["batch"]
    )
    assert pressure_held(scoped, make_facts(used=1, roles=ROLES)) is False
    assert pressure_held(ROLE_CROWDED, make_facts(used=1)) is False


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_metrics_record_connections_and_pressure() -> None:
    metrics = Metrics()
    facts = make_facts(used=16, reserved=2)
    report = SweepReport(
        server="primary",
        dry_run=False,
        duration_ms=1.0,
        facts=facts,
        pressure=(("crowded", True), ("role-crowded", False)),
    )
    metrics.record(report, policies=["crowded", "role-crowded", "idle"], finished_at=0.0)
    assert _sample(metrics, "pg_reaper_connections_used", server="primary") == 16
    assert _sample(metrics, "pg_reaper_connections_usable", server="primary") == 15
    assert _sample(metrics, "pg_reaper_pressure", server="primary", policy="crowded") == 1
    assert _sample(metrics, "pg_reaper_pressure", server="primary", policy="role-crowded") == 0
    assert _sample(metrics, "pg_reaper_pressure", server="primary", policy="idle") is None
    metrics.forget_server("primary", policies=["crowded", "role-crowded", "idle"])
    assert _sample(metrics, "pg_reaper_connections_used", server="primary") is None
    assert _sample(metrics, "pg_reaper_pressure", server="primary", policy="crowded") is None


# --- configuration -----------------------------------------------------------------------------


CONFIG = """
[[servers]]
name = "primary"
dsn = "host=/tmp dbname=postgres"

[[policies]]
name = "crowded"
max_idle = "1s"
"""


def _load(tmp_path: Path, extra: str) -> PolicyConfig:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG + extra, encoding="utf-8")
    return load_settings(path).policies[0]


@pytest.mark.parametrize(("text", "percent"), [('"80%"', 80), ('"1%"', 1), ('"100%"', 100)])
def test_percentages_from_1_to_100_are_accepted(tmp_path: Path, text: str, percent: int) -> None:
    policy = _load(
        tmp_path, f"when_connections_above = {text}\nwhen_role_connections_above = {text}"
    )
    assert policy.when_connections_above == percent
    assert policy.pressure == {
        "when_connections_above": percent,
        "when_role_connections_above": percent,
    }
    # check-config prints it back as it was written.
    assert policy.model_dump(mode="json")["when_connections_above"] == f"{percent}%"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('"120%"', "invalid percentage '120%': must be from '1%' to '100%'"),
        ('"0%"', "invalid percentage '0%': must be from '1%' to '100%'"),
        ('"abc"', "invalid percentage 'abc': use a whole percentage from '1%' to '100%'"),
        ('"80.5%"', "invalid percentage '80.5%': use a whole percentage"),
        ('"80"', "invalid percentage '80': write the % sign, as in '80%'"),
        ("80", "invalid percentage 80: write it as a string such as '80%'"),
        ("0.8", "invalid percentage 0.8: write it as a string such as '80%'"),
    ],
)
def test_bad_percentages_are_errors_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    for key in ("when_connections_above", "when_role_connections_above"):
        with pytest.raises(ConfigError) as caught:
            _load(tmp_path, f"{key} = {text}")
        [problem] = caught.value.problems
        assert problem.startswith(f"policies[0].{key}: {message}")


def test_a_pressure_policy_cannot_cancel(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        CONFIG.replace('max_idle = "1s"', 'states = ["active"]\nmax_runtime = "1m"')
        + 'action = "cancel"\nwhen_connections_above = "80%"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == (
        (
            "policies[0]: when_connections_above needs action 'terminate' (or 'log'): "
            "cancelling a query frees no connection"
        ),
    )


def test_a_pressure_policy_still_needs_a_threshold(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        CONFIG.replace('max_idle = "1s"', 'when_connections_above = "80%"'), encoding="utf-8"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems[0].startswith("policies[0]: needs at least one of max_idle")


# --- against a real server: 20 connections, 3 reserved for superusers, 17 usable --------------

ADMIN = "pytest-admin"  # the suite's own session (TestServer.admin): protected, but it counts


@pytest.fixture(scope="module")
def small(pg_major: int) -> Iterator[TestServer]:
    """A server of this module's own, so that its connection counts are known exactly."""
    with EmbeddedPostgres(major=pg_major, settings={"max_connections": "20"}) as embedded:
        server = TestServer(
            major=pg_major, admin_conninfo=embedded.dsn(), has_socket=True, embedded=embedded
        )
        try:
            yield server
        finally:
            server.close()


@pytest.fixture
def crowd(small: TestServer) -> Iterator[Sessions]:
    wait_for(lambda: client_backends(small) == 1, what="the server to be empty but for us")
    opened = Sessions(small)
    yield opened
    opened.close()


def settled_count(server: TestServer, expected: int, *, timeout: float = 5.0) -> int:
    """The server's count of client backends once it stops changing toward `expected`: a
    backend leaves pg_stat_activity a moment after its client has disconnected."""
    deadline = time.monotonic() + timeout
    count = client_backends(server)
    while count != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        count = client_backends(server)
    return count


def client_backends(server: TestServer, *, user: str | None = None) -> int:
    """The server's own count of client backends (the suite's admin session included)."""
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        " AND (%(user)s::text IS NULL OR usename = %(user)s)",
        {"user": user},
    )
    return int(rows[0][0])


def open_in_order(crowd: Sessions, count: int, **kwargs: Any) -> list[int]:
    """`count` idle sessions, each idle a little longer than the next: oldest first."""
    opened = []
    for _ in range(count):
        opened.append(crowd.idle(**kwargs).info.backend_pid)
        time.sleep(0.05)
    return opened


def write_config(tmp_path: Path, server: TestServer, policy: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[reaper]
protect_applications = ["^{ADMIN}$"]

[log]
format = "json"

[[servers]]
name = "small"
dsn = "{server.admin_conninfo}"

[[policies]]
name = "crowded"
max_idle = "1s"
{policy}
""",
        encoding="utf-8",
    )
    return path


def run_once(capsys: pytest.CaptureFixture[str], config: Path) -> dict[int, dict[str, Any]]:
    code = main(["once", "-c", str(config), "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0, document
    return {d["pid"]: d for server in document["servers"] for d in server["decisions"]}


@pytest.mark.integration
def test_the_poll_counts_client_sessions_and_usable_slots_as_the_server_does(
    small: TestServer, crowd: Sessions, tmp_path: Path
) -> None:
    open_in_order(crowd, 3, application="filler")
    small.execute("DROP ROLE IF EXISTS limited")
    small.execute("CREATE ROLE limited LOGIN CONNECTION LIMIT 5")
    open_in_order(crowd, 2, user="limited")
    settings = load_settings(write_config(tmp_path, small, ""))
    with connect(settings.servers[0], settings) as conn:
        snapshot = conn.poll()
        on_server = client_backends(small)  # while the reaper is still connected
    facts = snapshot.facts
    assert (facts.max_connections, facts.superuser_reserved_connections) == (20, 3)
    assert facts.reserved_connections == 0
    assert facts.usable_connections == 17
    # 3 fillers, 2 of `limited`, the suite's admin session and the reaper's own.
    assert facts.client_sessions == on_server == 7
    # Only roles whose limit applies: not the superuser, whatever its rolconnlimit.
    assert facts.roles == (RoleConnections(role="limited", limit=5, sessions=2),)


@pytest.mark.integration
def test_once_reaps_nothing_at_half_and_exactly_down_to_80_percent_at_95(
    small: TestServer, crowd: Sessions, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, small, 'when_connections_above = "80%"')
    first = open_in_order(crowd, 7, application="filler")
    time.sleep(1.1)  # every filler is past max_idle: only the pressure condition holds them

    # 7 fillers, the admin session and the reaper's own: 9 of 17 (53%), not above 13.
    assert run_once(capsys, config) == {}
    assert settled_count(small, 8) == 8  # `once` has left: its backend exits just after

    later = open_in_order(crowd, 7, application="filler")
    time.sleep(1.1)
    # 14 fillers + admin + reaper: 16 of 17 (94%); 16 - floor(17 * 0.8) = 3 victims.
    decided = run_once(capsys, config)

    victims = first[:3]
    assert sorted(decided) == sorted(victims), "the three oldest idle sessions"
    for pid in victims:
        assert decided[pid]["result"] == "terminated"
        assert decided[pid]["policy"] == "crowded"
        assert "connections 16/17 > when_connections_above 80% (13)" in decided[pid]["reason"]
        assert small.wait_gone(pid)
    for pid in [*first[3:], *later]:
        assert small.is_alive(pid)
    # The server's own view: 13 client backends while the reaper was connected; it has left.
    assert client_backends(small) + 1 == 13


@pytest.mark.integration
def test_once_reaps_a_role_down_to_its_share_of_its_connection_limit(
    small: TestServer, crowd: Sessions, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small.execute("DROP ROLE IF EXISTS crowd_role")
    small.execute("CREATE ROLE crowd_role LOGIN CONNECTION LIMIT 20")
    config = write_config(tmp_path, small, 'when_role_connections_above = "70%"')
    limited = open_in_order(crowd, 10, user="crowd_role")  # trusted over the Unix socket
    superuser = open_in_order(crowd, 2, application="superuser")
    time.sleep(1.1)

    # 10 of 20 (50%) is not above 70% (14): nothing. A superuser is never under role pressure.
    assert run_once(capsys, config) == {}

    # The limit applies at once, to the next poll: 10 of 10, down to floor(10 * 0.7) = 7.
    small.execute("ALTER ROLE crowd_role CONNECTION LIMIT 10")
    decided = run_once(capsys, config)

    assert sorted(decided) == sorted(limited[:3]), "the three oldest idle sessions of the role"
    for pid in limited[:3]:
        assert decided[pid]["result"] == "terminated"
        assert (
            "role 'crowd_role' connections 10/10 > when_role_connections_above 70% (7)"
            in decided[pid]["reason"]
        )
        assert small.wait_gone(pid)
    assert client_backends(small, user="crowd_role") == 7
    for pid in [*limited[3:], *superuser]:
        assert small.is_alive(pid)


@pytest.mark.integration
def test_reserved_connections_are_not_usable_on_16_and_later(pg_major: int, tmp_path: Path) -> None:
    if pg_major < 16:
        pytest.skip("reserved_connections exists from PostgreSQL 16 on")
    settings = {"max_connections": "20", "reserved_connections": "2"}
    with EmbeddedPostgres(major=pg_major, settings=settings) as embedded:
        server = TestServer(major=pg_major, admin_conninfo=embedded.dsn(), has_socket=True)
        config = load_settings(write_config(tmp_path, server, ""))
        with connect(config.servers[0], config) as conn:
            facts = conn.poll().facts
    assert (facts.max_connections, facts.superuser_reserved_connections) == (20, 3)
    assert facts.reserved_connections == 2
    assert facts.usable_connections == 15


def parallel_query(crowd: Sessions, major: int) -> None:
    """A superuser's query run by a parallel worker (a backend of its own, no client slot)."""
    forced = "debug_parallel_query" if major >= 16 else "force_parallel_mode"
    crowd.active(
        seconds=30,
        application="parallel",
        extra=f"options='-c {forced}=on -c parallel_setup_cost=0 -c parallel_tuple_cost=0'",
    )
    wait_for(
        lambda: bool(
            crowd.server.execute(
                "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'parallel worker'"
            )
        ),
        what="a parallel worker",
    )


@pytest.mark.integration
def test_a_parallel_worker_is_not_counted_as_a_client_session(
    pg_major: int, small: TestServer, crowd: Sessions, tmp_path: Path
) -> None:
    parallel_query(crowd, pg_major)
    open_in_order(crowd, 3, application="filler")
    settings = load_settings(write_config(tmp_path, small, ""))
    with connect(settings.servers[0], settings) as conn:
        snapshot = conn.poll()
        on_server = client_backends(small)
    # 3 fillers, the parallel query's leader, the admin session and the reaper's own.
    assert snapshot.facts.client_sessions == on_server == 6


@pytest.mark.integration
def test_without_pg_read_all_stats_pressure_policies_do_not_act(
    pg_major: int,
    small: TestServer,
    crowd: Sessions,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    small.execute("DROP ROLE IF EXISTS blind_reaper")
    small.execute("CREATE ROLE blind_reaper LOGIN")
    small.execute("GRANT pg_signal_backend TO blind_reaper")
    parallel_query(crowd, pg_major)  # another role's: hidden from the reaper, like its worker
    own = open_in_order(crowd, 14, user="blind_reaper")  # its own role's: visible to it
    time.sleep(1.1)
    config = write_config(tmp_path, small, 'when_connections_above = "80%"')
    config.write_text(
        config.read_text(encoding="utf-8").replace(
            small.admin_conninfo, small.dsn(user="blind_reaper")
        ),
        encoding="utf-8",
    )

    # 14 + the parallel query + admin + reaper: 17 clients of 17 usable, and a hidden worker.
    code = main(["once", "-c", str(config), "--json"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["servers"][0]["decisions"] == []
    assert all(small.is_alive(pid) for pid in own)
    assert "nor count connections for pressure policies" in captured.err
