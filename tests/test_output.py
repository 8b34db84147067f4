"""reaper/output.py with no server: the one table renderer every command prints through, the
`once` table and JSON, and what they make of hostile names."""

from __future__ import annotations

import json
from typing import Any

import pytest

from reaper.output import (
    human_duration,
    render_json,
    render_table,
    safe_text,
    session_cells,
    table_lines,
)
from reaper.policy import Decision, Result, Rule
from reaper.sweep import Outcome, SweepReport
from tests.test_policy import make_session

IDLE = Rule(name="idle", action="terminate")
# An escape sequence that would recolour the terminal, a line break, and a right-to-left
# override that would show the rest of the line reversed.
HOSTILE = "x\x1b[31mred\n\u202eevil"


def _report(*outcomes: Outcome, server: str = "primary", **fields: Any) -> SweepReport:
    return SweepReport(server=server, dry_run=False, duration_ms=1.0, outcomes=outcomes, **fields)


def _outcome(result: Result = Result.TERMINATED, **session: Any) -> Outcome:
    decision = Decision(session=make_session(**session), policy=IDLE, reason="idle 61s > 60s")
    return Outcome(decision=decision, result=result)


# --- table_lines -------------------------------------------------------------------------------


def test_columns_are_padded_to_their_widest_cell_two_spaces_apart() -> None:
    lines = table_lines(("A", "B", "C"), [("long", "x", "y"), ("s", "wider", "z")])
    assert lines == ["A     B      C", "long  x      y", "s     wider  z"]


def test_trailing_blanks_are_cut() -> None:
    assert table_lines(("A", "B"), [("x", "longer")]) == ["A  B", "x  longer"]


def test_columns_from_right_from_on_are_right_aligned_and_every_line_is_indented() -> None:
    lines = table_lines(("NAME", "N"), [("a", "10"), ("bbbbb", "2")], right_from=1, indent="  ")
    assert lines == ["  NAME    N", "  a      10", "  bbbbb   2"]


def test_a_table_without_rows_is_its_header_line() -> None:
    assert table_lines(("STATE", "SESSIONS"), [], right_from=1) == ["STATE  SESSIONS"]


def test_cells_are_shown_as_given_so_a_caller_makes_them_printable_first() -> None:
    assert table_lines(("A",), [(safe_text(HOSTILE),)])[1] == "x\\x1b[31mred\\x0a\\u202eevil"


# --- safe_text and human_duration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, ""),
        (42, "42"),
        ("tab\there", "tab\\x09here"),
        ("del\x7f", "del\\x7f"),
        ("c1\x9b", "c1\\x9b"),
        ("line\u2028sep", "line\\u2028sep"),
        ("isolate\u2066", "isolate\\u2066"),
        ("u" * 40, "u" * 27 + "…"),
    ],
)
def test_safe_text_escapes_control_characters_and_cuts_long_values(
    value: object, shown: str
) -> None:
    assert safe_text(value) == shown


def test_safe_text_cuts_at_the_width_asked() -> None:
    assert safe_text("abcdef", width=4) == "abc…"
    assert safe_text("abcd", width=4) == "abcd"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (0.04, "0.0s"), (59.94, "59.9s"), (61, "1m01s"), (3725, "1h02m05s")],
)
def test_human_duration(seconds: float | None, shown: str) -> None:
    assert human_duration(seconds) == shown


def test_human_duration_of_days_leaves_out_the_seconds() -> None:
    assert human_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2d03h04m"


# --- render_table --------------------------------------------------------------------------------


def test_the_once_table_has_a_line_per_candidate_then_a_summary_per_server() -> None:
    report = _report(
        _outcome(pid=42, user="app", database="shop", client_addr=None, idle_seconds=61.0)
    )
    assert render_table([report]).split("\n") == [
        "SERVER   PID  USER  DATABASE  APPLICATION  CLIENT  STATE  IDLE FOR  POLICY  RESULT",
        "primary  42   app   shop      web          local   idle   1m01s     idle    terminated",
        "",
        "primary: 0 client sessions, 1 candidates: 1 terminated",
    ]


def test_hostile_names_stay_on_their_line_escaped() -> None:
    report = _report(
        _outcome(application=HOSTILE, user="\u202eadmin", database="shop\r\n"),
        server="evil\x1b]0;title\x07",
    )
    text = render_table([report])
    lines = text.split("\n")
    assert len(lines) == 4  # header, one candidate, a blank line, the summary
    assert "x\\x1b[31mred\\x0a\\u202eevil" in lines[1]
    assert "\\u202eadmin" in lines[1]
    assert "shop\\x0d\\x0a" in lines[1]
    assert lines[3].startswith("evil\\x1b]0;title\\x07: ")
    assert not any(c in text for c in "\x1b\x07\r\u202e")


def test_long_cells_are_cut_so_that_the_columns_stay_readable() -> None:
    text = render_table([_report(_outcome(application="a" * 100))])
    assert "a" * 27 + "…" in text
    assert "a" * 28 not in text


def test_a_report_without_candidates_prints_its_summary_and_warnings_only() -> None:
    report = _report(sessions=(make_session(), make_session(pid=2)), warnings=("look out",))
    assert render_table([report]) == "primary: 2 client sessions, 0 candidates\n  warning: look out"
    assert render_table([]) == ""


def test_a_server_that_could_not_be_polled_says_so() -> None:
    report = _report(error="connection refused")
    assert render_table([report]) == "primary: poll failed: connection refused"


def test_a_dry_run_tallies_what_it_would_do() -> None:
    report = SweepReport(
        server="primary",
        dry_run=True,
        duration_ms=1.0,
        outcomes=(_outcome(Result.DRY_RUN, pid=1), _outcome(Result.DENIED, pid=2)),
    )
    summary = render_table([report]).split("\n")[-1]
    assert summary == "primary: 0 client sessions, 2 candidates: 1 denied, 1 dry_run (dry run)"


def test_session_cells_are_the_first_columns_of_the_once_table() -> None:
    outcome = _outcome(pid=7, application=HOSTILE)
    cells = session_cells("primary", outcome.decision.session)
    row = render_table([_report(outcome)]).split("\n")[1]
    assert row.split() == [*cells, "idle", "terminated"]


# --- render_json ---------------------------------------------------------------------------------


def test_the_json_document_lists_each_server_and_its_decisions() -> None:
    report = _report(_outcome(pid=42, application=HOSTILE), sessions=(make_session(pid=42),))
    document = render_json(
        [report, _report(server="replica", error="timeout")], include_query=False
    )
    assert document["ok"] is False  # the replica could not be polled
    primary, replica = document["servers"]
    assert primary["server"] == "primary"
    assert (primary["ok"], primary["sessions"], primary["candidates"], primary["reaped"]) == (
        True,
        1,
        1,
        1,
    )
    (decision,) = primary["decisions"]
    assert decision["policy"] == "idle"
    assert decision["action"] == "terminate"
    assert decision["result"] == "terminated"
    assert decision["application"] == HOSTILE  # data, not a terminal line: kept as it is
    assert "query" not in decision
    assert replica == {
        "server": "replica",
        "ok": False,
        "error": "timeout",
        "dry_run": False,
        "sessions": 0,
        "candidates": 0,
        "reaped": 0,
        "duration_ms": 1.0,
        "warnings": [],
        "decisions": [],
    }


def test_the_json_document_escapes_hostile_names_and_reads_back_the_same() -> None:
    document = render_json([_report(_outcome(application=HOSTILE))], include_query=True)
    text = json.dumps(document, ensure_ascii=False)
    assert "\x1b" not in text
    assert "\n" not in text
    assert json.loads(text) == document
    assert document["servers"][0]["decisions"][0]["query"] is None


def test_the_json_document_of_no_server_is_ok() -> None:
    assert render_json([], include_query=False) == {"servers": [], "ok": True}
