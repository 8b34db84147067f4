"""Unit and property tests of reaper/policy.py, the pure policy engine (no database, no clock)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, reject
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from reaper import APPLICATION_NAME
from reaper.policy import (
    CLIENT_BACKEND,
    Decision,
    Plan,
    Rule,
    ServerFacts,
    Session,
    can_signal,
    evaluate,
    plan,
)
from reaper.settings import ACTIVE_STATES, ALL_STATES, IDLE_STATES, PolicyConfig, ReaperSection

OWN_PID = 4242
EPOCH = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)

FACTS = ServerFacts(
    own_pid=OWN_PID,
    role="pg_reaper",
    superuser=False,
    signal_backend=True,
    read_all_stats=True,
    server_version_num=170_000,
)
REAPER = ReaperSection.model_validate({})


# --- helpers -----------------------------------------------------------------------------------


def make_session(
    *,
    pid: int = 1000,
    backend_type: str = CLIENT_BACKEND,
    database: str | None = "app",
    user: str | None = "app",
    application: str = "web",
    client_addr: str | None = "10.1.2.3",
    state: str | None = "idle",
    idle_seconds: float | None = 10.0,
    transaction_seconds: float | None = None,
    runtime_seconds: float | None = 12.0,
    connection_seconds: float | None = 600.0,
    superuser: bool = False,
    member: bool = False,
    signaller: bool = False,
    query: str | None = None,
    blocking: tuple[int, ...] = (),
    lock_wait_seconds: float | None = None,
) -> Session:
    """A client session with sensible defaults: an idle web app connection from 10.1.2.3."""
    return Session(
        pid=pid,
        backend_type=backend_type,
        database=database,
        user=user,
        application=application,
        client_addr=client_addr,
        state=state,
        backend_start=EPOCH,
        state_change=EPOCH,
        idle_seconds=idle_seconds,
        transaction_seconds=transaction_seconds,
        runtime_seconds=runtime_seconds,
        connection_seconds=connection_seconds,
        superuser=superuser,
        member=member,
        signaller=signaller,
        query=query,
        blocking=blocking,
        lock_wait_seconds=lock_wait_seconds,
    )


def make_policy(name: str = "idle", **fields: Any) -> PolicyConfig:
    return PolicyConfig.model_validate({"name": name, **fields})


def make_reaper(**fields: Any) -> ReaperSection:
    return ReaperSection.model_validate(fields)


def make_facts(
    *, superuser: bool = False, signal_backend: bool = True, own_pid: int = OWN_PID
) -> ServerFacts:
    return ServerFacts(
        own_pid=own_pid,
        role="pg_reaper",
        superuser=superuser,
        signal_backend=signal_backend,
        read_all_stats=True,
        server_version_num=170_000,
    )


def decide(
    session: Session,
    *policies: PolicyConfig,
    reaper: ReaperSection = REAPER,
    facts: ServerFacts = FACTS,
) -> Decision:
    return evaluate(session, policies, reaper=reaper, facts=facts)


def pids(decisions: tuple[Decision, ...]) -> list[int]:
    return [d.session.pid for d in decisions]


IDLE_60S = make_policy(max_idle="60s")
# Matches every state a policy may list, once connected for more than a second.
CATCH_ALL = make_policy("catch-all", states=list(ALL_STATES), max_connection_age=1)


# --- thresholds --------------------------------------------------------------------------------


def test_idle_session_past_max_idle_matches_with_a_reason_naming_the_threshold() -> None:
    decision = decide(make_session(idle_seconds=61.0), IDLE_60S)
    assert decision.matched
    assert decision.policy == Rule.of(IDLE_60S)
    assert decision.reason == "idle 61s > max_idle 60s"


@pytest.mark.parametrize("idle_seconds", [0.0, 30.0, 59.999, 60.0])
def test_idle_session_at_or_under_max_idle_does_not_match(idle_seconds: float) -> None:
    decision = decide(make_session(idle_seconds=idle_seconds), IDLE_60S)
    assert not decision.matched
    assert decision.policy is None
    assert decision.reason == "idle: under every threshold"


def test_max_idle_is_strictly_greater_than_just_past_the_limit() -> None:
    assert decide(make_session(idle_seconds=60.001), IDLE_60S).matched


def test_idle_age_is_time_in_state_not_time_since_the_last_query_started() -> None:
    # A 20-minute query that just finished: its query_start is an hour old, state_change is not.
    session = make_session(idle_seconds=1.0, runtime_seconds=3600.0, connection_seconds=7200.0)
    decision = decide(session, IDLE_60S)
    assert not decision.matched
    assert decision.reason == "idle: under every threshold"


def test_idle_session_without_a_state_change_time_is_not_matched_by_max_idle() -> None:
    assert not decide(make_session(idle_seconds=None), IDLE_60S).matched


@pytest.mark.parametrize("state", IDLE_STATES)
def test_each_default_state_matches_a_default_policy(state: str) -> None:
    policy = make_policy(max_idle=60)
    assert policy.states == IDLE_STATES
    decision = decide(make_session(state=state, idle_seconds=120.0), policy)
    assert decision.matched
    assert decision.policy == Rule.of(policy)


@pytest.mark.parametrize("state", ["active", "fastpath function call", "disabled"])
def test_states_outside_the_default_set_are_not_matched_by_a_default_policy(state: str) -> None:
    decision = decide(make_session(state=state, idle_seconds=99_999.0), make_policy(max_idle=60))
    assert not decision.matched
    assert decision.reason == f"idle: state {state!r} not in states"


def test_policy_limited_to_idle_does_not_match_idle_in_transaction() -> None:
    policy = make_policy(states=["idle"], max_idle=60)
    assert decide(make_session(state="idle", idle_seconds=61.0), policy).matched
    assert not decide(make_session(state="idle in transaction", idle_seconds=61.0), policy).matched


def test_max_runtime_on_an_active_session_uses_runtime_seconds() -> None:
    policy = make_policy("runaway", states=["active"], max_runtime="30m")
    long_query = make_session(state="active", runtime_seconds=1801.0, idle_seconds=1801.0)
    decision = decide(long_query, policy)
    assert decision.matched
    assert decision.reason == "running 1801s > max_runtime 1800s"
    # Time in the active state does not count as runtime: only query_start does.
    short_query = make_session(state="active", runtime_seconds=1800.0, idle_seconds=99_999.0)
    assert not decide(short_query, policy).matched


def test_max_runtime_does_not_match_an_idle_session_by_its_last_query_start() -> None:
    # The config accepts max_runtime with 'idle' in states as long as 'active' is listed too.
    policy = make_policy("runaway", states=["active", "idle"], max_runtime="30m")
    just_finished = make_session(state="idle", idle_seconds=1.0, runtime_seconds=3600.0)
    assert not decide(just_finished, policy).matched


def test_max_transaction_age_uses_transaction_seconds() -> None:
    policy = make_policy("stuck", states=["idle in transaction"], max_transaction_age="1h")
    old = make_session(state="idle in transaction", idle_seconds=5.0, transaction_seconds=3601.0)
    decision = decide(old, policy)
    assert decision.matched
    assert decision.reason == "in transaction 3601s > max_transaction_age 3600s"
    young = make_session(state="idle in transaction", idle_seconds=5.0, transaction_seconds=3600.0)
    assert not decide(young, policy).matched


def test_max_transaction_age_is_not_exceeded_without_a_transaction() -> None:
    policy = make_policy("stuck", max_transaction_age=1)
    session = make_session(
        transaction_seconds=None, idle_seconds=99_999.0, connection_seconds=99_999.0
    )
    decision = decide(session, policy)
    assert not decision.matched
    assert decision.reason == "stuck: under every threshold"


def test_max_connection_age_uses_connection_seconds() -> None:
    policy = make_policy("recycle", max_connection_age="1h")
    decision = decide(make_session(connection_seconds=3601.0, idle_seconds=1.0), policy)
    assert decision.matched
    assert decision.reason == "connected 3601s > max_connection_age 3600s"
    assert not decide(make_session(connection_seconds=3600.0, idle_seconds=1.0), policy).matched


def test_max_connection_age_applies_to_active_sessions_too() -> None:
    policy = make_policy("recycle", states=["active"], max_connection_age="1h")
    session = make_session(state="active", connection_seconds=3601.0, runtime_seconds=1.0)
    assert decide(session, policy).matched


def test_any_one_threshold_exceeded_matches() -> None:
    policy = make_policy(
        "stuck",
        states=["idle in transaction"],
        max_idle="5m",
        max_transaction_age="1h",
        max_connection_age="1d",
    )
    base: dict[str, Any] = {
        "state": "idle in transaction",
        "idle_seconds": 10.0,
        "transaction_seconds": 20.0,
        "connection_seconds": 30.0,
    }
    assert not decide(make_session(**base), policy).matched
    for key, value in (
        ("idle_seconds", 301.0),
        ("transaction_seconds", 3601.0),
        ("connection_seconds", 86_401.0),
    ):
        decision = decide(make_session(**{**base, key: value}), policy)
        assert decision.matched, key
        assert decision.reason.count(">") == 1


def test_several_thresholds_exceeded_are_all_named_in_the_reason() -> None:
    policy = make_policy("stuck", max_idle="5m", max_transaction_age="1h")
    session = make_session(
        state="idle in transaction", idle_seconds=301.0, transaction_seconds=3601.0
    )
    decision = decide(session, policy)
    assert (
        decision.reason
        == "idle 301s > max_idle 300s, in transaction 3601s > max_transaction_age 3600s"
    )


def test_reason_shows_tenths_under_ten_seconds() -> None:
    decision = decide(make_session(idle_seconds=2.25), make_policy(max_idle=2))
    assert decision.reason == "idle 2.25s > max_idle 2s"


# --- scope: databases, users, applications, client addresses ---------------------------------


def test_databases_list_matches_exactly() -> None:
    policy = make_policy(max_idle=60, databases=["app"])
    assert decide(make_session(database="app", idle_seconds=61.0), policy).matched
    other = decide(make_session(database="app2", idle_seconds=61.0), policy)
    assert not other.matched
    assert other.reason == "idle: database not listed"
    assert not decide(make_session(database=None, idle_seconds=61.0), policy).matched


def test_exclude_databases_leaves_out_exactly_those() -> None:
    policy = make_policy(max_idle=60, exclude_databases=["app"])
    excluded = decide(make_session(database="app", idle_seconds=61.0), policy)
    assert not excluded.matched
    assert excluded.reason == "idle: database excluded"
    assert decide(make_session(database="app2", idle_seconds=61.0), policy).matched


def test_users_list_matches_exactly() -> None:
    policy = make_policy(max_idle=60, users=["app"])
    assert decide(make_session(user="app", idle_seconds=61.0), policy).matched
    other = decide(make_session(user="application", idle_seconds=61.0), policy)
    assert not other.matched
    assert other.reason == "idle: user not listed"
    assert not decide(make_session(user="ap", idle_seconds=61.0), policy).matched


def test_exclude_users_leaves_out_exactly_those() -> None:
    policy = make_policy(max_idle=60, exclude_users=["app"])
    excluded = decide(make_session(user="app", idle_seconds=61.0), policy)
    assert not excluded.matched
    assert excluded.reason == "idle: user excluded"
    assert decide(make_session(user="app2", idle_seconds=61.0), policy).matched


@pytest.mark.parametrize(
    ("application", "matched"),
    [("psql", True), ("psql2", False), ("my psql", False), ("", False)],
)
def test_anchored_applications_regex_matches_only_the_whole_name(
    application: str, *, matched: bool
) -> None:
    policy = make_policy(max_idle=60, applications=["^psql$"])
    assert decide(make_session(application=application, idle_seconds=61.0), policy).matched is (
        matched
    )


@pytest.mark.parametrize(
    ("application", "matched"),
    [("psql", True), ("psql2", True), ("my psql client", True), ("pgAdmin", False)],
)
def test_unanchored_applications_regex_searches_anywhere_in_the_name(
    application: str, *, matched: bool
) -> None:
    policy = make_policy(max_idle=60, applications=["psql"])
    assert decide(make_session(application=application, idle_seconds=61.0), policy).matched is (
        matched
    )


@pytest.mark.parametrize(
    ("application", "excluded"),
    [("psql", True), ("psql2", False), ("pgAdmin 4", True), ("my pgAdmin", False)],
)
def test_exclude_applications_uses_regex_search(application: str, *, excluded: bool) -> None:
    policy = make_policy(max_idle=60, exclude_applications=["^psql$", "^pgAdmin"])
    decision = decide(make_session(application=application, idle_seconds=61.0), policy)
    assert decision.matched is not excluded
    if excluded:
        assert decision.reason == "idle: application excluded"


@pytest.mark.parametrize(
    ("client_addr", "matched"),
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("2001:db8::1", True),
        ("2001:db9::1", False),
        ("::1", False),
        (None, False),
    ],
)
def test_client_addrs_match_ipv4_and_ipv6_cidrs(client_addr: str | None, *, matched: bool) -> None:
    policy = make_policy(max_idle=60, client_addrs=["10.0.0.0/8", "2001:db8::/32"])
    decision = decide(make_session(client_addr=client_addr, idle_seconds=61.0), policy)
    assert decision.matched is matched
    if not matched:
        assert decision.reason == "idle: client address not listed"


@pytest.mark.parametrize(("client_addr", "matched"), [(None, True), ("127.0.0.1", False)])
def test_local_client_addr_means_a_unix_socket_session_only(
    client_addr: str | None, *, matched: bool
) -> None:
    policy = make_policy(max_idle=60, client_addrs=["local"])
    decision = decide(make_session(client_addr=client_addr, idle_seconds=61.0), policy)
    assert decision.matched is matched


@pytest.mark.parametrize(
    ("client_addr", "excluded"),
    [(None, True), ("10.1.2.3", True), ("::1", True), ("192.168.1.1", False), ("::2", False)],
)
def test_exclude_client_addrs_leaves_out_cidrs_and_local(
    client_addr: str | None, *, excluded: bool
) -> None:
    policy = make_policy(max_idle=60, exclude_client_addrs=["local", "10.0.0.0/8", "::1/128"])
    decision = decide(make_session(client_addr=client_addr, idle_seconds=61.0), policy)
    assert decision.matched is not excluded
    if excluded:
        assert decision.reason == "idle: client address excluded"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"databases": ["app"], "exclude_databases": ["app"]}, "database excluded"),
        ({"users": ["app"], "exclude_users": ["app"]}, "user excluded"),
        ({"applications": ["web"], "exclude_applications": ["^web$"]}, "application excluded"),
        (
            {"client_addrs": ["10.0.0.0/8"], "exclude_client_addrs": ["10.1.0.0/16"]},
            "client address excluded",
        ),
    ],
)
def test_exclusions_win_over_inclusions(fields: dict[str, Any], reason: str) -> None:
    policy = make_policy(max_idle=60, **fields)
    decision = decide(make_session(idle_seconds=61.0), policy)
    assert not decision.matched
    assert decision.reason == f"idle: {reason}"


# --- when_blocking -----------------------------------------------------------------------------

BLOCKERS = make_policy("blockers", states=["idle in transaction"], when_blocking="30s")


def blocker(**fields: Any) -> Session:
    """An idle-in-transaction session, idle 10 s, in a transaction for 20 s."""
    defaults: dict[str, Any] = {
        "state": "idle in transaction",
        "idle_seconds": 10.0,
        "transaction_seconds": 20.0,
    }
    return make_session(**{**defaults, **fields})


def test_a_session_blocking_a_lock_wait_past_when_blocking_matches_naming_the_waiters() -> None:
    decision = decide(blocker(blocking=(4243, 4242), lock_wait_seconds=42.4), BLOCKERS)
    assert decision.matched
    assert decision.reason == "blocks pids 4243, 4242; longest lock wait 42s >= when_blocking 30s"


def test_a_wait_of_exactly_when_blocking_is_enough() -> None:
    decision = decide(blocker(blocking=(7,), lock_wait_seconds=30.0), BLOCKERS)
    assert decision.matched
    assert decision.reason == "blocks pid 7; longest lock wait 30s >= when_blocking 30s"


def test_a_session_that_blocks_nobody_is_spared_by_when_blocking() -> None:
    decision = decide(blocker(idle_seconds=3600.0, transaction_seconds=3600.0), BLOCKERS)
    assert not decision.matched
    assert decision.reason == "blockers: blocks no backend"


def test_a_waiter_that_waited_less_than_when_blocking_does_not_make_its_blocker_match() -> None:
    decision = decide(blocker(blocking=(7, 8), lock_wait_seconds=29.5), BLOCKERS)
    assert not decision.matched
    assert (
        decision.reason == "blockers: blocks pids 7, 8; longest lock wait 29s < when_blocking 30s"
    )
    fresh = decide(blocker(blocking=(7,), lock_wait_seconds=0.0), BLOCKERS)
    assert not fresh.matched


def test_when_blocking_is_scoped_by_states_and_the_other_filters() -> None:
    blocking: dict[str, Any] = {"blocking": (7,), "lock_wait_seconds": 60.0}
    assert not decide(make_session(state="active", **blocking), BLOCKERS).matched
    assert not decide(make_session(state="idle", **blocking), BLOCKERS).matched
    scoped = make_policy(
        "blockers", states=["idle in transaction"], when_blocking=30, exclude_users=["batch"]
    )
    assert decide(blocker(user="app", **blocking), scoped).matched
    assert not decide(blocker(user="batch", **blocking), scoped).matched


def test_with_an_age_threshold_when_blocking_must_hold_too() -> None:
    # "Idle in transaction for 5 minutes AND blocking someone for 30 s": the two together;
    # either alone is two policies (the first match wins).
    both = make_policy(
        "blockers", states=["idle in transaction"], max_idle="5m", when_blocking="30s"
    )
    blocks: dict[str, Any] = {"blocking": (7,), "lock_wait_seconds": 60.0}
    assert not decide(blocker(idle_seconds=60.0, **blocks), both).matched
    assert decide(blocker(idle_seconds=60.0, **blocks), both).reason == (
        "blockers: under every threshold"
    )
    assert not decide(blocker(idle_seconds=600.0), both).matched
    matched = decide(blocker(idle_seconds=600.0, **blocks), both)
    assert matched.matched
    assert matched.reason == (
        "idle 600s > max_idle 300s, blocks pid 7; longest lock wait 60s >= when_blocking 30s"
    )


def test_a_reason_names_at_most_ten_blocked_pids() -> None:
    decision = decide(blocker(blocking=tuple(range(100, 125)), lock_wait_seconds=31.0), BLOCKERS)
    assert decision.reason.startswith(
        "blocks pids 100, 101, 102, 103, 104, 105, 106, 107, 108, 109 and 15 more;"
    )


def test_a_decision_of_a_when_blocking_policy_carries_its_threshold() -> None:
    decision = decide(blocker(blocking=(7,), lock_wait_seconds=31.0), BLOCKERS)
    assert decision.policy == Rule(
        name="blockers", action="terminate", when_blocking=timedelta(seconds=30)
    )


def test_seconds_until_a_blocker_is_eligible_is_what_its_longest_waiter_lacks() -> None:
    from reaper.policy import seconds_until_eligible  # noqa: PLC0415

    def until(session: Session, *policies: PolicyConfig) -> float | None:
        return seconds_until_eligible(session, policies, reaper=REAPER, facts=FACTS)

    assert until(blocker(blocking=(7,), lock_wait_seconds=12.0), BLOCKERS) == 18.0
    # Nobody waits for it: it may block someone at any time, which the interval bounds.
    assert until(blocker(), BLOCKERS) is None
    both = make_policy("both", states=["idle in transaction"], max_idle=100, when_blocking=30)
    # Both must hold: the later of the two.
    assert until(blocker(idle_seconds=10.0, blocking=(7,), lock_wait_seconds=12.0), both) == 90.0
    assert until(blocker(idle_seconds=90.0, blocking=(7,), lock_wait_seconds=12.0), both) == 18.0


# --- last-query filters ------------------------------------------------------------------------

LISTENERS_SPARED = make_policy("idle", max_idle=60, exclude_queries=[r"^\s*LISTEN"])


@pytest.mark.parametrize(
    ("query", "matched"),
    [
        ("LISTEN orders", False),
        ("  listen orders", True),  # regexes are case-sensitive, as everywhere in the file
        ("\n\tLISTEN orders", False),
        ("SELECT 1", True),
        ("", True),  # a session that never ran a statement
    ],
)
def test_exclude_queries_spares_sessions_whose_last_query_matches(
    query: str, *, matched: bool
) -> None:
    decision = decide(make_session(idle_seconds=3600.0, query=query), LISTENERS_SPARED)
    assert decision.matched is matched
    if not matched:
        assert decision.reason == "idle: last query excluded"


def test_queries_matches_only_sessions_whose_last_query_matches() -> None:
    reports = make_policy("reports", max_idle=60, queries=["^SELECT .* FROM report_"])
    assert decide(make_session(idle_seconds=61.0, query="SELECT * FROM report_q3"), reports).matched
    miss = decide(make_session(idle_seconds=61.0, query="SELECT * FROM orders"), reports)
    assert not miss.matched
    assert miss.reason == "reports: last query not listed"


@pytest.mark.parametrize("query", [None, "<insufficient privilege>"])
@pytest.mark.parametrize(
    "filters", [{"queries": ["."]}, {"exclude_queries": ["^LISTEN"]}, {"queries": ["^$|."]}]
)
def test_a_last_query_the_reaper_cannot_read_is_never_killed_by_a_query_filter(
    query: str | None, filters: dict[str, Any]
) -> None:
    policy = make_policy("idle", max_idle=60, **filters)
    decision = decide(make_session(idle_seconds=3600.0, query=query), policy)
    assert not decision.matched
    assert decision.reason == (
        "idle: last query not visible to the reaper's role (pg_read_all_stats?)"
    )


def test_a_policy_without_query_filters_does_not_look_at_the_query() -> None:
    assert decide(make_session(idle_seconds=61.0, query=None), IDLE_60S).matched


def test_the_query_text_is_never_in_a_reason_nor_in_a_sessions_repr() -> None:
    secret = "SELECT 'card 4111 1111 1111 1111'"
    session = make_session(idle_seconds=61.0, query=secret)
    for policy in (
        make_policy("q", max_idle=60, queries=["card"]),
        make_policy("q", max_idle=60, queries=["nothing"]),
        make_policy("q", max_idle=60, exclude_queries=["card"]),
    ):
        decision = decide(session, policy)
        assert "4111" not in decision.reason
        assert "4111" not in repr(decision)


# --- policy order ------------------------------------------------------------------------------


def test_a_decision_carries_what_acting_on_it_needs_of_its_policy() -> None:
    runaway = make_policy(
        "runaway", states=["active"], max_runtime=60, action="cancel", escalate_after=30
    )
    decision = decide(make_session(state="active", runtime_seconds=61.0), runaway)
    assert decision.policy == Rule(
        name="runaway", action="cancel", escalate_after=timedelta(seconds=30)
    )
    assert decide(make_session(idle_seconds=61.0), IDLE_60S).policy == Rule(
        name="idle", action="terminate", escalate_after=None, when_blocking=None
    )


def test_first_matching_policy_names_the_session_even_if_a_later_one_matches() -> None:
    first = make_policy("first", max_idle=60)
    second = make_policy("second", max_idle=30, action="log")
    session = make_session(idle_seconds=120.0)
    assert decide(session, first, second).policy == Rule.of(first)
    assert decide(session, second, first).policy == Rule.of(second)


def test_a_later_policy_names_the_session_when_earlier_ones_do_not_match() -> None:
    scoped = make_policy("scoped", max_idle=60, users=["batch"])
    broad = make_policy("broad", max_idle=60)
    decision = decide(make_session(idle_seconds=120.0), scoped, broad)
    assert decision.policy == Rule.of(broad)


def test_unmatched_session_reason_lists_every_policy_miss() -> None:
    scoped = make_policy("scoped", max_idle=60, users=["batch"])
    broad = make_policy("broad", max_idle=600)
    decision = decide(make_session(idle_seconds=120.0), scoped, broad)
    assert decision.reason == "scoped: user not listed; broad: under every threshold"


def test_no_policies_match_nothing() -> None:
    decision = decide(make_session(idle_seconds=99_999.0))
    assert not decision.matched
    assert decision.reason == "no policy"


# --- hard rules no policy overrides --------------------------------------------------------------


@pytest.mark.parametrize(
    "backend_type",
    [
        "walsender",
        "autovacuum worker",
        "autovacuum launcher",
        "background worker",
        "parallel worker",
        "logical replication worker",
        "checkpointer",
        "",
    ],
)
def test_non_client_backends_are_never_matched(backend_type: str) -> None:
    # A walsender shows state 'idle' between replication commands.
    session = make_session(backend_type=backend_type, idle_seconds=99_999.0)
    decision = decide(session, CATCH_ALL, make_policy(max_idle=1))
    assert not decision.matched
    assert decision.reason == f"not a client backend ({backend_type})"


def test_the_reapers_own_session_is_never_matched() -> None:
    decision = decide(make_session(pid=OWN_PID, idle_seconds=99_999.0), CATCH_ALL)
    assert not decision.matched
    assert decision.reason == "the reaper's own session"
    assert decide(make_session(pid=OWN_PID + 1, idle_seconds=99_999.0), CATCH_ALL).matched


@pytest.mark.parametrize(
    ("application", "signaller", "matched"),
    [
        (APPLICATION_NAME, True, False),
        ("pg-reaper2", True, True),
        # application_name is the client's to choose: a role that could not be a pg-reaper's
        # gets no immunity by taking the name.
        (APPLICATION_NAME, False, True),
    ],
)
def test_another_pg_reaper_session_is_never_matched(
    application: str, *, signaller: bool, matched: bool
) -> None:
    assert APPLICATION_NAME == "pg-reaper"
    session = make_session(application=application, idle_seconds=99_999.0, signaller=signaller)
    decision = decide(session, CATCH_ALL)
    assert decision.matched is matched
    if not matched:
        assert decision.reason == "another pg-reaper session"


def test_a_pg_reaper_session_is_spared_even_by_a_policy_listing_its_application() -> None:
    policy = make_policy(max_idle=1, applications=["^pg-reaper$"])
    session = make_session(application="pg-reaper", idle_seconds=99_999.0, signaller=True)
    assert not decide(session, policy).matched


def test_a_session_whose_state_is_not_visible_is_never_matched() -> None:
    decision = decide(make_session(state=None, idle_seconds=99_999.0), CATCH_ALL)
    assert not decision.matched
    assert decision.reason.startswith("state not visible")


def test_protected_users_are_never_matched() -> None:
    reaper = make_reaper(protect_users=["postgres", "admin"])
    policy = make_policy(max_idle=1, users=["postgres"])
    decision = decide(make_session(user="postgres", idle_seconds=99_999.0), policy, reaper=reaper)
    assert not decision.matched
    assert decision.reason == "protected user 'postgres'"
    # Exact names, not prefixes.
    assert decide(
        make_session(user="postgres2", idle_seconds=99_999.0), CATCH_ALL, reaper=reaper
    ).matched


@pytest.mark.parametrize(
    ("application", "protected"),
    [("psql", True), ("psql2", False), ("Airflow scheduler", True), ("web", False)],
)
def test_protected_applications_are_matched_by_regex_search(
    application: str, *, protected: bool
) -> None:
    reaper = make_reaper(protect_applications=["^psql$", "flow"])
    session = make_session(application=application, idle_seconds=99_999.0)
    decision = decide(session, CATCH_ALL, reaper=reaper)
    assert decision.matched is not protected
    if protected:
        assert decision.reason.startswith("protected application (matches ")


def test_disabled_state_is_matched_only_when_a_policy_lists_it() -> None:
    session = make_session(state="disabled", idle_seconds=None, connection_seconds=99_999.0)
    default = make_policy("default", max_connection_age=1)
    assert not decide(session, default).matched
    listing = make_policy("listing", states=["disabled"], max_connection_age=1)
    decision = decide(session, default, listing)
    assert decision.policy == Rule.of(listing)


# --- can_signal ----------------------------------------------------------------------------------


@pytest.mark.parametrize("session_superuser", [False, True])
@pytest.mark.parametrize("member", [False, True])
@pytest.mark.parametrize("signal_backend", [False, True])
def test_a_superuser_reaper_may_signal_every_session(
    *, session_superuser: bool, member: bool, signal_backend: bool
) -> None:
    session = make_session(superuser=session_superuser, member=member)
    assert can_signal(session, make_facts(superuser=True, signal_backend=signal_backend))


@pytest.mark.parametrize("member", [False, True])
@pytest.mark.parametrize("signal_backend", [False, True])
def test_a_non_superuser_reaper_never_signals_a_superusers_session(
    *, member: bool, signal_backend: bool
) -> None:
    session = make_session(superuser=True, member=member)
    assert not can_signal(session, make_facts(superuser=False, signal_backend=signal_backend))


@pytest.mark.parametrize(
    ("member", "signal_backend", "allowed"),
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
def test_a_non_superuser_reaper_needs_membership_or_pg_signal_backend(
    *, member: bool, signal_backend: bool, allowed: bool
) -> None:
    session = make_session(superuser=False, member=member)
    facts = make_facts(superuser=False, signal_backend=signal_backend)
    assert can_signal(session, facts) is allowed


# --- plan ----------------------------------------------------------------------------------------


def run_plan(
    sessions: list[Session],
    *policies: PolicyConfig,
    cap: int = 50,
    facts: ServerFacts = FACTS,
    **reaper_fields: Any,
) -> Plan:
    reaper = make_reaper(max_terminations_per_cycle=cap, **reaper_fields)
    return plan(sessions, policies, reaper=reaper, facts=facts)


def test_plan_orders_victims_oldest_idle_first() -> None:
    sessions = [
        make_session(pid=1, idle_seconds=100.0),
        make_session(pid=2, idle_seconds=300.0),
        make_session(pid=3, idle_seconds=None, connection_seconds=200.0),
        make_session(pid=4, idle_seconds=400.0, connection_seconds=401.0),
        make_session(pid=5, idle_seconds=70.0, connection_seconds=99_999.0),
    ]
    result = run_plan(sessions, make_policy(max_idle=60, max_connection_age=60))
    assert pids(result.signal) == [4, 2, 3, 1, 5]


def test_plan_breaks_ties_in_age_by_pid() -> None:
    sessions = [make_session(pid=p, idle_seconds=100.0) for p in (30, 10, 20)]
    assert pids(run_plan(sessions, IDLE_60S).signal) == [10, 20, 30]


def test_plan_caps_signals_and_defers_the_rest_in_the_same_order() -> None:
    sessions = [make_session(pid=p, idle_seconds=60.0 + p) for p in range(1, 8)]
    result = run_plan(sessions, IDLE_60S, cap=3)
    assert pids(result.signal) == [7, 6, 5]
    assert pids(result.deferred) == [4, 3, 2, 1]
    assert result.log == ()
    assert result.denied == ()


def test_plan_signals_everything_under_the_cap() -> None:
    sessions = [make_session(pid=p, idle_seconds=60.0 + p) for p in range(1, 4)]
    result = run_plan(sessions, IDLE_60S, cap=3)
    assert pids(result.signal) == [3, 2, 1]
    assert result.deferred == ()


def test_log_victims_do_not_count_against_the_cap() -> None:
    audit = make_policy("audit", max_idle=60, users=["audit"], action="log")
    sessions = [
        make_session(pid=1, user="audit", idle_seconds=500.0),
        make_session(pid=2, user="audit", idle_seconds=400.0),
        make_session(pid=3, idle_seconds=300.0),
        make_session(pid=4, idle_seconds=200.0),
        make_session(pid=5, user="audit", idle_seconds=100.0),
    ]
    result = run_plan(sessions, audit, IDLE_60S, cap=1)
    assert pids(result.log) == [1, 2, 5]
    assert pids(result.signal) == [3]
    assert pids(result.deferred) == [4]
    assert all(d.policy == Rule.of(audit) for d in result.log)


def test_sessions_the_reaper_may_not_signal_are_denied_and_do_not_count_against_the_cap() -> None:
    facts = make_facts(superuser=False, signal_backend=False)
    sessions = [
        make_session(pid=1, superuser=True, member=True, idle_seconds=500.0),
        make_session(pid=2, member=False, idle_seconds=400.0),
        make_session(pid=3, member=True, idle_seconds=300.0),
        make_session(pid=4, member=True, idle_seconds=200.0),
        make_session(pid=5, member=True, idle_seconds=100.0),
    ]
    result = run_plan(sessions, IDLE_60S, cap=2, facts=facts)
    assert pids(result.denied) == [1, 2]
    assert pids(result.signal) == [3, 4]
    assert pids(result.deferred) == [5]


def test_log_victims_are_logged_even_when_the_reaper_may_not_signal_them() -> None:
    facts = make_facts(superuser=False, signal_backend=False)
    session = make_session(superuser=True, idle_seconds=120.0)
    result = run_plan([session], make_policy(max_idle=60, action="log"), facts=facts)
    assert pids(result.log) == [session.pid]
    assert result.denied == ()


def test_candidates_are_every_matched_session_oldest_first() -> None:
    audit = make_policy("audit", max_idle=60, users=["audit"], action="log")
    facts = make_facts(superuser=False, signal_backend=True)
    sessions = [
        make_session(pid=1, idle_seconds=100.0),
        make_session(pid=2, user="audit", idle_seconds=600.0),
        make_session(pid=3, superuser=True, idle_seconds=300.0),
        make_session(pid=4, idle_seconds=50.0),  # under the threshold
        make_session(pid=5, idle_seconds=400.0),
        make_session(pid=6, backend_type="walsender", idle_seconds=900.0),
        make_session(pid=OWN_PID, idle_seconds=800.0),
        make_session(pid=7, idle_seconds=200.0),
    ]
    result = run_plan(sessions, audit, IDLE_60S, cap=1, facts=facts)
    assert pids(result.candidates) == [2, 5, 3, 7, 1]
    assert pids(result.log) == [2]
    assert pids(result.signal) == [5]
    assert pids(result.denied) == [3]
    assert pids(result.deferred) == [7, 1]
    assert sorted(pids(result.spared)) == [4, 6, OWN_PID]


def test_plan_of_no_sessions_is_empty() -> None:
    result = run_plan([], IDLE_60S)
    assert result == Plan()
    assert result.candidates == ()


# --- properties ----------------------------------------------------------------------------------

USERS = ("app", "admin", "postgres", "batch", None)
APPLICATIONS = ("web", "psql", "psql2", "my psql", "pgAdmin 4", "cron worker", "", APPLICATION_NAME)
DATABASES = ("app", "postgres", "analytics", None)
CLIENT_ADDRS = (None, "10.1.2.3", "10.9.9.9", "192.168.0.5", "::1", "2001:db8::7")
APPLICATION_REGEXES = ("^psql$", "psql", "admin", "^web", "work", "^$")
NETWORKS = ("10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "::1/128", "2001:db8::/32", "local")
OTHER_BACKENDS = (
    "walsender",
    "autovacuum worker",
    "autovacuum launcher",
    "background worker",
    "parallel worker",
    "checkpointer",
)
THRESHOLDS = ("max_idle", "max_runtime", "max_transaction_age", "max_connection_age")
# Last query texts, None and "<insufficient privilege>" being texts the reaper cannot read.
QUERIES = (None, "<insufficient privilege>", "", "LISTEN jobs", "  LISTEN jobs", "SELECT 1")
QUERY_REGEXES = (r"^\s*LISTEN", "LISTEN", "^SELECT", "^$", ".")

ages = st.none() | st.integers(0, 300).map(float) | st.floats(0, 300, allow_nan=False)


def _unique_subset(pool: tuple[Any, ...], max_size: int = 3) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.sampled_from(pool), max_size=max_size, unique=True)


# Everything of a session but its pid: pids are handed out in order, so they are unique.
session_fields: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {
        "backend_type": st.tuples(st.integers(0, 4), st.sampled_from(OTHER_BACKENDS)).map(
            lambda pick: CLIENT_BACKEND if pick[0] else pick[1]  # four in five
        ),
        "database": st.sampled_from(DATABASES),
        "user": st.sampled_from(USERS),
        "application": st.sampled_from(APPLICATIONS),
        "client_addr": st.sampled_from(CLIENT_ADDRS),
        "state": st.sampled_from((*ALL_STATES, None)),
        "idle_seconds": ages,
        "transaction_seconds": ages,
        "runtime_seconds": ages,
        "connection_seconds": ages,
        "superuser": st.booleans(),
        "member": st.booleans(),
        "signaller": st.booleans(),
        "query": st.sampled_from(QUERIES),
        "blocking": st.lists(st.integers(1, 99_999), max_size=3, unique=True).map(tuple),
        "lock_wait_seconds": ages,
    }
)


@st.composite
def sessions_and_facts(draw: st.DrawFn) -> tuple[list[Session], ServerFacts]:
    rows = draw(st.lists(session_fields, min_size=1, max_size=25))
    first_pid = draw(st.integers(1, 50_000))
    sessions = [
        Session(pid=first_pid + index, backend_start=EPOCH, state_change=EPOCH, **row)
        for index, row in enumerate(rows)
    ]
    facts = ServerFacts(
        own_pid=first_pid + draw(st.integers(0, len(rows) - 1)),  # one session is the reaper's
        role="pg_reaper",
        superuser=draw(st.booleans()),
        signal_backend=draw(st.booleans()),
        read_all_stats=True,
        server_version_num=170_000,
    )
    return draw(st.permutations(sessions)), facts


state_lists = st.lists(st.sampled_from(ALL_STATES), min_size=1, unique=True)
# Thresholds the config accepts with an active state in `states`, and without one.
accepted_thresholds = {
    has_active: st.lists(
        st.sampled_from(
            [t for t in THRESHOLDS if t != ("max_idle" if has_active else "max_runtime")]
        ),
        min_size=1,
        max_size=3,
        unique=True,
    )
    for has_active in (False, True)
}
# Scope lists are mostly empty, so that sessions often get as far as the thresholds.
scope_lists = {
    "databases": _unique_subset(DATABASES[:-1]),
    "users": _unique_subset(USERS[:-1]),
    "applications": _unique_subset(APPLICATION_REGEXES),
    "client_addrs": _unique_subset(NETWORKS),
}
seconds = st.integers(1, 120)
one_in_four = st.integers(0, 3).map(lambda n: n == 0)
one_in_twenty = st.integers(0, 19).map(lambda n: n == 0)


@st.composite
def policy_configs(draw: st.DrawFn, name: str) -> PolicyConfig:
    states = draw(state_lists)
    has_active = any(s in ACTIVE_STATES for s in states)
    fields: dict[str, Any] = {"name": name, "states": states}
    # Mostly what the config accepts (no max_idle with an active state, max_runtime only with
    # one, cancel only for active states); the rest is filtered out below.
    keys = draw(accepted_thresholds[has_active])
    if draw(one_in_twenty):
        keys.append(draw(st.sampled_from(THRESHOLDS)))
    for key in keys:
        fields[key] = draw(seconds)
    if draw(one_in_four):
        fields["when_blocking"] = draw(seconds)
    for field in ("queries", "exclude_queries"):
        fields[field] = draw(_unique_subset(QUERY_REGEXES)) if draw(one_in_four) else []
    if draw(one_in_twenty):
        fields["action"] = "cancel"
    elif all(s in ACTIVE_STATES for s in states):
        fields["action"] = draw(st.sampled_from(("terminate", "log", "cancel")))
    else:
        fields["action"] = draw(st.sampled_from(("terminate", "log")))
    for key, subset in scope_lists.items():
        for field in (key, f"exclude_{key}"):
            fields[field] = draw(subset) if draw(one_in_four) else []
    try:
        return PolicyConfig.model_validate(fields)
    except ValidationError:
        reject()  # a combination the config refuses


@st.composite
def policy_lists(draw: st.DrawFn) -> list[PolicyConfig]:
    count = draw(st.integers(1, 3))
    policies = [draw(policy_configs(f"p{index}")) for index in range(count)]
    # Half the time a last, broad policy catches most of what the others leave, so that plans
    # often have many victims and the cap is reached.
    return [*policies, CATCH_ALL] if draw(st.booleans()) else policies


reapers = st.builds(
    lambda users, applications, cap: make_reaper(
        protect_users=users, protect_applications=applications, max_terminations_per_cycle=cap
    ),
    st.just([]) | _unique_subset(USERS[:-1], max_size=2),
    st.just([]) | _unique_subset(APPLICATION_REGEXES, max_size=2),
    st.integers(1, 3) | st.integers(1, 10),  # small caps are reached more often
)


def _age(decision: Decision) -> float:
    session = decision.session
    if session.idle_seconds is not None:
        return session.idle_seconds
    if session.connection_seconds is not None:
        return session.connection_seconds
    return 0.0


@hypothesis_settings(max_examples=200, deadline=None)
@given(drawn=sessions_and_facts(), policies=policy_lists(), reaper=reapers)
def test_plan_never_touches_what_the_hard_rules_spare(
    drawn: tuple[list[Session], ServerFacts],
    policies: list[PolicyConfig],
    reaper: ReaperSection,
) -> None:
    sessions, facts = drawn
    result = plan(sessions, policies, reaper=reaper, facts=facts)
    named = {p.name: p for p in policies}
    for decision in (*result.signal, *result.log, *result.deferred, *result.denied):
        session = decision.session
        assert decision.policy is not None
        policy = named[decision.policy.name]
        assert decision.policy == Rule.of(policy)
        assert session.backend_type == CLIENT_BACKEND
        assert session.pid != facts.own_pid
        assert not (session.application == APPLICATION_NAME and session.signaller)
        assert session.state is not None
        assert session.user not in reaper.protect_users
        assert not any(p.search(session.application) for p in reaper.protect_applications)
        assert session.state in policy.states
        if session.state == "disabled":
            assert "disabled" in policy.states


@hypothesis_settings(max_examples=200, deadline=None)
@given(drawn=sessions_and_facts(), policies=policy_lists(), reaper=reapers)
def test_plan_caps_orders_and_accounts_for_every_session(
    drawn: tuple[list[Session], ServerFacts],
    policies: list[PolicyConfig],
    reaper: ReaperSection,
) -> None:
    sessions, facts = drawn
    cap = reaper.max_terminations_per_cycle
    result = plan(sessions, policies, reaper=reaper, facts=facts)

    assert len(result.signal) <= cap
    if len(result.signal) < cap:
        assert result.deferred == ()
    for group in (result.signal, result.log, result.deferred, result.denied, result.candidates):
        keys = [(-_age(d), d.session.pid) for d in group]
        assert keys == sorted(keys)
    # The cap holds back the youngest: nothing deferred is older than anything signalled.
    if result.signal and result.deferred:
        assert min(_age(d) for d in result.signal) >= max(_age(d) for d in result.deferred)

    assert all(d.policy is not None and d.policy.action == "log" for d in result.log)
    for decision in (*result.signal, *result.deferred):
        assert decision.policy is not None
        assert decision.policy.action != "log"
        assert can_signal(decision.session, facts)
    for decision in result.denied:
        assert decision.policy is not None
        assert decision.policy.action != "log"
        assert not can_signal(decision.session, facts)

    matched = [s.pid for s in sessions if evaluate(s, policies, reaper=reaper, facts=facts).matched]
    placed = pids((*result.signal, *result.log, *result.deferred, *result.denied))
    assert sorted(placed) == sorted(matched)
    assert len(placed) == len(set(placed))
    assert sorted(pids(result.candidates)) == sorted(matched)
    spared = pids(result.spared)
    assert not set(spared) & set(placed)
    assert sorted(spared + placed) == sorted(s.pid for s in sessions)
    assert all(not d.matched for d in result.spared)


@hypothesis_settings(max_examples=200, deadline=None)
@given(drawn=sessions_and_facts(), reaper=reapers)
def test_the_cap_signals_the_oldest_victims_and_defers_the_rest_in_order(
    drawn: tuple[list[Session], ServerFacts], reaper: ReaperSection
) -> None:
    sessions, facts = drawn
    facts = make_facts(superuser=True, own_pid=facts.own_pid)  # may signal every session
    cap = reaper.max_terminations_per_cycle
    result = plan(sessions, [CATCH_ALL], reaper=reaper, facts=facts)
    # An oracle written from DESIGN.md, independent of the engine.
    victims = sorted(
        (
            s
            for s in sessions
            if s.backend_type == CLIENT_BACKEND
            and s.pid != facts.own_pid
            and not (s.application == APPLICATION_NAME and s.signaller)
            and s.state is not None
            and s.user not in reaper.protect_users
            and not any(p.search(s.application) for p in reaper.protect_applications)
            and s.connection_seconds is not None
            and s.connection_seconds > 1
        ),
        key=lambda s: (-s.age_in_state, s.pid),
    )
    assert pids(result.signal) == [s.pid for s in victims[:cap]]
    assert pids(result.deferred) == [s.pid for s in victims[cap:]]
    assert result.log == ()
    assert result.denied == ()


@hypothesis_settings(max_examples=200, deadline=None)
@given(drawn=sessions_and_facts(), policies=policy_lists(), reaper=reapers)
def test_a_matched_session_exceeds_a_threshold_of_the_first_policy_that_scopes_it(
    drawn: tuple[list[Session], ServerFacts],
    policies: list[PolicyConfig],
    reaper: ReaperSection,
) -> None:
    sessions, facts = drawn
    age_attribute = {
        "max_idle": "idle_seconds",
        "max_runtime": "runtime_seconds",
        "max_transaction_age": "transaction_seconds",
        "max_connection_age": "connection_seconds",
    }
    for session in sessions:
        decision = evaluate(session, policies, reaper=reaper, facts=facts)
        if decision.policy is None:
            continue
        # Policy names are unique (the config rejects duplicates), so the name finds the policy.
        index = [p.name for p in policies].index(decision.policy.name)
        assert decision.policy == Rule.of(policies[index])
        exceeded = [
            key
            for key, limit in policies[index].thresholds.items()
            if (age := getattr(session, age_attribute[key])) is not None
            and age > limit.total_seconds()
            # a query runs only in an active state: an idle session has no runtime
            and (key != "max_runtime" or session.state in {"active", "fastpath function call"})
        ]
        policy = policies[index]
        assert exceeded or not policy.thresholds, decision.reason
        assert all(f"> {key} " in decision.reason for key in exceeded)
        if policy.when_blocking is not None:
            # Every condition must hold: one age threshold (if any is set) and when_blocking.
            assert session.blocking
            wait = session.lock_wait_seconds or 0.0
            assert wait >= policy.when_blocking.total_seconds()
            assert f">= when_blocking {int(policy.when_blocking.total_seconds())}s" in (
                decision.reason
            )
        text = session.query
        if policy.queries or policy.exclude_queries:
            # A text the reaper cannot read never gets a session killed by a query filter.
            assert text is not None
            assert text != "<insufficient privilege>"
            assert not policy.queries or any(p.search(text) for p in policy.queries)
            assert not any(p.search(text) for p in policy.exclude_queries)
        if text:
            assert text not in decision.reason
        # No earlier policy would have named it.
        for earlier in policies[:index]:
            assert not evaluate(session, [earlier], reaper=reaper, facts=facts).matched


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    blocked=st.lists(st.integers(1, 99_999), max_size=3, unique=True),
    wait=ages,
    idle=ages,
    threshold=seconds,
    max_idle=st.none() | seconds,
)
def test_when_blocking_matches_exactly_a_blocker_whose_longest_waiter_waited_long_enough(
    blocked: list[int], wait: float | None, idle: float | None, threshold: int, max_idle: int | None
) -> None:
    policy = make_policy(
        "blockers", states=["idle in transaction"], when_blocking=threshold, max_idle=max_idle
    )
    session = blocker(blocking=tuple(blocked), lock_wait_seconds=wait, idle_seconds=idle)
    # An oracle from the docs: blocks someone who has waited at least when_blocking, and (with
    # max_idle) idle for longer than max_idle.
    expected = bool(blocked) and (wait or 0.0) >= threshold
    if max_idle is not None:
        expected = expected and idle is not None and idle > max_idle
    assert decide(session, policy).matched is expected


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    query=st.sampled_from(QUERIES) | st.text(max_size=20),
    included=_unique_subset(QUERY_REGEXES),
    excluded=_unique_subset(QUERY_REGEXES),
)
def test_query_filters_match_exactly_a_readable_text_listed_and_not_excluded(
    query: str | None, included: list[str], excluded: list[str]
) -> None:
    policy = make_policy("q", max_idle=60, queries=included, exclude_queries=excluded)
    session = make_session(idle_seconds=61.0, query=query)
    readable = query is not None and query != "<insufficient privilege>"
    if not included and not excluded:
        expected = True  # no query filter: the text is not even looked at
    else:
        expected = (
            readable
            and (not included or any(re.search(p, query or "") for p in included))
            and not any(re.search(p, query or "") for p in excluded)
        )
    assert decide(session, policy).matched is expected


def test_ipv4_client_on_an_ipv6_socket_is_matched_as_ipv4() -> None:
    policy = make_policy("office", max_idle=1, exclude_client_addrs=["10.0.0.0/8"])
    mapped = make_session(client_addr="::ffff:10.1.2.3", idle_seconds=5.0)
    assert not decide(mapped, policy).matched
    outside = make_session(client_addr="::ffff:192.0.2.7", idle_seconds=5.0)
    assert decide(outside, policy).matched


def test_seconds_until_eligible_is_the_nearest_threshold_of_any_policy_in_scope() -> None:
    from reaper.policy import seconds_until_eligible  # noqa: PLC0415

    idle = make_policy("idle", max_idle=60)
    old = make_policy("old", max_connection_age=100)
    session = make_session(idle_seconds=20.0, connection_seconds=90.0)
    reaper = make_reaper()
    assert seconds_until_eligible(session, [idle], reaper=reaper, facts=FACTS) == 40.0
    assert seconds_until_eligible(session, [idle, old], reaper=reaper, facts=FACTS) == 10.0
    protected = make_session(idle_seconds=20.0, user="keeper")
    guarded = make_reaper(protect_users=["keeper"])
    assert seconds_until_eligible(protected, [idle], reaper=guarded, facts=FACTS) is None
    elsewhere = make_policy("elsewhere", max_idle=60, databases=["other"])
    assert seconds_until_eligible(session, [elsewhere], reaper=reaper, facts=FACTS) is None


def test_the_poll_reads_every_role_unless_roles_outnumber_sessions() -> None:
    from reaper.pg.activity import poll_reads_every_role  # noqa: PLC0415

    assert poll_reads_every_role(None, 0)  # nothing known yet: every role
    assert poll_reads_every_role(30, 30)
    assert poll_reads_every_role(30, 4000)
    assert not poll_reads_every_role(2000, 100)
