"""What is wrong with a config, one line per problem: its key path, what is wrong, and the
environment variable that set the value, if one did. A value is shown only where it cannot be a
secret."""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from reaper.settings._model import Settings
from reaper.settings._values import did_you_mean, toml_repr

if TYPE_CHECKING:
    from collections.abc import Callable

    from pydantic import ValidationError
    from pydantic_core import ErrorDetails
    from pydantic_settings import SettingsError


_ECHO_VALUE = frozenset(
    {"literal_error", "bool_parsing", "bool_type", "int_parsing", "int_type", "string_type"}
)
# Keys whose values are never shown: a password_file may be a password put there by mistake.
_SECRET_KEYS = frozenset({"dsn", "password", "password_file", "sslpassword"})
# Text that may hold a connection string or a password: keyword=value, a URI, a "dsn" key.
_SECRET_TEXT = re.compile(r"(?i)pass|dsn|://|postgres(ql)?:|[a-z_]\s*=")
_MISSING = object()
# The lists written as arrays of tables, [[servers]] and [[policies]].
_TABLE_LISTS = frozenset({("servers",), ("policies",)})

Loc = tuple[int | str, ...]  # a key path as pydantic gives it: ("servers", 0, "dsn")


def explain(error: ValidationError, data: dict[str, Any]) -> list[str]:
    """One line per problem, naming its key path (and the environment variable that set it).

    A value is shown only when it is the scalar at the failing key, not under a secret key, not
    itself secret-looking, and not from an environment variable whose text holds a DSN: the
    messages of the validators quote the value, so a message that may not show it is cut there.
    """
    problems: list[str] = []
    errors = error.errors(include_url=False)
    for item in errors:
        loc = item["loc"]
        if item["type"] == "too_short" and any(len(e["loc"]) > len(loc) for e in errors):
            continue  # a list whose every entry failed is "too short" only as a consequence
        path = key_path(loc)
        origin = _origin(loc, data)
        message = _message(item, origin)
        if not path:  # the model-wide check names each key itself, one line each
            problems.extend(_line_problem(line, data) for line in message.splitlines())
            continue
        if origin.variable:
            message = f"{message} (from the environment variable {origin.variable})"
        problems.append(f"{path}: {message}")
    return problems


def _message(item: ErrorDetails, origin: _Origin) -> str:
    """What is wrong at the key: pydantic's words, or ours for the kinds of error in
    `_BY_KIND`; cut before the value when it may not be shown, the value added when it may."""
    loc = item["loc"]
    ours = _BY_KIND.get(item["type"])
    if ours is not None and (explained := ours(loc)) is not None:
        return explained
    message = str(item["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if origin.secret(loc):  # a validator's message, which may quote the value
        return _without_value(message, item.get("input"))
    if item["type"] in _ECHO_VALUE and origin.shows(loc):
        return f"{message}, got {toml_repr(origin.value)}"
    return message


def _unknown_key(loc: Loc) -> str:
    key = str(loc[-1])
    return f"unknown key {key!r}{did_you_mean(key, _known_keys(loc[:-1]))}"


def _missing(_loc: Loc) -> str:
    return "required key is missing"


def _too_short(loc: Loc) -> str | None:
    """An empty list of servers or policies; pydantic's words for any other list."""
    return f"at least one [[{loc[0]}]] table is required" if loc in _TABLE_LISTS else None


def _not_a_table(loc: Loc) -> str:
    return f"must be a table ([{key_path(loc)}])" if len(loc) == 1 else "must be a table"


class _Origin:
    """Where the value at a key path came from: the file, or an environment variable."""

    __slots__ = ("value", "variable", "variable_text")

    def __init__(self, value: object, variable: str | None, variable_text: str | None) -> None:
        self.value = value  # the value at the key path as given; _MISSING when unknown
        self.variable = variable
        self.variable_text = variable_text

    def secret(self, loc: Loc) -> bool:
        """Whether nothing of the value may show in an error message."""
        if _SECRET_KEYS.intersection(str(part).lower() for part in loc):
            return True
        if self.variable_text is not None and _SECRET_TEXT.search(self.variable_text):
            return True  # a JSON table or list that holds a DSN: nothing of it is shown
        values = self.value if isinstance(self.value, list | tuple) else [self.value]
        return any(isinstance(v, str) and _SECRET_TEXT.search(v) for v in values)

    def shows(self, loc: Loc) -> bool:
        """Whether the value may be echoed: a scalar that is not secret."""
        return isinstance(self.value, str | bool | int | float) and not self.secret(loc)


def _origin(loc: Loc, data: dict[str, Any]) -> _Origin:
    variable = _env_source(loc)
    if variable is None:
        return _Origin(_lookup(data, loc), None, None)
    return _Origin(*variable)


def _not_a_list(loc: Loc) -> str:
    if loc not in _TABLE_LISTS:
        return 'must be a list (a TOML array such as ["a", "b"])'
    key = str(loc[0])
    if variables := _item_variables(key):
        return (
            f"{', '.join(variables)} cannot set one entry of a list: set the whole list as "
            f"JSON in PG_REAPER_{key.upper()}, or edit the file"
        )
    return f"must be an array of tables: write [[{key}]]"


def _item_variables(key: str) -> list[str]:
    """The environment variables that try to set one entry of the list `key`
    (``PG_REAPER_POLICIES__0__MAX_IDLE``): pydantic-settings reads them as a table."""
    prefix = f"PG_REAPER_{key.upper()}__"
    return sorted(name for name in os.environ if name.upper().startswith(prefix))


def _env_source(loc: Loc) -> tuple[object, str, str] | None:
    """The environment variable that set the value at `loc`, if one did: the value at `loc`
    in it (a table or list variable is JSON), its name, and its whole text."""
    # PG_REAPER_REAPER__DRY_RUN for ("reaper", "dry_run"); PG_REAPER_SERVERS for
    # ("servers", 0, "dsn"), whose rest (0, "dsn") is looked up in the JSON.
    prefixes = [i + 1 for i, part in enumerate(loc) if isinstance(part, str)]
    for end in reversed(prefixes):
        names = [str(p) for p in loc[:end] if isinstance(p, str)]
        wanted = ("PG_REAPER_" + "__".join(names)).upper()
        for key, text in os.environ.items():
            if key.upper() != wanted:
                continue
            rest = loc[end:]
            if not rest:
                return text, key, text
            try:
                value = _lookup(json.loads(text), rest)
            except ValueError:
                return _MISSING, key, text
            if value is not _MISSING:
                return value, key, text
            # Set, but without this key: the value came from the file (a partial update).
    return None


def _line_problem(line: str, data: dict[str, Any]) -> str:
    """One line of the model-wide check, ``key.path: message``, as `explain` writes a field's
    problem: its value hidden when it may not be shown, its environment variable named."""
    path, sep, message = line.partition(": ")
    if not sep:
        return line
    loc = tuple(
        int(index) if index else key for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path)
    )
    origin = _origin(loc, data)
    if origin.secret(loc):
        message = _without_value(message, origin.value)
    if origin.variable:
        message = f"{message} (from the environment variable {origin.variable})"
    return f"{path}: {message}"


def _without_value(message: str, value: object) -> str:
    """`message` cut before the first quoted word or the value itself, where the validators put
    the value they refuse."""
    cuts = [i for i in (message.find("'"), message.find('"')) if i >= 0]
    if isinstance(value, str) and value.strip():
        unquoted = re.search(rf"(?<!\w){re.escape(value.strip())}(?!\w)", message)
        cuts.extend([unquoted.start()] if unquoted else [])
    if not cuts:
        return message
    kept = message[: min(cuts)].rstrip(" :,(")
    return f"{kept or 'invalid value'} (value not shown)"


def env_problem(error: SettingsError) -> str:
    """An environment variable for a table or list that is not JSON, named exactly."""
    match = re.search(r'field "(\w+)"', str(error))
    field = match[1] if match else "?"
    name = f"PG_REAPER_{field.upper()}"
    why = "must be JSON for a table or list"
    for key, text in sorted(os.environ.items()):
        upper = key.upper()
        if upper != name and not upper.startswith(name + "__"):
            continue
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:  # its reason and position, never the text
            where = f"{exc.msg}: line {exc.lineno} column {exc.colno}"
            return f"{field}: the environment variable {key} {why} ({where})"
    return f"{field}: the environment variable {name} {why}"


def key_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if not part.isprintable():  # a quoted TOML key may hold a newline or an escape
            part = repr(part)  # noqa: PLW2901 - shown, not used
        if not out:
            out = part
        else:
            out += f".{part}"
    return out


def _lookup(data: object, loc: Loc) -> object:
    """The value at `loc` in `data`; `_MISSING` when there is none."""
    for part in loc:
        try:
            data = data[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return data


def _known_keys(loc: Loc) -> list[str]:
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        inner = getattr(annotation, "__args__", (annotation,))[0]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif isinstance(inner, type) and issubclass(inner, BaseModel):
            model = inner
        else:
            return []
    return list(model.model_fields)


# Our words for the kinds of error whose pydantic words would not help in a TOML file (None:
# pydantic's words after all).
_BY_KIND: dict[str, Callable[[Loc], str | None]] = {
    "extra_forbidden": _unknown_key,
    "missing": _missing,
    "too_short": _too_short,
    "tuple_type": _not_a_list,
    "model_type": _not_a_table,
}
