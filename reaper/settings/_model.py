"""`Settings`: the whole validated configuration, the one type the rest of pg-reaper sees."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from reaper.settings import _sections as sections
from reaper.settings._durations import format_duration
from reaper.settings._values import did_you_mean

if TYPE_CHECKING:
    from datetime import timedelta


class Settings(BaseSettings):
    """The whole validated configuration. Environment variables override the file."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="PG_REAPER_",
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    reaper: sections.ReaperSection = sections.ReaperSection()
    metrics: sections.MetricsSection = sections.MetricsSection()
    log: sections.LogSection = sections.LogSection()
    audit: sections.AuditSection = sections.AuditSection()
    ha: sections.HaSection = sections.HaSection()
    notify: sections.NotifySection = sections.NotifySection()
    servers: tuple[sections.ServerConfig, ...] = Field(min_length=1)
    policies: tuple[sections.PolicyConfig, ...] = Field(min_length=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],  # noqa: ARG003 - part of the hook's signature
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no .env files
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - secrets via password_file
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: the environment overrides what the TOML file (passed as init data) says.
        return env_settings, init_settings

    @model_validator(mode="after")
    def _references(self) -> Self:
        problems = []
        defined = [p.name for p in self.policies]
        for kind, names in (("servers", [s.name for s in self.servers]), ("policies", defined)):
            for index, name in enumerate(names):
                if name in names[:index]:
                    problems.append(f"{kind}[{index}].name: duplicate name {name!r}")
        for index, server in enumerate(self.servers):
            problems.extend(self._interval_problems(index, server))
            for ref in server.policies or ():
                if ref not in defined:
                    hint = did_you_mean(ref, defined)
                    problems.append(f"servers[{index}].policies: undefined policy {ref!r}{hint}")
        if problems:  # each line names its own key; a [reaper] value wrong for many servers once
            raise ValueError("\n".join(dict.fromkeys(problems)))
        return self

    def _interval_problems(self, index: int, server: sections.ServerConfig) -> list[str]:
        """The server's interval beside min_interval, and its pressure_probe_interval beside its
        interval, each named by the key it was set with (the server's own, or [reaper]'s)."""
        problems = []
        if server.interval is not None and server.interval < self.reaper.min_interval:
            problems.append(
                f"servers[{index}].interval: {format_duration(server.interval)} is shorter "
                f"than reaper.min_interval ({format_duration(self.reaper.min_interval)})"
            )
        of = "reaper.interval" if server.interval is None else f"servers[{index}].interval"
        problem = sections.probe_interval_problem(
            self.probe_interval_for(server), self.interval_for(server), of=of
        )
        if problem is not None:
            key = "reaper" if server.pressure_probe_interval is None else f"servers[{index}]"
            problems.append(f"{key}.pressure_probe_interval: {problem}")
        return problems

    def policies_for(self, server: sections.ServerConfig) -> tuple[sections.PolicyConfig, ...]:
        """The policies that apply to `server`, in file order (the first match names a session)."""
        if server.policies is None:
            return self.policies
        wanted = set(server.policies)
        return tuple(p for p in self.policies if p.name in wanted)

    def interval_for(self, server: sections.ServerConfig) -> timedelta:
        return server.interval or self.reaper.interval

    def probe_interval_for(self, server: sections.ServerConfig) -> timedelta:
        """How often `server`'s connection count is probed between polls (0: never)."""
        if server.pressure_probe_interval is not None:
            return server.pressure_probe_interval
        return self.reaper.pressure_probe_interval

    def with_dry_run(self) -> Settings:
        return self.model_copy(update={"reaper": self.reaper.model_copy(update={"dry_run": True})})

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets replaced: safe to print."""
        data = self.model_dump(mode="json")
        for server, raw in zip(self.servers, data["servers"], strict=True):
            raw["dsn"] = server.redacted_dsn
        data["audit"]["dsn"] = self.audit.redacted_dsn
        data["notify"]["urls"] = self.notify.redacted_urls
        return data
