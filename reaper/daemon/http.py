"""One HTTP listener: /metrics for Prometheus, /healthz and /readyz for supervisors.

The port can be reachable by others than Prometheus (a pod IP, a host address), so the listener
bounds what any client can hold:

- One thread accepts connections and waits, with a selector, until each has sent its whole
  request head; only then does a handler thread take it. A client that connects and sends
  nothing, or trickles bytes, holds a file descriptor for at most `request_timeout`, never a
  thread, so it cannot stop a scrape.
- A fixed pool of `workers` handler threads runs the WSGI application (wsgiref parses the
  request); each connection has `request_timeout` for the rest of its request and its response.
- At most `max_connections` connections are open; past that the one that has waited longest
  for its request head is dropped to make room.

Addresses (see docs/daemon.md): `127.0.0.1:9188` and `[::1]:9188` bind that address;
`[::]:9188` is dual-stack where the OS allows it; `:9188` means every address (dual-stack `::`,
else `0.0.0.0`); a host name binds every address it resolves to at start.
"""

from __future__ import annotations

import contextlib
import errno
import io
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from socketserver import BaseServer
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import make_wsgi_app

from reaper.observe.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from _typeshed import ReadableBuffer, WriteableBuffer
    from _typeshed.wsgi import WSGIApplication
    from prometheus_client import CollectorRegistry

__all__ = [
    "MAX_CONNECTIONS",
    "REQUEST_TIMEOUT_SECONDS",
    "WORKERS",
    "HttpServer",
    "bind",
    "parse_listen",
]

WORKERS = 4  # a scrape takes milliseconds; Prometheus and a probe or two never need more
REQUEST_TIMEOUT_SECONDS = 5.0  # for the request head, then again for the rest and the response
MAX_CONNECTIONS = 128
_MAX_HEAD = 64 * 1024  # past this, wsgiref gets the request as it is (and refuses it)
_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
_BACKLOG = 64
# The address is not configured on this host, or its family is not supported: skip it when a
# host name resolves to several addresses (as PostgreSQL's listen_addresses does).
_UNBINDABLE = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT})


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` -> (host without brackets, port); an empty host means every address."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def bind(listen: str) -> list[socket.socket]:
    """Listening sockets for `listen` (see the module docstring); OSError when none can bind."""
    host, port = parse_listen(listen)
    if not host:
        if socket.has_dualstack_ipv6():
            return [_listener("::", port, socket.AF_INET6, dualstack=True)]
        return [_listener("0.0.0.0", port, socket.AF_INET)]  # noqa: S104 - asked for
    if host == "::" and socket.has_dualstack_ipv6():
        return [_listener("::", port, socket.AF_INET6, dualstack=True)]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(
        dict.fromkeys((family, (str(address[0]), int(address[1]))) for family, *_, address in infos)
    )
    sockets: list[socket.socket] = []
    skipped: OSError | None = None
    try:
        for family, (address, wanted_port) in addresses:
            # Port 0 (tests): every address of a name shares the port the first one got.
            bound_port = sockets[0].getsockname()[1] if sockets else wanted_port
            try:
                sockets.append(_listener(address, bound_port, family))
            except OSError as exc:
                if len(addresses) == 1 or exc.errno not in _UNBINDABLE:
                    raise
                skipped = exc
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        assert skipped is not None  # noqa: S101 - getaddrinfo returns at least one address
        raise skipped
    return sockets


def _listener(address: str, port: int, family: int, *, dualstack: bool = False) -> socket.socket:
    # IPv6 sockets are IPv6-only unless dualstack: an address means that address.
    return socket.create_server(
        (address, port), family=family, backlog=_BACKLOG, dualstack_ipv6=dualstack
    )


def _make_app(
    registry: CollectorRegistry, *, healthy: Callable[[], bool], ready: Callable[[], bool]
) -> WSGIApplication:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in {"/healthz", "/readyz"}:
            ok = healthy() if path == "/healthz" else ready()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n" if ok else b"not ready\n"]
        if path in {"/metrics", "/"}:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


class HttpServer:
    def __init__(  # noqa: PLR0913 - the limits are keyword-only knobs for tests
        self,
        *,
        listen: str,
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        workers: int = WORKERS,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._sockets = bind(listen)
        self.port: int = self._sockets[0].getsockname()[1]
        self._context = _Context(_make_app(registry, healthy=healthy, ready=ready), self.port)
        self._timeout = request_timeout
        self._max_connections = max_connections
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pg-reaper-http")
        self._waiting: dict[socket.socket, _Waiting] = {}  # accepted, head not yet complete
        self._handed_over: set[socket.socket] = set()  # queued for or held by a handler thread
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        # stop() writes a byte here: the accepting thread sleeps until a client or stop() comes,
        # rather than waking every so often to look.
        self._stop_reader, self._stop_writer = socket.socketpair()
        self._log = get_logger()
        self._thread = threading.Thread(target=self._serve, name="pg-reaper-http", daemon=True)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for sock in self._sockets]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._stop_writer.send(b"\0")
        if self._thread.is_alive():
            self._thread.join()
        for sock in (*self._sockets, self._stop_reader, self._stop_writer):
            sock.close()
        for conn in list(self._waiting):
            self._drop(conn)
        with self._lock:
            for conn in self._handed_over:  # wakes a handler blocked on this client
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ the accepting thread

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            for listener in self._sockets:
                listener.settimeout(0.0)  # non-blocking
                selector.register(listener, selectors.EVENT_READ)
            selector.register(self._stop_reader, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select(self._next_wait()):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)  # noqa: S101 - only sockets registered
                    if sock is self._stop_reader:
                        break
                    if sock in self._sockets:
                        self._accept(selector, sock)
                    elif sock in self._waiting:  # not dropped earlier in this round
                        self._read_head(selector, sock)
                self._drop_expired(selector)

    def _next_wait(self) -> float | None:
        """Until the oldest client's head is due; with none waiting, until something comes."""
        if not self._waiting:
            return None
        oldest = next(iter(self._waiting.values()))  # dicts keep accept order
        return max(0.0, oldest.deadline - time.monotonic())

    def _accept(self, selector: selectors.BaseSelector, listener: socket.socket) -> None:
        try:
            conn, address = listener.accept()
        except BlockingIOError:
            return  # another address's client, or one that already went away
        except OSError as exc:  # out of file descriptors: make room, then try again
            self._log.warning("http_accept_failed", error=str(exc))
            if self._waiting:
                self._drop(next(iter(self._waiting)), selector)
            else:
                self._stopping.wait(0.1)
            return
        with self._lock:
            open_now = len(self._waiting) + len(self._handed_over)
        if open_now >= self._max_connections:
            if not self._waiting:
                conn.close()  # every slot is a complete request being answered
                return
            self._drop(next(iter(self._waiting)), selector)
        conn.settimeout(0.0)  # non-blocking until its head is complete
        self._waiting[conn] = _Waiting(address, time.monotonic() + self._timeout)
        selector.register(conn, selectors.EVENT_READ)

    def _read_head(self, selector: selectors.BaseSelector, conn: socket.socket) -> None:
        waiting = self._waiting[conn]
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop(conn, selector)
            return
        waiting.head += data
        if len(waiting.head) < _MAX_HEAD and not any(end in waiting.head for end in _HEAD_ENDS):
            return
        selector.unregister(conn)
        del self._waiting[conn]
        with self._lock:
            self._handed_over.add(conn)
        self._pool.submit(self._handle, conn, waiting)

    def _drop_expired(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        expired = [conn for conn, waiting in self._waiting.items() if waiting.deadline <= now]
        for conn in expired:
            self._drop(conn, selector)

    def _drop(self, conn: socket.socket, selector: selectors.BaseSelector | None = None) -> None:
        if selector is not None:
            selector.unregister(conn)
        del self._waiting[conn]
        conn.close()

    # ------------------------------------------------------------------ handler threads

    def _handle(self, conn: socket.socket, waiting: _Waiting) -> None:
        errors = io.StringIO()
        stream = _DeadlineStream(conn, head=waiting.head, deadline=time.monotonic() + self._timeout)
        try:
            conn.settimeout(None)  # blocking; _DeadlineStream sets a timeout per call
            _Handler(conn, waiting.address, self._context, stream=stream, errors=errors)
        except OSError:
            pass  # timed out, reset, or shut down by stop(): nothing to answer
        except Exception as exc:  # noqa: BLE001 - one bad request never ends the listener
            self._log.warning("http_request_failed", error=repr(exc))
        finally:
            with self._lock:
                self._handed_over.discard(conn)
            conn.close()
        # wsgiref logs what raised while answering: the client's side (a timeout, a reset) is
        # not worth a line, the application's is.
        if errors.getvalue() and not stream.failed:
            self._log.warning("http_request_failed", error=errors.getvalue().strip())


@dataclass
class _Waiting:
    address: Any
    deadline: float
    head: bytes = field(default=b"")


class _Context(BaseServer):
    """What wsgiref's request handler reads from its server, without a socket of its own."""

    def __init__(self, app: WSGIApplication, port: int) -> None:
        super().__init__(("", port), WSGIRequestHandler)
        self.base_environ = {
            "SERVER_NAME": "pg-reaper",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PORT": str(port),
            "REMOTE_HOST": "",
            "CONTENT_LENGTH": "",
            "SCRIPT_NAME": "",
        }
        self._app = app

    def get_app(self) -> WSGIApplication:
        return self._app


class _Handler(WSGIRequestHandler):
    """wsgiref's handler over a connection whose head was read already, with one deadline."""

    def __init__(
        self,
        conn: socket.socket,
        address: Any,  # noqa: ANN401 - socketserver's own type
        context: _Context,
        *,
        stream: _DeadlineStream,
        errors: io.StringIO,
    ) -> None:
        self._stream = stream
        self._errors = errors
        super().__init__(conn, address, context)

    def setup(self) -> None:
        self.rfile = io.BufferedReader(self._stream)
        self.wfile = io.BufferedWriter(self._stream)

    def get_stderr(self) -> io.StringIO:
        return self._errors

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ANN401 - stdlib signature
        """Scrapes are not worth a log line each."""


class _DeadlineStream(io.RawIOBase):
    """The connection, first the bytes already read, every recv and send within one deadline."""

    def __init__(self, conn: socket.socket, *, head: bytes, deadline: float) -> None:
        super().__init__()
        self._conn = conn
        self._head = memoryview(head)
        self._deadline = deadline
        self.failed = False  # a recv or send raised: the client's side ended the request

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        target = memoryview(buffer).cast("B")
        if self._head:
            size = min(len(target), len(self._head))
            target[:size] = self._head[:size]
            self._head = self._head[size:]
            return size
        try:
            self._conn.settimeout(self._left())
            return self._conn.recv_into(target)
        except OSError:
            self.failed = True
            raise

    def write(self, data: ReadableBuffer, /) -> int:
        try:
            self._conn.settimeout(self._left())
            self._conn.sendall(data)  # the timeout bounds the whole sendall (Python 3.5+)
        except OSError:
            self.failed = True
            raise
        return memoryview(data).nbytes

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took longer than its deadline")
        return left
