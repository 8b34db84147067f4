"""Reading the config file: TOML, validated into `Settings`, every problem named."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from reaper.settings._explain import env_problem, explain, key_path
from reaper.settings._model import Settings

DEFAULT_CONFIG_PATH = Path("/etc/pg-reaper/config.toml")


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per thing that is wrong."""

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """`-c FILE`, else ``$PG_REAPER_CONFIG``, else ``/etc/pg-reaper/config.toml``."""
    if path:
        return Path(path)
    from_env = os.environ.get("PG_REAPER_CONFIG")
    return Path(from_env) if from_env else DEFAULT_CONFIG_PATH


def load_settings(path: Path) -> Settings:
    """Read, parse and validate `path`; raise `ConfigError` naming every problem."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"]) from None
    # pydantic-settings reads keyword arguments starting with "_" as its own options
    # (_env_prefix, _cli_parse_args, ...): in the file they are unknown keys like any other.
    private = [key for key in data if key.startswith("_")]
    if private:
        raise ConfigError([f"{key_path((key,))}: unknown key {key!r}" for key in private])
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(explain(exc, data)) from None
    except SettingsError as exc:  # an environment variable that is not valid JSON for a table
        raise ConfigError([env_problem(exc)]) from None
