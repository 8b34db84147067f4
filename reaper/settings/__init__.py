"""The configuration: one TOML file, validated strictly into one frozen model.

Everything else in pg-reaper only ever sees `Settings`. Errors name the key path and the bad
value (``policies[1].max_idle: invalid duration '15 mins'``); secrets never appear in them.

The modules behind it, by concern: `_durations`, `_values` and `_notify_urls` (the value types),
`_sections` (one model per table of the file), `_model` (`Settings`), `_loading` (file and
environment), `_explain` (one line per problem, secrets left out).
"""

from __future__ import annotations

from reaper.settings._durations import format_duration, parse_duration
from reaper.settings._loading import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    load_settings,
    resolve_config_path,
)
from reaper.settings._model import Settings
from reaper.settings._notify_urls import AppriseMissing, load_apprise, redact_url
from reaper.settings._sections import (
    ACTIVE_STATES,
    ALL_STATES,
    DEFAULT_LOCK_KEY,
    IDLE_STATES,
    THRESHOLDS,
    AuditSection,
    HaSection,
    LogSection,
    MetricsSection,
    NotifySection,
    PolicyConfig,
    ReaperSection,
    ServerConfig,
    default_instance_id,
)
from reaper.settings._values import ClientNetwork

__all__ = [
    "ACTIVE_STATES",
    "ALL_STATES",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_LOCK_KEY",
    "IDLE_STATES",
    "THRESHOLDS",
    "AppriseMissing",
    "AuditSection",
    "ClientNetwork",
    "ConfigError",
    "HaSection",
    "LogSection",
    "MetricsSection",
    "NotifySection",
    "PolicyConfig",
    "ReaperSection",
    "ServerConfig",
    "Settings",
    "default_instance_id",
    "format_duration",
    "load_apprise",
    "load_settings",
    "parse_duration",
    "redact_url",
    "resolve_config_path",
]
