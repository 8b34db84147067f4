"""The other value types of the config: regexes, client networks, names, percentages, password
files; and how a value or a close key is written in an error message."""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BeforeValidator, PlainSerializer

if TYPE_CHECKING:
    from pathlib import Path


def _compile_regex(value: object) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    if not isinstance(value, str):
        raise ValueError(f"invalid regex {value!r}: must be a string")  # noqa: TRY004 - pydantic reports ValueError
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regex {value!r}: {exc}") from None


Regex = Annotated[
    re.Pattern[str],
    BeforeValidator(_compile_regex),
    PlainSerializer(lambda p: p.pattern, return_type=str),
]

ClientNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network | Literal["local"]


def _parse_network(value: object) -> ClientNetwork:
    if value == "local":
        return "local"
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 - pydantic reports ValueError
            f"invalid CIDR {value!r}: must be a string such as '10.0.0.0/8' or 'local'"
        )
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        hint = ""
        with contextlib.suppress(ValueError):
            hint = f" (did you mean '{ipaddress.ip_network(value.strip(), strict=False)}'?)"
        raise ValueError(f"invalid CIDR {value!r}: {exc}{hint}") from None


Network = Annotated[
    ClientNetwork,
    BeforeValidator(_parse_network),
    PlainSerializer(str, return_type=str),
]

_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,63}")


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value) or value.strip() != value:
        raise ValueError(
            f"invalid name {value!r}: 1 to 63 printable characters, no surrounding spaces"
        )
    return value


Name = Annotated[str, BeforeValidator(lambda v: _check_name(v) if isinstance(v, str) else v)]


def _parse_percentage(value: object) -> int:
    """``"80%"`` -> 80: a whole percentage from 1% to 100%, always written with its sign (a bare
    80 or 0.8 would be ambiguous)."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 - pydantic reports ValueError
            f"invalid percentage {toml_repr(value)}: write it as a string such as '80%'"
        )
    text = value.strip()
    if re.fullmatch(r"\d+", text, re.ASCII):
        raise ValueError(f"invalid percentage {value!r}: write the % sign, as in '{text}%'")
    if not re.fullmatch(r"\d+%", text, re.ASCII):
        raise ValueError(
            f"invalid percentage {value!r}: use a whole percentage from '1%' to '100%', "
            "such as '80%'"
        )
    percent = int(text[:-1])
    if not 1 <= percent <= 100:
        raise ValueError(f"invalid percentage {value!r}: must be from '1%' to '100%'")
    return percent


Percentage = Annotated[
    int,
    BeforeValidator(_parse_percentage),
    PlainSerializer(lambda v: f"{v}%", return_type=str),
]


def readable_password_file(value: Path | None) -> Path | None:
    """A password file must exist and be readable now (its contents are read at each connect)."""
    if value is not None and not os.access(value, os.R_OK):
        why = "does not exist" if not value.exists() else "is not readable"
        # The path is not shown: it may be a password put there by mistake.
        raise ValueError(f"password file (path not shown) {why}")
    return value


def toml_repr(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
