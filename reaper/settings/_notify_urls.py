"""[notify]'s apprise URLs: loading apprise (an optional extra) quietly, checking a URL, and
showing one without its secrets.

An apprise URL holds the service's credentials (a webhook token, a bot token, a password), often
in the place a host would be (``slack://TokenA/TokenB/TokenC``): it is a secret as a whole.
`redact_url` keeps the scheme, and the host and port only for the schemes whose host is a
network host; everything else becomes ``…``.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["INSTALL_HINT", "AppriseMissing", "check_url", "load_apprise", "redact_url"]

INSTALL_HINT = "install the extra pg-reaper[notify] (pip install 'pg-reaper[notify]')"
HIDDEN = "…"

# Schemes whose host part is a network host, not a token: the generic webhooks, e-mail and the
# self-hosted services addressed by host name. Any other scheme is shown as "scheme://…".
_HOSTED_SCHEMES = frozenset(
    {
        "json",
        "jsons",
        "xml",
        "xmls",
        "form",
        "forms",
        "mailto",
        "mailtos",
        "gotify",
        "gotifys",
        "mmost",
        "mmosts",
        "apprise",
        "apprises",
        "rocket",
        "rockets",
    }
)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}", re.ASCII)
_HOST = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]", re.ASCII
)
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
# Loggers that could write a URL (or a part of one) to stderr on their own: apprise's (its
# plugins' debug lines name the request URL) and urllib3's (connection lines name the path).
_QUIET_LOGGERS = ("apprise", "urllib3")


_plugins_loaded = threading.Event()


class AppriseMissing(Exception):  # noqa: N818 - a reason, said as it is
    """[notify] urls are set, and apprise is not installed."""


def load_apprise() -> ModuleType:
    """The apprise module, imported now (only when [notify] has URLs: nothing on the reaping path
    imports it otherwise), with its loggers silenced: pg-reaper says what failed in its own
    events, with redacted URLs. `AppriseMissing` when it is not installed."""
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.propagate = False
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())
    try:
        import apprise  # noqa: PLC0415 - an optional extra, imported only when configured
    except ImportError:
        raise AppriseMissing(f"apprise is not installed: {INSTALL_HINT}") from None
    if not _plugins_loaded.is_set():
        # Apprise loads its plugins on first use; its e-mail plugin imports the standard
        # library's imghdr, deprecated before Python 3.13 (an error where warnings are errors).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            apprise.Apprise.instantiate("json://localhost")
        _plugins_loaded.set()
    return apprise


def check_url(url: str) -> str:
    """`url`, if apprise can make a service of it; else a ValueError that never quotes it."""
    apprise = load_apprise()
    shown = redact_url(url)
    if url != url.strip() or any(c.isspace() for c in url):
        raise ValueError(f"not one apprise URL ({shown}): it holds white space")
    try:
        service = apprise.Apprise.instantiate(url, suppress_exceptions=True)
    except Exception:  # noqa: BLE001 - whatever a plugin raises, the URL is unusable
        service = None
    if service is None:
        raise ValueError(
            f"apprise cannot use this URL ({shown}): check its scheme and fields in the "
            "documentation of apprise for the service"
        )
    return url


def redact_url(url: str) -> str:
    """`url` with its secrets hidden: ``json://127.0.0.1:8080/…``, ``mailto://…@example.com``,
    ``slack://…``; ``…`` when it has no scheme pg-reaper can show."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or not _SCHEME.fullmatch(scheme):
        return HIDDEN
    if scheme not in _HOSTED_SCHEMES:
        return f"{scheme}://{HIDDEN}"
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, hostport = authority.rpartition("@")
    host, port = _split_port(hostport)
    if (
        host is None
        or not _HOST.fullmatch(host)
        or (port is not None and not _PORT.fullmatch(port))
    ):
        return f"{scheme}://{HIDDEN}"
    shown = f"{scheme}://{HIDDEN + '@' if at or userinfo else ''}{host}"
    if port is not None:
        shown += f":{port}"
    if len(rest) > len(authority):
        shown += f"/{HIDDEN}"
    return shown


def _split_port(hostport: str) -> tuple[str | None, str | None]:
    """(host, port) of ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; (None, None) when it
    is none of them."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            return None, None
        host, after = hostport[: end + 1], hostport[end + 1 :]
        if not after:
            return host, None
        return (host, after[1:]) if after.startswith(":") else (None, None)
    host, colon, port = hostport.partition(":")
    return host, (port if colon else None)
