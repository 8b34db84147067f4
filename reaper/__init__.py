"""pg-reaper: keeps PostgreSQL servers free of stale sessions."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pg-reaper")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

APPLICATION_NAME = "pg-reaper"

__all__ = ["APPLICATION_NAME", "__version__"]
