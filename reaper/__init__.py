"""pg-reaper: keeps PostgreSQL servers free of stale sessions."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("pg-reaper")  # pyproject.toml's, the one place the version is set
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

APPLICATION_NAME = "pg-reaper"

__all__ = ["APPLICATION_NAME", "__version__", "version_text"]


def version_text() -> str:
    """What `pg-reaper --version` prints: the version, and the commit when run from a checkout."""
    commit = _checkout_commit(Path(__file__).resolve().parent.parent)
    return f"pg-reaper {__version__}" + (f" (commit {commit[:12]})" if commit else "")


def _checkout_commit(root: Path) -> str | None:
    """HEAD's commit of the git checkout at root, read from its files: no git program runs (a
    checkout's config can make git run commands), and a missing or odd one just gives None."""
    try:
        git = root / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            git = (root / git.read_text(encoding="utf-8").partition(":")[2].strip()).resolve()
        common = git
        if (git / "commondir").is_file():  # a worktree's branches live in the main repository
            common = (git / (git / "commondir").read_text(encoding="utf-8").strip()).resolve()
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref: "):
            return head or None  # detached
        ref = head.removeprefix("ref: ")
        for directory in (git, common):
            if (directory / ref).is_file():
                return (directory / ref).read_text(encoding="utf-8").strip() or None
        for line in (common / "packed-refs").read_text(encoding="utf-8").splitlines():
            commit, _, name = line.partition(" ")
            if name == ref:
                return commit
    except OSError:
        return None
    return None
