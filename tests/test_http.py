"""The /metrics listener: IPv4, IPv6 and dual-stack addresses, and clients that hold on to it.

Real sockets on the loopback interfaces. No assertion on speed: outcomes, with generous waits.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

import pytest
from prometheus_client import CollectorRegistry, Counter
from structlog.testing import capture_logs

from reaper.daemon.http import HttpServer, _DeadlineStream, parse_listen
from reaper.settings import MetricsSection
from tests.servers import wait_for
from tests.test_daemon import RunningDaemon, daemon_config, policy, run_to_exit, server_name

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from prometheus_client.registry import Collector

    from tests.servers import TestServer

WORKERS = 2
TIMEOUT = 1.0  # the listener's request timeout in these tests
WAIT = 30.0  # generous bound on anything that should happen within TIMEOUT


def _ipv6_loopback() -> str | None:
    """Why this machine cannot listen on ::1, or None when it can."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        return f"no IPv6 loopback on this machine: {exc}"
    return None


NO_IPV6 = _ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(NO_IPV6 is not None, reason=str(NO_IPV6))
needs_dualstack = pytest.mark.skipif(
    NO_IPV6 is not None or not socket.has_dualstack_ipv6(),
    reason=str(NO_IPV6 or "the OS does not allow dual-stack IPv6 sockets"),
)


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("pg_reaper_test_scrapes", "A sample to find in /metrics.", registry=registry).inc()
    return registry


@pytest.fixture
def listener(registry: CollectorRegistry) -> Iterator[Callable[..., HttpServer]]:
    started: list[HttpServer] = []

    def start(listen: str, **limits: float) -> HttpServer:
        server = HttpServer(
            listen=listen,
            registry=registry,
            healthy=lambda: True,
            ready=lambda: False,
            **{"workers": WORKERS, "request_timeout": TIMEOUT, **limits},  # type: ignore[arg-type]
        )
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


def get(host: str, port: int, path: str = "/metrics") -> tuple[int, str]:
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            return exc.code, exc.read().decode()


def scrape(host: str, port: int) -> str:
    status, body = get(host, port)
    assert status == 200, body
    assert "pg_reaper_test_scrapes_total 1.0" in body
    return body


def dropped(conn: socket.socket) -> bool:
    """Wait (bounded) until the listener closes `conn`; True when it did."""
    conn.settimeout(WAIT)
    try:
        while conn.recv(1024):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


def http_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pg-reaper-http")]


# --- addresses --------------------------------------------------------------------------------


def test_an_ipv4_listener_answers_metrics_healthz_and_readyz(
    listener: Callable[..., HttpServer],
) -> None:
    server = listener("127.0.0.1:0")

    scrape("127.0.0.1", server.port)
    assert get("127.0.0.1", server.port, "/healthz")[0] == 200
    assert get("127.0.0.1", server.port, "/readyz") == (503, "not ready\n")
    assert get("127.0.0.1", server.port, "/nope")[0] == 404


@needs_ipv6
def test_an_ipv6_listener_answers_metrics(listener: Callable[..., HttpServer]) -> None:
    server = listener("[::1]:0")

    assert server.addresses == [("::1", server.port)]
    scrape("::1", server.port)
    with pytest.raises(urllib.error.URLError):  # [::1] means that address only
        get("127.0.0.1", server.port)


@needs_dualstack
def test_a_dual_stack_listener_answers_on_ipv6_and_ipv4(
    listener: Callable[..., HttpServer],
) -> None:
    server = listener("[::]:0")

    scrape("::1", server.port)
    scrape("127.0.0.1", server.port)


def test_an_empty_host_means_every_address(listener: Callable[..., HttpServer]) -> None:
    server = listener(":0")

    scrape("127.0.0.1", server.port)
    if NO_IPV6 is None and socket.has_dualstack_ipv6():
        scrape("::1", server.port)


def test_a_host_name_is_resolved_and_every_address_of_it_bound(
    listener: Callable[..., HttpServer],
) -> None:
    infos = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)
    # An address that this host cannot bind (::1 without IPv6) is skipped.
    resolved = {str(info[4][0]) for info in infos if NO_IPV6 is None or ":" not in str(info[4][0])}

    server = listener("localhost:0")

    assert {address for address, _ in server.addresses} == resolved
    assert {port for _, port in server.addresses} == {server.port}
    for address in resolved:
        scrape(address, server.port)


def test_parse_listen_strips_brackets_and_keeps_an_empty_host() -> None:
    assert parse_listen("[::1]:9188") == ("::1", 9188)
    assert parse_listen("[::]:9188") == ("::", 9188)
    assert parse_listen(":9188") == ("", 9188)
    assert parse_listen("localhost:9188") == ("localhost", 9188)


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:9188", "[::1]:9188", "[::]:9188", ":9188", "localhost:9188", ""]
)
def test_valid_listen_addresses_are_accepted(listen: str) -> None:
    assert MetricsSection(listen=listen).listen == listen


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("::1:9188", "bracket an IPv6 host"),
        ("[::1:9188", "bracket an IPv6 host"),
        ("[localhost]:9188", "'localhost' is not an IPv6 address"),
        ("[]:9188", "'' is not an IPv6 address"),
        ("127.0.0.1", "use 'host:port'"),
        ("127.0.0.1:0", "use 'host:port'"),
    ],
)
def test_invalid_listen_addresses_are_refused(listen: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetricsSection(listen=listen)


# --- clients that hold on to the listener -----------------------------------------------------


def test_silent_and_trickling_clients_do_not_stop_a_scrape_and_are_dropped_after_the_timeout(
    listener: Callable[..., HttpServer],
) -> None:
    server = listener("127.0.0.1:0")
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4 * WORKERS)]
    trickling = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4 * WORKERS)]
    stop_trickling = threading.Event()

    def trickle() -> None:  # a byte of a never-ending request line, every tenth of a second
        while not stop_trickling.wait(0.1):
            for conn in trickling:
                with contextlib.suppress(OSError):
                    conn.send(b"G")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        for _ in range(3):
            scrape("127.0.0.1", server.port)

        assert all(dropped(conn) for conn in silent)
        assert all(dropped(conn) for conn in trickling)
        scrape("127.0.0.1", server.port)
    finally:
        stop_trickling.set()
        trickler.join(timeout=WAIT)
        for conn in silent + trickling:
            conn.close()


def test_clients_that_never_read_their_response_do_not_hold_the_handler_threads(
    registry: CollectorRegistry, listener: Callable[..., HttpServer]
) -> None:
    big = Counter("pg_reaper_test_big", "Many series.", ["n"], registry=registry)
    for n in range(20_000):  # a response of megabytes
        big.labels(n=f"{n:0>40}").inc()
    server = listener("127.0.0.1:0")
    readers = []
    for _ in range(WORKERS + 1):
        reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect: a small receive window.
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", server.port))
        reader.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        readers.append(reader)
    try:
        for _ in range(WORKERS + 1):
            assert get("127.0.0.1", server.port, "/healthz")[0] == 200
    finally:
        for reader in readers:
            reader.close()


def test_a_response_the_client_does_not_read_times_out_at_the_deadline() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        stream = _DeadlineStream(ours, head=b"GET", deadline=time.monotonic() + TIMEOUT)
        assert stream.read(10) == b"GET"  # what the accepting thread had read already

        with pytest.raises(TimeoutError):
            stream.write(b"x" * 20_000_000)  # far more than a socket buffer holds
        assert stream.failed
        with pytest.raises(TimeoutError):
            stream.read(10)  # the deadline is spent: no more waiting either


def test_many_concurrent_connections_never_grow_the_threads_beyond_the_bound(
    listener: Callable[..., HttpServer],
) -> None:
    server = listener("127.0.0.1:0")
    before = set(http_threads())
    seen: set[str] = set()
    failures: list[BaseException] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.005):
            seen.update(http_threads())

    def client() -> None:
        try:
            scrape("127.0.0.1", server.port)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [threading.Thread(target=client, daemon=True) for _ in range(40)]
    try:
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=WAIT)
    finally:
        stop_sampling.set()
        sampler.join(timeout=WAIT)
        for conn in idle:
            conn.close()

    assert not failures, failures
    assert not any(thread.is_alive() for thread in clients)
    ours = (seen | set(http_threads())) - before
    # The accepting thread and at most WORKERS handler threads, whatever the load.
    assert len([name for name in ours if name != "pg-reaper-http"]) <= WORKERS, ours


def test_past_max_connections_the_longest_waiting_client_makes_room(
    listener: Callable[..., HttpServer],
) -> None:
    server = listener("127.0.0.1:0", max_connections=4, request_timeout=WAIT)
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    try:
        scrape("127.0.0.1", server.port)  # the first silent client is closed to make room

        assert dropped(silent[0])
    finally:
        for conn in silent:
            conn.close()


def test_an_application_error_answers_500_logs_a_warning_and_the_listener_goes_on(
    registry: CollectorRegistry, listener: Callable[..., HttpServer]
) -> None:
    class Broken:
        def collect(self) -> Iterator[object]:
            raise RuntimeError("collector broke")

    broken: Collector = Broken()  # type: ignore[assignment]
    server = listener("127.0.0.1:0")
    registry.register(broken)

    with capture_logs() as logs:
        assert get("127.0.0.1", server.port)[0] == 500
        # The handler thread logs once the response is out: wait for it inside the capture.
        wait_for(lambda: any(e["event"] == "http_request_failed" for e in logs), what="the warning")
        registry.unregister(broken)
        scrape("127.0.0.1", server.port)

    failed = [e for e in logs if e["event"] == "http_request_failed"]
    assert len(failed) == 1, logs
    assert "collector broke" in failed[0]["error"]


def test_stop_closes_every_listening_socket_and_ends_its_threads(
    registry: CollectorRegistry,
) -> None:
    before = set(http_threads())
    server = HttpServer(
        listen="127.0.0.1:0",
        registry=registry,
        healthy=lambda: True,
        ready=lambda: True,
        request_timeout=WAIT,
    )
    server.start()
    scrape("127.0.0.1", server.port)
    waiting = socket.create_connection(("127.0.0.1", server.port))

    server.stop()

    assert dropped(waiting)
    waiting.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=WAIT).close()
    assert set(http_threads()) <= before


# --- the daemon -------------------------------------------------------------------------------


def _free_ipv6_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        return int(sock.getsockname()[1])


@needs_ipv6
@pytest.mark.integration
def test_the_daemon_serves_metrics_on_an_ipv6_listen_address(
    pg: TestServer, tmp_path: Path
) -> None:
    port = _free_ipv6_port()
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server_name(pg): pg.dsn()},
        policies=policy("idle", "^t-http-"),
        port=port,
    )
    config.write_text(config.read_text().replace(f"127.0.0.1:{port}", f"[::1]:{port}"))
    daemon = RunningDaemon(config, port=port)
    try:

        def ready() -> bool:
            with contextlib.suppress(OSError):
                return get("::1", port, "/readyz")[0] == 200
            return False

        daemon.wait_until(ready, timeout=WAIT, what="/readyz 200 on [::1]")
        _, body = get("::1", port)
        assert f'pg_reaper_server_up{{server="{server_name(pg)}"}} 1.0' in body
        assert daemon.events("daemon_started")[0]["metrics"] == f"http://[::1]:{port}/metrics"
    finally:
        daemon.stop()


@pytest.mark.integration
def test_run_with_a_listen_host_that_does_not_resolve_exits_2_with_a_clear_message(
    pg: TestServer, tmp_path: Path
) -> None:
    config = daemon_config(
        tmp_path / "config.toml",
        servers={server_name(pg): pg.dsn()},
        policies=policy("idle", "^t-http-"),
        port=9188,
    )
    config.write_text(config.read_text().replace("127.0.0.1:9188", "no-such-host.invalid:9188"))

    done = run_to_exit(config)

    assert done.returncode == 2, done.stderr
    assert "metrics.listen: cannot listen on no-such-host.invalid:9188" in done.stderr
    assert "Traceback" not in done.stderr
