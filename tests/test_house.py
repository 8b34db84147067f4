"""The house's layering (docs/development.md) is enforced, not remembered: the import-linter
contracts in pyproject.toml hold on the package as it is, and each one breaks, naming the import
and its line, when a copy of the package gains an import it forbids."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy, not the installed package
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _module_file(tree: Path, module: str) -> Path:
    path = tree.joinpath(*module.split("."))
    package = path / "__init__.py"
    return package if package.exists() else path.with_suffix(".py")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "reaper", tmp_path / "reaper")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_every_layering_contract_holds_on_the_package() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "added", "contract", "named"),
    [
        (
            "reaper.policy",
            "from reaper.pg import connection",
            "The policy engine and the config model do no I/O",
            "reaper.policy -> reaper.pg.connection",
        ),
        (
            "reaper.settings",
            "import prometheus_client",
            "The policy engine and the config model do no I/O",
            "reaper.settings -> prometheus_client",
        ),
        (
            "reaper.sweep",
            "import psycopg",
            "Only reaper.pg talks to PostgreSQL (imports psycopg)",
            "reaper.sweep -> psycopg",
        ),
        (
            "reaper.observe.metrics",
            "from reaper import sweep",
            "Layers: the command line, then commands and the daemon, down to the config",
            "reaper.observe.metrics -> reaper.sweep",
        ),
        (
            "reaper.commands.doctor",
            "from reaper.daemon import scheduler",
            "Layers: the command line, then commands and the daemon, down to the config",
            "reaper.commands.doctor -> reaper.daemon.scheduler",
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract_and_is_named(
    tree: Path, module: str, added: str, contract: str, named: str
) -> None:
    target = _module_file(tree, module)
    lines = target.read_text(encoding="utf-8").count("\n")
    with target.open("a", encoding="utf-8") as out:
        out.write(f"{added}  # noqa: E402\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout
    assert f"{named} (l.{lines + 1})" in result.stdout, result.stdout
