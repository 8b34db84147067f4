"""The one-shot commands (`once`, `preview`, `doctor`, `sessions`) over several servers at once:
a live one between a dead one (nothing listens) and a hung one (accepts, never answers). Each
server gets its own connection and timeouts; the output keeps the config's order."""

from __future__ import annotations

import contextlib
import json
import socket
import textwrap
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from reaper.cli import main
from reaper.demo.programs import free_port
from tests.servers import ADMIN_APPLICATION, Sessions, TestServer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.integration

ORDER = ["dead", "live", "hung"]


class HungServer:
    """A 127.0.0.1 port that accepts connections and never says a word: libpq waits for its
    connect_timeout. Everything it accepted is closed by `close`."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="hung-server", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = self._listener.accept()
                self._accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._accepted:
            conn.close()
        self._listener.close()


@pytest.fixture
def hung() -> Iterator[HungServer]:
    server = HungServer()
    yield server
    server.close()


def dead_port() -> int:
    """A 127.0.0.1 port where nothing listens."""
    return free_port()


def config(tmp_path: Path, pg: TestServer, hung: HungServer, *, extra: str = "") -> Path:
    dsns = {
        "dead": f"host=127.0.0.1 port={dead_port()} dbname=postgres user=nobody",
        "live": pg.dsn(),
        "hung": f"host=127.0.0.1 port={hung.port} dbname=postgres user=nobody",
    }
    servers = "".join(
        f"\n[[servers]]\nname = {json.dumps(name)}\ndsn = {json.dumps(dsns[name])}\n"
        for name in ORDER
    )
    path = tmp_path / "config.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [reaper]
            connect_timeout = "2s"
            protect_applications = ["^{ADMIN_APPLICATION}$"]

            [log]
            format = "json"
            {extra}
            """
        )
        + servers
        + textwrap.dedent(
            """
            [[policies]]
            name = "idle"
            max_idle = "1s"
            applications = ["^oneshot-"]
            """
        ),
        encoding="utf-8",
    )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    document = json.loads(captured.out) if "--json" in argv else captured.out
    return code, document, captured.err


def check_servers(document: Any) -> dict[str, Any]:
    """The per-server entries of a --json document: in config order, only `live` answered."""
    servers = document["servers"]
    assert [s["server"] for s in servers] == ORDER
    by_name = {s["server"]: s for s in servers}
    assert by_name["live"]["error"] is None
    assert "cannot connect" in by_name["dead"]["error"]
    assert "cannot connect" in by_name["hung"]["error"]
    assert "timeout" in by_name["hung"]["error"]
    assert document["ok"] is False
    return by_name


def check_text_order(text: str, marker: str = "{}") -> None:
    """Human output: every server named (as `marker` writes it), in config order."""
    positions = [text.find(marker.format(name)) for name in ORDER]
    assert -1 not in positions, text
    assert positions == sorted(positions), text


def test_once_reaps_the_live_server_and_reports_each_dead_one_in_config_order(
    pg: TestServer,
    sessions: Sessions,
    hung: HungServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    table = f"oneshot_audit_{pg.major}"
    pg.execute(f"DROP TABLE IF EXISTS {table}")
    audit = f'\n[audit]\ndsn = {json.dumps(pg.dsn())}\ntable = "{table}"\n'
    victim = sessions.idle(application="oneshot-victim")
    fresh_config = config(tmp_path, pg, hung, extra=audit)
    time.sleep(1.3)

    code, document, err = run(capsys, "once", "-c", str(fresh_config), "--json")

    assert code == 1  # a server could not be polled
    by_name = check_servers(document)
    (decision,) = by_name["live"]["decisions"]
    assert decision["pid"] == victim.info.backend_pid
    assert decision["result"] == "terminated"
    assert pg.wait_gone(victim.info.backend_pid)
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    failed = [e["server"] for e in events if e["event"] == "poll_failed"]
    assert failed == ["dead", "hung"]
    assert [e["server"] for e in events if e["event"] == "poll_completed"] == ["live"]
    rows = pg.execute(f"SELECT server, pid, result FROM {table}")  # written before `once` exits
    assert rows == [("live", victim.info.backend_pid, "terminated")]
    pg.execute(f"DROP TABLE {table}")

    code, text, _ = run(capsys, "once", "-c", str(fresh_config), "--dry-run")
    assert code == 1
    check_text_order(text)


def test_preview_lists_the_live_servers_victims_and_each_dead_servers_error_in_order(
    pg: TestServer,
    sessions: Sessions,
    hung: HungServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    victim = sessions.idle(application="oneshot-preview")
    time.sleep(1.3)

    code, document, _ = run(capsys, "preview", "-c", str(config(tmp_path, pg, hung)), "--json")

    assert code == 1
    by_name = check_servers(document)
    assert [d["pid"] for d in by_name["live"]["decisions"]] == [victim.info.backend_pid]
    assert pg.is_alive(victim.info.backend_pid)  # preview signals nothing


def test_once_with_server_sweeps_only_that_server(
    pg: TestServer,
    sessions: Sessions,
    hung: HungServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    victim = sessions.idle(application="oneshot-only")
    path = config(tmp_path, pg, hung)
    time.sleep(1.3)

    code, document, err = run(capsys, "once", "-c", str(path), "--server", "live", "--json")

    assert code == 0  # the dead and hung servers were not polled
    assert [s["server"] for s in document["servers"]] == ["live"]
    assert [d["pid"] for d in document["servers"][0]["decisions"]] == [victim.info.backend_pid]
    assert pg.wait_gone(victim.info.backend_pid)
    assert "poll_failed" not in err

    code, _, err = run(capsys, "once", "-c", str(path), "--server", "nope")
    assert code == 2
    assert "--server 'nope' is not configured" in err


def test_doctor_examines_the_live_server_and_reports_each_dead_one_in_order(
    pg: TestServer, hung: HungServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, pg, hung)

    code, document, _ = run(capsys, "doctor", "-c", str(path), "--json")

    assert code == 1
    by_name = check_servers(document)
    assert by_name["live"]["version_num"] // 10000 == pg.major

    code, text, _ = run(capsys, "doctor", "-c", str(path))
    assert code == 1
    check_text_order(text, "{} (")
    assert text.count("server could not be examined") == 2, text


def test_sessions_counts_the_live_server_and_reports_each_dead_one_in_order(
    pg: TestServer,
    sessions: Sessions,
    hung: HungServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sessions.idle(application="oneshot-count")
    path = config(tmp_path, pg, hung)

    code, document, _ = run(capsys, "sessions", "-c", str(path), "--json", "--by", "application")

    assert code == 1
    by_name = check_servers(document)
    assert by_name["live"]["client_sessions"] >= 1

    code, text, _ = run(capsys, "sessions", "-c", str(path))
    assert code == 1
    check_text_order(text, "{} (")


def test_a_single_live_server_still_exits_0(
    pg: TestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], hung: HungServer
) -> None:
    path = config(tmp_path, pg, hung)

    code, document, _ = run(capsys, "preview", "-c", str(path), "--server", "live", "--json")

    assert code == 0
    assert [s["server"] for s in document["servers"]] == ["live"]
