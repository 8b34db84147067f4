"""The release: scripts/package's sdist, wheel and Debian package, checked as a user gets them.

Selected with `-m package` (.ci/run does; the default run leaves them out: they build for a
minute or two, and the .deb tests install into the machine's own dpkg). The sdist and wheel
tests run anywhere; the .deb tests need root on a Debian-based machine with apt-get, and leave
it as they found it (the package purged, a system user they created removed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.package, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
PACKAGE = "pg-reaper"
CONFIG = Path("/etc/pg-reaper/config.toml")
UNIT = Path("/lib/systemd/system/pg-reaper.service")
ENABLED = Path("/etc/systemd/system/multi-user.target.wants/pg-reaper.service")
VENV = Path("/opt/venvs/pg-reaper")
ROLE_SQL = Path("/usr/share/pg-reaper/pg_reaper_role.sql")
# Where a package can leave something behind: compared before installation and after purge.
WATCHED = (
    "/etc",
    "/opt",
    "/usr/bin",
    "/usr/lib/systemd",
    "/usr/lib/sysusers.d",
    "/usr/share/bash-completion",
    "/usr/share/doc",
    "/usr/share/fish",
    "/usr/share/man/man1",
    "/usr/share/pg-reaper",
    "/usr/share/zsh",
    "/var/lib/systemd",
)
# The system user stays on purge, as Debian leaves every package's (debian/pg-reaper.postrm);
# checked separately. ld.so.cache follows other packages' libraries.
ACCOUNT_FILES = frozenset(
    f"/etc/{name}{suffix}"
    for name in ("passwd", "group", "shadow", "gshadow", "subuid", "subgid")
    for suffix in ("", "-")
)
UNWATCHED = ACCOUNT_FILES | {"/etc/ld.so.cache"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    sdist: Path
    wheel: Path
    deb: Path | None  # None where the .deb cannot be built (not root on Debian/Ubuntu)


def _run(
    *args: str | Path,
    check: bool = True,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=env,
        check=False,  # checked below, with the output in the message
    )
    if check:
        assert result.returncode == 0, (
            f"{args}: {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def _can_build_deb() -> str | None:
    """Why the .deb cannot be built and installed here, or None."""
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return "not a Debian-based machine (no /etc/debian_version or apt-get)"
    if os.geteuid() != 0:
        return "not root: installing the .deb (and its build tools) needs root"
    return None


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The sdist, the wheel and (where it can be) the .deb, built by scripts/package."""
    out = tmp_path_factory.mktemp("dist")
    deb_args = [] if _can_build_deb() is None else ["--no-deb"]
    _run(ROOT / "scripts" / "package", "--out", out, *deb_args, cwd=ROOT)
    debs = sorted(out.glob(f"{PACKAGE}_{VERSION}-1_*.deb"))
    return Release(
        sdist=out / f"pg_reaper-{VERSION}.tar.gz",
        wheel=out / f"pg_reaper-{VERSION}-py3-none-any.whl",
        deb=debs[0] if debs else None,
    )


# --- sdist and wheel ---------------------------------------------------------------------------


def test_sdist_and_wheel_pass_twine_check(release: Release) -> None:
    twine = Path(sys.executable).parent / "twine"
    result = _run(twine, "check", "--strict", release.sdist, release.wheel)
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_wheel_carries_the_man_page_and_completions(release: Release) -> None:
    data = f"pg_reaper-{VERSION}.data/data/share"
    names = set(zipfile.ZipFile(release.wheel).namelist())
    assert {
        f"{data}/man/man1/pg-reaper.1",
        f"{data}/bash-completion/completions/pg-reaper",
        f"{data}/zsh/site-functions/_pg-reaper",
        f"{data}/fish/vendor_completions.d/pg-reaper.fish",
    } <= names
    metadata = zipfile.ZipFile(release.wheel).read(f"pg_reaper-{VERSION}.dist-info/METADATA")
    assert b"License-Expression: PostgreSQL" in metadata


def test_wheel_in_a_fresh_venv_checks_the_example_config(release: Release, tmp_path: Path) -> None:
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", release.wheel)
    program = tmp_path / "venv" / "bin" / "pg-reaper"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG_REAPER_")}

    checked = _run(program, "check-config", "-c", ROOT / "config.example.toml", env=env)
    version = _run(program, "--version", env=env, cwd=tmp_path)

    assert 'name = "primary"' in checked.stdout
    # Installed from a wheel, not run from a checkout: the version alone.
    assert version.stdout.strip() == f"pg-reaper {VERSION}"
    assert (tmp_path / "venv" / "share" / "man" / "man1" / "pg-reaper.1").is_file()


def test_changelog_records_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[(\d[^\]]*)\] - \d{4}-\d{2}-\d{2}$", changelog, flags=re.MULTILINE)
    assert releases[:1] == [VERSION], "CHANGELOG.md: the newest release is not pyproject's version"
    assert f"\n[{VERSION}]: " in changelog


# --- the man page against --help ---------------------------------------------------------------


def _help(*command: str) -> str:
    env = {**os.environ, "COLUMNS": "200"}
    return _run(sys.executable, "-m", "reaper", *command, "--help", env=env).stdout


def _help_commands() -> list[str]:
    """The commands `pg-reaper --help` lists under COMMAND."""
    text = _help()
    block = text.split("\n  COMMAND\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^ {4}(\S+)", block, flags=re.MULTILINE)


def _help_options(*command: str) -> set[str]:
    """Every option string in the options section of a --help, but -h/--help."""
    text = _help(*command)
    options = text.split("\noptions:\n", 1)[1]
    found = set(re.findall(r"^ {2}(-.*?)(?: {2,}|$)", options, flags=re.MULTILINE))
    flags = {flag for entry in found for flag in re.findall(r"(?<![\w-])--?[\w][\w-]*", entry)}
    return flags - {"-h", "--help"}


def _man_sections(roff: Path) -> dict[str, str]:
    """The man page as man(1) shows it, by section heading."""
    env = {**os.environ, "LC_ALL": "C", "MANWIDTH": "250", "MANROFFOPT": "-rHY=0"}
    text = _run("man", "--local-file", roff, env=env).stdout
    sections: dict[str, str] = {}
    heading = ""
    for line in text.splitlines():
        if line and not line[0].isspace():
            heading = line.strip()
            sections[heading] = ""
        else:
            sections[heading] = sections.get(heading, "") + line + "\n"
    return sections


def _man_options(section: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", section))


def test_man_page_shows_every_command_and_option_of_help(release: Release, tmp_path: Path) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed (apt-get install man-db)")
    roff = tmp_path / "pg-reaper.1"
    roff.write_bytes(
        zipfile.ZipFile(release.wheel).read(
            f"pg_reaper-{VERSION}.data/data/share/man/man1/pg-reaper.1"
        )
    )
    sections = _man_sections(roff)
    commands = _help_commands()
    assert len(commands) >= 9, commands

    assert _man_options(sections["OPTIONS"]) == _help_options()
    for command in commands:
        assert f"COMMAND 'pg-reaper {command}'" in sections, command
        in_man = _man_options(sections.get(f"OPTIONS 'pg-reaper {command}'", ""))
        assert in_man == _help_options(command), command
    for name in ("EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"):
        assert name in sections


# --- the Debian package ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deb(release: Release) -> Path:
    reason = _can_build_deb()
    if reason is not None:
        pytest.skip(reason)
    assert release.deb is not None
    return release.deb


def test_deb_passes_lintian(deb: Path) -> None:
    # Errors and warnings fail; each override in debian/pg-reaper.lintian-overrides says why.
    result = _run("lintian", "--fail-on", "error,warning", "--info", deb, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deb_enables_without_starting_restarts_if_running_and_stops_on_remove(
    deb: Path, tmp_path: Path
) -> None:
    # systemd does not run on every machine that runs this test: read what the maintainer
    # scripts would do where it does.
    _run("dpkg-deb", "--control", deb, tmp_path)
    postinst = (tmp_path / "postinst").read_text(encoding="utf-8")
    prerm = (tmp_path / "prerm").read_text(encoding="utf-8")

    assert "deb-systemd-helper enable 'pg-reaper.service'" in postinst
    # The only action on the service: a restart on upgrade ($2, the old version, is set) of a
    # service that runs. Nothing starts it on installation.
    assert re.findall(r"deb-systemd-invoke \S+", postinst) == ["deb-systemd-invoke try-restart"]
    assert 'if [ -n "$2" ]; then\n\t\t\tdeb-systemd-invoke try-restart' in postinst
    assert re.search(r'"\$1" = remove \].*\n\s+deb-systemd-invoke stop pg-reaper\.service', prerm)


def _apt_get(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for another apt-get or dpkg on the machine rather than failing on its lock.
    return _run("apt-get", "-o", "DPkg::Lock::Timeout=300", "-y", "-q", *args, env=env)


def _installed_version() -> str | None:
    result = _run("dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", PACKAGE, check=False)
    status, _, version = result.stdout.partition(" ")
    return version if result.returncode == 0 and status == "installed" else None


def _snapshot() -> dict[str, tuple[int, int, int, str]]:
    """Path -> (mode, uid, gid, link target) under WATCHED, account files aside."""
    found: dict[str, tuple[int, int, int, str]] = {}
    for top in WATCHED:
        for directory, dirs, files in os.walk(top):
            for name in [*dirs, *files]:
                entry = Path(directory, name)
                if str(entry) in UNWATCHED:
                    continue
                st = entry.lstat()
                target = str(entry.readlink()) if entry.is_symlink() else ""
                found[str(entry)] = (st.st_mode, st.st_uid, st.st_gid, target)
    return found


def _user_exists(name: str) -> bool:
    return _run("getent", "passwd", name, check=False).returncode == 0


@pytest.fixture
def clean_machine() -> Iterator[dict[str, tuple[int, int, int, str]]]:
    """The watched file tree before the test; afterwards the package is purged and a user the
    package created is removed, whatever the test did."""
    if _installed_version() is not None or Path(VENV).exists():
        pytest.skip("pg-reaper is already installed here: the test would replace and purge it")
    user_existed = _user_exists(PACKAGE)
    try:
        yield _snapshot()
    finally:
        if _run("dpkg-query", "-W", PACKAGE, check=False).returncode == 0:
            _apt_get("purge", PACKAGE)
        if not user_existed and _user_exists(PACKAGE):
            _run("userdel", PACKAGE)
            _run("groupdel", PACKAGE, check=False)  # userdel removes it where USERGROUPS_ENAB


def _assert_installed_as_designed(version: str) -> None:
    assert _installed_version() == version
    # The unit, with the command where the package puts it, enabled (but not started: systemd
    # may not even run here, and the package must not need it).
    unit = UNIT.read_text(encoding="utf-8")
    assert "ExecStart=/usr/bin/pg-reaper run -c /etc/pg-reaper/config.toml\n" in unit
    assert ENABLED.resolve() == UNIT.resolve()
    assert Path("/usr/lib/sysusers.d/pg-reaper.conf").is_file()
    # The man page, found by man(1), and the completions.
    assert _run("man", "-w", PACKAGE).stdout.strip() == "/usr/share/man/man1/pg-reaper.1.gz"
    shown = _run("man", PACKAGE, env={**os.environ, "LC_ALL": "C", "MANPAGER": "cat"}).stdout
    assert "COMMAND 'pg-reaper kill'" in shown
    assert Path("/usr/share/bash-completion/completions/pg-reaper").is_file()
    assert Path("/usr/share/zsh/vendor-completions/_pg-reaper").is_file()
    assert ROLE_SQL.read_bytes() == (ROOT / "deploy" / "sql" / "pg_reaper_role.sql").read_bytes()
    # The conffile, in dry run, readable by the service's group only.
    conffiles = _run("dpkg-query", "-W", "-f", "${Conffiles}", PACKAGE).stdout
    assert f" {CONFIG} " in conffiles
    assert CONFIG.stat().st_mode & 0o777 == 0o640
    assert CONFIG.parent.stat().st_mode & 0o777 == 0o750
    assert _run("stat", "-c", "%U:%G", CONFIG, CONFIG.parent).stdout.split() == [
        f"root:{PACKAGE}",
        f"root:{PACKAGE}",
    ]
    # The command, as root and as the service's user.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG_REAPER_")}
    assert _run("/usr/bin/pg-reaper", "--version", env=env).stdout.strip() == f"pg-reaper {VERSION}"
    checked = _run("runuser", "-u", PACKAGE, "--", "pg-reaper", "check-config", env=env, cwd="/")
    assert tomllib.loads(checked.stdout)["reaper"]["dry_run"] is True


def test_deb_installs_upgrades_and_purges_cleanly(
    deb: Path, clean_machine: dict[str, tuple[int, int, int, str]], tmp_path: Path
) -> None:
    before = clean_machine

    _apt_get("install", "--no-install-recommends", deb.resolve())
    _assert_installed_as_designed(f"{VERSION}-1")
    shipped = CONFIG.read_text(encoding="utf-8")
    assert "\ndry_run = true\n" in shipped
    assert "The Debian package installs this file with dry_run = true" in shipped

    # The operator edits the config; an upgrade to a rebuilt package keeps it, asking nothing.
    edited = shipped.replace('interval = "30s"', 'interval = "45s"', 1) + "# edited here\n"
    CONFIG.write_text(edited, encoding="utf-8")
    _run(ROOT / "scripts" / "package", "--deb-revision", "2", "--out", tmp_path, cwd=ROOT)
    (rebuilt,) = tmp_path.glob(f"{PACKAGE}_{VERSION}-2_*.deb")
    _apt_get("install", "--no-install-recommends", rebuilt)
    _assert_installed_as_designed(f"{VERSION}-2")
    assert CONFIG.read_text(encoding="utf-8") == edited
    assert not list(CONFIG.parent.glob("config.toml.dpkg-*"))

    _apt_get("purge", PACKAGE)

    assert _run("dpkg-query", "-W", PACKAGE, check=False).returncode != 0
    after = _snapshot()
    assert sorted(after.keys() - before.keys()) == [], "left behind"
    assert sorted(before.keys() - after.keys()) == [], "removed though not the package's"
    changed = sorted(path for path in before if before[path] != after[path])
    assert changed == [], "changed"
    # Debian keeps a purged package's system user (its uid may still own files); so does this.
    assert _user_exists(PACKAGE)
