"""libpq connection strings (keyword/value and URIs): parsed, built, and redacted for printing.

`parse_conninfo` reads a DSN exactly as libpq's PQconninfoParse does (fe-connect.c:
conninfo_parse for ``host=db port=5432``, conninfo_uri_parse_options for
``postgresql://user:password@host:port,host2/dbname?key=value``), without libpq: the config
model checks every DSN before anything connects. It works on the UTF-8 bytes, as libpq does,
so that its error positions are libpq's. Its errors never hold any part of the DSN: where
libpq quotes the offending word (which may be a password) they say ``…``.
"""

from __future__ import annotations

import re

__all__ = ["KEYWORDS", "SECRET_KEYWORDS", "make_conninfo", "parse_conninfo", "redact_conninfo"]

# libpq's keywords (PQconninfoOptions in fe-connect.c), in its order, as of libpq 18: a parsed
# DSN lists its keywords in this order, as libpq's does. A keyword not here is refused.
KEYWORDS = (
    *("service", "user", "password", "passfile", "channel_binding", "connect_timeout"),
    *("dbname", "host", "hostaddr", "port", "client_encoding", "options", "application_name"),
    *("fallback_application_name", "keepalives", "keepalives_idle", "keepalives_interval"),
    *("keepalives_count", "tcp_user_timeout", "sslmode", "sslnegotiation", "sslcompression"),
    *("sslcert", "sslkey", "sslcertmode", "sslpassword", "sslrootcert", "sslcrl", "sslcrldir"),
    *("sslsni", "requirepeer", "require_auth", "min_protocol_version", "max_protocol_version"),
    *("ssl_min_protocol_version", "ssl_max_protocol_version", "gssencmode", "krbsrvname"),
    *("gsslib", "gssdelegation", "replication", "target_session_attrs", "load_balance_hosts"),
    *("scram_client_key", "scram_server_key", "oauth_issuer", "oauth_client_id"),
    *("oauth_client_secret", "oauth_scope", "sslkeylogfile"),
)
# The keywords libpq hides (dispchar "*"): their values are never printed.
SECRET_KEYWORDS = frozenset({"password", "sslpassword", "oauth_client_secret"})

_BY_BYTES = {keyword.encode(): keyword for keyword in KEYWORDS}
_URI_PREFIXES = (b"postgresql://", b"postgres://")
_BLANKS = frozenset(b" \t\n\v\f\r")  # isspace() of the C locale, which libpq parses with
_CLOSING_QUOTE, _BACKSLASH = frozenset(b"'"), ord("\\")
_USERINFO_END = re.compile(rb"[@/]")
_HOST_END = re.compile(rb"[:/?,]")
_PORT_END = re.compile(rb"[/?,]")
_QUERY = re.compile(rb"\?")
_SPACE_BYTE = re.compile(rb" ")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})?")
_SPACE = re.compile(r"\s")
_ESCAPED = re.compile(r"([\\'])")


def parse_conninfo(dsn: str) -> dict[str, str]:
    """Parse a libpq conninfo string or URI; `ValueError` (secret-free) when it is malformed."""
    if "\x00" in dsn:  # libpq would silently stop reading there, dropping what follows
        raise _invalid("it contains a NUL character")
    try:
        raw = dsn.encode()
    except UnicodeEncodeError:  # a lone surrogate, from an undecodable environment variable
        raise _invalid("it is not valid Unicode text") from None
    prefix = next((len(p) for p in _URI_PREFIXES if raw.startswith(p)), 0)
    values = _parse_uri(raw, prefix) if prefix else _parse_keywords(raw)
    try:
        return {keyword: values[keyword].decode() for keyword in KEYWORDS if keyword in values}
    except UnicodeDecodeError:
        raise _invalid("a percent-encoded value is not UTF-8 text") from None


def make_conninfo(conninfo: str = "", **params: str | int | None) -> str:
    """`conninfo` with `params` set in it (None leaves a keyword out), in keyword/value form.

    The same string as psycopg's make_conninfo: each value quoted and escaped only as libpq
    needs. `ValueError` if the result is not a valid connection string.
    """
    if not params:
        parse_conninfo(conninfo)
        return str(conninfo)
    merged: dict[str, object] = dict(parse_conninfo(conninfo)) if conninfo else {}
    merged.update((k, v) for k, v in params.items() if v is not None)
    result = " ".join(f"{keyword}={_quote(str(value))}" for keyword, value in merged.items())
    parse_conninfo(result)
    return result


def redact_conninfo(dsn: str) -> str:
    """The DSN in keyword form with every secret replaced: safe to print and log."""
    try:
        params = parse_conninfo(dsn)
    except ValueError:
        return "<invalid connection string>"
    return make_conninfo(
        **{k: "********" if k in SECRET_KEYWORDS else v for k, v in params.items()}
    )


def _invalid(why: str) -> ValueError:
    return ValueError(f"invalid connection string: {why}")


def _quote(value: str) -> str:
    if not value:
        return "''"
    value = _ESCAPED.sub(r"\\\1", value)
    return f"'{value}'" if _SPACE.search(value) else value


def _store(values: dict[str, bytes], keyword: bytes, value: bytes, *, unknown: str) -> None:
    """Set `keyword`, as libpq's conninfo_storeval does; raise `unknown` for a keyword not its."""
    if keyword == b"requiressl":  # libpq still reads the keyword sslmode replaced
        keyword, value = b"sslmode", b"require" if value.startswith(b"1") else b"prefer"
    name = _BY_BYTES.get(keyword)
    if name is None:
        raise _invalid(unknown)
    values[name] = value


# --- keyword/value -----------------------------------------------------------------------------


def _parse_keywords(raw: bytes) -> dict[str, bytes]:
    values: dict[str, bytes] = {}
    pos = _skip_blanks(raw, 0)
    while pos < len(raw):
        keyword, pos = _keyword(raw, pos)
        value, pos = _quoted(raw, pos) if raw[pos : pos + 1] == b"'" else _unquoted(raw, pos)
        _store(values, keyword, value, unknown="invalid connection option …")
        pos = _skip_blanks(raw, pos)
    return values


def _skip_blanks(raw: bytes, pos: int) -> int:
    while pos < len(raw) and raw[pos] in _BLANKS:
        pos += 1
    return pos


def _keyword(raw: bytes, pos: int) -> tuple[bytes, int]:
    """The keyword at `pos`, and where its value starts: past the ``=`` and the blanks around."""
    end = pos
    while end < len(raw) and raw[end] != ord("=") and raw[end] not in _BLANKS:
        end += 1
    equals = _skip_blanks(raw, end)
    if raw[equals : equals + 1] != b"=":
        raise _invalid("missing = after … in connection info string")
    return raw[pos:end], _skip_blanks(raw, equals + 1)


def _unquoted(raw: bytes, pos: int) -> tuple[bytes, int]:
    """A value up to the next blank; a backslash makes the byte after it plain (a blank too)."""
    return _escaped(raw, pos, _BLANKS)


def _quoted(raw: bytes, pos: int) -> tuple[bytes, int]:
    """A value in single quotes, at `pos`; a backslash makes the byte after it plain."""
    value, end = _escaped(raw, pos + 1, _CLOSING_QUOTE)
    if end == len(raw):
        raise _invalid("unterminated quoted string in connection info string")
    return value, end + 1


def _escaped(raw: bytes, pos: int, stop: frozenset[int]) -> tuple[bytes, int]:
    """The bytes from `pos` up to one of `stop` (or the end), backslash escapes undone."""
    out = bytearray()
    while pos < len(raw) and raw[pos] not in stop:
        if raw[pos] == _BACKSLASH:
            pos += 1
            if pos == len(raw):
                break
        out.append(raw[pos])
        pos += 1
    return bytes(out), pos


# --- URI ---------------------------------------------------------------------------------------


def _parse_uri(raw: bytes, prefix: int) -> dict[str, bytes]:
    """``scheme://[user[:password]@][host][:port][,...][/dbname][?key=value&...]``; every part
    but the scheme percent-decoded, the empty ones left out."""
    values: dict[str, bytes] = {}
    pos = prefix
    userinfo_end = _USERINFO_END.search(raw, pos)
    if userinfo_end and userinfo_end[0] == b"@":
        user, colon, password = raw[pos : userinfo_end.start()].partition(b":")
        if user:
            _store(values, b"user", _uri_decode(user), unknown="")
        if colon and password:
            _store(values, b"password", _uri_decode(password), unknown="")
        pos = userinfo_end.end()
    hosts, ports, pos = _netlocs(raw, pos)
    if hosts:
        _store(values, b"host", _uri_decode(hosts), unknown="")
    if ports:
        _store(values, b"port", _uri_decode(ports), unknown="")
    if raw[pos : pos + 1] == b"/":
        query = _until(_QUERY, raw, pos)
        if query > pos + 1:  # an empty dbname is left unset, as libpq leaves it
            _store(values, b"dbname", _uri_decode(raw[pos + 1 : query]), unknown="")
        pos = query
    if pos < len(raw):  # at the "?"
        _parse_query(values, raw[pos + 1 :])
    return values


def _netlocs(raw: bytes, pos: int) -> tuple[bytes, bytes, int]:
    """The comma-separated ``host[:port]`` list at `pos`: the hosts and the ports (both still
    percent-encoded, joined by commas as libpq joins them) and where the list ends."""
    hosts, ports = [], []
    while True:
        host, pos = _host(raw, pos)
        port = b""
        if raw[pos : pos + 1] == b":":
            end = _until(_PORT_END, raw, pos + 1)
            port, pos = raw[pos + 1 : end], end
        hosts.append(host)
        ports.append(port)
        if raw[pos : pos + 1] != b",":
            return b",".join(hosts), b",".join(ports), pos
        pos += 1


def _host(raw: bytes, pos: int) -> tuple[bytes, int]:
    """One host name or address at `pos` (an IPv6 address in brackets), and where it ends."""
    if raw[pos : pos + 1] != b"[":
        end = _until(_HOST_END, raw, pos)
        return raw[pos:end], end
    close = raw.find(b"]", pos + 1)
    if close < 0:
        raise _invalid(
            "end of string reached when looking for matching ] in IPv6 host address in URI: …"
        )
    if close == pos + 1:
        raise _invalid("IPv6 host address may not be empty in URI: …")
    after = close + 1
    if after < len(raw) and raw[after : after + 1] not in (b":", b"/", b"?", b","):
        raise _invalid(
            f"unexpected character … at position {after + 1} in URI (expected : or /): …"
        )
    return raw[pos + 1 : close], after


def _until(stop: re.Pattern[bytes], raw: bytes, pos: int) -> int:
    """Where the next byte of `stop` is, from `pos`; the end when there is none."""
    found = stop.search(raw, pos)
    return found.start() if found else len(raw)


def _parse_query(values: dict[str, bytes], query: bytes) -> None:
    """``key=value&...``, each side percent-decoded; ``ssl=true`` means sslmode=require."""
    pairs = query.split(b"&")
    if pairs[-1] == b"":  # nothing after a final "&" (or after the "?")
        pairs.pop()
    for pair in pairs:
        keyword, equals, value = pair.partition(b"=")
        if not equals:
            raise _invalid("missing key/value separator = in URI query parameter: …")
        if b"=" in value:
            raise _invalid("extra key/value separator = in URI query parameter: …")
        keyword, value = _uri_decode(keyword), _uri_decode(value)
        if (keyword, value) == (b"ssl", b"true"):  # as JDBC writes it
            keyword, value = b"sslmode", b"require"
        _store(values, keyword, value, unknown="invalid URI query parameter: …")


def _uri_decode(text: bytes) -> bytes:
    """`text` percent-decoded; spaces around it are dropped, spaces inside it refused."""
    text = text.lstrip(b" ")
    end = _until(_SPACE_BYTE, text, 0)
    decoded = _PERCENT.sub(_percent_byte, text[:end])
    if text[end:].lstrip(b" "):
        raise _invalid("unexpected spaces found in …, use percent-encoded spaces (%20) instead")
    return decoded


def _percent_byte(match: re.Match[bytes]) -> bytes:
    if match[1] is None:
        raise _invalid("invalid percent-encoded token: …")
    byte = int(match[1], 16)
    if byte == 0:
        raise _invalid("forbidden value %00 in percent-encoded value: …")
    return bytes([byte])
