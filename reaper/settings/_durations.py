"""Durations in the config: ``"90s"``, ``"15m"``, ``"1h30m"``, ``"2d"``, ``"500ms"``, or seconds."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_DURATION = re.compile(
    r"(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m(?!s))?(?:(?P<s>\d+)s)?(?:(?P<ms>\d+)ms)?",
    re.ASCII,
)


def parse_duration(value: object) -> timedelta:
    """Parse ``"90s"``, ``"15m"``, ``"1h30m"``, ``"2d"``, ``"500ms"`` or integer seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(  # noqa: TRY004 - pydantic reports ValueError
            f"invalid duration {value!r}: use a string such as '90s', '15m', '1h30m'"
        )
    text = value.strip() if isinstance(value, str) else str(value)
    if re.fullmatch(r"-?\d+", text, re.ASCII) or text.startswith("-"):
        if text.startswith("-"):
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        try:
            return timedelta(seconds=int(text))
        except OverflowError:
            raise ValueError(f"invalid duration {value!r}: too long") from None
    match = _DURATION.fullmatch(text)
    if not text or match is None or not any(match.groupdict().values()):
        raise ValueError(
            f"invalid duration {value!r}: use units d, h, m, s, ms as in '90s', '15m', '1h30m'"
        )
    parts = {unit: int(amount) for unit, amount in match.groupdict().items() if amount}
    try:
        return timedelta(
            days=parts.get("d", 0),
            hours=parts.get("h", 0),
            minutes=parts.get("m", 0),
            seconds=parts.get("s", 0),
            milliseconds=parts.get("ms", 0),
        )
    except OverflowError:
        raise ValueError(f"invalid duration {value!r}: too long") from None


def format_duration(value: timedelta) -> str:
    """The shortest spelling `parse_duration` reads back: ``1h30m``, ``90s`` is ``1m30s``."""
    total_ms = round(value.total_seconds() * 1000)
    if total_ms == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        amount, total_ms = divmod(total_ms, size)
        if amount:
            out.append(f"{amount}{unit}")
    if total_ms:
        out.append(f"{total_ms}ms")
    return "".join(out)


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be greater than 0")
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
PositiveDuration = Annotated[
    timedelta,
    BeforeValidator(lambda v: _positive(parse_duration(v))),
    PlainSerializer(format_duration, return_type=str),
]
