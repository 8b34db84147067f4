"""Logging: structlog set up once; JSON lines unless on a TTY; audit events with flat fields."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, TextIO

import structlog

if TYPE_CHECKING:
    from reaper.settings import LogSection

__all__ = ["configure", "get_logger"]


def configure(section: LogSection, *, stream: TextIO | None = None) -> None:
    """Send every event to `stream` (stderr by default) as JSON lines or console text."""
    out = stream if stream is not None else sys.stderr
    fmt = section.format
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[section.level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> Any:  # noqa: ANN401 - structlog's bound loggers are untyped proxies
    return structlog.get_logger("pg-reaper", **context)
