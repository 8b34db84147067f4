"""`pg-reaper doctor`'s output: a few aligned lines per server, or one JSON document."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reaper.commands.doctor_state import escaped
from reaper.output import safe_text

if TYPE_CHECKING:
    from collections.abc import Sequence

    from reaper.commands.doctor_diagnosis import Diagnosis, Finding, ServerReport
    from reaper.commands.doctor_state import Limit, Privileges, ServerState, Setting

__all__ = ["render_json", "render_text"]

_LABEL = 13


def render_text(reports: Sequence[ServerReport]) -> str:
    """A few aligned lines per server, then one line per problem, warning and note."""
    return "\n\n".join(_render_server(report) for report in reports)


def _render_server(report: ServerReport) -> str:
    diagnosis = report.diagnosis
    counts = [
        _plural(len(diagnosis.problems), "problem"),
        _plural(len(diagnosis.warnings), "warning"),
    ]
    status = ", ".join(c for c in counts if c) or "ok"
    lines = [f"{safe_text(report.server, width=63)} ({escaped(report.target)}): {status}"]
    if report.state is not None:
        lines.extend(_facts_lines(report.state))
    lines.extend(f"  PROBLEM: {_finding(f)}" for f in diagnosis.problems)
    lines.extend(f"  warning: {_finding(f)}" for f in diagnosis.warnings)
    lines.extend(f"  note: {n}" for n in diagnosis.notes)
    return "\n".join(lines)


def _facts_lines(state: ServerState) -> list[str]:
    priv = state.privileges
    conns = state.connections
    own_limit = "none" if priv.connection_limit is None else str(priv.connection_limit)
    kind = "standby (in recovery)" if state.in_recovery else "primary"
    rows: list[tuple[str, str]] = [
        ("version", f"PostgreSQL {state.server_version}, {kind}"),
        ("role", f"{escaped(priv.role)}: {_grants(priv)}; connection limit {own_limit}"),
        ("connections", conns.usage()),
    ]
    rows.extend(("timeouts" if i == 0 else "", line) for i, line in enumerate(_timeouts(state)))
    rows.extend(
        ("limits" if i == 0 else "", _limit_usage(limit)) for i, limit in enumerate(state.limits)
    )
    return [f"  {label.ljust(_LABEL)}{value}" for label, value in rows]


def _grants(priv: Privileges) -> str:
    if priv.superuser:
        return "superuser"
    return ", ".join(
        f"{name} {'yes' if has else 'no'}"
        for name, has in (
            ("pg_signal_backend", priv.signal_backend),
            ("pg_read_all_stats", priv.read_all_stats),
            ("pg_monitor", priv.monitor),
            ("pg_use_reserved_connections", priv.use_reserved_connections),
        )
        if has is not None
    )


def _timeouts(state: ServerState) -> list[str]:
    """One line per timeout in force; the server-wide ones that are off share the last line."""
    unset = [t.name for t in state.timeouts if t.milliseconds == 0 and not t.override]
    timeouts = [
        f"{t.name} = {t.value} {t.scope}"
        for t in state.timeouts
        if t.name not in unset or t.override
    ]
    if unset:
        timeouts.append(f"0 (off): {', '.join(unset)}")
    return timeouts


def _limit_usage(limit: Limit) -> str:
    return (
        f"{limit.kind} {escaped(limit.name)}: {limit.sessions} of {limit.connection_limit} "
        f"sessions ({limit.percent:.0f}%)"
    )


def _finding(finding: Finding) -> str:
    return f"{finding.message} — fix: {finding.fix}" if finding.fix else finding.message


def _plural(count: int, noun: str) -> str:
    return "" if count == 0 else f"{count} {noun}{'s' if count != 1 else ''}"


def render_json(reports: Sequence[ServerReport]) -> dict[str, Any]:
    return {
        "servers": [_server_json(report) for report in reports],
        "ok": all(report.ok for report in reports),
    }


def _server_json(report: ServerReport) -> dict[str, Any]:
    state = report.state
    return {
        "server": report.server,
        "target": report.target,
        "ok": report.ok,
        "error": report.error,
        "version": state.server_version if state else None,
        "version_num": state.server_version_num if state else None,
        "in_recovery": state.in_recovery if state else None,
        "role": state.privileges.role if state else None,
        "privileges": _privileges_json(state.privileges) if state else None,
        "track_activities": state.track_activities if state else None,
        "timeouts": [_setting_json(t) for t in state.timeouts] if state else [],
        "connections": state.connections.as_json() if state else None,
        "limits": [_limit_json(limit) for limit in state.limits] if state else [],
        **_diagnosis_json(report.diagnosis),
    }


# Each fact's JSON object: its key and the attribute it shows, in output order.
_PRIVILEGES_JSON = {
    "superuser": "superuser",
    "pg_signal_backend": "signal_backend",
    "pg_read_all_stats": "read_all_stats",
    "pg_monitor": "monitor",
    "pg_use_reserved_connections": "use_reserved_connections",
    "connection_limit": "connection_limit",
}
_SETTING_JSON = ("name", "value", "milliseconds", "source", "role", "database")
_LIMIT_JSON = ("kind", "name", "connection_limit", "sessions")


def _privileges_json(priv: Privileges) -> dict[str, Any]:
    return {key: getattr(priv, name) for key, name in _PRIVILEGES_JSON.items()}


def _setting_json(setting: Setting) -> dict[str, Any]:
    return _attributes(setting, _SETTING_JSON)


def _limit_json(limit: Limit) -> dict[str, Any]:
    return _attributes(limit, _LIMIT_JSON) | {"percent": round(limit.percent, 1)}


def _attributes(fact: object, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(fact, name) for name in names}


def _diagnosis_json(diagnosis: Diagnosis) -> dict[str, Any]:
    return {
        "problems": [{"message": f.message, "fix": f.fix} for f in diagnosis.problems],
        "warnings": [{"message": f.message, "fix": f.fix} for f in diagnosis.warnings],
        "notes": list(diagnosis.notes),
    }
