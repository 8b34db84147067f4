"""The documentation held to the code: a name changed on one side only fails here.

(a) every TOML block of README.md, docs/ and deploy/ goes through `check-config`; (b) the metrics
table of docs/daemon.md equals a live `/metrics`; (c) its event tables equal the events the code
can log; (d) the README's command table equals each subcommand's `--help`. Each comparison is
also run once on a copy with one name changed, to show that it notices. docs/development.md
describes the markers.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from reaper.cli import main

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from tests.servers import TestServer

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
DAEMON_MD = ROOT / "docs" / "daemon.md"
README = ROOT / "README.md"
PACKAGE = ROOT / "reaper"

FRAGMENT = "<!-- check-config: fragment -->"
INVALID = "<!-- check-config: invalid -->"
# What a fragment lacks to be a whole file: one server, one policy.
COMPLETION = {
    "servers": '\n[[servers]]\nname = "doc-server"\ndsn = "host=/tmp dbname=postgres"\n',
    "policies": '\n[[policies]]\nname = "doc-policy"\nmax_idle = "15m"\n',
}


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented files alone: no PG_REAPER_* of the machine running the tests."""
    for name in list(os.environ):
        if name.upper().startswith("PG_REAPER_"):
            monkeypatch.delenv(name)


# --- (a) TOML blocks ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TomlBlock:
    where: str  # file:line, the test's id
    text: str
    kind: str  # "whole", "fragment" or "invalid"
    expected: str | None = None  # for "invalid": what check-config prints


def _fences(text: str) -> Iterator[tuple[int, str, str, str]]:
    """(line number, language, body, the line before the fence) of every fenced block."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = re.fullmatch(r"\s*```(\w*)\s*", lines[index])
        if match is None:
            index += 1
            continue
        indent = len(lines[index]) - len(lines[index].lstrip())
        end = index + 1
        while not re.fullmatch(r"\s*```\s*", lines[end]):
            end += 1
        body = textwrap.dedent("\n".join(line[indent:] for line in lines[index + 1 : end]))
        before = lines[index - 1].strip() if index else ""
        yield index + 1, match.group(1), body + "\n", before
        index = end + 1


def markdown_blocks(path: Path, text: str | None = None) -> list[TomlBlock]:
    text = path.read_text(encoding="utf-8") if text is None else text
    fences = list(_fences(text))
    blocks = []
    for position, (line, language, body, before) in enumerate(fences):
        if language != "toml":
            continue
        where = f"{path.relative_to(ROOT)}:{line}"
        if before == INVALID:
            following = [f for f in fences[position + 1 :] if f[1] == "text"]
            assert following, f"{where}: an invalid block needs the ```text block of its errors"
            blocks.append(TomlBlock(where, body, "invalid", following[0][2]))
        else:
            blocks.append(TomlBlock(where, body, "fragment" if before == FRAGMENT else "whole"))
    return blocks


def _toml_values(node: object, where: str) -> Iterator[tuple[str, str]]:
    """Every string of a YAML document held under a key ending in .toml (ConfigMaps)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if str(key).endswith(".toml") and isinstance(value, str):
                yield f"{where}[{key}]", value
            else:
                yield from _toml_values(value, where)
    elif isinstance(node, list):
        for item in node:
            yield from _toml_values(item, where)


def deploy_blocks() -> list[TomlBlock]:
    blocks = []
    for path in sorted((ROOT / "deploy").rglob("*")):
        where = str(path.relative_to(ROOT))
        if path.suffix == ".toml":
            blocks.append(TomlBlock(where, path.read_text(encoding="utf-8"), "whole"))
        elif path.suffix in {".yaml", ".yml"}:
            for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                for key, text in _toml_values(document, where):
                    blocks.append(TomlBlock(key, text, "whole"))
        elif path.suffix == ".md":
            blocks.extend(markdown_blocks(path))
    return blocks


BLOCKS = [block for path in MARKDOWN for block in markdown_blocks(path)] + deploy_blocks()


def _runnable(block: TomlBlock, directory: Path) -> str:
    """The block as a file check-config can read: password files replaced by stand-ins (they
    must exist), a fragment completed with what it lacks."""
    text = block.text
    for number, original in enumerate(re.findall(r'password_file\s*=\s*"([^"]*)"', text)):
        stand_in = directory / f"password-{number}"
        stand_in.write_text("Stand-in-Pa55\n", encoding="utf-8")
        text = text.replace(f'"{original}"', f'"{stand_in}"')
    if block.kind == "fragment":
        present = tomllib.loads(text)
        text += "".join(extra for key, extra in COMPLETION.items() if key not in present)
    return text


def check_config(
    block: TomlBlock, directory: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    (directory / "config.toml").write_text(_runnable(block, directory), encoding="utf-8")
    code = main(["check-config", "-c", "config.toml"])
    captured = capsys.readouterr()
    assert "Stand-in-Pa55" not in captured.out + captured.err  # a password file stays secret
    return code, captured.err


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.where)
def test_documented_toml_passes_check_config(
    block: TomlBlock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = check_config(block, tmp_path, capsys)
    if block.kind == "invalid":
        assert code == 2
        assert err == block.expected, f"{block.where}: the documented errors are not these"
    else:
        assert (code, err) == (0, ""), f"{block.where} does not validate:\n{err}"


def test_toml_blocks_are_found_in_every_place() -> None:
    kinds: dict[str, set[str]] = {}
    for block in BLOCKS:
        kinds.setdefault(block.where.split(":")[0].split("[")[0], set()).add(block.kind)
    assert kinds["README.md"] == {"whole"}
    assert kinds["docs/configuration.md"] >= {"invalid", "fragment", "whole"}
    assert kinds["docs/ha.md"] == {"fragment"}
    assert "deploy/kubernetes/sidecar.yaml" in kinds
    assert "deploy/kubernetes/central.yaml" in kinds


def test_a_misspelt_key_in_a_documented_block_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key renamed in the docs only (dry_run -> dryrun) is caught."""
    monkeypatch.chdir(tmp_path)
    (readme,) = [b for b in BLOCKS if b.where.startswith("README.md")]
    renamed = TomlBlock(readme.where, readme.text.replace("dry_run =", "dryrun ="), "whole")
    code, err = check_config(renamed, tmp_path, capsys)
    assert code == 2
    assert "reaper.dryrun: unknown key 'dryrun'" in err


# --- (b) metrics -------------------------------------------------------------------------------


def _section(text: str, heading: str) -> str:
    """The text of a `## heading` section, up to the next heading of the same level."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _table_rows(text: str) -> Iterator[list[str]]:
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            yield [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def documented_metrics(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """docs/daemon.md's metrics table: name -> (type, labels). A label list is the backquoted
    text that opens the labels cell."""
    metrics = {}
    for cells in _table_rows(_section(text, "Metrics")):
        name = re.fullmatch(r"`(pg_reaper_\w+)`", cells[0])
        if name is None or len(cells) != 3:
            continue
        labels = re.match(r"`([^`]*)`", cells[2])
        names = frozenset() if labels is None else frozenset(labels.group(1).split(", "))
        metrics[name.group(1)] = (cells[1], names)
    return metrics


def live_metrics(families: dict[str, Metric]) -> dict[str, tuple[str, frozenset[str]]]:
    live = {}
    for family in families.values():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        live[name] = (family.type, labels)
    return live


def metric_differences(
    documented: dict[str, tuple[str, frozenset[str]]], live: dict[str, tuple[str, frozenset[str]]]
) -> list[str]:
    found = [f"documented, not served: {n}" for n in sorted(documented.keys() - live.keys())]
    found += [f"served, not documented: {n}" for n in sorted(live.keys() - documented.keys())]
    found += [
        f"{n}: documented {documented[n]}, served {live[n]}"
        for n in sorted(documented.keys() & live.keys())
        if documented[n] != live[n]
    ]
    return found


def test_metrics_table_is_read() -> None:
    documented = documented_metrics(DAEMON_MD.read_text(encoding="utf-8"))
    assert documented["pg_reaper_sessions_reaped_total"] == (
        "counter",
        frozenset({"server", "policy", "action"}),
    )
    assert documented["pg_reaper_dry_run"] == ("gauge", frozenset())
    assert documented["pg_reaper_lock_held_by_other"] == ("gauge", frozenset({"server"}))


@pytest.mark.integration
def test_documented_metrics_equal_a_live_daemons(pg: TestServer, tmp_path: Path) -> None:
    # Imported here: the pure tests of this file need no daemon helpers.
    from tests.reliability.support import free_port, running_daemon  # noqa: PLC0415
    from tests.test_daemon import daemon_config, policy, server_name  # noqa: PLC0415

    port = free_port()

    # Every series a configuration can make: [ha] (leader, lock_held_by_other), a pressure
    # policy (pg_reaper_pressure) beside a plain one. The policies match no real session.
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server_name(pg): pg.dsn()},
        policies=policy("idle", "^docs-none$", max_idle="1h")
        + policy("crowded", "^docs-none$", max_idle="1h", extra='when_connections_above = "80%"'),
        port=port,
        reaper=f"\n[ha]\nenabled = true\nlock_key = {7_000_000_000 + pg.major}\n",
    )
    with running_daemon(config, port=port) as daemon:
        daemon.wait_ready()
        daemon.wait_value("pg_reaper_connections_usable", bool, server=server_name(pg))
        live = live_metrics(daemon.families())
    text = DAEMON_MD.read_text(encoding="utf-8")

    assert metric_differences(documented_metrics(text), live) == []

    # A metric renamed in the docs only, or served under another name only: both are seen.
    renamed = text.replace("`pg_reaper_deferred_total`", "`pg_reaper_deferrals_total`")
    assert metric_differences(documented_metrics(renamed), live) == [
        "documented, not served: pg_reaper_deferrals_total",
        "served, not documented: pg_reaper_deferred_total",
    ]
    relabelled = {**live, "pg_reaper_leader": ("gauge", frozenset({"server", "instance"}))}
    assert len(metric_differences(documented_metrics(text), relabelled)) == 1


# --- (c) log events ----------------------------------------------------------------------------

_LEVELS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "msg"})


def _is_logger(node: ast.expr) -> bool:
    """`log`, `self._log`, `logger`, `get_logger(...)`, `....bind(...)`: what holds a logger."""
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        return name in {"get_logger", "bind", "new"}
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return re.fullmatch(r"_?(log|logger)", name) is not None


def _is_log_method(node: ast.expr) -> bool:
    if isinstance(node, ast.IfExp):
        return _is_log_method(node.body) and _is_log_method(node.orelse)
    return isinstance(node, ast.Attribute) and node.attr in _LEVELS and _is_logger(node.value)


def _strings(node: ast.expr) -> list[str] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        body, orelse = _strings(node.body), _strings(node.orelse)
        return None if body is None or orelse is None else body + orelse
    return None


def _assigned(scope: ast.AST, name: str) -> list[ast.expr]:
    return [
        node.value
        for node in ast.walk(scope)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    ]


def _enclosing(tree: ast.Module) -> dict[ast.AST, ast.AST]:
    """Each node -> the innermost function (or the module) that holds it."""
    scopes: dict[ast.AST, ast.AST] = {}

    def visit(node: ast.AST, scope: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            scopes[child] = scope
            inner = child if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else scope
            visit(child, inner)

    visit(tree, tree)
    return scopes


def code_events(package: Path) -> dict[str, list[str]]:
    """Every event the package can log -> where. Walks every module under `package`; a log
    call whose event is neither a literal nor a local bound to literals is an error."""
    events: dict[str, list[str]] = {}
    unreadable = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        scopes = _enclosing(tree)
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            scope, func = scopes[call], call.func
            if not _is_log_method(func) and not (
                isinstance(func, ast.Name)
                and any(_is_log_method(v) for v in _assigned(scope, func.id))
            ):
                continue
            where = f"{path.relative_to(package.parent)}:{call.lineno}"
            first = call.args[0] if call.args else None
            names = None if first is None else _strings(first)
            if names is None and isinstance(first, ast.Name):
                bound = [_strings(v) for v in _assigned(scope, first.id)]
                if bound and all(b is not None for b in bound):
                    names = [name for b in bound if b is not None for name in b]
            if names is None:
                unreadable.append(where)
                continue
            for name in names:
                events.setdefault(name, []).append(where)
    assert not unreadable, f"log calls whose event cannot be read (use a literal): {unreadable}"
    return events


def documented_events(text: str) -> set[str]:
    """The first column of the event tables of docs/daemon.md's "Logs and audit events"."""
    section = _section(text, "Logs and audit events")
    return {
        name
        for cells in _table_rows(section)
        if cells[0] != "event"
        for name in re.findall(r"`(\w+)`", cells[0])
    }


def test_documented_events_equal_the_events_the_code_can_log() -> None:
    events = code_events(PACKAGE)
    documented = documented_events(DAEMON_MD.read_text(encoding="utf-8"))
    assert sorted(events.keys() - documented) == [], "logged, not documented in docs/daemon.md"
    assert sorted(documented - events.keys()) == [], "documented, never logged"


def test_event_extraction_sees_every_kind_of_call_and_a_rename(tmp_path: Path) -> None:
    package = tmp_path / "reaper"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    events = code_events(package)
    # A literal, a level chosen at run time (level = log.debug if ... else log.error), and an
    # event chosen at run time (event = "..." if ... else "...").
    assert {"poll_completed", "poll_failed", "session_reaped", "session_reap_failed"} <= set(events)
    # The same event renamed in the code only: the comparison sees both names.
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace('"cycle_overran"', '"cycle_overrun"'), encoding="utf-8")
    renamed = code_events(package)
    documented = documented_events(DAEMON_MD.read_text(encoding="utf-8"))
    assert renamed.keys() - documented == {"cycle_overrun"}
    assert documented - renamed.keys() == {"cycle_overran"}
    # A log call the test cannot read fails it rather than being skipped.
    (package / "added.py").write_text("def f(log, name):\n    log.info(name)\n", encoding="utf-8")
    with pytest.raises(AssertionError, match=r"reaper/added\.py:2"):
        code_events(package)


# --- (d) command-line options ------------------------------------------------------------------

_OPTION = re.compile(r"(?<![\w-])(--?[a-z][a-z-]*)")


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def help_options(capsys: pytest.CaptureFixture[str]) -> dict[str, set[str]]:
    """Each subcommand's options, as its --help's usage line shows them (-h aside)."""
    top = _help(capsys)
    listing = top[top.index("COMMAND\n") : top.index("\noptions:")]
    commands = re.findall(r"^ {4}(\S+)", listing, flags=re.MULTILINE)
    options = {}
    for command in commands:
        usage = _help(capsys, command).split("\n\n")[0]
        options[command] = set(_OPTION.findall(usage.split(command, 1)[1])) - {"-h"}
    return options


def documented_options(text: str) -> dict[str, set[str]]:
    """The README's command table: `pg-reaper COMMAND [options]` -> its options."""
    options = {}
    for cells in _table_rows(text):
        match = re.fullmatch(r"`pg-reaper ([\w-]+)(.*)`", cells[0])
        if match is not None:
            options[match.group(1)] = set(_OPTION.findall(match.group(2)))
    return options


def test_readme_lists_every_command_with_exactly_its_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    live = help_options(capsys)
    text = README.read_text(encoding="utf-8")
    assert documented_options(text) == live
    assert live["once"] >= {"-c", "--server", "--dry-run", "--json"}
    # An option renamed in the README only is seen.
    renamed = documented_options(text.replace("[--block-connections]", "[--block]"))
    assert renamed != live
    assert renamed["kill"] ^ live["kill"] == {"--block", "--block-connections"}


def _command_lines(text: str) -> Iterator[tuple[str, str]]:
    """(command, the rest of the line) of every `pg-reaper COMMAND ...` written in a doc."""
    for line in text.splitlines():
        for match in re.finditer(r"pg-reaper ([a-z][\w-]*)([^`|#&;]*)", line):
            yield match.group(1), match.group(2)


def test_every_documented_command_line_uses_real_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    live = help_options(capsys)
    wrong = []
    for path in MARKDOWN:
        for command, rest in _command_lines(path.read_text(encoding="utf-8")):
            if command not in live:
                continue  # prose: "pg-reaper instance", "pg-reaper role", ...
            unknown = set(_OPTION.findall(rest)) - live[command] - {"-h", "--help"}
            if unknown:
                wrong.append(f"{path.relative_to(ROOT)}: pg-reaper {command}{rest} ({unknown})")
    assert wrong == []
